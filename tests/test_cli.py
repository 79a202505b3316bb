"""The command line, through ``main([...])``: good paths and bad input."""

from __future__ import annotations

import io
import json
import re

import pytest
from specs import small_memory

import nlgraph as nl
from nlgraph.cli import main


def build_small() -> nl.Graph:  # used as SPEC 'test_cli:build_small'
    return small_memory()


def test_list(capsys):
    assert main(["list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"adam", "momentum", "titans", "linear_attention"} <= set(names)
    assert names == sorted(names)


def test_list_by_kind(capsys):
    assert main(["list", "--kind", "optimizer", "-v"]) == 0
    out = capsys.readouterr().out
    assert "adam" in out and "titans" not in out


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_show_formats_round_trip(fmt, capsys):
    assert main(["show", "adam", "--format", fmt]) == 0
    text = capsys.readouterr().out
    g = nl.from_json(text) if fmt == "json" else nl.from_yaml(text)
    from nlgraph.library import get

    assert g == get("adam")


def test_show_text_lists_levels(capsys):
    assert main(["show", "adam"]) == 0
    out = capsys.readouterr().out
    for needle in ("w", "m", "v", "EMA", "every step"):
        assert needle in out


def test_show_module_function(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    assert main(["show", "test_cli:build_small", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "small"


def test_validate_file_and_stdin(tmp_path, capsys, monkeypatch):
    path = nl.save(small_memory(), tmp_path / "g.yaml")
    assert main(["validate", str(path)]) == 0
    assert "ok: 'small' is valid" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(small_memory().to_json()))
    assert main(["validate", "-"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("name: [unclosed"))
    assert main(["validate", "-"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["show", "no_such_thing"], "unknown library name"),
        (["validate", "missing.json"], "does not exist"),
        (["show", "json:nope"], "has no attribute"),
        (["show", "not_a_module_xyz:f"], "cannot import module"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_debug_shows_traceback():
    with pytest.raises(nl.SpecError):
        main(["--debug", "show", "no_such_thing"])


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "examples:" in capsys.readouterr().out


# ------------------------------------------------------------------------------ new verbs
def one_line_error(capsys, needle: str = "") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.mark.parametrize("verb", ["list", "show", "validate", "viz", "compile", "env"])
def test_every_verb_has_examples(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"nlgraph {verb}" in out.split("examples:")[1]


def test_viz_writes_dot_text(tmp_path, capsys):
    path = tmp_path / "titans.dot"
    assert main(["viz", "titans", "-o", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    assert path.read_text().startswith("digraph")
    assert main(["viz", "titans", "-o", str(tmp_path / "ladder.dot"), "--kind", "ladder"]) == 0


@pytest.mark.skipif(not __import__("shutil").which("dot"), reason="graphviz `dot` not on PATH")
def test_viz_writes_svg(tmp_path):
    path = tmp_path / "titans.svg"
    assert main(["viz", "titans", "-o", str(path)]) == 0
    assert "<svg" in path.read_text()


def test_viz_timeline(tmp_path):
    pytest.importorskip("matplotlib", reason="timelines need matplotlib (the plot extra)")
    path = tmp_path / "cms.png"
    assert main(["viz", "cms", "-o", str(path), "--kind", "timeline", "--ticks", "32"]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")


def test_viz_without_dot_writes_dot_text_and_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("nlgraph.visualize._render.dot_available", lambda: False)
    assert main(["viz", "titans", "-o", str(tmp_path / "t.svg")]) == 2
    one_line_error(capsys, "install graphviz")
    assert (tmp_path / "t.dot").read_text().startswith("digraph")


def bad_spec(tmp_path) -> str:
    data = json.loads(small_memory().to_json())
    data["levels"][0]["bogus"] = 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["viz", "no_such_thing", "-o", "x.dot"], "unknown library name"),
        (["viz", "missing.json", "-o", "x.dot"], "does not exist"),
        (["viz", "BAD", "-o", "x.dot"], "unknown field 'bogus'"),
        (["viz", "titans", "-o", "/nonexistent/dir/x.svg"], "does not exist"),
        (["viz", "titans", "-o", "x.txt"], "cannot tell the format"),
        (["viz", "titans", "-o", "x.svg", "--kind", "spiral"], "invalid choice: 'spiral'"),
        (["viz", "titans", "-o", "x.svg", "--ticks", "8"], "--kind timeline only"),
        (["viz", "titans", "-o", "x.png", "--kind", "timeline", "--ticks", "0"], "positive"),
        (["viz", "titans"], "-o/--output"),
        (["compile", "no_such_thing"], "unknown library name"),
        (["compile", "missing.yaml"], "does not exist"),
        (["compile", "BAD"], "unknown field 'bogus'"),
        (["compile", "adam"], "compile_optimizer"),
        (["compile", "deltanet", "--dim", "d"], "NAME=INT"),
        (["compile", "deltanet", "--dim", "d=0"], "NAME=INT"),
        (["compile", "deltanet", "--dim", "1d=4"], "NAME=INT"),
        (["compile", "deltanet", "--batch", "two"], "positive integer"),
        (["compile", "deltanet", "--seed", "-1"], ">= 0"),
        (["compile", "deltanet", "--dtype", "float16"], "invalid choice"),
        (["compile", "deltanet", "--backend", "cuda"], "invalid choice"),
        (["compile", "transformer", "--verify", "--dim", "vocab=100000"], "vocab <= 256"),
        (["no_such_verb"], "invalid choice"),
        (["list", "--kind", "planet"], "invalid choice"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_new_verbs_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [bad_spec(tmp_path) if a == "BAD" else a for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, needle)


def test_usage_error_with_debug_raises():
    with pytest.raises(nl.NLGraphError):
        main(["--debug", "compile", "deltanet", "--dim", "d"])


def test_compile_prints_a_summary_and_the_plan(capsys):
    assert main(["compile", "titans", "--print-plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compiled 'titans'") and "deep_memory" in out
    assert "plan 'titans'" in out and "forward order:" in out


def test_compile_what_the_compiler_cannot_lower_is_one_line_exit_2(capsys):
    from nlgraph.compiler import compile
    from nlgraph.library import get

    try:
        compile(get("self_modifying_titans"))
    except nl.CompileError:
        assert main(["compile", "self_modifying_titans"]) == 2
        one_line_error(capsys, "nlgraph compile: error:")
    else:  # the compiler has learned to lower it since
        assert main(["compile", "self_modifying_titans"]) == 0


def verify_rows(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("output", "state", "grad") and parts[-1] in ("ok", "FAIL"):
            rows[" ".join(parts[:2])] = float(parts[2])
    return rows


def test_verify_deltanet(capsys):
    assert main(["compile", "deltanet", "--verify", "--batch", "2", "--seq", "9"]) == 0
    out = capsys.readouterr().out
    rows = verify_rows(out)
    assert {"output y", "state M", "grad top.slow.W_k.weight"} <= set(rows)
    assert max(rows.values()) <= 1e-8
    assert "speed ratio" in out and "ok: all" in out and "float64" in out


def test_verify_the_triton_backend_in_float32(capsys):
    # conftest sets TRITON_INTERPRET=1: the kernels run through Triton's CPU interpreter
    pytest.importorskip("triton", reason="the kernels need triton (the triton extra)")
    assert main(["compile", "deltanet", "--verify", "--backend", "triton", "--batch", "2",
                 "--seq", "9"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = verify_rows(out)
    assert {"output y", "state M", "grad top.slow.W_k.weight"} <= set(rows)
    assert max(rows.values()) <= 1e-5
    assert "backend triton, float32" in out


def test_verify_cms_blocks_learn(capsys):
    assert main(["compile", "cms", "--verify", "--batch", "2", "--seq", "9"]) == 0
    rows = verify_rows(capsys.readouterr().out)
    assert "output loss" in rows and "state mlp0.theta.0" in rows
    assert any(k.startswith("grad top.blocks.mlp0") for k in rows)


def test_verify_a_spec_file_with_a_cms_rule_chain(tmp_path, capsys):
    """A block with weight decay and Nesterov momentum (lowered at the boundary, in pieces of 3
    tokens) against the reference backend (cut at the same ticks), from a YAML spec file."""
    g = nl.Graph("cms_chain")
    x = g.input("x", dim=6)
    W = g.level("W", state=nl.linear(6, 6), frequency=nl.per_step(), objective=nl.outer())
    blk = g.level("B", state=nl.mlp(6, 6, width=8), frequency=nl.every(3, "token"),
                  objective=nl.outer(), chunk=3, context=W(x), init=nl.meta(),
                  optimizer=nl.chain(nl.weight_decay(0.05),
                                     nl.gd(lr=0.2, momentum=0.8, nesterov=True)))  # fmt: skip
    g.output("y", blk(W(x)))
    path = tmp_path / "cms_chain.yaml"
    nl.save(g, path)
    assert main(["compile", str(path), "--verify", "--batch", "2", "--seq", "10"]) == 0
    out = capsys.readouterr().out
    rows = verify_rows(out)
    want = {"state B.momentum.0", "grad top.blocks.B.net.layers.0.weight", "grad top.slow.W.weight"}
    assert want <= set(rows)
    assert max(rows.values()) <= 1e-8 and "ok: all" in out


def test_verify_token_inputs_and_float32(capsys):
    argv = ["compile", "transformer", "--verify", "--batch", "1", "--seq", "5"]
    assert main([*argv, "--dtype", "float32", "--dim", "vocab=7"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "tolerance 0.001" in out and "output logits" in out


def test_verify_refuses_a_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("NLGRAPH_BACKEND", "reference")
    assert main(["compile", "deltanet", "--verify"]) == 2
    one_line_error(capsys, "unset it")


def test_verify_catches_a_wrong_backend(capsys, monkeypatch):
    import nlgraph.kernels.linear_memory  # noqa: F401 - registers the op
    from nlgraph.kernels import _dispatch

    fn, ok = _dispatch._REGISTRY["linear_memory"]["chunk"]

    def off_by_a_little(*args, **kwargs):
        o, final = fn(*args, **kwargs)
        return o * (1 + 1e-6), final

    monkeypatch.setitem(_dispatch._REGISTRY["linear_memory"], "chunk", (off_by_a_little, ok))
    assert main(["compile", "deltanet", "--verify", "--batch", "1", "--seq", "5"]) == 1
    out = capsys.readouterr().out
    assert "output y" in out.split("FAIL:")[1] and "state M" not in out.split("FAIL:")[1]


def test_env_is_a_pasteable_block(capsys, monkeypatch):
    monkeypatch.setenv("NLGRAPH_DEBUG", "1")
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    for key in ("python", "torch", "triton", "numpy", "pydantic", "networkx", "graphviz", "dot"):
        assert lines[key].strip(), key
    assert lines["cuda"].startswith(("available", "not available"))
    for op in ("linear_memory", "deep_memory"):
        assert "reference" in lines[f"kernel {op}"] and "auto picks" in lines[f"kernel {op}"]
    assert lines["NLGRAPH_DEBUG"] == "1" and lines["NLGRAPH_BACKEND"] == "(unset)"


def test_train_verb_through_main(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "transformer", "--steps", "2", "--no-baselines", "--seq", "16",
            "--batch", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "metrics.json").exists()
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_bench_verb(capsys):
    assert main(["bench", "deltanet", "--batch", "1", "--seq", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "chunk" in out and "train step" in out
    assert main(["bench", "deltanet", "--backends", "nope"]) == 2


def test_eval_verb_through_main(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "formal", "--quick", "--languages", "parity", "--models", "linear_attention",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert any(out.rglob("*.json"))
    capsys.readouterr()
    assert main(["eval", "nosuchsuite"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_module_specs_resolve_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """``nlgraph compile mymodule:builder`` finds a module in the current directory, as
    ``python -m`` would; a module or builder that raises is one line naming it."""
    import sys

    (tmp_path / "nlg_user_mod.py").write_text(
        "from nlgraph.library import get\n"
        "def builder():\n    return get('deltanet', d=8)\n"
        "def broken():\n    return 1 / 0\n"
    )
    (tmp_path / "nlg_user_bad.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for mod in ("nlg_user_mod", "nlg_user_bad"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    assert main(["compile", "nlg_user_mod:builder"]) == 0
    assert "compiled 'deltanet'" in capsys.readouterr().out
    assert main(["compile", "nlg_user_mod:broken"]) == 2
    one_line_error(capsys, "'nlg_user_mod:broken' raised ZeroDivisionError")
    assert main(["compile", "nlg_user_bad:x"]) == 2
    one_line_error(capsys, "importing module 'nlg_user_bad'")
    assert main(["compile", "nlg_user_missing:x"]) == 2
    one_line_error(capsys, "current directory")


def test_width_bindings_are_checked(capsys):
    """A --dim the spec does not name, or one too large to allocate, is refused (it was
    ignored, or ran into the allocator)."""
    assert main(["compile", "deltanet", "--dim", "zzz=5"]) == 2
    one_line_error(capsys, "no symbolic width 'zzz'")
    assert main(["compile", "deltanet", "--dim", "d=99999999999999999999"]) == 2
    one_line_error(capsys, "exceed 65,536")


HOSTILE_SPECS = {
    "deep JSON": '{"a":' * 100000 + "1" + "}" * 100000,
    "deep YAML": "[" * 100000 + "]" * 100000,
    # nine levels of nine aliases: 9^9 values if expanded, 400 bytes as written
    "alias bomb": "\n".join(
        ["a: &a [x, x, x, x, x, x, x, x, x]"]
        + [
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]"
            for i in range(9)
        ]
    ),  # fmt: skip
}


@pytest.mark.parametrize("verb", ["validate", "show"])
@pytest.mark.parametrize("name", list(HOSTILE_SPECS))
def test_hostile_documents_are_one_line_and_quick(verb, name, tmp_path, capsys):
    import time

    suffix = ".json" if name == "deep JSON" else ".yaml"
    path = tmp_path / f"hostile{suffix}"
    path.write_text(HOSTILE_SPECS[name])
    t0 = time.perf_counter()
    assert main([verb, str(path)]) == 2
    assert time.perf_counter() - t0 < 20
    one_line_error(capsys, "levels deep" if "deep" in name else "aliases")


def test_hostile_stdin_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(HOSTILE_SPECS["deep JSON"]))
    assert main(["validate", "-"]) == 2
    one_line_error(capsys, "levels deep")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["compile", "deltanet", "--verify", "--batch", "999999999999"], "at most 4,096"),
        (["compile", "deltanet", "--verify", "--seq", "99999999999999999999"], "at most 65,536"),
        (["compile", "deltanet", "--seed", "99999999999999999999999"], "32-bit seed"),
        (["bench", "deltanet", "--batch", "999999999999"], "at most 4,096"),
        (["viz", "cms", "--kind", "timeline", "--ticks", "99999999999999999999", "-o", "t.png"],
         "at most 4,096"),
        (["compile", "deltanet", "--verify", "--batch", "4096", "--seq", "65536"], "tokens"),
    ],
)  # fmt: skip
def test_sizes_past_their_limits_are_refused_before_work(argv, needle, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    one_line_error(capsys, needle)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_bug_in_nlgraph_keeps_its_traceback_and_says_how_to_report(monkeypatch, capsys):
    import nlgraph.cli as cli

    def boom(_args):
        raise KeyError("internal")

    parser = cli.build_parser()
    args = parser.parse_args(["list"])
    args.func = boom
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args))
    assert main(["list"]) == cli.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "nlgraph env" in err


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    import nlgraph.cli as cli

    parser = cli.build_parser()
    args = parser.parse_args(["list"])

    def oom(_args):
        raise MemoryError

    args.func = oom
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args))
    assert main(["list"]) == 2
    one_line_error(capsys, "out of memory")


class _Fixed:
    """A parser stand-in returning prepared arguments (to inject a failing command)."""

    def __init__(self, parser, args):
        self.parser, self.args = parser, args

    def parse_args(self, argv):
        return self.args

    def print_help(self):
        self.parser.print_help()
