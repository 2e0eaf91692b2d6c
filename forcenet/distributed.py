"""Data-parallel helpers: torchrun/env:// start-up, rank info, exact all-reduced sums.

Under ``torchrun`` (``WORLD_SIZE`` set) :func:`init_distributed` joins the process group
with ``env://`` (backend ``nccl`` on GPU, ``gloo`` on CPU). Tests may instead create the
group themselves (e.g. ``file://``); every helper here reads the already initialised group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_rank_zero() -> bool:
    """True in a single process and on rank 0 of a torchrun/DDP job (also before the
    process group is initialised: torchrun sets ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available (the local-rank GPU under torchrun,
    ``cuda:0`` otherwise), else CPU. The one device rule of training, evaluation and the
    ASE calculator."""
    if device:
        return _available(torch.device(device))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _available(device: torch.device) -> torch.device:
    """``device``, or a ``ValueError`` saying why this machine cannot run on it."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU"
            raise ValueError(f"device {device}: CUDA is not available ({reason}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device}: only {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def init_distributed() -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1 and not joined yet; rank info."""
    device = pick_device()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, init_method="env://")
    return dist_info(device)


def dist_info(device: torch.device | None = None) -> DistInfo:
    """Rank info of the current process group (rank 0 of 1 without one)."""
    device = device if device is not None else pick_device()
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), device)
    return DistInfo(0, 1, device)


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over all ranks (a copy; unchanged without a process group)."""
    out = values.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Non-padded round-robin shard of ``range(n)``: every index on exactly one rank.

    Used for evaluation, where ``DistributedSampler``'s padding would count samples twice.
    """
    return list(range(rank, n, world_size))


def sync_max(value: float) -> float:
    """The largest ``value`` over all ranks (so every rank takes the same decision)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return value


def epoch_indices(n: int, *, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's training indices for ``epoch``: a permutation seeded by (seed, epoch).

    The same rule as ``DistributedSampler`` (shuffle, pad by repeating to a multiple of
    ``world_size``, stride by rank), written out so that resuming mid-epoch can skip
    exactly the batches already trained on.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / world_size)
    perm += perm[: per_rank * world_size - n]  # pad so every rank has the same count
    return perm[rank::world_size]
