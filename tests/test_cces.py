"""CCES: support-set queue, nearest neighbours, ContrastiveCrop boxes and crops, the CC reduction, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.config import load_config
from training.data.ccrop import (
    BoxState,
    ContrastiveCrop,
    boxes_from_heatmaps,
    heatmaps_from_feature_maps,
    sample_centres,
    sample_crops,
)
from training.methods.base import Batch, create_method
from training.methods.cces import FeatureQueue
from training.models.backbones import create_backbone
from training.models.heads import ClusteringModel
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "digits_cc_tiny.yaml"
CCES_TINY = ["method.name=cces", "method.queue_size=200", "method.warmup_share=0.34", "method.update_share=0.34"]


# ------------------------------------------------------------------------------------------------ queue and NN
def test_queue_is_fifo_wraps_around_and_keeps_its_size() -> None:
    queue = FeatureQueue(size=5, dim=3, seed=0)
    start = queue.features.clone()
    assert queue.features.shape == (5, 3)
    assert torch.allclose(queue.features.norm(dim=1), torch.ones(5))  # random start, L2-normalised
    batches = [torch.randn(3, 3) * 7, torch.randn(4, 3) * 7]  # 3 + 4 = 7 > 5: the second batch wraps around
    queue.enqueue(batches[0], torch.tensor([0, 1, 2]))
    assert torch.equal(queue.ordered()[:2], start[3:])  # two random entries remain, oldest first
    queue.enqueue(batches[1], torch.tensor([3, 4, 5, 6]))
    pushed = F.normalize(torch.cat(batches), dim=1)
    assert queue.size == 5 and queue.ptr == 7 % 5
    assert torch.allclose(queue.ordered(), pushed[-5:])  # the newest five, oldest first: nothing of batch 2 lost
    assert queue.labels[torch.roll(torch.arange(5), -queue.ptr)].tolist() == [2, 3, 4, 5, 6]
    big = torch.randn(12, 3)
    queue.enqueue(big)
    assert torch.allclose(queue.ordered(), F.normalize(big[-5:], dim=1))  # more than fits: the newest five


def test_nearest_neighbour_equals_brute_force_l2_on_normalised_features() -> None:
    torch.manual_seed(0)
    queue = FeatureQueue(size=300, dim=16, seed=1)
    queue.enqueue(torch.randn(250, 16) * torch.rand(250, 1) * 10)  # different norms: must not matter
    queries = torch.randn(40, 16) * 5
    found = queue.nearest(queries)
    q = F.normalize(queries, dim=1)
    brute = torch.tensor(
        [min(range(queue.size), key=lambda j: float(((qi - queue.features[j]) ** 2).sum())) for qi in q]
    )
    assert torch.equal(found, brute)


# ------------------------------------------------------------------------------------------------ boxes and crops
def test_boxes_follow_a_synthetic_heat_map_and_stay_inside_the_image() -> None:
    maps = torch.zeros(3, 4, 8, 8)
    maps[0, :, 2:5, 5:7] = 1.0  # hot rows 2-4, columns 5-6 (spread over channels: the heat map sums them)
    maps[1, 0, 0, 0] = 3.0  # a single hot corner cell
    # maps[2] is constant: no information -> the whole image
    heat = heatmaps_from_feature_maps(maps)
    assert heat.shape == (3, 8, 8) and float(heat[0].max()) == 1.0 and float(heat[0].min()) == 0.0
    boxes = boxes_from_heatmaps(heat, threshold=0.1, resolution=64)
    assert (
        ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    )
    x0, y0, x1, y1 = boxes[0].tolist()
    cell = 1 / 8  # bilinear upsampling may spread the box by up to one cell of the map
    assert 5 / 8 - cell <= x0 <= 5 / 8 and 7 / 8 <= x1 <= 7 / 8 + cell
    assert 2 / 8 - cell <= y0 <= 2 / 8 and 5 / 8 <= y1 <= 5 / 8 + cell
    assert boxes[1, 0] == 0 and boxes[1, 1] == 0 and boxes[1, 2] <= 2 / 8 and boxes[1, 3] <= 2 / 8
    assert torch.equal(boxes[2], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # a higher threshold shrinks the box
    tight = boxes_from_heatmaps(heat[:1] * torch.linspace(0.2, 1, 8).view(1, 1, 8), threshold=0.6)
    assert tight[0, 0] > boxes[0, 0]


def test_beta_sampled_centres_are_inside_the_box_and_crops_inside_the_image() -> None:
    torch.manual_seed(0)
    n = 4000
    box = torch.tensor([0.1, 0.5, 0.6, 0.9])
    boxes = box.repeat(n, 1)
    cx, cy, w, h = sample_crops(boxes, min_scale=0.05, alpha=0.6)
    assert ((cx - w / 2 >= -1e-6) & (cx + w / 2 <= 1 + 1e-6) & (cy - h / 2 >= -1e-6) & (cy + h / 2 <= 1 + 1e-6)).all()
    feasible = (torch.maximum(box[0], w / 2) <= torch.minimum(box[2], 1 - w / 2)) & (
        torch.maximum(box[1], h / 2) <= torch.minimum(box[3], 1 - h / 2)
    )
    assert feasible.float().mean() > 0.3
    assert ((cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3]))[feasible].all()
    # small alpha pushes centres to the box edges, large alpha to its middle (Beta(a, a))
    lo, hi, point = torch.full((n,), 0.1), torch.full((n,), 0.6), torch.zeros(n)  # a point-sized crop
    small, large = sample_centres(lo, hi, point, alpha=0.2), sample_centres(lo, hi, point, alpha=5.0)
    assert ((small >= 0.1) & (small <= 0.6)).all()
    mid = 0.35
    assert (small - mid).abs().mean() > 1.5 * (large - mid).abs().mean()


def test_batched_and_pil_crops_take_their_content_from_the_box() -> None:
    torch.manual_seed(0)
    size, n = 32, 64
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(n, 3, 64, 64).contiguous()  # value = x position
    boxes = torch.tensor([[0.0, 0.0, 0.2, 1.0], [0.8, 0.0, 1.0, 1.0]]).repeat(n // 2, 1)
    state = BoxState(boxes)
    recipe = ContrastiveCrop(size, strength=0.0, min_scale=0.02, alpha=0.6, state=state)
    augment = recipe.batched()
    augment.grayscale_p = 0.0
    indices = torch.arange(n)
    assert torch.equal(augment(ramp, indices), augment(ramp, indices)) is False  # inactive: still random plain crops
    state.active = True  # one state shared by every runner of the recipe
    out = augment(ramp, indices)
    assert out.shape == (n, 3, size, size)
    centre = out[:, 0, size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].mean(dim=(1, 2))
    # centred on the left / right strip, or as near to it as a large crop allows (never past the middle)
    assert (centre[0::2] <= 0.5 + 1e-4).all() and (centre[1::2] >= 0.5 - 1e-4).all()
    assert float(centre[0::2].mean()) < 0.4 < 0.6 < float(centre[1::2].mean())
    view = recipe.per_image()
    image = Image.fromarray((ramp[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    left = torch.stack([view(image, 0) for _ in range(20)])
    right = torch.stack([view(image, 1) for _ in range(20)])
    assert left.shape == (20, 3, size, size) and float(left.mean()) < 0.45 < 0.55 < float(right.mean())


# ------------------------------------------------------------------------------------------------ losses
def _model_and_batch(seed: int = 0) -> tuple[ClusteringModel, Batch]:
    torch.manual_seed(seed)
    model = ClusteringModel(create_backbone("small_cnn", pretrained=False), 128, 10, projection_dim=32)
    features = [torch.randn(64, 128).abs() * 3, torch.randn(64, 128).abs() * 3]
    return model, Batch(features, torch.arange(64), torch.randint(0, 10, (64,)))


def test_cces_without_neighbours_and_crops_is_exactly_cc() -> None:
    model, batch = _model_and_batch()
    cc = create_method(load_config(TINY, ["method.instance_temperature=0.2", "method.cluster_temperature=1.0"]))
    cces = create_method(load_config(TINY, ["method.name=cces", "method.nn=none", "method.ccrop=false"]))
    a, b = cc.loss(model, batch), cces.loss(model, batch)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["instance"], b["instance"])
    cces.on_step_end(batch)
    assert cces.state_dict() == {}  # no queue, no boxes
    # with the batch itself in the support set each neighbour is the sample itself: CC's loss again (up to rounding);
    # with other samples there, the neighbour positives change the loss
    single = create_method(load_config(TINY, ["method.name=cces", "method.nn=double", "method.ccrop=false"]))
    single.on_step_end(batch)
    assert torch.allclose(single.loss(model, batch)["loss"], a["loss"], atol=1e-4)
    other = _model_and_batch(seed=1)[1]
    single.on_step_end(other)
    single.queue.features[single.queue.nearest(batch.features[0])] *= -1  # hide the batch's own entries
    assert not torch.allclose(single.loss(model, batch)["loss"], a["loss"], atol=1e-3)


def _mode(nn: str, batch: Batch, other: Batch) -> dict[str, torch.Tensor]:
    """Losses of CCES in neighbour mode `nn` with a support set that holds only `other` (not `batch`)."""
    model, _ = _model_and_batch()
    method = create_method(load_config(TINY, ["method.name=cces", f"method.nn={nn}", "method.queue_size=64"]))
    method.on_step_end(other)
    return method.loss(model, batch)


def test_neighbour_modes_follow_the_paper() -> None:
    """Table 4 of the CCES paper: single1 puts NN(xi1) in the instance loss only, single2 in the cluster loss only,
    double in both; each loss where the neighbour is not used equals CC's (= nn none)."""
    _, batch = _model_and_batch()
    other = _model_and_batch(seed=1)[1]
    none, single1, single2, double = (_mode(nn, batch, other) for nn in ("none", "single1", "single2", "double"))
    assert torch.equal(single1["cluster"], none["cluster"]) and not torch.allclose(
        single1["instance"], none["instance"]
    )
    assert torch.equal(single2["instance"], none["instance"]) and not torch.allclose(
        single2["cluster"], none["cluster"]
    )
    assert torch.equal(double["instance"], single1["instance"]) and torch.equal(double["cluster"], single2["cluster"])


def test_cluster_entropy_is_on_the_neighbours_assignments() -> None:
    """Eq. 9: with the neighbour in the cluster loss, the balance term is H of phi_C(NN(xi1)) and of view 2."""
    from training.losses.contrastive import balance_term, cluster_contrastive

    model, batch = _model_and_batch()
    other = _model_and_batch(seed=1)[1]
    method = create_method(load_config(TINY, ["method.name=cces", "method.nn=single2", "method.queue_size=64"]))
    method.on_step_end(other)
    n1, _ = method.neighbours(batch.features[0])
    with torch.no_grad():
        p_n, p2 = model.cluster_head(n1), model.cluster_head(batch.features[1])
        expected = cluster_contrastive(p_n, p2, 1.0) + balance_term(p_n) + balance_term(p2)
        got = method.loss(model, batch)["cluster"]
    assert torch.allclose(got, expected, atol=1e-6)


def test_neighbour_search_is_fp32_inside_bf16_autocast() -> None:
    """Near-ties that bf16 cosines cannot separate: under autocast the search still finds the fp32 neighbour."""
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, 64, generator=generator), dim=1)
    candidates = base + 1e-3 * torch.randn(512, 64, generator=generator)  # all within bf16's rounding of each other
    queue = FeatureQueue(512, 64)
    queue.enqueue(candidates)
    query = base + 1e-3 * torch.randn(4, 64, generator=generator)
    exact = queue.nearest(query)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert torch.equal(queue.nearest(query), exact)
        rounded = (F.normalize(query, dim=1) @ queue.features.t()).argmax(dim=1)
    assert not torch.equal(rounded, exact)  # the same product in bf16 picks other entries: the test can fail


def test_neighbour_positive_is_the_support_set_entry_rescaled() -> None:
    model, batch = _model_and_batch()
    method = create_method(load_config(TINY, ["method.name=cces", "method.nn=double", "method.queue_size=64"]))
    method.on_step_end(batch)  # the support set is now exactly this batch's view-1 features
    found, _ = method.neighbours(batch.features[0])
    assert torch.allclose(found, batch.features[0], atol=1e-4)  # each feature's nearest entry is itself
    losses = method.loss(model, batch)
    assert torch.isfinite(losses["loss"]) and float(losses["nn_label_agree"]) == 1.0
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.instance_head.parameters())


def test_trainer_runs_cc_and_cces_none_off_identically(tmp_path: Path) -> None:
    common = [
        f"run.out_dir={tmp_path}",
        "run.max_steps_per_epoch=2",
        "optim.epochs=1",
        "method.instance_temperature=0.2",
    ]
    cc = Trainer(load_config(TINY, [*common, "run.name=cc"]))
    cc.fit()
    cces = Trainer(
        load_config(TINY, [*common, "run.name=cces", "method.name=cces", "method.nn=none", "method.ccrop=false"])
    )
    cces.fit()
    for (name, p), q in zip(cc.model.state_dict().items(), cces.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------ checkpoints
def _fit(tmp_path: Path, epochs: int) -> Trainer:
    config = load_config(
        TINY, [f"run.out_dir={tmp_path}", "run.max_steps_per_epoch=3", f"optim.epochs={epochs}", *CCES_TINY]
    )
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def test_resume_restores_queue_and_boxes_exactly(tmp_path: Path) -> None:
    straight = _fit(tmp_path / "a", 3)
    _fit(tmp_path / "b", 2)
    state = torch.load(tmp_path / "b" / "digits-cc-tiny" / "last.pt", weights_only=True)["method"]
    assert state["queue"]["features"].shape == (200, 128) and state["boxes"].shape[1] == 4
    assert int(state["queue"]["ptr"]) == (2 * 3 * 128) % 200
    resumed = _fit(tmp_path / "b", 3)
    assert resumed.epoch == 3
    assert torch.equal(straight.method.queue.features, resumed.method.queue.features)
    assert straight.method.queue.ptr == resumed.method.queue.ptr
    assert torch.equal(straight.method.boxes, resumed.method.boxes)
    assert len(resumed.method.boxes) == len(resumed.train_set)
    assert resumed.method.box_state.active and resumed.method.box_state.boxes is resumed.method.boxes
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_cached_mode_swaps_in_a_contrastive_crop_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen backbone: boxes once, and the last augmented cached pass is replaced by a ContrastiveCrop pass."""
    monkeypatch.setenv("DEEPCLUST_CACHE", str(tmp_path / "cache"))
    config = load_config(
        TINY,
        [
            f"run.out_dir={tmp_path}",
            "run.max_steps_per_epoch=2",
            "optim.epochs=2",
            "data.augment_on=loader",
            "model.freeze_backbone=true",
            "model.cached_features=true",
            "model.feature_views=2",
            "method.name=cces",
            "method.queue_size=256",
            "method.warmup_share=0.5",
        ],
    )
    trainer = Trainer(config)
    trainer.fit()
    passes = trainer.method._cached_data.passes
    plain = trainer.cached_passes(trainer.train_set, ["aug1"])[0]
    assert len(passes) == 3 and not torch.equal(passes[-1], torch.from_numpy(plain))
    assert trainer.method.boxes.shape == (len(trainer.train_set), 4)
    keys = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "features").glob("*.json")]
    kinds = {(k["recipe"] if isinstance(k["recipe"], str) else k["recipe"]["kind"], k["seed"]) for k in keys}
    expected = {("clean", 0), ("crop_jitter", 1000), ("crop_jitter", 1001), ("heatmap", 0), ("contrastive_crop", 2000)}
    assert expected <= kinds  # both CCES passes are cached on disk


def test_cces_checkpoint_exports_like_cc(tmp_path: Path) -> None:
    """A CCES checkpoint (queue and boxes in its method state) exports to the same ONNX contract as CC's."""
    from serving.core.contract import ModelCard
    from training.export import export_checkpoint

    trainer = _fit(tmp_path / "run", 2)
    result = export_checkpoint(trainer.run_dir, tmp_path / "store", variants=(), parity_images=64, eval_limit=64)
    card = ModelCard.load(tmp_path / "store" / "model.json")
    assert card.method == "cces" and (tmp_path / "store" / "model.onnx").is_file() and result is not None


def test_heat_maps_on_onnxruntime_match_torch_on_real_images() -> None:
    """CPU heat-map passes run on onnxruntime (as feature passes do); the maps, and so the boxes, must be torch's."""
    from training.data.ccrop import _HeatMaps, compute_heatmaps
    from training.data.datasets import create_dataset
    from training.data.views import eval_transform
    from training.models.backbones import create_backbone

    backbone = create_backbone("effnet_lite0", pretrained=True).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.utils.data.Subset(create_dataset("cifar10", "test"), range(12))
    torch.manual_seed(5)
    expected_draw = torch.rand(1)
    torch.manual_seed(5)
    heat = compute_heatmaps(backbone, images, 96, batch_size=8)  # CPU, no autocast: onnxruntime
    # the global random stream is untouched (a cache miss mid-training must not shift a run's draws)
    assert torch.equal(torch.rand(1), expected_draw)
    # the export must not leave batch norms in training mode or move their statistics (it once did, via the wrapper)
    assert backbone.training and all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    with torch.inference_mode():
        reference = _HeatMaps(backbone.eval())(torch.stack([eval_transform(96)(images[i][0]) for i in range(12)]))
    assert heat.shape == reference.shape == (12, 3, 3)
    assert float((heat - reference).abs().max()) < 1e-4
    assert float(heat.flatten(1).std(1).min()) > 1e-3  # real maps: not constant
    assert torch.equal(boxes_from_heatmaps(heat), boxes_from_heatmaps(reference))


def test_several_spaces_give_one_heat_map_with_an_equal_vote_each() -> None:
    """ContrastiveCrop on several frozen spaces: one map per image, the normalised mean of the spaces' own maps (two
    copies of one backbone give exactly its map; a second, different space moves it)."""
    from training.data.ccrop import _HeatMaps
    from training.models.backbones import MultiSpace, create_backbone

    torch.manual_seed(0)
    a, b = create_backbone("small_cnn").eval(), create_backbone("small_cnn").eval()
    images = torch.rand(6, 3, 16, 16)
    with torch.inference_mode():
        single = _HeatMaps(a)(images)
        twice = _HeatMaps(MultiSpace(["a", "a"], [a, a]))(images)
        mixed = _HeatMaps(MultiSpace(["a", "b"], [a, b]))(images)
        own = (single + _HeatMaps(b)(images)).flatten(1)
    torch.testing.assert_close(twice, single)
    expected = (own - own.amin(1, keepdim=True)) / (own.amax(1, keepdim=True) - own.amin(1, keepdim=True))
    torch.testing.assert_close(mixed.flatten(1), expected)
    assert float((mixed - single).abs().max()) > 1e-3
