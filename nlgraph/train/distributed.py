"""Data parallelism with ``torch.distributed``: DDP, gloo on CPU, set up from torchrun's env vars.

The trainer never invents its own distribution layer (DESIGN.md 8): each of ``WORLD_SIZE``
processes draws its slice of the same global batch (:func:`nlgraph.train.data.batch_at`), DDP
averages the slow levels' gradients, and fast state, being per sequence, needs no syncing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nlgraph.train.errors import TrainConfigError

__all__ = ["World", "world_from_env", "setup", "wrap", "any_flag", "mean", "teardown"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """``RANK``/``WORLD_SIZE`` as set by torchrun (one process when absent)."""
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TrainConfigError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
            "are not integers; launch with torchrun or unset them"
        ) from None
    if size < 1 or not 0 <= rank < size:
        raise TrainConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={size})")
    return World(rank, size)


def setup(world: World, device: str = "cpu") -> bool:
    """Join the process group (gloo on CPU, nccl on CUDA); ``True`` if this call created it."""
    if not world.parallel or dist.is_initialized():
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise TrainConfigError(
                f"WORLD_SIZE={world.size} but {var} is not set; launch with torchrun"
            )
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    return True


def wrap(learner: nn.Module, world: World, device: str = "cpu") -> nn.Module:
    """The module the training step calls: ``DDP(learner)`` under several processes."""
    if not world.parallel:
        return learner
    ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(learner, device_ids=ids)


def any_flag(flags: list[bool], world: World) -> list[bool]:
    """Element-wise OR over processes (stop requests, bad losses) so every rank decides alike."""
    t = torch.tensor([float(f) for f in flags])
    if world.parallel:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def mean(value: torch.Tensor, world: World) -> float:
    t = value.detach().float().clone().reshape(1)
    if world.parallel:
        dist.all_reduce(t)
        t /= world.size
    return float(t.item())


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier()


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()
