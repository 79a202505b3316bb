"""The command line, through ``main([...])``: good paths and bad input."""

from __future__ import annotations

import io
import json

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
