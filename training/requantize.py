"""Rebuild a store model's files from its FP32 file: `python -m training.requantize model_store/<name>`.

First the FP32 graph is brought to what the export writes now (`refresh_graphs`: run-time pads folded, outputs
checked identical, the FP16 variant rebuilt from it with the export's gate), so a store model need not be retrained
for a change of the export's graph. Then the INT8 file (unless `--no-int8`): the export's own image choice (seed 0:
calibration and held-out images from the training split), its sensitivity rule (`training.quantize`) and its 99 %
gate on the whole evaluation split named in the file's metadata. The card's entries are updated. A module of its
own so that `training.quantize` (which the export calls) does not import the export back.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from serving.core.engine import cpu_session
from training.defaults import CALIBRATION_IMAGES, PARITY_IMAGES
from training.export import (
    INT8_MIN_AGREEMENT,
    INT8_SELECTION_MARGIN,
    PARITY_MAX_ABS,
    ExportError,
    build_fp16,
    evaluation_index,
    int8_metadata,
    int8_training_images,
    require_int8_gate,
    run_onnx,
    uint8_images,
    write_metadata,
)
from training.onnx_graph import fold_pads
from training.qat import FineTune
from training.quantize import agreement, probabilities, quantize_int8

log = logging.getLogger("deepclust.quantize")


def store_facts(folder: Path) -> tuple[dict[str, str], dict[str, object], int]:
    """The FP32 file's metadata (without its precision), its metrics and its input size."""
    props = {p.key.removeprefix("deepclust."): p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    props.pop("precision", None)
    return props, json.loads(props["metrics"]), int(props["input_size"])


def refresh_graphs(folder: Path) -> dict[str, object]:
    """Bring `folder/model.onnx` to the export's current graph: its run-time pads folded to constants (as
    `export_graph` does). The folded graph must give the same outputs as the file on the export's parity images
    (`ExportError` otherwise); the FP16 variant, if any, is rebuilt from it with the export's gate; the card's
    entries are updated. Nothing changes when there is nothing to fold."""
    from serving.core.contract import ModelCard
    from training.data.datasets import create_dataset

    fp32 = folder / "model.onnx"
    props, metrics, size = store_facts(folder)
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "model.onnx"
        count = fold_pads(fp32, folded, np.zeros((1, size, size, 3), np.uint8))  # the amounts depend on the shape
        if not count:
            return {"model": folder.name, "pads_folded": 0}
        eval_set = create_dataset(metrics["dataset"], metrics["split"])
        # The export's draw: its first images are its parity images.
        index = evaluation_index(np.random.default_rng(0), len(eval_set))[:PARITY_IMAGES]
        images = uint8_images(eval_set, size, index)
        before, after = run_onnx(cpu_session(fp32), images), run_onnx(cpu_session(folded), images)
        difference = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
        if difference > PARITY_MAX_ABS or not (before[0].argmax(1) == after[0].argmax(1)).all():
            raise ExportError(f"{fp32}: folding its pads changed its outputs (max |diff| {difference:.2e})")
        onnx.checker.check_model(str(folded), full_check=True)
        card = ModelCard.load(folder)
        outputs = {"model.onnx": ("fp32", None)}
        fp16_gate = None
        if (folder / "model.fp16.onnx").exists():
            gate = build_fp16(folded, Path(tmp) / "model.fp16.onnx", props, images, before[0])
            fp16_gate = gate.record()
            outputs["model.fp16.onnx"] = ("fp16", gate.served_agreement)
            card.fp16_gate = fp16_gate
        for name, (precision, agreement_vs_fp32) in outputs.items():
            (folder / name).write_bytes((Path(tmp) / name).read_bytes())
            card.add_file(folder / name, precision, agreement_vs_fp32)
    card.save(folder / "model.json")
    summary = {"model": folder.name, "pads_folded": count, "max_abs_diff": difference, "fp16_gate": fp16_gate}
    log.info(json.dumps({"event": "graphs_refreshed", **summary}))
    return summary


def requantize(
    folder: Path,
    *,
    train_split: str = "train",
    calibration_images: int = CALIBRATION_IMAGES,
    selection_images: int = 2000,
    sensitivity_images: int | None = None,
    eval_limit: int | None = None,
    threads: int = 0,
    fine_tune_images: int = 0,
    fine_tune_epochs: int = FineTune.epochs,
) -> dict[str, object]:
    """Rebuild `folder/model.int8.onnx` from the store's FP32 file, with the export's image choice (seed 0:
    calibration and held-out images from `train_split`, the gate on the whole evaluation split named in the
    metadata), its gate and its metadata; updates the card's INT8 entry. The FP32 file is not touched."""
    from serving.core.contract import ModelCard
    from training.data.datasets import create_dataset

    fp32 = folder / "model.onnx"
    props, metrics, size = store_facts(folder)
    eval_set = create_dataset(metrics["dataset"], metrics["split"])
    rng = np.random.default_rng(0)  # the same draws as `export_checkpoint`
    eval_index = evaluation_index(rng, len(eval_set), eval_limit)
    train_set = create_dataset(metrics["dataset"], train_split)
    calibration, held_out, fine_tune = int8_training_images(
        train_set, size, rng, calibration_images, selection_images, fine_tune_images
    )
    fp32_session = cpu_session(fp32, threads)
    with tempfile.TemporaryDirectory() as tmp:
        int8 = Path(tmp) / "model.int8.onnx"
        result = quantize_int8(
            fp32,
            int8,
            calibration,
            held_out,
            INT8_MIN_AGREEMENT + INT8_SELECTION_MARGIN,
            reference=probabilities(fp32_session, held_out),
            sensitivity_images=sensitivity_images,
            threads=threads,
            fine_tune=None if fine_tune is None else FineTune(fine_tune, epochs=fine_tune_epochs),
        )
        eval_images = uint8_images(eval_set, size, eval_index)
        gate = agreement(
            probabilities(fp32_session, eval_images), probabilities(cpu_session(int8, threads), eval_images)
        )
        require_int8_gate(gate, len(eval_images), result.record)
        write_metadata(int8, int8_metadata(props, gate, result.record))
        (folder / "model.int8.onnx").write_bytes(int8.read_bytes())
    card = ModelCard.load(folder)
    card.add_file(folder / "model.int8.onnx", "int8", gate)
    card.int8_selection = result.record
    card.refused_variants.pop("int8", None)  # an export that refused it is superseded by this file
    card.save(folder / "model.json")
    summary = {"model": folder.name, "agreement_vs_fp32": gate, "n": len(eval_images), **result.record}
    log.info(json.dumps({"event": "requantized", **{k: v for k, v in summary.items() if k != "float"}}))
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Re-quantize store models' INT8 files from their FP32 files.")
    parser.add_argument("folders", type=Path, nargs="+", help="model_store/<name> folders")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--selection-images", type=int, default=2000)
    parser.add_argument("--sensitivity-images", type=int, help="default: SENSITIVITY_BUDGET split over the nodes")
    parser.add_argument("--eval-limit", type=int, help="gate on this many evaluation images (default: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--fine-tune-images", type=int, default=0, help="quantisation-aware fine-tuning on this many training images"
    )
    parser.add_argument("--fine-tune-epochs", type=int, default=FineTune.epochs)
    parser.add_argument("--no-int8", action="store_true", help="refresh the FP32 and FP16 graphs only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in args.folders:
        print(json.dumps(refresh_graphs(folder)), flush=True)
        if args.no_int8:
            continue
        summary = requantize(
            folder,
            train_split=args.train_split,
            calibration_images=args.calibration_images,
            selection_images=args.selection_images,
            sensitivity_images=args.sensitivity_images,
            eval_limit=args.eval_limit,
            threads=args.threads,
            fine_tune_images=args.fine_tune_images,
            fine_tune_epochs=args.fine_tune_epochs,
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "float"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
