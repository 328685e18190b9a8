"""TURTLE as a method and several frozen backbones as one model, end to end on real data (sklearn digits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serving.core.contract import ModelCard
from serving.core.engine import Engine
from training.config import load_config
from training.data.views import eval_transform
from training.models.backbones import MultiSpace
from training.trainer import Trainer, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "digits_cc_tiny.yaml"
TWO_SPACES = [
    "model.backbone=[small_cnn, small_cnn]",
    "model.freeze_backbone=true",
    "model.cached_features=true",
    "data.augment_on=loader",
]


@pytest.fixture(scope="module")
def turtle_run(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    out = tmp_path_factory.mktemp("turtle")
    overrides = [f"run.out_dir={out}", "method.name=turtle", "optim.epochs=4", "optim.batch_size=512", *TWO_SPACES]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.fit()
    return trainer


def test_cached_spaces_equal_the_model_forward(turtle_run: Trainer) -> None:
    """Each space is cached on its own and combined in one place: the cached features of the two-space model equal
    its forward on the clean view (what the exported graph computes)."""
    backbone = turtle_run.model.backbone
    assert isinstance(backbone, MultiSpace) and backbone.dims == [128, 128]
    cached = turtle_run.cached_passes(turtle_run.eval_set, ["clean"])[0]
    images = torch.stack([eval_transform(8)(turtle_run.eval_set[i][0]) for i in range(32)])
    with torch.no_grad():
        direct = backbone.eval()(images).numpy()
    np.testing.assert_allclose(cached[:32], direct, atol=1e-5)
    norms = np.linalg.norm(cached.reshape(len(cached), 2, 128), axis=2)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # each space L2-normalised


def test_turtle_trains_a_task_encoder_head_that_clusters(turtle_run: Trainer) -> None:
    metrics = turtle_run.evaluate().metrics
    head = turtle_run.model.cluster_head
    assert type(head).__name__ == "TaskEncoderHead" and head.encoder.preprocess_mode == "standardise"
    assert float(head.encoder.scale0.std()) > 0  # pre-processing fitted on the training features
    assert len([s for s in metrics["cluster_sizes"] if s > 0]) >= 5
    assert metrics["acc"] > 0.2  # random frozen CNN features: far from chance (0.1) after a few outer steps


def test_turtle_two_space_model_exports_with_parity(turtle_run: Trainer, tmp_path: Path) -> None:
    """Both backbones and the task encoder (with its pre-processing) are in the graph; probabilities match torch."""
    from training.export import export_checkpoint

    store = tmp_path / "store"
    export_checkpoint(turtle_run.root_dir, store, variants=(), parity_images=64, eval_limit=64)
    card = ModelCard.load(store / "model.json")
    assert card.method == "turtle" and card.backbone == "small_cnn+small_cnn"
    model, _, _ = load_checkpoint(turtle_run.root_dir / "final.pt")
    images = np.stack([np.asarray(turtle_run.eval_set[i][0].convert("RGB")) for i in range(16)])
    output = Engine(store / "model.onnx", providers=("cpu",)).run(images)
    with torch.no_grad():
        expected, _ = model(torch.stack([eval_transform(8)(turtle_run.eval_set[i][0]) for i in range(16)]))
    np.testing.assert_allclose(output.probabilities, expected.numpy(), atol=1e-4)


def test_turtle_refuses_uncached_training() -> None:
    with pytest.raises(ValueError, match="cached"):
        Trainer(load_config(TINY, ["method.name=turtle", "run.out_dir=/tmp/never"]))


def test_gamma_is_chosen_by_the_label_free_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`benchmarks/turtle_select.py`: one TURTLE run per gamma, the choice by the generalization score alone."""
    import json

    import benchmarks.common as common
    from benchmarks import turtle_select

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    overrides = ["method.name=turtle", "optim.epochs=2", "optim.batch_size=512", *TWO_SPACES]
    argv = ["--config", TINY.name, "--gammas", "1", "10", "--subset", "300", "--folds", "2"]
    assert turtle_select.main([*argv, "--out-dir", str(tmp_path / "runs"), *overrides]) == 0
    rows = json.loads((tmp_path / "results" / "turtle_selection.json").read_text())
    assert [r["gamma"] for r in rows] == [1.0, 10.0] and sum(r["chosen"] for r in rows) == 1
    assert next(r for r in rows if r["chosen"])["score"] == max(r["score"] for r in rows)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


@pytest.mark.parametrize(
    ("config", "method"),
    [
        (TINY, ["method.name=cc"]),
        (TINY, ["method.name=cces", "method.ccrop=true", "method.queue_size=200"]),
        (REPO / "configs" / "digits_scan_tiny.yaml", ["method.pretext=auto"]),
    ],
    ids=["cc", "cces", "scan"],
)
def test_every_method_trains_on_several_frozen_spaces(config: Path, method: list[str], tmp_path: Path) -> None:
    """CC, CCES (ContrastiveCrop boxes from both spaces) and SCAN (neighbours on the concatenation) take the two-space
    model as TURTLE does: their heads read both spaces' 256 features and the run clusters the real images."""
    from training.run import train

    config = load_config(config, [f"run.out_dir={tmp_path}", *TWO_SPACES, *method])
    summary = train(config)
    model, _, _ = load_checkpoint(sorted(config.run_dir.rglob("final.pt"))[-1])  # SCAN: its last stage
    assert isinstance(model.backbone, MultiSpace) and model.backbone.feature_dim == 256
    first = next(m for m in model.cluster_head.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 256
    assert summary["acc"] > 0.2  # frozen random features of real digits: well above chance (0.1)
