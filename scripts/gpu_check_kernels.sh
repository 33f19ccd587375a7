#!/usr/bin/env bash
# One-shot GPU check of the fused siamese kernels (issue 3), sized to finish within 10 minutes on an
# H100 (about 6 with TUNE=0):
#   1. tests/test_siamese_kernels.py on the GPU (every case, plus auto dispatch and large shapes in
#      fp16 / bf16 / fp32; the ahead-of-time sm_70 / sm_90 compile test runs only without a GPU);
#   2. bench_kernels --quick with --check: Triton and eager, every dtype and mode, each impl first
#      verified against a float64 reference;
#   3. the same points under torch.compile (default mode), fp16;
#   4. with TUNE=1 (the default): launch settings swept at target B (fp16)
#      (bench_kernels.py --sweep-configs) and an Nsight Compute profile of both kernels at target B
#      ($OUT/ncu.log: throughput, memory, occupancy, warp stalls);
#   5. torch.compile(mode="max-autotune") at the two target shapes, fp16, forward+backward
#      (MAX_AUTOTUNE_S seconds at most: it autotunes for minutes).
# Each step has its own time limit and prints PASS / FAIL with its time; logs and CSVs go to $OUT.
# PREPARE, if set, is a command run in the background during step 1 only (e.g. generating the data
# of a later check), so that it never competes with the timed steps.
# Combine the CSVs' target rows with: python benchmarks/bench_kernels.py --combine $OUT/*.csv
set -u
source "$(dirname "$0")/gpu_env.sh"  # repository root, PYTHONPATH, $PY
OUT=${OUT:-/tmp/gpu_check_kernels}
mkdir -p "$OUT"

step() {  # name, time limit in seconds, then the command
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s)"
  else
    echo "FAIL $name (exit $?, $((SECONDS - start)) s, see $OUT/$name.log)"
    tail -15 "$OUT/$name.log"
  fi
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
if [ -n "${PREPARE:-}" ]; then
  bash -c "$PREPARE" > "$OUT/prepare.log" 2>&1 &
  prep=$!
fi
step pytest_gpu 120 $PY -m pytest -q -p no:cacheprovider tests/test_siamese_kernels.py
if [ -n "${PREPARE:-}" ]; then
  wait "$prep" && echo "PASS prepare" || { echo "FAIL prepare (exit $?)"; tail -5 "$OUT/prepare.log"; }
fi
step bench_triton_eager 120 $PY benchmarks/bench_kernels.py --quick --check --impls triton,eager \
  --out "$OUT" --tag triton-eager
step bench_compile 100 $PY benchmarks/bench_kernels.py --quick --impls compile --dtypes fp16 \
  --out "$OUT" --tag compile
if [ "${TUNE:-1}" = 1 ]; then
  # Launch settings at target B (fp16), then where the time goes in each kernel.
  step sweep_configs 110 $PY benchmarks/bench_kernels.py --sweep-configs --dtypes fp16 \
    --out "$OUT"
  step ncu 80 ncu -k regex:_siamese --launch-skip 2 --launch-count 2 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    $PY scripts/ncu_siamese.py --V 4096 --D 768 --K 4096
fi
step bench_compile_max "${MAX_AUTOTUNE_S:-40}" $PY benchmarks/bench_kernels.py --targets-only \
  --impls compile-max --dtypes fp16 --modes full --out "$OUT" --tag compile-max
$PY benchmarks/bench_kernels.py --combine "$OUT"/bench_kernels_*.csv 2>&1 | tee "$OUT/combined.log"
