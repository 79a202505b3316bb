"""bfloat16: every library model under ``torch.autocast`` and after ``.to(torch.bfloat16)``.

Fast memories keep their recurrence in the state's dtype under autocast (float32 parameters:
accumulations and triangular solves in float32), and the chunk kernels solve their small
triangular systems in float32 whatever the dtype. The logits and the gradient of every
parameter agree with float32 to a relative error (norm of the difference over the norm) of
``TOLERANCE``, and the same parameters get a gradient.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from nlgraph.compiler import compile
from nlgraph.library import builder, entries, get
from nlgraph.train.trainer import next_token_loss

torch.set_num_threads(1)
MODELS = [e.name for e in entries("model")]
# bfloat16 keeps 8 bits of mantissa (unit roundoff 3.9e-3); the largest relative error seen over
# the library's 1-layer models, logits or gradients, autocast or .to(): 4.7e-3.
TOLERANCE = 2e-2


def learner(name, **options):
    params = inspect.signature(builder(name)).parameters
    small = {k: v for k, v in dict(n_layers=1, vocab=64).items() if k in params}
    torch.manual_seed(0)
    return compile(get(name, **small, **options))


def run(model, tokens):
    """Logits, loss, and the gradient of every parameter that gets one (float32, by name)."""
    out, _ = model({"tokens": tokens}, loss_fn=next_token_loss(tokens))
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    return out["logits"].detach().float(), out["loss"].detach().float(), grads


def close(a, b):
    return ((a - b).norm() / b.norm()).item() < TOLERANCE


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["autocast", "to"])
def test_bfloat16_matches_float32(name, mode):
    model = learner(name)
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    logits, loss, grads = run(model, tokens)
    low = copy.deepcopy(model)
    if mode == "autocast":
        with torch.autocast("cpu", torch.bfloat16):
            got = run(low, tokens)
    else:
        low = low.to(torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in low.parameters())
        got = run(low, tokens)
    assert close(got[0], logits) and close(got[1], loss)
    assert got[2].keys() == grads.keys()
    everything = torch.cat([g.flatten() for g in grads.values()])
    assert close(torch.cat([got[2][n].flatten() for n in grads]), everything)


@pytest.mark.parametrize("options", [dict(meta="first_order"), dict(cms_signal="teach")])
def test_hope_variants_under_autocast(options):
    model = learner("hope", **options)
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    want = run(model, tokens)
    with torch.autocast("cpu", torch.bfloat16):
        got = run(copy.deepcopy(model), tokens)
    assert close(got[0], want[0]) and got[2].keys() == want[2].keys()
