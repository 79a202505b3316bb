"""Formal-language recognition with length generalisation (PAPER.md 7.6, Table 5).

The task of Bhattamishra et al. (2020), used by Irie et al. (2023) and the paper: read a string
of the language one character at a time and, after every prefix, predict the *set* of
characters that may come next (``$`` = the string may end here). A string is recognised when
every one of these predictions is right; accuracy is the fraction of strings recognised,
measured on lengths seen in training (bin 0) and on longer ones (bin 1).

Token layout (:data:`VOCAB` = 38, the same for every language)::

    0 PAD   1 BOS   2..5 the language's characters (in the order of ``alphabet``)
    6 + mask   the class "valid next set", mask bit i = alphabet[i], bit 4 = ``$``

A sequence is ``BOS s_1 ... s_n PAD ... PAD`` (``T = max_len + 1``). Scored: positions
``0..n`` (after BOS and after each character), each with the class of its valid-next set;
padding is not scored. Strings are members of the language, as in Bhattamishra et al.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nlgraph.evals.errors import EvalConfigError
from nlgraph.evals.tasks import IGNORE, Batch, as_generator

__all__ = ["LANGUAGES", "Language", "VOCAB", "formal", "lengths", "valid_next", "member"]

PAD, BOS, SYM0, CLASS0 = 0, 1, 2, 6
EOS = "$"
VOCAB = CLASS0 + 32


@dataclass(frozen=True)
class Language:
    name: str
    title: str  # as in the paper's Table 5
    alphabet: str
    step: int  # member lengths are multiples of step
    minimum: int  # shortest member we generate (>= 1)
    sample: Callable[[int, random.Random], str]  # a member of exactly that length
    follow: Callable[[str], set[str]]  # the valid next characters after a prefix


def _parity(n: int, rng: random.Random) -> str:
    bits = [rng.choice("01") for _ in range(n - 1)]
    return "".join(bits) + ("1" if bits.count("1") % 2 else "0")


def _shuffle2(n: int, rng: random.Random) -> str:
    # a random walk over two bracket counters that can always close by length n
    out, c = [], {"(": 0, "[": 0}
    close = {"(": ")", "[": "]"}
    for i in range(n):
        opened = c["("] + c["["]
        moves = [o for o in "([" if opened + 2 <= n - i]
        moves += [close[o] for o in "([" if c[o] > 0]
        ch = rng.choice(moves)
        out.append(ch)
        if ch in c:
            c[ch] += 1
        else:
            c["(" if ch == ")" else "["] -= 1
    return "".join(out)


def _follow_anbn(p: str, letters: str) -> set[str]:
    # a^n b^n (c^n): after a^k any letter may follow... only in order, and counts must match
    if not p:
        return {letters[0]}
    counts = [p.count(ch) for ch in letters]
    n = counts[0]
    last = letters.index(p[-1])
    if last == 0:
        return {letters[0], letters[1]}
    if counts[last] < n:
        return {letters[last]}
    return {letters[last + 1]} if last + 1 < len(letters) else {EOS}


def _follow_shuffle2(p: str) -> set[str]:
    out = {"(", "["}
    o1, o2 = p.count("(") - p.count(")"), p.count("[") - p.count("]")
    out |= {")"} if o1 else set()
    out |= {"]"} if o2 else set()
    return out | ({EOS} if not (o1 or o2) else set())


LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in [
        Language("parity", "Parity", "01", 1, 1, _parity,
                 lambda p: {"0", "1"} | ({EOS} if p.count("1") % 2 == 0 else set())),
        Language("aa", "(aa)*", "a", 2, 2, lambda n, r: "a" * n,
                 lambda p: {"a"} | ({EOS} if len(p) % 2 == 0 else set())),
        Language("abab", "(abab)*", "ab", 4, 4, lambda n, r: "abab" * (n // 4),
                 lambda p: {"ab"[len(p) % 2]} | ({EOS} if len(p) % 4 == 0 else set())),
        Language("anbn", "a^n b^n", "ab", 2, 2, lambda n, r: "a" * (n // 2) + "b" * (n // 2),
                 lambda p: _follow_anbn(p, "ab")),
        Language("anbncn", "a^n b^n c^n", "abc", 3, 3,
                 lambda n, r: "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3),
                 lambda p: _follow_anbn(p, "abc")),
        Language("shuffle2", "Shuffle-2", "()[]", 2, 2, _shuffle2, _follow_shuffle2),
    ]
}  # fmt: skip


def _language(name: str) -> Language:
    if name not in LANGUAGES:
        raise EvalConfigError(f"unknown language {name!r}; expected one of {', '.join(LANGUAGES)}")
    return LANGUAGES[name]


def valid_next(name: str, prefix: str) -> set[str]:
    """The characters (and ``$``) that may follow ``prefix`` in a member of language ``name``."""
    return set(_language(name).follow(prefix))


def member(name: str, string: str) -> bool:
    """Whether ``string`` belongs to language ``name`` (every step valid, and it may end)."""
    lang = _language(name)
    if any(ch not in lang.alphabet for ch in string):
        return False
    steps = all(string[i] in lang.follow(string[:i]) for i in range(len(string)))
    return steps and EOS in lang.follow(string)


def lengths(name: str, lo: int, hi: int) -> list[int]:
    """The member lengths in ``[lo, hi]`` that :func:`formal` draws from."""
    lang = _language(name)
    out = [n for n in range(max(lo, lang.minimum), hi + 1) if n % lang.step == 0]
    if not out:
        raise EvalConfigError(
            f"language {name!r} has no member length in [{lo}, {hi}] (its lengths are "
            f"multiples of {lang.step}, at least {lang.minimum}); widen the range"
        )
    return out


def _classes(lang: Language, string: str) -> list[int]:
    bits = {ch: 1 << i for i, ch in enumerate(lang.alphabet)} | {EOS: 1 << 4}
    return [CLASS0 + sum(bits[c] for c in lang.follow(string[:i])) for i in range(len(string) + 1)]


def formal(
    name: str, batch: int, *, min_len: int = 1, max_len: int = 16,
    seed: int | torch.Generator = 0,
) -> Batch:  # fmt: skip
    """Members of language ``name`` with lengths drawn uniformly from :func:`lengths`.

    Returns ``tokens [B, max_len + 1]`` (BOS, the string, padding) and ``targets`` (the class
    of the valid-next set at positions ``0..n``, :data:`IGNORE` after); ``masks["length"]`` is
    ``[B]``, each string's length ``n``.
    """
    if not isinstance(batch, int) or batch < 1:
        raise EvalConfigError(f"batch must be a positive int, got {batch!r}")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise EvalConfigError(
            f"formal: expected 1 <= min_len <= max_len, got min_len={min_len!r}, "
            f"max_len={max_len!r}"
        )
    lang = _language(name)
    choices = lengths(name, min_len, max_len)
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=as_generator(seed))))
    tokens = torch.full((batch, max_len + 1), PAD, dtype=torch.long)
    targets = torch.full_like(tokens, IGNORE)
    length = torch.zeros(batch, dtype=torch.long)
    sym = {ch: SYM0 + i for i, ch in enumerate(lang.alphabet)}
    for b in range(batch):
        n = rng.choice(choices)
        s = lang.sample(n, rng)
        tokens[b, : n + 1] = torch.tensor([BOS] + [sym[c] for c in s])
        targets[b, : n + 1] = torch.tensor(_classes(lang, s))
        length[b] = n
    return Batch(tokens, targets, {"length": length})
