"""Distributed training on PyTorch's own stack: torchrun env vars, DDP, DistributedSampler, NCCL (GPU) / gloo (CPU).

Everything here is a no-op in a single process, so the trainer runs one code path. The pieces:

- `init_distributed()` reads torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and calls `init_process_group` only when
  `WORLD_SIZE > 1` (nccl when CUDA is there, else gloo). "Distributed" below means: a process group is initialised.
- `gather_with_grad(x)`: all-gather that keeps autograd. Its backward *sums* the incoming gradients over the ranks
  (an all-reduce) and returns this rank's slice. That sum is what makes the gradient scale right under DDP when every
  rank computes the same *global* loss L: rank r's slice receives N * dL/dx_r, DDP then averages the parameter
  gradients over the N ranks, and the result is exactly dL/dtheta of one process on the whole batch. (A backward that
  only slices — the common "GatherLayer" shortcut without the sum — under-scales everything behind the gather by N.)
- rank-0 helpers: `is_main_process`, `barrier`, `main_process_first`, `broadcast_object`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("deepclust.distributed")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or is_distributed()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def info() -> DistInfo:
    """This process's place in the job (rank 0 of 1 outside a process group)."""
    if not is_distributed():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_distributed(device: str = "auto", timeout_minutes: int = 60) -> DistInfo:
    """Join the torchrun job described by the environment; a plain single process when WORLD_SIZE is 1 or unset.

    The timeout bounds how long ranks wait at a barrier while rank 0 evaluates or writes a checkpoint.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or is_distributed():
        return info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before init: NCCL binds this process to its GPU
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    if dist.get_rank() != 0:
        logging.getLogger("deepclust").setLevel(logging.WARNING)  # rank-0-only logging; errors still surface
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world_size, dist.get_backend())
    return info()


def shutdown_distributed(*, wait_for_peers: bool = True) -> None:
    """Leave the process group; after a normal run, first wait until every rank is done with its collectives (rank 0
    tearing gloo down while a peer still had work in flight aborted a resumed 2-process run under load)."""
    if is_distributed():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """One device per process: on CUDA, the GPU of this process's LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", info().local_rank)
    return device


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _wire(x: torch.Tensor) -> torch.Tensor:
    """The tensor as the backend can carry it: gloo lacks reduced-precision floats, NCCL needs the GPU."""
    if dist.get_backend() == "gloo" and x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()  # exact: bf16/fp16 -> fp32 -> back is lossless
    return x.to(_collective_device()).contiguous()


class _GatherWithGrad(torch.autograd.Function):
    """cat(x_0, ..., x_{N-1}) along dim 0; backward = all-reduce(SUM) of the gradient, then this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows, ctx.dtype, ctx.device = x.shape[0], x.dtype, x.device
        wire = _wire(x)
        parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, wire)
        return torch.cat(parts).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = _wire(grad)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return total[start : start + ctx.rows].to(device=ctx.device, dtype=ctx.dtype)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, rank order, with gradients flowing back to each rank's own rows (identity in one process).

    Every rank must pass the same number of rows (the trainer's DistributedSampler drops the ragged tail).
    """
    if not is_distributed() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows without autograd (sample indices, labels): same layout as `gather_with_grad`."""
    if not is_distributed() or get_world_size() == 1:
        return x
    wire = _wire(x)
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, wire)
    return torch.cat(parts).to(device=x.device, dtype=x.dtype)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a feature cache), the others after it, from the filled cache.

    The block must not contain collectives (rank 0 would wait for ranks still parked at the barrier).
    """
    if is_distributed() and not is_main_process():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main_process():
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (a rank-0 result such as evaluation metrics); identity in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """Seed of one rank's random streams for one epoch: distinct per rank, reproducible on resume at any epoch."""
    rank = get_rank() if rank is None else rank
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % 2**63
