"""Chunk-updated blocks (CMS, Eq. 71) with any rule chain: weight decay, Nesterov, EMA,
Newton–Schulz, preconditioning, per-token rates and retention, several gd rules.

Each pattern is compared with a hand-written per-sample token loop of its equations (float64):
outputs, loss, final parameters, momentum buffers, and the meta-gradients of the outer loss with
respect to the block's initial parameters, the upstream projection and the signal's module."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.compiler.lowerings.rules import orthogonalize

DT = torch.float64
B, T, C, D = 2, 7, 3, 4  # T is not a multiple of the chunk


def _sig(act, scale=1.0):
    """A per-token scalar ``scale * act(G(x))`` as the hand loop computes it: ``[B, T]``."""

    def value(L, x):
        return scale * act(L.slow["G"](x))[..., 0]

    value.per_token = True  # a gd/ema rate that weights each token's gradient
    return value


def _learned(key, lo, hi):
    return lambda L, x: (lo + (hi - lo) * torch.sigmoid(L.scalars[key])).expand(x.shape[:2])


# name: (rules from a factory of G(x), the hand loop's chain). Hand chain entries: ("wd", rate),
# ("gd", lr, momentum, retain, nesterov), ("ema", beta), ("ns", steps, variant),
# ("pre", by, power, eps); a scalar is a float or f(learner, x) -> [B, T] (per token).
PATTERNS = {
    "weight_decay+gd": (
        lambda G: nl.chain(nl.weight_decay(0.1), nl.gd(lr=0.3, momentum=0.5)),
        [("wd", 0.1), ("gd", 0.3, 0.5, None, False)],
    ),
    "nesterov": (
        lambda G: nl.gd(lr=0.3, momentum=0.6, retain=0.9, nesterov=True),
        [("gd", 0.3, 0.6, 0.9, True)],
    ),
    "ema": (lambda G: nl.ema(0.6), [("ema", 0.6)]),
    "newton_schulz+gd": (
        lambda G: nl.chain(nl.orthogonalize(5), nl.gd(lr=0.05, momentum=0.5)),
        [("ns", 5, "quintic"), ("gd", 0.05, 0.5, None, False)],
    ),
    "newton_schulz_cubic+weight_decay+ema": (
        lambda G: nl.chain(nl.orthogonalize(3, "cubic"), nl.weight_decay(0.05), nl.ema(0.9)),
        [("ns", 3, "cubic"), ("wd", 0.05), ("ema", 0.9)],
    ),
    "precondition+gd": (
        lambda G: nl.chain(nl.precondition(G().square() + 0.5, power=0.5), nl.gd(lr=0.3)),
        [
            ("pre", lambda L, x: L.slow["G"](x)[..., 0] ** 2 + 0.5, 0.5, 1e-8),
            ("gd", 0.3, None, None, False),
        ],
    ),
    "per_token_lr": (
        lambda G: nl.gd(lr=nl.signal(G(), "sigmoid", 0.5), momentum=0.5),
        [("gd", _sig(torch.sigmoid, 0.5), 0.5, None, False)],
    ),
    "per_token_ema": (
        lambda G: nl.chain(nl.weight_decay(0.02), nl.ema(nl.signal(G(), "sigmoid"))),
        [("wd", 0.02), ("ema", _sig(torch.sigmoid))],
    ),
    "per_token_retain_momentum": (
        lambda G: nl.gd(
            lr=0.3, momentum=nl.signal(G(), "sigmoid", 0.8), retain=nl.signal(G(), "sigmoid")
        ),
        [("gd", 0.3, _sig(torch.sigmoid, 0.8), _sig(torch.sigmoid), False)],
    ),
    "two_gd_rules+learned": (
        lambda G: nl.chain(
            nl.weight_decay(nl.learned(0.1, 0.0, 0.5)),
            nl.gd(lr=nl.learned(0.2, 0.0, 1.0), momentum=0.5),
            nl.gd(lr=0.1, momentum=0.3, nesterov=True),
        ),
        [
            ("wd", _learned("B__rate", 0.0, 0.5)),
            ("gd", _learned("B__lr", 0.0, 1.0), 0.5, None, False),
            ("gd", 0.1, 0.3, None, True),
        ],
    ),
}
TOKEN_LOOP = {"per_token_lr", "per_token_ema"}


def block_graph(rules, chunk=C, cut=None, state=None):
    """x -> W (projection, trained by the outer optimizer) -> B (MLP block, or ``state``,
    updated every ``chunk`` tokens with the rule chain ``rules``) -> y; G (a projection to one
    value per token) feeds the rules' per-token scalars."""
    g = nl.Graph("cms_rules")
    x = g.input("x", dim=D)
    W = g.level("W", state=nl.linear(D, D), frequency=nl.per_step(), objective=nl.outer())
    made = {}

    def G():
        if "G" not in made:
            made["G"] = g.level("G", state=nl.linear(D, 1), frequency=nl.per_step(),
                                objective=nl.outer())  # fmt: skip
        return made["G"](x)

    optimizer = rules(G)
    blk = g.level("B", state=state or nl.mlp(D, D, width=5), frequency=nl.every(chunk, "token"),
                  objective=nl.outer(), optimizer=optimizer, init=nl.meta())  # fmt: skip
    g.output("y", blk(W(x)))
    if cut is not None:
        g.differentiate(cut, "B", nl.stop_grad())
    return g


def learner_for(name, seed=0, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        return compile(block_graph(PATTERNS[name][0], **kw), dtype=DT)


def data(seed=1, T=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=DT), torch.randn(B, T, D, generator=g, dtype=DT)


def mse(target):
    def loss_fn(out, s, e):
        return ((out["y"] - target[:, s:e]) ** 2).sum()

    return loss_fn


# ------------------------------------------------------------------------------ hand loop


def ns(m, steps, variant):
    """Muon's Newton–Schulz on one matrix: unit Frobenius norm, wide orientation."""
    tall = m.shape[0] > m.shape[1]
    X = m.T if tall else m
    X = X / X.norm().clamp_min(1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = 1.5 * X - 0.5 * A @ X if variant == "cubic" else (
            3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X)  # fmt: skip
    return X.T if tall else X


def hand_loop(learner, x, target, chain, chunk=C):
    """Per sample b, token t: g_t = d/dtheta (y_t - target_t)^2 at theta; acc += w_t g_t (w_t:
    a per-token gd/ema rate, else 1); at t = 0 mod chunk the chain runs on d = acc (scalars of
    the update's token). Returns outputs, loss, final parameters and momentum buffers (stacked
    over the batch), with the graph to the learner's parameters."""
    block = learner.blocks["B"].net
    names = [n for n, _ in block.named_parameters()]
    u = learner.slow["W"](x)

    def at(v, b, t):
        return v(learner, x)[b, t] if callable(v) else v

    per_token = [i for i, r in enumerate(chain)
                 if r[0] in ("gd", "ema") and getattr(r[1], "per_token", False)]  # fmt: skip
    weighted = per_token[0] if per_token else None
    ys, total, finals, bufs_out = [], 0.0, [], []
    for b in range(x.shape[0]):
        theta = list(block.parameters())
        acc = [torch.zeros_like(p) for p in theta]
        bufs = {i: [torch.zeros_like(p) for p in theta] for i, r in enumerate(chain)
                if r[0] == "gd" and r[2] is not None}  # fmt: skip
        yb = []
        for t in range(x.shape[1]):
            y = torch.func.functional_call(block, dict(zip(names, theta, strict=True)),
                                           (u[b : b + 1, t : t + 1],))  # fmt: skip
            loss = ((y - target[b : b + 1, t : t + 1]) ** 2).sum()
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            w = 1.0
            if weighted is not None:
                r = chain[weighted]
                w = at(r[1], b, t) if r[0] == "gd" else 1 - at(r[1], b, t)
            acc = [a + w * g for a, g in zip(acc, grads, strict=True)]
            yb.append(y)
            total = total + loss
            if (t + 1) % chunk:
                continue
            d = acc
            for i, r in enumerate(chain):
                if r[0] == "wd":
                    theta = [(1 - at(r[1], b, t)) * p for p in theta]
                elif r[0] == "pre":
                    by = at(r[1], b, t)
                    d = [g / (by ** r[2] + r[3]) for g in d]
                elif r[0] == "ns":  # matrices only; a bias vector passes through unchanged
                    d = [ns(g, r[1], r[2]) if g.dim() == 2 else g for g in d]
                else:
                    lr = 1.0 if i == weighted else (
                        at(r[1], b, t) if r[0] == "gd" else 1 - at(r[1], b, t))  # fmt: skip
                    mu = at(r[2], b, t) if r[0] == "gd" and r[2] is not None else None
                    a = at(r[3], b, t) if r[0] == "gd" and r[3] is not None else 1.0
                    if mu is None:
                        theta = [a * p - lr * g for p, g in zip(theta, d, strict=True)]
                    else:
                        bufs[i] = [mu * s - lr * g for s, g in zip(bufs[i], d, strict=True)]
                        step = ([mu * s - lr * g for s, g in zip(bufs[i], d, strict=True)]
                                if r[4] else bufs[i])  # fmt: skip
                        theta = [a * p + s for p, s in zip(theta, step, strict=True)]
            acc = [torch.zeros_like(p) for p in theta]
        ys.append(torch.cat(yb, dim=1))
        finals.append(theta)
        bufs_out.append([bufs[i] for i in sorted(bufs)])
    stack = [torch.stack(ps) for ps in zip(*finals, strict=True)]
    buffers = [[torch.stack(ps) for ps in zip(*(bo[k] for bo in bufs_out), strict=True)]
               for k in range(len(bufs_out[0]))]  # fmt: skip
    return torch.cat(ys), total, stack, buffers


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def run(learner, x, target, backend="chunk"):
    learner.backend = backend
    learner.zero_grad(set_to_none=True)
    out, state = learner(x, None, loss_fn=mse(target))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return out, state, grads


def buffers_of(state):
    return [state[k] for k in sorted(k for k in state if k.startswith("momentum"))]


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_rule_chain_matches_a_hand_loop(name):
    """Outputs, loss, final parameters, momentum buffers and meta-gradients (block initial
    parameters, projection W, signal module G, learned scalars) against the hand loop."""
    learner = learner_for(name)
    x, target = data()
    params = dict(learner.named_parameters())
    y, total, theta, buffers = hand_loop(learner, x, target, PATTERNS[name][1])
    want = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    out, state, grads = run(learner, x, target)
    close(out["y"], y)
    close(out["loss"], total)
    for got, ref in zip(state["B"]["theta"], theta, strict=True):
        close(got, ref)
    got_bufs = buffers_of(state["B"])
    assert len(got_bufs) == len(buffers)
    for got, ref in zip(got_bufs, buffers, strict=True):
        for a, b in zip(got, ref, strict=True):
            close(a, b)
    assert state["B"]["updates"] == T // C and "signals" not in state["B"]
    for n, g in zip(params, want, strict=True):
        assert g is not None and g.abs().sum() > 0, n
        close(grads[n], g)
    assert {n.split(".")[1] for n in grads} >= {"blocks", "slow"}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_chunk_pieces_equal_the_reference_backend(name, cms_token_loop):
    """Chunk pieces (parallel within a chunk) equal the reference backend cut at every token:
    outputs, loss, parameters, buffers, meta-gradients."""
    learner = learner_for(name)
    x, target = data(seed=2)
    fast = run(learner, x, target, "chunk")
    with cms_token_loop():
        ref = run(learner, x, target, "reference")
    close(fast[0]["y"], ref[0]["y"])
    close(fast[0]["loss"], ref[0]["loss"])
    for key in ("theta", *(k for k in fast[1]["B"] if k.startswith("momentum"))):
        for a, b in zip(fast[1]["B"][key], ref[1]["B"][key], strict=True):
            close(a, b)
    assert fast[2].keys() == ref[2].keys()
    for n in ref[2]:
        close(fast[2][n], ref[2][n])


@pytest.mark.parametrize("name", ["two_gd_rules+learned", "per_token_lr", "precondition+gd",
                                  "per_token_retain_momentum"])  # fmt: skip
def test_segments_with_carried_state_equal_one_pass(name):
    """k segments (one of a single token) with carried state equal one pass: outputs, loss,
    parameters, buffers, and the meta-gradients through the carried state."""
    learner = learner_for(name)
    x, target = data(seed=3, T=8)
    full = run(learner, x, target)
    learner.zero_grad(set_to_none=True)
    state, ys, total = None, [], 0.0
    for a, b in ((0, 1), (1, 5), (5, 8)):
        out, state = learner(x[:, a:b], state, loss_fn=mse(target[:, a:b]))
        ys.append(out["y"])
        total = total + out["loss"]
    total.backward()
    close(torch.cat(ys, 1), full[0]["y"])
    close(total, full[0]["loss"])
    for key in ("theta", *(k for k in state["B"] if k.startswith("momentum"))):
        for a, b in zip(state["B"][key], full[1]["B"][key], strict=True):
            close(a, b)
    for n, p in learner.named_parameters():
        close(p.grad, full[2][n])


@pytest.mark.parametrize("name", ["two_gd_rules+learned", "per_token_lr"])
def test_state_dict_round_trip_mid_sequence(name):
    """Save the learner and its fast state mid-sequence (a chunk half done, momentum buffers
    set), load both into a fresh learner: the rest of the sequence equals one pass."""
    x, target = data(seed=4, T=8)
    full, _ = learner_for(name)(x, None, loss_fn=mse(target))
    first = learner_for(name)
    with torch.no_grad():
        out1, state = first(x[:, :4], None, loss_fn=mse(target[:, :4]))
    assert state["B"]["phase"] == 1 and state["B"]["updates"] == 1
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "fast": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    second = learner_for(name, seed=123)  # other initial weights: the load must restore them
    second.load_state_dict(saved["model"])
    with torch.no_grad():
        out2, _ = second(x[:, 4:], saved["fast"], loss_fn=mse(target[:, 4:]))
    close(torch.cat([out1["y"], out2["y"]], 1), full["y"].detach())


def test_per_token_rate_runs_as_a_token_loop_with_a_warning():
    """A per-token rate is inside Eq. 71's sum: the plan says token loop and a
    ReferenceLoopWarning names the level; update-token signals (retain, momentum,
    preconditioner) and rule chains keep the chunk lowering without a warning."""
    for name in TOKEN_LOOP:
        with pytest.warns(nl.ReferenceLoopWarning, match="level 'B'.*per token"):
            learner = compile(block_graph(PATTERNS[name][0]), dtype=DT)
        lp = learner.plan.levels["B"]
        assert lp.lowering == "boundary" and "token loop" in lp.detail and lp.why
    for name in set(PATTERNS) - TOKEN_LOOP:
        with warnings.catch_warnings():
            warnings.simplefilter("error", nl.ReferenceLoopWarning)
            learner = compile(block_graph(PATTERNS[name][0]), dtype=DT)
        lp = learner.plan.levels["B"]
        assert lp.lowering == "boundary" and not lp.why and "token loop" not in lp.detail


def test_chunk_one_and_a_single_token():
    """C = 1 (every token an update) on a one-token sequence, and the same learner over T=5,
    against the hand loop."""
    rules = lambda G: nl.chain(nl.orthogonalize(5), nl.gd(lr=0.1, momentum=0.5, nesterov=True))  # noqa: E731
    chain = [("ns", 5, "quintic"), ("gd", 0.1, 0.5, None, True)]
    torch.manual_seed(0)
    learner = compile(block_graph(rules, chunk=1), dtype=DT)
    for steps in (1, 5):
        x, target = data(seed=5, T=steps)
        y, total, theta, _ = hand_loop(learner, x, target, chain, chunk=1)
        out, state = learner(x, None, loss_fn=mse(target))
        close(out["y"], y)
        close(out["loss"], total)
        for got, ref in zip(state["B"]["theta"], theta, strict=True):
            close(got, ref)


def test_newton_schulz_on_block_parameters():
    """Matrices are orthogonalised per sample; vectors (biases) pass through unchanged; a
    tensor of more axes is orthogonalised as the matrix [shape[0], prod(rest)]."""
    torch.manual_seed(0)
    w, bias, conv = torch.randn(2, 5, 3, dtype=DT), torch.randn(2, 5, dtype=DT), torch.randn(
        2, 4, 2, 3, dtype=DT)  # fmt: skip
    got = orthogonalize(w, 30, "cubic", lead=1)
    for b in range(2):
        close(got[b], ns(w[b], 30, "cubic"))
        close(got[b].T @ got[b], torch.eye(3, dtype=DT))  # tall: orthonormal columns
    assert torch.equal(orthogonalize(bias, 5, "quintic", lead=1), bias)
    flat = orthogonalize(conv, 5, "quintic", lead=1)
    for b in range(2):
        close(flat[b].reshape(4, 6), ns(conv[b].reshape(4, 6), 5, "quintic"))


# ------------------------------------------------------------------------------ refusals


def _refused(rules, match):
    with pytest.raises(nl.CompileError, match=match):
        compile(block_graph(rules), dtype=DT)


def test_unsupported_block_rules_are_refused_naming_the_level():
    _refused(lambda G: nl.dgd(lr=0.1), "level 'B': dgd in a chunk-updated block")
    _refused(
        lambda G: nl.chain(nl.gd(lr=nl.signal(G(), "sigmoid", 0.5)), nl.gd(lr=0.1)),
        "level 'B': a per-token rate .* only gd/ema rule",
    )
    _refused(lambda G: nl.chain(nl.follow(G()), nl.gd(lr=0.1)), "level 'B': the rule")


def test_a_signal_wider_than_one_value_per_token_is_refused():
    g = nl.Graph("wide")
    x = g.input("x", dim=D)
    blk = g.level("B", state=nl.mlp(D, D, width=5), frequency=nl.every(2, "token"),
                  objective=nl.outer(), optimizer=nl.gd(lr=0.1, retain=nl.signal(x)),
                  init=nl.meta())  # fmt: skip
    g.output("y", blk(x))
    learner = compile(g, dtype=DT)
    x, target = data(T=4)
    with pytest.raises(nl.CompileError, match="level 'B': a per-token scalar .* width 4"):
        learner(x, None, loss_fn=mse(target))


def _agrees_with_the_plain_run(name, seed, **setting):
    """The learner with ``setting`` gives the plain run's outputs, parameters and
    meta-gradients (to rounding)."""
    learner = learner_for(name)
    x, target = data(seed=seed)
    plain = run(learner, x, target)
    for k, v in setting.items():
        setattr(learner, k, v)
    other = run(learner, x, target)
    close(other[0]["y"], plain[0]["y"])
    for a, b in zip(other[1]["B"]["theta"], plain[1]["B"]["theta"], strict=True):
        close(a, b)
    assert other[2].keys() == plain[2].keys()
    for n in plain[2]:
        close(other[2][n], plain[2][n])


@pytest.mark.parametrize("name", ["per_token_lr", "per_token_retain_momentum"])
def test_functional_piece_step_agrees(name):
    """The functional piece step (program, loss and inner gradient as one torch.func function,
    as under compile_program) hands the signals over the same way: same outputs, parameters
    and meta-gradients."""
    _agrees_with_the_plain_run(name, 6, functional_pieces=True)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_recomputed_pieces_agree(name):
    """Pieces recomputed in the backward (``recompute_pieces``, compiler.sweep) give the same
    outputs, state and meta-gradients for every rule chain: momentum buffers, Newton-Schulz,
    learned and per-token scalars (one-token pieces) included (to rounding: the sweep's
    forward takes each inner gradient first order)."""
    _agrees_with_the_plain_run(name, 7, recompute_pieces=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("setting", ["recompute_pieces", "functional_pieces"])
def test_a_linear_block_sums_its_chunk_gradient_as_the_dense_steps_do(bias, setting):
    """A block whose state is one linear map: the plain run keeps each chunk's gradient as its
    factors (boundary.Outer), the sweep and the functional step take it dense per piece; the
    outputs, state and meta-gradients agree (to rounding)."""
    torch.manual_seed(0)
    rules = PATTERNS["weight_decay+gd"][0]
    learner = compile(block_graph(rules, state=nl.linear(D, D, bias=bias)), dtype=DT)
    x, target = data(seed=8)
    plain = run(learner, x, target)
    setattr(learner, setting, True)
    other = run(learner, x, target)
    close(other[0]["y"], plain[0]["y"])
    for a, b in zip(other[1]["B"]["theta"], plain[1]["B"]["theta"], strict=True):
        close(a, b)
    assert len(plain[1]["B"]["theta"]) == (2 if bias else 1)
    assert other[2].keys() == plain[2].keys()
    for n in plain[2]:
        close(other[2][n], plain[2][n])


def test_stop_grad_into_a_block_detaches_its_per_token_scalars():
    """A stop_grad edge G -> B detaches G where B's rules read it (the per-token rate): G gets
    no meta-gradient, the block still learns the same way."""
    torch.manual_seed(0)
    rules = PATTERNS["per_token_lr"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        plain = compile(block_graph(rules), dtype=DT)
        cut = compile(block_graph(rules, cut="G"), dtype=DT)
    cut.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "_extra_state"},
                        strict=False)  # fmt: skip
    x, target = data(seed=7)
    a, b = run(plain, x, target), run(cut, x, target)
    close(b[0]["y"], a[0]["y"])
    assert a[2]["top.slow.G.weight"].abs().sum() > 0 and "top.slow.G.weight" not in b[2]
    blocks = [n for n in a[2] if n.startswith("top.blocks.B.")]
    assert blocks
    for n in blocks:
        close(b[2][n], a[2][n])


def test_without_a_loss_the_block_holds_and_carries_no_signals():
    learner = learner_for("per_token_retain_momentum")
    x, target = data(T=5)
    for kw in ({}, {"loss_fn": mse(target), "writes": False}):
        out, state = learner(x, None, **kw)
        assert state["B"]["updates"] == 0 and "signals" not in state["B"]
        assert set(state["B"]) == {"theta", "acc", "phase", "updates", "momentum"}


@pytest.mark.parametrize("name", ["per_token_lr", "per_token_retain_momentum", "nesterov",
                                  "precondition+gd"])  # fmt: skip
def test_causality(name):
    """9.10 for blocks with rule chains and per-token scalars: an input or target after t never
    changes outputs up to t, on both backends, although the blocks learn in the sequence."""
    learner = learner_for(name)
    x, target = data(seed=5, T=9)
    for backend in ("chunk", "reference"):
        learner.backend = backend
        y0 = learner(x, None, loss_fn=mse(target))[0]["y"]
        for t in (0, 2, 5):
            x2, t2 = x.clone(), target.clone()
            x2[:, t + 1 :] += 1.0
            t2[:, t + 1 :] -= 1.0
            y1 = learner(x2, None, loss_fn=mse(t2))[0]["y"]
            assert torch.equal(y1[:, : t + 1], y0[:, : t + 1]), (backend, t)
            assert not torch.equal(y1[:, t + 1 :], y0[:, t + 1 :])
