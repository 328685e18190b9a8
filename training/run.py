"""Library entry points behind `deepclust train` and `deepclust evaluate` (the CLI adds only argument parsing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.diagnostics import training_warnings

log = logging.getLogger("deepclust.train")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (every stage of the method that is not done yet); joins a torchrun job when WORLD_SIZE > 1."""
    from training.distributed import init_distributed, shutdown_distributed
    from training.trainer import Trainer

    init_distributed(config.run.device)  # a no-op outside torchrun
    try:
        trainer = Trainer(config)
        result = {**trainer.fit(), "run_dir": str(trainer.root_dir)}
    except BaseException:
        shutdown_distributed(wait_for_peers=False)  # a peer may be gone: a barrier could hang
        raise
    shutdown_distributed()
    result["warnings"] = training_warnings(trainer.root_dir, result, config.model.k)
    if trainer.is_main:  # recorded in the run, beside its metrics
        (trainer.root_dir / "warnings.json").write_text(json.dumps(result["warnings"], indent=2) + "\n")
    for warning in result["warnings"]:
        log.warning(json.dumps({"event": "training_warning", **warning}))
    return result


def evaluate(
    checkpoint: Path, split: str = "test", dataset: str | None = None, root: str | None = None
) -> dict[str, Any]:
    """ACC/NMI/ARI, cluster sizes and purity of a checkpoint, end to end through its backbone (as served)."""
    from training.trainer import Trainer, load_checkpoint, load_stage_weights, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    _, config, _ = load_checkpoint(path)
    updates: dict[str, Any] = {"eval_split": split, "eval_subset": None}
    if dataset:
        updates["dataset"] = dataset
    if root:
        updates["root"] = root
    run = config.run.model_copy(update={"out_dir": str(path.parent.parent), "name": path.parent.name})
    model = config.model.model_copy(update={"cached_features": False})
    config = config.model_copy(update={"data": config.data.model_copy(update=updates), "run": run, "model": model})
    trainer = Trainer(config)
    load_stage_weights(trainer.model, path)
    return trainer.evaluate().metrics
