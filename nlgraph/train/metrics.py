"""Metrics out: peak memory, the results table, JSON, CSV and the loss-curve PNG."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import json
import math
import re
import resource
import sys
from pathlib import Path
from typing import Any

__all__ = ["PeakMemory", "table", "write_json", "write_csv", "plot", "MEMORY_METHOD"]

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")
MEMORY_METHOD = (
    "peak resident set size of the training process (Linux: VmHWM, reset per model through "
    "/proc/self/clear_refs after gc and glibc malloc_trim return the previous model's memory; "
    "elsewhere resource.getrusage ru_maxrss, the process-wide peak)"
)


class PeakMemory:
    """Peak RSS from construction on: resets the kernel's high-water mark where Linux allows."""

    def __init__(self) -> None:
        self.resettable = False
        gc.collect()
        # hand freed heap back to the OS, or the last model's arenas count as this one's
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start_mb = self._field_mb("VmRSS")
        try:
            _CLEAR.write_text("5")  # "5": reset the peak RSS (Linux >= 4.0)
            self.resettable = self._hwm_kb() is not None
        except OSError:
            pass

    @staticmethod
    def _hwm_kb(field: str = "VmHWM") -> int | None:
        try:
            m = re.search(rf"{field}:\s+(\d+)\s*kB", _STATUS.read_text())
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def _field_mb(self, field: str) -> float | None:
        kb = self._hwm_kb(field)
        return None if kb is None else round(kb / 1024, 1)

    def peak_mb(self) -> float:
        kb = self._hwm_kb() if self.resettable else None
        if kb is None:
            raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kb = raw // 1024 if sys.platform == "darwin" else raw  # bytes on macOS
        return round(kb / 1024, 1)


COLUMNS = [
    ("model", "model", "{}"),
    ("params", "params", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("val_bpb", "val bits/byte", "{:.4f}"),
    ("best_val_bpb", "best val bpb", "{:.4f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("status", "status", "{}"),
]


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the runs (readable as plain text)."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_fmt(f, r.get(k)) for k, _, f in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_csv(path: Path, histories: dict[str, dict[str, list]]) -> Path:
    """One row per model, step and metric: ``model, split, step, tokens, metric, value``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "split", "step", "tokens", "metric", "value"])
        for model, hist in histories.items():
            for row in hist.get("train", []):
                w.writerow([model, "train", row["step"], row["tokens"], "loss_nats", row["loss"]])
            for row in hist.get("val", []):
                w.writerow([model, "val", row["step"], row["tokens"], "bits_per_byte", row["bpb"]])
    return path


def plot(path: Path, histories: dict[str, dict[str, list]]) -> Path | None:
    """Training loss (bits/byte) and validation bits/byte against tokens, one line per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (model, hist) in enumerate(histories.items()):
        color = f"C{i}"
        tr = [r for r in hist.get("train", []) if r["loss"] is not None]
        if tr:
            ax.plot([r["tokens"] for r in tr], [r["loss"] / math.log(2) for r in tr],
                    color=color, alpha=0.35, lw=1, label=f"{model} train")  # fmt: skip
        va = hist.get("val", [])
        if va:
            ax.plot([r["tokens"] for r in va], [r["bpb"] for r in va], color=color, lw=2,
                    marker="o", ms=3, label=f"{model} validation")  # fmt: skip
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
