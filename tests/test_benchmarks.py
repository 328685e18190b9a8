"""Helpers of the benchmark scripts that a wrong number would come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.engine import graph_gflops


def test_graph_gflops_counts_conv_and_gemm_multiply_adds(tmp_path: Path) -> None:
    """uint8 NHWC input -> Conv 3->8 (3x3, pad 1) on 10x10 -> global pool -> Gemm 8->4: 2 x (800 x 27 + 4 x 8) FLOP."""
    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv_w")
    gemm_w = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "gemm_w")
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "gemm_w"], ["out"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 10, 10, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        [conv_w, gemm_w],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    assert graph_gflops(path) == 2 * (8 * 10 * 10 * 27 + 4 * 8) / 1e9


def test_every_quality_row_names_a_config_that_validates() -> None:
    """A suite row is a config plus overrides: each must load, so a long benchmark never dies on a typo at its row."""
    from benchmarks.quality import CONFIGS, SUITES
    from training.config import load_config

    for suite, rows in SUITES.items():
        for key, experiment in rows.items():
            config = load_config(CONFIGS / experiment.config, list(experiment.overrides))
            assert config.model.k >= 2, (suite, key)
    spaces = load_config(CONFIGS / SUITES["fashion_mnist_spaces"]["turtle-3spaces"].config)
    assert spaces.data.train_split == spaces.data.eval_split == "test"  # the transductive protocol the row names
