"""What exact INT8 arithmetic costs and gives on this CPU: each store model's INT8 file run by onnxruntime with our
session setting `EXACT_INT8` (`serving.core.engine`: exact uint8 x uint8 kernels on x86 CPUs without VNNI) and
without it (uint8 x int8 kernels whose int16 pair sums saturate there), beside the FP32 file, in one run.

    python benchmarks/int8_exact.py --models model_store/cifar10-lite0 model_store/cifar10-lite0-lite2

On a CPU with VNNI both INT8 rows run the same kernels (the setting changes nothing there); on AVX2 they differ.
Agreement: argmax vs the FP32 file on `--test-images` real test images (a fixed random draw of the split named in
the model's metadata, serving pre-processing). Speed: the three sessions interleaved at each batch size on
`--threads` threads (`benchmarks.engine.interleaved_throughput`), so only ratios within one run compare. Rows in
`benchmarks/results/int8_exact.json`, one per (machine, model, threads, batch, variant); `vnni` says whether this CPU
has it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, run_facts, write_rows  # noqa: E402
from benchmarks.engine import interleaved_throughput  # noqa: E402
from benchmarks.int8_runtimes import clusters, onnxruntime_runner  # noqa: E402


def has_vnni() -> bool:
    """The CPU flag that makes onnxruntime's uint8 x int8 kernels exact (AVX-512 VNNI or AVX-VNNI)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", default=[ROOT / "model_store" / "cifar10-lite0"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--test-images", type=int, default=2000, help="agreement, and the images timed")
    parser.add_argument("--seconds", type=float, default=6.0, help="per variant and batch, split into the rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from training.data.datasets import create_dataset
    from training.export import uint8_images
    from training.requantize import store_facts

    started = time.perf_counter()
    vnni = has_vnni()
    rows: list[dict[str, object]] = []
    for model in args.models:
        _, metrics, size = store_facts(model)
        test = create_dataset(metrics["dataset"], metrics["split"])
        rng = np.random.default_rng(0)
        images = uint8_images(test, size, np.sort(rng.choice(len(test), args.test_images, replace=False)))
        runners = {
            "fp32": onnxruntime_runner(model / "model.onnx", args.threads),
            "int8": onnxruntime_runner(model / "model.int8.onnx", args.threads),
            "int8-saturating": onnxruntime_runner(model / "model.int8.onnx", args.threads, exact_int8=False),
        }
        ids = {name: clusters(run, images) for name, run in runners.items()}
        for batch in args.batches:
            rates = interleaved_throughput(runners, images, batch, args.seconds, args.rounds)
            for variant, rate in rates.items():
                rows.append(
                    {
                        "model": model.name,
                        "variant": variant,
                        "threads": args.threads,
                        "batch": batch,
                        "images_per_s": round(rate, 1),
                        "vs_fp32": round(rate / rates["fp32"], 2),
                        "agreement_vs_fp32": round(float((ids[variant] == ids["fp32"]).mean()), 4),
                        "test_images": args.test_images,
                        "vnni": vnni,
                        "load_average_1m": round(os.getloadavg()[0], 2),
                    }
                )
    extra = run_facts("int8_exact.py", argv, started)
    rows = [{**row, **extra} for row in rows]
    print_table(rows, ["model", "variant", "batch", "images_per_s", "vs_fp32", "agreement_vs_fp32", "vnni"])
    write_rows("int8_exact", rows, merge_on=("machine", "model", "variant", "threads", "batch"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
