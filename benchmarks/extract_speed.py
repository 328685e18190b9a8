"""Frozen feature passes on torch eager vs onnxruntime: img/s of each engine, paired, and their difference.

`training.features.embed` runs a frozen backbone on onnxruntime when the pass runs on a CPU. This script measures
why: the same pass (CIFAR-10 training JPEGs, the serving resize to 160 px, batch 128, the loader's 2 decode
workers) on each engine, alternating engines round by round in one process so both see the same machine load.
Reported: median img/s per engine, their ratio, and the largest difference of the features relative to their scale.
Threads: torch's (set `OMP_NUM_THREADS` to compare at another count); the allocator setting is the Makefile's.

    python benchmarks/extract_speed.py --backbones effnet_lite0 effnet_lite2 --images 2048 --rounds 3

`--pads-at-run-time` adds a third engine in the same rounds: onnxruntime on the backbone's graph as exported before
the TF-"SAME" pad amounts were folded to constants (`training.onnx_graph.fold_pad_amounts` skipped), so the gain of
the folding is measured paired. Writes benchmarks/results/extract_speed.json (rows keyed by backbone and threads).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, provenance, write_rows  # noqa: E402


@contextlib.contextmanager
def pads_at_run_time(active: bool) -> Iterator[None]:
    """While active, the feature pass's exported graph keeps its run-time pad arithmetic (the graph before folding)."""
    import training.onnx_graph as graphs

    original = graphs.fold_pad_amounts
    if active:
        graphs.fold_pad_amounts = lambda proto, sample: 0
    try:
        yield
    finally:
        graphs.fold_pad_amounts = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["effnet_lite0", "effnet_lite2"])
    parser.add_argument("--images", type=int, default=2048, help="CIFAR-10 training images per pass")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pads-at-run-time", action="store_true", help="also onnxruntime without the pad folding")
    args = parser.parse_args(argv)

    import torch

    from training.data.datasets import create_dataset
    from training.data.views import eval_transform
    from training.features import embed
    from training.models.backbones import create_backbone

    data = torch.utils.data.Subset(create_dataset("cifar10", "train"), range(args.images))
    rows = []
    for name in args.backbones:
        backbone = create_backbone(name, pretrained=True)
        seconds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        if args.pads_at_run_time:
            seconds["onnxruntime_pads_at_run_time"] = []
        features: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for variant in seconds:
                engine = "torch" if variant == "torch" else "onnxruntime"
                start = time.perf_counter()
                with pads_at_run_time(variant == "onnxruntime_pads_at_run_time"):
                    features[variant] = embed(
                        backbone,
                        data,
                        eval_transform(args.size),
                        batch_size=128,
                        workers=2,
                        engine=engine,
                        desc=variant,
                    )
                seconds[variant].append(time.perf_counter() - start)
        rate = {engine: args.images / statistics.median(s) for engine, s in seconds.items()}
        scale = float(np.abs(features["torch"]).max())
        rows.append(
            {
                "backbone": name,
                "threads": torch.get_num_threads(),
                "size": args.size,
                "images": args.images,
                "rounds": args.rounds,
                "torch_img_s": round(rate["torch"], 1),
                "onnxruntime_img_s": round(rate["onnxruntime"], 1),
                "ratio": round(rate["onnxruntime"] / rate["torch"], 3),
                **(
                    {
                        "onnxruntime_pads_at_run_time_img_s": round(rate["onnxruntime_pads_at_run_time"], 1),
                        "folding_gain": round(rate["onnxruntime"] / rate["onnxruntime_pads_at_run_time"], 3),
                    }
                    if args.pads_at_run_time
                    else {}
                ),
                "max_relative_difference": float(np.abs(features["onnxruntime"] - features["torch"]).max())
                / max(1.0, scale),
                "seconds": {engine: [round(s, 2) for s in values] for engine, values in seconds.items()},
                "load_average_1m": round(os.getloadavg()[0], 2),
                "command": "python benchmarks/extract_speed.py " + " ".join(argv or sys.argv[1:]),
                **provenance(),
            }
        )
    columns = ["backbone", "threads", "torch_img_s", "onnxruntime_img_s", "ratio", "max_relative_difference"]
    if args.pads_at_run_time:
        columns += ["onnxruntime_pads_at_run_time_img_s", "folding_gain"]
    print_table(rows, columns)
    print(write_rows("extract_speed", rows, merge_on=("backbone", "threads")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
