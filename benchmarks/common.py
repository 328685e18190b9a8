"""Shared helpers for benchmark scripts: provenance of every row and the results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# tarfile's safe "data" filter where this Python has it (3.11.4+; Debian 12's 3.11.2 has not): the shared CIFAR-10
# tars are trusted data, extracted by the benchmarks and the tests alike.
TAR_FILTER: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def commit() -> str:
    """Short commit of the working tree (with `+dirty` when it has uncommitted changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def machine(gpu: str | None = None) -> str:
    """A short, comparable description of the machine a figure was measured on (`gpu`: its GPU, when one ran)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cpus, {gpu or 'no GPU'}"


def provenance() -> dict[str, str]:
    return {"commit": commit(), "machine": machine()}


def run_facts(script: str, argv: list[str] | None, started: float) -> dict[str, Any]:
    """What every row of a run records: commit and machine, the run's wall time (from `started`, a perf_counter) and
    the command that reproduces it."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        **provenance(),
        "seconds_total": round(time.perf_counter() - started, 1),
        "command": f"python benchmarks/{script} " + " ".join(args),
    }


def write_rows(name: str, rows: list[dict[str, Any]], *, merge_on: tuple[str, ...] | None = None) -> Path:
    """Write `results/<name>.json`; with `merge_on`, replace only rows whose key fields match (others are kept)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    if merge_on and path.exists():
        old = json.loads(path.read_text())
        new_keys = {tuple(r.get(k) for k in merge_on) for r in rows}
        rows = [r for r in old if tuple(r.get(k) for k in merge_on) not in new_keys] + rows
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns} if rows else {}
    print(" | ".join(c.ljust(widths.get(c, len(c))) for c in columns))
    print("-|-".join("-" * widths.get(c, len(c)) for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
