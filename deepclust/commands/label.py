"""`deepclust label` (not built yet: owned by the issue that adds it)."""

import typer


def command() -> None:
    """Not available yet."""
    typer.echo("deepclust label: not implemented yet", err=True)
    raise typer.Exit(2)
