"""`deepclust label DIR --model model_store/NAME -o labels.csv|.jsonl|.parquet`: label every image of a folder.

Resumable (re-run the same command after a crash or `kill -9`: nothing is lost or duplicated), shardable for a
Kubernetes Indexed Job (`--shard I/N`, or `JOB_COMPLETION_INDEX` + `--shard-count`/`DEEPCLUST_SHARD_COUNT`).
The implementation (`serving.hosts.labeller.labeller`) is imported lazily so that `deepclust --help` stays fast.
Exit codes: 0 all files labelled, 1 finished but some files are in the errors file, 2 bad usage.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer


def _shard_from(shard: str | None, shard_count: int | None) -> tuple[int, int]:
    """`--shard I/N` wins; else `JOB_COMPLETION_INDEX` with `--shard-count` or `DEEPCLUST_SHARD_COUNT`; else 0/1."""
    from serving.core.batch import Shard

    if shard is not None:
        parsed = Shard.parse(shard)
        return parsed.index, parsed.count
    index = os.environ.get("JOB_COMPLETION_INDEX")
    count = shard_count if shard_count is not None else os.environ.get("DEEPCLUST_SHARD_COUNT")
    if index is None:
        if count is not None and int(count) != 1:
            raise ValueError("a shard count was given without a shard index (--shard I/N or JOB_COMPLETION_INDEX)")
        return 0, 1
    if count is None:
        raise ValueError(
            "JOB_COMPLETION_INDEX is set but the shard count is not: pass --shard-count N or set "
            "DEEPCLUST_SHARD_COUNT (the Job's completions)"
        )
    parsed = Shard(int(index), int(count))
    return parsed.index, parsed.count


def command(
    directory: Path = typer.Argument(..., help="Folder of images, walked recursively (hidden entries skipped)."),
    model: Path = typer.Option(
        ..., "--model", "-m", help="model_store/NAME, a model name in ./model_store, or a .onnx file."
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="labels.csv | labels.jsonl | labels.parquet. '{shard}' in the name is replaced by the shard index.",
    ),
    errors: Path | None = typer.Option(
        None, "--errors", help="Errors file (jsonl); default <output stem>.errors.jsonl beside the output."
    ),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Also write the K most probable clusters per image."),
    shard: str | None = typer.Option(None, "--shard", help="I/N: label only shard I of N (0-based)."),
    shard_count: int | None = typer.Option(
        None, "--shard-count", min=1, help="N for JOB_COMPLETION_INDEX (else env DEEPCLUST_SHARD_COUNT)."
    ),
    workers: int = typer.Option(1, "--workers", "-w", min=0, help="Decode processes (0 = decode inline)."),
    batch_size: int = typer.Option(
        16, "--batch-size", "-b", min=1, help="Images per inference batch (16: as fast as 64 on CPU, less memory)."
    ),
    threads: int = typer.Option(
        0, "--threads", min=0, help="onnxruntime intra-op threads (0 = the cores available: affinity and cgroup quota)."
    ),
    variant: str = typer.Option(
        "fp32", "--variant", help="fp32 | int8 | fp16 (model.onnx, model.int8.onnx, …); same as `deepclust serve`."
    ),
    gallery: Path | None = typer.Option(None, "--gallery", help="Write a self-contained HTML cluster gallery."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard existing output instead of resuming."),
    max_mb: float = typer.Option(20.0, "--max-mb", min=0.001, help="Larger files are refused (too_large)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Larger images are refused."),
    progress: str = typer.Option("auto", "--progress", help="auto | bar | log | none."),
) -> None:
    """Label every image under DIRECTORY: one row per image (path, cluster, confidence, label, sha256)."""
    from deepclust.extras import require

    require("label")
    from pydantic import ValidationError

    from serving.core.batch import Shard
    from serving.core.runtime import available_cpus
    from serving.hosts.labeller.labeller import LabelConfig, Labeller, UsageError, format_summary, summary_dict

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        index, count = _shard_from(shard, shard_count)
        output = Path(str(output).replace("{shard}", str(index)))
        if errors is not None:
            errors = Path(str(errors).replace("{shard}", str(index)))
        if gallery is not None:
            gallery = Path(str(gallery).replace("{shard}", str(index)))
        config = LabelConfig(
            root=directory,
            model=model,
            output=output,
            errors=errors,
            top_k=top_k,
            shard=Shard(index, count),
            workers=workers,
            batch_size=batch_size,
            threads=threads or available_cpus(),
            variant=variant,
            gallery=gallery,
            overwrite=overwrite,
            max_bytes=int(max_mb * (1 << 20)),
            max_pixels=max_pixels,
            progress=progress,
        )
        summary = Labeller(config).run()
    except KeyboardInterrupt:
        typer.echo("deepclust label: interrupted; re-run the same command to resume", err=True)
        raise typer.Exit(130) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"deepclust label: {problems}", err=True)
        raise typer.Exit(2) from None
    except (UsageError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"deepclust label: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_summary(summary))
    logging.getLogger("deepclust.label").debug("summary %s", summary_dict(summary))
    raise typer.Exit(summary.exit_code)
