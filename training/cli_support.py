"""Glue between the CLI and the trainer: logging, config loading, evaluation of a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import TrainConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        payload: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name}
        try:
            payload.update(json.loads(message))
        except (ValueError, TypeError):
            payload["message"] = message
        return json.dumps(payload)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=os.environ.get("DEEPCLUST_LOG_LEVEL", "INFO"), handlers=[handler], force=True)


def run_train(config: TrainConfig) -> dict[str, Any]:
    from training.distributed import init_distributed, shutdown_distributed
    from training.trainer import Trainer

    init_distributed(config.run.device)  # joins the torchrun job when WORLD_SIZE > 1; else a no-op
    try:
        if config.method.name == "scan":  # staged: pretext -> mine -> scan -> selflabel, only the missing stages
            from training.scan_pipeline import run_scan_pipeline

            result = {**run_scan_pipeline(config), "run_dir": str(config.run_dir)}
        else:
            trainer = Trainer(config)
            result = {**trainer.fit(), "run_dir": str(trainer.run_dir)}
    except BaseException:
        shutdown_distributed(wait_for_peers=False)  # a peer may be gone: a barrier could hang
        raise
    shutdown_distributed()
    return result


def run_evaluate(
    checkpoint: Path, split: str = "test", dataset: str | None = None, root: str | None = None
) -> dict[str, Any]:
    from training.trainer import Trainer, load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    _, config, _ = load_checkpoint(path)
    updates: dict[str, Any] = {"eval_split": split, "eval_subset": None}
    if dataset:
        updates["dataset"] = dataset
    if root:
        updates["root"] = root
    config = config.model_copy(update={"data": config.data.model_copy(update=updates)})
    config.model.cached_features = False  # evaluate end to end through the backbone, as served
    trainer = Trainer(
        config.model_copy(
            update={"run": config.run.model_copy(update={"out_dir": str(path.parent.parent), "name": path.parent.name})}
        )
    )
    trainer.model, _, _ = load_checkpoint(path, map_location=str(trainer.device))
    return trainer.evaluate().metrics
