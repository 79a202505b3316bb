"""Optimizers as associative memories over the gradient stream (PAPER.md section 2).

Every definition has a weights level ``w`` (the parameters, updated every outer step) whose
update follows the state of faster memory levels (momentum, moments) that compress its gradients.
Options that torch's optimizers have (weight decay, AMSGrad, Nesterov, centering) add small
levels or flows to the graph; with their defaults the graph is the paper's.
"""

from __future__ import annotations

import nlgraph as nl
from nlgraph.flows import ticks
from nlgraph.library import register


def _weights(
    g: nl.Graph,
    update: object,
    *,
    name: str = "w",
    decay: float | None = None,
    select: nl.states.Params | None = None,
) -> nl.LevelHandle:
    """The parameters: ``W <- (1 - decay) W + update`` (decoupled decay only when given)."""
    rules = (nl.weight_decay(decay),) if decay is not None else ()
    return g.level(
        name,
        state=select or nl.params(),
        frequency=nl.per_step(),
        objective=nl.outer(),
        optimizer=nl.chain(*rules, nl.follow(update)),
        doc="the parameters, trained on the outer loss",
    )


def _gradient(g: nl.Graph, w: str, weight_decay: float, name: str = "grad") -> nl.flows.FlowBase:
    """The gradient stream the memories compress: ``g + weight_decay W`` when the outer loss
    carries an L2 penalty ``weight_decay/2 ||W||^2`` (torch's coupled ``weight_decay``)."""
    grad = nl.grad_of(w)
    if not weight_decay:
        return grad
    return g.let(name, grad + weight_decay * nl.state(w, at="prev"))


@register("sgd", "optimizer")
def sgd(
    lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
) -> nl.Graph:
    """SGD: a 1-level memory, one proximal step on <W x, ∇_y L> per step (Eqs. 8–9, 33).

    With nlgraph's convention ``dot = -<M(k), v>`` the value is the negative gradient:
    ``W <- W + lr * (-g)``. With ``momentum`` the gradients are compressed by a second, faster
    level in torch's form, ``b <- momentum b + g`` (one GD step of size 1, retention
    ``momentum``, on ``-<b, g>``) and ``W <- W - lr b`` (``nesterov``: ``W <- W - lr (g +
    momentum b)``). It is the paper's ``m <- momentum m - lr g`` (``momentum``) with ``m = -lr b``
    for a constant ``lr``, and keeps torch's trajectory when a scheduler changes ``lr``.
    ``weight_decay`` adds ``weight_decay/2 ||W||^2`` to the outer loss.
    """
    if nesterov and not momentum:
        raise nl.SpecError("sgd: nesterov=True needs momentum > 0 (the look-ahead reads it)")
    g = nl.Graph("sgd", doc=sgd.__doc__ or "")
    grad = _gradient(g, "w", weight_decay)
    if not momentum:
        g.level(
            "w",
            state=nl.params(),
            frequency=nl.per_step(),
            context=-grad,
            objective=nl.dot(),
            optimizer=nl.gd(lr=lr),
            doc="W <- W - lr * grad",
        )
        return g
    b = nl.state("b", at="new")
    _weights(g, -lr * (grad + momentum * b if nesterov else b))
    _accumulator(g, "b", grad, 1.0, retain=momentum, doc="b <- momentum b + g", group="momentum")
    return g


@register("momentum", "optimizer")
def momentum(lr: float = 1e-2, beta: float = 0.9) -> nl.Graph:
    """SGD with momentum: the momentum is a linear memory of gradients (Eqs. 10–13, 33–34).

    ``m <- beta m - lr g`` is one GD step on ``<m, g> + (1 - beta)/(2 lr) ||m||^2``;
    ``W <- W + m``. Equals ``torch.optim.SGD(lr, momentum=beta)`` with ``m = -lr b``.
    """
    g = nl.Graph("momentum", doc=momentum.__doc__ or "")
    w = _weights(g, nl.state("m", at="new"))
    _momentum(g, w, lr, beta)
    return g


def _adam(
    g: nl.Graph,
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    *,
    weight_decay: float = 0.0,
    decoupled: float | None = None,
    amsgrad: bool = False,
    prefix: str = "",
    select: nl.states.Params | None = None,
) -> None:
    """Adam's levels, named ``{prefix}w``, ``{prefix}m``, ``{prefix}v`` (``{prefix}vmax``)."""
    w, m, v = f"{prefix}w", f"{prefix}m", f"{prefix}v"
    grad = _gradient(g, w, weight_decay, name=f"{prefix}grad")
    denom = f"{prefix}vmax" if amsgrad else v
    m_hat = nl.debias(nl.state(m, at="new"), b1)
    v_hat = nl.debias(nl.state(denom, at="new"), b2)
    step = -lr * m_hat / (v_hat.sqrt() + eps)
    decay = None if decoupled is None else lr * decoupled
    _weights(g, step, name=w, decay=decay, select=select)
    g.level(
        m,
        state=nl.like(w),
        frequency=nl.per_step(),
        objective=nl.l2_to(grad),
        optimizer=nl.ema(b1),
        group="moments",
        doc="first moment: EMA of gradients",
    )
    g.level(
        v,
        state=nl.like(w),
        frequency=nl.per_step(),
        objective=nl.l2_to(grad.square()),
        optimizer=nl.ema(b2),
        group="moments",
        doc="second moment: EMA of squared gradients",
    )
    if amsgrad:
        g.level(
            denom,
            state=nl.like(w),
            frequency=nl.per_step(),
            optimizer=nl.follow((nl.state(v, at="new") - nl.state(denom, at="prev")).apply("relu")),
            group="moments",
            doc="AMSGrad: the running maximum of v, vmax <- vmax + relu(v - vmax)",
        )


@register("adam", "optimizer")
def adam(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
) -> nl.Graph:
    """Adam: two memories of the gradient stream in one level (App. B, Eqs. 100–105).

    ``m`` and ``v`` are EMAs, i.e. one GD step of size ``1 - beta`` on ``1/2 ||S - target||^2``;
    they share a frequency and are independent, so they sit in the same tier (Def. 2).
    ``W <- W - lr * debias(m) / (sqrt(debias(v)) + eps)``. ``weight_decay`` is an L2 penalty on
    the outer loss (the memories see ``g + weight_decay W``); ``amsgrad`` adds a third memory,
    the running maximum of ``v``, read instead of ``v``.
    """
    g = nl.Graph("adam", doc=adam.__doc__ or "")
    _adam(g, lr, b1, b2, eps, weight_decay=weight_decay, amsgrad=amsgrad)
    return g


@register("adamw", "optimizer")
def adamw(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    wd: float = 1e-2,
    amsgrad: bool = False,
) -> nl.Graph:
    """AdamW: Adam's memories plus decoupled weight decay (App. B, Eqs. 100–105).

    ``W <- (1 - lr wd) W - lr * debias(m) / (sqrt(debias(v)) + eps)``.
    """
    g = nl.Graph("adamw", doc=adamw.__doc__ or "")
    _adam(g, lr, b1, b2, eps, decoupled=wd, amsgrad=amsgrad)
    return g


def _momentum(g: nl.Graph, w: nl.LevelHandle, lr: float, beta: float) -> None:
    g.level(
        "m",
        state=nl.like(w.name),
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
    group: str = "moments",
    like: str = "w",
) -> None:
    """A key-less memory ``S <- retain S + lr * stream``: one GD step on ``-<S, stream>``."""
    g.level(
        name,
        state=nl.like(like),
        frequency=frequency or nl.per_step(),
        context=stream,
        objective=nl.dot(),
        optimizer=nl.gd(lr=lr, retain=retain),
        group=group,
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
    w = _weights(g, beta * nl.state("m", at="new") - lr * nl.grad_of("w"))
    _momentum(g, w, lr, beta)
    return g


@register("adagrad", "optimizer")
def adagrad(
    lr: float = 1e-2,
    eps: float = 1e-10,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
) -> nl.Graph:
    """AdaGrad: a memory of summed squared gradients preconditions GD (App. B, Eqs. 100–105).

    ``v <- v + g^2`` (one GD step, lr 1, on ``-<v, g^2>``: the cumulative sums of App. B, no
    decay); ``W <- W - lr_t g / (sqrt(v + v0) + eps)`` with ``lr_t = lr / (1 + (t - 1)
    lr_decay)`` at the weights' ``t``-th update and ``v0 = initial_accumulator_value`` (torch
    keeps ``v + v0`` in its state; here ``v`` starts at zero). Equals ``torch.optim.Adagrad``.
    """
    g = nl.Graph("adagrad", doc=adagrad.__doc__ or "")
    grad = _gradient(g, "w", weight_decay)
    v = nl.state("v", at="new")
    if initial_accumulator_value:
        v = v + initial_accumulator_value
    scale = -lr / (1 + (ticks() - 1) * lr_decay) if lr_decay else -lr
    _weights(g, scale * grad / (v.sqrt() + eps))
    _accumulator(g, "v", grad.square(), 1.0, doc="v <- v + g^2")
    return g


@register("rmsprop", "optimizer")
def rmsprop(
    lr: float = 1e-2,
    beta: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
    weight_decay: float = 0.0,
) -> nl.Graph:
    """RMSProp: AdaGrad's memory of squared gradients with forgetting (App. B, Eqs. 100–105).

    ``v <- beta v + (1 - beta) g^2`` (an EMA: one GD step of size ``1 - beta`` on
    ``1/2 ||v - g^2||^2``); ``W <- W - lr g / (sqrt(v) + eps)``. ``centered`` adds a memory
    ``a`` of the gradients (an EMA too) and divides by ``sqrt(v - a^2) + eps``; ``momentum``
    compresses the preconditioned gradients once more, ``b <- momentum b + g / (...)``,
    ``W <- W - lr b``. Equals ``torch.optim.RMSprop(lr, alpha=beta, eps=eps, ...)``.
    """
    g = nl.Graph("rmsprop", doc=rmsprop.__doc__ or "")
    grad = _gradient(g, "w", weight_decay)
    v = nl.state("v", at="new")
    denom = ((v - nl.state("a", at="new").square()) if centered else v).sqrt() + eps
    _weights(g, -lr * nl.state("b", at="new") if momentum else -lr * grad / denom)
    g.level(
        "v",
        state=nl.like("w"),
        frequency=nl.per_step(),
        objective=nl.l2_to(grad.square()),
        optimizer=nl.ema(beta),
        group="moments",
        doc="second moment: EMA of squared gradients",
    )
    if centered:
        g.level(
            "a",
            state=nl.like("w"),
            frequency=nl.per_step(),
            objective=nl.l2_to(grad),
            optimizer=nl.ema(beta),
            group="moments",
            doc="first moment: EMA of gradients (centering)",
        )
    if momentum:
        _accumulator(g, "b", grad / denom, 1.0, retain=momentum, group="momentum",
                     doc="b <- momentum b + g / (sqrt(v) + eps)")  # fmt: skip
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
    w = _weights(g, -lr * nl.state("m", at="new") / (nl.state("v", at="new").sqrt() + eps))
    _accumulator(g, "m", w.grad(), b1, doc="m <- m + b1 g")
    _accumulator(g, "v", w.grad().square(), b2, doc="v <- v + b2 g^2")
    return g


# The paper's more expressive memories of gradients (Sec. 4.4–4.5, 7.2) live in their own module;
# importing it registers them.
from nlgraph.library import momenta as _momenta  # noqa: E402, F401
