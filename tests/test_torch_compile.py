"""The generated program runs under torch.compile without graph breaks or recompiles."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from nlgraph.compiler import compile
from nlgraph.library import get


def check_compiled_step(graph):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = compile(graph)
    fast = compile(graph, torch_compile={"fullgraph": True, "dynamic": False})
    fast.load_state_dict(eager.state_dict())
    assert "def forward_program" in fast.code and "def layer_program" in fast.code
    assert "self.memories['M'](" in fast.code
    counters = torch._dynamo.utils.counters
    grads = []
    for step in range(3):
        x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(step))
        for learner in (eager, fast):
            learner.zero_grad(set_to_none=True)
            y = learner(x)[0]["y"]
            y.square().sum().backward()
        pairs = zip(eager.parameters(), fast.parameters(), strict=True)
        grads.append(
            [((a.grad - b.grad).abs().max() / a.grad.abs().max()).item() for a, b in pairs]
        )
        torch.testing.assert_close(fast(x)[0]["y"], eager(x)[0]["y"], rtol=1e-4, atol=1e-5)
        if step == 0:
            frames = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == frames, "the second step recompiled"
    assert max(max(g) for g in grads) < 1e-4


def test_compiled_step_linear_memory():
    check_compiled_step(get("deltanet", d=8, heads=2, chunk=4))


@pytest.mark.slow
def test_compiled_step_deep_memory():
    check_compiled_step(get("titans", d=8, heads=2, chunk=4))
