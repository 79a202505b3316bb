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
    """AdamW: Adam's memories plus decoupled weight decay ``W <- (1 - lr wd) W``."""
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
