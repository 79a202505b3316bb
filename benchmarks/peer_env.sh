#!/usr/bin/env bash
# A separate virtualenv for the peer of bench_hope.py: the community package nested-learning.
#
#   bash benchmarks/peer_env.sh [VENV]          (default: benchmarks/.peer-venv, git-ignored)
#   python benchmarks/bench_hope.py --peer benchmarks/.peer-venv/bin/python ...
#
# torch is pinned first (2.13.0, the CPU wheel this machine resolves; a looser pin would pull a
# CUDA build). The package goes in with --no-deps: what its model and training step import is
# torch, numpy, omegaconf and hydra-core (its config files); its data-pipeline dependencies
# (datasets, sentencepiece, ...) are not needed to time a step. Safe to rerun: an environment
# that already imports the pinned versions is left as it is. pip's output goes to VENV.log.
set -euo pipefail

VENV="${1:-$(cd "$(dirname "$0")" && pwd)/.peer-venv}"
LOG="$VENV.log"
TORCH="torch==2.13.0"
PEER="nested-learning==0.2.0"

ready() {  # prints the success line where the pinned versions import
  "$VENV/bin/python" -c '
import importlib.metadata as md
import sys

import torch

from nested_learning.training import build_model_from_cfg  # noqa: F401

assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert md.version("nested-learning") == "0.2.0", md.version("nested-learning")
print(f"peer env ready: {sys.executable} (nested-learning 0.2.0, torch {torch.__version__})")
' 2>>"$LOG"
}
pip_() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1 ||
    { echo "peer env: pip install $* failed; see $LOG" >&2; exit 1; }
}

[ -x "$VENV/bin/python" ] && ready && exit 0
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip_ "$TORCH"
pip_ --no-deps "$PEER"
pip_ "numpy>=1.26" "omegaconf>=2.3.0" "hydra-core>=1.3.2" "pyyaml>=6.0" "$TORCH"
ready || { echo "peer env: installed, but nested_learning does not import; see $LOG" >&2; exit 1; }
