"""A state read says when it reads: ``nl.state(level)`` has no default ``at=``.

A sign-of-momentum rule that reads the momentum as the tick starts and one that reads it after
its update are both valid graphs; with a default the one the user did not mean was built
without a word (docs/notes.md, "A state read names its time").
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nlgraph as nl
from nlgraph.library import builder, entries
from nlgraph.optim import compile_optimizer


def signum(at: str | None, lr: float = 0.1, beta: float = 0.5) -> nl.Graph:
    g = nl.Graph("signum")
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(-lr * nl.state("m", at=at).sign()))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), objective=nl.l2_to(nl.grad_of("w")),
            optimizer=nl.ema(beta))  # fmt: skip
    return g


@pytest.mark.parametrize("read", ["nl.state", "handle.state"])
def test_a_state_read_without_at_is_one_line_naming_the_read(read):
    g = nl.Graph("g")
    h = g.level("mom", state=nl.tensor(2), frequency=nl.per_step())
    with pytest.raises(nl.SpecError) as err:
        nl.state("mom") if read == "nl.state" else h.state()
    msg = str(err.value)
    assert "'mom'" in msg and "at='new'" in msg and "at='prev'" in msg
    assert "\n" not in msg


def test_a_bad_at_is_a_spec_error_naming_the_field():
    with pytest.raises(nl.SpecError, match="at: Input should be 'prev' or 'new'"):
        nl.state("m", at="old")


def test_the_two_readings_are_different_optimizers():
    """The trap itself: both timings build, validate and step, and they step differently."""
    out = {}
    for at in ("prev", "new"):
        opt_cls = compile_optimizer(lambda at=at: signum(at), defaults={})
        w = torch.zeros(2, requires_grad=True)
        opt = opt_cls([w])
        for g in ([1.0, -1.0], [-3.0, 1.0]):
            w.grad = torch.tensor(g)
            opt.step()
        out[at] = w.detach().clone()
    # m1 = (0.5, -0.5), m2 = (-1.25, 0.25). new: w -= 0.1 sign(m1), then sign(m2): back to 0.
    # prev: sign(m0) = 0 moves nothing, then sign(m1)
    assert torch.equal(out["new"], torch.tensor([0.0, 0.0]))
    assert torch.equal(out["prev"], torch.tensor([-0.1, 0.1]))


def test_a_file_keeps_the_timing_it_was_written_with():
    for at in ("prev", "new"):
        assert nl.from_yaml(signum(at).to_yaml()).spec == signum(at).spec


def test_every_library_optimizer_builds_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for entry in entries("optimizer"):
            builder(entry.name)().validate()
