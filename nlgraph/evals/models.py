"""The suites' models, by library name: whole models (``transformer``, ``titans_lm``, ``hope``,
``hope_attention``) at the ``tiny`` preset, or a sequence memory (``linear_attention``,
``deltanet``, ...) wrapped into a language model with the same blocks as the Transformer.

Sizes each suite passes (chunk lengths sized to its sequences) reach a builder only when its
signature takes them, so one override table serves every model.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import nlgraph as nl
from nlgraph.evals.errors import EvalConfigError

__all__ = ["DEFAULT_MODELS", "LABELS", "model_names", "build_graph", "build", "memory_lm"]

DEFAULT_MODELS = ("linear_attention", "transformer", "titans_lm", "hope")
# names in the paper's tables
LABELS = {
    "linear_attention": "Linear attention",
    "deltanet": "DeltaNet",
    "transformer": "Transformer",
    "titans_lm": "Titans",
    "hope": "Hope",
    "hope_attention": "Hope-Attention",
}
# a wrapped memory gets the tiny preset's block sizes
MEMORY_LM_SIZES = dict(d=64, n_layers=2, heads=2, hidden=256)


def model_names() -> list[str]:
    """Every name :func:`build_graph` accepts: library models and sequence memories."""
    from nlgraph import library

    return library.names("model") + library.names("memory")


def _rms(g: nl.Graph, name: str, x: object, d: int) -> Any:
    return g.level(
        name,
        state=nl.module("torch.nn:RMSNorm", normalized_shape=d),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.identity(),
        group="norms",
    )(x)


def memory_lm(
    memory: str,
    *,
    vocab: int,
    d: int = 64,
    n_layers: int = 2,
    heads: int = 2,
    hidden: int = 256,
    **memory_kwargs: Any,
) -> nl.Graph:
    """``tokens -> logits`` around the library memory ``memory``: embedding, ``n_layers``
    pre-norm residual blocks ``h += W_o mem(norm(h))``, ``h += MLP(norm(h))``, norm, head."""
    from nlgraph import library

    g = nl.Graph(f"{memory}_lm", doc=memory_lm.__doc__ or "", memory=memory)
    tokens = g.input("tokens", kind="tokens")
    h: Any = g.level(
        "embed",
        state=nl.module("torch.nn:Embedding", num_embeddings=vocab, embedding_dim=d),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.normal(),
    )(tokens)
    for i in range(n_layers):
        mem = library.get(memory, d=d, heads=heads, **memory_kwargs)
        y = g.include(mem, f"mix{i}", bind={"x": _rms(g, f"norm_mix{i}", h, d)})["y"]
        o = g.level(
            f"W_o{i}",
            state=nl.linear(d, d),
            frequency=nl.per_step(),
            objective=nl.outer(),
            init=nl.normal(),
        )(y)
        h = g.let(f"a{i}", h + o)
        mlp = g.level(
            f"mlp{i}",
            state=nl.mlp(d, d, width=hidden),
            frequency=nl.per_step(),
            objective=nl.outer(),
            init=nl.normal(),
        )
        h = g.let(f"h{i}", h + mlp(_rms(g, f"norm_ffn{i}", h, d)))
    head = g.level(
        "lm_head",
        state=nl.linear(d, vocab),
        frequency=nl.per_step(),
        objective=nl.outer(),
        init=nl.normal(),
    )
    g.output("logits", head(_rms(g, "norm_f", h, d)))
    return g


def _accepted(builder: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(builder).parameters
    return {k: v for k, v in sizes.items() if k in params}


def build_graph(name: str, vocab: int, sizes: dict[str, Any] | None = None) -> nl.Graph:
    """The graph of model ``name`` with ``vocab`` logits; ``sizes`` it does not take are
    dropped (e.g. ``cms_chunks`` for the Transformer). A dict under a model's name holds
    sizes for that model only (``{"chunk": 8, "titans_lm": {"chunk": 4}}``)."""
    from nlgraph import library

    sizes = dict(sizes or {})
    sizes = {k: v for k, v in sizes.items() if not isinstance(v, dict)} | sizes.get(name, {})
    if name in library.names("model"):
        builder = library.builder(name)
        return library.get(name, **_accepted(builder, {"preset": "tiny", **sizes}), vocab=vocab)
    if name in library.names("memory"):
        outer = {k: sizes.pop(k) for k in list(sizes) if k in ("d", "n_layers", "heads", "hidden")}
        inner = _accepted(library.builder(name), sizes)
        inner.pop("d", None), inner.pop("heads", None)
        return memory_lm(name, vocab=vocab, **{**MEMORY_LM_SIZES, **outer}, **inner)
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise EvalConfigError(
        f"unknown model {name!r}{hint} (expected a library model or memory: "
        f"{', '.join(model_names())})"
    )


def build(name: str, vocab: int, sizes: dict[str, Any] | None = None, seed: int = 0):
    """Compile :func:`build_graph` with parameters drawn from ``seed``."""
    import torch

    from nlgraph.compiler import compile

    graph = build_graph(name, vocab, sizes)
    torch.manual_seed(seed)
    return compile(graph)
