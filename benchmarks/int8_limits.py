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
- `+retrained-head`: the head's linear layers fine-tuned on the MinMax INT8 embeddings of the fitting images to the
  FP32 graph's probabilities (KL, full-batch Adam from the FP32 head), the learning rate and the step count chosen
  on the held-out part as above: the head trained under the INT8 arithmetic of the backbones.

Agreement (argmax, against the FP32 file) on `--test-images` images of the evaluation split; the embedding's error
relative to its norm, and the share of that error that is a constant shift. Label-free throughout.
Writes benchmarks/results/int8_limits.json (rows keyed by model and variant).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, provenance, write_rows  # noqa: E402
from training.defaults import CALIBRATION_IMAGES  # noqa: E402

OUTPUTS = ["embedding", "probabilities"]


def run_graph(path: Path, images: np.ndarray, threads: int, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The graph's embedding and probabilities for uint8 images."""
    from serving.core.engine import cpu_session

    session = cpu_session(path, threads)
    parts = [session.run(OUTPUTS, {"images": images[i : i + batch]}) for i in range(0, len(images), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def head_session(fp32: Path, workdir: Path, threads: int):  # noqa: ANN201
    """The FP32 graph from `embedding` to `probabilities`: the head a corrected embedding is fed to."""
    import onnx.utils

    from serving.core.engine import cpu_session

    path = workdir / "head.onnx"
    onnx.utils.extract_model(str(fp32), str(path), ["embedding"], ["probabilities"])
    return cpu_session(path, threads)


class TorchHead:
    """The FP32 graph's head (`embedding` -> `probabilities`) run in torch, its Gemm/MatMul weights and biases
    trainable: the head fine-tuned under the INT8 embedding. Covers the operators a cluster head exports to (linear
    layers, normalisation, softmax, averaging over heads); any other operator is refused by name."""

    def __init__(self, head_graph: Path) -> None:
        import onnx
        import torch
        from onnx import numpy_helper

        graph = onnx.load(str(head_graph)).graph
        self.nodes = list(graph.node)
        self.values = {i.name: torch.tensor(numpy_helper.to_array(i).copy()) for i in graph.initializer}
        linear = {n.input[k] for n in self.nodes if n.op_type in ("Gemm", "MatMul") for k in (1, 2) if k < len(n.input)}
        names = sorted(linear & self.values.keys())
        for name in names:
            self.values[name] = self.values[name].float().requires_grad_()
        self.parameters = [self.values[name] for name in names]
        self.initial = [t.detach().clone() for t in self.parameters]

    def reset(self) -> None:
        import torch

        with torch.no_grad():
            for tensor, start in zip(self.parameters, self.initial, strict=True):
                tensor.copy_(start)

    def __call__(self, embedding):  # noqa: ANN001, ANN204 - torch tensors in and out
        import torch

        env = {**self.values, "embedding": embedding}
        for node in self.nodes:
            attrs = {a.name: onnx_attribute(a) for a in node.attribute}
            x = [env[i] for i in node.input if i]
            op = node.op_type
            if op == "Constant":
                out = [torch.tensor(np.array(attrs["value"] if "value" in attrs else attrs["value_ints"]).copy())]
            elif op == "Split":
                sizes = x[1].tolist() if len(x) > 1 else attrs["split"]
                out = list(torch.split(x[0], sizes, dim=attrs.get("axis", 0)))
            elif op in ("Sub", "Div", "Add", "Mul"):
                out = [getattr(torch, op.lower())(x[0], x[1])]
            elif op == "Gemm":
                a = x[0].T if attrs.get("transA") else x[0]
                b = x[1].T if attrs.get("transB") else x[1]
                y = attrs.get("alpha", 1.0) * a @ b
                out = [y + attrs.get("beta", 1.0) * x[2] if len(x) > 2 else y]
            elif op == "MatMul":
                out = [x[0] @ x[1]]
            elif op == "Softmax":
                out = [torch.softmax(x[0], attrs.get("axis", -1))]
            elif op == "Unsqueeze":
                out = [x[0]]
                for axis in sorted(x[1].tolist() if len(x) > 1 else attrs["axes"]):
                    out = [out[0].unsqueeze(axis)]
            elif op == "Concat":
                out = [torch.cat(x, attrs["axis"])]
            elif op == "ReduceMean":
                axes = x[1].tolist() if len(x) > 1 else attrs["axes"]
                out = [x[0].mean(dim=axes, keepdim=bool(attrs.get("keepdims", 1)))]
            elif op == "Identity":
                out = [x[0]]
            else:
                raise NotImplementedError(f"head operator {op} ({node.name})")
            env.update(zip(node.output, out, strict=False))
        return env["probabilities"]


def onnx_attribute(attribute):  # noqa: ANN001, ANN201
    """An ONNX attribute's value; a tensor as a numpy array."""
    import onnx
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attribute)
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def retrained_head_probabilities(
    head: TorchHead, q_train: np.ndarray, p_train: np.ndarray, q_eval: np.ndarray, lr: float, steps: int
) -> np.ndarray:
    """The head's probabilities on `q_eval` after `steps` full-batch Adam steps fitting its outputs on the INT8
    embeddings `q_train` to the FP32 graph's probabilities `p_train` (KL; no labels)."""
    import torch

    head.reset()
    optimizer = torch.optim.Adam(head.parameters, lr=lr)
    q, target = torch.from_numpy(q_train).float(), torch.from_numpy(p_train).float()
    for _ in range(steps):
        loss = torch.nn.functional.kl_div(head(q).clamp_min(1e-8).log(), target, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head(torch.from_numpy(q_eval).float()).numpy()


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
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, help="MinMax, as the export")
    parser.add_argument("--percentile-images", type=int, default=64)
    parser.add_argument("--fit-images", type=int, default=6000, help="training images the corrections are fit on")
    parser.add_argument("--test-images", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from training.data.datasets import create_dataset
    from training.export import uint8_images
    from training.quantize import Quantizer, agreement
    from training.requantize import store_facts

    fp32 = args.model / "model.onnx"
    _, metrics, size = store_facts(args.model)
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
        torch_head = TorchHead(work / "head.onnx")
        tries = {
            (lr, steps): agreement(
                p_fit[split:],
                retrained_head_probabilities(torch_head, q_fit[:split], p_fit[:split], q_fit[split:], lr, steps),
            )
            for lr in (1e-4, 1e-3)
            for steps in (30, 100, 300)
        }
        lr, steps = max(tries, key=tries.get)
        rows.append(
            {
                **base,
                "variant": "all-int8-minmax+retrained-head",
                "lr": lr,
                "steps": steps,
                "held_out_fit_agreement": {f"lr={k[0]},steps={k[1]}": v for k, v in tries.items()},
                "agreement": agreement(
                    p_test, retrained_head_probabilities(torch_head, q_fit, p_fit, q_test, lr, steps)
                ),
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
