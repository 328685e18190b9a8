"""The GPU path, checked on this CPU machine: `variant: auto`, the worker's GPU, decode threads (issue #24).

What a CPU cannot show (a CUDA session running, FP16 speed) is measured by `benchmarks/gpu.py` on a GPU; here the
decisions around it are tested: which file `auto` opens with and without a GPU provider, that the handler hands
TorchServe's `gpu_id` to the engine, and that parallel decoding changes nothing but the speed.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from serving.core.contract import ModelCard
from serving.core.engine import Engine, GpuUnavailableError
from serving.core.model_store import ModelStoreError
from serving.core.results import ItemError
from serving.core.variants import auto_variant, open_engine, present_variants
from serving.hosts.torchserve import handler as handler_module
from serving.hosts.torchserve.handler import CONFIG_ENV, DeepclustHandler, decode_threads

GPU_IN_BUILD = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def store_with_fp16(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model folder with an FP16 file (onnxruntime's converter, I/O types kept) in its card."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    folder = tmp_path_factory.mktemp("gpu-store") / "tiny-test"
    shutil.copytree(tiny_model_dir, folder)
    proto = convert_float_to_float16(
        onnx.load(str(folder / "model.onnx")), keep_io_types=True, op_block_list=["ArgMax"]
    )
    for prop in proto.metadata_props:
        if prop.key == "deepclust.precision":
            prop.value = "fp16"
    onnx.save(proto, str(folder / "model.fp16.onnx"))
    card = ModelCard.load(folder)
    card.add_file(folder / "model.fp16.onnx", precision="fp16")
    card.save(folder)
    return folder


def test_auto_variant_rule():
    assert auto_variant(True, ["fp32", "int8", "fp16"]) == "fp16"
    assert auto_variant(True, ["fp32", "int8"]) == "fp32"  # no FP16 file: FP32 on the GPU
    assert auto_variant(False, ["fp32", "int8", "fp16"]) == "fp32"  # CPU: never FP16, never INT8 unasked


def test_auto_on_this_cpu_machine_opens_fp32_on_cpu_with_the_gpu_reason(store_with_fp16: Path):
    assert present_variants(store_with_fp16) == ["fp32", "fp16"]
    engine = open_engine(store_with_fp16, "auto", providers=("cuda", "cpu"), warmup=False)
    assert engine.provider == "CPUExecutionProvider"
    assert engine.model_path.name == "model.onnx" and engine.metadata.precision in (None, "fp32")
    if GPU_IN_BUILD:  # the FP16 file was tried on CUDA first and its reason kept
        assert "CUDAExecutionProvider" in engine.fallback_reasons
    cpu_asked = open_engine(store_with_fp16, "auto", providers=("cpu",), warmup=False)
    assert cpu_asked.model_path.name == "model.onnx" and cpu_asked.fallback_reasons == {}


def test_auto_keeps_require_gpu(store_with_fp16: Path):
    with pytest.raises(GpuUnavailableError) as info:
        open_engine(store_with_fp16, "auto", providers=("cuda", "cpu"), require_gpu=True, warmup=False)
    assert "CUDAExecutionProvider" in str(info.value) and info.value.reasons


class _FakeGpuEngine:
    """Stands in for a GPU: every accelerator 'starts'; records which file was opened."""

    opened: list[str] = []

    def __init__(self, path, *, providers, require_gpu=False, **_options):
        self.model_path = Path(path)
        self.provider = "CUDAExecutionProvider" if "cuda" in providers else "CPUExecutionProvider"
        self.fallback_reasons: dict[str, str] = {}
        _FakeGpuEngine.opened.append(self.model_path.name)


def test_auto_opens_fp16_when_a_gpu_provider_runs(store_with_fp16: Path, tiny_model_dir: Path, monkeypatch):
    import serving.core.variants as variants

    monkeypatch.setattr(variants, "Engine", _FakeGpuEngine)
    monkeypatch.setattr(variants, "resolve_providers", lambda names: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _FakeGpuEngine.opened = []
    assert open_engine(store_with_fp16, "auto", providers=("cuda", "cpu")).model_path.name == "model.fp16.onnx"
    assert open_engine(tiny_model_dir, "auto", providers=("cuda", "cpu")).model_path.name == "model.onnx"
    assert open_engine(store_with_fp16, "fp32").model_path.name == "model.onnx"
    assert _FakeGpuEngine.opened == ["model.fp16.onnx", "model.onnx", "model.onnx"]


def test_every_variant_is_checked_against_the_card(store_with_fp16: Path, tmp_path: Path):
    changed = tmp_path / "tiny-test"
    shutil.copytree(store_with_fp16, changed)
    (changed / "model.fp16.onnx").write_bytes((changed / "model.fp16.onnx").read_bytes() + b"\0")
    with pytest.raises(ModelStoreError, match="does not match"):
        open_engine(changed, "fp16", providers=("cpu",), warmup=False)
    with pytest.raises(ValueError, match="unknown variant"):
        open_engine(changed, "bf16")


# ------------------------------------------------------------------------------------------------ the handler
def _context(model_dir: Path, gpu_id: str | None) -> SimpleNamespace:
    return SimpleNamespace(system_properties={"model_dir": str(model_dir), "gpu_id": gpu_id}, model_name="tiny")


def _handler(monkeypatch, model_dir: Path, gpu_id: str | None = None, **config) -> DeepclustHandler:
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"metrics": False, "providers": ["cpu"], "max_batch": 8, **config}))
    handler = DeepclustHandler()
    handler.initialize(_context(model_dir, gpu_id))
    return handler


def test_handler_gives_the_engine_torchserves_gpu_id(tiny_model_dir: Path, monkeypatch):
    seen = []

    class Recording(Engine):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["device_id"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(handler_module, "Engine", Recording)
    assert _handler(monkeypatch, tiny_model_dir, gpu_id="1").engine.device_id == 1
    assert _handler(monkeypatch, tiny_model_dir, gpu_id=None).engine.device_id == 0  # no GPUs: TorchServe sends none
    assert seen == [1, 0]


def test_handler_variant_auto_serves_fp32_on_cpu(store_with_fp16: Path, monkeypatch):
    handler = _handler(monkeypatch, store_with_fp16, variant="auto", providers=["cuda", "cpu"])
    assert handler.engine.model_path.name == "model.onnx" and handler.engine.provider == "CPUExecutionProvider"
    assert handler.decode_threads == 1


def test_decode_threads_rule():
    assert decode_threads({"intra_op_threads": 2}, "CPUExecutionProvider") == 1
    assert decode_threads({"intra_op_threads": 2}, "CUDAExecutionProvider") == 2
    assert decode_threads({"intra_op_threads": 0}, "CUDAExecutionProvider") == 1
    assert decode_threads({"intra_op_threads": 2, "decode_threads": 3}, "CPUExecutionProvider") == 3


def _jpeg(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_parallel_decode_keeps_order_and_per_image_errors(tiny_model_dir: Path, monkeypatch):
    """Three decode threads and the serial path give the same batch, the same (request, item) map and the same
    per-image errors, on requests mixing good and bad images."""
    requests = [
        {"a": _jpeg(1), "b": b"not an image", "c": _jpeg(2)},
        {"body": _jpeg(3)},
        {"a": _jpeg(4), "b": _jpeg(5), "c": b"", "d": _jpeg(6)},
    ]
    serial = _handler(monkeypatch, tiny_model_dir)
    threaded = _handler(monkeypatch, tiny_model_dir, decode_threads=3)
    assert serial._decode_pool is None and threaded._decode_pool is not None
    p1, batch1, where1 = serial.preprocess([dict(r) for r in requests])
    p2, batch2, where2 = threaded.preprocess([dict(r) for r in requests])
    assert where1 == where2 == [(0, 0), (0, 2), (1, 0), (2, 0), (2, 1), (2, 3)]
    assert np.array_equal(batch1, batch2) and batch1.shape == (6, 32, 32, 3)
    errors = [[i for i, item in enumerate(p.items) if isinstance(item, ItemError)] for p in p2]
    assert errors == [[1], [], [2]]
    assert [[getattr(item, "error", None) for item in p.items] for p in p1] == [
        [getattr(item, "error", None) for item in p.items] for p in p2
    ]


# ------------------------------------------------------------------------------------- `deepclust serve --variant auto`
def _serve_config(model_dir: Path, tmp_path: Path, **settings):
    from serving.hosts.serve.config import ServeConfig

    return ServeConfig(model_store=model_dir.parent, model=model_dir.name, cache_dir=tmp_path / "cache", **settings)


def test_serve_config_auto_files_and_handler_config(store_with_fp16: Path, tiny_model_dir: Path, tmp_path: Path):
    from pydantic import ValidationError

    from serving.hosts.serve.config import verify_model

    assert _serve_config(store_with_fp16, tmp_path).variant == "fp32"  # the default is unchanged
    with pytest.raises(ValidationError):
        _serve_config(store_with_fp16, tmp_path, variant="bf16")
    auto = _serve_config(store_with_fp16, tmp_path, variant="auto")
    assert [p.name for p in auto.model_files] == ["model.onnx", "model.fp16.onnx"]  # both go into the .mar
    assert [p.name for p in _serve_config(tiny_model_dir, tmp_path, variant="auto").model_files] == ["model.onnx"]
    assert [p.name for p in _serve_config(store_with_fp16, tmp_path, variant="fp16").model_files] == ["model.fp16.onnx"]
    handler_config = auto.handler_config()
    assert handler_config["variant"] == "auto" and handler_config["intra_op_spin"] is False
    assert verify_model(auto).name == "tiny-test"
    changed = tmp_path / "store" / "tiny-test"  # the FP16 file a GPU worker would open is checked too
    shutil.copytree(store_with_fp16, changed)
    (changed / "model.fp16.onnx").write_bytes((changed / "model.fp16.onnx").read_bytes() + b"\0")
    with pytest.raises(ModelStoreError, match="does not match"):
        verify_model(_serve_config(changed, tmp_path, variant="auto"))


def test_check_gpu_opens_the_model_as_the_workers_do(store_with_fp16: Path, tmp_path: Path, monkeypatch):
    import serving.core.variants as variants
    from serving.hosts.serve.config import check_gpu

    config = _serve_config(store_with_fp16, tmp_path, variant="auto", require_gpu=True)
    with pytest.raises(GpuUnavailableError):  # this CPU machine: no GPU provider starts
        check_gpu(config)
    monkeypatch.setattr(variants, "Engine", _FakeGpuEngine)
    monkeypatch.setattr(variants, "resolve_providers", lambda names: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _FakeGpuEngine.opened = []
    assert check_gpu(config) == "CUDAExecutionProvider"
    assert _FakeGpuEngine.opened == ["model.fp16.onnx"]  # the file `auto` picks on a GPU


def test_torchserve_archive_holds_the_auto_files(store_with_fp16: Path, tmp_path: Path):
    import zipfile

    from serving.hosts.torchserve.server import build_archive

    if shutil.which("torch-model-archiver", path=str(Path(__import__("sys").executable).parent)) is None:
        pytest.skip("torch-model-archiver not installed (the 'serve' extra)")
    mar = build_archive(_serve_config(store_with_fp16, tmp_path, variant="auto"))
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"model.onnx", "model.fp16.onnx", "model.json", "handler.py"} <= names
    assert "model.int8.onnx" not in names


def test_handler_onnxruntime_threads_sleep_unless_asked(tiny_model_dir: Path, monkeypatch):
    assert _handler(monkeypatch, tiny_model_dir).engine.spin is False
    assert _handler(monkeypatch, tiny_model_dir, intra_op_spin=True).engine.spin is True


def test_engine_backend_serves_variant_auto_as_fp32_on_cpu(store_with_fp16: Path, tmp_path: Path):
    """A real `deepclust serve --backend engine --variant auto` on the tiny model: it answers, and its worker runs
    the FP32 file on CPU (ready log line, model-info metric)."""
    import requests
    from conftest import free_port

    from serving.hosts.engine_backend.host import EngineHost

    config = _serve_config(
        store_with_fp16,
        tmp_path,
        backend="engine",
        variant="auto",
        providers=["cuda", "cpu"],
        port=free_port(),
        metrics_port=free_port(),
        intra_op_threads=1,
        startup_timeout_s=120,
    )
    with EngineHost(config) as host:
        response = requests.post(f"{config.base_url}/predictions/tiny-test", data=_jpeg(7), timeout=30)
        assert response.status_code == 200, response.text
        assert "cluster" in response.json()[0]
        metrics = requests.get(f"http://127.0.0.1:{config.metrics_port}/metrics", timeout=10).text
        info = [line for line in metrics.splitlines() if line.startswith("deepclust_model_info{")]
        assert info and all('provider="cpu"' in line for line in info), info
        ready = [line for line in host.log_tail().splitlines() if "engine worker ready" in line]
        assert ready and "on CPUExecutionProvider" in ready[0], host.log_tail()
        described = json.loads(ready[0].split("on CPUExecutionProvider: ", 1)[1])
        assert Path(described["model"]).name == "model.onnx" and described["precision"] in (None, "fp32")
