"""TURTLE on tiny tensors: the loss against a hand computation, its gradient through the inner steps against finite
differences, the inner Adam against torch.optim.Adam (what the official code runs), and recovery of clear clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from training.losses.turtle import (
    InnerState,
    TaskEncoder,
    fit_turtle,
    generalization_score,
    init_inner,
    inner_loop,
    inner_loss,
    turtle_objective,
)


def _set_head(encoder: TaskEncoder, space: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Set a weight-normed head so that its effective weight is `weight` (g = row norms, v = weight)."""
    head = encoder.heads[space]
    with torch.no_grad():
        head.parametrizations.weight.original0.copy_(weight.norm(dim=1, keepdim=True))
        head.parametrizations.weight.original1.copy_(weight)
        head.bias.copy_(bias)


def _hand_case() -> tuple[TaskEncoder, list[torch.Tensor]]:
    """2 one-dimensional spaces, 4 samples, K = 2; both heads map z to logits (z, −z), so p(cluster 0) = σ(2z)."""
    encoder = TaskEncoder([1, 1], 2).double()
    for s in range(2):
        _set_head(encoder, s, torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    z1 = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], dtype=torch.float64)
    return encoder, [z1, z2]


def _cluster_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    k = int(max(truth.max(), pred.max())) + 1
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (pred, truth), 1)
    rows, cols = linear_sum_assignment(-counts)
    return counts[rows, cols].sum() / truth.size


# --- hand-computed case
# Labels: p0 = mean(σ(2 z1), σ(2 z2)) = [.880797, .5, .550608, .068595] (they sum to 2, so the batch is balanced).
# Entropy: each space's mean p0 is (σ(2)+σ(−2)+σ(4)+σ(−4))/4 = .5 and (2σ(2)+2σ(−2))/4 = .5 → H = 2·ln 2.
# One inner step from W = b = 0: logits 0, q = .5, ∂CE/∂W_s[0] = mean_i (.5 − p0_i) z_i = −.336206 (space 1),
# −.190399 (space 2); ∂/∂W_s[1] the opposite; ∂/∂b = mean_i (.5 − p0_i) = 0.
#   SGD, lr 1: W_s = (−g_s, g_s) → logits (a, −a) with a = .336206·z1 and .190399·z2;
#   Adam, lr 1: step = lr·g/(|g| + eps) ≈ sign → W_s = (1, −1), logits (z, −z); b stays 0 (zero gradient).
# Prediction error = Σ_s mean_i [p0 log(1 + e^(−2a)) + (1 − p0) log(1 + e^(2a))]: 1.238902 (SGD), 1.646258 (Adam).
HAND_ENTROPY = 2 * math.log(2)
HAND_GRAD = (-0.33620616451342483, -0.19039853898894116)


@pytest.mark.parametrize(("optimizer", "expected_error"), [("sgd", 1.2389017929300046), ("adam", 1.6462575735186318)])
def test_loss_matches_hand_computation(optimizer: str, expected_error: float) -> None:
    encoder, spaces = _hand_case()
    labels, _ = encoder(spaces)
    torch.testing.assert_close(
        labels[:, 0], torch.tensor([0.8807970779778823, 0.5, 0.550608356030013, 0.06859456599210455]).double()
    )
    inner = init_inner([1, 1], 2, dtype=torch.float64, zero=True)
    loss, trained = turtle_objective(
        encoder, spaces, inner, gamma=0.5, inner_steps=1, inner_lr=1.0, inner_optimizer=optimizer
    )
    for s, g in enumerate(HAND_GRAD):
        step = [-g, g] if optimizer == "sgd" else [1.0, -1.0]
        torch.testing.assert_close(
            trained.params[2 * s], torch.tensor([[step[0]], [step[1]]]).double(), atol=1e-7, rtol=0
        )
        torch.testing.assert_close(trained.params[2 * s + 1], torch.zeros(2).double())
    assert loss.entropy.item() == pytest.approx(HAND_ENTROPY, abs=1e-12)
    assert loss.prediction_error.item() == pytest.approx(expected_error, abs=1e-7)
    assert loss.total.item() == pytest.approx(expected_error - 0.5 * HAND_ENTROPY, abs=1e-7)


# --- gradients against finite differences
def _tiny_problem(seed: int = 0) -> tuple[TaskEncoder, list[torch.Tensor], InnerState]:
    generator = torch.Generator().manual_seed(seed)
    spaces = [
        torch.randn(6, 3, generator=generator, dtype=torch.float64),
        torch.randn(6, 2, generator=generator).double(),
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TaskEncoder([3, 2], 3).double()
    inner = init_inner([3, 2], 3, generator=generator, dtype=torch.float64)
    return encoder, spaces, inner


def _finite_difference(fn: object, params: list[torch.Tensor], eps: float = 1e-6) -> list[torch.Tensor]:
    grads = []
    for p in params:
        grad = torch.zeros_like(p)
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            old = flat[j].item()
            flat[j] = old + eps
            plus = float(fn())
            flat[j] = old - eps
            minus = float(fn())
            flat[j] = old
            grad.view(-1)[j] = (plus - minus) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.5), ("adam", 0.1)])
def test_unrolled_gradient_flows_through_inner_steps(optimizer: str, lr: float) -> None:
    """Autograd through M = 3 inner steps equals central differences of the whole bilevel loss, and differs from the
    first-order gradient (so the inner steps do carry gradient to the task encoder)."""
    encoder, spaces, inner = _tiny_problem()
    params = list(encoder.parameters())

    def objective(hypergradient: str) -> torch.Tensor:
        loss, _ = turtle_objective(
            encoder,
            spaces,
            inner,
            gamma=0.7,
            inner_steps=3,
            inner_lr=lr,
            inner_optimizer=optimizer,
            hypergradient=hypergradient,
        )
        return loss.total

    unrolled = torch.autograd.grad(objective("unrolled"), params)
    first_order = torch.autograd.grad(objective("first_order"), params)
    with torch.no_grad():
        numeric = _finite_difference(lambda: objective("unrolled"), params)
    for a, n in zip(unrolled, numeric, strict=True):
        torch.testing.assert_close(a, n, atol=1e-7, rtol=1e-5)
    gap = sum(float((a - b).norm()) for a, b in zip(unrolled, first_order, strict=True))
    assert gap > 1e-4


def test_first_order_gradient_is_partial_derivative_at_fixed_classifiers() -> None:
    """Official (first-order) gradient = ∂/∂θ of [CE(W fixed, τ_θ) − γ H] with W the classifiers trained at θ."""
    encoder, spaces, inner = _tiny_problem(seed=1)
    params = list(encoder.parameters())
    kwargs = {"gamma": 0.7, "inner_steps": 3, "inner_lr": 0.1}
    loss, trained = turtle_objective(encoder, spaces, inner, **kwargs)
    analytic = torch.autograd.grad(loss.total, params)

    def fixed_classifiers() -> float:
        labels, per_space = encoder(spaces)
        entropy = sum(torch.special.entr(p.mean(0)).sum() for p in per_space)
        return float(inner_loss(trained.params, spaces, labels) - 0.7 * entropy)

    with torch.no_grad():
        numeric = _finite_difference(fixed_classifiers, params)
    for a, n in zip(analytic, numeric, strict=True):
        torch.testing.assert_close(a, n, atol=1e-7, rtol=1e-5)


def test_inner_adam_equals_torch_adam_on_linear_layers() -> None:
    """The written-out inner loop is the official one: nn.Linear per space + torch.optim.Adam on the summed CE."""
    generator = torch.Generator().manual_seed(3)
    spaces = [torch.randn(20, 5, generator=generator), torch.randn(20, 4, generator=generator)]
    targets = F.softmax(torch.randn(20, 3, generator=generator), dim=1)
    layers = [torch.nn.Linear(5, 3), torch.nn.Linear(4, 3)]
    state = InnerState(
        [t.detach().clone() for layer in layers for t in (layer.weight, layer.bias)],
        [torch.zeros_like(t) for layer in layers for t in (layer.weight, layer.bias)],
        [torch.zeros_like(t) for layer in layers for t in (layer.weight, layer.bias)],
    )
    adam = torch.optim.Adam([p for layer in layers for p in layer.parameters()], lr=0.01)
    for _ in range(7):
        adam.zero_grad()
        sum(F.cross_entropy(layer(z), targets) for layer, z in zip(layers, spaces, strict=True)).backward()
        adam.step()
    ours = inner_loop(state, spaces, targets, steps=7, lr=0.01)
    expected = [t for layer in layers for t in (layer.weight, layer.bias)]
    for a, b in zip(ours.params, expected, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)
    # warm start continues the same Adam: 7 more steps from the returned state = 14 steps of torch Adam
    for _ in range(7):
        adam.zero_grad()
        sum(F.cross_entropy(layer(z), targets) for layer, z in zip(layers, spaces, strict=True)).backward()
        adam.step()
    ours = inner_loop(ours, spaces, targets, steps=7, lr=0.01)
    for a, b in zip(ours.params, expected, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)


# --- end to end on clear clusters
def _blobs(n_per: int = 60, k: int = 4, seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
    """Two spaces of the same samples, each with K separated centres (different dims, offsets and scales)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per)
    spaces = []
    for dim, scale, offset in ((8, 1.0, 0.0), (5, 30.0, 100.0)):
        centres = torch.randn(k, dim, generator=generator) * 6
        points = centres[y] + torch.randn(len(y), dim, generator=generator)
        spaces.append(points * scale + offset)
    return spaces, y.numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_turtle_recovers_separated_clusters(seed: int) -> None:
    """Well-separated clusters seen in two differently scaled spaces come out exactly (ACC 1 up to label order)."""
    spaces, truth = _blobs(n_per=40, seed=seed)
    encoder, history = fit_turtle(
        spaces,
        4,
        gamma=10.0,
        inner_steps=10,
        outer_steps=60,
        inner_lr=0.05,
        outer_lr=0.02,
        batch_size=10_000,
        seed=seed,
        preprocess="standardise",
        log_every=20,
        monitor=lambda enc: {"acc": _cluster_accuracy(truth, enc.predict(spaces).numpy())},
    )
    assert _cluster_accuracy(truth, encoder.predict(spaces).numpy()) > 0.98
    assert history["step"] == [20.0, 40.0, 60.0] and history["clusters"][-1] == 4.0
    assert history["acc"][-1] > 0.98
    # the fitted pre-processing is part of the encoder: predict(raw) == forward(preprocessed)
    torch.testing.assert_close(encoder.predict_proba(spaces), encoder(encoder.preprocess(spaces))[0])


def test_fit_turtle_is_deterministic_and_leaves_global_rng_alone() -> None:
    spaces, _ = _blobs(n_per=20, k=3)
    state = torch.random.get_rng_state()
    kwargs = {"outer_steps": 5, "inner_steps": 2, "batch_size": 32, "seed": 7, "preprocess": "standardise"}
    a, _ = fit_turtle(spaces, 3, **kwargs)
    b, _ = fit_turtle(spaces, 3, warm_start=True, **kwargs)
    c, _ = fit_turtle(spaces, 3, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(pa, pc)
    assert not torch.equal(a.predict_proba(spaces), b.predict_proba(spaces))


def test_generalization_score_prefers_the_true_labelling() -> None:
    """TURTLE's criterion: held-out linear classifiers reproduce the true clusters, not a random labelling."""
    spaces, truth = _blobs()
    features = [(z - z.mean(0)) / z.std(0) for z in spaces]
    true_score = generalization_score(features, torch.from_numpy(truth), folds=5, max_iter=100)
    shuffled = torch.from_numpy(np.random.default_rng(0).permutation(truth))
    random_score = generalization_score(features, shuffled, folds=5, max_iter=100)
    assert true_score > 0.98 and random_score < 0.5
    adjusted = generalization_score(features, torch.from_numpy(truth), folds=5, max_iter=100, chance_adjusted=True)
    assert adjusted == pytest.approx((true_score - 0.25) / 0.75)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="disagree"):
        fit_turtle([torch.zeros(4, 2), torch.zeros(5, 2)], 2, outer_steps=1)
    with pytest.raises(ValueError, match="combine"):
        TaskEncoder([2], 2, combine="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preprocess"):
        TaskEncoder([2], 2, preprocess="pca")  # type: ignore[arg-type]
