"""Fidelity checks the other files leave open (PAPER.md 4.5-4.6, 5.2, 9.7, 9.9-9.11).

1. Self-modifying Titans with its default window-4 convolution on ``x``: the chunked learner
   equals the reference, is causal, and the convolution is the causal window-4 sum.
2. Causality of the full ``hope`` and ``hope_attention`` models while CMS blocks learn in the
   sequence from a next-token loss.
3. The nested CMS reset with chunk sizes that do not divide each other, against a token loop.
4. Fast states reset at a sequence boundary (``state=None``), and a returned state continues.
"""

from __future__ import annotations

import pytest
import torch

from nlgraph.compiler import compile
from nlgraph.compiler.modules import CausalConv
from nlgraph.compiler.verify import compare, flatten
from nlgraph.library import get
from nlgraph.train.trainer import next_token_loss

TOLERANCE = 1e-10


def smt_learners():
    """The library's self-modifying Titans at its default ``conv_window=4``: the chosen
    backend and the reference, with the same parameters."""
    graph = get("self_modifying_titans", d=8, heads=2, chunk=2, chunk_mem=4)
    assert graph.spec.meta["conv_window"] == 4
    torch.manual_seed(0)
    chosen = compile(graph, dtype=torch.float64)
    reference = compile(graph, backend="reference", dtype=torch.float64)
    reference.load_state_dict(chosen.state_dict())
    weight = torch.randn(8, 1, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():  # a convolution far from its identity start, so that every tap matters
        for learner in (chosen, reference):
            learner.slow["conv"].weight.copy_(weight)
    return reference, chosen


def differing_leaves(a, b) -> list[str]:
    """Names of the leaves of two states that differ (tensors exactly, other leaves by ==)."""
    fa, fb = dict(flatten(a)), dict(flatten(b))
    assert fa.keys() == fb.keys()
    bad = []
    for k in fa:
        x, y = fa[k], fb[k]
        same = torch.equal(x, y) if torch.is_tensor(x) else x == y
        if not same:
            bad.append(k)
    return bad


# ---------------------------------------------------------------------------------- 1. SMT conv
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (2, 10)], ids=["B1-T1", "B2-T7", "B2-T10"])
def test_smt_with_convolution_equals_reference(B, T):
    """Outputs, every final-state leaf and every parameter gradient (random cotangents) of the
    chunked learner equal the reference's, at the default window 4 (f64, 1e-10 relative)."""
    reference, chosen = smt_learners()
    x = torch.randn(B, T, 8, generator=torch.Generator().manual_seed(B * 10 + T),
                    dtype=torch.float64)  # fmt: skip
    result = compare(reference, chosen, {"x": x}, seed=T)
    assert "state conv" in result.errors and "grad top.slow.conv.weight" in result.errors
    bad = {k: result.errors[k] for k in result.failures(TOLERANCE)}
    assert not bad, bad


@pytest.mark.parametrize("backend", ["chunk", "reference"])
def test_smt_with_convolution_is_causal(backend):
    """A change at token t changes no output before t (exactly); the state after the prefix
    0..t-1 is the state from which the perturbed sequence continues to its one-pass outputs."""
    reference, chosen = smt_learners()
    learner = chosen if backend == "chunk" else reference
    learner.backend = backend
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y0 = learner(x)[0]["y"]
        for t in (1, 4, 5, 10):  # chunk starts of M_mem (4) and of the others (2), and a middle
            x2 = x.clone()
            x2[:, t] += torch.randn(2, 8, generator=gen, dtype=torch.float64)
            y2, final2 = learner(x2)
            y2 = y2["y"]
            assert torch.equal(y2[:, :t], y0[:, :t]), t
            assert not torch.allclose(y2[:, t], y0[:, t]), t  # the change reaches token t
            _, prefix_state = learner(x[:, :t])
            out, rest_state = learner(x2[:, t:], prefix_state)
            assert torch.allclose(out["y"], y2[:, t:], atol=1e-12, rtol=0), t
            want = dict(flatten(final2))
            for k, v in flatten(rest_state):
                if torch.is_tensor(v):
                    assert torch.allclose(v, want[k], atol=1e-12, rtol=0), (t, k)
                else:
                    assert v == want[k], (t, k)


def causal_window_loop(conv: CausalConv, x: torch.Tensor) -> torch.Tensor:
    """``y_t = sum_{j=0..W-1} w_j * x_{t-j}`` per channel, zeros before the start. nn.Conv1d is a
    cross-correlation over ``[tail (W-1 inputs), x]``, so the tap on ``x_{t-j}`` is
    ``weight[:, 0, W-1-j]``."""
    W = conv.window
    w = [conv.weight[:, 0, W - 1 - j] for j in range(W)]
    ys = []
    for t in range(x.shape[1]):
        y = torch.zeros_like(x[:, 0])
        for j in range(W):
            if t - j >= 0:
                y = y + w[j] * x[:, t - j]
        ys.append(y)
    return torch.stack(ys, dim=1)


def test_convolution_is_the_causal_window_sum_and_segments_carry_its_tail():
    _, learner = smt_learners()
    conv = learner.slow["conv"]
    assert isinstance(conv, CausalConv) and conv.window == 4
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y, tail = conv(x)
        assert torch.allclose(y, causal_window_loop(conv, x), atol=1e-13, rtol=0)
        assert torch.equal(tail, x[:, -3:])
        ys, tail = [], None
        for a, b in ((0, 1), (1, 3), (3, 4), (4, 9)):  # segments shorter than the window too
            part, tail = conv(x[:, a:b], tail)
            ys.append(part)
        assert torch.allclose(torch.cat(ys, 1), y, atol=1e-13, rtol=0)


# ------------------------------------------------------------------------ 2. hope causality
VOCAB, T_LM = 11, 13


def lm(name: str):
    common = dict(d=8, heads=2, vocab=VOCAB, n_layers=2, hidden=16, cms_chunks=(2, 4),
                  cms_lrs=0.1)  # fmt: skip
    if name == "hope":
        common.update(width=8, chunk=2, chunk_mem=4)
    torch.manual_seed(0)
    return compile(get(name, **common), dtype=torch.float64)


CMS_LEAVES = (".cms.mlp0.acc.", ".cms.mlp0.theta.", ".cms.mlp1.acc.", ".cms.mlp1.theta.")


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_full_models_are_causal_while_cms_blocks_learn(name):
    """A new token t changes no logit before t, although CMS blocks learn in the sequence and
    the loss at t-1 scores token t (t=5, 6: inside a level-2 chunk; t=8: on every boundary).

    After the prefix 0..t-1 run with the whole sequence's loss, only the CMS blocks' signals
    and parameters may depend on token t (its target at t-1); every fast memory, convolution
    tail, attention cache and CMS counter is the same."""
    learner = lm(name)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(VOCAB, (2, T_LM), generator=gen)
    with torch.no_grad():
        out0, _ = learner({"tokens": tokens}, None, loss_fn=next_token_loss(tokens))
        assert all(out0["logits"].isfinite().flatten())
        for t in (5, 6, 8):
            tok2 = tokens.clone()
            tok2[:, t] = (tokens[:, t] + 1 + torch.arange(2)) % VOCAB
            out2, _ = learner({"tokens": tok2}, None, loss_fn=next_token_loss(tok2))
            assert torch.equal(out2["logits"][:, :t], out0["logits"][:, :t]), (name, t)
            assert not torch.allclose(out2["logits"][:, t], out0["logits"][:, t])
            prefix = {"tokens": tokens[:, :t]}
            _, s0 = learner(prefix, None, loss_fn=next_token_loss(tokens))
            _, s2 = learner(prefix, None, loss_fn=next_token_loss(tok2))
            differ = differing_leaves(s0, s2)
            assert differ and all(any(c in k for c in CMS_LEAVES) for k in differ), (t, differ)
            # scored only up to t-2 (the prefix's own targets), nothing differs
            _, s3 = learner({"tokens": tok2[:, :t]}, None, loss_fn=next_token_loss(tok2[:, :t]))
            _, s4 = learner(prefix, None, loss_fn=next_token_loss(tokens[:, :t]))
            assert not differing_leaves(s3, s4), t


# ------------------------------------------------------------------ 3. nested CMS, ragged
def nested_token_loop(learner, x, target, chunks, lrs):
    """Eq. 71 token by token for the nested two-level chain ``y = mlp1(mlp0(x))``: gradients
    of each token's loss at the parameters in force, summed per chunk and applied at the
    chunk's end; mlp0 (the child) restarts from its initial parameters whenever mlp1's chunk
    ends, and its chunks restart with it, so its last chunk inside a parent chunk is shorter
    and it updates ceil(C1 / C0) times per parent chunk (PAPER.md 5.2, 9.7)."""
    (c0, c1), (lr0, lr1) = chunks, lrs
    nets = [learner.blocks["mlp0"].net, learner.blocks["mlp1"].net]
    names = [list(dict(n.named_parameters())) for n in nets]
    init = [[p.detach().clone() for p in n.parameters()] for n in nets]
    ys, finals = [], []
    for b in range(x.shape[0]):  # each sequence has its own fast parameters
        theta = [list(init[0]), list(init[1])]
        acc = [[torch.zeros_like(p) for p in th] for th in theta]
        since_child = 0
        yb = []
        for t in range(x.shape[1]):
            ps = [[p.clone().requires_grad_() for p in th] for th in theta]
            h = torch.func.functional_call(nets[0], dict(zip(names[0], ps[0], strict=True)),
                                           (x[b, t],))  # fmt: skip
            y = torch.func.functional_call(nets[1], dict(zip(names[1], ps[1], strict=True)), (h,))
            yb.append(y.detach())
            grads = torch.autograd.grad(((y - target[b, t]) ** 2).sum(), ps[0] + ps[1])
            g0, g1 = grads[: len(ps[0])], grads[len(ps[0]) :]
            acc = [[a + g for a, g in zip(acc[0], g0, strict=True)],
                   [a + g for a, g in zip(acc[1], g1, strict=True)]]  # fmt: skip
            since_child += 1
            parent_ends = (t + 1) % c1 == 0
            child_ends = since_child == c0 or parent_ends
            if child_ends:
                theta[0] = [p - lr0 * a for p, a in zip(theta[0], acc[0], strict=True)]
                acc[0] = [torch.zeros_like(a) for a in acc[0]]
                since_child = 0
            if parent_ends:
                theta[1] = [p - lr1 * a for p, a in zip(theta[1], acc[1], strict=True)]
                acc[1] = [torch.zeros_like(a) for a in acc[1]]
                theta[0] = list(init[0])  # the child restarts with its parent's chunk
                acc[0] = [torch.zeros_like(a) for a in acc[0]]
                since_child = 0
        ys.append(torch.stack(yb))
        finals.append(theta)
    return torch.stack(ys), finals


NESTED_CASES = [((2, 5), 17), ((3, 7), 16)]


def run_nested(chunks, T):
    lrs = (0.2, 0.1)
    torch.manual_seed(0)
    learner = compile(get("cms", d=3, chunks=chunks, lrs=lrs, hidden=4, variant="nested"),
                      dtype=torch.float64)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)

    def loss_fn(outputs, start, end):
        return ((outputs["y"] - target[:, start:end]) ** 2).sum()

    with torch.no_grad():
        out, state = learner(x, None, loss_fn=loss_fn)
    return learner, x, target, lrs, out, state


def assert_matches_loop(chunks, T):
    learner, x, target, lrs, out, state = run_nested(chunks, T)
    want_y, finals = nested_token_loop(learner, x, target, chunks, lrs)
    assert torch.allclose(out["y"], want_y, atol=TOLERANCE, rtol=0)
    for i, name in enumerate(("mlp0", "mlp1")):
        for got, *per_sample in zip(state[name]["theta"], *(f[i] for f in finals), strict=True):
            assert torch.allclose(got, torch.stack(per_sample), atol=TOLERANCE, rtol=0), name


@pytest.mark.parametrize("chunks,T", NESTED_CASES, ids=["2-5", "3-7"])
def test_nested_reset_with_non_dividing_chunks_matches_the_paper(chunks, T):
    """PAPER.md 5.2: the child re-initialises after ceil(C_s / C_{s+1}) of its own updates,
    i.e. when the parent's chunk ends: its clock restarts with each parent chunk."""
    assert_matches_loop(chunks, T)


# ------------------------------------------------------------------ 4. sequence-boundary reset
def small_memory(name):
    torch.manual_seed(0)
    if name == "titans":
        g = get("titans", d=8, heads=2, chunk=2)
    else:
        g = get("self_modifying_titans", d=8, heads=2, chunk=2, chunk_mem=4)
    return compile(g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["titans", "self_modifying_titans"])
def test_memories_reset_at_sequence_boundaries(name):
    """``state=None`` starts every memory from its initial state whatever ran before; the
    returned state continues the sequence (equal to one pass over both)."""
    learner = small_memory(name)
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        fresh, _ = learner(b)
        _, after_a = learner(a)
        again, _ = learner(b, None)
        assert torch.equal(again["y"], fresh["y"])
        cont, _ = learner(b, after_a)
        assert not torch.allclose(cont["y"], fresh["y"], atol=1e-6)
        whole, _ = learner(torch.cat([a, b], 1))
        assert torch.allclose(cont["y"], whole["y"][:, 6:], atol=1e-12, rtol=0)


def test_hope_resets_at_sequence_boundaries():
    """The same for hope, CMS blocks learning from a next-token loss; segments end on ticks
    of every clock (multiples of 4) and the first segment's last target is the next token."""
    learner = lm("hope")
    tokens = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    a, b = tokens[:, :8], tokens[:, 8:]
    with torch.no_grad():
        fresh, s_fresh = learner({"tokens": b}, None, loss_fn=next_token_loss(b))
        _, after_a = learner({"tokens": a}, None, loss_fn=next_token_loss(tokens[:, :9]))
        again, s_again = learner({"tokens": b}, None, loss_fn=next_token_loss(b))
        assert torch.equal(again["logits"], fresh["logits"])
        assert not differing_leaves(s_again, s_fresh)
        cont, _ = learner({"tokens": b}, after_a, loss_fn=next_token_loss(b))
        assert not torch.allclose(cont["logits"], fresh["logits"], atol=1e-6)
        whole, _ = learner({"tokens": tokens}, None, loss_fn=next_token_loss(tokens))
        assert torch.allclose(cont["logits"], whole["logits"][:, 8:], atol=1e-10, rtol=0)
