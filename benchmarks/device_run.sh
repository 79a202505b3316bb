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
# marked gpu: the compiled kernels against their references), gpu.md / gpu.log
# (benchmarks/gpu.py without torch.compile: every backend checked, then timed) and
# gpu_compile.md / .log (the delta rule and the momentum memory with the chunk+compile rows).
# Copy the tables to benchmarks/results/gpu_<card>.md with the date.
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
# Every kernel against its reference and timed, without torch.compile first (its compiles of the
# unrolled chunk loops take minutes), so that these figures come back even if the rest does not.
timeout 200 python3 benchmarks/gpu.py --no-compile --budget 150 --out "$OUT/gpu.md" 2>&1 \
    | tee "$OUT/gpu.log"
# Then the chunk+compile rows (and the others again) for the two memory kernels.
timeout 170 python3 benchmarks/gpu.py --only delta,momentum --budget 110 \
    --out "$OUT/gpu_compile.md" 2>&1 | tee "$OUT/gpu_compile.log"
