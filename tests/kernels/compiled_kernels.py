"""Running Triton kernels compiled, not interpreted, from the test suite (GPU tests)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_compiled(script: str) -> str:
    """Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=0``: this process defined
    its kernels under the interpreter (tests/conftest.py). Fails the test if the script fails;
    returns its output."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
