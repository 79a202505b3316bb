"""The public fast-state API of a compiled learner: detach_state, state_to, save_state and
load_state continue a stream exactly, and a state from another spec is refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from nlgraph._errors import CompileError
from nlgraph.compiler import compile
from nlgraph.compiler.verify import flatten
from nlgraph.library import get
from nlgraph.train.trainer import next_token_loss

SIZES = dict(d=8, heads=2, vocab=11, n_layers=1, chunk=2, chunk_mem=4, cms_chunks=(2, 4))


def hope(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return compile(get("hope", **{**SIZES, **kw}), dtype=dtype)


def leaves(x):
    return [v for _, v in flatten(x)]


def first_half(learner, tokens):
    seg = tokens[:, :6]
    return learner({"tokens": seg}, None, loss_fn=next_token_loss(seg))


def second_half(learner, tokens, state):
    seg = tokens[:, 6:]
    return learner({"tokens": seg}, state, loss_fn=next_token_loss(seg))


@pytest.fixture
def tokens():
    return torch.randint(11, (2, 13), generator=torch.Generator().manual_seed(4))


def test_detach_state_drops_the_graph_and_keeps_values(tokens):
    learner = hope()
    _, state = first_half(learner, tokens)
    cut = learner.detach_state(state)
    assert any(torch.is_tensor(x) and x.grad_fn is not None for x in leaves(state))
    assert not any(torch.is_tensor(x) and x.requires_grad for x in leaves(cut))
    for a, b in zip(leaves(state), leaves(cut), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_state_to_casts_floats_and_keeps_ints(tokens):
    learner = hope()
    with torch.no_grad():
        _, state = first_half(learner, tokens)
    half = learner.state_to(state, dtype=torch.float32)
    for a, b in zip(leaves(state), leaves(half), strict=True):
        if torch.is_tensor(a):
            assert b.dtype == (torch.float32 if a.is_floating_point() else a.dtype)
        else:
            assert type(a) is type(b) and a == b  # phases, counts: ints stay ints
    assert any(isinstance(x, int) for x in leaves(half))


def test_a_saved_and_loaded_state_continues_exactly(tokens, tmp_path):
    learner = hope()
    _, state = first_half(learner, tokens)
    carried, _ = second_half(learner, tokens, state)
    path = learner.save_state(state, tmp_path / "fast.pt")
    again = hope()  # a fresh learner from the same spec (same seed: same parameters)
    loaded = again.load_state(path)
    resumed, _ = second_half(again, tokens, loaded)
    torch.testing.assert_close(resumed["logits"], carried["logits"], rtol=0, atol=0)
    # and it matters: from the initial state the second half reads otherwise
    fresh, _ = second_half(again, tokens, None)
    assert (fresh["logits"] - carried["logits"]).abs().max() > 1e-6


def test_load_state_moves_to_the_learners_dtype(tokens, tmp_path):
    learner = hope()
    with torch.no_grad():
        _, state = first_half(learner, tokens)
    path = learner.save_state(state, tmp_path / "fast.pt")
    other = hope(dtype=torch.float32)
    loaded = other.load_state(path)
    floats = [x for x in leaves(loaded) if torch.is_tensor(x) and x.is_floating_point()]
    assert floats and all(x.dtype == torch.float32 for x in floats)
    with torch.no_grad():
        second_half(other, tokens, loaded)  # it runs


def test_the_file_is_weights_only(tokens, tmp_path):
    learner = hope()
    _, state = first_half(learner, tokens)
    path = learner.save_state(state, tmp_path / "fast.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "nlgraph-fast-state" and payload["spec"]["name"] == "hope"


@pytest.mark.parametrize(
    "other, needle",
    [
        (dict(d=16), "with widths|not of this learner"),
        (dict(n_layers=2), "not of this learner's graph"),
    ],
)
def test_a_state_of_another_spec_is_refused_in_one_line(tokens, tmp_path, other, needle):
    learner = hope()
    with torch.no_grad():
        _, state = first_half(learner, tokens)
    path = learner.save_state(state, tmp_path / "fast.pt")
    with pytest.raises(CompileError, match=needle) as err:
        hope(**other).load_state(path)
    assert "\n" not in str(err.value) and "same spec" in str(err.value)


def test_files_that_are_not_a_fast_state_are_refused(tmp_path):
    learner = hope()
    with pytest.raises(CompileError, match="no fast state at"):
        learner.load_state(tmp_path / "missing.pt")
    torch.save({"format": "something"}, tmp_path / "other.pt")
    with pytest.raises(CompileError, match="is not a fast state"):
        learner.load_state(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CompileError, match="cannot read fast state"):
        learner.load_state(tmp_path / "junk.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = {"format": "nlgraph-fast-state", "x": Evil()}
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(CompileError, match="cannot read fast state"):
        learner.load_state(tmp_path / "evil.pt")
