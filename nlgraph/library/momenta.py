"""The paper's more expressive optimizer memories (PAPER.md 2.4–2.8, 3.1): preconditioned, delta
and deep momentum, Muon and M3 (orthogonalised momenta, on matrices; with AdamW for the rest),
and DGD for linear layers. Registered with the torch-style family of :mod:`.optimizers`.
"""

from __future__ import annotations

import nlgraph as nl
from nlgraph.library import register
from nlgraph.library.optimizers import _accumulator, _adam, _momentum, _weights


@register("preconditioned_momentum", "optimizer")
def preconditioned_momentum(
    lr: float = 1e-3, beta: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> nl.Graph:
    """Preconditioned momentum: the momentum maps gradients to values P u (Eqs. 46–47).

    GD on ``<m, P u>`` gives ``m <- beta m - lr P u``, ``W <- W + m``. Our choice of P [I]: the
    diagonal curvature estimate ``P = 1 / (sqrt(debias(v)) + eps)`` with
    ``v <- b2 v + (1 - b2) u^2``; so ``v`` precedes ``m``, which precedes ``W``.
    """
    g = nl.Graph("preconditioned_momentum", doc=preconditioned_momentum.__doc__ or "")
    w = _weights(g, nl.state("m", at="new"))
    u = w.grad()
    g.level(
        "v",
        state=nl.like("w"),
        frequency=nl.per_step(),
        objective=nl.l2_to(u.square()),
        optimizer=nl.ema(b2),
        group="moments",
        doc="second moment: the diagonal preconditioner",
    )
    g.level(
        "m",
        state=nl.like("w"),
        frequency=nl.per_step(),
        context=-u / (nl.debias(nl.state("v", at="new"), b2).sqrt() + eps),
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr, retain=beta),
        group="momentum",
        doc="m <- beta m - lr P u",
    )
    return g


@register("delta_momentum", "optimizer")
def delta_momentum(
    lr: float = 1e-2, beta: float = 0.9, decay: float = 0.1, normalize: bool = False
) -> nl.Graph:
    """Delta momentum: the momentum as a delta-rule memory keyed by gradients (Eqs. 48–49).

    ``m <- (beta I - decay u u^T) m - lr u``, ``W <- W + m``: one GD step of size ``decay``,
    with retention ``beta``, on ``1/2 (<m, u> - c)^2`` with ``c = -lr / decay`` — the momentum
    learns to have the projection ``c`` on each new gradient, forgetting along ``u`` first.

    Form (PAPER.md 2.7): the flattened orientation, ``u`` all entries of the gradient as one key,
    read out as ``<m, u>``. It conforms for every parameter shape (matrices, biases, norms),
    where the printed ``m (alpha I - u u^T)`` / ``(alpha I - u^T u) m`` conform only for square
    ``W``; it is the [NIPS] left-multiplied form with ``P = I`` (see ``preconditioned_momentum``
    for ``P``). ``decay`` is the step size the paper omits (``1``): the decay is a contraction
    for ``decay ||u||^2 <= 1 + beta``. ``normalize`` keys by ``u / ||u||`` instead (always
    contractive for ``decay <= 1 + beta``; the write becomes ``-lr u / ||u||``).
    """
    if decay <= 0:
        raise nl.SpecError(
            f"delta_momentum: decay={decay!r} must be > 0 (it is the memory's step size; "
            "decay -> 0 has no write term). Use `momentum` for plain EMA momentum"
        )
    g = nl.Graph("delta_momentum", doc=delta_momentum.__doc__ or "")
    w = _weights(g, nl.state("m", at="new"))
    u = w.grad().normalize() if normalize else w.grad()
    g.level(
        "m",
        state=nl.like("w"),
        frequency=nl.per_step(),
        context=nl.kv(key=u, value=nl.const(-lr / decay)),
        objective=nl.l2(),
        optimizer=nl.gd(lr=decay, retain=beta),
        group="momentum",
        doc="m <- (beta I - decay u u^T) m - lr u",
    )
    return g


@register("meta_momentum", "optimizer")
def meta_momentum(
    lr: float = 1e-2, beta: float = 0.9, meta_lr: float = 0.01, every: int = 10
) -> nl.Graph:
    """Momentum whose retention a slower level learns: three levels (PAPER.md 1.2, 2.2).

    ``m <- sigmoid(a + logit(beta)) m - lr g`` (Eq. 33 with a data-dependent ``alpha``, one per
    parameter entry), ``W <- W + m``; every ``every`` steps the slower level takes
    ``a <- a + meta_lr sum_period sign(-g_t m_t)`` (a dot memory of that stream, summed over its
    period at the state it holds, Eq. 71), read at ``prev`` by ``m``. ``-g_t m_t`` is minus the
    one-step hypergradient of the loss w.r.t. a scale ``c`` on the last step
    (``W_t = W_(t-1) + c m_t``, at ``c = 1``): the retention rises where the new gradient still
    points along the momentum and falls where it flips (oscillation). Our choice [I]: the sign
    makes the meta step scale-free, and ``m_t`` stands in for ``m_(t-1)`` (the exact one-step
    hypergradient of the retention, which no level holds).
    """
    g = nl.Graph("meta_momentum", doc=meta_momentum.__doc__ or "")
    w = _weights(g, nl.state("m", at="new"))
    logit = (nl.const(beta) / (1 - beta)).apply("log")
    g.level(
        "m",
        state=nl.like("w"),
        frequency=nl.per_step(),
        context=-w.grad(),
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr, retain=nl.signal(nl.state("a", at="prev") + logit)),
        group="momentum",
        doc="m <- sigmoid(a + logit(beta)) m - lr g",
    )
    g.level(
        "a",
        state=nl.like("w"),
        frequency=nl.every(every, "step"),
        context=(-w.grad() * nl.state("m", at="prev")).sign(),
        objective=nl.dot(),
        optimizer=nl.gd(lr=meta_lr),
        doc="the retention's logit: a <- a + meta_lr sum sign(-g m)",
    )
    return g


@register("dmgd", "optimizer")
def dmgd(lr: float = 1e-2, inner_lr: float = 1e-2, decay: float = 1.0, width: int = 16) -> nl.Graph:
    """Deep momentum GD: the momentum is an MLP memory of gradients (Eq. 50, PAPER.md 2.7).

    ``m <- decay m - inner_lr ∇ 1/2 mean ||m(u) - u||^2`` (one GD step per outer step on the
    MLP's parameters, retention ``decay``), then ``W <- W - lr m(u)`` with the updated memory.
    The minimal choice of PAPER.md 2.7 [I]: a 2-layer residual MLP per parameter tensor, L2
    objective onto the gradient itself; ours: applied to each gradient entry (``d_in = d_out =
    1``), so it fits every shape, with the objective averaged over the tensor's entries.
    """
    g = nl.Graph("dmgd", doc=dmgd.__doc__ or "")
    u = nl.grad_of("w")
    _weights(g, -lr * nl.read("m", u, at="new"))
    g.level(
        "m",
        state=nl.mlp(1, 1, width=width, residual=True),
        frequency=nl.per_step(),
        context=nl.kv(key=u, value=u),
        objective=nl.l2(),
        optimizer=nl.gd(lr=inner_lr, retain=decay),
        init=nl.normal(),
        group="momentum",
        doc="deep momentum: an element-wise residual MLP fitted to the gradients",
    )
    return g


def _adamw_for_the_rest(
    g: nl.Graph, lr: float, b1: float, b2: float, eps: float, wd: float
) -> None:
    """AdamW levels ``adamw.*`` for the parameters with fewer than 2 dimensions (biases,
    norms): Muon's convention for what it does not orthogonalise (PAPER.md 2.8)."""
    _adam(g, lr, b1, b2, eps, decoupled=wd, prefix="adamw.", select=nl.params(max_ndim=1))


@register("muon", "optimizer")
def muon(
    lr: float = 2e-2,
    beta: float = 0.95,
    steps: int = 5,
    variant: str = "quintic",
    nesterov: bool = False,
    wd: float = 0.0,
) -> nl.Graph:
    """Muon: momentum with a Newton–Schulz output, W <- W + lr NS_k(m) (Eqs. 42–44, 52).

    ``m <- beta m - g`` (the momentum memory; its scale is irrelevant, NS normalises);
    ``W <- (1 - lr wd) W + lr NS_steps(m)`` (``nesterov``: ``NS_steps(beta m - g)``).
    ``variant="cubic"`` is one inner GD step per iteration on ``1/2||O-g||^2 +
    1/2||O^T O - I||^2`` (Eq. 44); ``"quintic"`` is production Muon's polynomial. Matrix
    parameters only (``params(min_ndim=2)``, Muon's convention; ``muon_adamw`` adds AdamW for
    the rest).
    """
    g = nl.Graph("muon", doc=muon.__doc__ or "", variant=variant, nesterov=nesterov)
    _muon(g, lr, beta, steps, variant, nesterov, wd)
    return g


def _muon(
    g: nl.Graph, lr: float, beta: float, steps: int, variant: str, nesterov: bool, wd: float
) -> None:
    m = beta * nl.state("m", at="new") - nl.grad_of("w") if nesterov else nl.state("m", at="new")
    w = _weights(
        g,
        lr * nl.newton_schulz(m, steps=steps, variant=variant),
        decay=lr * wd if wd else None,
        select=nl.params(min_ndim=2),
    )
    _momentum(g, w, 1.0, beta)


@register("muon_adamw", "optimizer")
def muon_adamw(
    lr: float = 2e-2,
    beta: float = 0.95,
    steps: int = 5,
    variant: str = "quintic",
    nesterov: bool = False,
    wd: float = 0.0,
    adamw_lr: float = 1e-3,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.999,
    adamw_eps: float = 1e-8,
    adamw_wd: float = 1e-2,
) -> nl.Graph:
    """Muon on matrices, AdamW on the other parameters (Eqs. 42–44, 52; App. B).

    The levels of ``muon`` for ``params(min_ndim=2)`` and of ``adamw`` (named ``adamw.*``) for
    ``params(max_ndim=1)``: each parameter is trained by the part that selects it.
    """
    g = nl.Graph("muon_adamw", doc=muon_adamw.__doc__ or "", variant=variant, nesterov=nesterov)
    _muon(g, lr, beta, steps, variant, nesterov, wd)
    _adamw_for_the_rest(g, adamw_lr, adamw_b1, adamw_b2, adamw_eps, adamw_wd)
    return g


@register("m3", "optimizer")
def m3(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9,
    alpha: float = 1.0,
    eps: float = 1e-8,
    f: int = 8,
    steps: int = 5,
    variant: str = "quintic",
    momenta: str = "sum",
) -> nl.Graph:
    """M3, multi-scale momentum Muon: fast and slow orthogonalised momenta (Algorithm 1, Eq. 75).

    Per step: ``M1 <- M1 + b1 g``, ``V <- V + b2 g^2``. Every ``f`` steps:
    ``M2 <- M2 + b3 sum_{previous f steps} g`` (the clock sums a slow level's gradients over its
    period, as CMS does, Eq. 71). ``W <- W - lr (NS(M1) + alpha NS(M2)) / (sqrt(V) + eps)``,
    reading M2 as it was before this step (``at="prev"``), so a chunk uses the previous chunk's
    M2. ``momenta="ema"`` makes all three EMAs, ``S <- b S + (1 - b) x``, and debiases V [I].
    Matrix parameters only (``params(min_ndim=2)``; ``m3_adamw`` adds AdamW for the rest).
    """
    g = nl.Graph("m3", doc=m3.__doc__ or "", momenta=momenta, variant=variant, f=f)
    _m3(g, lr, b1, b2, b3, alpha, eps, f, steps, variant, momenta)
    return g


def _m3(
    g: nl.Graph,
    lr: float,
    b1: float,
    b2: float,
    b3: float,
    alpha: float,
    eps: float,
    f: int,
    steps: int,
    variant: str,
    momenta: str,
) -> None:
    if momenta not in ("sum", "ema"):
        raise nl.SpecError(f"m3: momenta={momenta!r}; expected 'sum' (Algorithm 1) or 'ema'")
    ema = momenta == "ema"
    ns1 = nl.newton_schulz(nl.state("M1", at="new"), steps=steps, variant=variant)
    ns2 = nl.newton_schulz(nl.state("M2", at="prev"), steps=steps, variant=variant)
    v = nl.debias(nl.state("V", at="new"), b2) if ema else nl.state("V", at="new")
    w = _weights(g, -lr * (ns1 + alpha * ns2) / (v.sqrt() + eps), select=nl.params(min_ndim=2))
    grad = w.grad()
    for name, stream, b, every, bn in (
        ("M1", grad, b1, 1, "b1"),
        ("V", grad.square(), b2, 1, "b2"),
        ("M2", grad, b3, f, "b3"),
    ):
        _accumulator(
            g,
            name,
            stream,
            1 - b if ema else b,
            retain=b if ema else None,
            frequency=nl.per_step(every),
            # names, not values: a traced graph's doc holds for any value (nlgraph.hyper)
            doc=f"{name} <- " + (f"{bn} {name} + (1 - {bn}) x" if ema else f"{name} + {bn} x"),
        )


@register("m3_adamw", "optimizer")
def m3_adamw(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9,
    alpha: float = 1.0,
    eps: float = 1e-8,
    f: int = 8,
    steps: int = 5,
    variant: str = "quintic",
    momenta: str = "sum",
    adamw_lr: float = 1e-3,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.999,
    adamw_eps: float = 1e-8,
    adamw_wd: float = 1e-2,
) -> nl.Graph:
    """M3 on matrices, AdamW on the other parameters (Algorithm 1, PAPER.md 2.8).

    The levels of ``m3`` for ``params(min_ndim=2)`` and of ``adamw`` (named ``adamw.*``) for
    ``params(max_ndim=1)`` (biases, norms: the treatment the paper leaves open [U], Muon's
    convention [I]).
    """
    g = nl.Graph("m3_adamw", doc=m3_adamw.__doc__ or "", momenta=momenta, variant=variant, f=f)
    _m3(g, lr, b1, b2, b3, alpha, eps, f, steps, variant, momenta)
    _adamw_for_the_rest(g, adamw_lr, adamw_b1, adamw_b2, adamw_eps, adamw_wd)
    return g


@register("dgd_update", "optimizer")
def dgd_update(lr: float = 1e-2) -> nl.Graph:
    """DGD for linear layers: the exact L2 proximal step on self-made values (Eqs. 56–57).

    For a linear layer with input ``x`` and output error ``∇_y L``:
    ``W <- W (I - lr' x x^T) - lr' ∇_W L`` with ``lr' = lr / (1 + lr ||x||^2)``, the exact
    minimiser of ``1/2 ||W x - u||^2 + 1/(2 lr) ||W - W_t||^2`` for ``u = -∇_y L`` (PAPER.md 3.1).
    The key ``x`` is each layer's own input; deep networks apply it per layer. For ``N`` inputs
    ``X`` over which the loss averages: ``W <- (W - lr ∇_W L)(I + lr/N X^T X)^{-1}``.
    """
    g = nl.Graph("dgd_update", doc=dgd_update.__doc__ or "")
    g.level(
        "w",
        state=nl.params(),
        frequency=nl.per_step(),
        context=-nl.grad_of("w"),
        objective=nl.dot(),
        optimizer=nl.dgd(lr=lr, exact=True),
        doc="W <- W (I - lr' x x^T) - lr' grad",
    )
    return g
