"""INT8 by measured sensitivity (training/quantize.py), on tiny graphs with real onnxruntime quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from serving.core.engine import cpu_session, session_options
from training.qat import FakeQuantGraph, FineTune
from training.quantize import (
    Quantizer,
    agreement,
    fine_tuned,
    keep_float_convs_float,
    probabilities,
    quantize_int8,
    relative_error,
    scalar_constants,
    select_float_nodes,
    sensitivities,
)


def _tiny_graph(path: Path, rng: np.random.Generator, hard: bool = True) -> list[str]:
    """uint8 NHWC 8x8 -> normalise -> conv_a 3->8 -> Relu -> conv_b 8->8 -> Relu -> conv_c 8->8 (1x1) -> pool ->
    Gemm 8->4 -> Softmax. conv_b is made hard to quantize: its weights on conv_a's channel 0, which is always zero
    after the Relu, are 1000x the others, so they cost nothing in float but set conv_b's per-channel int8 step
    (max/127), which rounds every other weight to zero. `hard=False`: conv_b like the others, and a head 10x as
    steep (confident clusters, as trained heads give)."""
    conv_a = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    conv_a[0] = 0.0
    bias_a = np.zeros(8, np.float32)
    bias_a[0] = -1.0  # channel 0 of conv_a: always 0 after the Relu
    conv_b = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    if hard:
        conv_b[:, 0] = 300.0
    conv_c = rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    init = [
        numpy_helper.from_array(conv_a, "wa"),
        numpy_helper.from_array(bias_a, "ba"),
        numpy_helper.from_array(conv_b, "wb"),
        numpy_helper.from_array(np.zeros(8, np.float32), "bb"),
        numpy_helper.from_array(conv_c, "wc"),
        numpy_helper.from_array(np.zeros(8, np.float32), "bc"),
        numpy_helper.from_array(rng.normal(0, 1.0 if hard else 10.0, (4, 8)).astype(np.float32), "wg"),
        numpy_helper.from_array(np.full((1, 3, 1, 1), 127.5, np.float32), "mean"),  # all equal: becomes a scalar
        numpy_helper.from_array(np.full((1, 3, 1, 1), 127.5, np.float32), "std"),
    ]
    nodes = [
        helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["t"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["x", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["xn"]),
        helper.make_node("Conv", ["xn", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "wc", "bc"], ["c"], name="conv_c"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["logits"], transB=1, name="head"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", 8, 8, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 4])],
        init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return ["conv_a", "conv_b", "conv_c"]


def _tiny(folder: Path, hard: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    _tiny_graph(folder / "tiny.onnx", rng, hard)
    # One colour per image plus noise: images that differ, so that the clusters do.
    colours = rng.integers(0, 256, (640, 1, 1, 3))
    images = np.clip(colours + rng.normal(0, 20, (640, 8, 8, 3)), 0, 255).astype(np.uint8)
    return folder / "tiny.onnx", images[:128], images[128:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return _tiny(tmp_path_factory.mktemp("quantize"), hard=True)


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The tiny graph without the conv_b trap: its all-INT8 error is rounding noise spread over the layers."""
    return _tiny(tmp_path_factory.mktemp("quantize-plain"), hard=False)


def _convs_after_load(path: Path) -> dict[str, list[str]]:
    """The convolutions onnxruntime runs after its graph optimisations: {"float": [...], "int8": [...]} node names
    (a float Conv may be renamed after its output by the NCHWc layout pass)."""
    out = path.with_suffix(".optimized.onnx")
    options = session_options()
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(out)).graph.node
    return {
        "float": [n.name for n in nodes if n.op_type in {"Conv", "FusedConv"}],
        "int8": [n.name for n in nodes if n.op_type == "QLinearConv"],
    }


def test_sensitivity_keeps_float_the_convolution_whose_quantization_hurts_most(tiny, tmp_path: Path) -> None:
    fp32, calibration, held_out = tiny
    reference = probabilities(cpu_session(fp32), held_out)
    quantizer = Quantizer(fp32, calibration, tmp_path)
    assert quantizer.convs == ["conv_a", "conv_b", "conv_c"]
    scores = sensitivities(quantizer, held_out[:256], reference[:256])
    assert max(scores, key=scores.get) == "conv_b", scores
    everything = probabilities(cpu_session(quantizer.build(tmp_path / "all.onnx")), held_out)
    all_agreement = float((everything.argmax(1) == reference.argmax(1)).mean())
    target = min(0.999, all_agreement + 0.5 * (1 - all_agreement))  # above what the all-INT8 graph reaches
    selection = select_float_nodes(quantizer, held_out, reference, target)
    assert "conv_b" in selection.float_nodes and selection.held_out_agreement >= target
    assert not {"conv_a", "conv_c"} & set(selection.float_nodes)
    assert selection.tried[0]["float_nodes"] == 0 and selection.tried[0]["held_out_agreement"] < target
    chosen = quantizer.build(tmp_path / "chosen.onnx", set(selection.float_nodes))
    # The float Conv stays float after onnxruntime loads the graph (no per-tensor re-quantization), the others run
    # as QLinearConv.
    ran = _convs_after_load(chosen)
    assert len(ran["float"]) == 1 and not any("conv_b" in name for name in ran["int8"])
    assert any("conv_a" in name for name in ran["int8"]) and any("conv_c" in name for name in ran["int8"])


def test_quantize_int8_records_its_choice(tiny, tmp_path: Path) -> None:
    fp32, calibration, held_out = tiny
    result = quantize_int8(fp32, tmp_path / "tiny.int8.onnx", calibration, held_out, target=0.5)
    assert result.record["rule"] == "sensitivity" and result.record["float_convs"] == 0  # all-INT8 already passes
    assert result.record["quantized_convs"] == 3 and result.record["held_out_agreement"] >= 0.5
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_scalar_constants_is_exact_and_only_for_uniform_constants(tiny, tmp_path: Path) -> None:
    fp32, _, held_out = tiny
    copy = tmp_path / "scalar.onnx"
    copy.write_bytes(fp32.read_bytes())
    assert scalar_constants(copy) == 2  # mean and std, both [1,3,1,1] of equal values
    shapes = {i.name: list(i.dims) for i in onnx.load(str(copy)).graph.initializer}
    assert shapes["mean_scalar"] == [] and shapes["std_scalar"] == [] and shapes["wa"] == [8, 3, 3, 3]
    assert "mean" not in shapes and "std" not in shapes
    before = cpu_session(fp32).run(None, {"images": held_out})[0]
    after = cpu_session(copy).run(None, {"images": held_out})[0]
    assert np.array_equal(before, after)


def test_clip_guard_is_a_no_op_on_dequantized_values() -> None:
    """The Clip put between a DequantizeLinear and a float Conv spans exactly the representable range."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
            helper.make_node("Conv", ["dq", "w"], ["y"], name="conv"),
        ],
        "guard",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 4])],
        [
            numpy_helper.from_array(np.array(0.01, np.float32), "s"),
            numpy_helper.from_array(np.array(10, np.uint8), "z"),
            numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = np.array([[[[-1.0, 0.0, 1.0, 9.0]]]], np.float32)
    before = cpu_session(proto.SerializeToString()).run(None, {"x": x})[0]
    assert keep_float_convs_float(proto, {"conv"}) == 1
    clip = next(n for n in proto.graph.node if n.op_type == "Clip")
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert init[clip.input[1]] == pytest.approx(-0.1) and init[clip.input[2]] == pytest.approx(2.45)
    assert np.array_equal(cpu_session(proto.SerializeToString()).run(None, {"x": x})[0], before)


def test_percentile_calibration_clips_the_ranges_minmax_keeps(tiny, tmp_path: Path) -> None:
    """`calibrate_method="Percentile"` (a study option of `benchmarks/int8_limits.py`) calibrates every activation
    range inside MinMax's, and strictly inside it somewhere (the tails it drops), on the same images."""
    import json

    fp32, calibration, _ = tiny
    ranges = {}
    for method in ("MinMax", "Percentile"):
        (tmp_path / method).mkdir()
        quantizer = Quantizer(fp32, calibration[:64], tmp_path / method, calibrate_method=method)
        ranges[method] = json.loads(quantizer.cache.read_text())["data"]

    def value(entry: object) -> float:  # the cache writes a bound as a number or as {"data": [x] or x, ...}
        data = entry["data"] if isinstance(entry, dict) else entry
        return float(np.ravel(data)[0])

    tensors = ["ar", "br", "c"]  # the activations the Convs read and write after their Relus
    assert set(tensors) <= ranges["MinMax"].keys() & ranges["Percentile"].keys()
    widths = {m: {t: value(r[t]["highest"]) - value(r[t]["lowest"]) for t in tensors} for m, r in ranges.items()}
    assert all(widths["Percentile"][t] <= widths["MinMax"][t] + 1e-6 for t in tensors), widths
    assert any(widths["Percentile"][t] < 0.99 * widths["MinMax"][t] for t in tensors), widths


def test_fake_quant_graph_runs_the_int8_graph_in_torch(tiny_plain, tmp_path: Path) -> None:
    """Quantisation-aware fine-tuning trains on a torch copy of the all-INT8 graph: it must compute what onnxruntime
    computes from that graph (up to rounding ties), not the FP32 function, and write back the float weights."""
    fp32, calibration, held_out = tiny_plain
    quantizer = Quantizer(fp32, calibration, tmp_path)
    float_graph = onnx.load(str(quantizer.corrected))
    simulated = FakeQuantGraph(onnx.load(str(tmp_path / "all.onnx")), float_graph)
    with torch.no_grad():
        p_sim = simulated(torch.from_numpy(held_out))["probabilities"].numpy()
    p_int8 = probabilities(cpu_session(tmp_path / "all.onnx"), held_out)
    p_fp32 = probabilities(cpu_session(fp32), held_out)
    assert agreement(p_int8, p_sim) >= 0.98
    assert relative_error(p_int8, p_sim) < 0.1 * relative_error(p_fp32, p_int8)  # INT8's error, not another
    written = {i.name: numpy_helper.to_array(i) for i in simulated.write(float_graph).graph.initializer}
    for init in float_graph.graph.initializer:
        np.testing.assert_array_equal(written[init.name], numpy_helper.to_array(init))


def test_fine_tuning_trains_what_onnxruntime_then_runs(tiny_plain, tmp_path: Path) -> None:
    """The fine-tuning lowers its loss under the simulated INT8 arithmetic; the graph quantized from the trained
    weights (with the ranges they were trained under, no bias correction) is what onnxruntime runs, so the
    simulation of that graph computes what onnxruntime computes; the record says what ran. (Whether it helps the
    agreement is a property of the network, measured on the store models by benchmarks/int8_fine_tune.py.)"""
    fp32, calibration, held_out = tiny_plain
    rng = np.random.default_rng(1)  # more images of the fixture's kind: one colour each plus noise
    tuning = np.clip(rng.integers(0, 256, (2048, 1, 1, 3)) + rng.normal(0, 20, (2048, 8, 8, 3)), 0, 255)
    quantizer = Quantizer(fp32, calibration, tmp_path)
    teacher = cpu_session(fp32)
    tuned, report = fine_tuned(quantizer, FineTune(tuning.astype(np.uint8), epochs=2, lr=1e-3), teacher)
    assert report.loss_after < 0.9 * report.loss_before, report
    assert report.record()["images"] == 2048 and report.steps == 2 * (2048 // 32)
    assert (
        tuned.corrected_bias == {}
        and (tmp_path / "fine-tuned" / "calibration.json").read_text() == (tmp_path / "calibration.json").read_text()
    )
    served = tuned.build(tmp_path / "tuned.onnx")
    simulated = FakeQuantGraph(onnx.load(str(served)), onnx.load(str(tuned.corrected)))
    with torch.no_grad():
        p_sim = simulated(torch.from_numpy(held_out))["probabilities"].numpy()
    p_served = probabilities(cpu_session(served), held_out)
    p_fp32 = probabilities(cpu_session(fp32), held_out)
    assert agreement(p_served, p_sim) >= 0.98
    assert relative_error(p_served, p_sim) < 0.1 * relative_error(p_fp32, p_served)
    # A Conv kept float takes its FP32 weights, not the fine-tuned ones (trained to absorb a rounding it skips);
    # the quantized ones keep what they learnt.
    mixed = onnx.load(str(tuned.build(tmp_path / "mixed.onnx", {"conv_b"})))
    weights = {i.name: numpy_helper.to_array(i) for i in mixed.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(quantizer.prepared)).graph.initializer}
    trained = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tuned.corrected)).graph.initializer}
    conv_b = next(n for n in mixed.graph.node if n.name == "conv_b")
    np.testing.assert_array_equal(weights[conv_b.input[1]], original[conv_b.input[1]])
    assert not np.array_equal(trained["wa"], original["wa"]) and not np.array_equal(trained["wc"], original["wc"])
