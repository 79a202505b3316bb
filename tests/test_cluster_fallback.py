"""Recurrent clusters beyond the cluster lowering: a member whose rule or schedule no cluster
kernel covers runs as a token loop of its rule chain inside the cluster's windows, and stop_grad
edges whose source is evaluated inside the window program detach it there.

The reference is a hand-written float64 token loop of the whole cluster (two self-modifying MLP
memories that make each other's keys, values and rates), per sample, with autograd for the inner
gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from cluster_helpers import M, check_grads, inner_grad, params, rel, run_both_equal
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.library import get

DT = torch.float64
D = 4


def graph(variant, ck=2, cv=3, edges=()):
    """M_k (DGD with dampened momentum, the cluster kernel) and M_v (``variant``), reading each
    other at their chunk-start states: ``k = normalize(M_k(x))``, ``v = M_v(x)``, the rate
    ``eta = W_eta(M_k(x))``; each trains on its self-generated value; ``y = (M_k + M_v)(q)``."""
    g = nl.Graph("smt2")
    x = g.input("x", dim=D)
    k = nl.read("M_k", x).normalize()
    v = nl.read("M_v", x)
    We = g.level("W_eta", state=nl.linear(D, 1), frequency=nl.per_step(), objective=nl.outer())
    Wq = g.level("W_q", state=nl.linear(D, D), frequency=nl.per_step(), objective=nl.outer())
    eta = We(nl.read("M_k", x))
    freq = nl.per_token()
    if variant == "chain":
        rule = nl.chain(nl.weight_decay(0.05),
                        nl.gd(lr=nl.signal(eta, "sigmoid", scale=0.5), momentum=0.5))  # fmt: skip
    elif variant == "nesterov":
        rule = nl.gd(lr=0.3, momentum=0.6, retain=0.9, nesterov=True)
    elif variant == "wd_dgd":
        rule = nl.chain(nl.weight_decay(0.02), nl.dgd(lr=0.3, retain=0.9))
    elif variant == "every2":
        rule, freq = nl.gd(lr=0.3), nl.every(2, "token")
    elif variant == "every2chunks":
        rule, freq = nl.gd(lr=0.3), nl.per_chunk(2)
    else:  # "kernel": a DGD member, the cluster lowering
        rule = nl.dgd(lr=nl.signal(eta, "sigmoid", scale=0.5), retain=0.9)
    rule_k = nl.dgd(lr=nl.signal(eta, "sigmoid"), retain=0.95, momentum=0.5, dampen=True)
    mk = g.level("M_k", state=nl.mlp(D, D, width=3, residual=True), frequency=nl.per_token(),
                 context=nl.kv(key=k, value=nl.read("M_k", v).normalize()), objective=nl.l2(),
                 optimizer=rule_k, chunk=ck, init=nl.meta())  # fmt: skip
    mv = g.level("M_v", state=nl.mlp(D, D, width=3, residual=True), frequency=freq,
                 context=nl.kv(key=k, value=nl.read("M_v", v)), objective=nl.l2(),
                 optimizer=rule, chunk=cv, init=nl.meta())  # fmt: skip
    q = Wq(x).normalize()
    g.output("y", mk(q) + mv(q))
    for src, dst, mode in edges:
        g.differentiate(src, dst, mode)
    return g


def learner_of(variant, ck=2, cv=3, edges=(), seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        learner = compile(graph(variant, ck, cv, edges), dtype=DT)
    with torch.no_grad():  # larger initial states, so that the updates matter
        for p in learner.meta.values():
            p.mul_(0.7)
    return learner


def hand(learner, x, variant, ck=2, cv=3, cut=(), trunc_v=None, writes=True):
    """The cluster token by token, per sample. ``cut``: (src, dst) stop_grad edges, applied
    with .detach() where dst reads src; ``trunc_v``: detach M_v's whole state every that many
    tokens. Returns y [B, T, D] and the final running/visible states per member."""
    W0 = {n: [learner.meta[f"{n}__W2"][0], learner.meta[f"{n}__W1"][0]] for n in ("M_k", "M_v")}
    We, Wq = learner.slow["W_eta"], learner.slow["W_q"]

    def d(src, dst, val):
        return val.detach() if (src, dst) in cut else val

    ys, finals = [], []
    for b in range(x.shape[0]):
        vis, run = dict(W0), dict(W0)
        mom_k = [torch.zeros_like(w) for w in W0["M_k"]]
        buf_v = [torch.zeros_like(w) for w in W0["M_v"]]
        acc, out = None, []
        for t in range(x.shape[1]):
            if trunc_v and t and t % trunc_v == 0:
                run["M_v"], vis["M_v"] = ([w.detach() for w in run["M_v"]],
                                          [w.detach() for w in vis["M_v"]])  # fmt: skip
                buf_v = [w.detach() for w in buf_v]
                acc = None if acc is None else [a.detach() for a in acc]
            xt = x[b, t]
            mk_x, v = M(vis["M_k"], xt), M(vis["M_v"], xt)
            q = F.normalize(Wq(xt), dim=-1)
            out.append(M(vis["M_k"], q) + M(vis["M_v"], q))
            if not writes:
                continue
            # M_k: per-layer DGD, exact step, dampened momentum, retain 0.95
            k = F.normalize(mk_x, dim=-1)
            eta = torch.sigmoid(d("W_eta", "M_k", We(mk_x)))[0]
            target = F.normalize(M(vis["M_k"], d("M_v", "M_k", v)), dim=-1)
            g = inner_grad(vis["M_k"], k, target)
            new = []
            for i, (w, xin) in enumerate(zip(run["M_k"], (k, F.silu(vis["M_k"][0] @ k)),
                                             strict=True)):  # fmt: skip
                step = eta / (1 + eta * xin @ xin)
                mom_k[i] = 0.5 * mom_k[i] - 0.5 * step * g[i]
                new.append(0.95 * w - step * torch.outer(w @ xin, xin) + mom_k[i])
            run["M_k"] = new
            # M_v: the variant, gradient at its visible state
            mk_v = d("M_k", "M_v", mk_x)
            k = F.normalize(mk_v, dim=-1)
            eta = 0.5 * torch.sigmoid(d("W_eta", "M_v", We(mk_v)))[0]
            g = inner_grad(vis["M_v"], k, M(vis["M_v"], v))
            acc = list(g) if acc is None else [a + gi for a, gi in zip(acc, g, strict=True)]
            tick, ws = t + 1, run["M_v"]
            if variant == "chain":  # weight decay, then gd with momentum
                buf_v = [0.5 * s - eta * a for s, a in zip(buf_v, acc, strict=True)]
                ws, acc = [0.95 * w + s for w, s in zip(ws, buf_v, strict=True)], None
            elif variant == "nesterov":
                buf_v = [0.6 * s - 0.3 * a for s, a in zip(buf_v, acc, strict=True)]
                ws = [0.9 * w + 0.6 * s - 0.3 * a for w, s, a in zip(ws, buf_v, acc, strict=True)]
                acc = None
            elif variant in ("kernel", "wd_dgd"):  # per-layer DGD, exact step, retain 0.9
                xs = (k, F.silu(vis["M_v"][0] @ k))
                lr = eta if variant == "kernel" else 0.3
                steps = [lr / (1 + lr * xin @ xin) for xin in xs]
                ws = ws if variant == "kernel" else [0.98 * w for w in ws]
                ws = [0.9 * w - s * torch.outer(w @ xin, xin) - s * a
                      for w, xin, s, a in zip(ws, xs, steps, acc, strict=True)]  # fmt: skip
                acc = None
            elif tick % (2 if variant == "every2" else 2 * cv) == 0:
                ws, acc = [w - 0.3 * a for w, a in zip(ws, acc, strict=True)], None
            run["M_v"] = ws
            if tick % ck == 0:
                vis["M_k"] = run["M_k"]
            if tick % cv == 0:
                vis["M_v"] = run["M_v"]
        ys.append(torch.stack(out))
        finals.append({n: (run[n], vis[n]) for n in run})
    return torch.stack(ys), finals


def meta_grads(y, learner, x, seed=3):
    torch.manual_seed(seed)
    cot = torch.randn_like(y)
    return torch.autograd.grad((y * cot).sum(), [x, *params(learner)], allow_unused=True)


def check_states(state, finals):
    for n in ("M_k", "M_v"):
        for key, slot in (("running", 0), ("visible", 1)):
            for layer in range(2):
                got = state[n][key][layer][:, 0]
                want = torch.stack([f[n][slot][layer] for f in finals])
                assert rel(got, want) <= 1e-10, (n, key, layer)


# ------------------------------------------------------------------------------ plan


def test_plan_and_one_warning_name_the_member():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = compile(graph("nesterov"), dtype=DT)
    msgs = [str(w.message) for w in caught if issubclass(w.category, nl.ReferenceLoopWarning)]
    assert len(msgs) == 1 and "level 'M_v'" in msgs[0] and "recurrent cluster" in msgs[0]
    plan = learner.plan
    assert plan.clusters == [["M_k", "M_v"]]
    assert (plan.levels["M_k"].lowering, plan.levels["M_v"].lowering) == (
        "cluster", "reference_loop")  # fmt: skip
    assert "inside the recurrent cluster" in plan.levels["M_v"].detail
    with warnings.catch_warnings():
        warnings.simplefilter("error", nl.ReferenceLoopWarning)
        compile(graph("kernel"), dtype=DT)  # no fallback member: no warning


# ------------------------------------------------------------------------------ members


CASES = [  # (variant, B, T, chunk of M_k, chunk of M_v)
    ("chain", 2, 7, 2, 3), ("nesterov", 2, 7, 2, 3), ("every2", 2, 7, 2, 3),
    ("every2", 1, 1, 2, 3), ("every2chunks", 2, 9, 2, 2), ("chain", 1, 5, 1, 1),
    ("wd_dgd", 2, 7, 2, 3), ("kernel", 2, 7, 2, 3),
]  # fmt: skip


@pytest.mark.parametrize("variant,B,T,ck,cv", CASES, ids=str)
def test_cluster_equals_the_hand_written_token_loop(variant, B, T, ck, cv):
    learner = learner_of(variant, ck, cv)
    x = torch.randn(B, T, D, dtype=DT, requires_grad=True)
    want, finals = hand(learner, x, variant, ck, cv)
    g_want = meta_grads(want, learner, x)
    assert g_want[0].abs().sum() > 0
    for backend in ("chunk", "reference"):
        learner.backend = backend
        y, state = learner(x)
        assert rel(y["y"], want) <= 1e-10, backend
        check_states(state, finals)
        check_grads(meta_grads(y["y"], learner, x), g_want)
        assert state["M_v"]["phase"] == T


@pytest.mark.parametrize("variant", ["chain", "every2", "every2chunks"])
def test_segments_with_carried_state_equal_one_pass(variant):
    """Cuts inside chunks and between update ticks: the pending gradient sum, momentum
    buffers and token count carry over."""
    learner = learner_of(variant, 2, 3)
    x = torch.randn(2, 11, D, dtype=DT, requires_grad=True)
    y, full = learner(x)
    g_one = meta_grads(y["y"], learner, x)
    state, ys = None, []
    for a, b in ((0, 1), (1, 4), (4, 5), (5, 11)):
        out, state = learner(x[:, a:b], state)
        ys.append(out["y"])
    y_seg = torch.cat(ys, dim=1)
    assert rel(y_seg, y["y"]) <= 1e-12
    for n in ("M_k", "M_v"):
        for a, b in zip(state[n]["running"], full[n]["running"], strict=True):
            assert rel(a, b) <= 1e-12
    check_grads(meta_grads(y_seg, learner, x), g_one)


def test_read_only_pass_reads_the_initial_states():
    learner = learner_of("nesterov")
    x = torch.randn(2, 6, D, dtype=DT)
    y, _ = learner(x, writes=False)
    want, _ = hand(learner, x, "nesterov", writes=False)
    assert rel(y["y"], want) <= 1e-10
    assert rel(learner(x[:, :2])[0]["y"], y["y"][:, :2]) <= 1e-12  # first chunk: same reads
    assert rel(learner(x)[0]["y"][:, 3:], y["y"][:, 3:]) > 1e-6  # the writes matter


def self_graph(variant, in_cluster, chunk):
    """One memory; ``in_cluster``: its value reads itself with weight 0 (a cluster of one)."""
    g = nl.Graph("selfloop", chunk=chunk)
    x = g.input("x", dim=D)
    value = x + 0.0 * nl.read("M", x) if in_cluster else x
    rule, freq = {
        "nesterov": (nl.gd(lr=0.3, momentum=0.6, retain=0.9, nesterov=True), nl.per_token()),
        "every2": (nl.gd(lr=0.3, momentum=0.5), nl.every(2, "token")),
        "ns": (nl.chain(nl.orthogonalize(3), nl.gd(lr=0.2, momentum=0.5)), nl.per_chunk(1)),
        "wd_dot": (nl.chain(nl.weight_decay(0.05), nl.gd(lr=0.3)), nl.per_token()),
    }[variant]
    linear = variant == "wd_dot"  # a matrix memory on the dot objective
    mem = g.level("M", state=nl.linear(D, D) if linear else nl.mlp(D, D, width=3, residual=True),
                  frequency=freq, context=nl.kv(key=x.normalize(), value=value),
                  objective=nl.dot() if linear else nl.l2(),
                  optimizer=rule, init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        torch.manual_seed(0)
        return compile(g, dtype=DT)


@pytest.mark.parametrize("variant,chunk", [("nesterov", 1), ("nesterov", 3), ("every2", 3),
                                           ("ns", 2), ("wd_dot", 2)])  # fmt: skip
def test_member_reading_only_itself_equals_the_stand_alone_reference_loop(variant, chunk):
    loop, cl = self_graph(variant, False, chunk), self_graph(variant, True, chunk)
    assert loop.plan.clusters == [] and cl.plan.clusters == [["M"]]
    assert cl.plan.levels["M"].lowering == loop.plan.levels["M"].lowering == "reference_loop"
    x = torch.randn(2, 8, D, dtype=DT, requires_grad=True)
    ya, yb = run_both_equal(cl, loop, x)
    check_grads(meta_grads(yb["y"], cl, x), meta_grads(ya["y"], loop, x))


# ------------------------------------------------------------------------------ stop_grad


EDGES = [("M_v", "M_k"), ("W_eta", "M_k"), ("M_k", "M_v")]


@pytest.mark.parametrize("variant", ["kernel", "chain"])
@pytest.mark.parametrize("src,dst", EDGES, ids=str)
def test_stop_grad_inside_the_window_equals_a_hand_built_detach(variant, src, dst):
    plain = learner_of(variant)
    cut = learner_of(variant, edges=[(src, dst, nl.stop_grad())])
    assert any(n.op == "detach" for n in cut.program.clusters[0].nodes)
    x = torch.randn(2, 7, D, dtype=DT, requires_grad=True)
    want, _ = hand(cut, x, variant, cut={(src, dst)})
    g_want = meta_grads(want, cut, x)
    g_plain = meta_grads(hand(cut, x, variant)[0], cut, x)
    y0 = plain(x)[0]["y"]
    for backend in ("chunk", "reference"):
        cut.backend = backend
        y = cut(x)[0]["y"]
        assert rel(y, want) <= 1e-10 and rel(y, y0) <= 1e-12
        got = meta_grads(y, cut, x)
        check_grads(got, g_want)
        # the cut changes the meta-gradient (so this test can fail) ...
        assert max(rel(a, b) for a, b in zip(got, g_plain, strict=True) if b is not None) > 1e-6
    names = [n for n, _ in sorted(cut.named_parameters())]
    if src == "W_eta" and variant == "chain":  # ... but W_eta still learns through M_v's rate
        assert got[1 + names.index("top.slow.W_eta.weight")].abs().sum() > 0


def depends_on(nodes, roots, target):
    seen, todo = set(), list(roots)
    while todo:
        i = todo.pop()
        if i == target:
            return True
        if i not in seen:
            seen.add(i)
            todo.extend(nodes[i].args)
    return False


def test_detached_and_plain_uses_of_one_flow_stay_apart():
    """With stop_grad M_k -> M_v, M_v reads M_k(x) detached (its key and rate) while M_k's
    own key and rate read the same flow undetached: separate window nodes."""
    c = learner_of("chain", edges=[("M_k", "M_v", nl.stop_grad())]).program.clusters[0]
    (det,) = [n for n in c.nodes if n.op == "detach"]
    read = c.nodes[det.args[0]]
    assert read.op == "visible" and read.attrs[0] == "M_k"
    assert depends_on(c.nodes, c.member_args["M_v"][:1], det.id)  # M_v's key
    assert not depends_on(c.nodes, c.member_args["M_k"], det.id)  # M_k's key, value, rate
    assert depends_on(c.nodes, c.member_args["M_k"], read.id)


def test_truncated_from_inside_the_window_into_a_fallback_member():
    """truncated(1) M_k -> M_v (chunk 3): M_v's carried state (running, visible, pending sum,
    buffers) is detached every 3 tokens; M_k's state carries the gradient on."""
    plain = learner_of("every2")
    trunc = learner_of("every2", edges=[("M_k", "M_v", nl.truncated(1))])
    x = torch.randn(2, 8, D, dtype=DT, requires_grad=True)
    want, _ = hand(trunc, x, "every2", trunc_v=3)
    g_want = meta_grads(want, trunc, x)
    y = trunc(x)[0]["y"]
    assert rel(y, plain(x)[0]["y"]) <= 1e-12 and rel(y, want) <= 1e-10
    got = meta_grads(y, trunc, x)
    check_grads(got, g_want)
    g_plain = meta_grads(plain(x)[0]["y"], plain, x)
    assert max(rel(a, b) for a, b in zip(got, g_plain, strict=True) if b is not None) > 1e-6


def test_self_modifying_titans_with_a_window_source_cut():
    """The library graph: stop_grad M_v -> M_k compiles, values unchanged, gradients differ."""

    def build(cut):
        g = get("self_modifying_titans", d=4, heads=1, chunk=2, chunk_mem=4, conv_window=0,
                output_gate=False)  # fmt: skip
        if cut:
            g.differentiate("M_v", "M_k", nl.stop_grad())
        torch.manual_seed(0)
        return compile(g, dtype=DT)

    plain, cut = build(False), build(True)
    x = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    ya, yb = plain(x)[0]["y"], cut(x)[0]["y"]
    assert torch.equal(ya, yb)
    ga, gb = meta_grads(ya, plain, x), meta_grads(yb, cut, x)
    assert max(rel(b, a) for a, b in zip(ga, gb, strict=True) if a is not None) > 1e-6


@pytest.mark.parametrize("variant", ["chain", "nesterov", "every2"])
def test_causality_with_a_fallback_member(variant):
    """A perturbation of tokens after t never changes outputs up to t, with a token-loop member
    and the kernel member in the same windows, for both backends."""
    learner = learner_of(variant, 2, 3)
    x = torch.randn(2, 10, D, dtype=DT)
    for backend in ("chunk", "reference"):
        learner.backend = backend
        y0 = learner(x)[0]["y"]
        for t in (0, 3, 7):
            x2 = x.clone()
            x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
            y1 = learner(x2)[0]["y"]
            assert torch.equal(y1[:, : t + 1], y0[:, : t + 1]), (backend, t)
            assert not torch.equal(y1[:, t + 1 :], y0[:, t + 1 :])
