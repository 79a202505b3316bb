"""Test-wide settings: Triton's CPU interpreter, one thread, float64-friendly determinism."""

import os
from pathlib import Path

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


@pytest.fixture
def cms_token_loop(monkeypatch):
    """A context manager: inside it, learners cut CMS sequences at every token, the per-token
    loop of Eq. 71 (claim 9.7). A token-local model's chunk-parallel pieces must equal it: its
    blocks' signals do not depend on where the sequence is cut (docs/compiler.md, "What a CMS
    signal differentiates"); the reference backend alone cuts at the same ticks as the chunked
    form."""
    from contextlib import contextmanager

    from nlgraph.compiler.lowerings import boundary

    real, on = boundary.cut_points, [False]

    def cut_points(T, periods, phases, every_token):
        return real(T, periods, phases, every_token or on[0])

    monkeypatch.setattr(boundary, "cut_points", cut_points)

    @contextmanager
    def token_loop():
        on[0] = True
        try:
            yield
        finally:
            on[0] = False

    return token_loop


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """A folder of three small text documents (pieces of nlgraph's trainer source): a corpus
    for training runs in tests."""
    folder = tmp_path_factory.mktemp("docs")
    root = Path(__file__).resolve().parents[1]
    text = (root / "nlgraph" / "train" / "trainer.py").read_text()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(text[i * 3000 : (i + 1) * 3000])
    return folder
