"""Signal scalars in optimizer graphs: a rate, retention, momentum, beta or decay that is
``scale * act(flow)`` of the step's flows, one value per parameter entry — so a slower level can
drive a faster level's rates. The compiled program equals the naive reference in float64; what
an optimizer step cannot compute (a ``learned`` scalar, a per-entry rate for a per-tensor rule)
is refused by ``validate`` itself, with the level and the field."""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph as nl
import nlgraph.library as L
from nlgraph.compiler.optimizer import OptimizerProgram, match, scan
from nlgraph.optim import compile_optimizer

F64 = torch.float64
SHAPES = [(5, 3), (7,), (2, 3, 4), (1,)]


def three_levels(retain=None, lr=0.05, every=3, slow_lr=0.3) -> nl.Graph:
    """``w <- w + m``; ``m <- retain m - lr g`` with ``retain = sigmoid(a + 2)``; ``a`` a dot
    memory of ``-g m`` updated every ``every`` steps (meta-learned momentum decay)."""
    g = nl.Graph("three_levels")
    grad = nl.grad_of("w")
    retain = nl.signal(nl.state("a", at="prev") + 2.0) if retain is None else retain
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(nl.state("m", at="new")))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), context=-grad, objective=nl.dot(),
            optimizer=nl.gd(lr=lr, retain=retain))  # fmt: skip
    g.level("a", state=nl.like("w"), frequency=nl.every(every, "step"),
            context=-grad * nl.state("m", at="prev"), objective=nl.dot(),
            optimizer=nl.gd(lr=slow_lr))  # fmt: skip
    return g


def two_levels(m_rules, w_rules=None, m_objective=None) -> nl.Graph:
    g = nl.Graph("two_levels")
    grad = nl.grad_of("w")
    w_rules = w_rules or (nl.follow(nl.state("m", at="new")),)
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.chain(*w_rules))  # fmt: skip
    fields = {"state": nl.like("w"), "frequency": nl.per_step(), "context": -grad,
              "objective": nl.dot(), **(m_objective or {})}  # fmt: skip
    g.level("m", optimizer=nl.chain(*m_rules), **fields)
    return g


G = nl.grad_of("w")
M_PREV, M_NEW = nl.state("m", at="prev"), nl.state("m", at="new")
CASES = {
    "three-levels": lambda: three_levels(),
    "three-levels-offset": lambda: three_levels(every=4),
    "lr-softplus-of-grad": lambda: two_levels(
        [nl.gd(lr=nl.signal(G.abs() - 1.0, "softplus", 0.05), retain=0.8)]
    ),
    "momentum-nesterov": lambda: two_levels(
        [
            nl.gd(
                lr=0.02,
                momentum=nl.signal(M_PREV.square()),
                retain=nl.signal(-G, scale=0.9),
                nesterov=True,
            )
        ]  # fmt: skip
    ),
    "ema-beta-of-own-state": lambda: two_levels(
        [nl.weight_decay(nl.signal(G, scale=0.1)), nl.ema(nl.signal(M_NEW + 1.0, scale=0.95))],
        w_rules=[nl.follow(-0.05 * M_NEW)],
        m_objective={"context": None, "objective": nl.l2_to(G)},
    ),
    "decay-then-ema-constants": lambda: two_levels(  # S - t is taken before the decay
        [nl.weight_decay(0.1), nl.ema(0.9)],
        w_rules=[nl.follow(-0.05 * M_NEW)],
        m_objective={"context": None, "objective": nl.l2_to(G)},
    ),
    "weights-own-gd": lambda: two_levels(
        [nl.ema(0.9)],
        w_rules=[
            nl.weight_decay(nl.signal(M_NEW, scale=0.01)),
            nl.gd(lr=nl.signal(-M_NEW, "exp", 0.01), retain=nl.signal(3.0 - G.abs())),
        ],
        m_objective={"context": None, "objective": nl.l2_to(G.square())},
    ),  # fmt: skip
    "signal-of-a-constant": lambda: two_levels(
        [nl.gd(lr=nl.signal(nl.const(-3.0), "exp"), retain=nl.signal(nl.const(1.5)))]
    ),
    "library-meta-momentum": lambda: L.get("meta_momentum", lr=0.02, meta_lr=0.2, every=2),
}


def run(graph: nl.Graph, backend: str, steps: int = 12):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    opt = compile_optimizer(graph)(params)
    opt.backend = backend
    for i in range(steps):
        for j, (p, t) in enumerate(zip(params, targets, strict=True)):
            p.grad = None if (i % 5 == 3 and j == 1) else (2 + j) * (p - t) + torch.sin(3 * p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_equals_reference_in_float64(name):
    graph = CASES[name]()
    graph.validate()
    (p1, o1), (p2, o2) = run(graph, "auto"), run(graph, "reference")
    for a, b in zip(p1, p2, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()
        assert set(o1.state[a]) == set(o2.state[b])
        for key in o1.state[a]:
            assert torch.allclose(o1.state[a][key], o2.state[b][key], rtol=1e-10, atol=1e-12), key
    assert not torch.equal(p1[0], run(graph, "auto", steps=0)[0][0])  # it moved


def test_three_levels_by_hand():
    """The plain recurrences, written out: ``m <- sigmoid(a + 2) m - lr g``, ``w <- w + m``,
    ``a`` summing ``-g m_prev`` over 3 steps and stepping by ``0.3`` times the sum."""
    gen = torch.Generator().manual_seed(1)
    w0, t = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    p = w0.clone().requires_grad_()
    opt = compile_optimizer(three_levels())([p])
    w, m, a, acc = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), torch.zeros_like(w0)
    for step in range(1, 11):
        g = 3 * (w - t) + w**3
        p.grad = 3 * (p.detach() - t) + p.detach() ** 3
        opt.step()
        acc += -g * m  # a's direction at the state it holds, before m moves
        m = torch.sigmoid(a + 2.0) * m - 0.05 * g
        w = w + m
        if step % 3 == 0:
            a, acc = a + 0.3 * acc, torch.zeros_like(acc)
    assert torch.allclose(p.detach(), w, rtol=1e-12, atol=1e-12)
    assert torch.allclose(opt.state[p]["a"], a, rtol=1e-12, atol=1e-12)
    assert a.abs().max() > 1e-3  # the slow level has learned something


def test_a_signal_of_a_constant_is_the_constant():
    a = two_levels([nl.gd(lr=nl.signal(nl.const(-3.0), "exp"), retain=nl.signal(nl.const(1.5)))])
    b = two_levels([nl.gd(lr=math.exp(-3.0), retain=1 / (1 + math.exp(-1.5)))])
    (pa, _), (pb, _) = run(a, "auto"), run(b, "auto")
    for x, y in zip(pa, pb, strict=True):
        assert torch.allclose(x, y, rtol=1e-13, atol=1e-14)


def test_the_learned_retention_follows_the_gradients():
    """On a steady slope the gradient keeps agreeing with the momentum: the retention rises. On
    a stiff quadratic with a large step the momentum overshoots and the gradient flips: it falls."""

    def retention_after(grad_of):
        p = torch.ones(16, dtype=F64, requires_grad=True)
        opt = compile_optimizer(L.builder("meta_momentum"))([p], lr=0.1, meta_lr=0.05, every=2)
        for _ in range(40):
            p.grad = grad_of(p.detach())
            opt.step()
        return torch.sigmoid(opt.state[p]["a"] + math.log(0.9 / 0.1)).mean().item()

    assert retention_after(lambda w: torch.ones_like(w)) > 0.95
    assert retention_after(lambda w: 25.0 * w) < 0.8


def test_the_scale_of_a_signal_is_a_runtime_number():
    make = lambda s: two_levels([nl.gd(lr=0.1, retain=nl.signal(-G, scale=s))])  # noqa: E731
    (k1, n1, _), (k2, n2, _) = scan(make(0.5).spec), scan(make(0.9).spec)
    assert k1 == k2 and 0.5 in n1 and 0.9 in n2


def adam_like(b2) -> nl.Graph:
    g = nl.Graph("adam_like")
    m, v = nl.debias(nl.state("m", at="new"), 0.9), nl.debias(nl.state("v", at="new"), 0.999)
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(-0.01 * m / (v.sqrt() + 1e-8)))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), objective=nl.l2_to(G),
            optimizer=nl.ema(0.9))  # fmt: skip
    g.level("v", state=nl.like("w"), frequency=nl.per_step(), objective=nl.l2_to(G.square()),
            optimizer=nl.ema(b2))  # fmt: skip
    return g


def test_adam_with_a_signal_beta_is_not_the_fused_kernel():
    fixed, gated = adam_like(0.999), adam_like(nl.signal(-G.abs(), scale=0.999))
    assert OptimizerProgram(fixed.spec).parts and match(fixed.spec, lambda n: n) is not None
    assert match(gated.spec, lambda n: n) is None
    (p1, _), (p2, _) = run(gated, "auto"), run(gated, "reference")
    for a, b in zip(p1, p2, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------- refused by validate, with level and field

SLOW = nl.every(3, "step")


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: three_levels(retain=nl.learned(0.9, lo=0.0, hi=1.0)),
         r"level 'm', optimizer\[0\] gd retain: learned\(0.9\) in an optimizer graph"),
        (lambda: two_levels([nl.gd(lr=0.1)], w_rules=[nl.weight_decay(nl.learned(0.01)),
                                                      nl.follow(M_NEW)]),
         r"level 'w', optimizer\[0\] weight_decay rate: learned"),
        (lambda: two_levels([nl.gd(lr=nl.signal(G, "softplus"))],
                            m_objective={"state": nl.mlp(1, 1, width=4), "objective": nl.l2(),
                                         "context": nl.kv(key=G, value=G)}),
         r"level 'm', optimizer\[0\] gd lr: a signal is one value per parameter entry, but an "
         "MLP memory"),
        (lambda: two_levels([nl.ema(0.9)], m_objective={"context": None, "objective": nl.l2_to(G)},
                            w_rules=[nl.dgd(lr=nl.signal(G, "softplus"))]),
         r"level 'w', optimizer\[0\] dgd lr: .* but a dgd step takes one number"),
        (lambda: two_levels([nl.gd(lr=nl.signal(G, "softplus"))],
                            m_objective={"frequency": SLOW, "context": -G,
                                         "objective": nl.dot()},
                            w_rules=[nl.follow(M_PREV)]),
         r"level 'm', optimizer\[0\] gd lr: 'm' updates every 3 step"),
        (lambda: two_levels([nl.ema(nl.signal(G, scale=0.9))],
                            m_objective={"frequency": SLOW, "context": None,
                                         "objective": nl.l2_to(G)},
                            w_rules=[nl.follow(M_PREV)]),
         r"level 'm', optimizer\[0\] ema beta: 'm' updates every 3 step"),
    ],
    ids=["learned-retain", "learned-decay-of-weights", "signal-on-mlp", "signal-on-dgd",
         "signal-lr-on-slow-level", "signal-beta-on-slow-level"],
)  # fmt: skip
def test_what_a_step_cannot_compute_is_invalid(make, match):
    graph = make()
    with pytest.raises(nl.SpecError, match=match) as err:
        graph.validate()
    assert "\n" not in str(err.value)
    with pytest.raises(nl.SpecError, match=match):  # compile says the same, nothing else
        compile_optimizer(graph)([torch.zeros(3, requires_grad=True)])


def test_a_slow_level_may_signal_retain_and_momentum():
    graph = two_levels(
        [nl.gd(lr=0.1, momentum=nl.signal(G), retain=nl.signal(-G))],
        m_objective={"frequency": SLOW, "context": -G, "objective": nl.dot()},
        w_rules=[nl.follow(M_PREV)],
    )
    graph.validate()
    (p1, _), (p2, _) = run(graph, "auto"), run(graph, "reference")
    for a, b in zip(p1, p2, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_learned_scalars_stay_valid_in_a_learner_graph():
    g = nl.Graph("learner")
    x = g.input("x", dim=4)
    h = g.level("M", state=nl.linear(4, 4), frequency=nl.per_token(),
                context=nl.kv(key=x, value=x), objective=nl.l2(),
                optimizer=nl.gd(lr=nl.learned(0.1, lo=0.0), retain=nl.learned(0.9)))  # fmt: skip
    g.output("y", h(x))
    g.validate()
