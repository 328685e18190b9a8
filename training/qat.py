"""Quantisation-aware fine-tuning of a served graph's INT8 variant: the FP32 graph's weights trained, with the INT8
arithmetic simulated, to give the FP32 graph's clusters.

Post-training calibration leaves the all-INT8 EfficientNet-Lite graphs at 95-96 % argmax agreement with FP32: the
error is rounding noise added layer by layer (`benchmarks/int8_limits.py`), which only the weights can learn to
absorb. So the QDQ graph that `training.quantize` builds is run in torch as it is (`FakeQuantGraph`): every
QuantizeLinear -> DequantizeLinear pair of an activation becomes a fake quantizer with the calibrated scale and zero
point (straight-through gradient inside the range, none outside), every quantized Conv weight is re-quantized per
output channel (symmetric int8, onnxruntime's rule) from a float copy that is trained, with its bias; the nodes
that stay float (the head) keep their weights. The loss distils the FP32 graph (the teacher, on onnxruntime): KL
divergence of the cluster probabilities plus the embedding's relative squared error. The trained float weights are
then written into the FP32 graph (`FakeQuantGraph.write`), and that graph is quantized by the usual rule (a Conv it
keeps float takes its FP32 weights back), its gate still measured against the *original* FP32 graph: the served
FP32 file, and so the model's accuracy, are not changed.

No labels anywhere: the images are training images, the targets the FP32 graph's own outputs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from training.defaults import FINE_TUNE_EPOCHS

log = logging.getLogger("deepclust.quantize")

INT8_WEIGHT_MAX = 127  # onnxruntime's symmetric int8 weights use [-127, 127]
PROBABILITIES, EMBEDDING = "probabilities", "embedding"  # the served graphs' output names
SUPPORTED_OPS = {
    *("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Transpose", "Cast", "Add", "Sub", "Mul", "Div"),
    *("ReduceMean", "Relu", "Clip", "Softmax", "ArgMax", "ReduceL2", "Max", "Concat"),
    *("GlobalAveragePool", "MaxPool", "Flatten", "ReduceSum", "Sqrt", "Pow", "Sigmoid", "Identity", "Reshape"),
    *("Constant", "Shape", "Expand", "Split", "Unsqueeze"),
}


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Quantize and dequantize (round half to even, as QuantizeLinear); the gradient passes where `x` is inside the
    representable range and is zero where it was clipped."""
    level = torch.round(x / scale) + zero  # ONNX QuantizeLinear: round(x / scale) + zero point
    quantized = (torch.clamp(level, low, high) - zero) * scale
    inside = (level >= low) & (level <= high)
    return torch.where(inside, x + (quantized - x).detach(), quantized.detach())


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8, the scale taken from the current weights as onnxruntime will."""
    absmax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True).clamp_min(1e-12)
    scale = absmax / INT8_WEIGHT_MAX
    return weight + (torch.round(weight / scale).clamp(-INT8_WEIGHT_MAX, INT8_WEIGHT_MAX) * scale - weight).detach()


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _dequantize(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray:
    value = constants[node.input[0]].astype(np.float32)
    scale = constants[node.input[1]].astype(np.float32)
    zero = constants[node.input[2]].astype(np.float32) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    if scale.ndim == 1 and scale.size > 1:  # per channel, along `axis`
        shape = [1] * value.ndim
        shape[int(_attributes(node).get("axis", 1))] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((value - zero) * scale).astype(np.float32)


def _range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


class FakeQuantGraph(torch.nn.Module):
    """The QDQ graph `qdq` run in torch with its quantization simulated, the weights trainable float copies taken
    from `float_graph` (the graph `qdq` was quantized from: same node names). Supports the operators of the served
    graphs (Conv, residual Add, global mean, Gemm head, Softmax, and the pre-processing's Transpose/Cast/Sub/Div)."""

    def __init__(self, qdq: onnx.ModelProto, float_graph: onnx.ModelProto) -> None:
        super().__init__()
        self.nodes = list(qdq.graph.node)
        unknown = sorted({n.op_type for n in self.nodes} - SUPPORTED_OPS)
        if unknown:
            raise NotImplementedError(f"quantisation-aware fine-tuning does not know the operators {unknown}")
        self.input_name = qdq.graph.input[0].name
        constants = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
        float_init = {i.name: numpy_helper.to_array(i) for i in float_graph.graph.initializer}
        float_nodes = {n.name: n for n in float_graph.graph.node}
        producer = {o: n for n in self.nodes for o in n.output}
        self.params = torch.nn.ParameterDict()
        self._param_key: dict[str, str] = {}  # float-graph initializer name -> parameter key
        self._inputs: dict[str, list[str | None]] = {}  # node name -> tensor names, weights resolved to parameters
        self._quantized_weight: set[str] = set()
        self._buffers_by_name: dict[str, torch.Tensor] = {}

        def parameter(name: str, train: bool) -> str:
            if name not in self._param_key:
                key = f"p{len(self._param_key)}"
                value = torch.from_numpy(float_init[name].astype(np.float32))
                self.params[key] = torch.nn.Parameter(value, requires_grad=train)
                self._param_key[name] = key
            return self._param_key[name]

        for node in self.nodes:
            if node.op_type in {"Conv", "Gemm"}:
                original = float_nodes[node.name]
                source = producer.get(node.input[1])
                if source is not None and source.op_type == "DequantizeLinear" and source.input[0] in constants:
                    self._quantized_weight.add(node.name)
                # Only the quantized Convs learn: a node that stays float (the head) keeps the FP32 function.
                train = node.name in self._quantized_weight
                names: list[str | None] = [node.input[0]]
                names += [f"param:{parameter(n, train)}" for n in original.input[1:3] if n]
                self._inputs[node.name] = names
        for name, value in constants.items():
            self._buffers_by_name[name] = torch.from_numpy(np.array(value))
        for node in self.nodes:  # quantized constants read by other operators (a Conv reads its float copy)
            if node.op_type == "DequantizeLinear" and node.input[0] in constants:
                self._buffers_by_name[node.output[0]] = torch.from_numpy(_dequantize(node, constants))
        # Read once here, not on every training step: each node's attributes, each QuantizeLinear's integer range.
        self._attributes = [_attributes(node) for node in self.nodes]
        self._int_range = {
            n.name: _range(constants[n.input[2]].dtype) for n in self.nodes if n.op_type == "QuantizeLinear"
        }

    def _value(self, name: str, env: dict[str, torch.Tensor]) -> torch.Tensor:
        if name.startswith("param:"):
            return self.params[name.removeprefix("param:")]
        if name in env:
            return env[name]
        return self._buffers_by_name[name]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All tensors of the graph by name (`probabilities` and `embedding` among them)."""
        env: dict[str, torch.Tensor] = {self.input_name: images}
        for node, attrs in zip(self.nodes, self._attributes, strict=True):
            op = node.op_type
            if op == "DequantizeLinear":
                if node.input[0] in env:  # an activation: its QuantizeLinear already gave the dequantized value
                    env[node.output[0]] = env[node.input[0]]
                continue  # a weight or bias: the Conv reads its trainable float copy
            if op == "QuantizeLinear":
                scale, zero = self._buffers_by_name[node.input[1]], self._buffers_by_name[node.input[2]]
                low, high = self._int_range[node.name]
                env[node.output[0]] = fake_quantize(env[node.input[0]], scale.float(), zero.float(), low, high)
                continue
            if op in {"Conv", "Gemm"}:
                x, *weights = (self._value(n, env) for n in self._inputs[node.name])
                weight, bias = weights[0], (weights[1] if len(weights) > 1 else None)
                if op == "Conv":
                    if node.name in self._quantized_weight:
                        weight = fake_quantize_weight(weight)
                    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
                    if (top, left) != (bottom, right):
                        x, padding = F.pad(x, (left, right, top, bottom)), 0
                    else:
                        padding = (top, left)
                    env[node.output[0]] = F.conv2d(
                        x,
                        weight,
                        bias,
                        stride=attrs.get("strides", 1),
                        padding=padding,
                        dilation=attrs.get("dilations", 1),
                        groups=attrs.get("group", 1),
                    )
                else:
                    x = x.t() if attrs.get("transA", 0) else x
                    weight = weight.t() if attrs.get("transB", 0) else weight
                    out = attrs.get("alpha", 1.0) * (x @ weight)
                    env[node.output[0]] = out if bias is None else out + attrs.get("beta", 1.0) * bias
                continue
            args = [self._value(n, env) if n else None for n in node.input]
            result = self._run(op, attrs, args)
            for name, value in zip(node.output, result if isinstance(result, tuple) else (result,), strict=True):
                env[name] = value
        return env

    @staticmethod
    def _run(
        op: str, attrs: dict[str, object], args: list[torch.Tensor | None]
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if op == "Transpose":
            return args[0].permute(*attrs["perm"])
        if op == "Cast":
            return args[0].float()
        if op in {"Add", "Sub", "Mul", "Div"}:
            a, b = args
            return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](a, b)
        if op == "ReduceMean":
            axes = attrs.get("axes") or args[1].tolist()
            return args[0].mean(dim=tuple(axes), keepdim=bool(attrs.get("keepdims", 1)))
        if op == "Relu":
            return F.relu(args[0])
        if op == "Clip":
            return torch.clamp(args[0], args[1], args[2])
        if op == "Softmax":
            return torch.softmax(args[0], dim=attrs.get("axis", -1))
        if op == "ArgMax":
            return args[0].argmax(dim=attrs.get("axis", 0))
        if op == "ReduceSum":
            axes = attrs.get("axes") or (args[1].tolist() if len(args) > 1 and args[1] is not None else None)
            keep = bool(attrs.get("keepdims", 1))
            return args[0].sum(dim=tuple(axes), keepdim=keep) if axes else args[0].sum()
        if op == "Shape":
            return torch.tensor(args[0].shape[attrs.get("start", 0) : attrs.get("end")], dtype=torch.int64)
        if op == "Expand":  # ONNX broadcasts both ways
            shape = torch.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1].tolist()))
            return torch.broadcast_to(args[0], shape)
        if op == "Split":
            sizes = attrs.get("split") or (args[1].tolist() if len(args) > 1 and args[1] is not None else None)
            axis = attrs.get("axis", 0)
            if sizes is None:
                sizes = args[0].shape[axis] // attrs["num_outputs"]
            return tuple(torch.split(args[0], sizes, dim=axis))
        if op == "Unsqueeze":
            axes = attrs.get("axes") or args[1].tolist()
            rank = args[0].ndim + len(axes)
            out = args[0]
            for axis in sorted(a % rank for a in axes):
                out = out.unsqueeze(axis)
            return out
        if op == "Constant":
            return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
        if op == "Sqrt":
            return torch.sqrt(args[0])
        if op == "Pow":
            return torch.pow(args[0], args[1])
        if op == "Sigmoid":
            return torch.sigmoid(args[0])
        if op == "Identity":
            return args[0]
        if op == "Reshape":
            shape = [int(d) for d in args[1].tolist()]
            shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]  # ONNX: 0 copies the dim
            return args[0].reshape(shape)
        if op == "ReduceL2":
            axes = attrs.get("axes") or args[1].tolist()
            return args[0].norm(dim=tuple(axes), keepdim=bool(attrs.get("keepdims", 1)))
        if op == "Max":
            return torch.maximum(args[0], args[1])
        if op == "Concat":
            return torch.cat(args, dim=attrs["axis"])
        if op == "GlobalAveragePool":
            return args[0].mean(dim=(2, 3), keepdim=True)
        if op == "Flatten":
            return args[0].flatten(start_dim=attrs.get("axis", 1))
        if op == "MaxPool":
            top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
            x = F.pad(args[0], (left, right, top, bottom), value=float("-inf"))
            return F.max_pool2d(
                x, attrs["kernel_shape"], attrs.get("strides", 1), ceil_mode=bool(attrs.get("ceil_mode", 0))
            )
        raise NotImplementedError(f"quantisation-aware fine-tuning does not know the operator {op}")

    def write(self, float_graph: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `float_graph` with the trained weights."""
        out = onnx.ModelProto()
        out.CopyFrom(float_graph)
        for initializer in out.graph.initializer:
            if initializer.name in self._param_key:
                value = self.params[self._param_key[initializer.name]].detach().numpy()
                initializer.CopyFrom(numpy_helper.from_array(value.astype(np.float32), initializer.name))
        return out


@dataclass
class FineTune:
    """Quantisation-aware fine-tuning settings: training images (uint8 NHWC, label-free) and the schedule. Adam's
    step is about `lr` per weight whatever the weight's size, and the folded pointwise weights are ~1e-3: in trial
    runs on cifar10-lite0, 3e-5 raised the loss and 1e-5 jumped part-way through 1,000 steps, while 5e-6 fell
    smoothly (benchmarks/int8_fine_tune.py)."""

    images: np.ndarray
    epochs: int = FINE_TUNE_EPOCHS
    lr: float = 5e-6
    batch: int = 32
    seed: int = 0


@dataclass
class DistillReport:
    steps: int
    images: int
    seconds: float
    # The loss on the first `PROBE_IMAGES` tuning images (no gradient) before and after: the training's effect,
    # without the noise of per-batch losses.
    loss_before: float
    loss_after: float

    def record(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "images": self.images,
            "seconds": round(self.seconds, 1),
            "probe_loss_before_after": [round(self.loss_before, 5), round(self.loss_after, 5)],
        }


PROBE_IMAGES = 256


class _Distillation:
    """The loss: KL(teacher || student) on the cluster probabilities, plus the embedding's squared error relative
    to the teacher embedding's mean squared norm (when the graph has an embedding)."""

    def __init__(self, probabilities: np.ndarray, embedding: np.ndarray | None) -> None:
        self.probabilities = torch.from_numpy(probabilities).float()
        self.embedding = None if embedding is None else torch.from_numpy(embedding).float()
        self.scale = 1.0 if self.embedding is None else float((self.embedding**2).sum(1).mean()) or 1.0

    def __call__(self, out: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        target = self.probabilities[index]
        loss = (target * (target.clamp_min(1e-8).log() - out[PROBABILITIES].clamp_min(1e-8).log())).sum(1).mean()
        if self.embedding is not None:
            loss = loss + ((out[EMBEDDING] - self.embedding[index]) ** 2).sum(1).mean() / self.scale
        return loss

    @torch.no_grad()
    def probe(self, student: FakeQuantGraph, images: np.ndarray, batch: int) -> float:
        """The mean loss on the first `PROBE_IMAGES` images."""
        count = min(len(images), PROBE_IMAGES)
        total = 0.0
        for first in range(0, count, batch):
            index = torch.arange(first, min(first + batch, count))
            total += float(self(student(torch.from_numpy(images[index.numpy()])), index)) * len(index)
        return total / max(count, 1)


def distill(
    student: FakeQuantGraph,
    settings: FineTune,
    teacher_probabilities: np.ndarray,
    teacher_embedding: np.ndarray | None = None,
) -> DistillReport:
    """Train `student` (in place) to reproduce the teacher's outputs on `settings.images` under its simulated
    quantization (`_Distillation`). Adam, cosine-decayed learning rate; the images as the teacher saw them (the
    targets are per image, so no augmentation)."""
    from tqdm import tqdm

    images, batch = settings.images, settings.batch
    loss_of = _Distillation(teacher_probabilities, teacher_embedding)
    before = loss_of.probe(student, images, batch)
    generator = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * (len(images) // batch)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    recent: list[float] = []
    done = 0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="int8 fine-tune", unit="step", leave=False)
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(order) - batch + 1, batch):
            index = order[first : first + batch]
            loss = loss_of(student(torch.from_numpy(images[index.numpy()])), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recent = [*recent[-19:], float(loss.detach())]
            done += 1
            bar.update()
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    report = DistillReport(done, len(images), seconds, before, loss_of.probe(student, images, batch))
    log.info(json.dumps({"event": "int8_fine_tuned", **report.record()}))
    return report
