"""`deepclust train`: train a clustering model (CC, CCES, SCAN, TURTLE).

Two ways in:

- `deepclust train DIR` — a folder it has never seen (class sub-folders or flat) and no config: it measures the
  folder, picks a recipe, sizes the budget in steps or wall time, chooses K (`--k auto`: without labels), trains,
  and writes what it chose and why to `<run>/auto.json` (`training.auto`, `training.autorun`). `--recipe`, `--k`,
  `--budget`, `--method` and dotted `key=value` overrides replace any automatic choice.
- `deepclust train -c config.yaml key=value …` — the config path, unchanged (a DIR given with `-c` becomes
  `data.dataset=folder data.root=DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _split_folder(args: list[str]) -> tuple[Path | None, list[str]]:
    """(the folder, the dotted overrides): the first argument is a folder when it is not `key=value`."""
    if args and "=" not in args[0]:
        return Path(args[0]), args[1:]
    return None, args


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
    method: Annotated[
        str | None,
        typer.Option(
            help="method name: cc | cces | scan | turtle (overrides method.name; with DIR: keeps recipes of it)"
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="run name (run.name): the run directory is out_dir/name")] = None,
    out_dir: Annotated[str | None, typer.Option(help="parent of run directories (run.out_dir)")] = None,
    k: Annotated[
        str | None,
        typer.Option(
            "--k",
            help="with DIR: number of clusters, or 'auto' to estimate it without labels "
            "(default: the class sub-folders' count, else auto)",
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="with DIR: auto (default: steps per recipe planned for 15 min on the reference machine, the same "
            "run whatever the load), optimisation steps (2000), or a wall-time box (900s, 15m, 1h: load-dependent)"
        ),
    ] = None,
    recipe: Annotated[
        list[str] | None,
        typer.Option(help="with DIR: force the recipe (frozen-scan | scratch-cc); twice: choose between them"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="with DIR: the run's seed (run.seed); default 0")] = None,
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[DIR] [KEY=VALUE]",
            help="[DIR] then dotted overrides, e.g. optim.epochs=5 data.subset=2000; DIR alone trains on a folder "
            "with automatic choices",
        ),
    ] = None,
) -> None:
    """Train; re-running the same command resumes from the run directory's last checkpoint."""
    from deepclust.extras import require

    require("train")
    from deepclust.logs import configure_logging

    configure_logging()
    folder, overrides = _split_folder(list(args or []))
    if folder is not None and not folder.is_dir():
        typer.echo(
            f"deepclust train: {folder} is not a folder (give a folder of images, or key=value overrides)", err=True
        )
        raise typer.Exit(2)
    auto_only = {"--k": k, "--budget": budget, "--recipe": recipe, "--seed": seed}
    if folder is None or config is not None:
        given = [flag for flag, value in auto_only.items() if value]
        if given:
            typer.echo(f"deepclust train: {', '.join(given)} apply to `deepclust train DIR` (no -c)", err=True)
            raise typer.Exit(2)
    _log_runtime()
    if folder is not None and config is None:
        _train_auto(folder, overrides, method, name, out_dir, k, budget, recipe, seed)
        return
    extra = list(overrides)
    if folder is not None:
        extra = ["data.dataset=folder", f"data.root={folder}", *extra]
    if method:
        extra.append(f"method.name={method}")
    if name:
        extra.append(f"run.name={name}")
    if out_dir:
        extra.append(f"run.out_dir={out_dir}")
    from pydantic import ValidationError

    from training.config import load_config
    from training.run import train as run_train

    try:
        train_config = load_config(config, extra)
    except (ValidationError, ValueError) as error:
        typer.echo(f"bad configuration: {error}", err=True)
        raise typer.Exit(2) from error
    import os

    metrics = run_train(train_config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one result line (rank 0's)
        typer.echo(json.dumps({k: metrics.get(k) for k in ("acc", "nmi", "ari", "n", "run_dir")}))


def _log_runtime() -> None:
    import logging

    import torch

    from serving.core.runtime import malloc_probe

    runtime = {"event": "runtime", "torch_threads": torch.get_num_threads(), "malloc": malloc_probe()}
    logging.getLogger("deepclust.train").info(json.dumps(runtime))  # read back from torch and glibc


def _train_auto(
    folder: Path,
    overrides: list[str],
    method: str | None,
    name: str | None,
    out_dir: str | None,
    k: str | None,
    budget: str | None,
    recipe: list[str] | None,
    seed: int | None,
) -> None:
    """The folder path: automatic choices, printed as they are made, recorded in auto.json; warnings at the end."""
    from pydantic import ValidationError

    from training.auto import DEFAULT_BUDGET
    from training.autorun import AutoOptions, run_auto

    if k is not None and k != "auto" and not k.isdigit():
        typer.echo(f"deepclust train: --k must be a number >= 2 or 'auto', got {k!r}", err=True)
        raise typer.Exit(2)
    options = AutoOptions(
        folder=folder,
        k=k,
        budget=budget or DEFAULT_BUDGET,
        recipes=list(recipe) if recipe else None,
        method=method,
        name=name,
        out_dir=out_dir or "runs",
        seed=seed or 0,
        overrides=overrides,
        echo=typer.echo,
    )
    try:
        result = run_auto(options)
    except (ValidationError, ValueError) as error:
        typer.echo(f"deepclust train: {error}", err=True)
        raise typer.Exit(2) from error
    run_dir = result["run_dir"]
    for warning in result.get("warnings", []):
        typer.echo(f"WARNING ({warning['kind']}): {warning['message']}")
    typer.echo(f"choices and reasons: {run_dir}/auto.json; next: deepclust export {run_dir} -o model_store/NAME")
    typer.echo(json.dumps({key: result.get(key) for key in ("acc", "nmi", "ari", "n", "run_dir")}))
