"""The plain CLI vs `make`'s environment: `deepclust train` speed when started directly (issue: 3x slower before the
CLI tuned glibc malloc itself).

Three environments run the same command, alternating, in fresh run and feature-cache folders:
- `cli`: a user's shell: no MALLOC_* variables, no OMP_NUM_THREADS (the CLI now applies both itself);
- `make`: the variables the Makefile exports (glibc applies them at process start);
- `untuned`: `cli` with DEEPCLUST_TUNE_MALLOC=0, i.e. what the CLI did before (glibc's defaults).
Workloads: `extract` = CC heads on frozen EfficientNet-Lite0 (configs/cifar10_lite0_cc.yaml) with a cold feature
cache on a folder of 128 CIFAR-10 test JPEGs, so the frozen feature passes (160 px) dominate; `train` = a small CNN
trained from scratch on Fashion-MNIST.
img/s = training images of the subset / wall seconds of the whole command (startup included, the same in each
environment). Writes benchmarks/results/cli_speed.json.

    python benchmarks/cli_speed.py --repeat 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

DEEPCLUST = Path(sys.executable).parent / "deepclust"
MAKE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}  # the Makefile's exports
WORKLOADS = {
    "extract": (  # a folder of 128 CIFAR-10 test JPEGs (frozen passes run over the whole dataset, not a subset)
        "configs/cifar10_lite0_cc.yaml",
        ["data.dataset=folder", "data.root={folder}", "optim.epochs=1", "data.workers=1", "optim.batch_size=64"],
        128,
    ),
    "train": (
        "configs/fashion_mnist_cc.yaml",
        ["data.subset=2048", "data.eval_subset=512", "optim.epochs=1"],
        2048,
    ),
}


def environment(kind: str, cache: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("OMP_NUM_THREADS", "DEEPCLUST_TUNE_MALLOC")
    }
    env["DEEPCLUST_CACHE"] = str(cache)
    if kind == "make":
        env.update(MAKE_ENV)
    elif kind == "untuned":
        env["DEEPCLUST_TUNE_MALLOC"] = "0"
    return env


def image_folder(target: Path, n: int = 128) -> Path:
    """`n` CIFAR-10 test JPEGs (class sub-folders) from the shared data's tar."""
    import tarfile

    data = Path(os.environ.get("DEEPCLUST_DATA", ROOT.parent / "shared" / "data"))
    with tarfile.open(data / "cifar10" / "test.tar") as tar:
        members = [m for m in tar if m.isfile() and m.name.endswith(".jpg")]
        for member in members[:: max(1, len(members) // n)][:n]:
            out = target / Path(member.name).parent.name / Path(member.name).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return target


def run_once(workload: str, kind: str) -> float:
    config, overrides, _ = WORKLOADS[workload]
    scratch = Path(tempfile.mkdtemp(prefix=f"cli-speed-{workload}-{kind}-"))
    try:
        overrides = [o.replace("{folder}", str(image_folder(scratch / "images"))) for o in overrides]
        command = [str(DEEPCLUST), "train", "-c", config, "--out-dir", str(scratch / "runs"), *overrides]
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=ROOT, env=environment(kind, scratch / "cache"), capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{workload}/{kind} failed:\n{done.stderr[-3000:]}")
        return seconds
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    parser.add_argument("--kinds", nargs="*", default=["cli", "make", "untuned"])
    args = parser.parse_args()
    rows = []
    for workload in args.only:
        seconds: dict[str, list[float]] = {kind: [] for kind in args.kinds}
        for _ in range(args.repeat):
            for kind in args.kinds:  # alternate, so load changes hit every environment alike
                seconds[kind].append(run_once(workload, kind))
                print(f"{workload} {kind}: {seconds[kind][-1]:.1f} s", flush=True)
        images = WORKLOADS[workload][2]
        medians = {kind: statistics.median(values) for kind, values in seconds.items()}
        for kind, median in medians.items():
            rows.append(
                {
                    "workload": workload,
                    "environment": kind,
                    "seconds": round(median, 2),
                    "runs": [round(s, 2) for s in seconds[kind]],
                    "img_per_s": round(images / median, 2),
                    "vs_make": round(medians["make"] / median, 3) if "make" in medians else None,
                    **provenance(),
                    "command": "python benchmarks/cli_speed.py " + " ".join(sys.argv[1:]),
                }
            )
    write_rows("cli_speed", rows, merge_on=("workload", "environment"))
    print_table(rows, ["workload", "environment", "seconds", "img_per_s", "vs_make", "runs"])


if __name__ == "__main__":
    main()
