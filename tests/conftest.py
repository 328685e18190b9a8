"""Shared fixtures: where the repository and the real data are, a free loopback port, and models to serve.

- `tiny_model_dir`: a tiny ONNX model built with `onnx.helper` only (no torch) that honours the ONNX contract exactly
  (docs/design.md §2), with a `model.json` card written through `serving.core.contract.ModelCard`. Fast tests use
  it.
- `default_model_dir`: the real default model `model_store/cifar10-lite0` (skipped, with the reason, if absent).
- `cifar_test_dir`: the CIFAR-10 test JPEGs, extracted once into a cache directory (never into the repository).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import numpy as np
import pytest

from benchmarks.common import TAR_FILTER

REPO_ROOT = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run (a failure on CI is a failure here too); loaded before the test
# modules, so their own @settings inherit it. HYPOTHESIS_PROFILE=explore draws new examples.
hypothesis.settings.register_profile("deepclust", derandomize=True, print_blob=True)
hypothesis.settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deepclust"))
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_service(tmp_path_factory: pytest.TempPathFactory, **settings) -> Iterator:
    """A real `deepclust serve` host (front + TorchServe) on free loopback ports, stopped (and checked) on exit."""
    from serving.hosts.torchserve.server import ServeConfig, TorchServeHost

    config = ServeConfig(
        **{
            "port": free_port(),
            "metrics_port": free_port(),
            "torchserve_metrics_port": free_port(),
            "management_port": free_port(),
            "cache_dir": tmp_path_factory.mktemp("cache"),
            "startup_timeout_s": 240,
            **settings,
        }
    )
    host = TorchServeHost(config)
    try:
        host.start()
        host.wait_ready()
        yield host
    finally:
        host.stop()
        assert host.process.poll() is not None


def predictions_url(host) -> str:
    return f"{host.config.base_url}/predictions/{host.config.model_name}"


def cifar_jpegs(cifar_test_dir: Path, per_class: int) -> list[bytes]:
    """The first `per_class` real JPEGs of every CIFAR-10 class, class by class."""
    classes = sorted(p.name for p in cifar_test_dir.iterdir() if p.is_dir())
    return [p.read_bytes() for c in classes for p in sorted((cifar_test_dir / c).glob("*.jpg"))[:per_class]]


def cache_dir() -> Path:
    """`$DEEPCLUST_CACHE` or `~/.cache/deepclust` (the same rule as the serving code)."""
    root = os.environ.get("DEEPCLUST_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "deepclust"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`$DEEPCLUST_DATA` or `<repo>/../shared/data` (read-only)."""
    env = os.environ.get("DEEPCLUST_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set DEEPCLUST_DATA)")
    return path


def _extract_once(archive: Path, target: Path, top: str) -> Path:
    """Extract `archive` into `target` once; safe against a concurrent or interrupted extraction."""
    done = target / f".{top}.complete"
    if done.exists() and (target / top).is_dir():
        return target / top
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{top}-", dir=target))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, **TAR_FILTER)
        final = target / top
        if not done.exists():
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            try:
                (staging / top).rename(final)
            except OSError:
                if not final.is_dir():  # another process won the race: fine if its copy is complete
                    raise
            done.touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def cifar_test_dir(shared_data: Path) -> Path:
    """CIFAR-10 test set as `test/<class>/*.jpg` (10 × 1,000 real JPEGs), extracted once into the cache."""
    archive = shared_data / "cifar10" / "test.tar"
    if not archive.is_file():
        pytest.skip(f"{archive} not found")
    return _extract_once(archive, cache_dir() / "data" / "cifar10", "test")


# ------------------------------------------------------------------------------------------------- tiny model
TINY_K = 10
TINY_D = 16
TINY_SIZE = 32


def build_tiny_onnx(path: Path, *, k: int = TINY_K, dim: int = TINY_D, size: int = TINY_SIZE, seed: int = 0) -> None:
    """A linear "clusterer" on raw pixels that honours the ONNX contract exactly: input `images` uint8
    [N, size, size, 3]; outputs `probabilities` float32 [N, K], `cluster` int64 [N], `embedding` float32 [N,
    D];
    all `deepclust.*` metadata_props. Built with `onnx.helper` only, so fast tests need no torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    features = size * size * 3
    w_embed = (rng.standard_normal((features, dim)) / np.sqrt(features)).astype(np.float32)
    w_head = rng.standard_normal((dim, k)).astype(np.float32) * 4.0
    b_head = rng.standard_normal(k).astype(np.float32) * 0.1
    initializers = [
        numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(w_embed, "w_embed"),
        numpy_helper.from_array(w_head, "w_head"),
        numpy_helper.from_array(b_head, "b_head"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "one"], ["normalised"]),  # normalisation inside the model
        helper.make_node("Flatten", ["normalised"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_embed"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w_head"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "b_head"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["cluster"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "deepclust_tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("cluster", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    model.producer_name = "deepclust-tests"
    class_names = CIFAR10_CLASSES if k == 10 else None
    for key, value in tiny_metadata(k, size, class_names).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def tiny_metadata(k: int, size: int, class_names: list[str] | None) -> dict[str, str]:
    import onnx

    return {
        "deepclust.method": "tiny",
        "deepclust.k": str(k),
        "deepclust.input_size": str(size),
        "deepclust.backbone": "linear_pixels",
        "deepclust.class_names": json.dumps(class_names),
        "deepclust.metrics": json.dumps(
            {"acc": 0.1, "nmi": 0.0, "ari": 0.0, "dataset": "synthetic", "split": "none", "n": 0}
        ),
        "deepclust.reference": json.dumps(
            {"cluster_hist": [1.0 / k] * k, "confidence_quantiles": {"0.05": 0.2, "0.5": 0.6, "0.95": 0.95}}
        ),
        "deepclust.source_sha256": "0" * 64,
        "deepclust.config_sha256": "0" * 64,
        "deepclust.created_at": "2026-01-01T00:00:00+00:00",
        "deepclust.exporter": json.dumps({"torch": None, "onnx": onnx.__version__, "opset": 17}),
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tmp>/tiny-test/` with `model.onnx` (K=10, 32 px, CIFAR-10 class names) and its `model.json` card."""
    from serving.core.contract import ModelCard

    folder = tmp_path_factory.mktemp("store") / "tiny-test"
    folder.mkdir()
    build_tiny_onnx(folder / "model.onnx")
    card = ModelCard(
        name="tiny-test",
        method="tiny",
        k=TINY_K,
        input_size=TINY_SIZE,
        backbone="linear_pixels",
        class_names=CIFAR10_CLASSES,
        metrics={"acc": 0.1, "nmi": 0.0, "ari": 0.0, "dataset": "synthetic", "split": "none", "n": 0},
        reference={
            "cluster_hist": [0.1] * TINY_K,
            "confidence_quantiles": {"0.05": 0.2, "0.5": 0.6, "0.95": 0.95},
        },
        source_sha256="0" * 64,
        config_sha256="0" * 64,
        exporter={"torch": None, "onnx": "test", "opset": 17},
        rebuild_command="pytest fixture tests/conftest.py::tiny_model_dir",
    )
    card.add_file(folder / "model.onnx", precision="fp32")
    card.save(folder / "model.json")
    return folder


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model; skipped (with the reason) until the export has produced it."""
    folder = REPO_ROOT / "model_store" / "cifar10-lite0"
    if not (folder / "model.onnx").is_file():
        pytest.skip(f"default model absent: {folder}/model.onnx (produced by `deepclust export`)")
    return folder
