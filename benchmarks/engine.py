"""Inference speed on this CPU: onnxruntime FP32 vs INT8 of each store model (and torch eager), in one run.

    python benchmarks/engine.py --models model_store/cifar10-lite0 model_store/cifar10-lite0-lite2

Every variant of a model sees the same real test images (uint8, serving pre-processing, the split named in the
model's metadata), the same thread count and the same machine: at each batch size the variants run in alternating
slices (`--rounds`), because this machine is shared and only ratios measured together compare. `--run` adds torch
eager rows for the first model (its best configuration here: tuned glibc malloc, inference_mode; the script
re-executes itself with that environment). Rows in `benchmarks/results/engine.json`: `{model, runtime, batch,
images_per_s, vs_fp32, agreement_vs_fp32 (these images), agreement_vs_fp32_eval_set (the card's gate figure),
gflop_per_image, gflops_per_s, int8_share_of_macs, share_of_fp32_peak, share_of_int8_peak, ...}`.

Arithmetic: `graph_macs` counts the multiply-adds of every Conv (output elements x C_in/groups x kH x kW) and
Gemm/MatMul (output elements x the reduced dimension) of the FP32 graph, shapes by onnx shape inference (batch 1,
TF-"SAME" pads folded); GFLOP = 2 x MACs; nothing else is counted (bias, activations, pooling, Q/DQ: memory-bound).
The INT8 graph does the same arithmetic, `int8_share_of_macs` of it in int8, so its rate is in GOP/s. The peaks are
onnxruntime's own: a 2048x2048 MatMul (fp32) and MatMulInteger (uint8 x int8, the kernel family of QLinearConv),
`--threads` threads, measured before and after the models (their mean is the reference), beside torch's fp32 matmul.
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


def _graph_for_counting(path: Path):
    """The graph with batch 1 and its TF-"SAME" pad amounts folded to constants (they are computed from the input
    shape at run time, which static shape inference cannot follow), shapes inferred by onnx."""
    import tempfile

    import onnx

    from training.onnx_graph import fold_pads

    model = onnx.load(str(path))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[:1]:
        dim.Clear()
        dim.dim_value = 1
    with tempfile.TemporaryDirectory() as tmp:
        fixed, folded = Path(tmp) / "fixed.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(fixed))
        sample = np.zeros([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim], np.uint8)
        fold_pads(fixed, folded, sample)
        return onnx.shape_inference.infer_shapes(onnx.load(str(folded)), data_prop=True)


def graph_macs(path: Path) -> dict[str, tuple[str, int]]:
    """Multiply-accumulates of one image per Conv/Gemm/MatMul/QLinearConv/MatMulInteger node of an ONNX graph:
    {node name: (op type, MACs)}. Conv: output elements x C_in/groups x kH x kW; Gemm/MatMul: output elements x the
    reduced dimension. Shapes come from onnx shape inference on the graph itself (batch 1). Unnamed nodes are keyed
    `<op type>_<index>`."""
    from onnx import numpy_helper

    model = _graph_for_counting(path)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    weights = {init.name: list(numpy_helper.to_array(init).shape) for init in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def weight_shape(name: str) -> list[int]:
        node = producer.get(name)  # a QDQ graph reads the int8 weight through DequantizeLinear
        while node is not None and node.op_type in {"DequantizeLinear", "Transpose", "Cast"}:
            name, node = node.input[0], producer.get(node.input[0])
        return weights.get(name) or shapes[name]

    out: dict[str, tuple[str, int]] = {}
    for index, node in enumerate(model.graph.node):
        key = node.name or f"{node.op_type}_{index}"
        if node.op_type in {"Conv", "QLinearConv", "ConvInteger"}:
            w = weight_shape(node.input[3] if node.op_type == "QLinearConv" else node.input[1])
            out[key] = (node.op_type, int(np.prod(shapes[node.output[0]])) * int(np.prod(w[1:])))
        elif node.op_type in {"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"}:
            a = shapes[node.input[0]]
            trans_a = any(att.name == "transA" and att.i for att in node.attribute)
            reduced = a[-2] if trans_a else a[-1]
            out[key] = (node.op_type, int(np.prod(shapes[node.output[0]])) * int(reduced))
    return out


def graph_gflops(path: Path) -> float:
    """Arithmetic of one image through an ONNX graph in GFLOP: 2 x the multiply-adds of its Conv, Gemm and MatMul
    nodes (`graph_macs`). Everything else (bias, activations, pooling, elementwise, Q/DQ) is memory-bound and left
    out. The INT8 graph does the same arithmetic, part of it in int8 (counted the same: GOP)."""
    return 2 * sum(macs for _, macs in graph_macs(path).values()) / 1e9


def int8_share(path: Path) -> float:
    """Share of a QDQ graph's multiply-adds in quantized Convs/MatMuls (weights read through DequantizeLinear)."""
    import onnx

    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized = {
        n.name
        for n in model.graph.node
        if n.op_type in {"Conv", "Gemm", "MatMul"}
        and len(n.input) > 1
        and getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear"
        and getattr(producer.get(n.input[0]), "op_type", None) == "DequantizeLinear"
    }
    macs = graph_macs(path)
    total = sum(m for _, m in macs.values()) or 1
    return sum(m for name, (_, m) in macs.items() if name in quantized) / total


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


def ort_matmul_peaks(threads: int, size: int = 2048, seconds: float = 2.0, rounds: int = 3) -> dict[str, float]:
    """onnxruntime's own arithmetic ceiling on this CPU, fp32 (MatMul) and int8 (MatMulInteger, uint8 x int8, the
    kernel QLinearConv uses), square `size` matrices, `threads` threads, interleaved so both see the same machine."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(op: str, a_type: int, b_type: int, out_type: int):
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])],
            op,
            [
                helper.make_tensor_value_info("a", a_type, [size, size]),
                helper.make_tensor_value_info("b", b_type, [size, size]),
            ],
            [helper.make_tensor_value_info("y", out_type, [size, size])],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    cases = {
        "fp32": (
            session("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT),
            {"a": rng.standard_normal((size, size), np.float32), "b": rng.standard_normal((size, size), np.float32)},
        ),
        "int8": (
            session("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32),
            {
                "a": rng.integers(0, 256, (size, size), dtype=np.uint8),
                "b": rng.integers(-128, 128, (size, size), dtype=np.int8),
            },
        ),
    }
    done = dict.fromkeys(cases, 0.0)
    spent = dict.fromkeys(cases, 0.0)
    for sess, feeds in cases.values():
        sess.run(None, feeds)
    for _ in range(rounds):
        for name, (sess, feeds) in cases.items():
            started = time.perf_counter()
            while time.perf_counter() - started < seconds / rounds:
                sess.run(None, feeds)
                done[name] += 1
            spent[name] += time.perf_counter() - started
    return {name: 2 * size**3 * done[name] / spent[name] / 1e9 for name in cases}


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


def interleaved_throughput(
    runners: dict[str, object], images: np.ndarray, batch: int, seconds: float, rounds: int
) -> dict[str, float]:
    """Images per second of each runner at `batch`, measured in `rounds` alternating slices of `seconds / rounds`
    each, so that every variant sees the same machine (this one is shared: only ratios from one run compare)."""
    done = dict.fromkeys(runners, 0)
    spent = dict.fromkeys(runners, 0.0)
    for predict in runners.values():
        predict(images[:batch])  # warm-up: this batch shape's first run
    for _ in range(rounds):
        for name, predict in runners.items():
            started, i = time.perf_counter(), 0
            while True:
                start = (i * batch) % max(len(images) - batch + 1, 1)
                predict(images[start : start + batch])
                done[name] += batch
                i += 1
                if time.perf_counter() - started >= seconds / rounds and i >= 2:
                    break
            spent[name] += time.perf_counter() - started
    return {name: done[name] / spent[name] for name in runners}


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {
        p.key.removeprefix("deepclust."): p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
    }


def main(argv: list[str] | None = None) -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # before torch allocates anything
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[ROOT / "model_store" / "cifar10-lite0", ROOT / "model_store" / "cifar10-lite0-lite2"],
        help="store folders; each gives an FP32 row and (when it has one) an INT8 row per batch",
    )
    parser.add_argument("--run", type=Path, help="training run of the first model: adds torch eager rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--images", type=int, default=512, help="real test images used (and for agreement)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seconds", type=float, default=6.0, help="per variant and batch, split into the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="alternating slices per batch (variants interleaved)")
    parser.add_argument("--providers", nargs="+", default=["cpu"], help="onnxruntime providers of the ONNX rows")
    parser.add_argument(
        "--int8-candidate",
        type=Path,
        help="an INT8 graph that is not in the store (e.g. one the export gate refused), measured as the first "
        "model's INT8 row and labelled as such",
    )
    parser.add_argument(
        "--fp32-baseline",
        type=Path,
        nargs="+",
        default=[],
        help="earlier FP32 files of the models, in the order of --models (e.g. from before a change of the export's "
        "graph), each measured beside its model's current one and labelled as such",
    )
    parser.add_argument("--out", default="engine", help="results file: benchmarks/results/<out>.json")
    args = parser.parse_args(argv)

    import torch

    from serving.core.contract import ModelCard
    from serving.core.engine import Engine
    from training.data.datasets import create_dataset
    from training.export import uint8_images

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    peaks_before = ort_matmul_peaks(args.threads)
    print(json.dumps({"peaks_before": peaks_before}), flush=True)
    rows: list[dict] = []
    for position, folder in enumerate(args.models):
        files = {"ort_fp32": folder / "model.onnx", "ort_int8": folder / "model.int8.onnx"}
        notes: dict[str, str] = {}
        if position == 0 and args.int8_candidate is not None:
            files["ort_int8"] = _with_store_metadata(args.int8_candidate, files["ort_fp32"])
            notes["ort_int8"] = f"candidate {args.int8_candidate.name}, not in the store"
        if position < len(args.fp32_baseline):
            files["ort_fp32_baseline"] = args.fp32_baseline[position]
            notes["ort_fp32_baseline"] = f"baseline {args.fp32_baseline[position]}"
        meta = _metadata(files["ort_fp32"])
        metrics = json.loads(meta["metrics"])
        size = int(meta["input_size"])
        data = create_dataset(metrics["dataset"], metrics["split"])
        index = np.random.default_rng(0).choice(len(data), size=min(args.images, len(data)), replace=False)
        images = uint8_images(data, size, np.sort(index))
        card = ModelCard.load(folder)
        runners, provider_of = {}, {}
        for name, path in files.items():
            if path.exists():
                engine = Engine(path, providers=args.providers, intra_op_threads=args.threads, max_batch=256)
                runners[name] = lambda batch, engine=engine: engine.run(batch).probabilities
                provider_of[name] = engine.provider
        if position == 0 and args.run is not None:
            from training.export import ServingGraph
            from training.trainer import load_checkpoint, resolve_checkpoint

            model, _, _ = load_checkpoint(resolve_checkpoint(args.run))
            graph = ServingGraph(model).eval()

            def eager(batch: np.ndarray, graph=graph) -> np.ndarray:
                with torch.inference_mode():
                    return graph(torch.from_numpy(batch))[0].numpy()

            runners, provider_of["torch_eager"] = {"torch_eager": eager, **runners}, "torch CPU"
        reference = np.concatenate([runners["ort_fp32"](images[i : i + 64]) for i in range(0, len(images), 64)])
        agreement = {
            name: float(
                (np.concatenate([f(images[i : i + 64]) for i in range(0, len(images), 64)]).argmax(1)
                 == reference.argmax(1)).mean()
            )
            for name, f in runners.items()
        }  # fmt: skip
        gflop = graph_gflops(files["ort_fp32"])
        shares = {"ort_fp32": 0.0, "ort_fp32_baseline": 0.0, "torch_eager": 0.0}
        if "ort_int8" in runners:
            shares["ort_int8"] = int8_share(files["ort_int8"])
        entry = card.files.get("model.int8.onnx")
        gate = {"ort_int8": entry.agreement_vs_fp32 if entry is not None and "ort_int8" not in notes else None}
        for batch in args.batches:
            speed = interleaved_throughput(runners, images, batch, args.seconds, args.rounds)
            for name, ips in speed.items():
                rate = ips * gflop
                row = {
                    "model": folder.name,
                    "runtime": name,
                    "batch": batch,
                    "images_per_s": round(ips, 1),
                    "vs_fp32": round(ips / speed["ort_fp32"], 2),
                    "agreement_vs_fp32": round(agreement[name], 4),
                    "agreement_vs_fp32_eval_set": gate.get(name, 1.0 if name == "ort_fp32" else None),
                    "gflop_per_image": round(gflop, 4),
                    "gflops_per_s": round(rate, 1),
                    "int8_share_of_macs": round(shares[name], 3),
                    "provider": provider_of[name],
                    "threads": args.threads,
                    "rounds": args.rounds,
                    "seconds": args.seconds,
                }
                if name in notes:
                    row["note"] = notes[name]
                rows.append({**row, **provenance()})
                print(json.dumps(rows[-1]), flush=True)
    # The peaks, measured before and after the models (the machine is shared): their mean is the reference.
    peaks_after = ort_matmul_peaks(args.threads)
    peak_torch = matmul_peak_gflops(args.threads)
    peaks = {k: (peaks_before[k] + peaks_after[k]) / 2 for k in peaks_before}
    print(json.dumps({"peaks_after": peaks_after, "peak_fp32_torch": peak_torch}), flush=True)
    command = "python benchmarks/engine.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load = f"1-minute load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    for r in rows:
        rate = r["gflops_per_s"]
        r.update(
            peak_fp32_gflops_ort_matmul=round(peaks["fp32"], 1),
            peak_int8_gops_ort_matmul=round(peaks["int8"], 1),
            peak_fp32_gflops_torch_matmul=round(peak_torch, 1),
            peaks_before_after={k: [round(peaks_before[k], 1), round(peaks_after[k], 1)] for k in peaks},
            share_of_fp32_peak=round(rate / peaks["fp32"], 3),
            share_of_int8_peak=round(rate / peaks["int8"], 3),
            command=command,
            load=load,
        )
    write_rows(args.out, rows)
    print_table(
        rows,
        ["model", "runtime", "batch", "images_per_s", "vs_fp32", "agreement_vs_fp32", "gflops_per_s",
         "share_of_fp32_peak", "share_of_int8_peak"],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
