"""Static INT8 of a served graph: which nodes stay float is chosen by measured sensitivity, not by position.

`quantize_int8` (called by `training.export`, and by `python -m training.requantize <store folder>` to re-quantize a
store model from its FP32 file) does, label-free and for any model:

1. prepare the FP32 graph: TF-"SAME" pad amounts folded to constants (so Pad fuses into Conv and no shape arithmetic
   is quantized), per-channel constants whose values are all equal (the 0.5 mean/std of the input normalisation)
   turned into scalars (a [1,3,1,1] broadcast over an NHWC tensor ran at a few hundred MFLOP/s after onnxruntime's
   layout change: 25 % of the all-INT8 run time), onnxruntime's pre-processing, a bias of its own per Conv, a name
   per node;
2. calibrate the activation ranges (MinMax on training images), quantize every Conv (QDQ, per-channel int8 weights,
   uint8 activations), correct each Conv's bias for its weight rounding, calibrate again; the ranges are cached and
   reused for every candidate graph;
3. measure each quantized node's *sensitivity* (each Conv, and each residual Add, whose sum is quantized too) on
   held-out training images the calibration never saw: the graph with only that node quantized, its output error
   against FP32 (mean squared error of the probabilities, relative to their spread) — the error the network carries
   from that node to the clusters, amplification included;
4. keep in float the nodes with the highest sensitivity per unit of work saved (a Conv's multiply-adds, an Add's
   output elements), adding them in that order until the argmax agreement with FP32 on the held-out images clears
   the gate with a margin (a candidate stops being evaluated as soon as it cannot reach it). Float Convs fed by a
   DequantizeLinear get a no-op Clip so that onnxruntime does not re-quantize them (per tensor) at load.

With `fine_tune` (`deepclust export --int8-fine-tune-images N`, `python -m training.requantize --fine-tune-images
N`), the weights are first trained under the all-INT8 graph's simulated arithmetic to give the FP32 graph's outputs
(`training.qat`, `fine_tuned`), and steps 3-4 then run on that graph, with the ranges it was trained under and no
bias correction (its biases were trained); the agreement is still with the original FP32 graph.

The evaluation set is never used here: the export measures its 99 % gate on it afterwards. Measured on the store
models (README, engine section): the quantization error of these EfficientNet-Lite graphs is spread over all layers,
so the gate keeps most of the arithmetic float (74 % on cifar10-lite0) and INT8 is no faster than the FP32 graph with
its pads folded (0.92-1.04x); fine-tuning raised the all-INT8 agreement of cifar10-lite0 from .953 to .971 but left
the same float set (README).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from serving.core.engine import cpu_session
from training.onnx_graph import fold_pads, intermediate_session
from training.qat import DistillReport, FakeQuantGraph, FineTune, distill

log = logging.getLogger("deepclust.quantize")

INPUT_NAME = "images"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
CALIBRATION_STRIDE = 4  # batches per collection round (MinMax keeps only per-batch min/max: flat memory)
# Ops of the head and of the outputs stay float: small, and they decide the cluster.
FLOAT_OP_TYPES = {"Gemm", "MatMul", "Softmax", "ArgMax"}
# Single-node sensitivity runs: this many image-runs in all, split over the quantized nodes (each gets 32 to 256
# held-out images), so a graph with two backbones costs about what one does.
SENSITIVITY_BUDGET = 8192


def probabilities(sess: ort.InferenceSession, images: np.ndarray, batch: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    output = PROBABILITIES if PROBABILITIES in {o.name for o in sess.get_outputs()} else sess.get_outputs()[0].name
    return np.concatenate(
        [sess.run([output], {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    ).reshape(len(images), -1)


def agreement(reference: np.ndarray, other: np.ndarray) -> float:
    return float((reference.argmax(1) == other.argmax(1)).mean())


# ---------------------------------------------------------------------------------------------------- preparation
def shape_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes fed only by Shape or constants (shape/pad arithmetic done in float), never by image data."""
    initializers = {i.name for i in graph.initializer}
    data, found = {i.name for i in graph.input if i.name not in initializers}, []
    for node in graph.node:  # topologically sorted
        if node.op_type != "Shape" and any(i in data for i in node.input):
            data.update(node.output)
        else:
            found.append(node.name)
    return found


def scalar_constants(path: Path) -> int:
    """Give the elementwise Add/Sub/Mul/Div a scalar constant operand where theirs has all values equal and the other
    operand already has the full output shape (the result is bit-identical). Returns how many were replaced."""
    proto = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.input]
        if v.type.tensor_type.HasField("shape")
    }
    init = {i.name: i for i in proto.graph.initializer}
    replaced = 0
    for node in proto.graph.node:
        if node.op_type not in {"Add", "Sub", "Mul", "Div"} or len(node.input) != 2:
            continue
        for side in (0, 1):
            const, other = node.input[side], node.input[1 - side]
            if const not in init or other not in shapes:
                continue
            value = onnx.numpy_helper.to_array(init[const])
            flat = value.reshape(-1)
            other_shape = shapes[other]
            if flat.size < 2 or not (flat == flat[0]).all() or value.ndim > len(other_shape):
                continue
            aligned = other_shape[len(other_shape) - value.ndim :]
            if any(c not in (1, o) for c, o in zip(value.shape, aligned, strict=True)):
                continue  # the constant would broadcast the other operand up: not a no-op
            name = f"{const}_scalar"
            if name not in init:
                init[name] = onnx.numpy_helper.from_array(np.asarray(flat[0], dtype=value.dtype), name)
                proto.graph.initializer.append(init[name])
            node.input[side] = name
            replaced += 1
    _drop_unused_initializers(proto)
    onnx.save(proto, str(path))
    return replaced


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {name for node in proto.graph.node for name in node.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def own_biases(path: Path) -> None:
    """A bias initializer of its own for every Conv (onnxruntime's pre-processing merges equal initializers, e.g. two
    zero biases, and bias correction then has to change one Conv's bias without touching the other's)."""
    proto = onnx.load(str(path))
    init = {i.name: i for i in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in init and users[node.input[2]] > 1:
            name = f"{node.name}_bias"
            proto.graph.initializer.append(
                onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init[node.input[2]]), name)
            )
            users[node.input[2]] -= 1
            node.input[2] = name
    onnx.save(proto, str(path))


def prepare(fp32_path: Path, dst: Path, sample: np.ndarray) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        fold_pads(fp32_path, folded, sample)
        quant_pre_process(str(folded), str(dst), skip_symbolic_shape=True)
    scalar_constants(dst)
    own_biases(dst)
    name_nodes(dst)
    return dst


def name_nodes(path: Path) -> None:
    """A unique name for every node (the quantizer includes and excludes nodes by name)."""
    proto = onnx.load(str(path))
    seen: set[str] = set()
    for index, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{index}"
        seen.add(node.name)
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------------- quantization
class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 batches, read in strides."""

    def __init__(self, images: np.ndarray, batch: int = 16, input_name: str = INPUT_NAME) -> None:
        self._batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self._range = (0, len(self._batches))
        self._next = 0
        self._name = input_name

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range, self._next = (start_index, min(end_index, len(self._batches))), start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._range[1]:
            return None
        self._next += 1
        return {self._name: self._batches[self._next - 1]}


def keep_float_convs_float(proto: onnx.ModelProto, float_convs: set[str]) -> int:
    """At session load onnxruntime re-quantizes a float Conv fed by a DequantizeLinear (its WeightBiasQuantization
    pass, with *per-tensor* weights: far worse than per-channel). A Clip to the DequantizeLinear's own representable
    range between the two (a no-op on its values) keeps such a Conv float. Returns how many were inserted."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    init = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    added, nodes = 0, []
    for node in proto.graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Conv" and node.name in float_convs else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[1] in init:
            scale = init[dq.input[1]].astype(np.float64)
            zero = init[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
            info = np.iinfo(init[dq.input[2]].dtype) if len(dq.input) > 2 and dq.input[2] else np.iinfo(np.int8)
            low, high = float(((info.min - zero) * scale).min()), float(((info.max - zero) * scale).max())
            name = f"{node.name}_float_input"
            bounds = [f"{name}_min", f"{name}_max"]
            proto.graph.initializer.extend(
                onnx.numpy_helper.from_array(np.asarray(v, np.float32), b)
                for v, b in zip((low, high), bounds, strict=True)
            )
            nodes.append(onnx.helper.make_node("Clip", [node.input[0], *bounds], [f"{name}_output"], name=name))
            node.input[0] = f"{name}_output"
            added += 1
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return added


@dataclass
class Quantizer:
    """A prepared FP32 graph, its calibration and its bias corrections: builds the INT8 graph for any set of float
    Convs in seconds (the calibration ranges are computed twice, once before and once after bias correction)."""

    fp32_path: Path
    calibration: np.ndarray
    workdir: Path
    convs: list[str] = field(default_factory=list)
    macs: dict[str, int] = field(default_factory=dict)
    # MinMax keeps flat memory (per-batch extremes); "Percentile" holds every activation of every calibration image
    # in memory first (256 images of the two-backbone model at 160 px went past 14 GB): for studies on few images.
    calibrate_method: str = "MinMax"
    # Activation ranges to use instead of calibrating (an onnxruntime calibration cache): a fine-tuned graph is
    # quantized with the ranges it was trained under.
    ranges: Path | None = None
    # Bias correction undoes the mean shift of weight rounding; a graph fine-tuned under that rounding has already
    # learnt its biases, so it is quantized without.
    bias_correction: bool = True
    # A graph with the same Conv names whose weights and biases the Convs kept float take: a fine-tuned graph's own
    # weights were trained to absorb a rounding that a float Conv does not do (in a trial run on cifar10-lite0,
    # keeping more of the fine-tuned graph float *lowered* its agreement with FP32).
    float_weights: Path | None = None

    def __post_init__(self) -> None:
        self.prepared = prepare(self.fp32_path, self.workdir / "prepared.onnx", self.calibration[:1])
        proto = onnx.load(str(self.prepared))
        self.input_name = proto.graph.input[0].name
        graph = proto.graph
        self.excluded = [n.name for n in graph.node if n.op_type in FLOAT_OP_TYPES] + shape_nodes(graph)
        self.convs = [n.name for n in graph.node if n.op_type == "Conv" and n.name not in self.excluded]
        self.macs = conv_macs(proto, self.calibration[:1])
        self.original_bias = {
            n.name: onnx.numpy_helper.to_array(i)
            for n in graph.node
            if n.op_type == "Conv" and len(n.input) > 2
            for i in graph.initializer
            if i.name == n.input[2]
        }
        self.corrected_bias: dict[str, np.ndarray] = {}
        if self.bias_correction:
            first = self.workdir / "calibration-0.json"
            everything = self.workdir / "all-0.onnx"
            self._quantize(self.prepared, everything, first, set())
            self.corrected_bias = bias_corrections(self.prepared, everything, self.calibration)
        self.corrected = self.workdir / "corrected.onnx"
        self._write_graph(self.corrected, set())
        self.cache = self.workdir / "calibration.json"
        if self.ranges is not None:
            shutil.copyfile(self.ranges, self.cache)
        self._quantize(self.corrected, self.workdir / "all.onnx", self.cache, set())  # recalibrated
        self.units = quantized_nodes(onnx.load(str(self.workdir / "all.onnx")), set(self.excluded))
        self.cost = {
            **output_sizes(proto, [u for u in self.units if u not in self.macs], self.calibration),
            **self.macs,
        }

    def _write_graph(self, out: Path, float_nodes: set[str]) -> None:
        """The graph to quantize: the prepared graph with corrected biases on the quantized Convs (float ones keep
        theirs), and the float Convs' weights and biases from `float_weights` when it is given."""
        proto = onnx.load(str(self.prepared))
        init = {i.name: i for i in proto.graph.initializer}
        for node in proto.graph.node:
            if node.name in self.corrected_bias and node.name not in float_nodes:
                init[node.input[2]].CopyFrom(
                    onnx.numpy_helper.from_array(self.corrected_bias[node.name], node.input[2])
                )
        if self.float_weights is not None and float_nodes:
            source = onnx.load(str(self.float_weights))
            source_init = {i.name: i for i in source.graph.initializer}
            source_nodes = {n.name: n for n in source.graph.node if n.op_type == "Conv"}
            for node in proto.graph.node:
                if node.op_type == "Conv" and node.name in float_nodes and node.name in source_nodes:
                    for mine, theirs in zip(node.input[1:], source_nodes[node.name].input[1:], strict=True):
                        init[mine].CopyFrom(
                            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(source_init[theirs]), mine)
                        )
        onnx.save(proto, str(out))

    def _quantize(self, model: Path, out: Path, cache: Path, float_nodes: set[str]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        reader = _Calibration(self.calibration, input_name=self.input_name)
        stride = max(d for d in range(1, CALIBRATION_STRIDE + 1) if len(reader) % d == 0)
        method = CalibrationMethod[self.calibrate_method]
        options = {"CalibStridedMinMax": stride} if method == CalibrationMethod.MinMax else {"CalibPercentile": 99.99}
        quantize_static(
            str(model),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=[*self.excluded, *sorted(float_nodes)],
            extra_options=options,
            calibration_cache_path=cache,
        )
        proto = onnx.load(str(out))
        keep_float_convs_float(proto, float_nodes | set(self.excluded))
        onnx.save(proto, str(out))

    def build(self, out: Path, float_nodes: set[str] | frozenset[str] = frozenset()) -> Path:
        """The INT8 graph with `float_nodes` kept in float (the rest quantized, bias-corrected)."""
        float_nodes = set(float_nodes)
        model = self.workdir / "biases.onnx"
        self._write_graph(model, float_nodes)
        self._quantize(model, out, self.cache, float_nodes)
        return out


def quantized_nodes(proto: onnx.ModelProto, excluded: set[str]) -> list[str]:
    """The nodes of a QDQ graph that compute on quantized activations (read a DequantizeLinear of an activation):
    the Convs, and the Adds of the residual connections, which quantize the sum. In graph order."""
    constants = {i.name for i in proto.graph.initializer}
    dequantized = {
        n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in constants
    }
    return [
        n.name
        for n in proto.graph.node
        if n.op_type not in {"QuantizeLinear", "DequantizeLinear"}
        and n.name not in excluded
        and any(i in dequantized for i in n.input)
    ]


def output_sizes(proto: onnx.ModelProto, names: list[str], sample: np.ndarray) -> dict[str, int]:
    """Elements per image of the first output of the named nodes (the work of a memory-bound node)."""
    nodes = [n for n in proto.graph.node if n.name in set(names)]
    if not nodes:
        return {}
    sess = intermediate_session(proto, [n.output[0] for n in nodes])
    outs = sess.run([n.output[0] for n in nodes], {proto.graph.input[0].name: sample[:1]})
    return {n.name: int(np.prod(out.shape[1:])) for n, out in zip(nodes, outs, strict=True)}


def conv_macs(proto: onnx.ModelProto, sample: np.ndarray) -> dict[str, int]:
    """Multiply-accumulates per image of each Conv (output elements x C_in/groups x kH x kW), shapes from one run."""
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    sess = intermediate_session(proto, [n.output[0] for n in convs])
    outs = sess.run([n.output[0] for n in convs], {proto.graph.input[0].name: sample[:1]})
    weights = {i.name: list(i.dims) for i in proto.graph.initializer}
    return {
        n.name: int(np.prod(out.shape[1:])) * int(np.prod(weights[n.input[1]][1:]))
        for n, out in zip(convs, outs, strict=True)
    }


def bias_corrections(
    prepared: Path, quantized: Path, calibration: np.ndarray, batch: int = 16
) -> dict[str, np.ndarray]:
    """Bias correction: each quantized Conv's bias minus E[conv(x, W_int8 - W)] over the calibration images (x the
    float activations), so weight rounding no longer shifts channel means. Per Conv and independent of the others."""
    proto, quant = onnx.load(str(prepared)), onnx.load(str(quantized))
    q_init = {i.name: onnx.numpy_helper.to_array(i) for i in quant.graph.initializer}
    producer = {o: n for n in quant.graph.node for o in n.output}
    delta: dict[str, np.ndarray] = {}
    for node in quant.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in q_init:
            w, scale = q_init[dq.input[0]].astype(np.float32), q_init[dq.input[1]].astype(np.float32)
            has_zero = len(dq.input) > 2 and dq.input[2]
            zero = q_init[dq.input[2]].astype(np.float32) if has_zero else np.zeros(1, np.float32)
            shape = (-1,) + (1,) * (w.ndim - 1)
            delta[node.name] = (w - zero.reshape(shape)) * scale.reshape(shape)
    init = {i.name: i for i in proto.graph.initializer}
    convs = [
        n
        for n in proto.graph.node
        if n.name in delta
        and len(n.input) > 2
        and delta[n.name].ndim == 4
        and all(a.name != "auto_pad" or a.s in (b"", b"NOTSET") for a in n.attribute)
    ]
    if not convs:
        return {}
    for conv in convs:
        delta[conv.name] -= onnx.numpy_helper.to_array(init[conv.input[1]])
    inputs = sorted({c.input[0] for c in convs})
    sess = intermediate_session(proto, inputs)
    shift = {c.name: np.zeros(delta[c.name].shape[0]) for c in convs}
    attributes = {c.name: {a.name: onnx.helper.get_attribute_value(a) for a in c.attribute} for c in convs}
    for start in range(0, len(calibration), batch):
        chunk = calibration[start : start + batch]
        acts = dict(zip(inputs, sess.run(inputs, {proto.graph.input[0].name: chunk}), strict=True))
        for conv in convs:
            attrs = attributes[conv.name]
            top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
            x = torch.nn.functional.pad(torch.from_numpy(acts[conv.input[0]]), (left, right, top, bottom))
            y = torch.nn.functional.conv2d(
                x,
                torch.from_numpy(delta[conv.name]),
                stride=attrs.get("strides", 1),
                dilation=attrs.get("dilations", 1),
                groups=attrs.get("group", 1),
            )
            shift[conv.name] += y.double().mean(dim=(2, 3)).sum(dim=0).numpy() / len(calibration)
    return {c.name: (onnx.numpy_helper.to_array(init[c.input[2]]) - shift[c.name]).astype(np.float32) for c in convs}


# ---------------------------------------------------------------------------------------------------- selection
def streamed_agreement(
    sess: ort.InferenceSession, images: np.ndarray, reference: np.ndarray, target: float, batch: int = 64
) -> tuple[float, int]:
    """Argmax agreement with `reference` on `images`, stopped as soon as more images disagree than `target` allows
    over all of them (the verdict is then certain: a failing graph costs a fraction of a full pass). Returns the
    agreement on the images run and how many were run."""
    allowed = int(np.floor((1.0 - target) * len(images) + 1e-9))
    wrong = seen = 0
    for start in range(0, len(images), batch):
        chunk = probabilities(sess, images[start : start + batch])
        wrong += int((chunk.argmax(1) != reference[start : start + batch].argmax(1)).sum())
        seen += len(chunk)
        if wrong > allowed:
            break
    return 1.0 - wrong / seen, seen


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean squared error of the probabilities relative to their spread over the images (0 = identical)."""
    spread = float(((reference - reference.mean(0)) ** 2).sum(1).mean()) or 1.0
    return float(((other - reference) ** 2).sum(1).mean()) / spread


def sensitivities(
    quantizer: Quantizer, images: np.ndarray, reference: np.ndarray, threads: int = 0
) -> dict[str, float]:
    """Per quantized node (`Quantizer.units`: each Conv, each residual Add): the output error of the graph in which
    only that node is quantized (for a Conv: weights, input, output), on `images` against the FP32 probabilities
    `reference`."""
    scores = {}
    probe = quantizer.workdir / "probe.onnx"
    for unit in quantizer.units:
        quantizer.build(probe, set(quantizer.units) - {unit})
        scores[unit] = relative_error(reference, probabilities(cpu_session(probe, threads), images))
        log.info(json.dumps({"event": "int8_sensitivity", "node": unit, "score": scores[unit]}))
    return scores


@dataclass
class Selection:
    float_nodes: list[str]
    held_out_agreement: float
    tried: list[dict[str, float]]
    scores: dict[str, float]
    sensitivity_images: int = 0

    def record(self, quantizer: Quantizer) -> dict[str, object]:
        total = sum(quantizer.macs[c] for c in quantizer.convs)
        kept = sum(quantizer.macs.get(c, 0) for c in self.float_nodes)
        convs = [c for c in self.float_nodes if c in quantizer.macs]
        return {
            "rule": "sensitivity",
            "float_convs": len(convs),
            "quantized_convs": len(quantizer.convs) - len(convs),
            "float_other_nodes": len(self.float_nodes) - len(convs),
            "float_share_of_conv_macs": round(kept / total, 4),
            "held_out_agreement": round(self.held_out_agreement, 6),
            "held_out_tries": [
                {"float_nodes": t["float_nodes"], "agreement": round(t["held_out_agreement"], 4), "images": t["images"]}
                for t in self.tried
            ],
            "sensitivity_images": self.sensitivity_images,
            "float": self.float_nodes,
        }


def select_float_nodes(
    quantizer: Quantizer,
    held_out: np.ndarray,
    reference: np.ndarray,
    target: float,
    *,
    sensitivity_images: int | None = None,
    threads: int = 0,
    on_try: Callable[[dict[str, float]], None] | None = None,
) -> Selection:
    """A cheap set of float nodes whose INT8 graph agrees with FP32 on `held_out` at >= `target`.

    The quantized nodes are ranked by sensitivity (on the first `sensitivity_images` held-out images) per unit of work
    kept in float (a Conv's multiply-adds; an Add's output elements), and the first k of that ranking are kept float
    for k = 0, 2, 4, 8, 12, 16, 24, ... until the agreement on all the held-out images reaches `target`; then the
    smallest k in the last gap that also reaches it is searched. At least one Conv stays quantized."""
    if sensitivity_images is None:
        sensitivity_images = int(np.clip(SENSITIVITY_BUDGET // max(len(quantizer.units), 1), 32, 256))
    scores = sensitivities(quantizer, held_out[:sensitivity_images], reference[:sensitivity_images], threads)
    ranking = sorted(quantizer.units, key=lambda c: -scores[c] / max(quantizer.cost.get(c, 0), 1))
    if ranking and ranking[-1] not in quantizer.macs:  # the last node left quantized must be a Conv
        last = max((c for c in ranking if c in quantizer.macs), key=ranking.index)
        ranking.remove(last)
        ranking.append(last)
    probe = quantizer.workdir / "candidate.onnx"
    tried: dict[int, float] = {}
    images: dict[int, int] = {}

    def measure(k: int) -> float:
        if k not in tried:
            quantizer.build(probe, set(ranking[:k]))
            tried[k], images[k] = streamed_agreement(cpu_session(probe, threads), held_out, reference, target)
            entry = {"float_nodes": k, "held_out_agreement": tried[k], "images": images[k]}
            log.info(json.dumps({"event": "int8_try", **entry}))
            if on_try:
                on_try(entry)
        return tried[k]

    steps = [0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    steps = [k for k in steps if k < len(ranking)] + [len(ranking) - 1]
    previous, found = 0, None
    for k in steps:
        if measure(k) >= target:
            found = k
            break
        previous = k
    if found is None:  # nothing reaches the target: the most float graph there is (the gate decides)
        found = len(ranking) - 1
    else:
        low, high = previous, found  # low fails, high passes: the smallest passing k between them
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if measure(mid) >= target else (mid, high)
        found = high
    return Selection(
        ranking[:found],
        tried[found],
        [{"float_nodes": k, "held_out_agreement": v, "images": images[k]} for k, v in sorted(tried.items())],
        scores,
        sensitivity_images,
    )


def fine_tuned(
    quantizer: Quantizer, settings: FineTune, teacher: ort.InferenceSession
) -> tuple[Quantizer, DistillReport]:
    """Quantisation-aware fine-tuning (`training.qat`): the weights of `quantizer`'s bias-corrected graph trained,
    under its all-INT8 graph's simulated arithmetic, to give `teacher`'s outputs on `settings.images`. Returns a
    Quantizer of the trained graph that keeps the ranges it was trained under, adds no bias correction and gives
    the Convs it keeps float their original weights."""
    float_graph = onnx.load(str(quantizer.corrected))
    student = FakeQuantGraph(onnx.load(str(quantizer.workdir / "all.onnx")), float_graph)
    names = [o.name for o in teacher.get_outputs() if o.name in {PROBABILITIES, EMBEDDING}]
    outputs = [
        dict(zip(names, teacher.run(names, {quantizer.input_name: settings.images[i : i + 64]}), strict=True))
        for i in range(0, len(settings.images), 64)
    ]
    targets = {name: np.concatenate([o[name] for o in outputs]) for name in names}
    report = distill(student, settings, targets[PROBABILITIES], targets.get(EMBEDDING))
    workdir = quantizer.workdir / "fine-tuned"
    workdir.mkdir(exist_ok=True)
    trained = workdir / "fine-tuned.onnx"
    onnx.save(student.write(float_graph), str(trained))
    fine = Quantizer(
        trained,
        quantizer.calibration,
        workdir,
        ranges=quantizer.cache,
        bias_correction=False,
        float_weights=quantizer.prepared,
    )
    return fine, report


@dataclass
class Int8Result:
    path: Path
    selection: Selection
    record: dict[str, object]


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    held_out: np.ndarray,
    target: float,
    *,
    reference: np.ndarray | None = None,
    sensitivity_images: int | None = None,
    threads: int = 0,
    fine_tune: FineTune | None = None,
) -> Int8Result:
    """Static QDQ INT8 of `fp32_path` (see the module docstring): calibrated on `calibration`, float Convs chosen on
    `held_out` (both training images, label-free) to reach `target` argmax agreement with FP32 there. With
    `fine_tune`, the weights are first trained under the all-INT8 graph's arithmetic (`fine_tuned`); the agreement
    is still with the original FP32 graph."""
    with tempfile.TemporaryDirectory() as tmp:
        quantizer = Quantizer(Path(fp32_path), calibration, Path(tmp))
        if reference is None:
            reference = probabilities(cpu_session(fp32_path, threads), held_out)
        report = None
        if fine_tune is not None:
            try:
                quantizer, report = fine_tuned(quantizer, fine_tune, cpu_session(fp32_path, threads))
            except NotImplementedError as error:  # an operator the simulation lacks: calibration alone, said so
                log.warning(json.dumps({"event": "int8_fine_tune_skipped", "reason": str(error)}))
        selection = select_float_nodes(
            quantizer, held_out, reference, target, sensitivity_images=sensitivity_images, threads=threads
        )
        quantizer.build(Path(out_path), set(selection.float_nodes))
        record = selection.record(quantizer)
        if report is not None:
            record["fine_tune"] = report.record()
    log.info(json.dumps({"event": "int8_selected", **{k: v for k, v in record.items() if k != "float"}}))
    return Int8Result(Path(out_path), selection, record)
