"""Test-wide settings: Triton's CPU interpreter, one thread, float64-friendly determinism."""

import os

# Must be set before any @triton.jit function is defined or launched.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch
    except ImportError:  # the spec layer is tested without torch too
        yield
        return
    torch.set_num_threads(1)
    yield
