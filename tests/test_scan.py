"""SCAN: losses against direct computations, mining against brute force, head selection, self-labelling weights and
threshold, the collapse guard, and the staged pipeline end to end on sklearn digits (skipping done stages)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import SCANConfig, load_config
from training.data.batch_augment import StrongAugment
from training.losses.contrastive import entropy_of_mean
from training.methods.scan import (
    CollapseError,
    SCANClustering,
    SelfLabel,
    check_collapse,
    inverse_frequency_weights,
    scan_consistency,
    scan_loss,
    select_head,
    selflabel_loss,
)
from training.mining import Neighbours, neighbour_agreement, topk_cosine_neighbours
from training.models.heads import ClusteringModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits_scan_tiny.yaml"


def _probabilities(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).softmax(dim=1)


# ------------------------------------------------------------------------------------------------ SCAN loss
def test_scan_consistency_matches_a_loop() -> None:
    pa, pn = _probabilities(7, 5, 0), _probabilities(7, 5, 1)
    direct = -sum(math.log(sum(pa[i, c] * pn[i, c] for c in range(5))) for i in range(7)) / 7
    assert float(scan_consistency(pa, pn)) == pytest.approx(float(direct), rel=1e-5)


def test_scan_loss_entropy_term_sign_and_scale() -> None:
    pa, pn = _probabilities(16, 4, 2), _probabilities(16, 4, 3)
    mean = pa.mean(dim=0)
    entropy = float(-(mean * mean.log()).sum())
    for weight in (0.0, 1.0, 5.0):
        total, consistency, h = scan_loss(pa, pn, weight)
        assert float(h) == pytest.approx(entropy, rel=1e-5)
        assert float(total) == pytest.approx(float(consistency) - weight * entropy, rel=1e-5)
    # A balanced batch is rewarded (lower loss) over a collapsed one with the same consistency.
    one_hot_balanced = torch.eye(4).repeat(4, 1)
    one_hot_collapsed = torch.zeros(16, 4)
    one_hot_collapsed[:, 0] = 1
    balanced, _, h_bal = scan_loss(one_hot_balanced, one_hot_balanced, 5.0)
    collapsed, _, h_col = scan_loss(one_hot_collapsed, one_hot_collapsed, 5.0)
    assert float(h_bal) == pytest.approx(math.log(4), rel=1e-5) and float(h_col) == pytest.approx(0.0, abs=1e-6)
    assert float(balanced) < float(collapsed)


def test_scan_loss_gradient_pulls_neighbours_together() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    p = logits.softmax(dim=1)
    loss, _, _ = scan_loss(p[:1], p[1:], entropy_weight=0.0)
    loss.backward()
    # descending the gradient raises the anchor's probability of the neighbour's cluster
    assert logits.grad[0, 1] < 0


def test_head_selection_picks_the_lowest_loss() -> None:
    assert select_head([3.0, -1.5, 0.2, -1.4]) == 1
    assert select_head([1.0, 1.0]) == 0
    with pytest.raises(ValueError):
        select_head([])


def test_scan_method_keeps_the_lowest_validation_loss_head() -> None:
    """After an epoch, the head with the lowest SCAN loss on the clean views and mined neighbours becomes
    `model.head_index` (what is exported), whatever the training losses said."""
    config = load_config(TINY)
    model = ClusteringModel(torch.nn.Identity(), 6, 3, projection_dim=4, num_cluster_heads=3)
    features = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    neighbours = topk_cosine_neighbours(features.numpy(), 4)
    method = SCANClustering(config, neighbours)
    from types import SimpleNamespace

    from training.methods.base import Batch

    out = method.loss(model, Batch([features, features + 0.01], torch.arange(32), torch.zeros(32)))
    assert float(out["loss"].detach()) == pytest.approx(sum(float(out[f"head{i}"]) for i in range(3)), rel=1e-5)
    ctx = SimpleNamespace(  # the fields of MethodContext this hook reads
        model=model,
        device=torch.device("cpu"),
        train_set=None,
        predict=lambda dataset: (None, features.numpy(), None),
    )
    expected = []
    with torch.no_grad():
        for head in model.cluster_heads:
            p = head(features)
            pairs = [scan_consistency(p, p[torch.from_numpy(neighbours[:, j])]) for j in range(4)]
            expected.append(float(torch.stack(pairs).mean()) - 5.0 * float(entropy_of_mean(p)))
    losses = {f"head{i}": -float(i) for i in range(3)}  # training losses that would pick head 2
    method.on_epoch_end(ctx, 0, losses)  # type: ignore[arg-type]
    assert model.head_index == int(np.argmin(expected)) == losses["head_index"]
    assert [losses[f"val_head{i}"] for i in range(3)] == pytest.approx(expected, abs=1e-4)


def test_mining_is_exact_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.1, 10, size=(300, 1)).astype(np.float32)
    k = 7
    got = topk_cosine_neighbours(x, k, block=64)  # several blocks
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    expected = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    assert got.shape == (300, k) and got.dtype == np.int64
    assert not (got == np.arange(300)[:, None]).any(), "a sample is never its own neighbour"
    # compare similarities (robust to exact ties), and the index sets
    np.testing.assert_allclose(np.take_along_axis(sim, got, 1), np.take_along_axis(sim, expected, 1), atol=1e-5)
    assert np.mean([set(a) == set(b) for a, b in zip(got, expected, strict=True)]) > 0.99


def test_neighbour_agreement_and_file_round_trip(tmp_path: Path) -> None:
    labels = np.array([0, 0, 1, 1])
    neighbours = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    assert neighbour_agreement(neighbours, labels) == pytest.approx(0.5)
    assert math.isnan(neighbour_agreement(neighbours, np.array([0, -1, 1, 1])))
    path = Neighbours(neighbours, 0.5, "backbone").save(tmp_path / "neighbours.npz")
    back = Neighbours.load(path)  # allow_pickle=False inside
    assert back.k == 2 and back.agreement == 0.5 and back.source == "backbone"
    np.testing.assert_array_equal(back.indices, neighbours)


# ------------------------------------------------------------------------------------------------ self-labelling
def test_selflabel_threshold_and_inverse_frequency_weighting() -> None:
    # weak predictions: 3 confident for cluster 0, 1 confident for cluster 1, 2 below the threshold
    p_weak = torch.tensor([[0.995, 0.005, 0.0]] * 3 + [[0.001, 0.998, 0.001]] + [[0.98, 0.02, 0.0], [0.4, 0.3, 0.3]])
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    loss, mask = selflabel_loss(logits, p_weak, threshold=0.99)
    assert mask.tolist() == [True, True, True, True, False, False]
    weights = inverse_frequency_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert float(weights[0]) == pytest.approx(float(weights[1]) / 3) and float(weights[2]) == 0.0
    log_p = logits.log_softmax(dim=1)
    w = {0: 1 / 3, 1: 1.0}
    targets = [0, 0, 0, 1]
    direct = -sum(w[t] * float(log_p[i, t]) for i, t in enumerate(targets)) / sum(w[t] for t in targets)
    assert float(loss) == pytest.approx(direct, rel=1e-5)
    # the rare pseudo-label counts as much as the frequent one in total
    assert 3 * float(weights[0]) == pytest.approx(float(weights[1]))


def test_selflabel_without_confident_samples_is_zero_with_a_graph() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    loss, mask = selflabel_loss(logits, torch.full((4, 3), 1 / 3), threshold=0.99)
    assert not mask.any() and float(loss) == 0.0
    loss.backward()  # still differentiable: a step with no confident sample is a no-op, not a crash


def test_collapse_guard_fires_on_a_degenerate_model() -> None:
    config = load_config(TINY)
    method = SelfLabel(config)
    model = ClusteringModel(torch.nn.Identity(), 6, 10, projection_dim=4)
    with torch.no_grad():  # a degenerate head: cluster 3 wins for every input
        model.cluster_head.net[-1].bias.zero_()
        model.cluster_head.net[-1].bias[3] = 100.0
    assignments = model.cluster_head(torch.randn(200, 6)).argmax(dim=1).numpy()
    with pytest.raises(CollapseError) as caught:
        method.guard(assignments, 10, "test")
    assert caught.value.report()["cluster_sizes"][3] == 200 and caught.value.share == 1.0
    # a healthy spread passes and reports sizes
    assert check_collapse(np.arange(200) % 10, 10, 0.5, "ok") == [20] * 10


def test_strong_augment_shapes_range_and_cutout() -> None:
    """The official recipe: 4 ops of 14 per image, Cutout side drawn in [1, 16] px at 32 px (grey fill)."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    augment = StrongAugment(64, cutout_fraction=0.5)
    assert augment.num_ops == 4 and len(augment.ops) == 14
    out = augment(x)
    assert out.shape == (8, 3, 64, 64) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    holes = StrongAugment(32, cutout_fraction=0.5).cutout(torch.zeros(400, 3, 32, 32))
    grey_share = (holes == 0.5).float().mean(dim=(1, 2, 3))
    assert float(grey_share.max()) <= (16 / 32) ** 2 + 1e-6 and float(grey_share.min()) < 0.05  # random side
    assert float(grey_share.max()) > 0.15  # large holes happen too


def test_strong_view_is_the_same_recipe_on_every_path() -> None:
    """One recipe: the per-image runner and the batched runner are the same module (same ops, same ranges)."""
    from PIL import Image

    from training.data.views import Strong

    recipe = Strong(16, cutout_fraction=0.5)
    assert isinstance(recipe.batched(), StrongAugment)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    torch.manual_seed(1)
    per_image = recipe.per_image()(image)
    torch.manual_seed(1)
    batched = recipe.batched()(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float().div(255)[None])
    assert torch.allclose(per_image, batched[0], atol=1e-6)


def test_scan_pairs_include_the_sample_itself() -> None:
    """Official mining: the partner of a sample is one of its k neighbours or the sample itself."""
    from training.methods.scan import NeighbourPairs

    neighbours = np.array([[1, 2], [0, 2], [0, 1]])
    passes = [np.arange(3, dtype=np.float32)[:, None]]
    pairs = NeighbourPairs(neighbours, np.zeros(3), passes=passes, include_self=True)
    assert pairs.neighbours.shape == (3, 3) and (pairs.neighbours[:, 0] == np.arange(3)).all()
    partners = {int(pairs[0][1]) for _ in range(200)}
    assert partners == {0, 1, 2}
    assert {int(NeighbourPairs(neighbours, np.zeros(3), passes=passes)[0][1]) for _ in range(200)} == {1, 2}


def test_scan_config_defaults_follow_the_paper() -> None:
    s = SCANConfig()
    assert (s.neighbours, s.entropy_weight, s.selflabel_threshold, s.pretext_temperature) == (20, 5.0, 0.99, 0.1)


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_runs_all_stages_then_skips_them(tmp_path: Path) -> None:
    from training.run import train as run_scan_pipeline
    from training.trainer import load_checkpoint

    overrides = [f"run.out_dir={tmp_path}", "run.max_steps_per_epoch=2", "data.subset=512", "data.eval_subset=256"]
    config = load_config(TINY, overrides)
    metrics = run_scan_pipeline(config)
    run = config.run_dir
    for artifact in ("pretext/final.pt", "neighbours.npz", "scan/final.pt", "final.pt", "metrics.json"):
        assert (run / artifact).exists(), artifact
    assert (run / "selflabel" / "final.pt").exists() != (run / "selflabel" / "stopped.json").exists()
    assert metrics["stage"] == ("selflabel" if (run / "selflabel" / "final.pt").exists() else "scan")
    neighbours = Neighbours.load(run / "neighbours.npz")
    assert neighbours.indices.shape == (512, 5) and neighbours.source == "projection"
    assert 0.0 <= metrics["neighbour_agreement"] <= 1.0 and metrics["neighbour_k"] == 5
    scan_log = [json.loads(line) for line in (run / "scan" / "log.jsonl").read_text().splitlines()]
    last = scan_log[-1]
    assert last["head_index"] == select_head([last[f"val_head{i}"] for i in range(3)])  # validation loss, not train
    model, loaded, state = load_checkpoint(run / "scan" / "final.pt")
    assert model.head_index == last["head_index"] and loaded.method.name == "scan"
    assert len(model.cluster_heads) == 3

    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/final.pt")}
    again = run_scan_pipeline(config)  # every stage done: nothing retrains
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/final.pt")} == stamps
    assert again["acc"] == metrics["acc"] and again["seconds"] == {}

    # removing the last stage's artifact reruns only that stage
    selflabel = run / "selflabel"
    for path in selflabel.iterdir():
        path.unlink()
    run_scan_pipeline(config)
    assert (run / "scan" / "final.pt").stat().st_mtime_ns == stamps[run / "scan" / "final.pt"]
    assert (selflabel / "final.pt").exists() != (selflabel / "stopped.json").exists()


def test_scan_resumes_inside_a_stage_exactly(tmp_path: Path) -> None:
    """A SCAN stage interrupted after its first epoch resumes from its own last.pt and ends where an uninterrupted
    run ends (same weights), without retraining the stages before it."""
    from training.run import train
    from training.trainer import load_checkpoint

    common = ["run.max_steps_per_epoch=2", "data.subset=256", "data.eval_subset=64", "method.selflabel_epochs=0"]
    straight = load_config(TINY, [f"run.out_dir={tmp_path / 'a'}", *common, "method.scan_epochs=2"])
    train(straight)
    interrupted = load_config(TINY, [f"run.out_dir={tmp_path / 'b'}", *common, "method.scan_epochs=1"])
    train(interrupted)
    run = interrupted.run_dir
    (run / "scan" / "final.pt").unlink()  # as if stopped after epoch 1: only scan/last.pt (epoch 1) remains
    pretext = (run / "pretext" / "final.pt").stat().st_mtime_ns
    resumed = load_config(TINY, [f"run.out_dir={tmp_path / 'b'}", *common, "method.scan_epochs=2"])
    train(resumed)
    assert (run / "pretext" / "final.pt").stat().st_mtime_ns == pretext
    epochs = [json.loads(line)["epoch"] for line in (run / "scan" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    a, _, _ = load_checkpoint(straight.run_dir / "final.pt")
    b, _, _ = load_checkpoint(run / "final.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_scan_run_exports_the_kept_head(tmp_path: Path) -> None:
    """`deepclust export <run_dir>` serves `cluster_heads[head_index]` of the pipeline's final checkpoint."""
    from serving.core.contract import ModelCard
    from serving.core.engine import cpu_session
    from training.export import export_checkpoint, run_onnx, uint8_images
    from training.run import train as run_scan_pipeline
    from training.trainer import load_checkpoint

    overrides = [
        f"run.out_dir={tmp_path}",
        "run.max_steps_per_epoch=2",
        "data.subset=256",
        "data.eval_subset=128",
        "method.pretext=skip",
        "method.selflabel_epochs=0",
    ]
    config = load_config(TINY, overrides)
    run_scan_pipeline(config)
    model, _, _ = load_checkpoint(config.run_dir / "final.pt")
    with torch.no_grad():  # make the kept head distinguishable from the others
        model.cluster_heads[model.head_index].net[-1].bias.add_(torch.arange(10.0))
    state = torch.load(config.run_dir / "final.pt", weights_only=True)
    state["model"] = model.state_dict()
    torch.save(state, config.run_dir / "final.pt")

    export_checkpoint(config.run_dir, tmp_path / "store", variants=(), parity_images=32, eval_limit=32)
    assert ModelCard.load(tmp_path / "store" / "model.json").method == "scan"
    from training.data.datasets import create_dataset

    images = uint8_images(create_dataset("digits", "test"), 8, np.arange(16))
    p_onnx, _ = run_onnx(cpu_session(tmp_path / "store" / "model.onnx"), images)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0].numpy()
    np.testing.assert_allclose(p_onnx, expected, atol=1e-4)


def test_selflabel_selection_is_label_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark that picks the self-labelling settings: one shared SCAN run, one self-label run per candidate,
    the choice by the label-free generalization score (ACC on training labels only reported beside it)."""
    import benchmarks.common as common
    from benchmarks import selflabel_select

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    argv = ["--config", TINY.name, "--thresholds", "0.5", "0.3", "--lrs", "1e-4", "--subset", "300"]
    assert selflabel_select.main([*argv, "--out-dir", str(tmp_path / "runs")]) == 0
    rows = json.loads((tmp_path / "results" / "selflabel_selection.json").read_text())
    assert [(r["selflabel_threshold"], r["selflabel_lr"]) for r in rows] == [(0.5, 1e-4), (0.3, 1e-4)]
    assert sum(r["chosen"] for r in rows) == 1
    assert next(r for r in rows if r["chosen"])["score"] == max(r["score"] for r in rows)
    assert all(r["holdout_n"] == 300 and 0.0 < r["holdout_acc"] <= 1.0 and -1.0 <= r["score"] <= 1.0 for r in rows)
    shared = (tmp_path / "runs" / f"{TINY.stem}-base" / "scan" / "log.jsonl").read_bytes()  # wall-clock stamped
    for threshold in ("0.5", "0.3"):
        run = tmp_path / "runs" / f"{TINY.stem}-t{threshold}-lr0.0001"
        assert (run / "scan" / "log.jsonl").read_bytes() == shared  # reused, not retrained
        assert (run / "selflabel" / "final.pt").exists()
    subset = selflabel_select.holdout_indices(1000, 300, seed=0)
    assert np.array_equal(subset, selflabel_select.holdout_indices(1000, 300, seed=0))
    assert len(np.unique(subset)) == 300


def test_label_free_score_prefers_the_labelling_that_follows_the_gaps() -> None:
    """On three separated blobs: the blob labelling beats a labelling that cuts through them, and a collapsed one
    scores 0 (the chance adjustment), so the choice cannot be won by merging clusters."""
    from benchmarks.selflabel_select import label_free_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4.0
    blobs = np.repeat(np.arange(3), 100)
    embedding = (centres[blobs] + rng.normal(size=(300, 16))).astype(np.float32)
    cuts = (embedding[:, 0] > np.median(embedding[:, 0])).astype(int) + (embedding[:, 1] > 0)  # ignores the blobs
    subset = np.arange(300)
    follows, cutting = label_free_score(embedding, blobs, subset, 0), label_free_score(embedding, cuts, subset, 0)
    assert follows > 0.95 and follows > cutting + 0.05
    assert label_free_score(embedding, np.zeros(300, int), subset, 0) == 0.0
