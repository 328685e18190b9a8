"""Re-quantize a store model's INT8 file from its FP32 file: `python -m training.requantize model_store/<name>`.

The export's own image choice (seed 0: calibration and held-out images from the training split), its sensitivity
rule (`training.quantize`) and its 99 % gate on the whole evaluation split named in the file's metadata; the card's
INT8 entry is updated, the FP32 file is not touched. A module of its own so that `training.quantize` (which the
export calls) does not import the export back.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from training.export import (
    INT8_MIN_AGREEMENT,
    INT8_SELECTION_MARGIN,
    int8_metadata,
    int8_training_images,
    require_int8_gate,
    uint8_images,
    write_metadata,
)
from training.qat import FineTune
from training.quantize import _session, agreement, probabilities, quantize_int8

log = logging.getLogger("deepclust.quantize")


def requantize(
    folder: Path,
    *,
    train_split: str = "train",
    calibration_images: int = 512,
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
    props = {p.key.removeprefix("deepclust."): p.value for p in onnx.load(str(fp32)).metadata_props}
    props.pop("precision", None)
    metrics, size = json.loads(props["metrics"]), int(props["input_size"])
    eval_set = create_dataset(metrics["dataset"], metrics["split"])
    rng = np.random.default_rng(0)  # the same draws as `export_checkpoint` with the whole evaluation split
    n_eval = len(eval_set) if eval_limit is None else min(eval_limit, len(eval_set))
    eval_index = np.sort(rng.choice(len(eval_set), size=n_eval, replace=False))
    train_set = create_dataset(metrics["dataset"], train_split)
    calibration, held_out, fine_tune = int8_training_images(
        train_set, size, rng, calibration_images, selection_images, fine_tune_images
    )
    fp32_session = _session(fp32, threads)
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
        gate = agreement(probabilities(fp32_session, eval_images), probabilities(_session(int8, threads), eval_images))
        require_int8_gate(gate, len(eval_images), result.record)
        write_metadata(int8, int8_metadata(props, gate, result.record))
        (folder / "model.int8.onnx").write_bytes(int8.read_bytes())
    card = ModelCard.load(folder)
    card.add_file(folder / "model.int8.onnx", "int8", gate)
    card.int8_selection = result.record
    card.save(folder / "model.json")
    summary = {"model": folder.name, "agreement_vs_fp32": gate, "n": len(eval_images), **result.record}
    log.info(json.dumps({"event": "requantized", **{k: v for k, v in summary.items() if k != "float"}}))
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Re-quantize store models' INT8 files from their FP32 files.")
    parser.add_argument("folders", type=Path, nargs="+", help="model_store/<name> folders")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--selection-images", type=int, default=2000)
    parser.add_argument("--sensitivity-images", type=int, help="default: SENSITIVITY_BUDGET split over the nodes")
    parser.add_argument("--eval-limit", type=int, help="gate on this many evaluation images (default: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--fine-tune-images", type=int, default=0, help="quantisation-aware fine-tuning on this many training images"
    )
    parser.add_argument("--fine-tune-epochs", type=int, default=FineTune.epochs)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in args.folders:
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
