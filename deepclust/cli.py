"""The `deepclust` command line.

Each sub-command lives in `deepclust/commands/<name>.py` and imports its implementation lazily, so that the
serving commands work in an image that has no torch. Every sub-command, however it is started (the console
script, `python -m deepclust.cli`, torchrun), first applies the process settings of `serving.core.runtime`
(glibc malloc tuned, threads = the cores available) and fails on a missing optional install with one line naming
the extra and its install command, never a traceback.
Exit codes: 0 ok, 1 finished with item errors, 2 bad usage or bad input (a missing extra included).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from deepclust.commands import evaluate, export, label, monitor, predict, serve, train
from deepclust.extras import COMMANDS, MissingExtra, message, missing_optional

TORCH_COMMANDS = ("train", "evaluate", "export")


class DeepclustApp(typer.Typer):
    """The typer app, plus one line (exit 2) instead of a traceback when an optional module is missing."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except MissingExtra as exc:
            typer.echo(str(exc), err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:
            module = missing_optional(exc)
            if module is None:
                raise
            typer.echo(message(_command_in(sys.argv[1:]), module), err=True)
            sys.exit(2)


def _command_in(argv: list[str]) -> str:
    return next((arg for arg in argv if arg in COMMANDS), "")


app = DeepclustApp(
    name="deepclust",
    help="Deep image clustering: train, evaluate, export, serve, predict, label, monitor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _start(ctx: typer.Context) -> None:
    # Before any sub-command imports torch or onnxruntime: the allocator must be set before they allocate.
    apply_runtime(ctx.invoked_subcommand or "")


def apply_runtime(command: str) -> dict[str, Any]:
    """Tune glibc malloc in this process (and its children) and size torch's thread pool to the cores available;
    with DEEPCLUST_LOG_LEVEL=DEBUG print what is in force, read back from glibc, as one JSON line on stderr."""
    from serving.core import runtime

    tuned = runtime.tune_allocator()
    cpus = runtime.available_cpus()
    if command in TORCH_COMMANDS:  # torch reads it at import; an explicit value (torchrun, the user) wins
        os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
    state = {
        "event": "runtime",
        "command": command,
        "allocator_tuned": tuned,
        "cpus": cpus,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if os.environ.get("DEEPCLUST_LOG_LEVEL", "").upper() == "DEBUG":
        print(json.dumps({**state, "malloc": runtime.malloc_probe()}), file=sys.stderr, flush=True)
    return state


app.command("train")(train.command)
app.command("evaluate")(evaluate.command)
app.command("export")(export.command)
app.command("serve")(serve.command)
app.command("predict")(predict.command)
app.command("label")(label.command)
app.command("monitor")(monitor.command)


if __name__ == "__main__":  # pragma: no cover
    app()
