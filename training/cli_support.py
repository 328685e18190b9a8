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
    from training.run import train

    return train(config)


def run_evaluate(
    checkpoint: Path, split: str = "test", dataset: str | None = None, root: str | None = None
) -> dict[str, Any]:
    from training.run import evaluate

    return evaluate(checkpoint, split=split, dataset=dataset, root=root)
