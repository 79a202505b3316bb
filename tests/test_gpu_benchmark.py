"""benchmarks/gpu.py runs end to end through Triton's interpreter on tiny shapes (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_tiny_shapes(tmp_path):
    pytest.importorskip("triton", reason="the kernels need triton (the triton extra)")
    out = tmp_path / "gpu.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--no-compile",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = out.read_text()
    for workload in ("delta rule", "delta rule C=8", "titans memory", "self-mod inner step",
                     "optimizer update", "hope train step", "hope read-only step"):  # fmt: skip
        assert f"| {workload} | chunk |" in text
    rows = [r for r in text.splitlines() if r.startswith("| ") and "| triton |" in r]
    assert rows and not any("NOT TIMED" in r or "failed" in r for r in rows), rows
    assert "Cost of the in-context writes" in text
