"""Distributed training on CPU: 2 real processes on gloo over loopback (torch.multiprocessing.spawn and torchrun).

What is checked: the gathered CC losses and their DDP-synchronised gradients equal one process's on the same global
batch; 2 ranks x B and 1 rank x 2B train to the same parameters and the same CCES support set; a distributed run
resumes exactly; `deepclust train` under torchrun trains end to end and resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training import distributed
from training.config import load_config
from training.losses.contrastive import cc_cluster_loss, nt_xent
from training.models.backbones import Backbone, available_backbones, register_backbone
from training.models.heads import ClusteringModel

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "digits_cc_tiny.yaml"
BN_FREE = "bn_free_cnn_test"
LOOPBACK = "lo"

if BN_FREE not in available_backbones():

    @register_backbone(BN_FREE)
    def _bn_free_cnn(**_: object) -> Backbone:
        """Two convs, no BatchNorm: per-rank BN statistics would differ from one process's (SyncBatchNorm is
        GPU-only), so the rank-equivalence test uses a backbone without them."""
        trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        return Backbone(trunk, 16, (0.5,), (0.5,), in_channels=1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, rendezvous: str, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME=LOOPBACK)
    torch.set_num_threads(1)
    # a file rendezvous: no port to pick (and lose to a race); gloo's own sockets stay on the loopback interface
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _in_one_process_group(rendezvous: Path, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn` in this process as rank 0 of a 1-process gloo group (the distributed code path), then leave it."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        fn(0, 1, *args)
    finally:
        dist.destroy_process_group()


def _spawn(rendezvous: Path, world: int, fn: Callable[..., None], *args: Any) -> None:
    """`world` processes in one gloo group on loopback."""
    mp.spawn(_entry, args=(world, str(rendezvous), fn, args), nprocs=world, join=True)


# ---------------------------------------------------------------------- the distributed runs (one spawn per world size)
B, D_IN, K = 6, 10, 4
# a support set of whole global batches (3 x 32): the FIFO then holds the same samples whatever the order within a
# batch (the gathered order of 2 ranks differs from one process's)
CCES = ["method.name=cces", "method.ccrop=false", "method.nn=double", "method.queue_size=96"]


def _suite_worker(rank: int, world: int, out: Path) -> None:
    """Everything the tests below check, in one group: starting processes (importing torch) is the slow part."""
    result: dict[str, Any] = {}
    if world > 1:
        result["losses"] = _gathered_losses(rank)
        result["sync_bn_refused"] = _sync_bn_refused(out)
        # exact resume in distributed mode, with the real (random, per-rank) device augmentation and BatchNorm
        straight = _fit(_overrides(out, "straight"))
        _fit([*_overrides(out, "resumed"), "optim.epochs=1"])
        resumed = _fit(_overrides(out, "resumed"))
        result["straight"], result["resumed"] = straight.model.state_dict(), resumed.model.state_dict()
        result["resumed_epoch"] = resumed.epoch
    for method, extra in (("cc", []), ("cces", CCES)):
        base = [f"model.backbone={BN_FREE}", "optim.batch_size=32", "optim.epochs=2", *extra]
        trainer = _fit([*_overrides(out, f"{method}-world{world}"), *base], deterministic_views=True)
        result[method] = {"params": trainer.model.state_dict(), "queue": _queue(trainer)}
    torch.save(result, out / f"world{world}-rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed")
    _spawn(out / "rendezvous-2", 2, _suite_worker, out)
    with pytest.MonkeyPatch.context() as patch:  # the 1-rank reference runs here: saves starting a process
        patch.setenv("GLOO_SOCKET_IFNAME", LOOPBACK)
        _in_one_process_group(out / "rendezvous-1", _suite_worker, out)
    return {
        "one": torch.load(out / "world1-rank0.pt", weights_only=True),
        "two": [torch.load(out / f"world2-rank{r}.pt", weights_only=True) for r in range(2)],
    }


# ---------------------------------------------------------------------- 1. losses and gradients
def _toy() -> tuple[ClusteringModel, torch.Tensor, torch.Tensor]:
    """A model whose 'backbone' is a linear layer (it must receive gradients through the gather) and a global batch
    of two views."""
    torch.manual_seed(0)
    model = ClusteringModel(nn.Linear(D_IN, 12), 12, K, projection_dim=8)
    x1, x2 = torch.randn(2 * B, D_IN), torch.randn(2 * B, D_IN)
    return model, x1, x2


LOSSES: dict[str, Callable[[ClusteringModel, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "instance": lambda m, h1, h2: nt_xent(m.instance_head(h1), m.instance_head(h2), 0.5),
    "cluster": lambda m, h1, h2: cc_cluster_loss(m.cluster_head(h1), m.cluster_head(h2), 1.0),
}


def _gathered_losses(rank: int) -> dict[str, Any]:
    """Each rank: its shard through DDP, backbone features gathered with autograd, the loss on the global batch."""
    from torch.nn.parallel import DistributedDataParallel

    from training.trainer import _MethodStep

    results: dict[str, Any] = {}
    for name, loss_fn in LOSSES.items():
        model, x1, x2 = _toy()
        shard = slice(rank * B, (rank + 1) * B)
        ddp = DistributedDataParallel(_MethodStep(model), find_unused_parameters=True)

        def step(loss_fn=loss_fn, model=model, x1=x1[shard], x2=x2[shard]) -> dict[str, torch.Tensor]:
            h1 = distributed.gather_with_grad(model.backbone(x1))
            h2 = distributed.gather_with_grad(model.backbone(x2))
            return {"loss": loss_fn(model, h1, h2)}

        loss = ddp(step)["loss"]
        loss.backward()
        local = loss_fn(model, model.backbone(x1[shard]), model.backbone(x2[shard]))  # the per-GPU loss of CC's code
        results[name] = {
            "loss": loss.detach(),
            "local": local.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    return results


def test_gathered_losses_and_gradients_equal_single_process(runs: dict[str, Any]) -> None:
    for name, loss_fn in LOSSES.items():
        model, x1, x2 = _toy()
        reference = loss_fn(model, model.backbone(x1), model.backbone(x2))  # one process, the whole batch
        reference.backward()
        expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert "backbone.weight" in expected
        for r, got in enumerate(run["losses"] for run in runs["two"]):
            assert torch.allclose(got[name]["loss"], reference.detach(), atol=1e-6), (name, r)
            # the per-rank loss of the official CC code is a different quantity: the check above can fail
            assert not torch.allclose(got[name]["local"], reference.detach(), atol=1e-3), (name, r)
            assert got[name]["grads"].keys() == expected.keys()
            for param, grad in expected.items():
                assert torch.allclose(got[name]["grads"][param], grad, rtol=1e-5, atol=1e-7), (name, r, param)


def test_gather_is_identity_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x and distributed.gather(x) is x
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    assert distributed.rank_seed(0, 1, rank=0) != distributed.rank_seed(0, 1, rank=1)


# ---------------------------------------------------------------------- 2. training on 2 ranks vs 1 rank
class _Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[3])


def _overrides(out: Path, name: str) -> list[str]:
    return [f"run.out_dir={out}", f"run.name={name}", "run.max_steps_per_epoch=2", "data.eval_subset=64"]


def _fit(overrides: list[str], deterministic_views: bool = False) -> Any:
    from training.trainer import Trainer

    trainer = Trainer(load_config(TINY, overrides))
    if deterministic_views:
        # The same two views of a sample whichever rank holds it (random batch augmentation draws from each rank's
        # own stream, so it cannot match one process's draws).
        trainer.batch_views = [nn.Identity(), _Flip()]
    trainer.fit()
    return trainer


def _queue(trainer: Any) -> torch.Tensor | None:
    queue = getattr(trainer.method, "queue", None)
    return None if queue is None else queue.features.cpu()


def _initial_params() -> dict[str, torch.Tensor]:
    from training.trainer import build_model, seed_everything

    config = load_config(TINY, [f"model.backbone={BN_FREE}"])
    seed_everything(config.run.seed)
    return build_model(config).state_dict()


@pytest.mark.parametrize("method", ["cc", "cces"])
def test_two_ranks_train_like_one_rank_with_the_doubled_batch(runs: dict[str, Any], method: str) -> None:
    one, two = runs["one"][method], [run[method] for run in runs["two"]]
    for name, p in one["params"].items():
        for r in range(2):
            assert torch.equal(two[r]["params"][name], two[0]["params"][name]), name  # DDP keeps ranks identical
        assert torch.allclose(two[0]["params"][name], p, rtol=1e-4, atol=1e-5), name
    initial = _initial_params()
    assert any(not torch.allclose(initial[n], p) for n, p in one["params"].items())  # it did train


def test_support_set_agrees_across_ranks_and_with_one_rank(runs: dict[str, Any]) -> None:
    one, two = runs["one"]["cces"]["queue"], [run["cces"]["queue"] for run in runs["two"]]
    assert one is not None and two[0] is not None
    assert torch.equal(two[1], two[0])  # every rank enqueued the same gathered batches
    # one process enqueues the same samples in another order within each batch: match rows one to one
    distance = torch.cdist(two[0], one)
    match = distance.argmin(dim=1)
    assert float(distance.min(dim=1).values.max()) < 2e-3  # float drift of two epochs of training
    assert len(set(match.tolist())) == one.shape[0]


def test_distributed_resume_is_exact(runs: dict[str, Any]) -> None:
    for run in runs["two"]:
        assert run["resumed_epoch"] == 2
        for name, p in run["straight"].items():
            assert torch.equal(run["resumed"][name], p), name
    a, b = (run["straight"] for run in runs["two"])
    # parameters agree across ranks; BN running statistics are each rank's own until DDP broadcasts rank 0's at the
    # next forward (rank 0's are the ones checkpointed)
    assert all(torch.equal(a[n], b[n]) for n in a if "running_" not in n)


def _sync_bn_refused(out: Path) -> bool:
    from training.trainer import Trainer

    try:
        Trainer(load_config(TINY, [*_overrides(out, "syncbn"), "model.sync_batchnorm=true", "run.device=cpu"]))
    except ValueError as error:
        return "SyncBatchNorm" in str(error)
    return False


def test_sync_batchnorm_is_refused_on_cpu_processes(runs: dict[str, Any]) -> None:
    assert all(run["sync_bn_refused"] for run in runs["two"])


# ---------------------------------------------------------------------- 3. the CLI under torchrun
def _torchrun(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPCLUST_LOG_LEVEL": "WARNING", "GLOO_SOCKET_IFNAME": LOOPBACK}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "-m", "deepclust.cli", "train", "-c", str(TINY), "--out-dir", str(out),
        "run.max_steps_per_epoch=2", "data.eval_subset=64", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_torchrun_cli_trains_and_resumes(tmp_path: Path) -> None:
    first = _torchrun(tmp_path, "optim.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "digits-cc-tiny"
    assert (run / "last.pt").exists() and len((run / "log.jsonl").read_text().splitlines()) == 1
    second = _torchrun(tmp_path, "optim.epochs=2")  # same run directory: both ranks resume from last.pt
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]  # rank 0 alone logs, nothing repeated
    printed = [line for line in second.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["n"] == 64
    state = torch.load(run / "final.pt", weights_only=True)
    assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
