#!/usr/bin/env bash
# GPU benchmark: full-size Infinity-2B at 1M and 2K, VAR-d30 at 256, HART-0.7B at 1024, random weights,
# bf16, batch 1, each with the plans none / fastvar / turbo: seconds, speedup, peak allocated memory and
# KV bytes, as JSON (default benchmarks/gpu.json). Fits one GPU in <= 8 minutes (a 450 s budget inside,
# a hard 480 s timeout outside). Then `python benchmarks/regen_readme.py` puts the table in the README.
#
#   bash benchmarks/gpu.sh [OUT.json]
#   FASTVAR_GPU_SMOKE=1 bash benchmarks/gpu.sh OUT.json   # tiny widths on CPU (tests/test_gpu_script.py)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/gpu.json}"
PY="${PYTHON:-python}"
if [ "${FASTVAR_GPU_SMOKE:-0}" = "1" ]; then
  exec "$PY" benchmarks/gpu_bench.py --smoke --device cpu --dtype bf16 --repeats 1 --warmup 0 --out "$OUT"
fi
exec timeout "${FASTVAR_GPU_TIMEOUT:-480}" "$PY" benchmarks/gpu_bench.py --device cuda --dtype bf16 \
  --repeats "${FASTVAR_GPU_REPEATS:-3}" --warmup 1 --budget-s "${FASTVAR_GPU_BUDGET:-450}" --out "$OUT"
