"""Does quantisation-aware fine-tuning free the INT8 graph of a store model from its float convolutions?

    python benchmarks/int8_fine_tune.py --model model_store/cifar10-lite0 --images 8000 --epochs 4

Re-quantizes a *copy* of the store folder the way `python -m training.requantize <folder> --fine-tune-images N`
does (the export's calibration and held-out images, its sensitivity rule, its 99 % gate on the whole evaluation
split), with the weights first fine-tuned under the all-INT8 graph's simulated arithmetic (`training/qat.py`). The
row gives what the selection saw on the held-out training images (all-INT8 agreement, every try), the float share
of the conv multiply-adds it then kept, and the gate's agreement on the evaluation split (or the gate's refusal),
beside the store file's own record. The store folder is not touched. Writes benchmarks/results/int8_fine_tune.json
(rows keyed by model, images, epochs, lr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, provenance, write_rows  # noqa: E402


def _selection_summary(record: dict) -> dict:
    tries = record.get("held_out_tries", [])
    return {
        "all_int8_held_out": tries[0]["agreement"] if tries else None,
        "float_convs": record.get("float_convs"),
        "float_other_nodes": record.get("float_other_nodes"),
        "float_share_of_conv_macs": record.get("float_share_of_conv_macs"),
        "held_out_agreement": record.get("held_out_agreement"),
        "held_out_tries": tries,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "cifar10-lite0")
    parser.add_argument("--images", type=int, default=8000, help="training images the weights are fine-tuned on")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    from serving.core.contract import ModelCard
    from training.export import ExportError
    from training.qat import FineTune
    from training.requantize import requantize

    store = ModelCard.load(args.model)
    row: dict = {
        "model": args.model.name,
        "images": args.images,
        "epochs": args.epochs,
        "lr": FineTune.lr,
        "store_file": {
            "agreement_vs_fp32": store.files["model.int8.onnx"].agreement_vs_fp32,
            **_selection_summary(store.model_extra.get("int8_selection", {})),
        },
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / args.model.name
        shutil.copytree(args.model, copy)
        try:
            summary = requantize(copy, threads=args.threads, fine_tune_images=args.images, fine_tune_epochs=args.epochs)
            row["gate"] = {"written": True, "agreement_vs_fp32": summary["agreement_vs_fp32"], "n": summary["n"]}
            record = summary  # requantize's summary carries the selection record the card was given
        except ExportError as refusal:  # the gate refused the graph: that is a result too
            row["gate"] = {"written": False, "refusal": str(refusal)}
            record = {}
    row["fine_tuned"] = {**_selection_summary(record), "fine_tune": record.get("fine_tune")}
    row["seconds"] = round(time.perf_counter() - start, 1)
    row.update(provenance())
    row["command"] = "python " + " ".join(sys.argv)
    write_rows("int8_fine_tune", [row], merge_on=("model", "images", "epochs", "lr"))
    flat = {
        "model": row["model"],
        "store all-int8": row["store_file"]["all_int8_held_out"],
        "tuned all-int8": row["fine_tuned"]["all_int8_held_out"],
        "store float share": row["store_file"]["float_share_of_conv_macs"],
        "tuned float share": row["fine_tuned"]["float_share_of_conv_macs"],
        "gate": row["gate"].get("agreement_vs_fp32", "refused"),
    }
    print_table([flat], list(flat))
    print(json.dumps(row["fine_tuned"].get("fine_tune")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
