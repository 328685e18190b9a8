"""`deepclust train`: train a clustering model (CC, CCES, SCAN) from a YAML config plus overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def command(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            exists=True,
            dir_okay=False,
            help="YAML config (see configs/); defaults apply where omitted",
        ),
    ] = None,
    method: Annotated[str | None, typer.Option(help="method name: cc | cces | scan (overrides method.name)")] = None,
    name: Annotated[str | None, typer.Option(help="run name (run.name): the run directory is out_dir/name")] = None,
    out_dir: Annotated[str | None, typer.Option(help="parent of run directories (run.out_dir)")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, e.g. optim.epochs=5 data.subset=2000")
    ] = None,
) -> None:
    """Train; re-running the same command resumes from the run directory's last checkpoint."""
    from deepclust.extras import require

    require("train")
    from deepclust.logs import configure_logging
    from training.run import train as run_train

    configure_logging()
    extra = list(overrides or [])
    if method:
        extra.append(f"method.name={method}")
    if name:
        extra.append(f"run.name={name}")
    if out_dir:
        extra.append(f"run.out_dir={out_dir}")
    from pydantic import ValidationError

    from training.config import load_config

    try:
        train_config = load_config(config, extra)
    except (ValidationError, ValueError) as error:
        typer.echo(f"bad configuration: {error}", err=True)
        raise typer.Exit(2) from error
    import logging
    import os

    import torch

    from serving.core.runtime import malloc_probe

    runtime = {"event": "runtime", "torch_threads": torch.get_num_threads(), "malloc": malloc_probe()}
    logging.getLogger("deepclust.train").info(json.dumps(runtime))  # read back from torch and glibc
    metrics = run_train(train_config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one result line (rank 0's)
        typer.echo(json.dumps({k: metrics.get(k) for k in ("acc", "nmi", "ari", "n", "run_dir")}))
