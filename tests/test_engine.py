"""serving.core.engine on the tiny contract model (fast) and on the real default model (when exported)."""

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from serving.core.contract import ModelCard, ModelMetadata
from serving.core.engine import EXACT_INT8, Engine, EngineOutput, assign, cpu_session, resolve_providers
from serving.core.preprocess import load_image


@pytest.fixture
def pytest_log_handlers_only(monkeypatch):
    """Earlier tests (CLI runs) may leave a root handler on a stream that is closed now; logging would print its
    failure, message included, to stderr. Keep only pytest's own capture handlers for the test."""
    root = logging.getLogger()
    keep = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    monkeypatch.setattr(root, "handlers", keep)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return Engine(tiny_model_dir / "model.onnx", max_batch=4)


def test_metadata_and_provider(tiny_engine):
    assert tiny_engine.k == 10 and tiny_engine.input_size == 32
    assert tiny_engine.metadata.method == "tiny"
    assert tiny_engine.metadata.class_names[3] == "cat"
    assert tiny_engine.metadata.reference.cluster_hist == [0.1] * 10
    # onnxruntime-gpu lists CUDA/TensorRT here but cannot run them: the engine reports what really runs
    assert tiny_engine.provider == tiny_engine.session.get_providers()[0]
    assert tiny_engine.provider in ort.get_available_providers()


def test_gpu_preference_falls_back_quietly(tiny_model_dir, capfd, pytest_log_handlers_only):
    engine = Engine(tiny_model_dir / "model.onnx", providers=("tensorrt", "cuda", "cpu"), warmup=False)
    out, err = capfd.readouterr()
    if "CUDAExecutionProvider" not in engine.session.get_providers():
        assert engine.provider == "CPUExecutionProvider"
        assert "EP Error" not in out + err
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["nonexistent"])[-1] == "CPUExecutionProvider"


def test_run_splits_big_batches_identically(tiny_engine):
    images = np.random.default_rng(1).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    chunked = tiny_engine.run(images)  # max_batch=4 → 3 chunks
    whole = Engine(tiny_engine.model_path, max_batch=64, warmup=False).run(images)
    assert chunked.probabilities.shape == (11, 10) and chunked.probabilities.dtype == np.float32
    assert chunked.cluster.dtype == np.int64 and chunked.embedding.shape == (11, 16)
    np.testing.assert_allclose(chunked.probabilities, whole.probabilities, rtol=1e-5, atol=1e-6)
    assert np.array_equal(chunked.cluster, whole.cluster)
    np.testing.assert_allclose(chunked.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(chunked.cluster, chunked.probabilities.argmax(axis=1))


def test_run_rejects_wrong_input(tiny_engine):
    with pytest.raises(ValueError):
        tiny_engine.run(np.zeros((1, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError):
        tiny_engine.run(np.zeros((1, 32, 32, 3), np.float32))
    empty = tiny_engine.run(np.zeros((0, 32, 32, 3), np.uint8))
    assert empty.cluster.shape == (0,)


def test_assign_confidence_label_topk():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    out = EngineOutput(probs, np.array([1, 0]), np.zeros((2, 4), np.float32))
    results = assign(out, ["a", "b", "c"], top_k=2)
    assert [r.cluster for r in results] == [1, 0]
    assert results[0].confidence == pytest.approx(0.7) and results[0].label == "b"
    assert [t.cluster for t in results[1].top_k] == [0, 2]
    assert assign(out, None)[0].label is None and assign(out, None)[0].top_k is None


def test_metadata_requires_contract_keys():
    with pytest.raises(ValueError, match="deepclust.k"):
        ModelMetadata.from_props({"deepclust.method": "x", "deepclust.input_size": "32", "deepclust.backbone": "b"})


def test_model_without_contract_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError):
        Engine(path)


def test_tiny_card_roundtrip_and_sha(tiny_model_dir, tmp_path):
    card = ModelCard.load(tiny_model_dir)
    card.verify_file(tiny_model_dir / "model.onnx")
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes((tiny_model_dir / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="does not match"):
        card.verify_file(tampered)
    assert json.loads((tiny_model_dir / "model.json").read_text())["files"]["model.onnx"]["precision"] == "fp32"


def test_default_model_on_real_images(default_model_dir, cifar_test_dir):
    card = ModelCard.load(default_model_dir)
    engine = Engine(default_model_dir / "model.onnx", max_batch=32)
    assert engine.k == card.k and engine.input_size == card.input_size
    files = [sorted((cifar_test_dir / c).glob("*.jpg"))[:20] for c in sorted(p.name for p in cifar_test_dir.iterdir())]
    paths = [p for group in files for p in group]
    images = np.stack([load_image(p.read_bytes(), engine.input_size) for p in paths])
    out = engine.run(images)
    assert out.probabilities.shape == (len(paths), engine.k)
    # a trained model uses more than one cluster on 10 classes × 20 real images
    assert len(set(out.cluster.tolist())) >= 3


ACC_SUBSET_PER_CLASS = 100
ACC_TOLERANCE = 0.05  # ~3 standard errors of an accuracy near .63 measured on 1,000 images


def test_default_model_accuracy_matches_its_card(default_model_dir, cifar_test_dir):
    """The shipped model, on a fixed subset (the first 100 test JPEGs of each class, sorted by name): the accuracy of
    its labels (the card's Hungarian map from clusters to class names) is within 0.05 of the card's test ACC."""
    card = ModelCard.load(default_model_dir)
    engine = Engine(default_model_dir / "model.onnx", max_batch=64)
    classes = sorted(p.name for p in cifar_test_dir.iterdir() if p.is_dir())
    # Each cluster is named after a distinct class, or `cluster-N` when no evaluation image fell in it at export.
    assert card.class_names is not None and len(card.class_names) == card.k
    named = [n for n in card.class_names if not n.startswith("cluster-")]
    assert len(set(named)) == len(named) and set(named) <= set(classes) and len(named) >= card.k - 2
    images, truth = [], []
    for cls in classes:
        for path in sorted((cifar_test_dir / cls).glob("*.jpg"))[:ACC_SUBSET_PER_CLASS]:
            images.append(load_image(path.read_bytes(), engine.input_size))
            truth.append(cls)
    labels = [a.label for a in engine.predict(np.stack(images))]
    accuracy = float(np.mean([label == cls for label, cls in zip(labels, truth, strict=True)]))
    print(f"\ndefault model: label accuracy {accuracy:.4f} on {len(truth)} images; card ACC {card.metrics.acc:.4f}")
    assert abs(accuracy - card.metrics.acc) <= ACC_TOLERANCE, (accuracy, card.metrics.acc)


# ------------------------------------------------------------------------------------- GPU path, checked on CPU
def test_require_gpu_refuses_on_this_cpu_machine_with_onnxruntimes_reason(tiny_model_dir):
    """No GPU here: with `require_gpu` the engine refuses to start, and the message carries onnxruntime's own reason
    (the CUDA library that failed to load) rather than a generic 'no GPU'."""
    from serving.core.engine import GpuUnavailableError

    with pytest.raises(GpuUnavailableError) as info:
        Engine(tiny_model_dir / "model.onnx", providers=("cuda", "cpu"), require_gpu=True, warmup=False)
    message = str(info.value)
    assert "CUDAExecutionProvider" in message
    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu: the loader's own words
        assert ".so" in message and ("cannot open shared object file" in message or "FAIL" in message), message
    else:
        assert "not in this onnxruntime build" in message


def test_fallback_to_cpu_is_logged_at_warning_with_the_reason(tiny_model_dir, caplog, capfd, pytest_log_handlers_only):
    with caplog.at_level(logging.WARNING, logger="deepclust.engine"):
        engine = Engine(tiny_model_dir / "model.onnx", providers=("cuda", "cpu"), warmup=False)
    assert engine.provider == "CPUExecutionProvider"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "CUDAExecutionProvider" in r.message]
    assert warnings and engine.fallback_reasons["CUDAExecutionProvider"] in warnings[0].message
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "[E:onnxruntime" not in err  # captured, not sprayed on the terminal
    cpu_only = Engine(tiny_model_dir / "model.onnx", providers=("cpu",), warmup=False)
    assert cpu_only.fallback_reasons == {}  # CPU asked for: nothing fell back


def test_provider_options_are_chosen_on_purpose():
    from serving.core.engine import DEFAULT_PROVIDERS, provider_options

    assert DEFAULT_PROVIDERS == ("cuda", "cpu"), "TensorRT only when configured (caches, profiles)"
    cuda = provider_options("CUDAExecutionProvider", device_id=3)
    assert cuda == {
        "device_id": "3",
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "use_tf32": "0",
    }
    assert provider_options("CPUExecutionProvider") == {}
    assert provider_options("TensorrtExecutionProvider") == {}


def test_cuda_option_names_and_values_exist_in_the_installed_cuda_provider():
    """The CUDA provider cannot load here (no GPU, no CUDA runtime), so onnxruntime never parses our options on this
    machine: check every key and value against the strings of the installed onnxruntime-gpu CUDA provider library,
    where its option parser spells them. A misspelt key (`cudnn_conv_algo`) would fail here, not on the GPU."""
    import mmap
    from pathlib import Path

    from serving.core.engine import provider_options

    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        pytest.skip(f"onnxruntime without the CUDA provider library ({ort.__version__}): nothing to check against")
    with library.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as text:
        for key, value in provider_options("CUDAExecutionProvider", device_id=1).items():
            assert text.find(b"\0" + key.encode() + b"\0") >= 0, f"option {key} unknown to {library.name}"
            if not value.isdigit():
                assert text.find(b"\0" + value.encode() + b"\0") >= 0, f"value {value} unknown to {library.name}"
        assert text.find(b"\0cudnn_conv_algo\0") < 0  # the check can fail: a near miss is not found


def test_gpu_sessions_do_not_spin_and_cpu_sessions_follow_the_setting(tiny_engine):
    """On a GPU provider onnxruntime's CPU threads run only fallback ops: busy-waiting would take decode's cores."""
    key = "session.intra_op.allow_spinning"
    assert tiny_engine._session_options("CUDAExecutionProvider").get_session_config_entry(key) == "0"
    assert tiny_engine._session_options("TensorrtExecutionProvider").get_session_config_entry(key) == "0"
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises a plain error for a key that was never set
        tiny_engine._session_options("CPUExecutionProvider").get_session_config_entry(key)


def _saturating_int8_conv(channels: int = 64) -> bytes:
    """A QDQ Conv onnxruntime runs as QLinearConv: `channels` inputs at 255 (uint8), weights 127 (int8), output scale
    1e4. Exact: 255 x 127 x channels; with int16 saturation of the pair sums (AVX2 without VNNI): about half."""
    from onnx import TensorProto, helper, numpy_helper

    def constant(name: str, value, dtype) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "one"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["yc"]),
        helper.make_node("QuantizeLinear", ["yc", "out_scale", "zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "out_scale", "zero"], ["y"]),
    ]
    initializers = [
        constant("one", 1.0, np.float32),
        constant("zero", 0, np.uint8),
        constant("out_scale", 1e4, np.float32),
        constant("wq", np.full((1, channels, 1, 1), 127), np.int8),
    ]
    graph = helper.make_graph(
        nodes,
        "saturating",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def test_int8_arithmetic_is_exact_on_every_cpu(tiny_engine):
    """onnxruntime's uint8 x int8 kernels saturate in int16 on x86 CPUs without VNNI (on this repository's AVX2 machine
    the store model's INT8 file agreed less with FP32, and test graphs with their exact simulation only .975). Our
    sessions ask for exact arithmetic (`EXACT_INT8`): a Conv that saturates there comes out exact on any CPU, and the
    engine's sessions carry the same setting as the export's gates and the tests (`cpu_session`)."""
    channels = 64
    x = np.full((1, channels, 2, 2), 255, np.float32)
    y = cpu_session(_saturating_int8_conv(channels)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, 255 * 127 * channels, rtol=0.01)  # 2.07e6 (quantized to 1e4 steps)
    key, value = EXACT_INT8
    assert tiny_engine.session.get_session_options().get_session_config_entry(key) == value


def test_batch_buckets():
    from serving.core.engine import batch_buckets

    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    with pytest.raises(ValueError):
        batch_buckets(0)


class _ShapeRecorder:
    """Wraps a session and records the batch size of every run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, feeds):
        self.batches.append(len(feeds["images"]))
        return self.session.run(names, feeds)


def test_padded_batches_give_the_same_answers_and_only_bucket_shapes(tiny_model_dir):
    """What a GPU engine does (forced on CPU here): every chunk runs at a bucket size, the zero padding never reaches
    the caller, and the answers equal the unpadded engine's."""
    images = np.random.default_rng(2).integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
    plain = Engine(tiny_model_dir / "model.onnx", max_batch=16, warmup=False)
    padded = Engine(tiny_model_dir / "model.onnx", max_batch=16, warmup=False, pad_batches=True)
    assert plain.buckets == () and padded.buckets == (1, 2, 4, 8, 16)
    padded.session = _ShapeRecorder(padded.session)
    for n in (1, 3, 5, 16, 21):
        got, want = padded.run(images[:n]), plain.run(images[:n])
        assert got.probabilities.shape == (n, 10) and got.embedding.shape == (n, 16)
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
        assert np.array_equal(got.cluster, want.cluster)
    assert padded.session.batches == [1, 4, 8, 16, 16, 8]  # 21 = 16 + 5 → 16 + 8


def test_warmup_covers_every_shape_a_request_can_reach(tiny_model_dir):
    """Padded: every bucket is warmed, so any batch of 1..max_batch runs at a warmed shape. CPU default: no padding,
    one warm-up run at the largest batch (unchanged)."""
    padded = Engine(tiny_model_dir / "model.onnx", max_batch=24, pad_batches=True)
    assert padded.warmed_batches == [1, 2, 4, 8, 16, 24]
    assert {padded.padded_size(n) for n in range(1, 25)} <= set(padded.warmed_batches)
    cpu = Engine(tiny_model_dir / "model.onnx", max_batch=24)
    assert cpu.provider == "CPUExecutionProvider" and not cpu.pad_batches
    assert cpu.warmed_batches == [24]
