"""Sequence memories: a fast memory compressing key/value pairs per token, read by a query
(PAPER.md 1.4, 1.6), with slow projections trained by the outer loop."""

from __future__ import annotations

import nlgraph as nl
from nlgraph.library import register


def projections(g: nl.Graph, x: object, d_in: int, d_out: int, names: tuple[str, ...]) -> list:
    """Slow linear projections (updated every outer step), one level each."""
    out = []
    for n in names:
        out.append(
            g.level(
                n,
                state=nl.linear(d_in, d_out),
                frequency=nl.per_step(),
                objective=nl.outer(),
                init=nl.normal(),
                group="projections",
                doc=f"{n} x",
            )(x)
        )
    return out


@register("linear_attention", "memory")
def linear_attention(d: int = 64, heads: int = 1) -> nl.Graph:
    """Linear attention: M <- M + v k^T, one GD step (lr 1) on -<M k, v> (Eqs. 14–18, 64)."""
    g = nl.Graph("linear_attention", doc=linear_attention.__doc__ or "")
    x = g.input("x", dim=d)
    k, v, q = projections(g, x, d, d, ("W_k", "W_v", "W_q"))
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        context=nl.kv(key=k, value=v, query=q),
        objective=nl.dot(),
        optimizer=nl.gd(lr=1.0),
        heads=heads,
        doc="matrix memory of key-value pairs",
    )
    g.output("y", mem(q, at="new"))
    return g


@register("deltanet", "memory")
def deltanet(d: int = 64, heads: int = 1, chunk: int = 64) -> nl.Graph:
    """DeltaNet: GD on 1/2||M k - v||^2 with a data-dependent step beta_t (Eq. 65):
    M <- M (I - beta k k^T) + beta v k^T."""
    g = nl.Graph("deltanet", doc=deltanet.__doc__ or "", chunk=chunk)
    x = g.input("x", dim=d)
    k, v, q = projections(g, x, d, d, ("W_k", "W_v", "W_q"))
    (b,) = projections(g, x, d, heads, ("W_beta",))
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        context=nl.kv(key=k.normalize(), value=v, query=q.normalize()),
        objective=nl.l2(),
        optimizer=nl.gd(lr=nl.signal(b, "sigmoid")),
        heads=heads,
        doc="delta-rule matrix memory",
    )
    g.output("y", mem(q.normalize(), at="new"))
    return g


@register("titans", "memory")
def titans(d: int = 64, heads: int = 1, depth: int = 2, chunk: int = 16) -> nl.Graph:
    """Titans' neural memory: a deep MLP memory on 1/2||M(k) - v||^2 with surprise momentum and
    forgetting, data-dependent per token (PAPER.md 4.1):
    S <- eta_t S - theta_t ∇l(M; k, v);  M <- (1 - alpha_t) M + S;  y = M(q)."""
    g = nl.Graph("titans", doc=titans.__doc__ or "", chunk=chunk)
    x = g.input("x", dim=d)
    k, v, q = (
        g.level(
            f"conv_{n}",
            state=nl.conv(d, 4),
            frequency=nl.per_step(),
            objective=nl.outer(),
            init=nl.normal(),
            group="projections",
        )(p.apply("silu"))
        for n, p in zip("kvq", projections(g, x, d, d, ("W_k", "W_v", "W_q")), strict=True)
    )
    theta, eta, alpha = projections(g, x, d, heads, ("W_theta", "W_eta", "W_alpha"))
    mem = g.level(
        "M",
        state=nl.mlp(d, d, width=d, depth=depth, residual=True),
        frequency=nl.per_token(),
        context=nl.kv(key=k.normalize(), value=v, query=q.normalize()),
        objective=nl.l2(),
        optimizer=nl.gd(
            lr=nl.signal(theta, "sigmoid"),
            momentum=nl.signal(eta, "sigmoid"),
            retain=nl.signal(-alpha, "sigmoid"),
        ),
        init=nl.meta(),
        heads=heads,
        doc="deep memory, chunk-parallel training (Titans Eqs. 16-18)",
    )
    g.output("y", mem(q.normalize(), at="new"))
    return g
