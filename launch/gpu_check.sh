#!/usr/bin/env bash
# One device session (about 8 minutes on one H100): the CUDA tests, then the GPU benchmarks of
# doge-20m and doge-320m against transformers, printing every figure. Copy the JSON lines it
# prints (also written to $OUT when set) into docs/performance.md with the device, date and commit.
#
#   bash launch/gpu_check.sh                 # PY=python by default; OUT=dir to keep the logs
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
}

echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%d)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step cuda_tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
BENCH=("$PY" launch/bench.py --dtype bf16 --compile)
step bench_20m 100 "${BENCH[@]}" --preset doge-20m --seq-len 2048 --micro-batch 16 --steps 10 --warmup 3
step bench_320m 200 "${BENCH[@]}" --preset doge-320m --seq-len 2048 --micro-batch 4 --steps 8 --warmup 3
step decode_20m 60 "$PY" launch/bench.py --dtype bf16 --preset doge-20m --decode --steps 5
if "$PY" -c "import flash_attn" 2>/dev/null; then  # the [gpu] extra: the same 320m bench through flash-attn
    step bench_320m_flash 200 "${BENCH[@]}" --preset doge-320m --seq-len 2048 --micro-batch 4 --steps 8 --warmup 3 --attn-backend flash
else
    echo "=== flash-attn not installed: pip install -e '.[gpu]' to also bench --attn-backend flash"
fi

echo "=== JSON figures"
grep -h '^{' "$OUT"/bench_*.log "$OUT"/decode_*.log | tee "$OUT/figures.jsonl"
exit $status
