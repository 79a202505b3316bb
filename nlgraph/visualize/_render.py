"""Putting drawings somewhere: files (:func:`render`) and notebooks (:class:`Diagram`).

The graphviz diagrams need the ``dot`` program for SVG/PNG/PDF. Without it, ``render`` still
writes the DOT text next to the requested file and says how to install graphviz, and a
:class:`Diagram` shows its DOT text instead of a picture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlgraph._errors import BackendUnavailableError, NLGraphError
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec
from nlgraph.visualize._collapse import DETAILS
from nlgraph.visualize._ladder import ladder
from nlgraph.visualize._nesting import nesting
from nlgraph.visualize._timeline import timeline

if TYPE_CHECKING:
    import graphviz

__all__ = ["Diagram", "render", "dot_available", "KINDS", "FORMATS"]

KINDS = ("nesting", "ladder", "timeline")
FORMATS = ("svg", "png", "pdf", "dot")
_INSTALL = (
    "install graphviz (Debian/Ubuntu: `apt-get install -y graphviz`; macOS: "
    "`brew install graphviz`; conda: `conda install graphviz`)"
)


def dot_available() -> bool:
    """Whether graphviz's ``dot`` program is on ``PATH``."""
    return shutil.which("dot") is not None


def _pipe(digraph: graphviz.Digraph, fmt: str) -> bytes:
    import graphviz

    try:
        return digraph.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise BackendUnavailableError(
            f"graphviz's `dot` program was not found; {_INSTALL}"
        ) from None
    except (graphviz.CalledProcessError, subprocess.CalledProcessError) as err:
        raise NLGraphError(f"graphviz's `dot` failed on {digraph.name!r}: {err}") from None


class Diagram:
    """A graphviz drawing that displays itself in notebooks (SVG), or as DOT text where the
    ``dot`` program is missing.

    ``Diagram.of(nlgraph.library.get("titans"))`` in a notebook cell shows the nesting diagram;
    ``.source`` is the deterministic DOT text; ``.render(path)`` writes a file.
    """

    def __init__(self, digraph: graphviz.Digraph) -> None:
        self.digraph = digraph

    @classmethod
    def of(
        cls, graph: Graph | GraphSpec, kind: str = "nesting", *, detail: str | None = None
    ) -> Diagram:
        """The ``kind`` drawing of ``graph``: ``"nesting"`` or ``"ladder"``; ``detail``: the
        nesting diagram's ``"collapsed"`` (default) or ``"full"`` (see :func:`nesting`)."""
        builders = {"nesting": nesting, "ladder": ladder}
        if kind not in builders:
            hint = (
                " (the timeline is a matplotlib figure: use timeline())"
                if kind == "timeline"
                else ""
            )
            raise NLGraphError(f"Diagram kind must be 'nesting' or 'ladder', got {kind!r}{hint}")
        _check_detail(kind, detail)
        if kind == "nesting":
            return cls(nesting(graph, detail=detail or "collapsed"))
        return cls(ladder(graph))

    @property
    def source(self) -> str:
        return self.digraph.source

    def _repr_svg_(self) -> str | None:
        if not dot_available():
            return None
        return _pipe(self.digraph, "svg").decode("utf-8")

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, **kwargs: Any
    ) -> dict[str, str]:
        if not dot_available():
            return {"text/plain": self.source}
        return {
            "image/svg+xml": _pipe(self.digraph, "svg").decode("utf-8"),
            "text/plain": repr(self),
        }

    def render(self, path: str | os.PathLike[str]) -> Path:
        """Write the drawing to ``path`` (format from the suffix); see :func:`render`."""
        target, fmt = _target(path)
        return _write_digraph(self.digraph, target, fmt)

    def __repr__(self) -> str:
        return f"Diagram({self.digraph.name!r})"


def _check_detail(kind: str, detail: str | None) -> None:
    if detail is not None and detail not in DETAILS:
        raise NLGraphError(f"detail must be one of {', '.join(DETAILS)}; got {detail!r}")
    if detail is not None and kind != "nesting":
        raise NLGraphError(f"detail applies to the nesting diagram only, not the {kind}")


def _target(path: str | os.PathLike[str]) -> tuple[Path, str]:
    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    fmt = "dot" if fmt == "gv" else fmt
    if fmt not in FORMATS:
        raise NLGraphError(
            f"cannot tell the format of {str(target)!r} from its suffix {target.suffix!r}; "
            f"use one of {', '.join('.' + f for f in FORMATS)}"
        )
    parent = target.parent
    problem = None
    if target.is_dir():
        problem = "it is a directory"
    elif not parent.is_dir():
        problem = f"the directory {str(parent)!r} does not exist"
    elif not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        problem = "permission denied"
    if problem:
        raise NLGraphError(f"cannot write {str(target)!r}: {problem}; pick a writable path")
    return target, fmt


def _write(target: Path, data: bytes) -> None:
    try:
        target.write_bytes(data)
    except OSError as err:
        raise NLGraphError(
            f"cannot write {str(target)!r}: {err.strerror or err}; pick a writable path"
        ) from None


def _write_digraph(digraph: graphviz.Digraph, target: Path, fmt: str) -> Path:
    if fmt == "dot":
        _write(target, digraph.source.encode("utf-8"))
        return target
    if not dot_available():
        fallback = target.with_suffix(".dot")
        _write(fallback, digraph.source.encode("utf-8"))
        raise BackendUnavailableError(
            f"rendering {str(target)!r} needs graphviz's `dot` program, which is not on PATH; "
            f"wrote the DOT text to {str(fallback)!r} instead. To get {fmt.upper()} files, "
            f"{_INSTALL}"
        )
    _write(target, _pipe(digraph, fmt))
    return target


def render(
    graph: Graph | GraphSpec,
    path: str | os.PathLike[str],
    kind: str = "nesting",
    *,
    ticks: int = 128,
    seq_len: int | None = None,
    detail: str | None = None,
) -> Path:
    """Draw ``graph`` into ``path``; the format comes from the suffix (.svg, .png, .pdf, .dot).

    Args:
        kind: ``"nesting"`` (levels as nested boxes), ``"ladder"`` (the frequency ladder) or
            ``"timeline"`` (updates per token tick; matplotlib, so .svg/.png/.pdf only).
        ticks, seq_len: the window of the timeline (see :func:`update_ticks`).
        detail: the nesting diagram's ``"collapsed"`` (default: identical blocks once, groups
            of levels as one node, edges bundled) or ``"full"`` (every level and edge); see
            :func:`nesting`.

    Raises:
        SpecError: ``graph`` is invalid.
        BackendUnavailableError: an SVG/PNG/PDF was asked for without graphviz's ``dot``
            (the DOT text is written next to ``path`` first), or the timeline without matplotlib.
        NLGraphError: unknown kind, detail or suffix, a detail for another kind than the
            nesting diagram, or ``path`` is not writable.
    """
    if kind not in KINDS:
        raise NLGraphError(f"render kind must be one of {', '.join(KINDS)}; got {kind!r}")
    _check_detail(kind, detail)
    target, fmt = _target(path)
    if kind == "timeline":
        if fmt == "dot":
            raise NLGraphError(
                f"the timeline is a matplotlib chart and has no DOT form; save {str(target)!r} "
                "as .svg, .png or .pdf"
            )
        fig = timeline(graph, ticks=ticks, seq_len=seq_len)
        try:
            fig.savefig(target, format=fmt, dpi=150)
        except OSError as err:
            raise NLGraphError(
                f"cannot write {str(target)!r}: {err.strerror or err}; pick a writable path"
            ) from None
        return target
    digraph = nesting(graph, detail=detail or "collapsed") if kind == "nesting" else ladder(graph)
    return _write_digraph(digraph, target, fmt)
