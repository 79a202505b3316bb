"""``nlgraph bench-optim`` / ``nlgraph.bench_optim.bench``: two optimizers written in the DSL
from the docs alone, compared with the library's baselines on the quick problems; refusals are
one line, exit 2, and write nothing (docs/optimizers.md, "Comparing an optimizer")."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

import nlgraph as nl
from nlgraph.bench_optim import BenchConfigError, bench
from nlgraph.bench_optim.report import NO_MATPLOTLIB
from nlgraph.cli import main

# delta_adam: docs/optimizers.md's first block; adam: README.md, "A learner in a few lines".
USER = """
import nlgraph as nl


def delta_adam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, decay=0.1) -> nl.Graph:
    g = nl.Graph("delta_adam")
    grad = nl.grad_of("w")
    m_hat, v_hat = nl.debias(nl.state("m", at="new"), b1), nl.debias(nl.state("v", at="new"), b2)
    step = -lr * m_hat / (v_hat.sqrt() + eps)
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(step))
    g.level("m", state=nl.like("w"), frequency=nl.per_step(),
            context=nl.kv(key=grad.normalize(), value=0.0), objective=nl.l2(),
            optimizer=nl.chain(nl.gd(lr=decay, retain=b1), nl.follow((1 - b1) * grad)))
    g.level("v", state=nl.like("w"), frequency=nl.per_step(),
            objective=nl.l2_to(grad.square()), optimizer=nl.ema(b2))
    return g


def adam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8) -> nl.Graph:
    g = nl.Graph("adam")
    m_hat, v_hat = nl.debias(nl.state("m", at="new"), b1), nl.debias(nl.state("v", at="new"), b2)
    step = -lr * m_hat / (v_hat.sqrt() + eps)
    w = g.level("w", state=nl.params(), frequency=nl.per_step(),
                objective=nl.outer(), optimizer=nl.follow(step))
    g.level("m", state=nl.like("w"), frequency=nl.per_step(),
            objective=nl.l2_to(w.grad()), optimizer=nl.ema(b1))
    g.level("v", state=nl.like("w"), frequency=nl.per_step(),
            objective=nl.l2_to(w.grad() ** 2), optimizer=nl.ema(b2))
    return g
"""
COLUMNS = [
    "optimizer",
    "least squares: test MSE",
    "MLP classifier: test cross-entropy (nats)",
    "char LM (Shakespeare): test bits/byte",
    "mean rank",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A folder holding ``bo_user_opts.py`` (the two DSL optimizers), made the working dir."""
    (tmp_path / "bo_user_opts.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a refusal leaves the folder as is
    monkeypatch.delitem(sys.modules, "bo_user_opts", raising=False)
    return tmp_path


def results_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of table.md's "## Results" table."""
    part = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in part.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    return rows[0], rows[1:]


def test_two_dsl_optimizers_from_the_docs_against_adamw(user, capsys):
    out = user / "res"
    argv = ["bench-optim", "bo_user_opts:delta_adam", "bo_user_opts:adam", "--baselines",
            "adamw", "--quick", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("least_squares", "mlp", "char_lm")) for line in printed) == 9

    header, rows = results_table((out / "table.md").read_text())
    assert header == COLUMNS
    labels = ["bo_user_opts:delta_adam", "bo_user_opts:adam", "adamw (baseline)"]
    assert [r[0] for r in rows] == labels
    for row in rows:
        assert len(row) == len(COLUMNS)
        for cell in row[1:-1]:
            assert re.fullmatch(r"\d\S* ± \S+ \(lr \S+\)", cell), cell
    ranks = sorted(float(r[-1]) for r in rows)
    assert ranks[0] >= 1 and ranks[-1] <= 3

    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["lr_factors"] == [0.3, 1.0, 3.0]
    for problem, by_label in data["results"].items():
        for label, cell in by_label.items():
            lrs = sorted({r["lr"] for r in cell["runs"]})
            assert len(lrs) == 3 and len(cell["runs"]) == 6, (problem, label)
            # the picked lr has the lowest mean validation metric over the seeds
            mean_val = {lr: sum(r["val"] for r in cell["runs"] if r["lr"] == lr) / 2 for lr in lrs}
            assert cell["lr"] == min(mean_val, key=mean_val.get)
            # the seeds differ: other initial weights and batches give other numbers
            for lr in lrs:
                a, b = (r for r in cell["runs"] if r["lr"] == lr)
                assert (a["seed"], b["seed"]) == (0, 1)
                assert a["test"] != b["test"] and a["curve"] != b["curve"], (problem, label)
            picked = [r["test"] for r in cell["runs"] if r["lr"] == cell["lr"]]
            assert math.isclose(cell["test_mean"], sum(picked) / 2)
            assert cell["test_std"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "plot.png").exists()
    else:
        assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_optimizer_under_two_names_gets_the_same_numbers(user):
    """Every optimizer starts from the same weights and sees the same batches for a seed: the
    README's hand-written Adam and the library's ``adam`` are one trajectory."""
    r = bench(["bo_user_opts:adam", "adam"], baselines=[], problems=["least_squares", "mlp"],
              quick=True)  # fmt: skip
    for p in r.problems:
        mine, lib = r.cells[p, "bo_user_opts:adam"], r.cells[p, "adam"]
        assert [x.test for x in mine.runs] == pytest.approx([x.test for x in lib.runs], rel=1e-5)
        assert mine.best_lr == lib.best_lr
    # and a different optimizer does not
    other = bench(["bo_user_opts:delta_adam"], baselines=[], problems=["least_squares"],
                  quick=True)  # fmt: skip
    assert other.cells["least_squares", "bo_user_opts:delta_adam"].tests != pytest.approx(
        r.cells["least_squares", "adam"].tests
    )


def test_a_traced_file_gets_a_grid_and_an_untraced_one_runs_at_its_numbers(user):
    from bo_user_opts import delta_adam

    nl.save(nl.trace(delta_adam), "traced.yaml")
    nl.save(delta_adam(), "fixed.json")
    r = bench(["traced.yaml", "fixed.json"], baselines=[], problems=["least_squares"],
              quick=True, seeds=1)  # fmt: skip
    assert r.lrs["traced.yaml"] == [3e-4, 1e-3, 3e-3]
    assert r.lrs["fixed.json"] == [None]
    assert any(n.startswith("fixed.json: no `lr` hyperparameter") for n in r.notes)
    a = r.cells["least_squares", "fixed.json"].tests
    b = r.cells["least_squares", "traced.yaml"].at(1e-3)
    assert a == pytest.approx([x.test for x in b])  # the file's numbers are the defaults


def test_a_diverging_optimizer_is_never_picked_and_ranks_last(user):
    r = bench([torch.optim.SGD, "adam"], baselines=[], problems=["least_squares"], quick=True,
              factors=[1.0, 1e9], out="res")  # fmt: skip
    sgd = r.cells["least_squares", "SGD"]
    assert sgd.best_lr == 1e-3 and sgd.val_mean(1e6) == math.inf  # lr 1e6 diverged
    assert all(x.diverged for x in sgd.at(1e6)) and not any(x.diverged for x in sgd.at(1e-3))
    r2 = bench([torch.optim.SGD, "adam"], baselines=[], problems=["least_squares"], quick=True,
               factors=[1e9], out="res2")  # fmt: skip
    assert not r2.cells["least_squares", "SGD"].picked
    assert r2.ranks("least_squares") == {"adam": 1, "SGD": 2}
    _, rows = results_table((user / "res2" / "table.md").read_text())
    assert rows[0][:2] == ["SGD", "diverged at every lr"]


BAD = [
    (["nope"], "unknown library name 'nope'"),
    (["titans"], "'titans' is a library memory, not an optimizer"),
    (["muon"], "'muon' cannot optimize the least_squares problem"),
    (["bo_user_opts:missing"], "has no attribute 'missing'"),
    (["os:getcwd"], "'os:getcwd' returned str, expected an nlgraph.Graph"),
    (["missing.yaml"], "does not exist"),
    (["adam", "--seeds", "0"], "argument --seeds: expected a positive integer"),
    (["adam", "--seeds", "101"], "at most 100"),
    (["adam", "--lr-factors", "0,1"], "argument --lr-factors"),
    (["adam", "--lr-factors", "nan"], "argument --lr-factors"),
    (["adam", "--problems", "nope"], "unknown problem 'nope'"),
    (["adam", "--problems", "mlp,mlp"], "listed twice"),
    (["adam", "--seed", "4294967295", "--seeds", "2"], "32-bit seed"),
    (["adam", "--baselines", "nope"], "unknown library name 'nope'"),
    (["adam", "adam"], "named twice"),
    (["adam", "-o", "afile"], "is a file; pass a folder"),
    (["adam", "--quick", "--bogus"], "unrecognized arguments: --bogus"),
    (["--quick"], "the following arguments are required: SPEC"),
]


@pytest.mark.parametrize("args, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_spec_or_flag_is_one_line_exit_2_and_writes_nothing(user, capsys, args, expected):
    (user / "afile").write_text("x")
    before = sorted(p.name for p in user.rglob("*"))
    argv = ["bench-optim", *args, *([] if "-o" in args else ["-o", "res"])]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], captured.err
    assert lines[0].startswith(("nlgraph bench-optim: error: ", "nlgraph: error: "))
    assert captured.out == ""
    assert sorted(p.name for p in user.rglob("*")) == before


def test_the_python_function_refuses_before_training(user):
    with pytest.raises(BenchConfigError, match="expected a list of optimizers"):
        bench("adam")
    with pytest.raises(BenchConfigError, match="returned int"):
        bench([lambda: 3])
    with pytest.raises(BenchConfigError, match="factors must be positive"):
        bench(["adam"], factors=[1.0, -1.0])


def test_without_matplotlib_the_table_says_so(user, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    lines: list[str] = []
    r = bench(["adam"], baselines=[], problems=["least_squares"], quick=True, seeds=1,
              out="res", log=lines.append)  # fmt: skip
    assert sorted(p.name for p in r.files) == ["results.json", "table.md"]
    assert not (user / "res" / "plot.png").exists()
    assert lines[-1] == NO_MATPLOTLIB
    assert NO_MATPLOTLIB in (user / "res" / "table.md").read_text()


@pytest.mark.slow
def test_the_quick_run_with_every_baseline(user, capsys):
    """The documented smoke test: two SPECs against AdamW, Muon and M3 (~20–30 s)."""
    argv = ["bench-optim", "bo_user_opts:delta_adam", "bo_user_opts:adam", "--quick"]
    assert main(argv) == 0
    header, rows = results_table((user / "nlgraph-bench-optim" / "table.md").read_text())
    assert header == COLUMNS
    assert [r[0] for r in rows] == [
        "bo_user_opts:delta_adam", "bo_user_opts:adam", "adamw (baseline)",
        "muon_adamw (baseline)", "m3_adamw (baseline)",
    ]  # fmt: skip
