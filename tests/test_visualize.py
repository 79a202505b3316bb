"""The visualize layer: deterministic DOT (goldens), the orderings drawn, update ticks, the text
views, file output with and without graphviz's `dot`, and no torch on import.

Regenerate the goldens after an intended change with ``NLGRAPH_UPDATE_GOLDEN=1 pytest
tests/test_visualize.py`` and review the diff.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nlgraph as nl
from nlgraph import library
from nlgraph import visualize as viz
from nlgraph.optimizers import describe
from nlgraph.topology import EDGE_KINDS, tiers
from nlgraph.visualize._style import EDGE_COLORS

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_NAMES = ["adam", "titans", "hope"]
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz's `dot` program is not on PATH")
BR = '<BR ALIGN="LEFT"/>'


def clock_graph() -> nl.Graph:
    """Levels every 1 token, every 4 tokens from tick 2, every 16 tokens, every 2 chunks of 8,
    per sequence, per step, and frozen: one of each kind of rung."""
    g = nl.Graph("clock", chunk=8)
    x = g.input("x", dim=4)

    def lv(name: str, freq: nl.Frequency) -> None:
        g.level(name, state=nl.linear(4, 4), frequency=freq, objective=nl.outer())

    lv("fast", nl.per_token())
    lv("mid", nl.every(4, offset=2))
    lv("slow", nl.every(16))
    lv("chunky", nl.per_chunk(2))
    lv("seq", nl.per_sequence())
    lv("outer", nl.per_step())
    lv("fixed", nl.frozen())
    g.output("y", g.handle("fast")(x))
    return g


def diff_graph() -> nl.Graph:
    """A memory keyed by a slow projection (truncated), read by a per-sequence memory
    (stop_grad), with a meta-learned init and a nested-CMS reset."""
    g = nl.Graph("diffs")
    x = g.input("x", dim=4)
    wk = g.level("W_k", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer())
    fast = g.level(
        "fast", state=nl.linear(4, 4), frequency=nl.per_token(),
        context=nl.kv(key=wk(x), value=x), objective=nl.l2(), optimizer=nl.gd(lr=0.1),
        init=nl.meta("W_k"), reset=nl.reset_with("seqmem"),
    )  # fmt: skip
    g.level(
        "seqmem", state=nl.linear(4, 4), frequency=nl.per_sequence(),
        context=nl.kv(key=fast(x), value=x), objective=nl.dot(), optimizer=nl.gd(lr=1.0),
    )  # fmt: skip
    g.differentiate("W_k", "fast", nl.truncated(4))
    g.differentiate("fast", "seqmem", nl.stop_grad())
    return g


def node_line(source: str, name: str) -> str:
    """The DOT statement of the level node ``name``, line breaks of its label undone."""
    lines = [ln for ln in source.splitlines() if f"<B>{html.escape(name)}</B>" in ln]
    assert len(lines) == 1, f"level {name!r} drawn {len(lines)} times"
    return lines[0].replace(BR, " ")


# --------------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_nesting_matches_golden(name: str) -> None:
    # The goldens pin the full drawing (every level and edge); the collapsed default is pinned
    # by the tests of its own below.
    source = viz.nesting(library.get(name), detail="full").source
    path = GOLDEN / f"nesting_{name}.dot"
    if os.environ.get("NLGRAPH_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(source, encoding="utf-8")
        return
    assert path.exists(), f"no golden {path}; create it with NLGRAPH_UPDATE_GOLDEN=1"
    assert source == path.read_text(encoding="utf-8"), (
        f"the nesting diagram of {name!r} changed; if intended, regenerate with "
        "NLGRAPH_UPDATE_GOLDEN=1 and review the diff"
    )


# ----------------------------------------------------------------------------- determinism


def _reordered(spec: nl.GraphSpec) -> nl.GraphSpec:
    return spec.model_copy(
        update={"levels": spec.levels[::-1], "inputs": spec.inputs[::-1], "diff": spec.diff[::-1]}
    )


@pytest.mark.parametrize(
    "make", [lambda: library.get("titans"), lambda: library.get("hope"), clock_graph, diff_graph]
)
def test_drawings_are_deterministic_and_ignore_declaration_order(make) -> None:
    spec = make().spec
    shuffled = _reordered(spec)
    assert [lv.name for lv in shuffled.levels] != [lv.name for lv in spec.levels]
    assert viz.nesting(spec).source == viz.nesting(make().spec).source
    assert viz.nesting(spec).source == viz.nesting(shuffled).source
    assert viz.nesting(spec, detail="full").source == viz.nesting(shuffled, detail="full").source
    assert viz.ladder(spec).source == viz.ladder(shuffled).source
    assert viz.ladder_text(spec) == viz.ladder_text(shuffled)
    assert viz.tree(spec) == viz.tree(shuffled)
    assert viz.update_ticks(spec, 40) == viz.update_ticks(shuffled, 40)


# ---------------------------------------------------------------------------------- nesting


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("name", library.names())
def test_nesting_shows_every_level_with_frequency_and_optimizer(name: str) -> None:
    spec = library.get(name).spec
    source = viz.nesting(spec, detail="full").source
    for lv in spec.levels:
        line = squash(node_line(source, lv.name))
        assert squash(html.escape(str(lv.frequency))) in line
        assert squash(html.escape(str(lv.state))) in line
        optimizer = squash(html.escape(describe(lv.optimizer)))
        if "." not in lv.name and len(describe(lv.optimizer)) <= 160:
            assert optimizer in line, f"{name}: optimizer of {lv.name!r} not shown"
        for rule in lv.optimizer:  # names in a namespace are drawn relative to it
            assert squash(html.escape(str(rule).split("(")[0])) in line
    for inp in spec.inputs:
        assert f"<B>{inp.name}</B>" in source


def test_names_inside_a_namespace_are_relative_and_long_texts_elided() -> None:
    spec = library.get("hope").spec
    source = viz.nesting(spec, detail="full").source
    line = node_line(source, "block1.titans.M_k")
    assert "W_eta(M_eta(conv(" in squash(line)  # not block1.titans.W_eta(...)
    assert "block1.titans.W_eta" not in line
    # texts over 160 characters are cut, and label lines stay short
    g = nl.Graph("long")
    x = g.input("x", dim=2)
    w = g.level("W", state=nl.linear(2, 2), frequency=nl.per_step(), objective=nl.outer())
    deep = x
    for _ in range(30):
        deep = w(deep).normalize()
    g.level("M", state=nl.linear(2, 2), frequency=nl.per_token(), context=nl.kv(key=x, value=deep),
            objective=nl.l2(), optimizer=nl.gd(lr=nl.signal(deep, "softplus")))  # fmt: skip
    source = viz.nesting(g).source
    elided = [ln for ln in source.splitlines() if "label=<" in ln and "…" in html.unescape(ln)]
    assert elided
    for raw in elided:
        label = raw[raw.index("label=<") : raw.rindex("</TABLE>")]
        assert max(len(html.unescape(part)) for part in re.split(r"<[^>]*>", label)) <= 44
    full = viz.tree(spec)
    assert "block1.titans.W_eta(block1.titans.M_eta(" in full  # the tree prints it whole


def test_edge_kinds_filter() -> None:
    source = viz.nesting(library.get("adam"), edge_kinds=["optimizer"]).source
    assert {(src, dst) for src, dst, _ in edge_styles(source)} == {("m", "w"), ("v", "w")}
    assert "<B>gradient</B>" not in source
    with pytest.raises(nl.NLGraphError, match="unknown edge kinds"):
        viz.nesting(library.get("adam"), edge_kinds=["gradients"])


@pytest.mark.parametrize("detail", ["collapsed", "full"])
@pytest.mark.parametrize("make", [lambda: library.get("adam"), clock_graph])
def test_nesting_clusters_go_from_slowest_to_fastest(make, detail: str) -> None:
    spec = make().spec
    source = viz.nesting(spec, detail=detail).source
    depth, opened = 0, {}
    for line in source.splitlines():
        m = re.match(r"\s*subgraph cluster_level(\d+) \{", line)
        if m:
            opened[int(m.group(1))] = depth
        depth += line.count("{") - line.count("}")
    n = len(tiers(spec))
    # one box per level, the slowest outermost, each opened inside the previous one
    assert opened == {rank: n - rank + 1 for rank in range(1, n + 1)}  # digraph { is depth 1
    for rank, tier in enumerate(tiers(spec), start=1):
        start = source.index(f"subgraph cluster_level{rank} {{")
        for name in tier:
            # a level drawn on its own, else in the list of names of its group's node
            own = re.search(rf"<B>{name}</B>", source)
            pos = (own or re.search(rf'POINT-SIZE="9">[^<]*\b{name}\b', source)).start()
            assert pos > start, f"{name!r} is drawn outside the box of level {rank}"
            if rank > 1:
                inner = source.index(f"subgraph cluster_level{rank - 1} {{")
                assert pos < inner, f"{name!r} is drawn inside a faster level's box"


def test_adam_moments_are_nested_inside_the_weights() -> None:
    source = viz.nesting(library.get("adam")).source
    assert "level 1 of 2 · every step · updates before level 2 at the same tick" in source
    assert source.index("<B>w</B>") < source.index("cluster_level1") < source.index("<B>m</B>")


def edge_styles(source: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """``(src, dst, colour) -> attributes`` of every edge statement in DOT ``source``."""
    out = {}
    for m in re.finditer(r"^\s*(\S+) -> (\S+) \[(.*)\]$", source, re.M):
        attrs = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', m.group(3)))
        attrs = {k: v.strip('"') for k, v in attrs.items()}
        out[(m.group(1), m.group(2), attrs["color"])] = attrs
    return out


def test_edges_are_styled_by_kind_and_differentiation() -> None:
    source = viz.nesting(diff_graph()).source
    edges = edge_styles(source)
    context, init, reset = (EDGE_COLORS[k] for k in ("context", "init", "reset"))
    assert set(edges) == {
        ("W_k", "fast", context), ("W_k", "fast", init), ("fast", "seqmem", context),
        ("seqmem", "fast", reset), ("x", "fast", context), ("x", "seqmem", context),
    }  # fmt: skip
    # truncated(k): dotted, labelled once per pair; stop_grad: dashed; default: solid
    assert edges[("W_k", "fast", context)]["style"] == "dotted"
    assert edges[("W_k", "fast", context)]["label"] == "truncated(4)"
    assert edges[("W_k", "fast", init)]["style"] == "dotted"
    assert "label" not in edges[("W_k", "fast", init)]
    assert edges[("fast", "seqmem", context)]["style"] == "dashed"
    assert "style" not in edges[("x", "fast", context)]
    assert edges[("W_k", "fast", init)]["arrowhead"] == "diamond"
    assert edges[("seqmem", "fast", reset)]["arrowhead"] == "tee"
    assert len(set(EDGE_COLORS.values())) == len(EDGE_KINDS)  # one colour per kind
    # the legend explains exactly the kinds and modes in use
    legend = source[source.index("subgraph cluster_legend") :]
    for word in ("context", "init", "reset", "stop_grad", "truncated(k)", "unrolled"):
        assert f"<B>{word}</B>" in legend
    for absent in ("gradient", "optimizer", "generates", "shape"):
        assert f"<B>{absent}</B>" not in legend


def test_invalid_graph_raises_spec_error_before_drawing() -> None:
    g = nl.Graph("bad")
    g.level("m", state=nl.like("nowhere"), frequency=nl.per_step())
    for draw in (viz.nesting, viz.ladder, viz.ladder_text, viz.tree):
        with pytest.raises(nl.SpecError, match="nowhere"):
            draw(g)
    with pytest.raises(nl.SpecError):
        viz.update_ticks(g, 8)
    with pytest.raises(TypeError, match="Graph or GraphSpec"):
        viz.nesting("adam")  # type: ignore[arg-type]


# -------------------------------------------------------------------------- collapsed detail


def stacked_graph(lrs: tuple[float, ...] = (0.1, 0.1)) -> nl.Graph:
    """Blocks of two projections and a memory, each block reading the previous one's output;
    block ``i``'s memory learns at rate ``lrs[i]``."""
    g = nl.Graph("stacked")
    h = g.input("x", dim=4)
    for i, lr in enumerate(lrs):
        b = f"block{i}"
        proj = dict(frequency=nl.per_step(), objective=nl.outer(), group="projections")
        wk = g.level(f"{b}.W_k", state=nl.linear(4, 4), **proj)
        wv = g.level(f"{b}.W_v", state=nl.linear(4, 4), **proj)
        m = g.level(
            f"{b}.M", state=nl.linear(4, 4), frequency=nl.per_token(),
            context=nl.kv(key=wk(h), value=wv(h)), objective=nl.l2(), optimizer=nl.gd(lr=lr),
        )  # fmt: skip
        h = m(wk(h))
    g.output("y", h)
    return g


def drawn(source: str) -> tuple[list[str], list[str]]:
    """The node and (visible) edge statements of DOT ``source``."""
    nodes = [
        ln for ln in source.splitlines()
        if re.match(r'\s*("[^"]*"|[\w.]+) \[', ln) and " -> " not in ln
    ]  # fmt: skip
    edges = [ln for ln in source.splitlines() if " -> " in ln and "style=invis" not in ln]
    return nodes, edges


def box_depths(source: str) -> dict[int, int]:
    """``rank -> nesting depth`` of the level boxes (``cluster_levelN``) of DOT ``source``."""
    depth, opened = 0, {}
    for line in source.splitlines():
        m = re.match(r"\s*subgraph cluster_level(\d+) \{", line)
        if m:
            opened[int(m.group(1))] = depth
        depth += line.count("{") - line.count("}")
    return opened


def test_hope_collapsed_is_small_and_keeps_its_four_nested_levels() -> None:
    source = viz.nesting(library.get("hope")).source
    assert source == viz.nesting(library.get("hope"), detail="collapsed").source  # the default
    nodes, edges = drawn(source)
    assert len(nodes) < 40 and len(edges) < 60, (len(nodes), len(edges))
    full_nodes, full_edges = drawn(viz.nesting(library.get("hope"), detail="full").source)
    assert len(full_edges) > 3 * len(edges)
    # identical blocks drawn once, groups as one node, edges bundled by kind with a count
    assert 'label="block ×2"' in source
    assert "block1." not in source
    assert "<B>projections (6)</B>" in source and "<B>memories (5)</B>" in source
    assert 'label="context ×5"' in source and 'label="generates ×5"' in source
    # the four levels, slowest outermost, each box inside the previous one
    assert box_depths(source) == {4: 1, 3: 2, 2: 3, 1: 4}
    for rank, freq in ((1, "every token"), (2, "every 8 tokens"), (3, "every 32 tokens"),
                       (4, "every step")):  # fmt: skip
        assert f'label="level {rank} of 4 · {freq}' in source
    # every level of block0 and outside the blocks is in some node
    text = html.unescape(source)
    for lv in library.get("hope").spec.levels:
        if not lv.name.startswith("block1."):
            leaf = lv.name.rsplit(".", 1)[-1]
            assert re.search(rf"(?<![\w]){re.escape(leaf)}(?![\w])", text), lv.name


@needs_dot
def test_hope_collapsed_fits_a_laptop_screen(tmp_path: Path) -> None:
    png = viz.render(library.get("hope"), tmp_path / "hope.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width <= 1600 and height <= 1000, (width, height)


def test_identical_blocks_merge_and_different_ones_do_not() -> None:
    same = viz.nesting(stacked_graph((0.1, 0.1, 0.1))).source
    assert 'label="block ×3"' in same and "block1." not in same and "block2." not in same
    assert "<B>projections (2)</B>" in same and 'label="context ×2"' in same
    differ = viz.nesting(stacked_graph((0.1, 0.2))).source
    assert "×2" not in differ.replace("context ×2", "")
    assert "GD(lr=0.1)" in differ and "GD(lr=0.2)" in differ
    assert '"block0.M"' in differ and '"block1.M"' in differ
    # two of three alike: those two merge, the third is drawn on its own
    partial = viz.nesting(stacked_graph((0.1, 0.2, 0.1))).source
    assert 'label="block0, block2 (×2)"' in partial and '"block1.M"' in partial
    assert '"block2.M"' not in partial


def test_titans_lm_folds_the_second_blocks_tier_into_the_first() -> None:
    source = viz.nesting(library.get("titans_lm")).source
    assert 'label="levels 1–2 of 3 · every token · fastest"' in source
    assert box_depths(source) == {3: 1, 1: 2}
    nodes, edges = drawn(source)
    assert len(nodes) < 15 and len(edges) < 15


@pytest.mark.parametrize("name", library.names("optimizer"))
def test_optimizers_are_drawn_as_in_full(name: str) -> None:
    g = library.get(name)
    assert viz.nesting(g).source == viz.nesting(g, detail="full").source


def test_detail_is_checked_and_reaches_render_and_diagram(tmp_path: Path) -> None:
    g = library.get("hope")
    with pytest.raises(nl.NLGraphError, match="detail must be one of collapsed, full"):
        viz.nesting(g, detail="partial")
    full = viz.render(g, tmp_path / "full.dot", detail="full").read_text(encoding="utf-8")
    assert full == (GOLDEN / "nesting_hope.dot").read_text(encoding="utf-8")
    assert viz.Diagram.of(g, detail="full").source == full
    assert viz.Diagram.of(g).source == viz.nesting(g).source != full
    with pytest.raises(nl.NLGraphError, match="nesting diagram only"):
        viz.render(g, tmp_path / "l.dot", kind="ladder", detail="full")


def test_cli_viz_detail(tmp_path: Path, capsys, monkeypatch) -> None:
    from nlgraph.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["viz", "hope", "-o", "full.dot", "--detail", "full"]) == 0
    assert (tmp_path / "full.dot").read_text(encoding="utf-8") == viz.nesting(
        library.get("hope"), detail="full"
    ).source
    assert main(["viz", "hope", "-o", "default.dot"]) == 0
    assert (tmp_path / "default.dot").read_text(encoding="utf-8") == viz.nesting(
        library.get("hope")
    ).source
    capsys.readouterr()
    assert main(["viz", "hope", "-o", "x.dot", "--detail", "partial"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'partial'" in err, err
    assert main(["viz", "hope", "-o", "x.dot", "--kind", "ladder", "--detail", "full"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nesting diagram only" in err, err


# ----------------------------------------------------------------------------------- ladder


def test_ladder_text_orders_levels_by_period() -> None:
    text = viz.ladder_text(clock_graph())
    order = ["1 tok ┼", "4 tok ┼", "16 tok ┼", "beyond one sequence", "1 sequence ┼", "1 step ┼"]
    positions = [text.index(s) for s in [*order, "frozen ┼"]]
    assert positions == sorted(positions)
    assert "every 2 chunks = 16 tokens" in text  # a chunk level shares the 16-token rung
    assert "level 3: chunky, slow" in text
    assert "2 tok │" in text and "8 tok │" in text  # empty octaves of the log axis
    assert text.index("level 1: fast") < text.index("level 2: mid") < text.index("level 6: fixed")


def test_ladder_dot_has_a_rung_per_frequency() -> None:
    source = viz.ladder(clock_graph()).source
    assert len(re.findall(r'"rung-\d+" \[label=', source)) == 6  # 1, 4, 16 tok, seq, step, frozen
    assert "beyond one sequence" in source
    adam = viz.ladder_text(library.get("adam"))
    assert "beyond" not in adam  # no token clock: nothing to go beyond
    assert "level 1: m, v" in adam and "level 2: w" in adam


# ----------------------------------------------------------------------------- update ticks


def test_update_ticks_of_levels_every_1_4_16_tokens() -> None:
    ticks = viz.update_ticks(clock_graph(), 40, seq_len=16)
    assert list(ticks) == ["fast", "mid", "chunky", "slow", "seq", "outer", "fixed"]
    assert ticks["fast"] == list(range(1, 41))
    assert ticks["mid"] == [2, 6, 10, 14, 18, 22, 26, 30, 34, 38]  # every 4, offset 2
    assert ticks["slow"] == [16, 32]
    assert ticks["chunky"] == [16, 32]  # every 2 chunks of 8 tokens
    assert ticks["seq"] == [16, 32]  # at the end of each 16-token sequence
    assert ticks["outer"] == [16, 32]
    assert ticks["fixed"] == []


def test_update_ticks_default_window_is_one_sequence() -> None:
    g = nl.Graph("offsets")
    g.level("a", state=nl.linear(2, 2), frequency=nl.every(16, offset=3), objective=nl.outer())
    g.level("b", state=nl.linear(2, 2), frequency=nl.per_step(), objective=nl.outer())
    assert viz.update_ticks(g, 40) == {"a": [3, 19, 35], "b": [40]}
    with pytest.raises(ValueError, match="ticks"):
        viz.update_ticks(g, 0)
    with pytest.raises(ValueError, match="seq_len"):
        viz.update_ticks(g, 8, seq_len=0)


def test_timeline_draws_a_row_per_level_and_schedule() -> None:
    pytest.importorskip("matplotlib", reason="timelines need matplotlib (the plot extra)")
    fig = viz.timeline(clock_graph(), ticks=32, seq_len=16)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("fast (level 1)") and labels[-1].startswith("fixed (level 6)")
    # slow and chunky share level 3 and their schedule: one row
    assert len(labels) == 6
    assert labels[2].startswith("level 3: 2 levels") and labels[2].endswith("chunky, slow")


# ------------------------------------------------------------------------------------- tree


def test_tree_nests_levels_with_their_annotations() -> None:
    text = viz.tree(library.get("adam"))
    lines = text.splitlines()
    assert lines[0] == "adam (3 levels in 2 tiers; slowest outside)"
    assert lines[1] == "└── level 2 · every step · slowest"
    w = next(ln for ln in lines if "── w:" in ln)
    m = next(ln for ln in lines if "── m:" in ln)
    for part in ("state params", "objective outer loss", "optimizer += ", "every step",
                 "init default", "never reset"):  # fmt: skip
        assert part in w
    assert "optimizer EMA(β=0.9)" in m and "½‖S − ∇w‖²" in m and "state like(w)" in m
    indent = lambda s: len(s) - len(s.lstrip(" │├└─"))
    assert indent(m) > indent(w)  # the faster level sits inside
    titans = viz.tree(library.get("titans"))
    assert "input x (vector, dim 64)" in titans
    assert "M: state mlp(" in titans and "init meta" in titans and "reset per sequence" in titans
    assert titans.index("level 2 ·") < titans.index("level 1 ·")


# ----------------------------------------------------------------------------------- output


@needs_dot
@pytest.mark.parametrize("kind", ["nesting", "ladder"])
@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_render_writes_pictures(tmp_path: Path, kind: str, suffix: str) -> None:
    out = viz.render(library.get("adam"), tmp_path / f"adam.{suffix}", kind=kind)
    data = out.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data


def test_render_dot_and_timeline(tmp_path: Path) -> None:
    out = viz.render(diff_graph(), tmp_path / "d.dot")
    assert out.read_text(encoding="utf-8") == viz.nesting(diff_graph()).source
    with pytest.raises(nl.NLGraphError, match="no DOT form"):
        viz.render(diff_graph(), tmp_path / "t.dot", kind="timeline")
    pytest.importorskip("matplotlib", reason="timelines need matplotlib (the plot extra)")
    png = viz.render(clock_graph(), tmp_path / "t.png", kind="timeline", ticks=32)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_missing_dot_writes_dot_text_and_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not viz.dot_available()
    g = library.get("titans")
    with pytest.raises(nl.BackendUnavailableError, match="apt-get install -y graphviz") as err:
        viz.render(g, tmp_path / "titans.svg")
    assert "titans.dot" in str(err.value)
    assert not (tmp_path / "titans.svg").exists()
    assert (tmp_path / "titans.dot").read_text(encoding="utf-8") == viz.nesting(g).source
    diagram = viz.Diagram.of(g, kind="ladder")
    assert diagram._repr_svg_() is None
    assert diagram._repr_mimebundle_() == {"text/plain": viz.ladder(g).source}
    assert viz.render(g, tmp_path / "ok.dot").exists()  # DOT text needs no binary


def test_missing_matplotlib_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(nl.BackendUnavailableError, match="pip install matplotlib"):
        viz.timeline(clock_graph())
    assert viz.update_ticks(clock_graph(), 4)["fast"] == [1, 2, 3, 4]  # needs no matplotlib


@needs_dot
def test_diagram_shows_svg_in_notebooks() -> None:
    diagram = viz.Diagram.of(library.get("adam"))
    assert diagram.source == viz.nesting(library.get("adam")).source
    bundle = diagram._repr_mimebundle_()
    assert "<svg" in bundle["image/svg+xml"]
    assert "<svg" in diagram._repr_svg_()
    with pytest.raises(nl.NLGraphError, match="timeline"):
        viz.Diagram.of(library.get("adam"), kind="timeline")


def test_unwritable_or_unknown_paths_are_clear_errors(tmp_path: Path) -> None:
    g = library.get("adam")
    missing = tmp_path / "no" / "such" / "dir" / "a.svg"
    with pytest.raises(nl.NLGraphError, match="does not exist") as err:
        viz.render(g, missing)
    assert str(missing) in str(err.value)
    (tmp_path / "dir.svg").mkdir()
    with pytest.raises(nl.NLGraphError, match="is a directory"):
        viz.render(g, tmp_path / "dir.svg")
    with pytest.raises(nl.NLGraphError, match=r"\.svg, \.png, \.pdf, \.dot"):
        viz.render(g, tmp_path / "a.jpeg")
    with pytest.raises(nl.NLGraphError, match="render kind"):
        viz.render(g, tmp_path / "a.svg", kind="sketch")


# ------------------------------------------------------------------------------------ layers


def test_public_api() -> None:
    assert sorted(viz.__all__) == sorted(
        ["nesting", "ladder", "ladder_text", "timeline", "update_ticks", "tree", "Diagram",
         "render", "dot_available"]
    )  # fmt: skip
    for name in viz.__all__:
        assert hasattr(viz, name)


def test_visualize_imports_neither_torch_nor_compiler() -> None:
    code = (
        "import sys, nlgraph.visualize as v, nlgraph.library as L\n"
        "g = L.get('titans')\n"
        "v.nesting(g); v.ladder(g); v.ladder_text(g); v.tree(g); v.update_ticks(g, 8)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'matplotlib')"
        " or m.startswith('nlgraph.compiler')]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_graphs_render_themselves_in_notebooks() -> None:
    bundle = library.get("adam")._repr_mimebundle_()
    assert bundle["text/plain"].startswith("Graph('adam'")
    if shutil.which("dot"):
        assert (
            bundle["image/svg+xml"].lstrip().startswith("<?xml")
            or "<svg" in bundle["image/svg+xml"]
        )
