"""What limits INT8 on a store model: the all-INT8 graph's agreement with FP32 under two calibrations, and whether a
correction on the head's side (of the INT8 embedding) can recover it.

    python benchmarks/int8_limits.py --model model_store/cifar10-lite0-lite2 --threads 1

The sensitivity rule (`training.quantize`) keeps most of the arithmetic float because quantizing everything costs
3-4 % agreement. This script asks where that loss can be won back without retraining the backbones:

- `all-int8-minmax`: every Conv quantized, MinMax ranges (the export's calibration), bias-corrected;
- `all-int8-percentile`: the same with 99.99-percentile ranges (histograms hold every activation in memory, so it is
  calibrated on fewer images: `--percentile-images`);
- `+mean-shift`, `+affine`, `+ridge`: the MinMax INT8 embedding corrected towards the FP32 embedding by a map fitted
  on training images (its mean error; a per-dimension affine map; a full linear map, ridge), then the FP32 head. A
  correction would be folded into the INT8 graph as a MatMul before the head; the ridge weight is chosen on a
  held-out part of the fitting images (label-free: agreement with FP32, never the labels).

Agreement (argmax, against the FP32 file) on `--test-images` images of the evaluation split; the embedding's error
relative to its norm, and the share of that error that is a constant shift. Label-free throughout.
Writes benchmarks/results/int8_limits.json (rows keyed by model and variant).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

OUTPUTS = ["embedding", "probabilities"]


def run_graph(path: Path, images: np.ndarray, threads: int, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The graph's embedding and probabilities for uint8 images."""
    from training.quantize import _session

    session = _session(path, threads)
    parts = [session.run(OUTPUTS, {"images": images[i : i + batch]}) for i in range(0, len(images), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def head_session(fp32: Path, workdir: Path, threads: int):  # noqa: ANN201
    """The FP32 graph from `embedding` to `probabilities`: the head a corrected embedding is fed to."""
    import onnx.utils

    from training.quantize import _session

    path = workdir / "head.onnx"
    onnx.utils.extract_model(str(fp32), str(path), ["embedding"], ["probabilities"])
    return _session(path, threads)


def with_ones(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), x.dtype)])


def ridge_map(x: np.ndarray, y: np.ndarray, weight: float) -> np.ndarray:
    """[x, 1] @ A ~ y, least squares with an L2 penalty `weight` (on the bias too: sparing it is not worth the code)."""
    design = with_ones(x).astype(np.float64)
    gram = design.T @ design + weight * np.eye(design.shape[1])
    return np.linalg.solve(gram, design.T @ y.astype(np.float64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "cifar10-lite0-lite2")
    parser.add_argument("--calibration-images", type=int, default=512, help="MinMax (the export's count)")
    parser.add_argument("--percentile-images", type=int, default=64)
    parser.add_argument("--fit-images", type=int, default=6000, help="training images the corrections are fit on")
    parser.add_argument("--test-images", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import onnx

    from training.data.datasets import create_dataset
    from training.export import uint8_images
    from training.quantize import Quantizer, agreement

    fp32 = args.model / "model.onnx"
    props = {p.key.removeprefix("deepclust."): p.value for p in onnx.load(str(fp32)).metadata_props}
    metrics, size = json.loads(props["metrics"]), int(props["input_size"])
    train, test = create_dataset(metrics["dataset"], "train"), create_dataset(metrics["dataset"], metrics["split"])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train))
    calibration = uint8_images(train, size, np.sort(order[: args.calibration_images]))
    fit_images = uint8_images(train, size, np.sort(order[args.calibration_images :][: args.fit_images]))
    test_images = uint8_images(test, size, np.sort(rng.choice(len(test), args.test_images, replace=False)))

    rows: list[dict[str, object]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graphs = {}
        for method, count in (("MinMax", args.calibration_images), ("Percentile", args.percentile_images)):
            folder = work / method
            folder.mkdir()
            quantizer = Quantizer(fp32, calibration[:count], folder, calibrate_method=method)
            graphs[method] = quantizer.build(work / f"all-{method}.onnx")
        e_fit, p_fit = run_graph(fp32, fit_images, args.threads)
        e_test, p_test = run_graph(fp32, test_images, args.threads)
        q_fit, _ = run_graph(graphs["MinMax"], fit_images, args.threads)
        q_test, q_probs = run_graph(graphs["MinMax"], test_images, args.threads)
        _, percentile_probs = run_graph(graphs["Percentile"], test_images, args.threads)
        head = head_session(fp32, work, args.threads)

        def through_head(embedding: np.ndarray) -> np.ndarray:
            return head.run(["probabilities"], {"embedding": embedding.astype(np.float32)})[0]

        error = q_fit - e_fit
        base = {"model": args.model.name, "images": args.test_images, "fit_images": args.fit_images}
        relative = float(np.linalg.norm(q_test - e_test) / np.linalg.norm(e_test))
        shift_share = float(np.linalg.norm(error.mean(0)) * np.sqrt(len(error)) / np.linalg.norm(error))
        rows.append(
            {
                **base,
                "variant": "all-int8-minmax",
                "calibration_images": args.calibration_images,
                "agreement": agreement(p_test, q_probs),
                "embedding_relative_error": round(relative, 4),
                "shift_share_of_error": round(shift_share, 4),
            }
        )
        rows.append(
            {
                **base,
                "variant": "all-int8-percentile",
                "calibration_images": args.percentile_images,
                "agreement": agreement(p_test, percentile_probs),
            }
        )
        rows.append(
            {
                **base,
                "variant": "all-int8-minmax+mean-shift",
                "agreement": agreement(p_test, through_head(q_test - error.mean(0))),
            }
        )
        qm, em = q_fit.mean(0), e_fit.mean(0)
        slope = ((q_fit - qm) * (e_fit - em)).sum(0) / ((q_fit - qm) ** 2).sum(0).clip(1e-12)
        rows.append(
            {
                **base,
                "variant": "all-int8-minmax+affine",
                "agreement": agreement(p_test, through_head((q_test - qm) * slope + em)),
            }
        )
        split = len(q_fit) * 4 // 5  # the ridge weight: chosen on the last fifth of the fitting images
        scores = {}
        for weight in (1e-2, 1e-1, 1.0, 10.0):
            mapping = ridge_map(q_fit[:split], e_fit[:split], weight)
            scores[weight] = agreement(p_fit[split:], through_head(with_ones(q_fit[split:]) @ mapping))
        weight = max(scores, key=scores.get)
        mapping = ridge_map(q_fit, e_fit, weight)
        rows.append(
            {
                **base,
                "variant": "all-int8-minmax+ridge",
                "ridge_weight": weight,
                "held_out_fit_agreement": scores,
                "agreement": agreement(p_test, through_head(with_ones(q_test) @ mapping)),
            }
        )
    seconds = round(time.perf_counter() - started, 1)
    command = "python benchmarks/int8_limits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for row in rows:
        row.update(
            {
                "agreement": round(float(row["agreement"]), 4),
                "seconds": seconds,
                "threads": args.threads,
                **provenance(),
                "command": command,
            }
        )
    write_rows("int8_limits", rows, merge_on=("model", "variant"))
    print_table(rows, ["variant", "agreement", "embedding_relative_error", "shift_share_of_error"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
