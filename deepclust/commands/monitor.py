"""`deepclust monitor`: the evaluation job (ACC/NMI/ARI with labels, drift without) into Prometheus and JSON.

The implementation (`serving.hosts.monitor`) is imported inside the command, so `--help` stays instant and the
command works in the serve-only image (no torch).
Exit codes: 0 ok; 1 finished, but some images could not be read (listed in the report); 2 bad usage, bad
input, or the figures could not be published (the JSON report, when asked for, is written before publishing).
"""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    model: Path = typer.Option(
        ..., "--model", help="Model folder (model_store/NAME), a model name in ./model_store, or an ONNX file."
    ),
    variant: str = typer.Option(
        "fp32", "--variant", help="fp32 | int8 | fp16 (model.onnx, model.int8.onnx, …); same as `deepclust serve`."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="Labelled probe set: a folder of class sub-folders → ACC/NMI/ARI."
    ),
    sample: Path | None = typer.Option(
        None, "--sample", help="Unlabelled recent images → drift against the export-time reference."
    ),
    pushgateway: str | None = typer.Option(
        None, "--pushgateway", help="Pushgateway URL (e.g. http://pushgateway:9091) to push the gauges to."
    ),
    textfile: Path | None = typer.Option(
        None, "--textfile", help="node-exporter textfile (*.prom) to write the gauges to instead."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the full JSON report here."),
    compare_model: Path | None = typer.Option(
        None,
        "--compare-model",
        help="A second model (a folder: its fp32 file; or an ONNX file): NMI/ARI agreement of the two models.",
    ),
    embedding_baseline: Path | None = typer.Option(
        None, "--embedding-baseline", help="Folder of baseline images: embedding MMD² (fixed RBF kernel)."
    ),
    dataset: str | None = typer.Option(None, "--dataset", help="The `dataset` label (default: the folder's name)."),
    job: str = typer.Option("deepclust-monitor", "--job", help="The Pushgateway `job` label."),
    max_images: int | None = typer.Option(
        None, "--max-images", min=1, help="Use a seeded random subset of at most this many images."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset (and of the MMD subsample)."),
    low_confidence_threshold: float | None = typer.Option(
        None,
        "--low-confidence-threshold",
        min=0.0,
        max=1.0,
        help="Confidence below which an assignment counts as low (default: the reference's 5% quantile).",
    ),
    workers: int = typer.Option(1, "--workers", min=0, help="Decode processes (0 = decode inline)."),
    threads: int = typer.Option(
        0, "--threads", min=0, help="onnxruntime intra-op threads (0 = the cores available: affinity, cgroup quota)."
    ),
    progress: str = typer.Option(
        "auto", "--progress", help="auto | bar | log | none: a bar with ETA on a terminal, JSON lines otherwise."
    ),
) -> None:
    """Evaluate a model on a labelled probe set (ACC/NMI/ARI and change since export) or measure the drift
    of an unlabelled sample (PSI, JS, chi-square p, confidence KS/W1, low-confidence share); publish the
    gauges to a Pushgateway or a textfile and print the JSON report. Warns (and says in the report's
    `sample_size`) when the sample is too small for a statistic it publishes."""
    from deepclust.extras import require

    require("monitor")
    import logging

    from pydantic import ValidationError

    from serving.hosts.monitor import MonitorConfig, MonitorError, PublishError, dumps, run_monitor

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = MonitorConfig(
            model=model,
            variant=variant,
            reference_dir=reference,
            sample_dir=sample,
            pushgateway=pushgateway,
            textfile=textfile,
            json_path=json_path,
            compare_model=compare_model,
            embedding_baseline=embedding_baseline,
            dataset=dataset,
            job=job,
            max_images=max_images,
            seed=seed,
            low_confidence_threshold=low_confidence_threshold,
            workers=workers,
            threads=threads,
            progress=progress,
        )
    except ValidationError as exc:
        messages = "; ".join(error["msg"] for error in exc.errors())
        typer.echo(f"deepclust monitor: {messages}", err=True)
        raise typer.Exit(2) from None
    try:
        report = run_monitor(config)
    except MonitorError as exc:
        typer.echo(f"deepclust monitor: {exc}", err=True)
        raise typer.Exit(2) from None
    except PublishError as exc:
        typer.echo(f"deepclust monitor: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(dumps(report))
    if report["n_errors"]:
        n_errors = report["n_errors"]
        typer.echo(f"deepclust monitor: {n_errors} image(s) could not be used (see errors)", err=True)
        raise typer.Exit(1)
