"""Clustering quality on fixed seeds: every method through the same trainer, plus a k-means baseline.

    python benchmarks/quality.py --suite cifar10_lite0 --only cc kmeans
    python benchmarks/quality.py --suite fashion_mnist --only cc kmeans

Rows go to `benchmarks/results/quality.json` (a row is replaced when dataset, method and backbone match):
`{dataset, split, method, backbone, acc, nmi, ari, seconds, commit, machine, config, overrides, extra}`.
A method is an entry of `SUITES` (config file + overrides); add ablations there, never a second script.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

CONFIGS = ROOT / "configs"


@dataclass(frozen=True)
class Experiment:
    method: str  # the row's `method` (e.g. "cc", "cces-nn_single-ccrop_off", "scan-selflabel")
    config: str  # file in configs/
    overrides: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


SUITES: dict[str, dict[str, Experiment]] = {
    "fashion_mnist": {
        "cc": Experiment("cc", "fashion_mnist_cc.yaml"),
    },
    "cifar10_lite0": {
        "cc": Experiment("cc", "cifar10_lite0_cc.yaml"),
    },
}


def run_experiment(experiment: Experiment, out_dir: Path, seed: int) -> dict[str, Any]:
    from training.config import load_config
    from training.trainer import Trainer

    name = experiment.method.replace("/", "_")
    overrides = [f"run.out_dir={out_dir}", f"run.name={name}-seed{seed}", f"run.seed={seed}", *experiment.overrides]
    config = load_config(CONFIGS / experiment.config, overrides)
    started = time.perf_counter()
    trainer = Trainer(config)
    metrics = trainer.fit()
    seconds = time.perf_counter() - started
    return {
        "dataset": config.data.dataset,
        "split": config.data.eval_split,
        "method": experiment.method,
        "backbone": config.model.backbone + ("-frozen" if config.model.freeze_backbone else ""),
        "acc": round(float(metrics["acc"]), 4),
        "nmi": round(float(metrics["nmi"]), 4),
        "ari": round(float(metrics["ari"]), 4),
        "seconds": round(seconds, 1),
        "config": experiment.config,
        "overrides": list(experiment.overrides),
        "seed": seed,
        "run_dir": str(trainer.run_dir),
        "extra": {**experiment.extra, **{k: metrics[k] for k in metrics if k.startswith("extra_")}},
    }


def kmeans_row(suite: str, seed: int) -> dict[str, Any]:
    """k-means (10 clusters) on the same inputs the methods see: raw pixels, or the frozen features."""
    from sklearn.cluster import KMeans

    from serving.quality import evaluate_clustering
    from training.config import load_config
    from training.data.datasets import create_dataset
    from training.trainer import Trainer

    started = time.perf_counter()
    if suite == "fashion_mnist":
        train, test = create_dataset("fashion_mnist", "train"), create_dataset("fashion_mnist", "test")
        x_train = train.images.reshape(len(train), -1).astype(np.float32) / 255.0
        x_test = test.images.reshape(len(test), -1).astype(np.float32) / 255.0
        y_test, backbone, dataset = test.labels, "raw-pixels", "fashion_mnist"
    else:
        config = load_config(CONFIGS / SUITES[suite]["cc"].config, ["run.out_dir=/tmp/deepclust-kmeans"])
        trainer = Trainer(config)
        x_train = trainer.cached_passes(trainer.train_set, "train", ["clean"])[0]
        x_test = trainer.cached_passes(trainer.eval_set, "test", ["clean"])[0]
        x_train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
        x_test = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
        y_test, backbone, dataset = trainer.eval_set.labels, config.model.backbone + "-frozen", "cifar10"
    model = KMeans(n_clusters=10, n_init=10, random_state=seed).fit(x_train)
    report = evaluate_clustering(y_test, model.predict(x_test))
    return {
        "dataset": dataset,
        "split": "test",
        "method": "kmeans",
        "backbone": backbone,
        "acc": round(report.acc, 4),
        "nmi": round(report.nmi, 4),
        "ari": round(report.ari, 4),
        "seconds": round(time.perf_counter() - started, 1),
        "config": None,
        "overrides": [],
        "seed": seed,
        "extra": {"fit_on": "train", "n_init": 10},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--only", nargs="*", help="methods of the suite to run (default: all, plus kmeans)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    wanted = args.only or [*SUITES[args.suite], "kmeans"]
    unknown = [w for w in wanted if w != "kmeans" and w not in SUITES[args.suite]]
    if unknown:
        parser.error(f"unknown methods for {args.suite}: {unknown}; known: {sorted(SUITES[args.suite])}")
    rows = []
    for key in wanted:
        row = kmeans_row(args.suite, args.seed) if key == "kmeans" else None
        if row is None:
            row = run_experiment(SUITES[args.suite][key], args.out_dir, args.seed)
        row.update(provenance())
        row["command"] = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
        rows.append(row)
        write_rows("quality", [row], merge_on=("dataset", "method", "backbone"))
        print(json.dumps(row), flush=True)
    print_table(rows, ["dataset", "method", "backbone", "acc", "nmi", "ari", "seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
