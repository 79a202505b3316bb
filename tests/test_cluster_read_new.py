"""Reads at="new" of recurrent-cluster members: token t's read sees the member's running state
right after token t's update, while its inner gradients and its reads at="prev" keep the
visible (chunk-start) state. The cluster then runs one token per window (a token loop, with a
ReferenceLoopWarning); a member whose key and rate read another at="new" updates after it
within the token (Def. 2).

The reference is a hand-written float64 token loop, per sample, with autograd for the inner
gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from cluster_helpers import M, check_grads, inner_grad, params, rel, run_both_equal
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.flows import Input
from nlgraph.library import get

DT = torch.float64
D = 4
torch.set_num_threads(1)


def graph(variant="kernel", ck=2, cv=3, out_new=("M_k",), inner=False, outside=False,
          cycle=False):  # fmt: skip
    """M_k (DGD with dampened momentum) and M_v (``variant``: "kernel", a DGD member, or
    "chain", a token-loop member), reading each other at their chunk-start states. Outputs:
    ``y = M_k(q) + M_v(q)``, each at="new" if named in ``out_new``; ``z = M_k(q)`` at="prev";
    ``o = W_o(M_v(q, at="new"))`` (a slow level outside the cluster). ``inner``: M_v's key and
    rate read M_k at="new" (M_v updates after M_k). ``outside``: a Hebbian memory L keyed by
    ``M_k(x, at="new")``, read by ``q``. ``cycle``: M_k's value also reads M_v at="new"."""
    g = nl.Graph("smt_new")
    x = g.input("x", dim=D)
    We = g.level("W_eta", state=nl.linear(D, 1), frequency=nl.per_step(), objective=nl.outer())
    Wq = g.level("W_q", state=nl.linear(D, D), frequency=nl.per_step(), objective=nl.outer())
    Wo = g.level("W_o", state=nl.linear(D, D), frequency=nl.per_step(), objective=nl.outer())
    mk_x = nl.read("M_k", x)
    src_v = nl.read("M_k", x, at="new") if inner else mk_x
    v = nl.read("M_v", x)
    v_k = nl.read("M_v", x, at="new") if cycle else v
    rule_k = nl.dgd(lr=nl.signal(We(mk_x), "sigmoid"), retain=0.95, momentum=0.5, dampen=True)
    eta_v = nl.signal(We(src_v), "sigmoid", scale=0.5)
    freq_v = nl.per_token()
    if cycle:
        rule_v, freq_v = nl.gd(lr=0.3), nl.every(2, "token")
    elif variant == "chain":
        rule_v = nl.chain(nl.weight_decay(0.05), nl.gd(lr=eta_v, momentum=0.5))
    else:
        rule_v = nl.dgd(lr=eta_v, retain=0.9)
    mk = g.level("M_k", state=nl.mlp(D, D, width=3, residual=True), frequency=nl.per_token(),
                 context=nl.kv(key=mk_x.normalize(), value=nl.read("M_k", v_k).normalize()),
                 objective=nl.l2(), optimizer=rule_k, chunk=ck, init=nl.meta())  # fmt: skip
    mv = g.level("M_v", state=nl.mlp(D, D, width=3, residual=True), frequency=freq_v,
                 context=nl.kv(key=src_v.normalize(), value=nl.read("M_v", v)),
                 objective=nl.l2(), optimizer=rule_v, chunk=cv, init=nl.meta())  # fmt: skip
    q = Wq(x).normalize()
    g.output("y", mk(q, at="new" if "M_k" in out_new else "prev")
             + mv(q, at="new" if "M_v" in out_new else "prev"))  # fmt: skip
    g.output("z", mk(q))
    g.output("o", Wo(mv(q, at="new")))
    if outside:
        lm = g.level("L", state=nl.linear(D, D), frequency=nl.per_token(),
                     context=nl.kv(key=nl.read("M_k", x, at="new").normalize(), value=x),
                     objective=nl.dot(), optimizer=nl.gd(lr=0.5), init=nl.meta())  # fmt: skip
        g.output("l", lm(q))
    return g


def learner_of(seed=0, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        learner = compile(graph(**kw), dtype=DT)
    with torch.no_grad():  # larger initial states, so that the updates matter
        for p in learner.meta.values():
            p.mul_(0.7)
    return learner


def dgd_layers(ws, vis, k, eta, g, retain, mom=None, mu=0.0):
    """Per-layer exact DGD: W <- retain W - s (W x) x^T (+ dampened momentum) - s g without."""
    new = []
    for i, (w, xin) in enumerate(zip(ws, (k, F.silu(vis[0] @ k)), strict=True)):
        step = eta / (1 + eta * xin @ xin)
        if mom is None:
            new.append(retain * w - step * torch.outer(w @ xin, xin) - step * g[i])
        else:
            mom[i] = mu * mom[i] - (1 - mu) * step * g[i]
            new.append(retain * w - step * torch.outer(w @ xin, xin) + mom[i])
    return new


def hand(learner, x, variant="kernel", ck=2, cv=3, out_new=("M_k",), inner=False, outside=False,
         writes=True, start=None):  # fmt: skip
    """The graph token by token, per sample: M_k's update, then the reads of M_k at="new"
    (M_v's key and rate with ``inner``), M_v's update, then the outputs. Returns the outputs
    ``{name: [B, T, D]}`` and the final running/visible states per member."""
    W0 = {n: [learner.meta[f"{n}__W2"][0], learner.meta[f"{n}__W1"][0]] for n in ("M_k", "M_v")}
    We, Wq, Wo = learner.slow["W_eta"], learner.slow["W_q"], learner.slow["W_o"]
    outs = {n: [] for n in ("y", "z", "o", *(("l",) if outside else ()))}
    finals = []
    for b in range(x.shape[0]):
        vis, run = dict(W0), dict(W0)
        if start is not None:  # a carried state: (running, visible) per member, per sample
            run = {n: [w[b, 0] for w in start[n]["running"]] for n in W0}
            vis = {n: [w[b, 0] for w in start[n]["visible"]] for n in W0}
        mom_k = [torch.zeros_like(w) for w in W0["M_k"]]
        buf_v = [torch.zeros_like(w) for w in W0["M_v"]]
        L = learner.meta["L__M"][0] if outside else None
        out = {n: [] for n in outs}
        for t in range(x.shape[1]):
            xt = x[b, t]
            mk_x, v = M(vis["M_k"], xt), M(vis["M_v"], xt)
            q = F.normalize(Wq(xt), dim=-1)
            if writes:
                k = F.normalize(mk_x, dim=-1)
                eta = torch.sigmoid(We(mk_x))[0]
                g = inner_grad(vis["M_k"], k, F.normalize(M(vis["M_k"], v), dim=-1))
                run["M_k"] = dgd_layers(run["M_k"], vis["M_k"], k, eta, g, 0.95, mom_k, 0.5)
            mk_new = M(run["M_k"], xt)  # after M_k's update of this token
            if writes:
                src = mk_new if inner else mk_x
                k = F.normalize(src, dim=-1)
                eta = 0.5 * torch.sigmoid(We(src))[0]
                g = inner_grad(vis["M_v"], k, M(vis["M_v"], v))
                if variant == "chain":  # weight decay 0.05, then gd with momentum 0.5
                    buf_v = [0.5 * s - eta * gi for s, gi in zip(buf_v, g, strict=True)]
                    run["M_v"] = [0.95 * w + s for w, s in zip(run["M_v"], buf_v, strict=True)]
                else:
                    run["M_v"] = dgd_layers(run["M_v"], vis["M_v"], k, eta, g, 0.9)
            now = {n: run[n] if n in out_new else vis[n] for n in run}
            out["y"].append(M(now["M_k"], q) + M(now["M_v"], q))
            out["z"].append(M(vis["M_k"], q))
            out["o"].append(Wo(M(run["M_v"], q)))
            if outside:  # read before its update; Hebbian M <- M + 0.5 x k^T
                out["l"].append(L @ q)
                L = L + 0.5 * torch.outer(xt, F.normalize(mk_new, dim=-1))
            if writes and (t + 1) % ck == 0:
                vis["M_k"] = run["M_k"]
            if writes and (t + 1) % cv == 0:
                vis["M_v"] = run["M_v"]
        for n in outs:
            outs[n].append(torch.stack(out[n]))
        finals.append({n: (run[n], vis[n]) for n in run})
    return {n: torch.stack(o) for n, o in outs.items()}, finals


def meta_grads(ys, learner, x, seed=3):
    torch.manual_seed(seed)
    total = sum((y * torch.randn_like(y)).sum() for _, y in sorted(ys.items()))
    return torch.autograd.grad(total, [x, *params(learner)], allow_unused=True)


def check_states(state, finals, names=("M_k", "M_v")):
    for n in names:
        for key, slot in (("running", 0), ("visible", 1)):
            for layer in range(2):
                got = state[n][key][layer][:, 0]
                want = torch.stack([f[n][slot][layer] for f in finals])
                assert rel(got, want) <= 1e-10, (n, key, layer)


def check_outputs(ys, want):
    assert set(ys) >= set(want)
    for n, w in want.items():
        assert rel(ys[n], w) <= 1e-10, n


# ------------------------------------------------------------------------------ plan


def test_plan_detail_stages_and_one_warning_name_the_members():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = compile(graph(inner=True), dtype=DT)
    msgs = [str(w.message) for w in caught if issubclass(w.category, nl.ReferenceLoopWarning)]
    # M_k (output y, M_v's key and rate) and M_v (output o) are read at="new": one warning
    assert len(msgs) == 1 and "levels 'M_k', 'M_v' are read at='new'" in msgs[0], msgs
    assert "one token per window" in msgs[0]
    plan = learner.plan
    assert plan.clusters == [["M_k", "M_v"]]
    for n in ("M_k", "M_v"):
        assert plan.levels[n].lowering == "cluster"
        assert plan.levels[n].detail.startswith("token loop (one token per window")
    c = learner.program.clusters[0]
    assert c.read_new == ("M_k", "M_v") and c.stages == [["M_k"], ["M_v"]]
    c = learner_of(out_new=()).program.clusters[0]  # only the outputs read at "new"
    assert c.read_new == ("M_v",) and c.stages == [["M_k", "M_v"]]


def test_reads_at_new_inside_the_cycle_that_form_a_cycle_are_refused():
    # different frequencies: validation's same-tick check (one frequency) does not see it
    with warnings.catch_warnings(), pytest.raises(nl.CompileError, match=r"levels 'M_k' -> "
                                                  r"'M_v' -> 'M_k' of the recurrent"):  # fmt: skip
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        compile(graph(inner=True, cycle=True), dtype=DT)


def test_a_read_at_new_of_itself_inside_its_update_is_refused():
    g = nl.Graph("self_new")
    x = g.input("x", dim=D)
    m = g.level("M", state=nl.mlp(D, D, width=3, residual=True), frequency=nl.per_token(),
                context=nl.kv(key=nl.read("M", x, at="new").normalize(), value=x),
                objective=nl.l2(), optimizer=nl.dgd(lr=0.3), init=nl.meta())  # fmt: skip
    g.output("y", m(x))
    with warnings.catch_warnings(), pytest.raises(nl.CompileError, match=r"level 'M' reads its "
                                                  r"own state after its update"):  # fmt: skip
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        compile(g, dtype=DT)


# ------------------------------------------------------------------------------ values


CASES = [  # (variant, B, T, chunk of M_k, chunk of M_v, out_new, inner)
    ("kernel", 2, 7, 2, 3, ("M_k",), False), ("kernel", 2, 7, 2, 3, ("M_k", "M_v"), True),
    ("kernel", 1, 1, 2, 3, ("M_k",), True), ("kernel", 2, 5, 1, 1, ("M_v",), True),
    ("kernel", 3, 8, 3, 3, ("M_k", "M_v"), False), ("chain", 2, 7, 2, 3, ("M_k",), True),
    ("chain", 1, 4, 1, 1, ("M_k", "M_v"), False),
]  # fmt: skip


@pytest.mark.parametrize("variant,B,T,ck,cv,out_new,inner", CASES, ids=str)
def test_cluster_equals_the_hand_written_token_loop(variant, B, T, ck, cv, out_new, inner):
    kw = dict(variant=variant, ck=ck, cv=cv, out_new=out_new, inner=inner)
    learner = learner_of(**kw)
    x = torch.randn(B, T, D, dtype=DT, requires_grad=True)
    want, finals = hand(learner, x, **kw)
    g_want = meta_grads(want, learner, x)
    assert g_want[0].abs().sum() > 0
    for backend in ("chunk", "reference"):
        learner.backend = backend
        ys, state = learner(x)
        check_outputs(ys, want)
        check_states(state, finals)
        check_grads(meta_grads(ys, learner, x), g_want)
    if T > 2:  # the reads at "new" differ from the same reads at "prev" (the test can fail)
        assert rel(ys["y"], hand(learner, x, **{**kw, "out_new": ()})[0]["y"]) > 1e-6


def test_a_memory_outside_the_cluster_keyed_by_a_read_at_new():
    kw = dict(out_new=("M_k",), inner=True, outside=True)
    learner = learner_of(**kw)
    assert learner.plan.levels["L"].lowering == "linear_memory" and "L" not in sum(
        learner.plan.clusters, [])  # fmt: skip
    x = torch.randn(2, 6, D, dtype=DT, requires_grad=True)
    want, finals = hand(learner, x, **kw)
    ys, state = learner(x)
    check_outputs(ys, want)
    check_states(state, finals)
    check_grads(meta_grads(ys, learner, x), meta_grads(want, learner, x))


# ------------------------------------------------------------------------------ segments


@pytest.mark.parametrize("variant,inner", [("kernel", True), ("chain", False)])
def test_segments_with_carried_state_equal_one_pass(variant, inner):
    """Cuts inside chunks: the running and visible states, momentum buffers and phases carry."""
    kw = dict(variant=variant, out_new=("M_k", "M_v"), inner=inner)
    learner = learner_of(**kw)
    x = torch.randn(2, 11, D, dtype=DT, requires_grad=True)
    ys, full = learner(x)
    g_one = meta_grads(ys, learner, x)
    state, pieces = None, []
    for a, b in ((0, 1), (1, 4), (4, 5), (5, 11)):
        out, state = learner(x[:, a:b], state)
        pieces.append(out)
    seg = {n: torch.cat([p[n] for p in pieces], dim=1) for n in ys}
    for n in ys:
        assert rel(seg[n], ys[n]) <= 1e-12, n
    for n in ("M_k", "M_v"):
        for key in ("running", "visible"):
            for a, b in zip(state[n][key], full[n][key], strict=True):
                assert rel(a, b) <= 1e-12
    check_grads(meta_grads(seg, learner, x), g_one)


# ------------------------------------------------------------------------------ read-only


def test_read_only_pass_reads_the_state_it_starts_from():
    """writes=False: no update, so a read at="new" sees the running state the segment starts
    from and a read at="prev" the visible one (they differ inside a chunk)."""
    kw = dict(out_new=("M_k", "M_v"), inner=True)
    learner = learner_of(**kw)
    x = torch.randn(2, 6, D, dtype=DT)
    ys, _ = learner(x, writes=False)
    want, _ = hand(learner, x, writes=False, **kw)
    check_outputs(ys, want)
    assert rel(learner(x)[0]["y"][:, 1:], ys["y"][:, 1:]) > 1e-6  # the writes matter
    # from a carried state one token into M_k's chunk of 2: running != visible
    _, start = learner(x[:, :1])
    assert rel(start["M_k"]["running"][0], start["M_k"]["visible"][0]) > 1e-6
    ys, after = learner(x[:, 1:], start, writes=False)
    want, _ = hand(learner, x[:, 1:], writes=False, start=start, **kw)
    check_outputs(ys, want)
    for n in ("M_k", "M_v"):  # the state is left as it was
        for a, b in zip(after[n]["running"], start[n]["running"], strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("variant", ["kernel", "chain"])
def test_causality(variant):
    """A perturbation of tokens after t never changes outputs up to t, for both backends."""
    learner = learner_of(variant=variant, out_new=("M_k", "M_v"), inner=True)
    x = torch.randn(2, 9, D, dtype=DT)
    for backend in ("chunk", "reference"):
        learner.backend = backend
        y0 = learner(x)[0]
        for t in (0, 4, 7):
            x2 = x.clone()
            x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
            y1 = learner(x2)[0]
            for n in y0:
                assert torch.equal(y1[n][:, : t + 1], y0[n][:, : t + 1]), (backend, t, n)
            assert not torch.equal(y1["y"][:, t + 1 :], y0["y"][:, t + 1 :])


# ------------------------------------------------------------------------------ one member


def one_memory(rule, self_read):
    """A DGD MLP memory read at="new" (a cluster of one); ``self_read``: its value reads itself
    with weight 0."""
    g = nl.Graph("one", chunk=3)
    x = g.input("x", dim=D)
    value = x + 0.0 * nl.read("M", x) if self_read else x
    mem = g.level("M", state=nl.mlp(D, D, width=3, residual=True), frequency=nl.per_token(),
                  context=nl.kv(key=x.normalize(), value=value), objective=nl.l2(),
                  optimizer=rule, init=nl.meta())  # fmt: skip
    g.output("y", mem(x, at="new") + mem(x.normalize(), at="new"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        torch.manual_seed(0)
        return compile(g, dtype=DT)


@pytest.mark.parametrize("self_read", [False, True])
def test_one_member_equals_the_stand_alone_reference_loop_read_after(self_read):
    """A DGD MLP memory read at="new" (a cluster of one, formerly refused) equals the reference
    loop's read-after of the same rule (a weight decay of 0 sends it there)."""
    loop = one_memory(nl.chain(nl.weight_decay(0.0), nl.dgd(lr=0.4, retain=0.9)), False)
    cl = one_memory(nl.dgd(lr=0.4, retain=0.9), self_read)
    assert loop.plan.levels["M"].lowering == "reference_loop"
    assert cl.plan.clusters == [["M"]] and cl.plan.levels["M"].lowering == "cluster"
    x = torch.randn(2, 7, D, dtype=DT, requires_grad=True)
    ya, yb = run_both_equal(cl, loop, x)
    check_grads(meta_grads(yb, cl, x), meta_grads(ya, loop, x))


# ------------------------------------------------------------------------------ library


def titans(chunk=2, chunk_mem=3):
    g = get("self_modifying_titans", d=D, heads=1, chunk=chunk, chunk_mem=chunk_mem,
            conv_window=0, output_gate=False)  # fmt: skip
    q = nl.read("W_q", Input(name="x")).normalize()
    g.output("y_new", nl.read("M_mem", q, at="new"))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        return compile(g, dtype=DT)


NAMES = ("M_k", "M_v", "M_eta", "M_alpha", "M_mem")


def hand_titans(learner, x, chunk=2, chunk_mem=3):
    """The library graph token by token: every memory reads the others at the chunk-start
    state and takes a per-layer exact DGD step with dampened momentum 0.9 on
    1/2 ||M(k) - normalize(M(v))||^2; y = M_mem(q) before, y_new after the token's update."""
    W0 = {n: [learner.meta[f"{n}__W2"][0], learner.meta[f"{n}__W1"][0]] for n in NAMES}
    We, Wa, Wq = (learner.slow[n] for n in ("W_eta", "W_alpha", "W_q"))
    ys, finals = {"y": [], "y_new": []}, []
    for b in range(x.shape[0]):
        vis, run = dict(W0), dict(W0)
        mom = {n: [torch.zeros_like(w) for w in W0[n]] for n in NAMES}
        out = {"y": [], "y_new": []}
        for t in range(x.shape[1]):
            xt = x[b, t]
            k = F.normalize(M(vis["M_k"], xt), dim=-1)
            v = M(vis["M_v"], xt)
            eta = F.softplus(We(M(vis["M_eta"], xt)))[0]
            alpha = torch.sigmoid(Wa(M(vis["M_alpha"], xt)) + 6.0)[0]
            q = F.normalize(Wq(xt), dim=-1)
            for n in NAMES:
                g = inner_grad(vis[n], k, F.normalize(M(vis[n], v), dim=-1))
                run[n] = dgd_layers(run[n], vis[n], k, eta, g, alpha, mom[n], 0.9)
            out["y"].append(M(vis["M_mem"], q))
            out["y_new"].append(M(run["M_mem"], q))
            for n in NAMES:
                if (t + 1) % (chunk_mem if n == "M_mem" else chunk) == 0:
                    vis[n] = run[n]
        for n in ys:
            ys[n].append(torch.stack(out[n]))
        finals.append({n: (run[n], vis[n]) for n in NAMES})
    return {n: torch.stack(y) for n, y in ys.items()}, finals


@pytest.mark.parametrize("B,T", [(2, 7), (1, 1)])
def test_self_modifying_titans_read_at_new(B, T):
    learner = titans()
    assert learner.plan.clusters == [["M_alpha", "M_eta", "M_k", "M_v"], ["M_mem"]]
    assert learner.plan.levels["M_mem"].detail.startswith("token loop")
    assert not learner.plan.levels["M_k"].detail.startswith("token loop")
    x = torch.randn(B, T, D, dtype=DT, requires_grad=True)
    want, finals = hand_titans(learner, x)
    g_want = meta_grads(want, learner, x)
    for backend in ("chunk", "reference"):
        learner.backend = backend
        ys, state = learner(x)
        check_outputs(ys, want)
        check_states(state, finals, NAMES)
        check_grads(meta_grads(ys, learner, x), g_want)
    if T > 1:
        assert rel(ys["y_new"][:, :-1], ys["y"][:, :-1]) > 1e-6
