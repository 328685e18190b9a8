"""`benchmarks/gpu.py` as a smoke test on this machine (no GPU): it runs end to end against the CPU provider, writes
its JSON rows, and says in every row that no GPU was found and which provider really ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(REPO))
    from benchmarks import gpu

    return gpu


def test_engine_rows_on_this_machine(gpu_bench, tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "gpu.json"
    args = ["--model", str(tiny_model_dir), "--batches", "1", "4", "--seconds", "0.05", "--images", "16"]
    assert gpu_bench.main([*args, "--synthetic", "--no-service", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["kind"], r["variant"], r["batch"]) for r in rows] == [("engine", "fp32", 1), ("engine", "fp32", 4)]
    for row in rows:
        assert row["images_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["provider"] == "CPUExecutionProvider" and row["on_gpu"] is False
        assert row["agreement_vs_fp32_cpu"] == 1.0 and row["agreement_images"] == 16
        assert row["providers_asked"] == ["cuda", "cpu"] and row["commit"] and "--no-service" in row["command"]
        if not row["gpu_found"]:  # this project's machine
            assert row["gpu"] is None and row["gpu_note"].startswith("no GPU found")
            assert row["machine"].endswith("no GPU") and row["gpu_memory_mb"] is None
            if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
                assert "CUDAExecutionProvider" in row["fallback_reasons"]  # onnxruntime's reason, recorded
    # a second run replaces its own rows and keeps other machines' rows
    other = {**rows[0], "machine": "elsewhere"}
    out.write_text(json.dumps([*rows, other]))
    assert gpu_bench.main([*args, "--synthetic", "--no-service", "--output", str(out)]) == 0
    again = json.loads(out.read_text())
    assert len(again) == 3 and sum(r["machine"] == "elsewhere" for r in again) == 1


def test_require_gpu_fails_on_this_machine(gpu_bench, tiny_model_dir: Path, tmp_path: Path):
    from serving.core.engine import GpuUnavailableError

    if gpu_bench.gpu_info()["gpu_found"]:
        pytest.skip("a GPU is present: nothing to refuse")
    args = ["--model", str(tiny_model_dir), "--batches", "1", "--seconds", "0.05", "--images", "4", "--synthetic"]
    with pytest.raises(GpuUnavailableError):
        gpu_bench.main([*args, "--no-service", "--require-gpu", "--output", str(tmp_path / "gpu.json")])
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow  # starts a real TorchServe
def test_service_rows_name_the_provider_the_workers_run(gpu_bench, tiny_model_dir: Path, tmp_path: Path):
    """The service part through `deepclust serve` (TorchServe, one worker, one short level): img/s, p99, no errors,
    and the provider read back from the workers' `deepclust_model_info`."""
    pytest.importorskip("ts", reason="TorchServe (serve extra) not installed")
    out = tmp_path / "gpu.json"
    args = ["--model", str(tiny_model_dir), "--batches", "4", "--seconds", "1", "--images", "16", "--synthetic"]
    assert gpu_bench.main([*args, "--concurrency", "2", "--workers", "1", "--output", str(out)]) == 0
    service = [r for r in json.loads(out.read_text()) if r["kind"] == "service"]
    assert len(service) == 1
    row = service[0]
    assert row["images_per_s"] > 0 and row["errors"] == 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert row["provider"] == "cpu" and row["on_gpu"] is False and row["variant"] == "fp32"
