"""One row per library definition (memories and models): it validates, compiles, learns a tiny
associative-recall task, round-trips state_dict, and its chunked form matches the reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.library import entries, get

V, D, T = 12, 16, 16  # vocabulary, width, sequence length

MEMORY_ROWS = {
    "linear_attention": {},
    "gated_linear_attention": {},
    "deltanet": {"chunk": 4},
    "gated_deltanet": {"chunk": 4},
    "dgd_memory": {"chunk": 4},
    "titans": {"chunk": 4},
    "softmax_attention": {},
    "sliding_window_attention": {"window": 8},
    "self_modifying_titans": {"chunk": 4, "chunk_mem": 8},
    "cms": {"chunks": (4, 8), "lrs": (0.01, 0.01)},
}
MODEL_ROWS = {
    "transformer": {},
    "titans_lm": {"chunk": 4},
    "hope_attention": {"cms_chunks": (4, 8)},
    "hope": {"chunk": 4, "chunk_mem": 8, "cms_chunks": (4, 8)},
}
SIZES = dict(vocab=V, d=D, n_layers=1, heads=2, hidden=32)


def test_every_memory_and_model_has_a_row():
    names = {e.name for e in entries("memory")} | {e.name for e in entries("model")}
    names |= {e.name for e in entries("block") if e.name == "cms"}
    assert names <= set(MEMORY_ROWS) | set(MODEL_ROWS), names - set(MEMORY_ROWS) - set(MODEL_ROWS)


def recall_model(name: str) -> nl.Graph:
    """tokens -> embedding -> the row's graph -> LM head."""
    if name in MODEL_ROWS:
        kw = dict(SIZES, **MODEL_ROWS[name])
        if name in ("hope", "titans_lm"):
            kw["width"] = D if name == "hope" else None
        return get(name, **{k: v for k, v in kw.items() if v is not None})
    kw = dict(MEMORY_ROWS[name])
    if name != "cms":
        kw["heads"] = 2
    g = nl.Graph(f"recall_{name}")
    tokens = g.input("tokens", kind="tokens")
    embed = g.level("embed", state=nl.module("torch.nn:Embedding", num_embeddings=V,
                    embedding_dim=D), frequency=nl.per_step(), objective=nl.outer())  # fmt: skip
    y = g.include(get(name, d=D, **kw), "mix", bind={"x": embed(tokens)})["y"]
    head = g.level("head", state=nl.linear(D, V), frequency=nl.per_step(), objective=nl.outer(),
                   init=nl.normal())  # fmt: skip
    g.output("logits", head(y))
    return g


def recall_batch(gen: torch.Generator, B: int = 8) -> torch.Tensor:
    """Key-value pairs, then the keys again: the second half is predictable only by recall."""
    keys = torch.stack([torch.randperm(V // 2, generator=gen)[: T // 4] for _ in range(B)])
    vals = torch.randint(V // 2, V, (B, T // 4), generator=gen)
    first = torch.stack([keys, vals], dim=-1).reshape(B, T // 2)
    return torch.cat([first, first], dim=1)


def loss_of(learner, tokens):
    def loss_fn(out, s, e):
        tgt = tokens[:, s + 1 : e + 1]
        logits = out["logits"][:, : tgt.shape[1]]
        return F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="sum")

    out, _ = learner({"tokens": tokens}, None, loss_fn=loss_fn)
    return out["loss"] / (tokens.shape[0] * (tokens.shape[1] - 1))


ROWS = list(MEMORY_ROWS) + list(MODEL_ROWS)


@pytest.mark.parametrize("name", ROWS)
def test_row(name):
    torch.manual_seed(0)
    graph = recall_model(name).validate()
    assert nl.from_json(graph.to_json()) == graph
    learner = compile(graph)
    # learns: the recall loss falls within a fixed budget of outer steps
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    fixed = recall_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = loss_of(learner, fixed).item()
    for _ in range(25):
        opt.zero_grad(set_to_none=True)
        loss_of(learner, recall_batch(gen)).backward()
        opt.step()
    with torch.no_grad():
        after = loss_of(learner, fixed).item()
    assert after < 0.9 * before, (before, after)
    # state_dict round trip
    twin = compile(graph)
    twin.load_state_dict(learner.state_dict())
    probe = recall_batch(torch.Generator().manual_seed(2), B=2)
    with torch.no_grad():
        assert torch.equal(loss_of(twin, probe), loss_of(learner, probe))
    # chunked matches the reference loops (float64)
    learner = learner.double()
    with torch.no_grad():
        learner.backend = "chunk"
        fast = loss_of(learner, probe)
        learner.backend = "reference"
        ref = loss_of(learner, probe)
    assert torch.allclose(fast, ref, rtol=1e-9, atol=0), (fast.item(), ref.item())
