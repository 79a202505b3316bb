"""Sequence memories: a fast memory compressing key/value pairs per token, read by a query
(PAPER.md 1.4, 1.6), with slow projections trained by the outer loop."""

from __future__ import annotations

import nlgraph as nl
from nlgraph.library import register
from nlgraph.optimizers import Scalar

META = ("exact", "first_order")


def check_meta(model: str, meta: object) -> None:
    """``meta=``: how the outer gradient treats in-sequence writes (exact or first-order)."""
    if meta not in META:
        raise nl.SpecError(f"{model}: meta={meta!r}; expected 'exact' or 'first_order'")


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
    """DeltaNet: GD on 1/2||M k - v||^2 with a data-dependent step beta_t (Eq. 65).

    ``M <- M (I - beta_t k k^T) + beta_t v k^T``, ``beta_t = sigmoid(W_beta x)``.
    """
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
        chunk=chunk,
        heads=heads,
        doc="delta-rule matrix memory",
    )
    g.output("y", mem(q.normalize(), at="new"))
    return g


@register("titans", "memory")
def titans(d: int = 64, heads: int = 1, depth: int = 2, chunk: int = 16) -> nl.Graph:
    """Titans' memory: a deep MLP with surprise momentum and forgetting (PAPER.md 4.1).

    GD on ``1/2||M(k) - v||^2`` with data-dependent rates per token:
    ``S <- eta_t S - theta_t ∇l(M; k, v)``;  ``M <- (1 - alpha_t) M + S``;  ``y = M(q)``.
    """
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
        chunk=chunk,
        heads=heads,
        doc="deep memory, chunk-parallel training (Titans Eqs. 16-18)",
    )
    g.output("y", mem(q.normalize(), at="new"))
    return g


@register("gated_linear_attention", "memory")
def gated_linear_attention(
    d: int = 64, heads: int = 1, decay: float | None = None, chunk: int = 64
) -> nl.Graph:
    """Gated linear attention: a Hebbian memory with decay, M <- alpha_t M + v k^T (Eq. 64).

    One GD step (lr 1) on ``-<M k, v>`` with retention ``alpha_t``: data-dependent per head,
    ``alpha_t = sigmoid(W_alpha x)`` (GLA, Mamba2), or the constant ``decay`` (RetNet's gamma).
    ``y = M q``.
    """
    g = nl.Graph("gated_linear_attention", doc=gated_linear_attention.__doc__ or "", chunk=chunk)
    x = g.input("x", dim=d)
    k, v, q = projections(g, x, d, d, ("W_k", "W_v", "W_q"))
    if decay is None:
        (a,) = projections(g, x, d, heads, ("W_alpha",))
        retain: Scalar = nl.signal(a, "sigmoid")
    else:
        retain = decay
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        context=nl.kv(key=k, value=v, query=q),
        objective=nl.dot(),
        optimizer=nl.gd(lr=1.0, retain=retain),
        chunk=chunk,
        heads=heads,
        doc="matrix memory with a decay gate",
    )
    g.output("y", mem(q, at="new"))
    return g


@register("gated_deltanet", "memory")
def gated_deltanet(d: int = 64, heads: int = 1, chunk: int = 64) -> nl.Graph:
    """Gated DeltaNet: the delta rule with a forget gate (Eq. 65 with retention).

    GD with step ``beta_t`` and retention ``alpha_t`` on ``1/2 ||M k - v||^2``:
    ``M <- alpha_t M - beta_t (M k - v) k^T = M (alpha_t I - beta_t k k^T) + beta_t v k^T``,
    ``beta_t = sigmoid(W_beta x)``, ``alpha_t = sigmoid(W_alpha x)``; k and q are normalised.
    (Gated DeltaNet proper scales the erase by ``alpha_t`` too, ``alpha_t beta_t k k^T``.)
    """
    g = nl.Graph("gated_deltanet", doc=gated_deltanet.__doc__ or "", chunk=chunk)
    x = g.input("x", dim=d)
    k, v, q = projections(g, x, d, d, ("W_k", "W_v", "W_q"))
    b, a = projections(g, x, d, heads, ("W_beta", "W_alpha"))
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        context=nl.kv(key=k.normalize(), value=v, query=q.normalize()),
        objective=nl.l2(),
        optimizer=nl.gd(lr=nl.signal(b, "sigmoid"), retain=nl.signal(a, "sigmoid")),
        chunk=chunk,
        heads=heads,
        doc="gated delta-rule matrix memory",
    )
    g.output("y", mem(q.normalize(), at="new"))
    return g


@register("dgd_memory", "memory")
def dgd_memory(d: int = 64, heads: int = 1, chunk: int = 64) -> nl.Graph:
    """DGD memory: the exact proximal step on the L2 objective (PAPER.md 3.1, Eqs. 56–57, 88).

    ``M <- argmin 1/2 ||M k - v||^2 + 1/(2 eta) ||M - M_t||^2
    = M (I - eta' k k^T) + eta' v k^T`` with ``eta' = eta / (1 + eta ||k||^2)``, plus the
    retention ``alpha_t``; ``eta_t = softplus(W_eta x)``, ``alpha_t = sigmoid(W_alpha x)``;
    k and q are normalised (so ``eta' = eta / (1 + eta)``). In DSL terms this is DGD on the dot
    objective (its value ``v`` is regressed, see :class:`nlgraph.optimizers.DGD`).
    """
    g = nl.Graph("dgd_memory", doc=dgd_memory.__doc__ or "", chunk=chunk)
    x = g.input("x", dim=d)
    k, v, q = projections(g, x, d, d, ("W_k", "W_v", "W_q"))
    eta, a = projections(g, x, d, heads, ("W_eta", "W_alpha"))
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        context=nl.kv(key=k.normalize(), value=v, query=q.normalize()),
        objective=nl.dot(),
        optimizer=nl.dgd(lr=nl.signal(eta, "softplus"), retain=nl.signal(a, "sigmoid"), exact=True),
        chunk=chunk,
        heads=heads,
        doc="matrix memory trained by exact DGD",
    )
    g.output("y", mem(q.normalize(), at="new"))
    return g


def _attention(name: str, doc: str, d: int, heads: int, window: int | None) -> nl.Graph:
    g = nl.Graph(name, doc=doc)
    x = g.input("x", dim=d)
    k, v, q = projections(g, x, d, d, ("W_k", "W_v", "W_q"))
    mem = g.level(
        "M",
        state=nl.nonparametric(window=window),
        frequency=nl.per_token(),
        context=nl.kv(key=k, value=v, query=q),
        objective=nl.nadaraya_watson(),
        optimizer=nl.exact(),
        heads=heads,
        doc="the context itself, solved exactly per query",
    )
    g.output("y", mem(q, at="new"))
    return g


@register("softmax_attention", "memory")
def softmax_attention(d: int = 64, heads: int = 1) -> nl.Graph:
    """Softmax attention: the exact Nadaraya–Watson memory of all past pairs (Eq. 62).

    ``y_t = argmin_M sum_{i<=t} s(k_i, q_t) ||v_i - M||^2
    = sum_i softmax_i(q_t^T k_i / sqrt(d_k)) v_i``: non-parametric, causal, frequency ∞.
    """
    return _attention("softmax_attention", softmax_attention.__doc__ or "", d, heads, None)


@register("sliding_window_attention", "memory")
def sliding_window_attention(d: int = 64, heads: int = 1, window: int = 64) -> nl.Graph:
    """Sliding-window attention: the Nadaraya–Watson memory of the last ``window`` pairs (Eq. 63).

    ``y_t = sum_{t-window < i <= t} softmax_i(q_t^T k_i / sqrt(d_k)) v_i``.
    """
    return _attention(
        "sliding_window_attention", sliding_window_attention.__doc__ or "", d, heads, window
    )


@register("self_modifying_titans", "memory")
def self_modifying_titans(
    d: int = 64,
    heads: int = 1,
    width: int | None = None,
    chunk: int = 16,
    chunk_mem: int = 64,
    adaptive_q: bool = False,
    momentum: float = 0.9,
    eta_scale: float = 1.0,
    exact: bool = True,
    conv_window: int = 4,
    activation: str = "silu",
    output_gate: bool = True,
    value_norm: bool = True,
    retain_bias: float = 6.0,
    meta: str = "exact",
) -> nl.Graph:
    """Self-modifying Titans: MLP memories that make their own keys, values and rates (Eqs. 83–93).

    With ``xc = conv(x)`` and every read at the previous state (PAPER.md 4.3–4.5):
    ``k = normalize(M_k(xc))``, ``v = M_v(xc)``, ``eta = eta_scale softplus(W_eta M_eta(xc))``,
    ``alpha = sigmoid(W_alpha M_alpha(xc))``, ``q = normalize(W_q xc)`` (or ``M_q(xc)``). Each
    memory ``M`` in {k, v, (q), eta, alpha, mem} generates its own value ``hat v = M(v)`` and
    takes a DGD step with weight decay on ``1/2 ||M(k) - hat v||^2`` (Eq. 88):
    ``M <- M (alpha I - eta' k k^T) - eta' ∇`` (+ surprise momentum). ``y = M_mem(q)``.
    Every memory is ``M(z) = z + W1 σ(W2 z)`` (Eq. 89) with a meta-learned initial state.

    Args (the paper's open points, PAPER.md 4.7 and 10; defaults are its recommendations):
        d, heads: width ``[B, T, d]``; ``heads`` independent memories of width ``d / heads``.
        width: hidden width of each memory MLP (not given; default ``d``).
        chunk, chunk_mem: the two chunk sizes (M_mem vs the others; not reported; 16 / 64).
        adaptive_q: ``q`` from a memory M_q (Eqs. 85, 88) or the slow ``W_q`` (Eq. 94, default).
        momentum: Titans-style surprise momentum (ablated in Table 6, absent from the
            equations); ``0`` turns it off.
        eta_scale: ``eta = eta_scale * softplus(.)`` and ``alpha = sigmoid(.)`` from scalar heads
            per memory head (the MLPs are ``d -> d``; the rates are scalars).
        exact: DGD with ``eta' = eta / (1 + eta ||k||^2)`` (PAPER.md 3.1) or literal Eq. 88.
        conv_window: the local convolution (window 4) on ``x``; ``0`` removes it.
        activation: the MLP's σ (not given; SiLU).
        output_gate: ``y = norm(y) * sigmoid(W_g x)``, inherited from Titans [S].
        value_norm: l2-normalise the self-generated values ``hat v = M(v)`` (per head). The
            paper normalises q and k only; without this, ``hat v = M_v(M_v(x))`` feeds each
            memory's gain back into its own targets and the states grow without bound within a
            few hundred tokens (measured: weights of 1e8 by token 128, NaN with momentum) [I].
        retain_bias: ``alpha = sigmoid(W_alpha M_alpha(xc) + retain_bias)``: the retention
            starts near ``sigmoid(6) = 0.9975`` per token instead of 0.5, which erased every
            memory within a few tokens (not given in the paper; gates start near keep) [I].
        meta: ``"exact"`` (default): the outer gradient flows through every write (full
            meta-gradients, PAPER.md 4.5's natural default); ``"first_order"``: every memory's
            writes are constants to it (``stop_grad`` on each memory's own recurrence): the
            same forward, no autograd graph for the writes; ``M_mem``'s initial state, ``W_q``,
            the convolution and the output gate still learn through the reads, while ``M_k``,
            ``M_v``, ``M_eta``, ``M_alpha``, ``W_eta`` and ``W_alpha`` act only through writes
            and get no gradient (they keep their initial values).

    The momentum is dampened (``S <- mu S - (1 - mu) lr' grad``): undampened, momentum 0.9 on top
    of DGD's exact step diverged to NaN within 200 tokens in our runs [I].

    Fixed choices, recorded in ``meta``: gradients flow through ``hat v`` (``value_grad``);
    reads and gradients use the previous chunk's final state (``chunk_index="causal"``); DGD on
    an MLP applies per layer with each layer's input (``dgd_mlp="per_layer"``).
    """
    width = width or d
    check_meta("self_modifying_titans", meta)
    g = nl.Graph(
        "self_modifying_titans",
        doc=self_modifying_titans.__doc__ or "",
        chunk=chunk,
        adaptive_q=adaptive_q,
        momentum=momentum,
        eta_act="softplus",
        eta_scale=eta_scale,
        alpha_act="sigmoid",
        exact_dgd=exact,
        conv_on="x",
        conv_window=conv_window,
        width=width,
        activation=activation,
        chunk_mem=chunk_mem,
        output_gate=output_gate,
        value_norm=value_norm,
        retain_bias=retain_bias,
        value_grad="full",
        chunk_index="causal",
        dgd_mlp="per_layer",
        meta_gradients=meta,
    )
    x = g.input("x", dim=d)
    xc: object = x
    if conv_window:
        xc = g.level(
            "conv",
            state=nl.conv(d, conv_window),
            frequency=nl.per_step(),
            objective=nl.outer(),
            init=nl.normal(),
            group="projections",
            doc="local causal convolution on x",
        )(x)
    k = nl.read("M_k", xc).normalize()
    v = nl.read("M_v", xc)
    q = (nl.read("M_q", xc) if adaptive_q else projections(g, xc, d, d, ("W_q",))[0]).normalize()
    (eta,) = projections(g, nl.read("M_eta", xc), d, heads, ("W_eta",))
    (alpha,) = projections(g, nl.read("M_alpha", xc), d, heads, ("W_alpha",))
    rule = nl.dgd(
        lr=nl.signal(eta, "softplus", scale=eta_scale),
        retain=nl.signal(alpha + retain_bias, "sigmoid"),
        momentum=momentum or None,
        exact=exact,
        dampen=True,
    )
    for n in ("k", "v", *(("q",) if adaptive_q else ()), "eta", "alpha", "mem"):
        g.level(
            f"M_{n}",
            state=nl.mlp(d, d, width=width, activation=activation, residual=True),
            frequency=nl.per_token(),
            context=nl.kv(
                key=k,
                value=nl.read(f"M_{n}", v).normalize() if value_norm else nl.read(f"M_{n}", v),
                query=q if n == "mem" else None,
            ),
            objective=nl.l2(),
            optimizer=rule,
            chunk=chunk_mem if n == "mem" else chunk,
            init=nl.meta(),
            heads=heads,
            group="memories",
            doc="the memory read by q" if n == "mem" else f"produces {n} and trains on M_{n}(v)",
        )
        if meta == "first_order":  # the writes of every memory are constants to the outer loss
            g.differentiate(f"M_{n}", f"M_{n}", nl.stop_grad())
    y = nl.read("M_mem", q)
    if output_gate:
        norm = g.level(
            "norm_o",
            state=nl.module("torch.nn:RMSNorm", normalized_shape=d),
            frequency=nl.per_step(),
            objective=nl.outer(),
            init=nl.identity(),
            doc="output norm",
        )
        (gate,) = projections(g, x, d, d, ("W_g",))
        y = norm(y) * gate.apply("sigmoid")
    g.output("y", y)
    return g
