"""The one model-store resolver (`serving.core.model_store`) and the one metadata/card schema
(`serving.core.contract`), on the tiny contract model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serving.core.contract import (
    METADATA_PREFIX,
    VARIANT_FILES,
    ModelCard,
    ModelFacts,
    ModelMetadata,
    decode_props,
    encode_props,
)
from serving.core.model_store import ModelStoreError, model_folder, resolve_model


def test_folder_name_and_file_resolve_to_the_same_verified_file(tiny_model_dir: Path) -> None:
    by_folder = resolve_model(tiny_model_dir)
    by_name = resolve_model(tiny_model_dir.name, store=tiny_model_dir.parent)
    by_file = resolve_model(tiny_model_dir / "model.onnx")
    assert by_folder == by_name == by_file
    assert by_folder.file == tiny_model_dir / VARIANT_FILES["fp32"] and by_folder.name == "tiny-test"
    assert by_folder.card is not None and by_folder.card.k == 10


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing_folder", "model not found"),
        ("missing_variant", "has no model.int8.onnx"),
        ("no_card", "has no model card"),
        ("bad_card", "not a valid model card"),
        ("tampered", "does not match the model card"),
        ("unlisted", "not listed in the model card"),
    ],
)
def test_every_refusal_is_a_clear_model_store_error(tiny_model_dir: Path, tmp_path: Path, damage: str, message: str):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    variant = "fp32"
    if damage == "missing_folder":
        shutil.rmtree(folder)
    elif damage == "missing_variant":
        variant = "int8"
    elif damage == "no_card":
        (folder / "model.json").unlink()
    elif damage == "bad_card":
        (folder / "model.json").write_text("{}")
    elif damage == "tampered":
        (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    elif damage == "unlisted":
        shutil.copyfile(folder / "model.onnx", folder / "model.int8.onnx")
        variant = "int8"
    with pytest.raises(ModelStoreError, match=message):
        resolve_model(folder, variant)


def test_unknown_variant_and_loose_onnx_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="unknown variant"):
        resolve_model(tiny_model_dir, "bf16")
    loose = tmp_path / "x.onnx"
    shutil.copyfile(tiny_model_dir / "model.onnx", loose)
    resolved = resolve_model(loose)  # no card beside it: nothing to check against
    assert resolved.file == loose and resolved.card is None
    assert model_folder("absent", store=tmp_path) == tmp_path / "absent"


def test_metadata_and_card_are_one_schema(tiny_model_dir: Path) -> None:
    card = ModelCard.load(tiny_model_dir)
    props = card.to_props(precision="fp32")
    assert all(key.startswith(METADATA_PREFIX) for key in props)
    assert json.loads(props["deepclust.class_names"]) == card.class_names and props["deepclust.k"] == "10"
    metadata = ModelMetadata.from_props(props)
    assert metadata.facts() == card.facts() and metadata.precision == "fp32"
    digits = "1234" * 16  # a digest made only of digits stays a string
    assert decode_props(encode_props({"source_sha256": digits}))["source_sha256"] == digits
    with pytest.raises(ValueError, match="class_names"):
        ModelFacts(method="m", k=3, input_size=8, backbone="b", class_names=["a", "b"])


def _store_with(tiny_model_dir: Path, root: Path, accs: dict[str, float]) -> Path:
    """A store of copies of the tiny model whose cards claim the given test ACCs."""
    for name, acc in accs.items():
        shutil.copytree(tiny_model_dir, root / name)
        card = ModelCard.load(root / name)
        card.metrics.acc = acc
        card.save(root / name)
    return root


def test_default_model_is_the_most_accurate_fast_enough_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    from serving.core.model_store import DEFAULT_MODEL, THROUGHPUT_FILE, default_model_name

    store = _store_with(tiny_model_dir, tmp_path, {"fast": 0.60, "accurate": 0.70, "slow-best": 0.80})
    assert default_model_name(store) == DEFAULT_MODEL  # nothing measured: the historical default
    measured = {
        "machine": "test",
        "command": "python benchmarks/store.py",
        "models": {
            "fast": {"service_img_per_s": 400.0},
            "accurate": {"service_img_per_s": 120.0},
            "slow-best": {"service_img_per_s": 60.0},  # most accurate, below the bar
            "gone": {"service_img_per_s": 900.0},  # measured, then removed from the store
        },
    }
    (store / THROUGHPUT_FILE).write_text(json.dumps(measured))
    assert default_model_name(store) == "accurate"
    assert default_model_name(store, min_img_per_s=50.0) == "slow-best"
    assert default_model_name(store, min_img_per_s=200.0) == "fast"
    (store / THROUGHPUT_FILE).write_text("{not json")
    with pytest.raises(ModelStoreError, match="not a valid throughput file"):
        default_model_name(store)


def test_store_benchmark_times_each_model_and_sets_the_default(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`benchmarks/store.py` on a store of two real (tiny) models, engine backend, real HTTP on loopback: one row per
    model with its measured rate, `throughput.json` written, and the default chosen from it by the same rule."""
    import benchmarks.common as common
    from benchmarks import store as store_bench
    from serving.core.model_store import THROUGHPUT_FILE, StoreThroughput, default_model_name

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    store = _store_with(tiny_model_dir, tmp_path / "store", {"a": 0.3, "b": 0.2})
    argv = ["--store", str(store), "--backend", "engine", "--seconds", "1", "--concurrency", "2", "--images", "8"]
    assert store_bench.main(argv) == 0
    measured = StoreThroughput.model_validate_json((store / THROUGHPUT_FILE).read_text())
    assert set(measured.models) == {"a", "b"} and all(m.service_img_per_s > 0 for m in measured.models.values())
    rows = json.loads((tmp_path / "results" / "store.json").read_text())
    assert {r["model"] for r in rows} == {"a", "b"} and all(r["errors"] == 0 for r in rows)
    fast_enough = [n for n, m in measured.models.items() if m.service_img_per_s >= 100]
    expected = max(fast_enough, key=lambda n: {"a": 0.3, "b": 0.2}[n]) if fast_enough else "cifar10-lite0"
    assert default_model_name(store) == expected
