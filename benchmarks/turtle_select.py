"""Choose TURTLE's entropy weight gamma without labels, by TURTLE's own generalization score.

    python benchmarks/turtle_select.py --config cifar10_spaces_turtle.yaml --gammas 1 3 10 30

For each candidate gamma, TURTLE is trained (the config's other settings); its labelling of a fixed random subset of
the *training* features is scored by the generalization score (`training.losses.turtle.generalization_score`: how
well per-space linear classifiers, cross-validated, reproduce the labelling — no ground truth). The highest score is
chosen. Test ACC is recorded beside each candidate as a check only; the choice reads `score` alone.
Rows go to `benchmarks/results/turtle_selection.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

CONFIGS = ROOT / "configs"


def score_labelling(trainer: Any, subset: int, seed: int, folds: int) -> float:
    """Generalization score of the trained encoder's labelling of `subset` training samples (label-free)."""
    import torch

    from training.losses.turtle import generalization_score

    features = trainer.cached_passes(trainer.train_set, ["clean"])[0]
    chosen = np.sort(np.random.default_rng(seed).choice(len(features), size=min(subset, len(features)), replace=False))
    head = trainer.model.cluster_head
    with torch.no_grad():
        x = torch.from_numpy(features[chosen])
        spaces = head.spaces(x)
        labels = head.encoder(spaces)[0].argmax(1)
    return generalization_score(spaces, labels, folds=folds, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10_spaces_turtle.yaml")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    parser.add_argument("--subset", type=int, default=5000, help="training samples scored (no labels)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "turtle-select")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from training.config import load_config
    from training.trainer import Trainer

    rows: list[dict[str, Any]] = []
    for gamma in args.gammas:
        overrides = [
            f"run.out_dir={args.out_dir}",
            f"run.name={Path(args.config).stem}-g{gamma:g}-seed{args.seed}",
            f"run.seed={args.seed}",
            f"method.gamma={gamma}",
            *args.overrides,
        ]
        trainer = Trainer(load_config(CONFIGS / args.config, overrides))
        started = time.perf_counter()
        metrics = trainer.fit()
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        score = score_labelling(trainer, args.subset, args.seed, args.folds)
        row = {
            "config": args.config,
            "overrides": " ".join(args.overrides),
            "gamma": gamma,
            "score": round(score, 4),
            "test_acc": round(float(metrics["acc"]), 4),
            "test_nmi": round(float(metrics["nmi"]), 4),
            "seed": args.seed,
            "train_seconds": round(train_seconds, 1),
            "score_seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: r["score"])
    command = "python benchmarks/turtle_select.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for row in rows:
        row.update(chosen=row is best, **provenance(), command=command)
    write_rows("turtle_selection", rows, merge_on=("config", "overrides", "gamma", "seed"))
    print_table(rows, ["gamma", "score", "test_acc", "test_nmi", "chosen"])
    print(f"chosen without labels: gamma {best['gamma']:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
