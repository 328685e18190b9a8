"""Every sub-command of `deepclust` has a complete --help, and the entry point is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepclust.cli import app

COMMANDS = ["train", "evaluate", "export", "serve", "predict", "label", "monitor"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_complete(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "not implemented" not in result.output.lower()
    assert "--help" in result.output and len(result.output.splitlines()) > 4


def test_console_script_lists_every_command() -> None:
    exe = Path(sys.executable).parent / "deepclust"
    assert exe.exists(), "the deepclust console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--config", "/nonexistent.yaml"]).exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: -1}\n")
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "lr" in result.output
