"""The `deepclust` command line.

Each sub-command lives in `deepclust/commands/<name>.py` and imports its implementation lazily, so that the
serving commands work in an image that has no torch.
Exit codes: 0 ok, 1 finished with item errors, 2 bad usage or bad input.
"""

from __future__ import annotations

import typer

from deepclust.commands import evaluate, export, label, monitor, predict, serve, train

app = typer.Typer(
    name="deepclust",
    help="Deep image clustering: train, evaluate, export, serve, predict, label, monitor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("train")(train.command)
app.command("evaluate")(evaluate.command)
app.command("export")(export.command)
app.command("serve")(serve.command)
app.command("predict")(predict.command)
app.command("label")(label.command)
app.command("monitor")(monitor.command)


if __name__ == "__main__":  # pragma: no cover
    app()
