"""What the frozen feature spaces we can ship hold: a supervised linear probe (the ceiling of any head on them) and
k-means, per space and for their concatenation, with the one-off extraction time of each space.

    python benchmarks/spaces.py --spaces effnet_lite0 effnet_lite1 effnet_lite2
    python benchmarks/spaces.py --dataset fashion_mnist --spaces effnet_lite0 effnet_lite2

Protocol: features at 160 px (serving pre-processing: grey images are repeated to RGB and upsampled, as served), fit
on the train split, scored on the test split (CIFAR-10 by default). With `data.train_split=test` (the transductive
protocol: clustering fits and scores the same images) the probe is 5-fold cross-validated on those images
(`linear-probe-cv5`: every image is scored by a probe that did not see it), so it stays a ceiling, not a fit.

    python benchmarks/spaces.py --dataset fashion_mnist data.train_split=test

The probe uses labels (it is the ceiling, not a clustering method); k-means does not. Rows go to
`benchmarks/results/quality.json` (`method` = linear-probe | linear-probe-cv5 | kmeans).
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

BASE_CONFIG = ROOT / "configs" / "cifar10_spaces_turtle.yaml"


def features(
    spaces: list[str], dataset: str = "cifar10", extra: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, Any]:
    """(train features, train labels, test features, test labels, seconds, config) of the clean pass of `spaces`
    (cached; the splits are the config's `train_split` and `eval_split`)."""
    from training.config import load_config
    from training.trainer import Trainer

    overrides = [f"model.backbone={json.dumps(spaces)}", f"data.dataset={dataset}", "run.out_dir=/tmp/deepclust-spaces"]
    config = load_config(BASE_CONFIG, [*overrides, *(extra or [])])
    trainer = Trainer(config)
    started = time.perf_counter()
    x_train = trainer.cached_passes(trainer.train_set, ["clean"])[0]
    x_test = trainer.cached_passes(trainer.eval_set, ["clean"])[0]
    seconds = time.perf_counter() - started
    return x_train, trainer.train_set.labels, x_test, trainer.eval_set.labels, seconds, config  # type: ignore[attr-defined]


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Multinomial logistic regression (L-BFGS, C = 1) on standardised features: test accuracy."""
    import torch

    from training.losses.turtle import logistic_regression

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    weight, bias = logistic_regression(
        torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train), int(y_train.max()) + 1, max_iter=500
    )
    logits = torch.from_numpy((x_test - mean) / std).float() @ weight.t() + bias
    return float((logits.argmax(1).numpy() == y_test).mean())


def cross_validated_probe(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Accuracy of `linear_probe` over `folds` folds of one split: each image scored by a probe fit without it."""
    order = np.random.default_rng(seed).permutation(len(x))
    correct = 0.0
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        correct += linear_probe(x[rest], y[rest], x[part], y[part]) * len(part)
    return correct / len(x)


def kmeans(x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.cluster import KMeans

    from serving.core.quality import evaluate_clustering

    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    model = KMeans(n_clusters=10, n_init=10, random_state=seed).fit(norm(x_train))
    report = evaluate_clustering(y_test, model.predict(norm(x_test)))
    return {"acc": round(report.acc, 4), "nmi": round(report.nmi, 4), "ari": round(report.ari, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="+", default=["effnet_lite0", "effnet_lite1", "effnet_lite2"])
    parser.add_argument("--dataset", default="cifar10", help="a registered dataset with train and test splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides (e.g. data.subset=1000)")
    args = parser.parse_args(argv)
    if overrides := [s for s in args.spaces if "=" in s]:  # `--spaces a b key=value` swallows the override
        parser.error(f"{overrides} read as spaces: put KEY=VALUE overrides before --spaces")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python benchmarks/spaces.py " + " ".join(sys.argv[1:] if argv is None else argv)
    combos = [[s] for s in args.spaces] + ([args.spaces] if len(args.spaces) > 1 else [])
    rows: list[dict[str, Any]] = []
    for combo in combos:
        x_train, y_train, x_test, y_test, seconds, config = features(combo, args.dataset, args.overrides)
        transductive = config.data.train_split == config.data.eval_split
        common = {
            "dataset": args.dataset,
            "train_split": config.data.train_split,
            "split": config.data.eval_split,
            "backbone": "+".join(combo) + "-frozen",
            "seed": args.seed,
            "config": BASE_CONFIG.name,
            "overrides": [f"model.backbone={combo}", f"data.dataset={args.dataset}", *args.overrides],
            **provenance(),
            "command": command,
        }
        started = time.perf_counter()
        if transductive:
            probe = cross_validated_probe(x_test, y_test, seed=args.seed)
        else:
            probe = linear_probe(x_train, y_train, x_test, y_test)
        rows.append(
            {
                **common,
                "method": "linear-probe-cv5" if transductive else "linear-probe",
                "acc": round(probe, 4),
                "seconds": round(time.perf_counter() - started, 1),
                "extra": {"supervised": True, "extract_seconds_this_run": round(seconds, 1), "dim": x_train.shape[1]},
            }
        )
        started = time.perf_counter()
        scores = kmeans(x_train, x_test, y_test, args.seed)
        rows.append({**common, "method": "kmeans", **scores, "seconds": round(time.perf_counter() - started, 1)})
        write_rows("quality", rows[-2:], merge_on=("dataset", "train_split", "method", "backbone", "seed"))
        for row in rows[-2:]:
            print(json.dumps(row), flush=True)
    print_table(rows, ["backbone", "method", "acc", "nmi", "ari", "seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
