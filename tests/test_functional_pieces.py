"""Pieces of sequences with CMS blocks as one function (program, loss, inner gradient by
torch.func): equal to the eager pieces, in and out of grad mode, and under torch.compile with
fullgraph=True — a Hope training step with every write on and meta-gradients through them."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from nlgraph.compiler import compile
from nlgraph.library import get
from nlgraph.train.trainer import next_token_loss


def _spec():
    return get("hope", d=16, n_layers=1, heads=2, hidden=32, chunk=4, chunk_mem=8,
               cms_chunks=(4, 8))  # fmt: skip


def _step(learner, tokens, grad=True):
    learner.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out, state = learner({"tokens": tokens}, None, loss_fn=next_token_loss(tokens))
    if grad:
        out["loss"].backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in learner.parameters()]
    return out["logits"].detach(), out["loss"].detach(), grads, state


def test_functional_pieces_equal_eager_pieces():
    torch.manual_seed(0)
    eager = compile(_spec(), dtype=torch.float64)
    func = compile(_spec(), dtype=torch.float64)
    func.load_state_dict(eager.state_dict())
    func.functional_pieces = True
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    a, b = _step(eager, tokens), _step(func, tokens)
    # float64: the same inner gradient, taken by autograd.grad on aliases or by torch.func
    torch.testing.assert_close(b[0], a[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b[1], a[1], rtol=1e-12, atol=1e-12)
    assert sum(g.abs().sum() for g in a[2]) > 0
    for gb, ga in zip(b[2], a[2], strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)
    for name in ("block0.cms.mlp0", "block0.cms.mlp1"):
        for tb, ta in zip(b[3][name]["theta"], a[3][name]["theta"], strict=True):
            torch.testing.assert_close(tb, ta, rtol=1e-12, atol=1e-12)


def test_blocks_learn_the_same_with_and_without_grad_mode():
    """Test-time learning (no grad mode) equals the training forward: every chunk's gradient is
    taken, the first one too, and it is the partial derivative at the piece's parameters (with
    grad mode it must not also follow earlier updates of the other blocks)."""
    torch.manual_seed(0)
    eager = compile(_spec(), dtype=torch.float64)
    func = compile(_spec(), dtype=torch.float64)
    func.load_state_dict(eager.state_dict())
    func.functional_pieces = True
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    with_grad = _step(eager, tokens)
    for learner in (eager, func):
        logits, _, _, state = _step(learner, tokens, grad=False)
        assert not logits.requires_grad
        torch.testing.assert_close(logits, with_grad[0], rtol=1e-12, atol=1e-12)
        theta = state["block0.cms.mlp0"]["theta"][0]
        initial = eager.blocks["block0__cms__mlp0"].net.layers[0].weight
        assert (theta - initial).abs().max() > 0, "the block never learned"


def _compiled_pair(backend, compiler="aot_eager"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = compile(_spec(), backend=backend)
    fast = compile(_spec(), backend=backend,
                   torch_compile={"fullgraph": True, "backend": compiler})  # fmt: skip
    fast.load_state_dict(eager.state_dict())
    return eager, fast


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["chunk", "triton"])
def test_hope_piece_step_compiles_fullgraph(backend):
    """A (small) Hope with every write on — self-modifying memories, CMS blocks taking their
    inner gradient inside the piece — traces as one graph per piece with fullgraph=True (a
    graph break would raise), with the Triton kernels as custom ops for backend="triton"; at
    test time (no outer gradient) it equals eager, and the second sequence recompiles nothing."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the kernels need triton (the triton extra)")
    eager, fast = _compiled_pair(backend)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = _step(eager, tokens, grad=False), _step(fast, tokens, grad=False)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
    for name in ("block0.cms.mlp0", "block0.cms.mlp1"):
        for tb, ta in zip(b[3][name]["theta"], a[3][name]["theta"], strict=True):
            torch.testing.assert_close(tb, ta, rtol=1e-4, atol=1e-6)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _step(fast, tokens, grad=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["chunk", "triton"])
def test_hope_training_step_compiled_backward(backend):
    """The whole training step compiled: forward with the CMS inner gradients inside each piece's
    graph, then the outer backward through the compiled graphs (meta-gradients through every
    write) equals eager. ``aot_eager_decomp_partition`` runs AOTAutograd with the decompositions
    inductor uses, without its code generation: plain ``aot_eager`` hits pytorch/pytorch#120035
    here (its eager ``softplus_backward`` returns a gradient in another memory layout than the
    traced one, and a traced ``view`` of it fails); inductor itself compiles this graph for more
    than 10 minutes on 2 CPU cores. With backend="triton" the kernels run as custom ops (their
    backward the chunk form's VJP) inside the compiled graphs."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the kernels need triton (the triton extra)")
    eager, fast = _compiled_pair(backend, compiler="aot_eager_decomp_partition")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = _step(eager, tokens), _step(fast, tokens)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
    assert sum(g.abs().sum() for g in a[2]) > 0
    for gb, ga in zip(b[2], a[2], strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _step(fast, tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
