"""Passes over exported ONNX graphs shared by the export, the INT8 quantizer and the frozen-feature pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from serving.core.engine import cpu_session


def intermediate_session(proto: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A session over a copy of `proto` that also outputs the named intermediate tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return cpu_session(probe.SerializeToString())


def fold_pad_amounts(proto: onnx.ModelProto, sample: np.ndarray) -> int:
    """Turn run-time computed Pad amounts (the TF-"SAME" padding of the tf_* backbones, which the exporter computes
    from the input's shape) into constants, in place, when the input's spatial size is static. onnxruntime then
    fuses each Pad into its Conv instead of padding in a pass of its own between layout changes (31 % of
    cifar10-lite0's FP32 kernel time) or, in an INT8 graph, in float between Q/DQ. `sample` is one input of the
    graph's shape (the amounts depend on the shape only). Returns how many amounts were folded (0: unchanged)."""
    initializers = {i.name for i in proto.graph.initializer}
    pads = sorted({n.input[1] for n in proto.graph.node if n.op_type == "Pad" and n.input[1] not in initializers})
    static = all(d.HasField("dim_value") for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])
    if not (pads and static):
        return 0
    values = intermediate_session(proto, pads).run(pads, {proto.graph.input[0].name: sample})
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, p) for p, v in zip(pads, values, strict=True))
    needed, keep = {o.name for o in proto.graph.output}, []
    for node in reversed(proto.graph.node):  # drop the arithmetic that computed them
        if any(o in needed and o not in pads for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(keep))
    used = [i for i in proto.graph.initializer if i.name in needed]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(used)
    return len(pads)


def fold_pads(src: Path, dst: Path, sample: np.ndarray) -> int:
    """`fold_pad_amounts` from file to file (`dst` may be `src`)."""
    proto = onnx.load(str(src))
    count = fold_pad_amounts(proto, sample)
    onnx.save(proto, str(dst))
    return count
