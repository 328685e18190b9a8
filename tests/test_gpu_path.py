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
