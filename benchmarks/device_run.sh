#!/usr/bin/env bash
# nlgraph's GPU checks and figures in one command, sized for one device lease (H100/H200).
#
# The lent machines hold PyTorch, Triton, numpy, networkx and pyyaml but not pydantic (see the
# device tool's KINDS.md). Prepare here, on the CPU machine, in the repo root, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
#
# then run it with the device tool: command "bash benchmarks/device_run.sh", carry [".whl"],
# timeout_s 560. It writes under $OUT: device.txt (card, versions), pytest_gpu.log (the tests
# marked gpu: the compiled kernels against their references), gpu.md and gpu.log
# (benchmarks/gpu.py: every backend checked, then timed). Copy gpu.md to
# benchmarks/results/gpu_<card>.md with the date.
set -uo pipefail
OUT=${OUT:-/tmp/nlgraph_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# Only the files that hold gpu tests: collecting the whole suite would import packages the
# machine lacks (graphviz, the training corpus).
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/kernels/test_linear_memory_triton.py tests/kernels/test_momentum_memory.py \
    tests/kernels/test_deep_memory_triton.py 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 330 python3 benchmarks/gpu.py --budget 240 --out "$OUT/gpu.md" 2>&1 | tee "$OUT/gpu.log"
