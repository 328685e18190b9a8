"""`deepclust export`: a checkpoint -> ONNX (uint8 images in, pre-processing inside), variants, model card.

Variants: INT8 (for CPUs) and FP16 (for GPUs; `variant: auto` serves it on a GPU provider). Each must agree with FP32
on >= 99 % of the evaluation images. By default a variant that misses its gate is left out with a warning (the FP32
model is written; the card's `refused_variants` says why); asked for with `--int8` / `--fp16`, the miss fails the
export. FP16 is measured on a GPU provider when this machine has one; otherwise the card records its GPU agreement as
unmeasured (`fp16_gate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from training.defaults import CALIBRATION_IMAGES, FINE_TUNE_EPOCHS, PARITY_IMAGES


def command(
    checkpoint: Annotated[Path, typer.Argument(help="run directory or checkpoint file (.pt)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="model store folder, e.g. model_store/NAME")],
    int8: Annotated[
        bool | None,
        typer.Option(
            "--int8/--no-int8",
            help="static INT8 (QDQ) variant for CPUs; default: written if it passes its gate, --int8: required",
            show_default=False,
        ),
    ] = None,
    fp16: Annotated[
        bool | None,
        typer.Option(
            "--fp16/--no-fp16",
            help="FP16 variant for GPUs (agreement measured on the GPU when there is one, else recorded as "
            "unmeasured); default: written if it passes its gate, --fp16: required",
            show_default=False,
        ),
    ] = None,
    parity_images: Annotated[int, typer.Option(min=1, help="evaluation images for the torch/ONNX parity check")] = (
        PARITY_IMAGES
    ),
    calibration_images: Annotated[int, typer.Option(min=1, help="training images for INT8 calibration")] = (
        CALIBRATION_IMAGES
    ),
    int8_fine_tune_images: Annotated[
        int,
        typer.Option(
            min=0,
            help="quantisation-aware fine-tuning of the INT8 variant on this many training images (0: calibration "
            "only); more of the graph then runs in int8 at the same agreement gate",
        ),
    ] = 0,
    int8_fine_tune_epochs: Annotated[int, typer.Option(min=1, help="epochs of that fine-tuning")] = FINE_TUNE_EPOCHS,
    rebuild_command: Annotated[
        str | None, typer.Option(help="command recorded in model.json to rebuild this model (default: this export)")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(min=1, help="evaluate on a fixed random subset of the evaluation split")
    ] = None,
) -> None:
    """Export, check parity with torch (max |dp| <= 1e-4, 100% argmax) and write model.json; fails loudly."""
    from deepclust.extras import require

    require("export")
    from deepclust.logs import configure_logging
    from training.export import ExportError, export_checkpoint

    configure_logging()
    asked = {"int8": int8, "fp16": fp16}  # True: required, None: if it passes its gate, False: not built
    variants = tuple(v for v, on in asked.items() if on)
    optional_variants = tuple(v for v, on in asked.items() if on is None)
    try:
        result = export_checkpoint(
            checkpoint,
            output,
            variants=variants,
            optional_variants=optional_variants,
            parity_images=parity_images,
            calibration_images=calibration_images,
            eval_limit=eval_limit,
            rebuild_command=rebuild_command,
            fine_tune_images=int8_fine_tune_images,
            fine_tune_epochs=int8_fine_tune_epochs,
        )
    except (ExportError, FileNotFoundError, ValueError) as error:
        typer.echo(f"export failed: {error}", err=True)
        raise typer.Exit(2) from error
    card = result.card
    for variant, reason in result.refused.items():
        typer.echo(
            f"warning: {variant} variant not written (ask with --{variant} to make this an error): {reason}", err=True
        )
    typer.echo(
        json.dumps(
            {
                "out_dir": str(result.out_dir),
                "metrics": card.metrics.model_dump(),
                "parity": result.parity.__dict__,
                "int8_agreement": result.int8_agreement,
                "fp16_agreement": result.fp16_agreement,
                "fp16_gate": result.fp16_gate,
                "refused_variants": result.refused,
                "files": {name: f.bytes for name, f in card.files.items()},
            }
        )
    )
