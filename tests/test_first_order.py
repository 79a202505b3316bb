"""First-order writes: ``stop_grad`` on a level's own recurrence (``meta="first_order"``).

The forward is the exact mode's, to the bit; the outer gradient takes every in-sequence update
as a constant increment on the state the call starts from (first-order MAML), so the writes
run without an autograd graph. Checked against hand-written loops (self-modifying Titans, a CMS
block), against the exact mode's forward, and chunked against reference for every library entry
with a ``meta`` option.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from test_selfmod import D, naive, smt

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.compiler.verify import compare, random_inputs
from nlgraph.library import entries, get

torch.set_num_threads(1)
FIRST_ORDER_WRITES = ("M_k", "M_v", "M_eta", "M_alpha")


def first_order_smt(chunk, chunk_mem, momentum=0.9, exact=True):
    exact_learner = smt(chunk, chunk_mem, momentum, exact)
    g = get("self_modifying_titans", d=D, chunk=chunk, chunk_mem=chunk_mem, momentum=momentum,
            exact=exact, conv_window=0, output_gate=False, meta="first_order")  # fmt: skip
    learner = compile(g, dtype=torch.float64)
    copy_weights(learner, exact_learner)
    return exact_learner, learner


def copy_weights(dst, src):
    """``src``'s parameters and initial states into ``dst`` (same levels, other spec)."""
    weights = {k: v for k, v in src.state_dict().items() if "extra_state" not in k}
    dst.load_state_dict({**weights, "_extra_state": dst.get_extra_state()})


def grads_of(learner, y, cot):
    learner.zero_grad(set_to_none=True)
    (y * cot).sum().backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk,chunk_mem", [(1, 1), (2, 4), (3, 3)], ids=str)
def test_self_modifying_titans_equals_a_first_order_loop(chunk, chunk_mem):
    """Same read-outs as the exact mode; gradients equal a token loop whose writes run under
    no_grad and whose chunk-end states are read as ``W0 + sg(W - W0)``."""
    exact_learner, learner = first_order_smt(chunk, chunk_mem)
    torch.manual_seed(3)
    x = torch.randn(1, 9, D, dtype=torch.float64)
    cot = torch.randn(1, 9, D, dtype=torch.float64)
    want = naive(learner, x, chunk, chunk_mem, 0.9, True, first_order=True)
    # The loop's gradients, by parameter name.
    want_grads = dict(zip(
        [n for n, _ in learner.named_parameters()],
        torch.autograd.grad((want * cot).sum(), list(learner.parameters()), allow_unused=True),
        strict=True,
    ))  # fmt: skip
    assert torch.equal(exact_learner(x)[0]["y"].detach(), learner(x)[0]["y"].detach())
    for backend in ("chunk", "reference"):
        learner.backend = backend
        y = learner(x)[0]["y"]
        assert torch.allclose(y, want, atol=1e-10, rtol=0), backend
        got = grads_of(learner, y, cot)
        for name, g in want_grads.items():
            if g is None or not g.any():
                assert name not in got or not got[name].any(), (backend, name)
            else:
                assert torch.allclose(got[name], g, atol=1e-9, rtol=1e-9), (backend, name)
    # The levels that act only through writes get no gradient at all; the read path does.
    assert not any(m in n for n in got for m in (*FIRST_ORDER_WRITES, "W_eta", "W_alpha"))
    assert {"top.clusters.1.members.M_mem.initial.W1", "top.slow.W_q.weight"} <= got.keys()


def test_first_order_writes_record_no_graph():
    _, learner = first_order_smt(2, 4)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    _, state = learner(x)
    for name in (*FIRST_ORDER_WRITES, "M_mem"):
        st = state[name]
        assert not any(w.requires_grad for w in st["running"]), name
        assert not any(s.requires_grad for s in st["momentum"]), name


def test_first_order_segments_equal_one_pass():
    """Carried state: each call's updates are constants on the state it starts from, so the
    gradient reaching the initial state through segments is the one-pass gradient."""
    _, learner = first_order_smt(2, 4)
    torch.manual_seed(4)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    cot = torch.randn(2, 11, D, dtype=torch.float64)
    y = learner(x)[0]["y"]
    whole = grads_of(learner, y, cot)
    state, ys = None, []
    for a, b in ((0, 3), (3, 8), (8, 11)):
        out, state = learner(x[:, a:b], state)
        ys.append(out["y"])
    y2 = torch.cat(ys, 1)
    assert torch.allclose(y2, y, atol=1e-12, rtol=0)
    parts = grads_of(learner, y2, cot)
    assert whole.keys() == parts.keys()
    for n in whole:
        assert torch.allclose(whole[n], parts[n], atol=1e-10, rtol=1e-10), n


def test_cms_block_equals_a_first_order_loop():
    """One CMS block updated every 2 tokens by ``theta <- theta - lr sum g``: the first-order
    outer gradient of the initial parameters is the sum of every piece's gradient at the
    parameters in force (each update a constant increment), written here by hand."""
    torch.manual_seed(0)
    lr, C, T = 0.3, 2, 7
    learner = compile(get("cms", d=3, chunks=(C,), lrs=lr, hidden=5, meta="first_order"),
                      dtype=torch.float64)  # fmt: skip
    exact = compile(get("cms", d=3, chunks=(C,), lrs=lr, hidden=5), dtype=torch.float64)
    copy_weights(exact, learner)
    x = torch.randn(2, T, 3, dtype=torch.float64)
    R = torch.randn(2, T, 3, dtype=torch.float64)

    def loss_fn(out, s, e):
        return (out["y"] * R[:, s:e]).sum()

    out, _ = learner(x, loss_fn=loss_fn)
    assert torch.equal(out["y"].detach(), exact(x, loss_fn=loss_fn)[0]["y"].detach())
    learner.zero_grad(set_to_none=True)
    out["loss"].backward()
    got = [p.grad for p in learner.blocks["mlp0"].net.parameters()]

    # By hand: per-sample parameters, a silu MLP without residual (cms's default).
    theta0 = [p.detach().clone().requires_grad_() for p in learner.blocks["mlp0"].net.parameters()]
    cur = [t.detach().unsqueeze(0).repeat(2, *[1] * t.dim()) for t in theta0]
    total, ys = 0.0, []
    for s in range(0, T, C):
        e = min(s + C, T)
        seen = [c + (t0 - t0.detach()) for c, t0 in zip(cur, theta0, strict=True)]
        w1, b1, w2, b2 = seen
        h = torch.nn.functional.silu(x[:, s:e] @ w1.transpose(1, 2) + b1[:, None])
        y = h @ w2.transpose(1, 2) + b2[:, None]
        ys.append(y)
        piece = (y * R[:, s:e]).sum()
        total = total + piece
        if e - s == C:
            g = torch.autograd.grad(piece, seen, retain_graph=True)
            cur = [c - lr * gi for c, gi in zip(cur, g, strict=True)]
    assert torch.allclose(torch.cat(ys, 1), out["y"], atol=1e-12, rtol=0)
    want = torch.autograd.grad(total, theta0)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)


def test_hope_first_order_forward_equals_exact():
    exact = compile(get("hope", d=8, n_layers=1, heads=2, vocab=11, chunk=2, chunk_mem=4,
                        cms_chunks=(2, 4), cms_lrs=0.1), dtype=torch.float64)  # fmt: skip
    fo = compile(get("hope", d=8, n_layers=1, heads=2, vocab=11, chunk=2, chunk_mem=4,
                     cms_chunks=(2, 4), cms_lrs=0.1, meta="first_order"),
                 dtype=torch.float64)  # fmt: skip
    copy_weights(fo, exact)
    tokens = torch.randint(0, 11, (2, 13))

    def loss_fn(out, s, e):
        return torch.nn.functional.cross_entropy(
            out["logits"][:, : e - s - (e == 13)].reshape(-1, 11),
            tokens[:, s + 1 : e + (e != 13)].reshape(-1), reduction="sum",
        )  # fmt: skip

    a, sa = exact(tokens, loss_fn=loss_fn)
    b, sb = fo(tokens, loss_fn=loss_fn)
    # To rounding: the exact mode takes the CMS inner gradient with create_graph, whose
    # backward formulas may round differently.
    assert (a["logits"] - b["logits"]).abs().max() < 1e-13
    assert (a["loss"] - b["loss"]).abs() < 1e-12
    b["loss"].backward()
    assert fo.slow["lm_head"].weight.grad is not None


META_ENTRIES = [
    e for kind in ("memory", "block", "model") for e in entries(kind)
    if "meta" in inspect.signature(e.builder).parameters
]  # fmt: skip


@pytest.mark.parametrize("entry", META_ENTRIES, ids=[e.name for e in META_ENTRIES])
def test_first_order_chunked_equals_reference(entry, monkeypatch):
    from test_library_verify import TOLERANCE, small

    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    graph = entry.builder(**small(entry), meta="first_order")
    torch.manual_seed(0)
    chosen = compile(graph, backend="chunk", dtype=torch.float64)
    reference = compile(graph, backend="reference", dtype=torch.float64)
    reference.load_state_dict(chosen.state_dict())
    for B, T in ((1, 9), (2, 16)):
        inputs = random_inputs(chosen, (B, T), {}, torch.float64, seed=B * 100 + T)
        result = compare(reference, chosen, inputs, seed=B * 100 + T)
        bad = {k: result.errors[k] for k in result.failures(TOLERANCE)}
        assert not bad, f"{entry.name} B={B} T={T}: {bad}"
        assert any(k.startswith("grad ") for k in result.errors)


def test_bad_declarations_are_refused():
    g = get("self_modifying_titans", d=8)
    g.differentiate("M_mem", "M_mem", nl.truncated(2))
    with pytest.raises(nl.SpecError, match="own recurrence is not defined"):
        g.validate()
    g = get("self_modifying_titans", d=8)
    g.differentiate("W_q", "W_q", nl.stop_grad())
    with pytest.raises(nl.SpecError, match="updates every step"):
        g.validate()
    g = get("titans", d=8)
    g.differentiate("M", "M", nl.stop_grad())
    with pytest.raises(nl.CompileError, match="first-order updates"):
        compile(g)
    for name in ("hope", "hope_block", "self_modifying_titans", "cms", "hope_attention"):
        with pytest.raises(nl.SpecError, match="meta='second'"):
            get(name, meta="second")


def test_a_cluster_feeding_only_first_order_writes_runs_without_a_graph():
    """M_k, M_v, M_eta and M_alpha feed only M_mem's first-order writes: their cluster runs
    under no_grad, with the same values and gradients as with a graph."""
    import dataclasses

    _, learner = first_order_smt(2, 4)
    free = {tuple(c.c.names): c.c.grad_free for c in learner.clusters.values()}
    assert free == {tuple(sorted(f"M_{n}" for n in ("k", "v", "eta", "alpha"))): True,
                    ("M_mem",): False}  # fmt: skip
    assert not any(c.c.grad_free for c in smt(2, 4).clusters.values())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    cot = torch.randn(2, 9, D, dtype=torch.float64)
    y = learner(x)[0]["y"]
    fast = grads_of(learner, y, cot)
    for c in learner.clusters.values():
        c.c = dataclasses.replace(c.c, grad_free=False)
    y2 = learner(x)[0]["y"]
    assert torch.equal(y, y2)
    slow = grads_of(learner, y2, cot)
    assert fast.keys() == {n for n, g in slow.items() if g.any()}
    for n in fast:
        assert torch.allclose(fast[n], slow[n], atol=1e-12, rtol=1e-12), n
