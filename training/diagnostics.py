"""Signs that a finished run is not done: a loss still falling, clusters empty or collapsed into one.

A budget in epochs does not carry over between dataset sizes (8 epochs of 60,000 images are 1,875 steps, of 10,000
images 312), so `train` says so at the end instead of leaving the user with a quietly under-trained model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STILL_FALLING = 0.02  # relative drop of the loss over the last epochs that counts as "still learning"
LARGEST_SHARE = 0.5  # one cluster holding more than this share of the evaluation set is a collapse


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_warnings(run_dir: Path, metrics: dict[str, Any], k: int, window: int = 3) -> list[dict[str, str]]:
    """Warnings (each `{"kind", "message"}`) for the run in `run_dir` (its last stage) and its final metrics
    (`cluster_sizes`: evaluation images per cluster id, clusters that got none may be absent)."""
    warnings: list[dict[str, str]] = []
    stage = metrics.get("stage")
    log = read_log(run_dir / stage if stage else run_dir)
    losses = [float(r["loss"]) for r in log if "loss" in r]
    if len(losses) > window:
        before, last = losses[-window - 1], losses[-1]
        drop = (before - last) / max(abs(before), 1e-8)
        if drop > STILL_FALLING:
            warnings.append(
                {
                    "kind": "still_learning",
                    "message": (
                        f"the loss fell {drop:.1%} over the last {window} epochs ({before:.4g} -> {last:.4g}): "
                        "the run is probably under-trained; train longer (raise the epochs and re-run the same "
                        "command: it resumes)"
                    ),
                }
            )
    sizes = [int(s) for s in (metrics.get("cluster_sizes") or {}).values()]
    if sizes and sum(sizes):
        empty = k - sum(1 for s in sizes if s > 0)
        share = max(sizes) / sum(sizes)
        if share > LARGEST_SHARE:
            warnings.append(
                {
                    "kind": "collapsed",
                    "message": (
                        f"one cluster holds {share:.0%} of the evaluation images: the clustering collapsed; "
                        "lower the learning rate, raise the entropy weight or train longer"
                    ),
                }
            )
        elif empty:
            warnings.append(
                {
                    "kind": "empty_clusters",
                    "message": (
                        f"{empty} of {k} clusters received no evaluation image: K may be larger than the data "
                        "supports, or the run stopped early"
                    ),
                }
            )
    return warnings
