"""FSDP2 per layer (``compiler.distributed.shard``): two gloo processes, each ``fully_shard``-ing
every layer of a library LM and computing the gradient of its half of a batch, give the same
gradient (gathered from the shards) as one process on the whole batch.

Covered: every library LM, Hope in each meta mode (exact CMS rules differentiate through the
forward and need the schedule ``shard`` picks for them), recompute per layer under sharding,
and the refusals: sharding without a process group, resharding an exact learner's weights
after the forward, a learner with CMS blocks and a compiled program (its pieces' inner gradient
is taken inside one compiled function, out of FSDP's sight), a CMS block's seed parameters
sharded by a plain ``fully_shard``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph.compiler import compile
from nlgraph.compiler.distributed import shard
from nlgraph.library import get

DT = torch.float64
# (model, options of get, recompute every layer)
CASES = [
    ("transformer", {}, False),
    ("hope", {}, False),
    ("titans_lm", {}, False),
    ("titans_lm", {}, True),
    ("hope", {}, True),
    ("hope", {"meta": "first_order"}, False),
    ("hope", {"cms_signal": "teach"}, False),
    ("hope", {"meta": "first_order", "cms_signal": "teach"}, False),
    ("hope_attention", {}, False),
]


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def gradients(name: str, kw: dict, recompute: bool, rows: slice, sharded: bool) -> dict:
    """Gradients of the summed token loss of ``rows``, averaged over the batch of two."""
    torch.manual_seed(0)
    learner = compile(get(name, **kw), dtype=DT)
    for layer in learner.layers.values():
        layer.checkpoint = recompute
    if sharded:
        shard(learner)
    x = tokens()[rows]

    def loss_fn(out, start, end):
        logits = out["logits"][:, out["logits"].shape[1] - (end - start) :]
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, x[:, start:end].reshape(-1), reduction="sum")

    out, _ = learner(x, loss_fn=loss_fn)
    # a rank holds one row and FSDP averages over the ranks; one process holds both
    (out["loss"] / x.shape[0]).backward()
    grads = {}
    for n, p in learner.named_parameters():
        if p.grad is not None:
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def refusals() -> list[str]:
    """What a rank sees when it shards wrongly: one line each."""
    from torch.distributed.fsdp import fully_shard

    seen = []
    try:
        shard(compile(get("hope"), dtype=DT), reshard_after_forward=True)
    except ValueError as e:
        seen.append(str(e))
    learner = compile(get("hope"), dtype=DT)
    learner.compile_program()  # CMS pieces as one compiled function: out of FSDP's sight
    try:
        shard(learner)
    except CompileError as e:
        seen.append(str(e))
    learner = compile(get("hope"), dtype=DT)
    shard(learner)
    try:
        learner.compile_program()
    except CompileError as e:
        seen.append(str(e))
    learner = compile(get("hope"), dtype=DT)
    for layer in learner.layers.values():
        fully_shard(layer)  # the CMS blocks' seed parameters sharded with the rest
    try:
        learner(tokens()[:1])
    except CompileError as e:
        seen.append(str(e))
    return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank, rank + 1)
        result = {i: gradients(*case, rows, sharded=True) for i, case in enumerate(cases)}
        seen = refusals()
        if rank == 0:
            torch.save({"grads": result, "refusals": seen}, out)
    finally:
        torch.distributed.destroy_process_group()


def check(cases: list, tmp_path: Path) -> list[str]:
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), cases, str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)
    for i, case in enumerate(cases):
        one = gradients(*case, slice(0, 2), sharded=False)
        assert one and sorted(two["grads"][i]) == sorted(one), case  # no gradient lost
        for n, g in one.items():
            torch.testing.assert_close(two["grads"][i][n], g, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, c=case, n=n: f"{c} {n}: {m}")  # fmt: skip
    return two["refusals"]


def test_fsdp_per_layer_equals_one_process_for_every_lm_and_mode(tmp_path):
    seen = check(CASES, tmp_path)
    assert len(seen) == 4, seen
    assert all("\n" not in line for line in seen)
    assert "reshard_after_forward" in seen[0]
    assert "compile_program" in seen[1] and seen[1] == seen[2]  # either order
    assert "seed_parameters" in seen[3] and "shard(learner)" in seen[3]


def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard(compile(get("transformer")))
