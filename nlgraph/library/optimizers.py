"""Optimizers as associative memories over the gradient stream (PAPER.md section 2).

Every definition has a weights level ``w`` (the parameters, updated every outer step) whose
update follows the state of faster memory levels (momentum, moments) that compress its gradients.
"""

from __future__ import annotations

import nlgraph as nl
from nlgraph.library import register


def _weights(g: nl.Graph, update: object) -> nl.LevelHandle:
    return g.level(
        "w",
        state=nl.params(),
        frequency=nl.per_step(),
        objective=nl.outer(),
        optimizer=nl.follow(update),
        doc="the parameters, trained on the outer loss",
    )


@register("sgd", "optimizer")
def sgd(lr: float = 1e-2) -> nl.Graph:
    """SGD: a 1-level memory, one proximal step on <W x, ∇_y L> per step (Eqs. 8–9).

    With nlgraph's convention ``dot = -<M(k), v>`` the value is the negative gradient:
    ``W <- W + lr * (-g)``.
    """
    g = nl.Graph("sgd", doc=sgd.__doc__ or "")
    g.level(
        "w",
        state=nl.params(),
        frequency=nl.per_step(),
        context=-nl.grad_of("w"),
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr),
        doc="W <- W - lr * grad",
    )
    return g


@register("momentum", "optimizer")
def momentum(lr: float = 1e-2, beta: float = 0.9) -> nl.Graph:
    """SGD with momentum: the momentum is a linear memory of gradients (Eqs. 10–13, 33–34).

    ``m <- beta m - lr g`` is one GD step on ``<m, g> + (1 - beta)/(2 lr) ||m||^2``;
    ``W <- W + m``. Equals ``torch.optim.SGD(lr, momentum=beta)`` with ``m = -lr b``.
    """
    g = nl.Graph("momentum", doc=momentum.__doc__ or "")
    w = _weights(g, nl.state("m"))
    g.level(
        "m",
        state=nl.like("w"),
        frequency=nl.per_step(),
        context=-w.grad(),
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr, retain=beta),
        group="momentum",
        doc="m <- beta m - lr g",
    )
    return g


def _moments(g: nl.Graph, w: nl.LevelHandle, b1: float, b2: float) -> None:
    grad = w.grad()
    g.level(
        "m",
        state=nl.like("w"),
        frequency=nl.per_step(),
        objective=nl.l2_to(grad),
        optimizer=nl.ema(b1),
        group="moments",
        doc="first moment: EMA of gradients",
    )
    g.level(
        "v",
        state=nl.like("w"),
        frequency=nl.per_step(),
        objective=nl.l2_to(grad.square()),
        optimizer=nl.ema(b2),
        group="moments",
        doc="second moment: EMA of squared gradients",
    )


@register("adam", "optimizer")
def adam(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> nl.Graph:
    """Adam: two memories of the gradient stream in one level (App. B, Eqs. 100–105).

    ``m`` and ``v`` are EMAs, i.e. one GD step of size ``1 - beta`` on ``1/2 ||S - target||^2``;
    they share a frequency and are independent, so they sit in the same tier (Def. 2).
    ``W <- W - lr * debias(m) / (sqrt(debias(v)) + eps)``.
    """
    g = nl.Graph("adam", doc=adam.__doc__ or "")
    step = -lr * nl.debias(nl.state("m"), b1) / (nl.debias(nl.state("v"), b2).sqrt() + eps)
    w = _weights(g, step)
    _moments(g, w, b1, b2)
    return g


@register("adamw", "optimizer")
def adamw(
    lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, wd: float = 1e-2
) -> nl.Graph:
    """AdamW: Adam's memories plus decoupled weight decay (App. B, Eqs. 100–105).

    ``W <- (1 - lr wd) W - lr * debias(m) / (sqrt(debias(v)) + eps)``.
    """
    g = nl.Graph("adamw", doc=adamw.__doc__ or "")
    step = -lr * nl.debias(nl.state("m"), b1) / (nl.debias(nl.state("v"), b2).sqrt() + eps)
    w = g.level(
        "w",
        state=nl.params(),
        frequency=nl.per_step(),
        objective=nl.outer(),
        optimizer=nl.chain(nl.weight_decay(lr * wd), nl.follow(step)),
        doc="the parameters, trained on the outer loss",
    )
    _moments(g, w, b1, b2)
    return g


def _momentum(g: nl.Graph, w: nl.LevelHandle, lr: float, beta: float) -> None:
    g.level(
        "m",
        state=nl.like("w"),
        frequency=nl.per_step(),
        context=-w.grad(),
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr, retain=beta),
        group="momentum",
        doc="m <- beta m - lr g",
    )


def _accumulator(
    g: nl.Graph,
    name: str,
    stream: object,
    lr: float,
    retain: float | None = None,
    frequency: nl.Frequency | None = None,
    doc: str = "",
) -> None:
    """A key-less memory ``S <- retain S + lr * stream``: one GD step on ``-<S, stream>``."""
    g.level(
        name,
        state=nl.like("w"),
        frequency=frequency or nl.per_step(),
        context=stream,
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr, retain=retain),
        group="moments",
        doc=doc,
    )


@register("nesterov", "optimizer")
def nesterov(lr: float = 1e-2, beta: float = 0.9) -> nl.Graph:
    """Nesterov momentum: the momentum memory of Eqs. 10–13, 33, read one step ahead.

    ``m <- beta m - lr g`` as in ``momentum``; ``W <- W + beta m - lr g`` (the look-ahead reads
    the new momentum and the current gradient). Equals
    ``torch.optim.SGD(lr, momentum=beta, nesterov=True)`` with ``m = -lr b``.
    """
    g = nl.Graph("nesterov", doc=nesterov.__doc__ or "")
    w = _weights(g, beta * nl.state("m") - lr * nl.grad_of("w"))
    _momentum(g, w, lr, beta)
    return g


@register("adagrad", "optimizer")
def adagrad(lr: float = 1e-2, eps: float = 1e-10) -> nl.Graph:
    """AdaGrad: a memory of summed squared gradients preconditions GD (App. B, Eqs. 100–105).

    ``v <- v + g^2`` (one GD step, lr 1, on ``-<v, g^2>``: the cumulative sums of App. B, no
    decay); ``W <- W - lr g / (sqrt(v) + eps)``. Equals ``torch.optim.Adagrad(lr, eps=eps)``.
    """
    g = nl.Graph("adagrad", doc=adagrad.__doc__ or "")
    w = _weights(g, -lr * nl.grad_of("w") / (nl.state("v").sqrt() + eps))
    _accumulator(g, "v", w.grad().square(), 1.0, doc="v <- v + g^2")
    return g


@register("rmsprop", "optimizer")
def rmsprop(lr: float = 1e-2, beta: float = 0.99, eps: float = 1e-8) -> nl.Graph:
    """RMSProp: AdaGrad's memory of squared gradients with forgetting (App. B, Eqs. 100–105).

    ``v <- beta v + (1 - beta) g^2`` (an EMA: one GD step of size ``1 - beta`` on
    ``1/2 ||v - g^2||^2``); ``W <- W - lr g / (sqrt(v) + eps)``. Equals
    ``torch.optim.RMSprop(lr, alpha=beta, eps=eps)``.
    """
    g = nl.Graph("rmsprop", doc=rmsprop.__doc__ or "")
    w = _weights(g, -lr * nl.grad_of("w") / (nl.state("v").sqrt() + eps))
    g.level(
        "v",
        state=nl.like("w"),
        frequency=nl.per_step(),
        objective=nl.l2_to(w.grad().square()),
        optimizer=nl.ema(beta),
        group="moments",
        doc="second moment: EMA of squared gradients",
    )
    return g


@register("adagrad_momentum", "optimizer")
def adagrad_momentum(
    lr: float = 1e-2, b1: float = 1.0, b2: float = 1.0, eps: float = 1e-10
) -> nl.Graph:
    """AdaGrad with momentum: the optimal element-wise memory of App. B (Eqs. 100–105).

    The minimiser of ``sum_i ||m g_i - P||^2`` with ``P = sqrt(sum_i g_i^2)`` is
    ``sum_i g_i / sqrt(sum_i g_i^2)``: ``m <- m + b1 g`` and ``v <- v + b2 g^2`` (cumulative
    sums, as printed; same tier), ``W <- W - lr m / (sqrt(v) + eps)``.
    """
    g = nl.Graph("adagrad_momentum", doc=adagrad_momentum.__doc__ or "")
    w = _weights(g, -lr * nl.state("m") / (nl.state("v").sqrt() + eps))
    _accumulator(g, "m", w.grad(), b1, doc="m <- m + b1 g")
    _accumulator(g, "v", w.grad().square(), b2, doc="v <- v + b2 g^2")
    return g


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
    w = _weights(g, nl.state("m"))
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
        context=-u / (nl.debias(nl.state("v"), b2).sqrt() + eps),
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
    w = _weights(g, nl.state("m"))
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


@register("dmgd", "optimizer")
def dmgd(lr: float = 1e-2, inner_lr: float = 1e-2, decay: float = 1.0, width: int = 16) -> nl.Graph:
    """Deep momentum GD: the momentum is an MLP memory of gradients (Eq. 50, PAPER.md 2.7).

    ``m <- decay m - inner_lr ∇ 1/2 ||m(u) - u||^2`` (one GD step per outer step on the MLP's
    parameters, retention ``decay``), then ``W <- W - lr m(u)`` with the updated memory. The
    minimal choice of PAPER.md 2.7 [I]: a 2-layer residual MLP, L2 objective onto the gradient
    itself; ours: applied to each gradient element (``d_in = d_out = 1``), shared by all
    parameters, so it fits every shape.
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


@register("muon", "optimizer")
def muon(
    lr: float = 2e-2,
    beta: float = 0.95,
    steps: int = 5,
    variant: str = "quintic",
    nesterov: bool = False,
) -> nl.Graph:
    """Muon: momentum with a Newton–Schulz output, W <- W + lr NS_k(m) (Eqs. 42–44, 52).

    ``m <- beta m - g`` (the momentum memory; its scale is irrelevant, NS normalises);
    ``W <- W + lr NS_steps(m)`` (``nesterov``: ``NS_steps(beta m - g)``). ``variant="cubic"`` is
    one inner GD step per iteration on ``1/2||O-g||^2 + 1/2||O^T O - I||^2`` (Eq. 44);
    ``"quintic"`` is production Muon's polynomial. Matrix parameters only (Muon's convention).
    """
    g = nl.Graph("muon", doc=muon.__doc__ or "", variant=variant, nesterov=nesterov)
    m = beta * nl.state("m") - nl.grad_of("w") if nesterov else nl.state("m")
    w = _weights(g, lr * nl.newton_schulz(m, steps=steps, variant=variant))
    _momentum(g, w, 1.0, beta)
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
    """
    if momenta not in ("sum", "ema"):
        raise nl.SpecError(f"m3: momenta={momenta!r}; expected 'sum' (Algorithm 1) or 'ema'")
    g = nl.Graph("m3", doc=m3.__doc__ or "", momenta=momenta, variant=variant, f=f)
    ema = momenta == "ema"
    ns1 = nl.newton_schulz(nl.state("M1"), steps=steps, variant=variant)
    ns2 = nl.newton_schulz(nl.state("M2", at="prev"), steps=steps, variant=variant)
    v = nl.debias(nl.state("V"), b2) if ema else nl.state("V")
    w = _weights(g, -lr * (ns1 + alpha * ns2) / (v.sqrt() + eps))
    grad = w.grad()
    for name, stream, b, every in (
        ("M1", grad, b1, 1),
        ("V", grad.square(), b2, 1),
        ("M2", grad, b3, f),
    ):
        _accumulator(
            g,
            name,
            stream,
            1 - b if ema else b,
            retain=b if ema else None,
            frequency=nl.per_step(every),
            doc=f"{name} <- " + (f"{b:g} {name} + {1 - b:g} x" if ema else f"{name} + {b:g} x"),
        )
    return g


@register("dgd_update", "optimizer")
def dgd_update(lr: float = 1e-2) -> nl.Graph:
    """DGD for linear layers: the exact L2 proximal step on self-made values (Eqs. 56–57).

    For a linear layer with input ``x`` and output error ``∇_y L``:
    ``W <- W (I - lr' x x^T) - lr' ∇_W L`` with ``lr' = lr / (1 + lr ||x||^2)``, the exact
    minimiser of ``1/2 ||W x - u||^2 + 1/(2 lr) ||W - W_t||^2`` for ``u = -∇_y L`` (PAPER.md 3.1).
    The key ``x`` is each layer's own input; deep networks apply it per layer.
    """
    g = nl.Graph("dgd_update", doc=dgd_update.__doc__ or "")
    g.level(
        "w",
        state=nl.params(),
        frequency=nl.per_step(),
        context=nl.grad_of("w"),
        objective=nl.dot(),
        optimizer=nl.dgd(lr=lr, exact=True),
        doc="W <- W (I - lr' x x^T) - lr' grad",
    )
    return g
