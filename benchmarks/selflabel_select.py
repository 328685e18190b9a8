"""Choose SCAN's self-labelling threshold and learning rate without labels.

    python benchmarks/selflabel_select.py --config cifar10_lite0_scan.yaml
    python benchmarks/selflabel_select.py --config fashion_mnist_scan.yaml --thresholds 0.99 0.9 --lrs 1e-4

One SCAN run (pretext, mining, clustering: the config's own settings; or an existing run given by `--base-run`) is
shared by every candidate; each candidate only self-labels from it. Candidates are ranked by a label-free criterion,
TURTLE's generalization score (`training.losses.turtle.generalization_score`, chance-adjusted): how well
cross-validated linear classifiers on the model's clean training embeddings reproduce the candidate's labelling of a
fixed, seeded training subset. A labelling that cuts through dense regions of the space is hard to reproduce on
held-out samples; one that follows its gaps is easy; the chance adjustment keeps a collapsed labelling from winning.
ACC on the same training subset (`holdout_acc`) and on the test set are recorded beside each candidate as a check
only: the choice reads `score` alone. Rows go to `benchmarks/results/selflabel_selection.json`.
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
    """The scored subset of the training split: fixed by the seed, so every candidate is scored on the same images."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def train_predictions(run_dir: Path, config: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clusters, embeddings, labels) of the self-labelled model on the whole training split."""
    from training.trainer import CHECKPOINT_FINAL, Trainer, load_stage_weights

    trainer = Trainer(config)
    load_stage_weights(trainer.model, run_dir / "selflabel" / CHECKPOINT_FINAL)
    probabilities, embedding, labels = trainer.predict(trainer.train_set)
    return probabilities.argmax(axis=1), embedding, labels


def label_free_score(embedding: np.ndarray, clusters: np.ndarray, subset: np.ndarray, seed: int) -> float:
    """Chance-adjusted generalization score of a labelling on `subset` of the embeddings (no ground truth)."""
    import torch

    from training.losses.turtle import generalization_score

    x = torch.from_numpy(np.ascontiguousarray(embedding[subset], dtype=np.float32))
    x = torch.nn.functional.normalize(x, dim=1)
    y = torch.from_numpy(np.unique(clusters[subset], return_inverse=True)[1])  # dense ids: empty clusters dropped
    return round(generalization_score([x], y, folds=5, seed=seed, chance_adjusted=True), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a SCAN config in configs/")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.95, 0.9])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-5])
    parser.add_argument("--subset", type=int, default=5000, help="training images scored (labels only as a check)")
    parser.add_argument("--base-run", type=Path, help="an existing run of the config whose SCAN stages are reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "select")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from serving.core.quality import evaluate_clustering
    from training.config import load_config
    from training.run import train

    stem = Path(args.config).stem
    common = [f"run.out_dir={args.out_dir}", f"run.seed={args.seed}"]
    # The shared SCAN run: everything up to clustering, no self-labelling (or a finished run's stages, reused).
    base = load_config(CONFIGS / args.config, [*common, f"run.name={stem}-base", "method.selflabel_epochs=0"])
    base_dir = args.base_run if args.base_run is not None else base.run_dir
    started = time.perf_counter()
    if args.base_run is None:
        train(base)
    base_seconds = round(time.perf_counter() - started, 1)

    rows: list[dict[str, Any]] = []
    subset: np.ndarray | None = None
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
                source, target = base_dir / artifact, run_dir / artifact
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
                clusters, embedding, labels = train_predictions(run_dir, config)
                subset = holdout_indices(len(labels), args.subset, args.seed) if subset is None else subset
                row["score"] = label_free_score(embedding, clusters, subset, args.seed)
                report = evaluate_clustering(labels[subset], clusters[subset])  # a check, never read by the choice
                row.update(holdout_acc=round(report.acc, 4), holdout_n=int(len(subset)))
                row.update({f"test_{m}": round(float(summary[m]), 4) for m in ("acc", "nmi", "ari")})
            rows.append(row)
            print(json.dumps(row), flush=True)

    scored = [r for r in rows if "score" in r]
    if not scored:
        print("every candidate collapsed", file=sys.stderr)
        return 1
    best = max(scored, key=lambda r: r["score"])
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
    columns = ["selflabel_threshold", "selflabel_lr", "score", "holdout_acc", "test_acc", "test_ari", "chosen"]
    print_table(rows, columns)
    print(f"chosen without labels: threshold {best['selflabel_threshold']}, lr {best['selflabel_lr']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
