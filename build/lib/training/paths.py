"""Where shared data and caches live (overridable by environment for CI and containers)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("DEEPCLUST_DATA", REPO_ROOT.parent / "shared" / "data"))


def cache_root() -> Path:
    root = Path(os.environ.get("DEEPCLUST_CACHE", Path.home() / ".cache" / "deepclust"))
    root.mkdir(parents=True, exist_ok=True)
    return root
