"""Choose SCAN's self-labelling threshold and learning rate on held-out *training* labels, never on the test set.

    python benchmarks/selflabel_select.py --config cifar10_lite0_scan.yaml
    python benchmarks/selflabel_select.py --config fashion_mnist_scan.yaml --thresholds 0.99 0.9 --lrs 1e-4

One SCAN run (pretext, mining, clustering: the config's own settings) is shared by every candidate; each candidate
only self-labels from it. Candidates are ranked by ACC on a fixed, seeded subset of the training split whose labels
play the part of a small labelled validation set (the rest of training stays label-free; labels never enter a loss).
Test metrics are recorded beside each candidate for transparency only: the choice reads `holdout_acc` alone.
Rows go to `benchmarks/results/selflabel_selection.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

CONFIGS = ROOT / "configs"


def holdout_indices(n: int, size: int, seed: int) -> np.ndarray:
    """The labelled validation subset of the training split: fixed by the seed, so every candidate sees the same."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def train_predictions(run_dir: Path, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """(clusters, labels) of the self-labelled model on the whole training split."""
    from training.trainer import CHECKPOINT_FINAL, Trainer, load_stage_weights

    trainer = Trainer(config)
    load_stage_weights(trainer.model, run_dir / "selflabel" / CHECKPOINT_FINAL)
    probabilities, _, labels = trainer.predict(trainer.train_set)
    return probabilities.argmax(axis=1), labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a SCAN config in configs/")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.95, 0.9])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-5])
    parser.add_argument("--holdout", type=int, default=5000, help="labelled training images used for the choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "select")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from serving.core.quality import evaluate_clustering
    from training.config import load_config
    from training.run import train

    stem = Path(args.config).stem
    common = [f"run.out_dir={args.out_dir}", f"run.seed={args.seed}"]
    # The shared SCAN run: everything up to clustering, no self-labelling.
    base = load_config(CONFIGS / args.config, [*common, f"run.name={stem}-base", "method.selflabel_epochs=0"])
    started = time.perf_counter()
    train(base)
    base_seconds = round(time.perf_counter() - started, 1)

    rows: list[dict[str, Any]] = []
    holdout: np.ndarray | None = None
    for threshold in args.thresholds:
        for lr in args.lrs:
            name = f"{stem}-t{threshold:g}-lr{lr:g}"
            config = load_config(
                CONFIGS / args.config,
                [*common, f"run.name={name}", f"method.selflabel_threshold={threshold}", f"method.selflabel_lr={lr}"],
            )
            run_dir = config.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            for artifact in ("neighbours.npz", "pretext", "scan"):  # reuse the shared stages: only self-labelling runs
                source, target = base.run_dir / artifact, run_dir / artifact
                if source.exists() and not target.exists():
                    (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
            started = time.perf_counter()
            summary = train(config)
            seconds = round(time.perf_counter() - started, 1)
            row: dict[str, Any] = {
                "dataset": config.data.dataset,
                "config": args.config,
                "selflabel_threshold": threshold,
                "selflabel_lr": lr,
                "collapse": summary["stopped"] is not None,
                "seconds": seconds,
            }
            if summary["stage"] == "selflabel":
                clusters, labels = train_predictions(run_dir, config)
                holdout = holdout_indices(len(labels), args.holdout, args.seed) if holdout is None else holdout
                report = evaluate_clustering(labels[holdout], clusters[holdout])
                row.update(holdout_acc=round(report.acc, 4), holdout_n=int(len(holdout)))
                row.update({f"test_{m}": round(float(summary[m]), 4) for m in ("acc", "nmi", "ari")})
            rows.append(row)
            print(json.dumps(row), flush=True)

    scored = [r for r in rows if "holdout_acc" in r]
    if not scored:
        print("every candidate collapsed", file=sys.stderr)
        return 1
    best = max(scored, key=lambda r: r["holdout_acc"])
    scan_only = summary["stages"].get("scan") or {}
    for row in rows:
        row.update(
            chosen=row is best,
            scan_test_acc=scan_only.get("acc"),
            base_seconds=base_seconds,
            **provenance(),
            command="python benchmarks/selflabel_select.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )
    write_rows("selflabel_selection", rows, merge_on=("config", "selflabel_threshold", "selflabel_lr"))
    columns = ["selflabel_threshold", "selflabel_lr", "holdout_acc", "test_acc", "test_nmi", "test_ari", "chosen"]
    print_table(rows, columns)
    print(f"chosen on held-out training labels: threshold {best['selflabel_threshold']}, lr {best['selflabel_lr']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
