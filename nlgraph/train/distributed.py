"""Data parallelism with ``torch.distributed``: DDP, gloo on CPU, set up from torchrun's env vars.

The trainer never invents its own distribution layer (DESIGN.md 8): each of ``WORLD_SIZE``
processes draws its slice of the same global batch (:func:`nlgraph.train.data.batch_at`), DDP
averages the slow levels' gradients, and fast state, being per sequence, needs no syncing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nlgraph.compiler.streaming import detach_state
from nlgraph.train.errors import TrainConfigError

__all__ = [
    "World", "world_from_env", "setup", "wrap", "any_flag", "mean", "teardown", "gather_rows",
    "rows",
]  # fmt: skip


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


class _Returned(nn.Module):
    """The learner as DDP sees it: the outputs, and the fast state detached, so that DDP's
    search for unused parameters starts from what the loss is computed from (the logits and
    the loss) and not from the graph of the returned state, which reaches parameters (the
    writes of a level never read within the call) that the backward never reaches."""

    def __init__(self, learner: nn.Module) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        outputs, state = self.learner(*args, **kwargs)
        return outputs, detach_state(state)


def wrap(
    learner: nn.Module, world: World, device: str = "cpu", find_unused: bool = False
) -> nn.Module:
    """The module the training step calls: ``DDP(learner)`` under several processes.

    ``find_unused``: some parameters get no gradient in some steps (inert parameters, or a
    carried fast state that replaces the initial one); DDP then marks, every step, the
    parameters the outputs do not reach as ready, and leaves their gradient ``None`` where no
    process used them (as one process would). Every rank must pass the same value."""
    if not world.parallel:
        return learner
    ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(
        _Returned(learner), device_ids=ids, find_unused_parameters=find_unused
    )


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


def rows(state: Any, index: torch.Tensor | slice) -> Any:
    """The rows ``index`` of a per-sample fast state (every tensor's leading axis is the batch;
    ints, such as chunk phases, are shared by the rows)."""
    if isinstance(state, torch.Tensor):
        return state[index]
    if isinstance(state, dict):
        return {k: rows(v, index) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(rows(v, index) for v in state)
    return state


def gather_rows(state: Any, world: World) -> Any:
    """The global batch's fast state from each process's rows (rank order, as the global batch
    is split): every tensor gathered along its leading axis. A collective call."""
    if not world.parallel:
        return state
    if isinstance(state, torch.Tensor):
        parts = [torch.empty_like(state) for _ in range(world.size)]
        dist.all_gather(parts, state.contiguous())
        return torch.cat(parts)
    if isinstance(state, dict):
        return {k: gather_rows(v, world) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(gather_rows(v, world) for v in state)
    return state


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier()


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()
