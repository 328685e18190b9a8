"""Logging for the `deepclust` commands: one JSON object per line on stderr.

Why here: how the CLI prints its logs is the CLI's business, not the trainer's; `train`, `evaluate` and `export`
call `configure_logging()` before they import any training code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    """A record as JSON: level and logger, plus the message's own fields when the message is a JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        payload: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name}
        try:
            payload.update(json.loads(message))
        except (ValueError, TypeError):
            payload["message"] = message
        return json.dumps(payload)


def configure_logging() -> None:
    """JSON lines on stderr at `$DEEPCLUST_LOG_LEVEL` (default INFO), replacing earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=os.environ.get("DEEPCLUST_LOG_LEVEL", "INFO"), handlers=[handler], force=True)
