"""The fused lowering recognises Adam by the structure of a graph, not by its names or numbers:
a hand-written Adam (other names, other hyperparameters, operands commuted) runs torch's fused
kernel and equals ``torch.optim.Adam``/``AdamW``; a graph that departs from Adam's structure,
or whose numbers are not Adam's, keeps the foreach program."""

from __future__ import annotations

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler.optimizer import match, scan
from nlgraph.library import get
from nlgraph.optim import compile_optimizer

SHAPES = [(6, 4), (7,), (3, 4, 5), (1,)]


def my_adam(
    lr: float = 3e-3,
    b1: float = 0.8,
    b2: float = 0.95,
    eps: float = 1e-6,
    *,
    b1_debias: float | None = None,
    second: str = "square",
    l2: float | None = None,
    decoupled: float | None = None,
    amsgrad: bool = False,
    fourth: bool = False,
    first_init: object | None = None,
    eps_inside: bool = False,
) -> nl.Graph:
    """Adam written by hand: its own level names, a named gradient stream, ``-lr`` on the
    right of the product and ``eps`` on the left of the sum; the keywords depart from Adam."""
    g = nl.Graph("my_adam")
    stream = nl.grad_of("weights")
    if l2 is not None:
        stream = nl.state("weights", at="prev") * l2 + stream
    stream = g.let("stream", stream)
    held = "peak" if amsgrad else "second"
    v_hat = nl.debias(nl.state(held, at="new"), b2)
    denom = (v_hat + eps).sqrt() if eps_inside else eps + v_hat.sqrt()
    m_hat = nl.debias(nl.state("first", at="new"), b1 if b1_debias is None else b1_debias)
    step = (m_hat * -lr) / denom
    rules = (nl.weight_decay(lr * decoupled),) if decoupled is not None else ()
    g.level("weights", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.chain(*rules, nl.follow(step)))  # fmt: skip
    g.level("first", state=nl.like("weights"), frequency=nl.per_step(),
            objective=nl.l2_to(stream), optimizer=nl.ema(b1),
            **({"init": first_init} if first_init else {}))  # fmt: skip
    g.level("second", state=nl.like("weights"), frequency=nl.per_step(),
            objective=nl.l2_to(stream.apply(second)), optimizer=nl.ema(b2))  # fmt: skip
    if amsgrad:
        g.level("peak", state=nl.like("weights"), frequency=nl.per_step(),
                optimizer=nl.follow((nl.state("second", at="new") - nl.state("peak", at="prev"))
                                    .apply("relu")))  # fmt: skip
    if fourth:
        g.level("extra", state=nl.like("weights"), frequency=nl.per_step(),
                objective=nl.l2_to(stream), optimizer=nl.ema(0.5))  # fmt: skip
    return g


def fused_of(graph: nl.Graph):
    return match(graph.spec, lambda name: name)


def run(opt_or_cls, kwargs=None, steps=30, seed=0):
    """``steps`` updates of a small quadratic problem; the final parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    opt = opt_or_cls(params, **(kwargs or {}))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for i, (p, t) in enumerate(zip(params, targets, strict=True)):
                p.grad = (2.0 * (1 + i)) * (p - t) + 0.04 * p**3
        opt.step()
    return opt, params


def count_fused(monkeypatch) -> dict[str, int]:
    calls = {"adam": 0, "adamw": 0}
    for kernel in calls:
        real = getattr(torch, f"_fused_{kernel}_")

        def counted(*args, _real=real, _kernel=kernel, **kwargs):
            calls[_kernel] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, f"_fused_{kernel}_", counted)
    return calls


# (id, graph, torch's optimizer and its arguments, the fused kernel)
SAME_STRUCTURE = [
    ("adam", my_adam(), (torch.optim.Adam, {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6}),
     "adam"),
    ("adam-amsgrad", my_adam(lr=5e-3, b1=0.7, amsgrad=True),
     (torch.optim.Adam, {"lr": 5e-3, "betas": (0.7, 0.95), "eps": 1e-6, "amsgrad": True}), "adam"),
    ("adam-l2", my_adam(l2=0.2),
     (torch.optim.Adam, {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.2}),
     "adam"),
    ("adamw", my_adam(b2=0.9, decoupled=0.3),
     (torch.optim.AdamW, {"lr": 3e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.3}),
     "adamw"),
]  # fmt: skip


@pytest.mark.parametrize("case", SAME_STRUCTURE, ids=[c[0] for c in SAME_STRUCTURE])
def test_adam_structure_with_other_names_and_numbers_is_recognised(case, monkeypatch):
    _, graph, (theirs, kw), kernel = case
    fused = fused_of(graph)
    assert fused is not None and fused.kernel == kernel
    assert fused.keys[:2] == ("first", "second")
    _, numbers, _ = scan(graph.spec)
    hyper = fused._hyper(numbers)
    assert hyper["lr"] == pytest.approx(kw["lr"])
    assert (hyper["beta1"], hyper["beta2"]) == kw["betas"]
    assert hyper["weight_decay"] == pytest.approx(kw.get("weight_decay", 0.0))
    calls = count_fused(monkeypatch)
    cls = compile_optimizer(lambda: graph, "MyAdam", defaults={})
    opt, ours = run(cls)
    assert calls[kernel] == 30  # auto on CPU: every step ran torch's fused kernel
    _, ref = run(theirs, kw)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_library_adam_and_adamw_are_recognised_with_any_numbers():
    for name, kw in (("adam", {"lr": 0.1, "b1": 0.5, "amsgrad": True}),
                     ("adam", {"weight_decay": 0.3, "eps": 1e-3}),
                     ("adamw", {"lr": 2e-4, "wd": 0.5, "b2": 0.9})):  # fmt: skip
        fused = fused_of(get(name, **kw))
        assert fused is not None, (name, kw)
        assert fused.kernel == ("adamw" if name == "adamw" else "adam")
        assert fused.amsgrad == kw.get("amsgrad", False)


DEPARTURES = {
    "v-ema-of-abs-g": dict(second="abs"),
    "a-fourth-memory": dict(fourth=True),
    "m-from-noise": dict(first_init=nl.normal(0.1)),
    "eps-inside-the-sqrt": dict(eps_inside=True),
    "l2-and-decoupled-decay": dict(l2=0.1, decoupled=0.1),
}


@pytest.mark.parametrize("kw", DEPARTURES.values(), ids=DEPARTURES.keys())
def test_other_structures_are_not_recognised_and_run_the_foreach_program(kw, monkeypatch):
    graph = my_adam(**kw)
    assert fused_of(graph) is None
    calls = count_fused(monkeypatch)
    cls = compile_optimizer(lambda: graph, "NotAdam", defaults={})
    opt, params = run(cls, steps=5)
    assert opt.program(opt.param_groups[0])[0].fused is None
    assert calls == {"adam": 0, "adamw": 0}
    assert all(torch.isfinite(p).all() for p in params)


def test_numbers_that_are_not_adams_keep_the_foreach_program(monkeypatch):
    """Adam's structure with the debias of m reading another beta than m's EMA: the fused
    kernel has one beta1, so this spec's numbers run the foreach program (same result)."""
    graph = my_adam(b1_debias=0.6)
    fused = fused_of(graph)
    assert fused is not None and not fused.applies(scan(graph.spec)[1])
    assert fused.applies(scan(my_adam().spec)[1])
    calls = count_fused(monkeypatch)
    cls = compile_optimizer(lambda: graph, "Skewed", defaults={})
    _, auto = run(cls)
    assert calls == {"adam": 0, "adamw": 0}
    _, ref = run(lambda ps: _with_backend(cls(ps), "reference"))
    for a, b in zip(auto, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _with_backend(opt, backend: str):
    opt.backend = backend
    return opt
