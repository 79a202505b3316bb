"""Tables (plain text) and JSON of the suites, with the paper's numbers beside ours.

Paper numbers are transcribed from PAPER.md section 7 (the paper's Tables 1, 4 and 5) at their
own scale: models of 340M–1.3B parameters trained on billions of tokens, contexts of 4K–16K.
Ours come from models of ~10^5 parameters trained for minutes on sequences of 16–64 tokens, so
only directions can be compared, and at this scale they need not appear (PAPER.md 9 item 16).

With several seeds every number is the mean over the seeds, shown as ``mean±std`` (the sample
standard deviation, ddof=1), and each direction says whether it holds beyond that spread
(:data:`SPREAD_RULE`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlgraph.evals.languages import LANGUAGES
from nlgraph.evals.models import LABELS

__all__ = [
    "PAPER",
    "SCHEMA_VERSION",
    "SPREAD_RULE",
    "aggregate",
    "machine",
    "suite_report",
    "render",
    "write",
]

# 2: "seeds", "results_std", "results_per_seed", "spread_rule" and each check's "spread" added;
# "results" holds the mean over the seeds (with one seed: that run's numbers, as in version 1)
SCHEMA_VERSION = 2
SPREAD_RULE = (
    "a comparison a >= b is beyond the spread when |mean(a) - mean(b)| > std(a) + std(b); a "
    "direction holds beyond the spread when every comparison it makes holds by that margin, "
    "fails beyond the spread when any is reversed by that margin, else it is within the spread"
)

# PAPER.md 7: {suite: {model: numbers}} in percent; None where the paper has no such row.
PAPER: dict[str, Any] = {
    "mqar": {  # closest: MAD in-context recall (Table 4); no MQAR table in the paper
        "source": "Table 4 (MAD), in-context recall, %",
        "transformer": 100.0,
        "titans_lm": 100.0,
        "hope": 100.0,
    },
    "niah": {  # Table 1 (RULER) at 4K / 8K / 16K
        "source": "Table 1 (RULER), S-NIAH-1 and MK-NIAH-1 at 4K/8K/16K, %",
        "single": {
            "transformer": [88.6, 76.4, 79.8],
            "hope_attention": [100, 100, 100],
            "titans_lm": [100, 100, 100],
            "hope": [100, 100, 100],
        },
        "multikey": {
            "transformer": [79.4, 83.0, 61.4],
            "hope_attention": [80.2, 84.8, 60.8],
            "titans_lm": [26.4, 23.6, 8.2],
            "hope": [29.4, 24.8, 14.8],
        },
    },
    "formal": {  # Table 5, bin0 / bin1
        "source": "Table 5 (formal languages), bin0/bin1 accuracy, %",
        "transformer": {"parity": [46.4, 0.0], "aa": [0, 0], "abab": [0, 0]},
        "linear_attention": {"parity": [78.1, 0.0], "aa": [0, 0], "abab": [0, 0]},
        "deltanet": {"parity": [98.2, 10.1], "aa": [0, 0], "abab": [0, 0]},
        "hope": {lang: [100, 100] for lang in LANGUAGES},
    },
    "continual": {"source": "Figs. 6-8: figures only, no numbers transcribed"},
}
for _m in ("transformer", "linear_attention", "deltanet"):  # 100/100 on the counter languages
    PAPER["formal"][_m].update({k: [100, 100] for k in ("anbn", "anbncn", "shuffle2")})


def machine() -> dict[str, Any]:
    """Where the numbers came from: host, versions, threads and the date."""
    from importlib import metadata

    import torch

    import nlgraph

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "nlgraph": nlgraph.__version__,
    }


def _label(model: str) -> str:
    return LABELS.get(model, model)


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def aggregate(values: Sequence[Any]) -> tuple[Any, Any]:
    """``(mean, std)`` of per-seed values of one shape (dicts and lists element by element).

    Numbers: the mean and the sample standard deviation (ddof=1); one value is its own mean,
    with std ``None``; equal values keep their type (an int stays an int), with std 0. Anything
    else (a status, a name): the common value, or the per-seed values joined by ``/``; std
    ``None``."""
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        pairs = {k: aggregate([v[k] for v in values]) for k in first}
        return {k: m for k, (m, _) in pairs.items()}, {k: d for k, (_, d) in pairs.items()}
    if isinstance(first, list) and all(
        isinstance(v, list) and len(v) == len(first) for v in values
    ):
        items = [aggregate([v[i] for v in values]) for i in range(len(first))]
        return [m for m, _ in items], [d for _, d in items]
    if all(_num(v) for v in values):
        if len(values) == 1:
            return first, None
        if all(v == first for v in values):
            return first, 0.0
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return round(mean, 6), round(math.sqrt(var), 6)
    if all(v == first for v in values):
        return first, None
    return "/".join(map(str, values)), None


def _bad(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x: float | None, sd: float | None = None) -> str:
    """A fraction as a percentage; with a std, ``mean±std``."""
    if _bad(x):
        return "—"
    return f"{100 * x:.1f}" + ("" if sd is None else f"±{100 * sd:.1f}")


def _pm(x: float, sd: float | None, spec: str) -> str:
    """``x`` formatted by ``spec``; with a std, ``mean±std``."""
    if _bad(x):
        return "—"
    return f"{x:{spec}}" + ("" if sd is None else f"±{sd:{spec}}")


def _count(x: Any, sd: float | None) -> str:
    """A count that is the same for every seed (params, steps) once; else ``mean±std``."""
    return str(x) if not sd else _pm(x, sd, ".1f")


def _at(tree: Any, *keys: Any) -> Any:
    """``tree[k1][k2]...``, or ``None`` where there is no std tree (one seed)."""
    for k in keys:
        if tree is None:
            return None
        tree = tree[k]
    return tree


def _paper(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right."""
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _spread(
    pairs: list[tuple[str, str]], values: dict[str, float], sd: dict[str, float] | None
) -> str | None:
    """:data:`SPREAD_RULE` for the claims ``a >= b`` of ``pairs``: ``"beyond"`` when every
    claim holds, or one is reversed, by more than ``sd[a] + sd[b]``; else ``"within"``;
    ``None`` with one seed (no ``sd``)."""
    if sd is None or not pairs:
        return None
    gaps = [(values[a] - values[b], sd[a] + sd[b]) for a, b in pairs]
    if all(d > s for d, s in gaps) or any(-d > s for d, s in gaps):
        return "beyond"
    return "within"


def _verdict(
    claim: str,
    holds: bool | None,
    values: list[float],
    detail: str,
    spread: str | None = None,
) -> dict:
    """A check's record; equal values (e.g. every model at chance) are a tie, not evidence.
    ``spread``: whether the verdict on the means stands beyond the seeds' spread."""
    if holds is None:
        verdict, spread = "not checked", None
    elif len(set(values)) == 1:
        verdict = "tie"
    else:
        verdict = "holds" if holds else "does not hold"
    return {"claim": claim, "holds": holds, "verdict": verdict, "spread": spread, "detail": detail}


def _check(
    claim: str, values: dict[str, float], order: list[str], sd: dict[str, float] | None = None
) -> dict[str, Any]:
    """Whether ``values`` are non-increasing along ``order`` (models absent: not checked)."""
    present = [m for m in order if m in values and not math.isnan(values[m])]
    if len(present) < 2:
        return _verdict(claim, None, [], "not enough of these models were run")
    pairs = list(zip(present, present[1:], strict=False))
    holds = all(values[a] >= values[b] for a, b in pairs)
    detail = " >= ".join(f"{_label(m)} {_pct(values[m], _at(sd, m))}" for m in present)
    spread = _spread(pairs, values, sd)
    return _verdict(claim, holds, [values[m] for m in present], detail, spread)


def _beats(
    claim: str,
    values: dict[str, float],
    winner: str,
    others: list[str],
    sd: dict[str, float] | None = None,
) -> dict:
    """Whether ``winner`` scores at least as high as each of ``others`` that was run."""
    present = [m for m in others if m in values]
    if winner not in values or not present:
        return _verdict(claim, None, [], "not enough of these models were run")
    holds = all(values[winner] >= values[m] for m in present)
    detail = ", ".join(f"{_label(m)} {_pct(values[m], _at(sd, m))}" for m in [winner, *present])
    spread = _spread([(winner, m) for m in present], values, sd)
    return _verdict(claim, holds, [values[m] for m in [winner, *present]], detail, spread)


def _by_model(suite: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    by_model: dict[str, Any] = {}
    for r in results:
        if suite == "formal":
            by_model.setdefault(r["model"], {})[r["language"]] = r
        else:
            by_model[r["model"]] = r
    return by_model


def suite_report(
    suite: str,
    cfg: dict[str, Any],
    results: list[dict[str, Any]] | list[list[dict[str, Any]]],
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The suite's JSON document: config, machine, per-model results, paper numbers, checks.

    ``results``: the units' results of one run; or, with ``seeds``, one such list per seed.
    ``results`` in the document is then the mean over the seeds, ``results_std`` the sample
    std (ddof=1; ``None`` with one seed) and ``results_per_seed`` each seed's results."""
    runs: list[list[dict[str, Any]]] = [results] if seeds is None else list(results)  # type: ignore[list-item]
    seeds = [0] if seeds is None else list(seeds)
    if len(runs) != len(seeds) or not runs:
        raise ValueError(f"{len(runs)} result lists for {len(seeds)} seeds")
    per_seed = [_by_model(suite, rs) for rs in runs]
    mean, std = aggregate(per_seed)
    std = std if len(seeds) > 1 else None
    return {
        "suite": suite,
        "schema_version": SCHEMA_VERSION,
        "seeds": seeds,
        "config": cfg,
        "machine": machine(),
        "results": mean,
        "results_std": std,
        "results_per_seed": per_seed,
        "paper": PAPER[suite],
        "spread_rule": SPREAD_RULE,
        "checks": _checks(suite, cfg, mean, std),
    }


def _checks(
    suite: str, cfg: dict[str, Any], res: dict[str, Any], std: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    order = ["hope", "titans_lm", "linear_attention"]

    def spread_of(*keys: str) -> dict[str, float] | None:
        return None if std is None else {m: _at(std, m, *keys) for m in res}

    if suite == "mqar":
        acc = {m: r["accuracy"] for m, r in res.items()}
        return [
            _check(
                "Hope >= Titans >= linear attention on MQAR (PAPER.md 9 item 16)",
                acc,
                order,
                spread_of("accuracy"),
            )
        ]
    if suite == "niah":
        short = str(min(cfg["eval_lengths"]))
        mk = {m: r["accuracy"]["multikey"][short] for m, r in res.items()}
        sd = spread_of("accuracy", "multikey", short)
        return [
            _check(
                f"Hope >= Titans >= linear attention on multi-key NIAH at length {short} "
                "(PAPER.md 9 item 16)",
                mk,
                order,
                sd,
            ),
            _check(
                "Transformer >= Hope on multi-key NIAH (Table 1: 79.4 vs 29.4 at 4K)",
                mk,
                ["transformer", "hope"],
                sd,
            ),
        ]
    if suite == "formal":
        out = []
        for lang in [x for x in ("parity", "aa") if x in cfg["languages"]]:
            b1 = {m: r[lang]["bin1"] for m, r in res.items() if lang in r}
            sd = None if std is None else {m: std[m][lang]["bin1"] for m in b1}
            out.append(
                _beats(
                    f"{LANGUAGES[lang].title} bin1: Hope >= Transformer and linear "
                    "attention (Table 5: 100 vs 0)",
                    b1,
                    "hope",
                    ["transformer", "linear_attention"],
                    sd,
                )
            )
        return out
    out = []
    for m, r in res.items():
        v, vs = r["variants"], _at(std, m, "variants")
        kept = {"carried": v["carried"]["A_after_B"], "frozen": v["frozen"]["A_after_B"]}
        sd = None if vs is None else {k: vs[k]["A_after_B"] for k in kept}
        claim = (
            f"{_label(m)}: CMS updating at test time keeps more of A after B than the "
            "frozen model (PAPER.md 9 item 17)"
        )
        detail = (
            f"A after B: carried {_pct(kept['carried'], _at(sd, 'carried'))}, frozen "
            f"{_pct(kept['frozen'], _at(sd, 'frozen'))} (chance {_pct(r['chance'])}); carried "
            f"forgets {_pct(v['carried']['forgetting'], _at(vs, 'carried', 'forgetting'))} "
            "points of its own peak"
        )
        spread = _spread([("carried", "frozen")], kept, sd)
        holds = kept["carried"] >= kept["frozen"]
        out.append(_verdict(claim, holds, list(kept.values()), detail, spread))
    return out


def _tag(c: dict[str, Any]) -> str:
    return c["verdict"] + (f"; {c['spread']} the spread" if c.get("spread") else "")


def render(doc: dict[str, Any]) -> str:
    """The suite's plain-text tables, the checks and the budget note. With several seeds every
    number is ``mean±std`` and each check says whether it stands beyond the spread."""
    suite, cfg, res = doc["suite"], doc["config"], doc["results"]
    seeds = doc.get("seeds") or [doc.get("seed", 0)]
    std = doc.get("results_std") if len(seeds) > 1 else None
    per_seed = doc.get("results_per_seed") or [res]
    head = _RENDER[suite](cfg, res, std, per_seed)
    checks = [f"  [{_tag(c)}] {c['claim']}: {c['detail']}" for c in doc["checks"]]
    note = (
        f"budget: {cfg['steps']} steps x batch {cfg['batch']} per model, lr {cfg['lr']}; "
        f"sizes {cfg['sizes']}"
    )
    if std is None:
        return "\n".join([head, "direction (ours, this run):", *checks, note]) + "\n"
    over = (
        f"seeds {seeds[0]}-{seeds[-1]}: every number is mean±std over {len(seeds)} seeds "
        "(sample std, ddof=1)"
    )
    rule = f"  rule: {doc.get('spread_rule', SPREAD_RULE)}"
    direction = f"direction (ours, means over {len(seeds)} seeds):"
    return "\n".join([head, over, direction, rule, *checks, note]) + "\n"


def _train_cols(r: dict[str, Any], sd: dict[str, Any] | None = None) -> list[str]:
    flag = "" if r["status"] == "ok" else f" ({r['status']})"
    if r.get("skipped"):
        flag += f" ({r['skipped'] if sd is None else _pm(r['skipped'], sd['skipped'], '.3g')}"
        flag += " NaN skipped)"
    return [
        _count(r["params"], _at(sd, "params")),
        _count(r["steps"], _at(sd, "steps")),
        _pm(r["train_seconds"], _at(sd, "train_seconds"), ".0f"),
        f"{_pm(r['final_loss'], _at(sd, 'final_loss'), '.3f')}{flag}",
    ]  # noqa: E501


_Std = dict[str, Any] | None


def _mqar(cfg: dict[str, Any], res: dict[str, Any], std: _Std, per_seed: list) -> str:
    title = (
        f"MQAR: {cfg['n_pairs']} key-value pairs then {cfg['n_pairs']} queries, vocab "
        f"{cfg['vocab']}; accuracy on query positions (chance {_pct(2 / cfg['vocab'])}%)"
    )
    rows = [
        [
            _label(m),
            *_train_cols(r, _at(std, m)),
            _pct(r["accuracy"], _at(std, m, "accuracy")),
            _paper(PAPER["mqar"].get(m)),
        ]
        for m, r in res.items()
    ]
    hdr = ["model", "params", "steps", "train s", "loss", "acc %", "paper MAD-ICR %"]
    return f"{title}\n{table(hdr, rows)}"


def _niah(cfg: dict[str, Any], res: dict[str, Any], std: _Std, per_seed: list) -> str:
    lens = "/".join(map(str, cfg["eval_lengths"]))
    title = (
        f"NIAH: accuracy at lengths {lens} (trained at {cfg['train_lengths']}); paper at "
        "4K/8K/16K; single needle and multi-key (4 needles)"
    )
    rows = []
    for m, r in res.items():
        a, sa = r["accuracy"], _at(std, m, "accuracy")
        cols = [
            "/".join(_pct(a[t][str(n)], _at(sa, t, str(n))) for n in cfg["eval_lengths"])
            for t in cfg["tasks"]
        ]
        paper = ["/".join(map(_paper, PAPER["niah"][t].get(m, [None] * 3))) for t in cfg["tasks"]]
        rows.append([_label(m), *_train_cols(r, _at(std, m)), *cols, *paper])
    tasks = list(cfg["tasks"])
    hdr = [
        "model",
        "params",
        "steps",
        "train s",
        "loss",
        *[f"{t} %" for t in tasks],
        *[f"paper {t} %" for t in tasks],
    ]
    return f"{title}\n{table(hdr, rows)}"


def _formal(cfg: dict[str, Any], res: dict[str, Any], std: _Std, per_seed: list) -> str:
    L = cfg["max_len"]
    title = (
        f"Formal languages: strings recognised (every next-set prediction right), "
        f"bin0 = lengths 1-{L} (trained), bin1 = {L + 1}-{2 * L}; ours | paper, bin0/bin1 %"
    )
    models = list(res)
    rows = []
    for lang in cfg["languages"]:
        ours = [
            "/".join(_pct(res[m][lang][b], _at(std, m, lang, b)) for b in ("bin0", "bin1"))
            for m in models
        ]
        paper = [
            "/".join(map(_paper, PAPER["formal"].get(m, {}).get(lang, [None, None])))
            for m in models
        ]
        rows.append([LANGUAGES[lang].title, *ours, "|", *paper])
    hdr = ["language", *map(_label, models), "|", *[f"paper {_label(m)}" for m in models]]
    secs = []
    for m in models:  # a model's training time over the languages, per seed
        mean, sd = aggregate([sum(r["train_seconds"] for r in run[m].values()) for run in per_seed])
        secs.append(f"{_label(m)} {_pm(mean, sd if std is not None else None, '.0f')} s")
    return f"{title}\n{table(hdr, rows)}\ntraining time: {', '.join(secs)}"


def _continual(cfg: dict[str, Any], res: dict[str, Any], std: _Std, per_seed: list) -> str:
    title = (
        f"Continual stream A, B, A ({cfg['segments']} segments of {cfg['n_pairs']} facts per "
        f"phase, {cfg['streams']} streams): first-occurrence accuracy %, from memory only"
    )
    parts = [title]
    cols = ("A_learned", "B_learned", "A_after_B", "forgetting", "A_relearned")
    for m, r in res.items():
        sv = _at(std, m, "variants")
        rows = [
            [f"{_label(m)} {v}", *[_pct(x[k], _at(sv, v, k)) for k in cols]]
            for v, x in r["variants"].items()
        ]
        hdr = [
            "model / CMS at test time",
            "A learned",
            "B learned",
            "A after B",
            "forgetting",
            "A relearned",
        ]
        parts.append(table(hdr, rows))
        parts.append(
            f"chance {_pct(r['chance'])}; carried = CMS learns, state carried across "
            "segments; reset = learns within a segment only; frozen = loss_fn=None; "
            f"outer training {_count(r['steps'], _at(std, m, 'steps'))} steps, "
            f"{_pm(r['train_seconds'], _at(std, m, 'train_seconds'), '.0f')} s"
        )
    return "\n".join(parts)


_RENDER = {"mqar": _mqar, "niah": _niah, "formal": _formal, "continual": _continual}


def write(doc: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``<out>/<suite>.json`` and ``<out>/<suite>.txt`` (the printed tables)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['suite']}.json"
    path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    txt = out / f"{doc['suite']}.txt"
    txt.write_text(render(doc))
    return path, txt
