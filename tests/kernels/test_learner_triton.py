"""A whole learner on the Triton backend: every op with a Triton kernel runs it (through the
interpreter here), the others their chunked form; results equal the chunked learner's."""

import pytest
import torch
from torch.nn import functional as F

import nlgraph.kernels.deep_memory  # noqa: F401 - registers its backends
import nlgraph.kernels.momentum_memory  # noqa: F401
from nlgraph.compiler import compile
from nlgraph.kernels import _dispatch
from nlgraph.library import get

pytest.importorskip("triton", reason="the kernels need triton (the triton extra)")


def _step(learner, tokens):
    def loss_fn(out, s, e):
        tgt = tokens[:, s + 1 : e + 1]
        logits = out["logits"][:, : tgt.shape[1]]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    out, _ = learner({"tokens": tokens}, None, loss_fn=loss_fn)
    out["loss"].backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in learner.parameters()]
    return out["logits"], grads


def test_for_op_falls_back_to_chunk_without_a_kernel():
    assert _dispatch.for_op("momentum_memory", "triton") == "triton"
    assert _dispatch.for_op("attention", "triton") == "chunk"
    assert _dispatch.for_op("deep_memory", "auto") == "auto"


def _triton_equals_chunk(monkeypatch, spec, op, T):
    """Compile ``spec`` on the chunk and the Triton backends with the same weights, run one
    training step of each on T tokens: the Triton learner reaches ``op``'s kernel, and logits
    and every parameter gradient agree. Returns the parameter names and the chunk gradients."""
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    torch.manual_seed(0)
    chunk = compile(spec, backend="chunk")
    triton = compile(spec, backend="triton")
    triton.load_state_dict(chunk.state_dict())
    tokens = torch.randint(0, chunk.slow["embed"].num_embeddings, (2, T))
    calls = []
    kernel = _dispatch._REGISTRY[op]["triton"]
    monkeypatch.setitem(
        _dispatch._REGISTRY[op], "triton",
        (lambda *a, **k: calls.append(1) or kernel[0](*a, **k), kernel[1]),
    )  # fmt: skip
    logits_c, grads_c = _step(chunk, tokens)
    logits_t, grads_t = _step(triton, tokens)
    assert calls, f"the Triton learner never reached the {op} kernel"
    torch.testing.assert_close(logits_t, logits_c, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in chunk.named_parameters()]
    for n, gt, gc in zip(names, grads_t, grads_c, strict=True):
        torch.testing.assert_close(gt, gc, rtol=1e-4, atol=1e-5, msg=n)
    return names, grads_c


def test_hope_on_triton_equals_chunk(monkeypatch):
    # long enough (T > chunk_mem) that every memory of the cluster reaches the outputs
    spec = get("hope", d=16, n_layers=1, heads=2, hidden=32, chunk=4, chunk_mem=8,
               cms_chunks=(4, 8))  # fmt: skip
    _, grads_c = _triton_equals_chunk(monkeypatch, spec, "momentum_memory", T=13)
    assert all(g.abs().sum() > 0 for g in grads_c[:3])


def test_titans_on_triton_equals_chunk(monkeypatch):
    """A Titans LM on the Triton backend runs its deep memory through the deep-memory kernel
    (depth 2, momentum and forgetting, T not a multiple of the chunk) and equals the chunked
    learner: logits and every parameter gradient, the meta-learned initial state included."""
    spec = get("titans_lm", d=16, n_layers=1, heads=2, hidden=32, chunk=4)
    names, grads_c = _triton_equals_chunk(monkeypatch, spec, "deep_memory", T=11)
    assert all(g.abs().sum() > 0 for n, g in zip(names, grads_c, strict=True) if "titans" in n)
