"""Is the INT8 bound onnxruntime's, or this network's on this CPU? The same graphs timed under two INT8 kernel
libraries: onnxruntime (the engine's) and OpenVINO (oneDNN; AMX and VNNI on Intel CPUs).

    pip install openvino      # only for this script: the engine never uses it
    python benchmarks/int8_runtimes.py --model model_store/cifar10-lite0 --threads 1 2

Variants, each timed under both runtimes, interleaved in rounds (only ratios from one run compare on a shared VM):

- `fp32`: the store's FP32 file (the served default);
- `int8`: the store's INT8 file (the sensitivity rule's float set, as served with `--variant int8`);
- `all-int8`: every Conv quantized, calibrated as the export calibrates (MinMax on 512 training images, bias
  correction): the fastest INT8 graph the quantizer can build, at the agreement it gets.

OpenVINO runs with `INFERENCE_PRECISION_HINT=f32`: on CPUs with AMX its default would compute float nodes in bf16,
which is a different variant from the FP32 file. Agreement: argmax against onnxruntime's FP32 on `--test-images`
images of the evaluation split. Writes benchmarks/results/int8_runtimes.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, run_facts, write_rows  # noqa: E402
from benchmarks.engine import interleaved_throughput  # noqa: E402
from training.defaults import CALIBRATION_IMAGES  # noqa: E402

Predict = Callable[[np.ndarray], np.ndarray]


def onnxruntime_runner(path: Path, threads: int, exact_int8: bool = True) -> Predict:
    """The cluster ids from an onnxruntime CPU session as the engine opens it (`serving.core.engine.cpu_session`,
    `threads` intra-op threads; `exact_int8=False` only to measure what exact INT8 kernels cost)."""
    from serving.core.engine import cpu_session

    session = cpu_session(path, threads, exact_int8=exact_int8)
    return lambda images: session.run(["cluster"], {"images": images})[0]


def openvino_runner(path: Path, threads: int) -> Predict:
    """The cluster ids from OpenVINO's CPU plugin, float nodes kept in fp32, tuned for latency."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    )
    request, cluster = compiled.create_infer_request(), compiled.output("cluster")
    return lambda images: np.asarray(request.infer({0: np.ascontiguousarray(images)})[cluster])


RUNTIMES = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


def clusters(predict: Predict, images: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([predict(images[i : i + batch]) for i in range(0, len(images), batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "cifar10-lite0")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, help="MinMax, as the export")
    parser.add_argument("--test-images", type=int, default=2000, help="agreement, and the images timed")
    parser.add_argument("--seconds", type=float, default=6.0, help="per variant and batch, split into the rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        import openvino
    except ImportError:
        parser.error("OpenVINO is not installed: pip install openvino (only this benchmark uses it)")

    from training.data.datasets import create_dataset
    from training.export import uint8_images
    from training.quantize import Quantizer
    from training.requantize import store_facts

    fp32 = args.model / "model.onnx"
    _, metrics, size = store_facts(args.model)
    train, test = create_dataset(metrics["dataset"], "train"), create_dataset(metrics["dataset"], metrics["split"])
    rng = np.random.default_rng(0)
    calibration = uint8_images(train, size, np.sort(rng.permutation(len(train))[: args.calibration_images]))
    test_images = uint8_images(test, size, np.sort(rng.choice(len(test), args.test_images, replace=False)))

    rows: list[dict[str, object]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        all_int8 = Quantizer(fp32, calibration, Path(tmp)).build(Path(tmp) / "all-int8.onnx", set())
        graphs = {"fp32": fp32, "int8": args.model / "model.int8.onnx", "all-int8": all_int8}
        for threads in args.threads:
            runners = {
                (runtime, variant): make(path, threads)
                for runtime, make in RUNTIMES.items()
                for variant, path in graphs.items()
            }
            reference = clusters(runners["onnxruntime", "fp32"], test_images)
            agreement = {key: float((clusters(r, test_images) == reference).mean()) for key, r in runners.items()}
            for batch in args.batches:
                rates = interleaved_throughput(
                    {f"{k[0]}/{k[1]}": r for k, r in runners.items()}, test_images, batch, args.seconds, args.rounds
                )
                for runtime, variant in runners:
                    rate = rates[f"{runtime}/{variant}"]
                    rows.append(
                        {
                            "model": args.model.name,
                            "runtime": runtime,
                            "variant": variant,
                            "threads": threads,
                            "batch": batch,
                            "images_per_s": round(rate, 1),
                            "vs_own_fp32": round(rate / rates[f"{runtime}/fp32"], 2),
                            "vs_onnxruntime_fp32": round(rate / rates["onnxruntime/fp32"], 2),
                            "agreement_vs_fp32": round(agreement[runtime, variant], 4),
                            "test_images": args.test_images,
                            "load_average_1m": round(os.getloadavg()[0], 2),  # only ratios from one run compare
                        }
                    )
    extra = {**run_facts("int8_runtimes.py", argv, started), "openvino": openvino.__version__}
    rows = [{**row, **extra} for row in rows]
    print_table(rows, ["runtime", "variant", "threads", "batch", "images_per_s", "vs_own_fp32", "agreement_vs_fp32"])
    write_rows("int8_runtimes", rows, merge_on=("model", "runtime", "variant", "threads", "batch"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
