"""Trainer, configs, datasets and backbones on real data (sklearn digits, CIFAR-10 JPEGs)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from benchmarks.common import TAR_FILTER
from training.config import load_config
from training.data.batch_augment import BatchAugment
from training.data.datasets import FolderDataset, create_dataset
from training.models.backbones import available_backbones, create_backbone
from training.trainer import Trainer, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "digits_cc_tiny.yaml"


def _train(tmp_path: Path, *overrides: str) -> Trainer:
    config = load_config(TINY, [f"run.out_dir={tmp_path}", "run.max_steps_per_epoch=3", *overrides])
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def test_config_yaml_overrides_and_validation(tmp_path: Path) -> None:
    config = load_config(TINY, ["optim.lr=0.01", "model.k=7"])
    assert config.optim.lr == 0.01 and config.model.k == 7 and config.data.dataset == "digits"
    with pytest.raises(ValidationError):
        load_config(TINY, ["optim.lr=-1"])
    with pytest.raises(ValidationError):
        load_config(TINY, ["model.not_a_field=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(TINY, ["no-equals-sign"])
    with pytest.raises(ValidationError, match="cached_features"):
        load_config(TINY, ["model.cached_features=true"])


def test_every_paper_and_small_config_validates() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_training_writes_checkpoint_config_and_log(tmp_path: Path) -> None:
    trainer = _train(tmp_path, "optim.epochs=1")
    run = trainer.run_dir
    assert (run / "final.pt").exists() and (run / "last.pt").exists()
    assert load_config(run / "config.yaml").model == trainer.config.model
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"acc"' in lines[0]
    model, config, state = load_checkpoint(run / "final.pt")
    assert state["epoch"] == 1 and config.method.name == "cc"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = _train(tmp_path / "a", "optim.epochs=2")
    _train(tmp_path / "b", "optim.epochs=1")
    resumed = _train(tmp_path / "b", "optim.epochs=2")  # same run dir: resumes from last.pt at epoch 1
    assert resumed.epoch == 2
    for (name, p), (_, q) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    log_lines = (resumed.run_dir / "log.jsonl").read_text().splitlines()
    assert len(log_lines) == 2  # one line per epoch, none repeated


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    _train(tmp_path, "optim.epochs=1")
    with pytest.raises(ValueError, match="different model config"):
        _train(tmp_path, "optim.epochs=2", "model.k=5")


def test_datasets_from_shared_data() -> None:
    fashion = create_dataset("fashion_mnist", "test")
    assert len(fashion) == 10_000 and fashion.has_labels and fashion.load(0).size == (28, 28)
    digits = create_dataset("digits", "train")
    assert len(digits) + len(create_dataset("digits", "test")) == 1797


def test_folder_dataset_labelled_and_flat(tmp_path: Path, shared_data: Path) -> None:
    with tarfile.open(shared_data / "cifar10" / "test.tar") as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:2000:100]
        tar.extractall(tmp_path / "labelled", members=members, **TAR_FILTER)
    (tmp_path / "labelled" / "test" / "empty_class").mkdir()  # no image: no class
    (tmp_path / "labelled" / "test" / "broken_class").mkdir()  # no readable image: no class, its file listed
    (tmp_path / "labelled" / "test" / "broken_class" / "x.jpg").write_bytes(b"not a jpeg")
    labelled = FolderDataset(tmp_path / "labelled" / "test")
    assert labelled.has_labels and labelled.class_names and len(labelled) == len(members)
    assert labelled.class_names == sorted({Path(m.name).parent.name for m in members})  # not the two above
    assert list(labelled.skipped) == ["broken_class/x.jpg"]
    assert labelled.labels.max() == len(labelled.class_names) - 1
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(labelled.paths):
        (flat / f"{i}.jpg").write_bytes(path.read_bytes())
    unlabelled = FolderDataset(flat)
    assert not unlabelled.has_labels and unlabelled.class_names is None
    assert unlabelled.load(0).mode == "RGB"


def test_backbones_registry_shapes() -> None:
    assert {"resnet18", "resnet34", "small_cnn", "effnet_lite0"} <= set(available_backbones())
    x = torch.rand(2, 3, 32, 32)
    for name, dim in [("resnet18", 512), ("small_cnn", 128)]:
        backbone = create_backbone(name, pretrained=False).eval()
        assert backbone(x).shape == (2, dim)


def test_effnet_lite0_loads_wheel_weights_and_features_are_informative() -> None:
    """The shipped ImageNet weights load strictly; their features separate CIFAR classes far better than chance."""
    from serving.core.quality import cluster_accuracy
    from training.data.views import eval_transform

    backbone = create_backbone("effnet_lite0", pretrained=True).eval()
    data = create_dataset("cifar10", "test")
    index = np.concatenate([np.flatnonzero(data.labels == c)[:20] for c in (0, 6)])  # airplane vs frog
    x = torch.stack([eval_transform(96)(data.load(int(i))) for i in index])
    with torch.inference_mode():
        feats = torch.nn.functional.normalize(backbone(x), dim=1)
    # nearest-centroid 2-way split on the features: ImageNet features tell planes from frogs
    c0, c1 = feats[:20].mean(0), feats[20:].mean(0)
    pred = (feats @ c1 > feats @ c0).long().numpy()
    assert cluster_accuracy(data.labels[index], pred) > 0.9


def test_batch_augment_per_sample_and_in_range() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 28, 28).repeat(64, 1, 1, 1)
    out = BatchAugment(20, strength=0.5, min_scale=0.2)(x)
    assert out.shape == (64, 3, 20, 20)
    assert out.min() >= 0 and out.max() <= 1
    # identical inputs must come out different: parameters are drawn per sample
    assert (out.flatten(1).std(0) > 1e-3).float().mean() > 0.5


def test_under_trained_and_collapsed_runs_are_flagged(tmp_path: Path) -> None:
    """`train` ends with warnings when the loss is still falling or the clusters collapsed or stayed empty."""
    import json

    from training.diagnostics import training_warnings

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": i + 1, "loss": 10.0 - i}) + "\n" for i in range(5)))
    healthy = {"cluster_sizes": {i: 10 for i in range(4)}}
    assert [w["kind"] for w in training_warnings(tmp_path, healthy, k=4)] == ["still_learning"]
    log.write_text("".join(json.dumps({"epoch": i + 1, "loss": 5.0}) + "\n" for i in range(5)))
    assert training_warnings(tmp_path, healthy, k=4) == []
    assert [w["kind"] for w in training_warnings(tmp_path, {"cluster_sizes": {0: 90, 1: 10}}, k=4)] == ["collapsed"]
    kinds = [w["kind"] for w in training_warnings(tmp_path, {"cluster_sizes": {0: 30, 1: 30, 2: 40}}, k=4)]
    assert kinds == ["empty_clusters"]


def test_train_reports_its_warnings(tmp_path: Path) -> None:
    import json

    from training.run import train

    config = load_config(TINY, [f"run.out_dir={tmp_path}", "optim.epochs=4", "run.max_steps_per_epoch=2"])
    result = train(config)
    assert json.loads((config.run_dir / "warnings.json").read_text()) == result["warnings"]
    assert all(set(w) == {"kind", "message"} for w in result["warnings"])
    sizes = result["cluster_sizes"]
    assert sum(sizes.values()) == result["n"]  # evaluation assignments, the input of the collapse check


def test_evaluate_command_reports_the_checkpoint_end_to_end(tmp_path: Path) -> None:
    """`deepclust evaluate RUN` (the real CLI) rebuilds the model through its backbone and reports what the
    trainer measured on the same split; `--output` writes the full report; a missing run is one error line."""
    import json
    import subprocess
    import sys

    config = load_config(TINY, [f"run.out_dir={tmp_path}", "optim.epochs=1", "run.max_steps_per_epoch=3"])
    metrics = Trainer(config).fit()
    report = tmp_path / "report.json"
    cli = [sys.executable, "-m", "deepclust.cli", "evaluate"]
    done = subprocess.run([*cli, str(config.run_dir), "-o", str(report)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["split"] == "test" and line["n"] == metrics["n"]
    assert line["acc"] == pytest.approx(metrics["acc"], abs=1e-9)  # same pre-processing as training's evaluation
    full = json.loads(report.read_text())
    assert sum(full["cluster_sizes"].values()) == metrics["n"] and len(full["confusion"]) >= 2
    missing = subprocess.run([*cli, str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope" in missing.stderr


def test_cached_rows_come_a_batch_at_a_time_with_the_per_sample_semantics() -> None:
    """The DataLoader gets a whole batch from one gather (no per-sample Python call), and each view is still a row of
    the sample's own passes, two distinct passes per pair; the neighbour side is one of the sample's neighbours."""
    from torch.utils.data import DataLoader

    from training.data.views import CachedPasses, collate_rows
    from training.methods.scan import NeighbourPairs, WeakStrongPasses

    n, d = 64, 3
    passes = [np.full((n, d), p, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None] * 10 for p in range(3)]
    labels = np.arange(n) % 4
    torch.manual_seed(0)
    dataset = CachedPasses(passes, labels, num_views=2)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate_rows)
    seen = []
    for view1, view2, batch_labels, index in loader:
        assert view1.shape == (16, d) and batch_labels.dtype == torch.long and index.dtype == torch.long
        for v in (view1, view2):  # row i of some pass: value = 10 * index + pass
            assert torch.equal(torch.div(v[:, 0], 10, rounding_mode="floor").long(), index)
        assert torch.all(view1[:, 0] != view2[:, 0])  # two different passes of one sample
        assert torch.equal(batch_labels, torch.from_numpy(labels)[index])
        seen.append(index)
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
    one = dataset[5]
    assert one[0].shape == (d,) and one[2] == 1 and one[3] == 5

    neighbours = (np.arange(n)[:, None] + np.array([[1, 2]])) % n
    pairs = NeighbourPairs(neighbours, labels, passes=passes[:1], include_self=False)
    anchor, partner, _, index = pairs.rows(torch.arange(n))
    offset = (partner[:, 0] - anchor[:, 0]) / 10 % n
    assert set(offset.long().tolist()) <= {1, 2} and torch.equal(anchor[:, 0].long(), index * 10)

    weak, strong, _, index = WeakStrongPasses(passes[:1], passes[1:], labels).rows(torch.tensor([3, 7]))
    assert weak[:, 0].tolist() == [30.0, 70.0] and set(strong[:, 0].tolist()) <= {31.0, 32.0, 71.0, 72.0}


def test_frozen_pass_on_onnxruntime_matches_torch_and_says_which_engine_ran(caplog: pytest.LogCaptureFixture) -> None:
    """CPU passes run the backbone on onnxruntime (1.35-1.6x torch eager here); the features must be torch's to
    float rounding, for a clean and an augmented (batched, seeded) view alike."""
    import logging
    import re

    from training.data.views import eval_transform
    from training.features import embed

    backbone = create_backbone("effnet_lite0", pretrained=True).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    small = torch.utils.data.Subset(create_dataset("cifar10", "test"), range(24))
    augment = BatchAugment(64, strength=0.5, min_scale=0.2)
    for batch_augment in (None, augment):
        runs = {}
        for engine in ("torch", "onnxruntime"):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="training.features"):
                runs[engine] = embed(
                    backbone,
                    small,
                    eval_transform(64),
                    batch_size=16,
                    workers=0,
                    seed=3,
                    batch_augment=batch_augment,
                    engine=engine,
                )
            assert ("feature pass on onnxruntime" in caplog.text) == (engine == "onnxruntime")
            if engine == "onnxruntime":  # Lite0's TF-"SAME" pads: constants the Convs absorb, not a pass apart
                assert re.search(r"; [1-9]\d* pad amounts folded;", caplog.text), caplog.text
        scale = np.abs(runs["torch"]).max()
        assert np.abs(runs["onnxruntime"] - runs["torch"]).max() <= 1e-4 * max(1.0, scale)
        assert runs["torch"].std(0).mean() > 1e-3  # real, varied features, not zeros
    # a pass leaves the backbone as it found it: its mode, and its batch-norm statistics untouched
    assert backbone.training and all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    # the two views differ: the augmented pass is really augmented (and seeded the same on both engines)
    assert np.abs(runs["torch"] - embed(backbone, small, eval_transform(64), workers=0, engine="torch")).max() > 1e-2
