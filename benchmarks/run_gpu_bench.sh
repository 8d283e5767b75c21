#!/usr/bin/env bash
# One command for a GPU machine: benchmarks/gpu_flash_bench.py (make bench-gpu) within a time budget.
#
#   bash benchmarks/run_gpu_bench.sh [OUT_DIR] [BUDGET_S] [extra gpu_flash_bench.py options...]
#
#   OUT_DIR   where gpu_flash_<gpu>.{csv,json,png} and gpu_flash_bench.log go
#             (default benchmarks/results)
#   BUDGET_S  seconds: no new configuration starts after BUDGET_S (--time-budget), and the run
#             is stopped at BUDGET_S + 120 s; CSV and JSON are rewritten after every
#             configuration, so a stopped run keeps what it measured (default 420)
#   e.g.      bash benchmarks/run_gpu_bench.sh "$OUT" 300 --quick
#
# Python: $PYTHON, else .venv/bin/python if there is one, else python3. Installs nothing when
# torch, matplotlib and triton import; otherwise `pip install -r requirements.txt` (if torch or
# matplotlib is missing) and `pip install triton` (if triton is missing): nothing else. Set
# NO_INSTALL=1 to never install (machines without network). attnlib is imported from the
# repository (no `pip install -e .` needed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
BUDGET=${2:-420}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ "${NO_INSTALL:-0}" != 1 ]; then
    "$PY" -c "import torch, matplotlib" 2>/dev/null || "$PY" -m pip install -q -r requirements.txt
    "$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton
fi
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
    status=0
    timeout --signal=INT --kill-after=30 $(( ${BUDGET%.*} + 120 )) \
        "$PY" benchmarks/gpu_flash_bench.py --time-budget "$BUDGET" --out-dir "$OUT" "$@" || status=$?
    echo "gpu_flash_bench.py exit status: $status"
    exit $status
} 2>&1 | tee "$OUT/gpu_flash_bench.log"
