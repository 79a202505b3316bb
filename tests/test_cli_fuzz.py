"""Hostile and careless command lines: every verb answers with exit 0, 1 or 2, never a
traceback, and a refused command writes nothing (docs/cli.md, "Exit codes", "Limits").

``list``, ``show``, ``validate``, ``viz`` and ``compile`` get any mix of good and bad arguments;
``train``, ``eval`` and ``bench`` always get one bad value, so they answer at once."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlgraph.cli import main

NUMBERS = ["0", "-1", "1", "2", "3", "7", "1.5", "1e9", "99999999999999999999", "nan", "inf",
           "-0", "0x10", "", "banana", "ä"]  # fmt: skip
NAMES = ["deltanet", "titans", "cms", "hope", "adam", "nope", "-", "x.yaml", "spec.json",
         "mod:fn", "os:system", "../../etc/passwd", "", "a" * 300]  # fmt: skip
FLAGS = {
    "list": [("--kind", ["memory", "model", "optimizer", "block", "banana", ""]),
             ("-v", None)],
    "show": [("--format", ["text", "json", "yaml", "xml"])],
    "validate": [],
    "viz": [("--kind", ["nesting", "ladder", "timeline", "pie"]), ("--ticks", NUMBERS),
            ("-o", ["out.svg", "out.dot", "out.png", "out.txt", "", "sub/dir/out.svg"])],
    "compile": [("--print-plan", None), ("--verify", None), ("--batch", NUMBERS),
                ("--seq", NUMBERS), ("--seed", NUMBERS), ("--dtype", ["float32", "int8"]),
                ("--dim", ["d=8", "zzz=5", "d=0", "d=99999999999999999999", "=", "d"]),
                ("--backend", ["chunk", "reference", "gpu"])],
}  # fmt: skip
SMALL = {"--batch": ["1", "2"], "--seq": ["1", "3", "9"]}  # keep valid runs short
# Verbs whose valid runs train for a while: every drawn command holds one bad value, so they
# answer at once (their valid runs are tested elsewhere).
SLOW = {
    "train": [("--steps", ["0", "-1", "banana", "99999999999", "1.5"]),
              ("--batch", ["0", "99999999999999", "x"]), ("--seq", ["0", "nan"]),
              ("--device", ["cpu:banana", "gpu", "cuda:x", ""]),
              ("--lr", ["0", "-1", "inf", "nan"]),
              ("--model", ["nope", "os:system", "../x.yaml"]), ("--seed", ["-1", "1e99"])],
    "eval": [("--seeds", ["0", "-2", "x"]), ("--steps", ["0", "banana"]),
             ("--models", ["nope", ",", "hope,nope"]), ("--jobs", ["0", "-1"]),
             ("--size", ["d", "d=", "=3", "d=banana"])],
    "bench": [("--batch", ["0", "99999999999"]), ("--seq", ["0", "99999999999999999999"]),
              ("--repeats", ["0", "2000"]), ("--backends", ["gpu", ",", "reference,banana"])],
}  # fmt: skip


@st.composite
def command(draw):
    if draw(st.integers(0, 3)) == 0:  # a verb that must refuse at once
        verb = draw(st.sampled_from(sorted(SLOW)))
        argv = [verb] + (["deltanet"] if verb == "bench" else [])
        flag, values = draw(st.sampled_from(SLOW[verb]))
        out = [] if verb == "bench" else ["--out", "out"]
        return [*argv, flag, draw(st.sampled_from(values)), *out]
    verb = draw(st.sampled_from(sorted(FLAGS)))
    argv = [verb]
    if verb != "list":
        argv.append(draw(st.sampled_from(NAMES)))
    flags = FLAGS[verb]
    chosen = draw(st.lists(st.sampled_from(flags), max_size=4)) if flags else []
    for flag, values in chosen:
        argv.append(flag)
        if values is not None:
            pool = values + SMALL.get(flag, []) * 3
            argv.append(draw(st.sampled_from(pool)))
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--unknown", "extra", "--help-me"])))
    return argv


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(argv=command())
def test_no_command_line_ends_in_a_traceback(argv, tmp_path, capsys, monkeypatch):
    import tempfile

    work = tmp_path / "runs"
    work.mkdir(exist_ok=True)
    work = type(tmp_path)(tempfile.mkdtemp(dir=work))
    monkeypatch.chdir(work)
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    before = sorted(os.listdir(work))
    try:
        code = main(argv)
    except SystemExit as exc:  # --help and argparse's own exits
        code = exc.code
    out = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, out.err[-500:])
    assert "Traceback" not in out.err, (argv, out.err[-800:])
    if code == 2:
        assert out.err.count("\n") == 1, (argv, out.err)
        assert sorted(os.listdir(work)) == before, argv  # a refused command writes nothing


@pytest.mark.parametrize("argv", [["viz", "cms", "-o", "sub/dir/out.svg"],
                                  ["show", "../../etc/passwd"]])  # fmt: skip
def test_examples_the_fuzzer_may_miss(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err
