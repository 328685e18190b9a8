"""The GPU benchmark: one command a GPU user runs to see what the GPU path really does.

    .venv/bin/python benchmarks/gpu.py                # on the GPU machine (or in the -gpu image): the one command

Measures, on the providers asked for (default CUDA, then CPU) and for every variant in the model folder:
- engine rows (`kind: engine`): img/s and p50/p99 per `run` call for each batch size, on pre-decoded real CIFAR-10
  test images (uint8, serving pre-processing); the provider that actually ran (`session.get_providers()[0]`), the
  reasons any accelerator did not start, the batch shape it ran at (padded on a GPU), the process's GPU memory
  (nvidia-smi), and each variant's argmax agreement with the FP32 file on CPU (the export's reference) on the same
  images — on a GPU this is the FP16 agreement the export could not measure without one;
- service rows (`kind: service`): `deepclust serve` (TorchServe backend by default) loaded by closed-loop clients
  through the HTTP front (`benchmarks/serve_load.py`'s client loop): img/s, p50/p99, errors, the provider each worker
  reports on `deepclust_model_info`, the GPU's memory in use while serving (nvidia-smi).
Every row says whether a GPU was found (`gpu_found`, `gpu`, `gpu_note`). Without one (this project's machine) the rows
measure the CPU provider and say so: `make test` runs this script that way as a smoke test
(tests/test_gpu_bench.py). Rows go to `benchmarks/results/gpu.json` (replacing the rows of the same machine, kind,
variant and size) or `--output`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, commit, machine, print_table  # noqa: E402
from serving.core.contract import VARIANT_FILES, VARIANTS  # noqa: E402
from serving.core.engine import GPU_PROVIDERS, Engine  # noqa: E402
from serving.core.preprocess import load_image  # noqa: E402
from serving.core.variants import open_engine, present_variants  # noqa: E402

MERGE_KEY = ("machine", "kind", "variant", "batch", "concurrency")


# ------------------------------------------------------------------------------------------------------- the GPU
def nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-… --format=csv,noheader,nounits`; None without nvidia-smi or when it fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        result = subprocess.run(
            [binary, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in result.stdout.splitlines() if line.strip()]


def gpu_info() -> dict[str, Any]:
    """What GPU this machine has, as nvidia-smi reports it (`gpu_found` False and a note when it reports none)."""
    rows = nvidia_smi("--query-gpu=index,name,driver_version,memory.total,memory.used")
    if not rows:
        why = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else "nvidia-smi lists no GPU"
        return {"gpu_found": False, "gpu": None, "gpu_note": f"no GPU found ({why})"}
    index, name, driver, total, _used = rows[0]
    return {
        "gpu_found": True,
        "gpu": f"{name} (driver {driver}, {total} MiB)",
        "gpu_count": len(rows),
        "gpu_note": f"GPU {index} of {len(rows)}",
    }


def device_memory_used_mb(index: int = 0) -> float | None:
    rows = nvidia_smi("--query-gpu=index,memory.used")
    for row in rows or []:
        if row[0] == str(index):
            return float(row[1])
    return None


def process_memory_mb(pid: int) -> float | None:
    """GPU memory of one process (nvidia-smi's compute apps); None without nvidia-smi or when it holds none."""
    rows = nvidia_smi("--query-compute-apps=pid,used_memory")
    used = [float(row[1]) for row in rows or [] if row and row[0] == str(pid)]
    return sum(used) if used else None


# ------------------------------------------------------------------------------------------------------ images
def synthetic_jpegs(n: int, size: int = 32, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def real_jpegs(n: int) -> list[bytes] | None:
    """The first `n` CIFAR-10 test JPEGs of the shared data (`$DEEPCLUST_DATA`), None when absent."""
    from benchmarks.serve_load import cifar10_test_tar, load_images

    return load_images(n) if cifar10_test_tar().is_file() else None


# ------------------------------------------------------------------------------------------------------ engine
def time_batches(engine: Engine, images: np.ndarray, batch: int, seconds: float) -> dict[str, float]:
    """img/s and per-call latency of `engine.run` on consecutive batches, after one warm-up call."""
    engine.run(images[:batch])
    latencies, done, i = [], 0, 0
    started = time.perf_counter()
    while True:
        start = (i * batch) % max(len(images) - batch + 1, 1)
        t = time.perf_counter()
        engine.run(images[start : start + batch])
        latencies.append(time.perf_counter() - t)
        done, i = done + batch, i + 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and i >= 3:
            break
    ms = np.asarray(latencies) * 1000
    return {
        "images_per_s": round(done / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "calls": i,
    }


def bench_engine(folder: Path, variants: list[str], batches: list[int], providers: list[str], images: np.ndarray,
                 seconds: float, require_gpu: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Engine rows for every variant x batch, with the agreement against FP32 on CPU (the export's reference)."""
    reference = open_engine(folder, "fp32", providers=("cpu",), warmup=False, max_batch=64)
    reference_clusters = reference.run(images).cluster
    del reference
    rows = []
    for variant in variants:
        engine = open_engine(folder, variant, providers=providers, require_gpu=require_gpu, max_batch=max(batches))
        agreement = float((engine.run(images).cluster == reference_clusters).mean())
        for batch in batches:
            timing = time_batches(engine, images, batch, seconds)
            rows.append(
                {
                    "kind": "engine",
                    "variant": variant,
                    "file": engine.model_path.name,
                    "batch": batch,
                    "runs_at_batch": engine.padded_size(min(batch, engine.max_batch)),
                    **timing,
                    "provider": engine.provider,
                    "on_gpu": engine.provider in GPU_PROVIDERS,
                    "fallback_reasons": engine.fallback_reasons or None,
                    "agreement_vs_fp32_cpu": round(agreement, 4),
                    "agreement_images": len(images),
                    "gpu_memory_mb": process_memory_mb(os.getpid()),
                }
            )
            print(json.dumps({k: rows[-1][k] for k in ("variant", "batch", "images_per_s", "provider")}), flush=True)
        del engine
    return rows


# ----------------------------------------------------------------------------------------------------- service
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_providers(metrics_url: str) -> list[str]:
    """The `provider` label of every `deepclust_model_info` series on the service's metrics endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - our own loopback URL
        text = response.read().decode()
    return sorted(set(re.findall(r'^deepclust_model_info\{[^}]*provider="([^"]*)"', text, re.MULTILINE)))


def bench_service(folder: Path, variant: str, providers: list[str], require_gpu: bool, jpegs: list[bytes],
                  levels: list[int], seconds: float, workers: int, backend: str) -> list[dict[str, Any]]:  # fmt: skip
    """Service rows through the HTTP front of `deepclust serve`, with the client loop of benchmarks/serve_load.py."""
    from benchmarks.serve_load import bench_http
    from serving.hosts.torchserve.server import ServeConfig

    config = ServeConfig(
        model=str(folder),
        variant=variant,
        port=_free_port(),
        metrics_port=_free_port(),
        torchserve_metrics_port=_free_port(),
        cache_dir=Path(tempfile.mkdtemp(prefix="gpu-bench-")),
        providers=providers,
        require_gpu=require_gpu,
        workers=workers,
        intra_op_threads=2,
        startup_timeout_s=300,
        **({"backend": backend} if "backend" in ServeConfig.model_fields else {}),
    )
    if backend == "engine":
        from serving.hosts.engine_backend.host import EngineHost as Host
    else:
        from serving.hosts.torchserve.server import TorchServeHost as Host
    before = device_memory_used_mb()
    with Host(config) as host:
        rows = bench_http("service", host, jpegs, levels, seconds)
        serving_on = served_providers(f"http://127.0.0.1:{config.metrics_port}/metrics")
        during = device_memory_used_mb()
    for row in rows:
        for key in ("commit", "machine"):  # serve_load's provenance says "no GPU" always: main() sets its own
            row.pop(key, None)
        row.update(
            kind="service",
            variant=variant,
            backend=backend,
            workers=workers,
            provider=",".join(serving_on),
            on_gpu=any(p in ("cuda", "tensorrt") for p in serving_on),
            gpu_memory_mb=None if before is None or during is None else during - before,
        )
    return rows


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "cifar10-lite0", help="store folder")
    parser.add_argument("--variants", nargs="+", default=None, help="default: every variant present in the folder")
    parser.add_argument("--providers", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="per engine batch size and per service level")
    parser.add_argument("--images", type=int, default=512, help="CIFAR-10 test JPEGs used (and for agreement)")
    parser.add_argument("--synthetic", action="store_true", help="random JPEGs instead of CIFAR-10 (smoke tests)")
    parser.add_argument("--no-service", action="store_true", help="engine rows only")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--service-variant", default=None, help="default: fp16 on a GPU when present, else fp32")
    parser.add_argument("--workers", type=int, default=2, help="serving workers (the GPU overlay runs 2 per GPU)")
    parser.add_argument("--backend", choices=["torchserve", "engine"], default="torchserve")
    parser.add_argument("--require-gpu", action="store_true", help="fail when no GPU provider runs")
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS_DIR / 'gpu.json'}")
    args = parser.parse_args(argv)

    gpu = gpu_info()
    print(json.dumps(gpu), flush=True)
    present = present_variants(args.model)
    variants = [v for v in (args.variants or VARIANTS) if v in present]
    missing = sorted(set(args.variants or []) - set(present))
    if missing:
        print(f"not in {args.model}: {', '.join(VARIANT_FILES[v] for v in missing)}", file=sys.stderr)
    jpegs = None if args.synthetic else real_jpegs(args.images)
    source = "cifar10 test JPEGs"
    if jpegs is None:
        jpegs, source = synthetic_jpegs(args.images), "synthetic random JPEGs"
    size = open_engine(args.model, "fp32", providers=("cpu",), warmup=False).input_size
    images = np.stack([load_image(b, size) for b in jpegs])

    rows = bench_engine(args.model, variants, args.batches, args.providers, images, args.seconds, args.require_gpu)
    if not args.no_service:
        on_gpu = any(r["on_gpu"] for r in rows)
        variant = args.service_variant or ("fp16" if on_gpu and "fp16" in present else "fp32")
        rows += bench_service(
            args.model, variant, args.providers, args.require_gpu, jpegs, args.concurrency, args.seconds,
            args.workers, args.backend,
        )  # fmt: skip
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    context = {
        "model": args.model.name,
        "images": source,
        **gpu,
        "providers_asked": args.providers,
        "commit": commit(),
        "machine": machine(gpu["gpu"]),
        "command": command,
    }
    rows = [{**row, **context} for row in rows]
    output = args.output or RESULTS_DIR / "gpu.json"
    write(output, rows)
    print_table(
        rows, ["kind", "variant", "batch", "concurrency", "images_per_s", "p99_ms", "provider", "gpu_memory_mb"]
    )
    if not gpu["gpu_found"]:
        print(f"{gpu['gpu_note']}: these rows measure the CPU provider only (smoke test).")
    print(f"results: {output}")
    return 0


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the rows with the same machine, kind, variant and size; keep the others (other machines' rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {tuple(r.get(k) for k in MERGE_KEY) for r in rows}
    kept = [r for r in old if tuple(r.get(k) for k in MERGE_KEY) not in keys]
    path.write_text(json.dumps(kept + rows, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
