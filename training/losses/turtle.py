"""TURTLE (Gadetsky, Jiang, Brbić, "Let Go of Your Labels with Unsupervised Transfer", ICML 2024), on cached features.

The idea: among all labellings of a data set, the human one is the labelling that linear classifiers in good
representation spaces learn most easily (largest margin). TURTLE therefore trains a *task encoder* (a linear map per
space, giving soft labels) so that per-space linear classifiers, trained for a few steps on those labels, fit them as
well as possible, while an entropy term keeps the labelling from collapsing onto one cluster:

    min_θ  Σ_s CE(w_s(θ)·z_s, τ_θ(z)) − γ Σ_s H(mean_i σ(θ_s z_s,i)),   w_s(θ) = M inner steps on CE(w·z_s, τ_θ(z))

Everything here works on feature tensors already in memory (one [N, D_s] tensor per space), on the CPU. The settings
that the official code (github mlbio-epfl/turtle, `run_turtle.py`) uses are the defaults; where this module offers
more (feature pre-processing, summed logits, an unrolled hypergradient, SGD inner steps) the official choice is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

Preprocess = Literal["none", "l2", "standardise"]
Combine = Literal["mean_probs", "sum_logits"]
Hypergradient = Literal["first_order", "unrolled"]
InnerOptimizer = Literal["adam", "sgd"]

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as in the official code (inner and outer)
ADAM_EPS = 1e-8


def _check(value: str, kind: object, what: str) -> None:
    if value not in get_args(kind):
        raise ValueError(f"{what} must be one of {get_args(kind)}, got {value!r}")


def _check_spaces(spaces: Sequence[Tensor]) -> None:
    if not spaces:
        raise ValueError("TURTLE needs at least one feature space")
    if any(z.ndim != 2 for z in spaces):
        raise ValueError(f"every space must be [N, D], got shapes {[tuple(z.shape) for z in spaces]}")
    if len({z.shape[0] for z in spaces}) != 1:
        raise ValueError(f"spaces disagree on the number of samples: {[z.shape[0] for z in spaces]}")


class TaskEncoder(nn.Module):
    """τ_θ: one weight-normed linear map per space → soft labels over K clusters.

    `combine="mean_probs"` (official code, paper Eq. 9) averages the per-space softmaxes; `"sum_logits"` sums the
    per-space logits and takes one softmax (a product of experts: a sample is confident only if the spaces agree).
    Weight norm (w = g·v/‖v‖ per output row) is what the official code uses; it decouples the scale of each cluster's
    direction from the direction, which keeps Adam's outer steps well-conditioned.

    The encoder also holds the feature pre-processing fitted on the training features (see `fit_preprocessing`), so
    `predict` on raw features of new images applies exactly the transform the encoder was trained on.
    """

    def __init__(
        self,
        dims: Sequence[int],
        k: int,
        *,
        combine: Combine = "mean_probs",
        preprocess: Preprocess = "none",
    ) -> None:
        super().__init__()
        _check(combine, Combine, "combine")
        _check(preprocess, Preprocess, "preprocess")
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        self.dims = [int(d) for d in dims]
        self.k = k
        self.combine = combine
        self.preprocess_mode = preprocess
        self.heads = nn.ModuleList(parametrizations.weight_norm(nn.Linear(d, k)) for d in self.dims)
        for i, d in enumerate(self.dims):
            self.register_buffer(f"shift{i}", torch.zeros(d))
            self.register_buffer(f"scale{i}", torch.ones(d))

    # -- feature pre-processing -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_preprocessing(self, spaces: Sequence[Tensor]) -> None:
        """Fit the per-dimension statistics for `preprocess="standardise"` on the (training) features.

        Why it is an option at all: the margin a linear classifier can reach depends on the feature scale, and so does
        how fast M inner steps get there. The official code feeds raw CLIP/DINOv2 features ("none"); on our
        EfficientNet-Lite spaces a quick probe gave ACC .54 with per-dimension standardisation vs .33–.37 with
        L2-normalised rows (NOTES.md), so the choice is explicit here and must be reported with the results.
        """
        _check_spaces(spaces)
        for i, z in enumerate(spaces):
            if self.preprocess_mode == "standardise":
                z = z.to(torch.float64)
                getattr(self, f"shift{i}").copy_(z.mean(0))
                getattr(self, f"scale{i}").copy_(z.std(0).clamp_min(1e-6))

    def preprocess(self, spaces: Sequence[Tensor]) -> list[Tensor]:
        """ "none": as given; "l2": each row to unit norm; "standardise": per dimension, zero mean and unit variance."""
        if len(spaces) != len(self.heads):
            raise ValueError(f"encoder has {len(self.heads)} spaces, got {len(spaces)}")
        out = []
        for i, z in enumerate(spaces):
            if self.preprocess_mode == "l2":
                z = F.normalize(z, dim=1)
            elif self.preprocess_mode == "standardise":
                shift, scale = getattr(self, f"shift{i}"), getattr(self, f"scale{i}")
                z = (z - shift.to(z.dtype)) / scale.to(z.dtype)
            out.append(z)
        return out

    # -- labelling --------------------------------------------------------------------------------------------------
    def forward(self, spaces: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Soft labels [N, K] of *pre-processed* features, and the distributions the entropy term is taken over.

        With "mean_probs" the second value is the per-space softmaxes (official: the regulariser sums one entropy per
        space); with "sum_logits" it is the single combined distribution.
        """
        logits = [head(z) for head, z in zip(self.heads, spaces, strict=True)]
        if self.combine == "mean_probs":
            per_space = [F.softmax(logit, dim=1) for logit in logits]
            return torch.stack(per_space).mean(0), per_space
        probs = F.softmax(torch.stack(logits).sum(0), dim=1)
        return probs, [probs]

    @torch.no_grad()
    def predict_proba(self, spaces: Sequence[Tensor]) -> Tensor:
        """Soft labels of raw features (pre-processing applied)."""
        return self(self.preprocess(spaces))[0]

    @torch.no_grad()
    def predict(self, spaces: Sequence[Tensor]) -> Tensor:
        """Hard cluster ids of raw features (pre-processing applied)."""
        return self.predict_proba(spaces).argmax(dim=1)


# -- the inner loop: per-space linear classifiers trained on the task encoder's labels
@dataclass
class InnerState:
    """Per-space linear classifiers as plain tensors [W_0, b_0, W_1, b_1, ...] plus their Adam moments.

    Plain tensors (not nn.Linear + torch.optim) so that the same code can either stop the gradient (official,
    first-order) or keep the graph of every inner step (unrolled hypergradient).
    """

    params: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    step: int = 0

    def detached(self) -> InnerState:
        return InnerState(
            [p.detach() for p in self.params],
            [m.detach() for m in self.exp_avg],
            [v.detach() for v in self.exp_avg_sq],
            self.step,
        )


def init_inner(
    dims: Sequence[int],
    k: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    zero: bool = False,
) -> InnerState:
    """Fresh inner classifiers: nn.Linear's default init, U(±1/√d) for W and b (what the official code re-creates).

    `zero=True` starts from W = b = 0 (for hand-checkable tests).
    """
    params: list[Tensor] = []
    for d in dims:
        for shape in ((k, d), (k,)):
            if zero:
                params.append(torch.zeros(shape, dtype=dtype))
            else:
                bound = 1.0 / math.sqrt(d)
                params.append((torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound)
    return InnerState(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])


def inner_loss(params: Sequence[Tensor], spaces: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Σ_s mean_i CE(W_s z_s,i + b_s, targets_i) with soft targets: how well the classifiers fit the labelling."""
    total = torch.zeros((), dtype=targets.dtype, device=targets.device)
    for s, z in enumerate(spaces):
        weight, bias = params[2 * s], params[2 * s + 1]
        total = total + F.cross_entropy(F.linear(z, weight, bias), targets)
    return total


def inner_loop(
    state: InnerState,
    spaces: Sequence[Tensor],
    targets: Tensor,
    *,
    steps: int,
    lr: float,
    optimizer: InnerOptimizer = "adam",
    differentiable: bool = False,
) -> InnerState:
    """M steps of Adam (official) or SGD on `inner_loss`, written out so the steps can stay in the autograd graph.

    differentiable=False (official, first-order, paper Eq. 13): targets and classifiers are detached, the result
    carries no graph. differentiable=True: the returned classifiers are functions of `targets` (and so of θ) through
    every step — the unrolled hypergradient of the truncated bilevel problem. The Adam arithmetic is torch.optim.Adam's
    (bias-corrected moments, eps added after the square root); in the differentiable form the root is taken of
    v + tiny so that a coordinate with exactly zero gradient does not produce 0·∞ = NaN on the way back.
    """
    _check(optimizer, InnerOptimizer, "inner optimizer")
    if not differentiable:
        targets = targets.detach()
        state = state.detached()
    params, exp_avg, exp_avg_sq, t = list(state.params), list(state.exp_avg), list(state.exp_avg_sq), state.step
    beta1, beta2 = ADAM_BETAS
    for _ in range(steps):
        if differentiable:
            leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
        else:
            leaves = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            grads = torch.autograd.grad(inner_loss(leaves, spaces, targets), leaves, create_graph=differentiable)
        t += 1
        updated = []
        for i, (p, g) in enumerate(zip(leaves, grads, strict=True)):
            if not differentiable:
                p, g = p.detach(), g.detach()
            if optimizer == "sgd":
                updated.append(p - lr * g)
                continue
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * g
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * g * g
            v = exp_avg_sq[i] + torch.finfo(g.dtype).tiny if differentiable else exp_avg_sq[i]
            denom = v.sqrt() / math.sqrt(1 - beta2**t) + ADAM_EPS
            updated.append(p - (lr / (1 - beta1**t)) * exp_avg[i] / denom)
        params = updated
    return InnerState(params, exp_avg, exp_avg_sq, t)


# -- the outer objective
@dataclass
class TurtleLoss:
    """total = prediction_error − γ·entropy (what the task encoder minimises), with both parts for logging."""

    total: Tensor
    prediction_error: Tensor
    entropy: Tensor


def entropy_regulariser(distributions: Sequence[Tensor]) -> Tensor:
    """Σ H(mean_i p_i) over the given [N, K] distributions: large when every cluster gets its share of the batch."""
    return sum((torch.special.entr(p.mean(0)).sum() for p in distributions), distributions[0].new_zeros(()))


def turtle_objective(
    encoder: TaskEncoder,
    spaces: Sequence[Tensor],
    inner: InnerState,
    *,
    gamma: float,
    inner_steps: int,
    inner_lr: float,
    inner_optimizer: InnerOptimizer = "adam",
    hypergradient: Hypergradient = "first_order",
) -> tuple[TurtleLoss, InnerState]:
    """One outer evaluation (paper Eq. 12): label, train the inner classifiers from `inner`, score the labelling.

    `spaces` are pre-processed features of one batch. "first_order" (official): the inner classifiers are constants
    for the outer gradient, which then flows only through the soft labels used as CE targets. "unrolled": the
    gradient also flows through the M inner steps into θ. Returns the loss (backward on `.total`) and the trained
    inner state, detached (to warm-start the next iteration).
    """
    _check(hypergradient, Hypergradient, "hypergradient")
    labels, distributions = encoder(spaces)
    unrolled = hypergradient == "unrolled"
    trained = inner_loop(
        inner, spaces, labels, steps=inner_steps, lr=inner_lr, optimizer=inner_optimizer, differentiable=unrolled
    )
    params = trained.params if unrolled else [p.detach() for p in trained.params]
    prediction_error = inner_loss(params, spaces, labels)
    entropy = entropy_regulariser(distributions)
    return TurtleLoss(prediction_error - gamma * entropy, prediction_error, entropy), trained.detached()


# -- training
History = dict[str, list[float]]


def fit_turtle(
    spaces: Sequence[Tensor],
    k: int,
    *,
    gamma: float = 10.0,
    inner_steps: int = 10,
    outer_steps: int = 6000,
    inner_lr: float = 1e-3,
    outer_lr: float = 1e-3,
    batch_size: int = 10000,
    seed: int = 42,
    warm_start: bool = False,
    preprocess: Preprocess = "none",
    combine: Combine = "mean_probs",
    hypergradient: Hypergradient = "first_order",
    inner_optimizer: InnerOptimizer = "adam",
    log_every: int = 20,
    monitor: Callable[[TaskEncoder], dict[str, float]] | None = None,
) -> tuple[TaskEncoder, History]:
    """Train a task encoder on cached features; defaults are the official run_turtle.py settings.

    Each outer step draws `batch_size` samples without replacement, (cold start, official default) re-draws the inner
    classifiers and their Adam state, or (warm start) continues from the previous step's classifiers *and* Adam
    moments as the official code does, runs `inner_steps` inner steps and one Adam step on θ. No labels enter:
    `monitor(encoder)` (called every `log_every` steps and at the end) is how a caller watches e.g. test ACC; its
    numbers go into the history, nothing else. The global RNG is left untouched; `seed` fixes the run.

    Returns the encoder (eval mode, pre-processing fitted on `spaces`) and a history with `step`, `loss`,
    `prediction_error`, `entropy`, `clusters` (distinct argmax labels in the batch) and the monitor's keys.
    """
    _check_spaces(spaces)
    spaces = [z.detach().float() for z in spaces]
    dims = [z.shape[1] for z in spaces]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TaskEncoder(dims, k, combine=combine, preprocess=preprocess)
    encoder.fit_preprocessing(spaces)
    with torch.no_grad():
        features = encoder.preprocess(spaces)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=outer_lr, betas=ADAM_BETAS)
    n = features[0].shape[0]
    batch = min(batch_size, n)
    inner = init_inner(dims, k, generator=generator)
    history: History = {}
    encoder.train()
    for step in range(1, outer_steps + 1):
        index = torch.randperm(n, generator=generator)[:batch]
        zs = [z[index] for z in features]
        if not warm_start:
            inner = init_inner(dims, k, generator=generator)
        loss, inner = turtle_objective(
            encoder,
            zs,
            inner,
            gamma=gamma,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            hypergradient=hypergradient,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        if step % log_every == 0 or step == outer_steps:
            with torch.no_grad():
                clusters = encoder(zs)[0].argmax(1).unique().numel()
            row = {
                "step": float(step),
                "loss": loss.total.item(),
                "prediction_error": loss.prediction_error.item(),
                "entropy": loss.entropy.item(),
                "clusters": float(clusters),
            }
            if monitor is not None:
                encoder.eval()
                row.update({key: float(value) for key, value in monitor(encoder).items()})
                encoder.train()
            for key, value in row.items():
                history.setdefault(key, []).append(value)
    encoder.eval()
    return encoder, history


# -- TURTLE's label-free criterion
def logistic_regression(x: Tensor, y: Tensor, k: int, *, c: float = 1.0, max_iter: int = 1000) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, sklearn/cuML convention: min ½‖W‖² + C Σ_i CE_i (bias not penalised). L-BFGS."""
    x = x.detach().float()
    n, d = x.shape
    weight = torch.zeros(k, d, requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    lbfgs = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        # divided by C·n: same minimiser, better conditioned numbers
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + weight.square().sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        lbfgs.step(closure)
    return weight.detach(), bias.detach()


def generalization_score(
    spaces: Sequence[Tensor],
    labels: Tensor,
    *,
    folds: int = 10,
    c: float = 1.0,
    max_iter: int = 1000,
    seed: int = 42,
    chance_adjusted: bool = False,
) -> float:
    """TURTLE's label-free model-selection criterion (official `cross_val.py`; README: "use the generalization score to
    select the best hyperparameters without using ground truth labels").

    The labelling found by TURTLE (argmax on the training features) is treated as ground truth; per space, a
    logistic regression (C=1, up to 1000 iterations, as the official cuML call) is cross-validated over `folds` random
    folds, and the held-out accuracies are averaged over folds, then over spaces. A labelling that linear classifiers
    reproduce on unseen samples is a large-margin one — exactly what TURTLE optimises — so among runs with different
    γ, M, learning rates or pre-processing, the highest score is chosen. Pass the features the encoder was trained on
    (i.e. `encoder.preprocess(spaces)`), as the official code does.

    Choosing K: the official code assumes K is known and never compares scores across K. Plain accuracy favours small
    K (fewer, coarser classes are easier to predict), so it is not a K criterion. `chance_adjusted=True` (ours, not
    TURTLE's) reports (acc − p_e)/(1 − p_e) with p_e = Σ_k p̂_k² the agreement of two independent draws from the label
    marginal (Cohen's κ against a label-blind guesser) — less biased across K, but untested as a K chooser.
    """
    _check_spaces(spaces)
    y = labels.detach().long().cpu()
    n = y.shape[0]
    if any(z.shape[0] != n for z in spaces):
        raise ValueError("labels and spaces disagree on the number of samples")
    k = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    chunks = np.array_split(rng.permutation(n), folds)
    per_fold = []
    for z in spaces:
        for f, held_out in enumerate(chunks):
            train = np.concatenate([chunk for g, chunk in enumerate(chunks) if g != f])
            weight, bias = logistic_regression(z[train], y[train], k, c=c, max_iter=max_iter)
            pred = F.linear(z[held_out].float(), weight, bias).argmax(1)
            per_fold.append(float((pred == y[held_out]).float().mean()))
    accuracy = float(np.mean(per_fold))  # mean over folds, then spaces (equal fold counts: one mean)
    if not chance_adjusted:
        return accuracy
    marginal = torch.bincount(y, minlength=k).double() / n
    p_e = float(marginal.square().sum())
    return (accuracy - p_e) / (1 - p_e) if p_e < 1 else 0.0
