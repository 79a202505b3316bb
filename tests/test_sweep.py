"""Exact CMS learners with their pieces recomputed in the backward (``recompute_pieces``,
``compiler.sweep``): the same outputs, new state and gradients as the step that keeps every
piece's second-order graph, for the library's exact-rule LMs and CMS variants, through a carried
state (two calls, one backward); the backward re-runs the pieces by bisection; what the sweep
does not run is refused naming the fix. (The rule chains: test_cms_rules.py; truncation:
test_compiler_fallback.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler import compile, sweep
from nlgraph.library import get
from nlgraph.train.trainer import recompute_layers

DT = torch.float64
TINY = dict(d=16, n_layers=2, heads=2, hidden=24, width=16, chunk=4, chunk_mem=8)


def lm_loss(tokens):
    def loss_fn(out, start, end):
        logits = out["logits"][:, out["logits"].shape[1] - (end - start) :]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, start:end].reshape(-1),
            reduction="sum",
        )  # fmt: skip

    return loss_fn


def state_term(state):
    """A scalar of every floating tensor of a state: its gradient reaches back through it."""
    leaves = torch.utils._pytree.tree_leaves(state)
    live = [t for t in leaves if torch.is_tensor(t) and t.is_floating_point() and t.requires_grad]
    return sum((t.sin().sum() for t in live), torch.zeros((), dtype=DT))


def step(learner, tokens, recompute, calls=1):
    """``calls`` segments with carried state, one backward of their losses, the last logits and
    a term of the final state; (loss, logits, final state, gradients by name)."""
    learner.recompute_pieces = recompute
    learner.zero_grad(set_to_none=True)
    state, total = None, 0.0
    for seg in tokens.chunk(calls, dim=1):
        out, state = learner(seg, state, loss_fn=lm_loss(seg))
        total = total + out["loss"]
    (total + 1e-2 * out["logits"].square().sum() + state_term(state)).backward()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return total.detach(), out["logits"].detach(), state, grads


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def agree(learner, tokens, calls=1):
    kept = step(learner, tokens, False, calls)
    swept = step(learner, tokens, True, calls)
    close(swept[0], kept[0])
    close(swept[1], kept[1])
    sk, ss = (torch.utils._pytree.tree_leaves(s[2]) for s in (kept, swept))
    assert len(sk) == len(ss)
    for a, b in zip(sk, ss, strict=True):
        if torch.is_tensor(a):
            close(b.detach(), a.detach())
        else:
            assert a == b
    assert kept[3].keys() == swept[3].keys() and kept[3]
    for n in kept[3]:
        close(swept[3][n], kept[3][n])
    return kept


@pytest.mark.parametrize(
    "name,kw",
    [
        ("hope", {}),
        ("hope", {"cms_variant": "nested", "cms_chunks": (4, 8)}),
        ("hope", {"cms_variant": "independent", "cms_chunks": (4, 12)}),
        ("hope_attention", {}),
    ],
    ids=str,
)
def test_recomputed_pieces_give_the_same_step(name, kw):
    torch.manual_seed(0)
    sizes = {**TINY, "cms_chunks": (4, 8), **kw}
    if name == "hope_attention":  # no self-modifying Titans: no memory sizes
        sizes = {k: v for k, v in sizes.items() if k not in ("width", "chunk", "chunk_mem")}
    learner = compile(get(name, **sizes), dtype=DT)
    assert learner.meta_blocks()
    tokens = torch.randint(0, 256, (2, 22))  # pieces of 4 and a last one of 2
    agree(learner, tokens)


def test_a_carried_state_is_differentiated_through_both_calls():
    """Two calls, the second from the first's state (with its graph): the sweep's outputs
    include the new state, and its backward the gradient of the state it started from."""
    torch.manual_seed(1)
    learner = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    tokens = torch.randint(0, 256, (2, 24))
    agree(learner, tokens, calls=2)


def test_the_backward_reruns_pieces_by_bisection(monkeypatch):
    """n pieces: n first-order pieces in the forward, n log2(n) / 2 - (n - 1) more in the
    backward (n a power of two: bisection, the first descent's states kept by the forward), and
    each piece once with its inner gradient's graph."""
    torch.manual_seed(3)
    learner = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    learner.recompute_pieces = True
    counts = {"advance": 0, "graph": 0}
    real_advance, real_back = sweep._Run._advance, sweep._Run._piece_back

    def advance(self, *a):
        counts["advance"] += 1
        return real_advance(self, *a)

    def back(self, *a):
        counts["graph"] += 1
        return real_back(self, *a)

    monkeypatch.setattr(sweep._Run, "_advance", advance)
    monkeypatch.setattr(sweep._Run, "_piece_back", back)
    n = 8
    tokens = torch.randint(0, 256, (1, 4 * n))
    out, _ = learner(tokens, loss_fn=lm_loss(tokens))
    assert counts == {"advance": n, "graph": 0}
    out["loss"].backward()
    assert counts == {"advance": n + n * int(math.log2(n)) // 2 - (n - 1), "graph": n}


def test_without_grad_or_blocks_nothing_is_swept(monkeypatch):
    torch.manual_seed(4)
    learner = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    learner.recompute_pieces = True
    monkeypatch.setattr(sweep, "sweep", None)  # a sweep would fail
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out, state = learner(tokens, loss_fn=lm_loss(tokens))
    assert out["loss"].grad_fn is None
    learner(tokens)  # no loss: the blocks hold


def test_what_the_sweep_does_not_run_is_refused():
    torch.manual_seed(5)
    tokens = torch.randint(0, 256, (1, 8))
    mixed = get("cms", d=4, chunks=(2, 4), hidden=5)
    mixed.differentiate("mlp0", "mlp0", nl.stop_grad())
    learner = compile(mixed, dtype=DT)
    learner.recompute_pieces = True
    x = torch.randn(1, 8, 4, dtype=DT)
    with pytest.raises(nl.CompileError, match="first-order CMS blocks .*mlp0"):
        learner(x, loss_fn=lambda o, s, e: o["y"].sum())
    hope = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    hope.recompute_pieces = True
    hope.functional_pieces = True  # what compile_program sets
    with pytest.raises(nl.CompileError, match="compile_program"):
        hope(tokens, loss_fn=lm_loss(tokens))


def test_train_recompute_sweeps_exact_learners_only():
    exact = compile(get("hope", **TINY))
    assert recompute_layers(exact) == [] and exact.recompute_pieces
    teach = compile(get("hope", **TINY, meta="first_order", cms_signal="teach"))
    assert recompute_layers(teach) == [] and not teach.recompute_pieces
    assert all(layer.checkpoint for layer in teach.layers.values())


@pytest.mark.parametrize("k,extra", [(1, 28), (2, 10), (3, 6), (4, 5), (9, 5)])
def test_fewer_kept_states_rerun_more_pieces(monkeypatch, k, extra):
    """``sweep_states = k``: at most k states kept. 8 pieces: one state re-runs 0 + 1 + ... + 7
    = 28 pieces; two keep the forward's state at piece 4, then re-run 6 in the right half (no
    state to spare: each piece from 4) and 2 + 1 + 1 in the left; three keep 4 and 6; from
    four on, bisection's 5 (4, 6 and 7 kept). The gradients stay the same."""
    torch.manual_seed(3)
    learner = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    tokens = torch.randint(0, 256, (1, 32))
    kept = step(learner, tokens, False)
    learner.sweep_states = k
    real = sweep._Run._advance
    count = [0]

    def advance(self, *a):
        count[0] += 1
        return real(self, *a)

    monkeypatch.setattr(sweep._Run, "_advance", advance)
    swept = step(learner, tokens, True)
    assert count[0] == 8 + extra
    for n in kept[3]:
        close(swept[3][n], kept[3][n])


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_a_bad_number_of_kept_states_is_refused(k):
    learner = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    learner.recompute_pieces, learner.sweep_states = True, k
    tokens = torch.randint(0, 256, (1, 8))
    with pytest.raises(nl.CompileError, match="sweep_states=.*positive int"):
        learner(tokens, loss_fn=lm_loss(tokens))


def test_under_module_backward_hooks_the_same_step():
    """``torch.utils.flop_counter`` hooks every module's backward; the recompute inside the
    sweep's backward runs under them (no leaf reaches a hooked module) with the same result,
    and its re-run pieces count: more FLOPs than the kept-graph step."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(6)
    learner = compile(get("hope", **TINY, cms_chunks=(4, 8)), dtype=DT)
    tokens = torch.randint(0, 256, (2, 16))
    runs = []
    for recompute in (False, True):
        with FlopCounterMode(display=False) as counter:
            runs.append(step(learner, tokens, recompute))
        runs[-1] += (counter.get_total_flops(),)
    (kept, swept) = runs
    for n in kept[3]:
        close(swept[3][n], kept[3][n])
    assert swept[4] > kept[4] > 0
