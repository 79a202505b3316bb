"""Fast state carried across calls, as a stream at test time: under ``torch.no_grad()`` nothing
returned keeps an autograd graph (a long stream must not grow), and a detached state (saved,
loaded, moved) continues a model with CMS blocks exactly as the carried one does."""

from __future__ import annotations

import torch

from nlgraph.compiler import compile
from nlgraph.compiler.lowerings._state import detach_state
from nlgraph.library import get
from nlgraph.train.trainer import next_token_loss


def graphs(x, path=""):
    """Paths of the tensors in ``x`` that hold an autograd graph."""
    if torch.is_tensor(x):
        return [path] if x.grad_fn is not None else []
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in graphs(v, f"{path}/{k}")]
    if isinstance(x, list | tuple):
        return [p for i, v in enumerate(x) for p in graphs(v, f"{path}[{i}]")]
    return []


def hope():
    torch.manual_seed(0)
    g = get("hope", d=8, heads=2, vocab=11, n_layers=2, chunk=2, chunk_mem=4, cms_chunks=(2, 4))
    return compile(g, dtype=torch.float64)


def test_a_stream_under_no_grad_returns_no_graph():
    learner = hope()
    tokens = torch.randint(11, (2, 24), generator=torch.Generator().manual_seed(1))
    state = None
    with torch.no_grad():
        for s in range(0, 24, 8):
            seg = tokens[:, s : s + 8]
            out, state = learner({"tokens": seg}, state, loss_fn=next_token_loss(seg))
            assert not graphs(out) and not graphs(state), (graphs(out), graphs(state))
    assert any(state[n]["updates"] > 0 for n in state if ".cms." in n)  # the blocks learned


def test_a_detached_state_continues_like_the_carried_one():
    learner = hope()
    tokens = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(2))
    first, rest = tokens[:, :8], tokens[:, 8:]
    _, state = learner({"tokens": first}, None, loss_fn=next_token_loss(first))
    assert graphs(state)  # with gradients on, the carried state is part of the graph
    carried, st_c = learner({"tokens": rest}, state, loss_fn=next_token_loss(rest))
    loaded, st_l = learner({"tokens": rest}, detach_state(state), loss_fn=next_token_loss(rest))
    torch.testing.assert_close(loaded["logits"], carried["logits"], rtol=1e-12, atol=1e-12)
    for name in st_c:
        if ".cms." in name:
            for a, b in zip(st_l[name]["theta"], st_c[name]["theta"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
