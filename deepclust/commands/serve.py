"""`deepclust serve`: serve a model from the store behind our HTTP front (what `make serve` runs).

Two backends behind the same front (serving/hosts/serve/front.py, aiohttp), the same API, metrics and security:
`--backend torchserve` (the default: TorchServe's Java frontend and Python workers) or `--backend engine` (the front
runs the onnxruntime engine in its own worker processes, no JVM). The front owns the inference port: plain
`curl --data-binary @cat.jpg http://127.0.0.1:8080/predictions/cifar10-lite0` works, bodies above
`--max-request-bytes` get a 413, it measures end-to-end latency and serves the Open Inference Protocol (`/v2/...`).

Settings come from an optional YAML file (`--config`, keys of `serving.hosts.serve.config.ServeConfig`, optionally
under a `serve:` key) and the options below override it. The implementation is imported lazily (no torch needed).
"""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    backend: str = typer.Option(
        None, "--backend", help="torchserve (default: TorchServe, Java) | engine (our own worker processes, no JVM)."
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Model folder name in the store or a path (default: the most accurate store model whose measured "
        "service reaches 100 img/s, model_store/throughput.json; else cifar10-lite0).",
    ),
    config: Path = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="YAML serve settings."),
    model_store: Path = typer.Option(None, "--model-store", help="Model store folder (default ./model_store)."),
    variant: str = typer.Option(
        None, "--variant", help="fp32 (default) | int8 | fp16 | auto (FP16 on a GPU provider, FP32 on CPU)."
    ),
    host: str = typer.Option(None, "--host", help="Inference API address (default 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="Inference API port (default 8080)."),
    management: str = typer.Option(None, "--management", help="off (default) | loopback (127.0.0.1:8081)."),
    metrics_port: int = typer.Option(None, "--metrics-port", help="deepclust Prometheus metrics port (default 8082)."),
    metrics_host: str = typer.Option(
        None, "--metrics-host", help="deepclust Prometheus metrics address (default 127.0.0.1)."
    ),
    token_auth: str = typer.Option(
        None, "--token-auth", help="auto (default: off only when every API is on loopback) | on | off."
    ),
    workers: int = typer.Option(None, "--workers", help="Worker processes running the engine (default 1)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Server-side batch size in requests (default 16)."),
    max_batch_delay_ms: int = typer.Option(None, "--max-batch-delay-ms", help="Server-side batch delay (default 10)."),
    intra_op_threads: int = typer.Option(
        None, "--threads", help="onnxruntime threads per worker (0 = the cores available, shared among the workers)."
    ),
    max_request_bytes: int = typer.Option(
        None, "--max-request-bytes", help="Largest request body the HTTP front accepts (default 100 MiB; 413 above)."
    ),
) -> None:
    """Serve a clustering model over HTTP (onnxruntime on TorchServe or on our own workers); Ctrl-C stops it."""
    from deepclust.extras import require

    require("serve")
    from pydantic import ValidationError

    from serving.hosts.serve.config import ServeConfig

    try:
        settings = ServeConfig.load(
            config,
            backend=backend,
            model=model,
            model_store=model_store,
            variant=variant,
            host=host,
            port=port,
            management=management,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            token_auth=token_auth,
            workers=workers,
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            intra_op_threads=intra_op_threads,
            max_request_bytes=max_request_bytes,
        )
    except (ValidationError, ValueError, OSError) as exc:
        typer.echo(f"deepclust serve: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    if settings.intra_op_threads == 0:  # onnxruntime alone would take every host core, not the cgroup's share
        from serving.core.runtime import available_cpus

        settings = settings.model_copy(update={"intra_op_threads": max(1, available_cpus() // settings.workers)})
    if settings.backend == "engine":
        from serving.hosts.engine_backend.host import serve_forever
    else:
        from serving.hosts.torchserve.server import serve_forever
    try:
        code = serve_forever(settings, echo=typer.echo)
    except (FileNotFoundError, ValueError) as exc:  # missing model, sha mismatch with the card
        typer.echo(f"deepclust serve: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"deepclust serve: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)
