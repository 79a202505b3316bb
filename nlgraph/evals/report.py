"""Tables (plain text) and JSON of the suites, with the paper's numbers beside ours.

Paper numbers are transcribed from PAPER.md section 7 (the paper's Tables 1, 4 and 5) at their
own scale: models of 340M–1.3B parameters trained on billions of tokens, contexts of 4K–16K.
Ours come from models of ~10^5 parameters trained for minutes on sequences of 16–64 tokens, so
only directions can be compared, and at this scale they need not appear (PAPER.md 9 item 16).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from nlgraph.evals.languages import LANGUAGES
from nlgraph.evals.models import LABELS

__all__ = ["PAPER", "SCHEMA_VERSION", "machine", "suite_report", "render", "write"]

SCHEMA_VERSION = 1

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


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


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


def _verdict(claim: str, holds: bool | None, values: list[float], detail: str) -> dict:
    """A check's record; equal values (e.g. every model at chance) are a tie, not evidence."""
    if holds is None:
        verdict = "not checked"
    elif len(set(values)) == 1:
        verdict = "tie"
    else:
        verdict = "holds" if holds else "does not hold"
    return {"claim": claim, "holds": holds, "verdict": verdict, "detail": detail}


def _check(claim: str, values: dict[str, float], order: list[str]) -> dict[str, Any]:
    """Whether ``values`` are non-increasing along ``order`` (models absent: not checked)."""
    present = [m for m in order if m in values and not math.isnan(values[m])]
    if len(present) < 2:
        return _verdict(claim, None, [], "not enough of these models were run")
    holds = all(values[a] >= values[b] for a, b in zip(present, present[1:], strict=False))
    detail = " >= ".join(f"{_label(m)} {_pct(values[m])}" for m in present)
    return _verdict(claim, holds, [values[m] for m in present], detail)


def _beats(claim: str, values: dict[str, float], winner: str, others: list[str]) -> dict:
    """Whether ``winner`` scores at least as high as each of ``others`` that was run."""
    present = [m for m in others if m in values]
    if winner not in values or not present:
        return _verdict(claim, None, [], "not enough of these models were run")
    holds = all(values[winner] >= values[m] for m in present)
    detail = ", ".join(f"{_label(m)} {_pct(values[m])}" for m in [winner, *present])
    return _verdict(claim, holds, [values[m] for m in [winner, *present]], detail)


def suite_report(suite: str, cfg: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's JSON document: config, machine, per-model results, paper numbers, checks."""
    by_model: dict[str, Any] = {}
    for r in results:
        if suite == "formal":
            by_model.setdefault(r["model"], {})[r["language"]] = r
        else:
            by_model[r["model"]] = r
    return {
        "suite": suite,
        "schema_version": SCHEMA_VERSION,
        "config": cfg,
        "machine": machine(),
        "results": by_model,
        "paper": PAPER[suite],
        "checks": _checks(suite, cfg, by_model),
    }


def _checks(suite: str, cfg: dict[str, Any], res: dict[str, Any]) -> list[dict[str, Any]]:
    order = ["hope", "titans_lm", "linear_attention"]
    if suite == "mqar":
        acc = {m: r["accuracy"] for m, r in res.items()}
        return [
            _check("Hope >= Titans >= linear attention on MQAR (PAPER.md 9 item 16)", acc, order)
        ]
    if suite == "niah":
        short = str(min(cfg["eval_lengths"]))
        mk = {m: r["accuracy"]["multikey"][short] for m, r in res.items()}
        return [
            _check(
                f"Hope >= Titans >= linear attention on multi-key NIAH at length {short} "
                "(PAPER.md 9 item 16)",
                mk,
                order,
            ),
            _check(
                "Transformer >= Hope on multi-key NIAH (Table 1: 79.4 vs 29.4 at 4K)",
                mk,
                ["transformer", "hope"],
            ),
        ]
    if suite == "formal":
        out = []
        for lang in [x for x in ("parity", "aa") if x in cfg["languages"]]:
            b1 = {m: r[lang]["bin1"] for m, r in res.items() if lang in r}
            out.append(
                _beats(
                    f"{LANGUAGES[lang].title} bin1: Hope >= Transformer and linear "
                    "attention (Table 5: 100 vs 0)",
                    b1,
                    "hope",
                    ["transformer", "linear_attention"],
                )
            )
        return out
    out = []
    for m, r in res.items():
        v = r["variants"]
        kept = {"carried": v["carried"]["A_after_B"], "frozen": v["frozen"]["A_after_B"]}
        claim = (
            f"{_label(m)}: CMS updating at test time keeps more of A after B than the "
            "frozen model (PAPER.md 9 item 17)"
        )
        detail = (
            f"A after B: carried {_pct(kept['carried'])}, frozen {_pct(kept['frozen'])} "
            f"(chance {_pct(r['chance'])}); carried forgets "
            f"{_pct(v['carried']['forgetting'])} points of its own peak"
        )
        out.append(_verdict(claim, kept["carried"] >= kept["frozen"], list(kept.values()), detail))
    return out


def render(doc: dict[str, Any]) -> str:
    """The suite's plain-text tables, the checks and the budget note."""
    suite, cfg, res = doc["suite"], doc["config"], doc["results"]
    head = _RENDER[suite](cfg, res)
    checks = [f"  [{c['verdict']}] {c['claim']}: {c['detail']}" for c in doc["checks"]]
    note = (
        f"budget: {cfg['steps']} steps x batch {cfg['batch']} per model, lr {cfg['lr']}; "
        f"sizes {cfg['sizes']}"
    )
    return "\n".join([head, "direction (ours, this run):", *checks, note]) + "\n"


def _train_cols(r: dict[str, Any]) -> list[str]:
    flag = "" if r["status"] == "ok" else f" ({r['status']})"
    flag += f" ({r['skipped']} NaN skipped)" if r.get("skipped") else ""
    return [
        str(r["params"]),
        str(r["steps"]),
        f"{r['train_seconds']:.0f}",
        f"{r['final_loss']:.3f}{flag}",
    ]  # noqa: E501


def _mqar(cfg: dict[str, Any], res: dict[str, Any]) -> str:
    title = (
        f"MQAR: {cfg['n_pairs']} key-value pairs then {cfg['n_pairs']} queries, vocab "
        f"{cfg['vocab']}; accuracy on query positions (chance {_pct(2 / cfg['vocab'])}%)"
    )
    rows = [
        [_label(m), *_train_cols(r), _pct(r["accuracy"]), _paper(PAPER["mqar"].get(m))]
        for m, r in res.items()
    ]
    hdr = ["model", "params", "steps", "train s", "loss", "acc %", "paper MAD-ICR %"]
    return f"{title}\n{table(hdr, rows)}"


def _niah(cfg: dict[str, Any], res: dict[str, Any]) -> str:
    lens = "/".join(map(str, cfg["eval_lengths"]))
    title = (
        f"NIAH: accuracy at lengths {lens} (trained at {cfg['train_lengths']}); paper at "
        "4K/8K/16K; single needle and multi-key (4 needles)"
    )
    rows = []
    for m, r in res.items():
        a = r["accuracy"]
        cols = ["/".join(_pct(a[t][str(n)]) for n in cfg["eval_lengths"]) for t in cfg["tasks"]]
        paper = ["/".join(map(_paper, PAPER["niah"][t].get(m, [None] * 3))) for t in cfg["tasks"]]
        rows.append([_label(m), *_train_cols(r), *cols, *paper])
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


def _formal(cfg: dict[str, Any], res: dict[str, Any]) -> str:
    L = cfg["max_len"]
    title = (
        f"Formal languages: strings recognised (every next-set prediction right), "
        f"bin0 = lengths 1-{L} (trained), bin1 = {L + 1}-{2 * L}; ours | paper, bin0/bin1 %"
    )
    models = list(res)
    rows = []
    for lang in cfg["languages"]:
        ours = [f"{_pct(res[m][lang]['bin0'])}/{_pct(res[m][lang]['bin1'])}" for m in models]
        paper = [
            "/".join(map(_paper, PAPER["formal"].get(m, {}).get(lang, [None, None])))
            for m in models
        ]
        rows.append([LANGUAGES[lang].title, *ours, "|", *paper])
    hdr = ["language", *map(_label, models), "|", *[f"paper {_label(m)}" for m in models]]
    secs = ", ".join(
        f"{_label(m)} {sum(r['train_seconds'] for r in res[m].values()):.0f} s" for m in models
    )
    return f"{title}\n{table(hdr, rows)}\ntraining time: {secs}"


def _continual(cfg: dict[str, Any], res: dict[str, Any]) -> str:
    title = (
        f"Continual stream A, B, A ({cfg['segments']} segments of {cfg['n_pairs']} facts per "
        f"phase, {cfg['streams']} streams): first-occurrence accuracy %, from memory only"
    )
    parts = [title]
    for m, r in res.items():
        rows = [
            [
                f"{_label(m)} {v}",
                _pct(x["A_learned"]),
                _pct(x["B_learned"]),
                _pct(x["A_after_B"]),
                _pct(x["forgetting"]),
                _pct(x["A_relearned"]),
            ]
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
            f"outer training {r['steps']} steps, {r['train_seconds']:.0f} s"
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
