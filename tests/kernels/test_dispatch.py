"""The dispatcher: auto order, forced backends, and Triton only for GPU tensors under auto."""

import pytest
import torch

from nlgraph._errors import BackendUnavailableError
from nlgraph.kernels import _dispatch


@pytest.fixture
def op():
    name = "test_dispatch_op"
    _dispatch.register(name, "reference", lambda: "reference")
    _dispatch.register(name, "chunk", lambda: "chunk")
    _dispatch.register(name, "triton", lambda: "triton")
    yield name
    _dispatch._REGISTRY.pop(name)


def test_auto_takes_triton_only_for_gpu_tensors(op, monkeypatch):
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    assert _dispatch.resolve_backend(op) == "chunk"
    assert _dispatch.resolve_backend(op, "auto", torch.device("cpu")) == "chunk"
    assert _dispatch.resolve_backend(op, "auto", torch.device("cuda", 0)) == "triton"
    assert _dispatch.resolve_backend(op, "auto", "cuda:1") == "triton"
    # asked for by name, triton runs on any device (the interpreter on CPU)
    assert _dispatch.get(op, "triton", torch.device("cpu"))() == "triton"


def test_env_forces_a_backend(op, monkeypatch):
    monkeypatch.setenv("NLGRAPH_BACKEND", "reference")
    assert _dispatch.resolve_backend(op, "chunk") == "reference"


def test_unavailable_backend_is_a_clear_error(op):
    _dispatch.register(op, "triton", lambda: "triton", available=lambda: False)
    with pytest.raises(BackendUnavailableError, match="not available here"):
        _dispatch.resolve_backend(op, "triton")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        _dispatch.resolve_backend(op, "cuda")


def test_eligibility_is_per_op_and_only_for_auto(op, monkeypatch):
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    _dispatch.register(op, "triton", lambda n: "triton", eligible=lambda n: n <= 4)
    gpu = torch.device("cuda", 0)
    assert _dispatch.resolve_backend(op, "auto", gpu, (4,)) == "triton"
    assert _dispatch.resolve_backend(op, "auto", gpu, (5,)) == "chunk"
    assert _dispatch.resolve_backend(op, "auto", gpu) == "triton"  # no inputs: the device decides
    assert _dispatch.resolve_backend(op, "triton", gpu, (5,)) == "triton"  # by name: not asked
    assert _dispatch.call(op, "triton", None, 5) == "triton"
    monkeypatch.setenv("NLGRAPH_BACKEND", "triton")  # forced: not asked either
    assert _dispatch.resolve_backend(op, "auto", gpu, (5,)) == "triton"


def test_env_names_no_backend_is_a_clear_error(op, monkeypatch):
    monkeypatch.setenv("NLGRAPH_BACKEND", "foreach")
    with pytest.raises(BackendUnavailableError, match="NLGRAPH_BACKEND='foreach'.*reference"):
        _dispatch.resolve_backend(op)
