"""Labeller throughput end to end (walk + read + hash + decode + resize + infer + write) vs the bare engine on
pre-decoded arrays, in the same run with the same model, on the CIFAR-10 test folder (10,000 JPEGs).

    .venv/bin/python benchmarks/label.py [--model model_store/cifar10-lite0] [--workers 1] [--threads 0]

Target: labeller >= 0.9x bare engine. Writes `benchmarks/results/label.json`:
`{labeller_images_per_s, engine_images_per_s, ratio, peak_rss_mb, images, errors, ..., commit, machine}` (medians
of `--repeat` alternating runs; every run is kept in `labeller_runs`/`engine_runs`). `peak_rss_mb` is the labeller's
main process (engine + batches + state), measured before the bare-engine part allocates its pre-decoded arrays.
(A decode worker's RSS is not reported: `RUSAGE_CHILDREN` counts the parent's pages inherited between fork and exec.)
The bare engine runs `--engine-images` pre-decoded images (default 2,000, i.e. 150 MB at 160 px) repeated to the
same count as the labeller: its speed does not depend on the pixels, and 10,000 decoded images would be 770 MB.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import TAR_FILTER, print_table, provenance, write_rows  # noqa: E402


def cifar_test_dir() -> Path:
    """The CIFAR-10 test JPEGs, extracted once into the cache (same place and marker as the test fixture)."""
    cache = Path(os.environ.get("DEEPCLUST_CACHE") or Path.home() / ".cache" / "deepclust") / "data" / "cifar10"
    if (cache / ".test.complete").exists() and (cache / "test").is_dir():
        return cache / "test"
    data = Path(os.environ.get("DEEPCLUST_DATA") or ROOT.parent / "shared" / "data")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".test-", dir=cache))
    try:
        with tarfile.open(data / "cifar10" / "test.tar") as tar:
            tar.extractall(staging, **TAR_FILTER)
        if not (cache / "test").exists():
            (staging / "test").rename(cache / "test")
        (cache / ".test.complete").touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache / "test"


KEY = ("model", "precision", "workers", "worker_nice", "threads", "batch_size")


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def bench_engine(engine, folder: Path, n_decoded: int, n_total: int, batch: int) -> float:
    from serving.core.batch import walk_images
    from serving.core.preprocess import load_image

    paths = list(walk_images(folder))
    step = max(1, len(paths) // n_decoded)
    if not hasattr(bench_engine, "arrays"):  # decoded once, reused by every repeat
        bench_engine.arrays = np.stack(
            [load_image((folder / p).read_bytes(), engine.input_size) for p in paths[::step][:n_decoded]]
        )
    arrays = bench_engine.arrays
    engine.run(arrays[:batch])  # warm
    done, started = 0, time.perf_counter()
    while done < n_total:
        for start in range(0, len(arrays), batch):
            chunk = arrays[start : start + batch][: n_total - done]
            if len(chunk) == 0:
                break
            engine.run(chunk)
            done += len(chunk)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "cifar10-lite0")
    parser.add_argument("--folder", type=Path, default=None, help="default: the extracted CIFAR-10 test folder")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--worker-nice", type=int, default=None, help="decode workers' niceness (default: the labeller's)"
    )
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variant", default="fp32", help="fp32 | int8 | fp16, as in `deepclust label --variant`")
    parser.add_argument("--engine-images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating labeller/engine runs (medians)")
    args = parser.parse_args()

    from serving.core.batch import Shard
    from serving.core.engine import Engine
    from serving.core.model_store import resolve_model
    from serving.hosts.labeller.labeller import LabelConfig, Labeller

    folder = args.folder or cifar_test_dir()
    model_file = resolve_model(args.model, args.variant).file
    engine = None
    labeller_runs: list[float] = []
    engine_runs: list[float] = []
    walls: list[float] = []
    labeller_rss = 0.0
    # Alternate labeller and bare-engine runs and take medians: on a shared machine the load changes by the minute,
    # and measuring one after the other would compare two different machines.
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
            config = LabelConfig(
                root=folder,
                model=args.model,
                output=Path(tmp) / "labels.jsonl",
                workers=args.workers,
                batch_size=args.batch_size,
                threads=args.threads,
                variant=args.variant,
                shard=Shard(),
                progress="none",
                **({} if args.worker_nice is None else {"worker_nice": args.worker_nice}),
            )
            started = time.perf_counter()
            summary = Labeller(config).run()
            walls.append(time.perf_counter() - started)
        labeller_runs.append(summary.images_per_s)
        if engine is None:  # measured before the pre-decoded arrays below exist
            labeller_rss = peak_rss_mb(resource.RUSAGE_SELF)
            engine = Engine(model_file, intra_op_threads=args.threads, max_batch=args.batch_size)
        images = summary.labelled + summary.new_errors
        engine_runs.append(bench_engine(engine, folder, args.engine_images, images, args.batch_size))
    labeller_ips, engine_ips = float(np.median(labeller_runs)), float(np.median(engine_runs))
    assert engine is not None

    row = {
        "model": str(args.model.name),
        "precision": args.variant,  # the results files keep their column name
        "input_size": engine.input_size,
        "workers": args.workers,
        "worker_nice": args.worker_nice,
        "threads": args.threads or os.cpu_count(),
        "batch_size": args.batch_size,
        "labeller_images_per_s": round(labeller_ips, 1),
        "engine_images_per_s": round(engine_ips, 1),
        "ratio": round(labeller_ips / engine_ips, 3),
        "labeller_runs": [round(x, 1) for x in labeller_runs],
        "engine_runs": [round(x, 1) for x in engine_runs],
        "labeller_wall_s": round(float(np.median(walls)), 2),
        "peak_rss_mb": round(labeller_rss, 1),
        "images": images,
        "errors": summary.errors,
        **provenance(),
    }
    path = write_rows("label", [row], merge_on=KEY)
    print_table(
        [row],
        [
            "model",
            "workers",
            "threads",
            "batch_size",
            "labeller_images_per_s",
            "engine_images_per_s",
            "ratio",
            "peak_rss_mb",
            "images",
            "errors",
        ],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
