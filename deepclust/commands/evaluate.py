"""`deepclust evaluate`: ACC/NMI/ARI, cluster sizes and purity of a checkpoint on a labelled split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def command(
    checkpoint: Annotated[Path, typer.Argument(help="run directory or checkpoint file (.pt)")],
    split: Annotated[str, typer.Option(help="train | test")] = "test",
    dataset: Annotated[str | None, typer.Option(help="dataset name (default: the one it was trained on)")] = None,
    root: Annotated[str | None, typer.Option(help="folder for dataset=folder")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the full report as JSON")] = None,
) -> None:
    """Evaluate a checkpoint with the serving pre-processing."""
    from deepclust.extras import require

    require("evaluate")
    from deepclust.logs import configure_logging
    from training.run import evaluate as run_evaluate

    configure_logging()
    try:
        report = run_evaluate(checkpoint, split=split, dataset=dataset, root=root)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps({k: report.get(k) for k in ("dataset", "split", "n", "acc", "nmi", "ari")}))
