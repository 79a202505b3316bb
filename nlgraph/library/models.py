"""Whole models built from the library's memories: CMS, Hope, baselines.

Blocks are pre-norm residual (PAPER.md 6.1 [I]): ``h <- h + W_o mixer(norm(h))``, then
``h <- h + ffn(norm(h))``. Our choices where the paper is silent [U]: RMSNorm (Llama-style, as
Titans' baselines), an untied LM head, a learned token embedding; norms, embedding and head are
slow levels trained by the outer optimizer. Language models take ``tokens`` and give ``logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import nlgraph as nl
from nlgraph.library import register
from nlgraph.library.memories import (
    check_meta,
    projections,
    self_modifying_titans,
    softmax_attention,
    titans,
)

NORM = "torch.nn:RMSNorm"

# Sizes are ours [I]: the paper reports none for Hope (PAPER.md 6.2). "tiny" (the default) is for
# tests and CPU runs; "small" is a ~GPT-2-small shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab=256, d=64, n_layers=2, heads=2, hidden=256, width=64,
        chunk=8, chunk_mem=16, cms_chunks=(8, 32),
    ),
    "small": dict(
        vocab=32000, d=768, n_layers=12, heads=12, hidden=3072, width=768,
        chunk=16, chunk_mem=64, cms_chunks=(16, 64, 256),
    ),
}  # fmt: skip


def _norm(g: nl.Graph, name: str, x: object, d: int) -> nl.flows.Read:
    return g.level(
        name,
        state=nl.module(NORM, normalized_shape=d),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.identity(),
        group="norms",
        doc="RMSNorm",
    )(x)


def _as_list(x: object) -> object:
    # meta must survive JSON/YAML unchanged: tuples become lists there.
    return list(x) if isinstance(x, tuple) else x


@register("cms", "block")
def cms(
    d: int = 64,
    chunks: Sequence[int] | int = (16, 64, 256),
    lrs: float | Sequence[float] = 1e-3,
    hidden: int | None = None,
    variant: str = "sequential",
    residual: bool = False,
    reset: str = "sequence",
    activation: str = "silu",
    meta: str = "exact",
    signal: str = "exact",
) -> nl.Graph:
    """Continuum Memory System: MLP blocks, each updated every C_l tokens (Eqs. 70–74).

    Block ``l`` changes only at every ``C_l``-th token, by the outer loss's gradient summed
    over its chunk (evaluated at the chunk-start state; gradient accumulation, Eq. 71):
    ``theta_l <- theta_l - eta_l sum_{t in chunk} ∇_theta_l L_t``. Variants (PAPER.md 5.2):
    ``sequential`` ``y = MLP_k(...MLP_1(x))`` with every initial state meta-learned by the outer
    loop (Eq. 73; Hope's, Eq. 97); ``nested``, the same chain with block ``l`` re-initialised,
    from a state block ``l+1`` meta-learns, whenever block ``l+1``'s chunk ends (Eq. 72);
    ``independent`` ``y = sum_l a_l MLP_l(x)`` with learned ``a_l`` (Eq. 74).

    Args:
        d: width ``[B, T, d]``; hidden: each MLP's width (default ``4 d``).
        chunks: ``C_l`` in tokens, fastest first (the paper reports none; 16/64/256 [I]).
        lrs: per-level inner learning rates ``eta_l`` (one, or one per level; not reported).
        residual: ``MLP(z) = z + ...`` inside each block (unspecified; Eq. 70 has none).
        reset: ``"sequence"`` or ``"never"`` (continual learning; PAPER.md 5.6 leaves it open);
            the nested variant resets fast blocks with their parent.
        meta: ``"exact"`` (default): the outer gradient flows through every in-sequence
            update; ``"first_order"``: each update is a constant increment to it (``stop_grad``
            on each block's own recurrence; first-order MAML): the same forward, each block's
            initial parameters learn from every piece's gradient, the inner gradients are taken
            without a graph.
        signal: ``"exact"`` (default): each block's chunk gradient is backpropagated through
            the piece of the sequence between two ticks (one sequential pass per tick);
            ``"teach"``: from the error at the block's output in one first pass with every block
            fixed (PAPER.md 5.1's teach signal; an approximation that makes periods of 1 or 4
            tokens affordable; ``nl.outer(signal="teach")``).
    """
    chunks = (chunks,) if isinstance(chunks, int) else tuple(chunks)  # one level: an int
    lrs = tuple(lrs) if isinstance(lrs, Sequence) else (lrs,) * len(chunks)
    if variant not in ("sequential", "nested", "independent"):
        raise nl.SpecError(
            f"cms: variant={variant!r}; expected 'sequential', 'nested' or 'independent'"
        )
    if not chunks or list(chunks) != sorted(set(chunks)):
        raise nl.SpecError(f"cms: chunks={chunks!r} must be increasing (fastest level first)")
    if len(lrs) != len(chunks):
        raise nl.SpecError(f"cms: {len(lrs)} learning rates for {len(chunks)} levels")
    if reset not in ("sequence", "never"):
        raise nl.SpecError(f"cms: reset={reset!r}; expected 'sequence' or 'never'")
    check_meta("cms", meta)
    if signal not in ("exact", "teach"):
        raise nl.SpecError(f"cms: signal={signal!r}; expected 'exact' or 'teach'")
    g = nl.Graph(
        "cms",
        doc=cms.__doc__ or "",
        variant=variant,
        chunks=list(chunks),
        lrs=list(lrs),
        residual=residual,
        reset=reset,
        meta_gradients=meta,
        signal=signal,
    )
    x = g.input("x", dim=d)
    policy = nl.reset_per_sequence() if reset == "sequence" else nl.reset_never()
    names = [f"mlp{i}" for i in range(len(chunks))]
    for i, (c, lr) in enumerate(zip(chunks, lrs, strict=True)):
        parent = names[i + 1] if variant == "nested" and i + 1 < len(names) else None
        g.level(
            names[i],
            state=nl.mlp(d, d, width=hidden or 4 * d, activation=activation, residual=residual),
            frequency=nl.every(c, "token"),
            objective=nl.outer(signal="teach" if signal == "teach" else None),
            optimizer=nl.gd(lr=lr),
            chunk=c,
            init=nl.meta(parent),
            reset=nl.reset_with(parent) if parent else policy,
            group="cms",
            doc=f"MLP updated every {c} tokens with its accumulated gradient",
        )
        if meta == "first_order":
            g.differentiate(names[i], names[i], nl.stop_grad())
    if variant == "independent":
        terms = []
        for i, n in enumerate(names):
            g.level(
                f"a{i}",
                state=nl.tensor(1),
                frequency=nl.per_step(),
                objective=nl.outer(),
                init=nl.identity(),
                group="cms.agg",
                doc="aggregation weight",
            )
            terms.append(nl.state(f"a{i}", at="prev") * g.handle(n)(x))
        y = sum(terms[1:], terms[0])
    else:
        y = x
        for n in names:
            y = g.handle(n)(y)
    g.output("y", y)
    return g


def _mlp(d: int, hidden: int) -> nl.Graph:
    """A Transformer's MLP: CMS with one level trained by the outer optimizer (PAPER.md 5.1)."""
    g = nl.Graph("mlp", doc="feed-forward block")
    x = g.input("x", dim=d)
    mlp = g.level(
        "mlp",
        state=nl.mlp(d, d, width=hidden),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.normal(),
        doc="MLP, frequency 0 at test time",
    )
    g.output("y", mlp(x))
    return g


def _block(
    name: str, doc: str, d: int, mixer: tuple[str, nl.Graph], ffn: tuple[str, nl.Graph]
) -> nl.Graph:
    """``h = x + W_o mixer(norm(x))``; ``y = h + ffn(norm(h))``."""
    g = nl.Graph(name, doc=doc)
    x = g.input("x", dim=d)
    out = g.include(mixer[1], mixer[0], bind={"x": _norm(g, "norm_mix", x, d)})["y"]
    (o,) = projections(g, out, d, d, ("W_o",))
    h = g.let("h", x + o)
    out = g.include(ffn[1], ffn[0], bind={"x": _norm(g, "norm_ffn", h, d)})["y"]
    g.output("y", h + out)
    return g


@register("hope_block", "block")
def hope_block(
    d: int = 64,
    heads: int = 1,
    width: int | None = None,
    chunk: int = 16,
    chunk_mem: int = 64,
    hidden: int | None = None,
    cms_chunks: Sequence[int] = (16, 64, 256),
    cms_lrs: float | Sequence[float] = 1e-3,
    cms_variant: str = "sequential",
    adaptive_q: bool = False,
    momentum: float = 0.9,
    meta: str = "exact",
    cms_signal: str = "exact",
) -> nl.Graph:
    """Hope block: self-modifying Titans, then a CMS, both pre-norm residual (Eqs. 94–97).

    ``h = x + W_o SMT(norm(x))`` (the small memory with an expressive rule, PAPER.md 4);
    ``y = h + CMS(norm(h))`` (the large memory with a simple rule, PAPER.md 5). The keyword
    arguments are those of ``self_modifying_titans`` and ``cms`` (``cms_*``, ``hidden``);
    ``meta`` ("exact" or "first_order") applies to both.
    """
    smt = self_modifying_titans(
        d=d,
        heads=heads,
        width=width,
        chunk=chunk,
        chunk_mem=chunk_mem,
        adaptive_q=adaptive_q,
        momentum=momentum,
        meta=meta,
    )
    mem = cms(d=d, chunks=cms_chunks, lrs=cms_lrs, hidden=hidden, variant=cms_variant, meta=meta,
              signal=cms_signal)  # fmt: skip
    g = _block("hope_block", hope_block.__doc__ or "", d, ("titans", smt), ("cms", mem))
    g.meta.update(titans=smt.meta, cms=mem.meta)
    return g


def _sizes(model: str, preset: str, given: dict[str, Any]) -> dict[str, Any]:
    if preset not in PRESETS:
        raise nl.SpecError(f"{model}: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}


def _lm(
    name: str, doc: str, s: dict[str, Any], block: Callable[[], nl.Graph], **meta: Any
) -> nl.Graph:
    """Embedding, ``n_layers`` blocks, final norm, LM head: ``tokens -> logits``."""
    g = nl.Graph(name, doc=doc, **{k: _as_list(v) for k, v in {**s, **meta}.items()})
    tokens = g.input("tokens", kind="tokens")
    embed = g.level(
        "embed",
        state=nl.module("torch.nn:Embedding", num_embeddings=s["vocab"], embedding_dim=s["d"]),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.normal(),
        doc="token embeddings",
    )
    h: object = embed(tokens)
    for i in range(s["n_layers"]):
        # the residual stream after block i, one named node however often it is read
        h = g.let(f"h{i}", g.include(block(), f"block{i}", bind={"x": h})["y"])
    head = g.level(
        "lm_head",
        state=nl.linear(s["d"], s["vocab"]),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.normal(),
        doc="untied LM head",
    )
    g.output("logits", head(_norm(g, "norm_f", h, s["d"])))
    return g


@register("hope", "model")
def hope(
    preset: str = "tiny",
    vocab: int | None = None,
    d: int | None = None,
    n_layers: int | None = None,
    heads: int | None = None,
    hidden: int | None = None,
    width: int | None = None,
    chunk: int | None = None,
    chunk_mem: int | None = None,
    cms_chunks: Sequence[int] | None = None,
    cms_lrs: float | Sequence[float] = 1e-3,
    cms_variant: str = "sequential",
    adaptive_q: bool = False,
    momentum: float = 0.9,
    meta: str = "exact",
    cms_signal: str = "exact",
) -> nl.Graph:
    """Hope: a language model of Hope blocks, self-modifying Titans + CMS (Eqs. 94–97).

    ``h_0 = E[tokens]``; ``h_l = hope_block(h_{l-1})`` for ``n_layers`` blocks;
    ``logits = W_head norm(h_L)``. ``preset`` gives the sizes ("tiny", the default: d=64,
    2 layers, 2 heads; "small": d=768, 12 layers, 12 heads); a size passed explicitly wins.
    ``meta="first_order"`` makes every in-sequence write a constant to the outer gradient
    (see ``self_modifying_titans`` and ``cms``); the default ``"exact"`` differentiates
    through them. ``cms_signal="teach"``: the CMS blocks' chunk gradients from the teach signal
    (see ``cms``).
    """
    check_meta("hope", meta)
    s = _sizes("hope", preset, dict(vocab=vocab, d=d, n_layers=n_layers, heads=heads,
                                    hidden=hidden, width=width, chunk=chunk,
                                    chunk_mem=chunk_mem, cms_chunks=cms_chunks))  # fmt: skip

    def block() -> nl.Graph:
        return hope_block(
            d=s["d"],
            heads=s["heads"],
            width=s["width"],
            chunk=s["chunk"],
            chunk_mem=s["chunk_mem"],
            hidden=s["hidden"],
            cms_chunks=s["cms_chunks"],
            cms_lrs=cms_lrs,
            cms_variant=cms_variant,
            adaptive_q=adaptive_q,
            momentum=momentum,
            meta=meta,
            cms_signal=cms_signal,
        )

    return _lm(
        "hope",
        hope.__doc__ or "",
        s,
        block,
        preset=preset,
        cms_lrs=cms_lrs,
        cms_variant=cms_variant,
        adaptive_q=adaptive_q,
        momentum=momentum,
        meta_gradients=meta,
        cms_signal=cms_signal,
    )


@register("hope_attention", "model")
def hope_attention(
    preset: str = "tiny",
    vocab: int | None = None,
    d: int | None = None,
    n_layers: int | None = None,
    heads: int | None = None,
    hidden: int | None = None,
    cms_chunks: Sequence[int] | None = None,
    cms_lrs: float | Sequence[float] = 1e-3,
    cms_variant: str = "sequential",
    meta: str = "exact",
    cms_signal: str = "exact",
) -> nl.Graph:
    """Hope-Attention: global softmax attention followed by a CMS in each block (Eqs. 62, 70–73).

    Hope with self-modifying Titans replaced by softmax attention (PAPER.md 6.1): against the
    ``transformer`` it isolates the CMS. ``preset``, ``meta`` and ``cms_signal`` as in ``hope``.
    """
    check_meta("hope_attention", meta)
    s = _sizes("hope_attention", preset, dict(vocab=vocab, d=d, n_layers=n_layers, heads=heads,
                                              hidden=hidden, cms_chunks=cms_chunks))  # fmt: skip

    def block() -> nl.Graph:
        attn = softmax_attention(d=s["d"], heads=s["heads"])
        mem = cms(
            d=s["d"], chunks=s["cms_chunks"], lrs=cms_lrs, hidden=s["hidden"],
            variant=cms_variant, meta=meta, signal=cms_signal,
        )  # fmt: skip
        return _block("hope_attention_block", "", s["d"], ("attn", attn), ("cms", mem))

    return _lm(
        "hope_attention",
        hope_attention.__doc__ or "",
        s,
        block,
        preset=preset,
        cms_lrs=cms_lrs,
        cms_variant=cms_variant,
        meta_gradients=meta,
        cms_signal=cms_signal,
    )


@register("transformer", "model")
def transformer(
    preset: str = "tiny",
    vocab: int | None = None,
    d: int | None = None,
    n_layers: int | None = None,
    heads: int | None = None,
    hidden: int | None = None,
) -> nl.Graph:
    """Transformer: softmax attention and an MLP per block, frequencies ∞ and 0 (Eqs. 21, 62).

    In NL terms (PAPER.md 1.4 item 5): attention is a non-parametric memory of the context,
    the MLP a CMS of one level that only pre-training updates. ``preset`` as in ``hope``.
    """
    s = _sizes("transformer", preset, dict(vocab=vocab, d=d, n_layers=n_layers, heads=heads,
                                           hidden=hidden))  # fmt: skip

    def block() -> nl.Graph:
        attn = softmax_attention(d=s["d"], heads=s["heads"])
        return _block(
            "transformer_block", "", s["d"], ("attn", attn), ("mlp", _mlp(s["d"], s["hidden"]))
        )

    return _lm("transformer", transformer.__doc__ or "", s, block, preset=preset)


@register("titans_lm", "model")
def titans_lm(
    preset: str = "tiny",
    vocab: int | None = None,
    d: int | None = None,
    n_layers: int | None = None,
    heads: int | None = None,
    hidden: int | None = None,
    chunk: int | None = None,
) -> nl.Graph:
    """Titans LM: Titans' deep memory and an MLP in each block (PAPER.md 4.1, Eq. 28).

    The deep memory, meta-learned initial state, is the block's mixer; ``chunk`` is its
    chunk-parallel training chunk. ``preset`` as in ``hope``.
    """
    s = _sizes("titans_lm", preset, dict(vocab=vocab, d=d, n_layers=n_layers, heads=heads,
                                         hidden=hidden, chunk=chunk))  # fmt: skip

    def block() -> nl.Graph:
        mem = titans(d=s["d"], heads=s["heads"], chunk=s["chunk"])
        return _block(
            "titans_block", "", s["d"], ("titans", mem), ("mlp", _mlp(s["d"], s["hidden"]))
        )

    return _lm("titans_lm", titans_lm.__doc__ or "", s, block, preset=preset)
