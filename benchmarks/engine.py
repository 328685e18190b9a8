"""Inference speed on this CPU: torch eager vs onnxruntime FP32 vs onnxruntime INT8, in one run.

    python benchmarks/engine.py --run runs/cifar10-lite0-cc --model model_store/cifar10-lite0

Torch eager runs in its best configuration measured here (glibc malloc tuned, inference_mode); the
script re-executes itself with that environment when it is missing, so the baseline is never the slow default.
All runtimes see the same real CIFAR-10 test images (uint8, serving pre-processing) and the same thread count.
The ONNX rows run on `--providers` (default `cpu`, this machine's comparison with torch on CPU); each row names the
provider that actually ran. On a GPU, `benchmarks/gpu.py` is the benchmark (variants, batches, service, memory).
Rows: `{runtime, batch, images_per_s, agreement, provider, gflops_per_s, share_of_fp32_peak, commit, machine}` in
`benchmarks/results/engine.json`; agreement is the argmax agreement with torch eager on all benchmark images; the
arithmetic rate is img/s x the FP32 graph's GFLOP per image (Conv/Gemm/MatMul), beside a matmul measured in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402


def throughput(predict, images: np.ndarray, batch: int, min_seconds: float, min_images: int) -> float:
    """Images per second of `predict` on consecutive batches, after one warm-up batch."""
    predict(images[:batch])
    done, started, i = 0, time.perf_counter(), 0
    while True:
        start = (i * batch) % max(len(images) - batch + 1, 1)
        predict(images[start : start + batch])
        done += batch
        i += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and done >= min_images:
            return done / elapsed


def graph_gflops(path: Path) -> float:
    """Arithmetic of one image through an ONNX graph in GFLOP: 2 x the multiply-adds of Conv, Gemm and MatMul (other
    ops are memory-bound and left out). Shapes are read by running one image (the graph's pad arithmetic is dynamic,
    so static shape inference cannot see them)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    weights = {init.name: list(numpy_helper.to_array(init).shape) for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    known = {o.name for o in model.graph.output}
    for node in nodes:
        for name in (node.output[0], node.input[0]):
            if name not in known:
                model.graph.output.append(helper.make_empty_tensor_value_info(name))
                known.add(name)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    size = [d if isinstance(d, int) else 1 for d in inp.shape]
    values = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {inp.name: np.zeros(size, np.uint8)}),
            strict=True,
        )
    )
    total = 0
    for node in nodes:
        out = values[node.output[0]].shape
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(weights[node.input[1]][1:]))  # C_in/groups x kH x kW each
        else:
            total += int(np.prod(out)) * int(values[node.input[0]].shape[-1])
    return 2 * total / 1e9


def matmul_peak_gflops(threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """This CPU's fp32 arithmetic rate as torch measures it now (square matmuls, `threads` threads)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def _with_store_metadata(candidate: Path, fp32: Path) -> Path:
    """A copy of `candidate` carrying the FP32 model's deepclust.* metadata, so that the Engine accepts it."""
    import tempfile

    import onnx

    from training.export import write_metadata

    props = {p.key.removeprefix("deepclust."): p.value for p in onnx.load(str(fp32)).metadata_props}
    out = Path(tempfile.mkdtemp()) / "model.int8.onnx"
    out.write_bytes(candidate.read_bytes())
    write_metadata(out, {**props, "precision": "int8"})
    return out


def main(argv: list[str] | None = None) -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # before torch allocates anything
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "cifar10-lite0-cc", help="training run (torch)")
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "cifar10-lite0")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--images", type=int, default=512, help="real test images used (and for agreement)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--providers", nargs="+", default=["cpu"], help="onnxruntime providers of the ONNX rows")
    parser.add_argument(
        "--int8-candidate",
        type=Path,
        help="an INT8 graph that is not in the store (e.g. one the export gate refused): measured and labelled as such",
    )
    args = parser.parse_args(argv)

    import torch

    from serving.core.engine import Engine
    from training.data.datasets import create_dataset
    from training.export import ServingGraph, uint8_images
    from training.trainer import load_checkpoint, resolve_checkpoint

    torch.set_num_threads(args.threads)
    model, config, _ = load_checkpoint(resolve_checkpoint(args.run))
    graph = ServingGraph(model).eval()
    data = create_dataset(config.data.dataset, config.data.eval_split, config.data.root)
    index = np.random.default_rng(0).choice(len(data), size=args.images, replace=False)
    images = uint8_images(data, config.data.image_size, np.sort(index))

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return graph(torch.from_numpy(batch))[0].numpy()

    files = {name: args.model / f for name, f in (("ort_fp32", "model.onnx"), ("ort_int8", "model.int8.onnx"))}
    notes = {}
    if args.int8_candidate is not None:
        files["ort_int8"] = _with_store_metadata(args.int8_candidate, args.model / "model.onnx")
        notes["ort_int8"] = f"candidate {args.int8_candidate.name}, not in the store (below the 99% agreement gate)"
    runtimes = {"torch_eager": eager}
    provider_of = {"torch_eager": "torch CPU"}
    for name, path in files.items():
        if path.exists():
            engine = Engine(path, providers=args.providers, intra_op_threads=args.threads, max_batch=256)
            runtimes[name] = lambda batch, engine=engine: engine.run(batch).probabilities
            provider_of[name] = engine.provider

    reference = np.concatenate([eager(images[i : i + 64]) for i in range(0, len(images), 64)]).argmax(1)
    rows = []
    for name, predict in runtimes.items():
        full = np.concatenate([predict(images[i : i + 64]) for i in range(0, len(images), 64)])
        agreement = float((full.argmax(1) == reference).mean())
        for batch in args.batches:
            ips = throughput(predict, images, batch, args.min_seconds, min_images=2 * batch)
            row = {"runtime": name, "batch": batch, "images_per_s": round(ips, 1), "agreement": round(agreement, 4)}
            row["provider"] = provider_of[name]
            if name in notes:
                row["note"] = notes[name]
            rows.append({**row, "threads": args.threads, **provenance()})
            print(json.dumps(rows[-1]), flush=True)

    fp32_file = files["ort_fp32"]
    gflop = graph_gflops(fp32_file) if fp32_file.exists() else None
    peak = matmul_peak_gflops(args.threads)
    for r in rows:  # the distance to this CPU's arithmetic limit (INT8 runs the same graph's arithmetic in int8)
        if gflop is not None:
            r["gflop_per_image"] = round(gflop, 4)
            r["gflops_per_s"] = round(r["images_per_s"] * gflop, 1)
            r["peak_fp32_gflops_torch_matmul"] = round(peak, 1)
            r["share_of_fp32_peak"] = round(r["images_per_s"] * gflop / peak, 3)
    by = {(r["runtime"], r["batch"]): r["images_per_s"] for r in rows}
    for r in rows:
        base = by.get(("torch_eager", r["batch"]))
        fp32 = by.get(("ort_fp32", r["batch"]))
        r["vs_eager"] = round(r["images_per_s"] / base, 2) if base else None
        r["vs_fp32"] = round(r["images_per_s"] / fp32, 2) if fp32 else None
    command = "python benchmarks/engine.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for r in rows:
        r["command"] = command
    write_rows("engine", rows)
    print_table(rows, ["runtime", "batch", "images_per_s", "vs_eager", "vs_fp32", "agreement", "gflops_per_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
