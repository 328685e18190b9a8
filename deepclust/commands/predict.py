"""`deepclust predict IMAGE... [--url]`: ask a running service for the cluster of each image.

Prints one JSON line per image (`{"file", "cluster", "confidence", "label"}` or `{"file", "error"}`).
Exit codes: 0 all images answered, 1 some images had errors, 2 bad usage or the service could not be reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer


def command(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    url: str = typer.Option("http://127.0.0.1:8080", "--url", help="Inference API base URL."),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Model name in the URL (default: the one `deepclust serve` serves from the local store when not told).",
    ),
    token: str = typer.Option(
        None, "--token", envvar="DEEPCLUST_TOKEN", help="Inference bearer token (when token auth is on)."
    ),
    key_file: Path = typer.Option(None, "--key-file", help="TorchServe key_file.json to read the token from."),
    batch: int = typer.Option(32, "--batch", min=1, help="Images per request."),
) -> None:
    """Print the cluster of each image, one JSON line per image, in order."""
    from deepclust.extras import require

    require("predict")
    from serving.client import Client, ServiceError
    from serving.core.model_store import default_model_name
    from serving.core.results import ItemError

    model = model or default_model_name()  # the same rule as `deepclust serve` without --model

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        typer.echo(f"deepclust predict: not a file: {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    if token is None and key_file is not None:
        token = json.loads(key_file.read_text())["inference"]["key"]
    errors = 0
    try:
        with Client(url, model, token=token or os.environ.get("DEEPCLUST_TOKEN")) as client:
            for start in range(0, len(images), batch):
                chunk = images[start : start + batch]
                for path, result in zip(chunk, client.predict_files(chunk), strict=True):
                    errors += isinstance(result, ItemError)
                    typer.echo(json.dumps({"file": str(path), **result.model_dump(exclude_none=True)}))
    except (ServiceError, OSError) as exc:
        typer.echo(f"deepclust predict: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(1 if errors else 0)
