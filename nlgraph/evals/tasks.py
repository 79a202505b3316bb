"""Synthetic recall tasks, generated on the fly from a seed: MQAR, needle-in-a-haystack, and the
key-value segments of the continual-learning stream.

Every generator returns a :class:`Batch`: ``tokens [B, T]`` and ``targets [B, T]``. The model's
logits at position ``t`` are scored against ``targets[:, t]``; ``targets`` is :data:`IGNORE`
wherever nothing is scored. For the recall tasks the target at a scored position is the next
input token (the answer follows its query in the sequence), so a next-token language model is
trained and scored on exactly the answers, and nothing else.

The same ``seed`` (or the same state of a ``torch.Generator``) gives the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nlgraph.evals.errors import EvalConfigError

__all__ = [
    "IGNORE",
    "Batch",
    "as_generator",
    "mqar",
    "niah",
    "niah_layout",
    "kv_mapping",
    "kv_segment",
]

IGNORE = -100  # the target of positions that are not scored (torch's cross-entropy default)


@dataclass(frozen=True)
class Batch:
    """Inputs and scored targets of one batch.

    Attributes:
        tokens: ``[B, T]`` token ids.
        targets: ``[B, T]``; the answer expected from the logits at that position, or
            :data:`IGNORE`.
        masks: extra ``[B, T]`` boolean masks over scored positions (e.g. ``"first"``: a key's
            first occurrence in its segment) or ``[B]`` tensors (e.g. ``"length"``).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scored(self) -> torch.Tensor:
        """``[B, T]`` bool: the positions that are scored."""
        return self.targets != IGNORE


def as_generator(seed: int | torch.Generator) -> torch.Generator:
    """A ``torch.Generator`` from a seed (a generator is used as is and advanced)."""
    if isinstance(seed, torch.Generator):
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise EvalConfigError(f"seed must be an int >= 0 or a torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise EvalConfigError(f"{name} must be a positive int, got {v!r}")


def mqar(
    batch: int,
    *,
    n_pairs: int = 8,
    n_queries: int | None = None,
    vocab: int = 64,
    seed: int | torch.Generator = 0,
) -> Batch:
    """Multi-query associative recall (Zoology's MQAR, as a next-token task).

    Layout, ``T = 2 (n_pairs + n_queries)``::

        k_1 v_1 k_2 v_2 ... k_P v_P | q_1 a_1 q_2 a_2 ... q_Q a_Q

    Keys are distinct ids from ``[0, vocab/2)``, values ids from ``[vocab/2, vocab)`` drawn with
    replacement; the queries ``q_j`` are distinct keys of the context in random order and
    ``a_j`` their values. Scored: each query position ``q_j``, target ``a_j``
    (``n_queries`` positions per sequence). Default ``n_queries = n_pairs``.
    """
    n_queries = n_pairs if n_queries is None else n_queries
    _positive(batch=batch, n_pairs=n_pairs, n_queries=n_queries, vocab=vocab)
    half = vocab // 2
    if n_pairs > half:
        raise EvalConfigError(
            f"mqar: {n_pairs} distinct keys need vocab >= {2 * n_pairs}, got vocab={vocab}"
        )
    if n_queries > n_pairs:
        raise EvalConfigError(f"mqar: n_queries={n_queries} exceeds n_pairs={n_pairs}")
    g = as_generator(seed)
    keys = torch.stack([torch.randperm(half, generator=g)[:n_pairs] for _ in range(batch)])
    vals = torch.randint(half, vocab, (batch, n_pairs), generator=g)
    pick = torch.stack([torch.randperm(n_pairs, generator=g)[:n_queries] for _ in range(batch)])
    qk, qv = keys.gather(1, pick), vals.gather(1, pick)
    context = torch.stack([keys, vals], -1).reshape(batch, 2 * n_pairs)
    queries = torch.stack([qk, qv], -1).reshape(batch, 2 * n_queries)
    tokens = torch.cat([context, queries], 1)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, 2 * n_pairs :: 2] = qv
    return Batch(tokens, targets)


def niah_layout(vocab: int) -> dict[str, tuple[int, int]]:
    """Token ranges of :func:`niah`: ``needle``/``query`` markers, then keys, values, filler."""
    if vocab < 16:
        raise EvalConfigError(f"niah: vocab={vocab} is too small; expected >= 16")
    quarter = (vocab - 2) // 4
    return {
        "needle": (0, 1),
        "query": (1, 2),
        "keys": (2, 2 + quarter),
        "values": (2 + quarter, 2 + 2 * quarter),
        "filler": (2 + 2 * quarter, vocab),
    }


def niah(
    batch: int,
    *,
    length: int = 64,
    n_needles: int = 1,
    vocab: int = 64,
    seed: int | torch.Generator = 0,
) -> Batch:
    """Needle in a haystack: single needle (``n_needles=1``) or multi-key (RULER's S-/MK-NIAH).

    Layout (``T = length``): filler tokens with ``n_needles`` needles ``NEEDLE k_i v_i``
    inserted at random places, then ``QUERY k_j`` at the end for one of the needles::

        f f f NEEDLE k_1 v_1 f f NEEDLE k_2 v_2 f ... f QUERY k_j

    Keys are distinct; values, keys and filler come from disjoint ranges
    (:func:`niah_layout`). Scored: the last position only, target ``v_j``.
    """
    _positive(batch=batch, length=length, n_needles=n_needles, vocab=vocab)
    lay = niah_layout(vocab)
    k0, k1 = lay["keys"]
    v0, v1 = lay["values"]
    f0, f1 = lay["filler"]
    hay = length - 2 - 3 * n_needles
    if hay < 0:
        raise EvalConfigError(
            f"niah: length={length} cannot hold {n_needles} needles of 3 tokens and a 2-token "
            f"query; expected length >= {3 * n_needles + 2}"
        )
    if n_needles > k1 - k0:
        raise EvalConfigError(f"niah: {n_needles} distinct keys need a larger vocab than {vocab}")
    g = as_generator(seed)
    tokens = torch.randint(f0, f1, (batch, length), generator=g)
    targets = torch.full_like(tokens, IGNORE)
    for b in range(batch):
        keys = (k0 + torch.randperm(k1 - k0, generator=g)[:n_needles]).tolist()
        vals = torch.randint(v0, v1, (n_needles,), generator=g).tolist()
        # needle i goes after the at[i]-th filler token; sorted so needles never overlap
        at = sorted(torch.randint(0, hay + 1, (n_needles,), generator=g).tolist())
        filler = tokens[b, :hay].tolist()
        seq: list[int] = []
        for i, (k, v) in enumerate(zip(keys, vals, strict=True)):
            seq += filler[at[i - 1] if i else 0 : at[i]] + [lay["needle"][0], k, v]
        seq += filler[at[-1] :]
        j = int(torch.randint(0, n_needles, (1,), generator=g))
        tokens[b] = torch.tensor(seq + [lay["query"][0], keys[j]])
        targets[b, -1] = vals[j]
    return Batch(tokens, targets)


def kv_mapping(
    n_keys: int = 16, n_values: int = 16, seed: int | torch.Generator = 0
) -> torch.Tensor:
    """A random function from keys ``[0, n_keys)`` to values ``[n_keys, n_keys + n_values)``:
    a ``[n_keys]`` tensor (one task of the continual stream)."""
    _positive(n_keys=n_keys, n_values=n_values)
    return torch.randint(n_keys, n_keys + n_values, (n_keys,), generator=as_generator(seed))


def kv_segment(
    mapping: torch.Tensor, *, n_pairs: int = 16, seed: int | torch.Generator = 0
) -> Batch:
    """One segment of facts ``k f(k)``: ``n_pairs`` keys drawn with replacement.

    ``mapping`` is ``[n_keys]`` (one task for every row) or ``[B, n_keys]`` (a task per row).
    Layout ``k_1 f(k_1) k_2 f(k_2) ...`` (``T = 2 n_pairs``); scored: every key position,
    target ``f(k)``. ``masks["first"]`` marks a key's first occurrence in the segment, which
    no in-context memory can answer: only what the weights (e.g. CMS levels) hold.
    """
    _positive(n_pairs=n_pairs)
    table = mapping if mapping.dim() == 2 else mapping.unsqueeze(0)
    B, n_keys = table.shape
    g = as_generator(seed)
    keys = torch.randint(0, n_keys, (B, n_pairs), generator=g)
    vals = table.gather(1, keys)
    tokens = torch.stack([keys, vals], -1).reshape(B, 2 * n_pairs)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, ::2] = vals
    seen = torch.zeros(B, n_keys, dtype=torch.bool)
    first = torch.zeros_like(tokens, dtype=torch.bool)
    for t in range(n_pairs):
        k = keys[:, t]
        first[:, 2 * t] = ~seen.gather(1, k[:, None])[:, 0]
        seen.scatter_(1, k[:, None], True)
    return Batch(tokens, targets, {"first": first})
