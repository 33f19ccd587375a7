#!/usr/bin/env bash
# One prepared command for an H100 session (issue 6): the ClipBERT-base training-throughput
# comparison of benchmarks/bench_train.py (plain PyTorch baseline vs siasam-fast, and each
# optimisation alone), sized to finish in under 8 minutes. Run from the repository root:
#
#     bash scripts/gpu_bench_train.sh
#
# Steps (each prints its elapsed time):
#  1. Staged packages, if any (scripts/gpu_stage.sh): the .stage* folders carried with this call
#     and those earlier calls copied to /tmp/stage, reassembled and installed into /tmp/site, which
#     goes on PYTHONPATH (its bin/ on PATH).
#     Needed on the H100 image: deepspeed (+ hjson, pydantic, pydantic-core, annotated-types,
#     typing-inspection: bench_train imports siasam_fast.training, which imports DeepSpeed),
#     av (PyAV), nvidia-dali-cuda130 (else the siasam-fast rows use pyav and say so, and amp-dali is
#     skipped). ../shared/tools/stage-gpu-wheels stages all of them. A small pack of DeepSpeed and
#     its dependencies beside an existing staging (a few MB; on the CPU machine, repository root):
#       d=$(mktemp -d); python3 -m pip download -q --no-deps --only-binary=:all: \
#         --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$d" hjson==3.1.0 \
#         pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       && python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$d" \
#       && mkdir -p .stage-ds && tar cf .stage-ds/deepspeed.tar -C "$d" .
#     ninja, msgpack, psutil, py-cpuinfo and einops are on the image already.
#  2. Import check: versions, or what is missing (the run stops without DeepSpeed or PyAV).
#  3. DeepSpeed FusedAdam JIT build (ninja + nvcc, sm_90) in the background while the 224 px
#     synthetic set is generated (384 videos under data/bench_train/, cached; 16 cores: ~30 s).
#     bench_train.py loads it from the cache once more before the variants (it builds it there
#     when this step did not run): if the build fails (here or there: a failure here is handed to
#     bench_train.py, which then does not try again), the fast-* rows use torch AdamW(fused=True)
#     and say so (the table's notes column), and the amp-fused-adam toggle is skipped with the
#     reason (never timed on a stand-in); no variant spends its own time on the build.
#  4. bench_train.py --config configs/clipbert_base.yaml: 12 variants, each in its own process;
#     per variant 3 warm-up steps, then the loader's prefetched batches dropped (pyav: 12 workers x
#     2, DALI: 2; no training, so seconds) and 2 settling steps, so that the timed window is not
#     served from the start-up backlog, then 2 x 8 timed steps; traces of baseline-amp and
#     fast-bf16. A time budget skips a variant when less time is left than its base row took (said
#     in the table) so the whole script ends by ~7.5 min.
#  5. Results: benchmarks/results/bench_train_<gpu>_clipbert_base.{csv,md,png,json}, traces/ and
#     logs/ there; copied to $OUT when it is set (7 files: csv, md, png, json, two traces,
#     bench_train_logs.tgz with each variant's log and the console). Notes and table print last.
#
# Environment knobs: CONFIG (default configs/clipbert_base.yaml), STEPS (8), WARMUP (3: before the
# drain; bench_train adds 2 settling steps after it),
# VARIANTS (default: all), PROFILE ("baseline-amp fast-bf16"), DEADLINE_S (whole script, 450),
# VARIANT_TIMEOUT_S (150: the siasam-fast rows had never run on a GPU when it was set; the
# baselines took 44-51 s on an H200), NUM_VIDEOS (384), SKIP_STAGE=1 (no staging step), PY (python3),
# RESULTS (benchmarks/results: where bench_train.py writes; its CSV, table and JSON are rewritten
# after every variant, so a run cut short keeps the variants that finished).
# A CPU dry run of the flow: SKIP_STAGE=1 CONFIG=configs/bench_tiny.yaml STEPS=1 WARMUP=1
# VARIANTS="baseline-fp32 fast-bf16" PROFILE=baseline-fp32 PY=.venv/bin/python bash <this file>
#
# What to look for in the traces (benchmarks/results/traces/*.json.gz; open in
# https://ui.perfetto.dev or chrome://tracing; each step is labelled data / forward / backward /
# optimizer on the CPU thread):
#  - GPU idle during "data": the loader starves the GPU. baseline-amp: how long next() waits, the
#    pinned host-to-device copy of 8 x 72 frames (~350 MB fp32) per step; fast-bf16: DALI's frames
#    arrive on the GPU in fp16 (no large Memcpy HtoD in "data").
#  - forward/backward: ResNet-50 convolution kernels dominate; baseline runs them on 576 frames per
#    step, dedup on ~296: the kernels should be the same, about half as many frames. Look for
#    nchwToNhwc / nhwcToNchw transposes around the convolutions (NCHW input to tensor-core kernels):
#    channels_last would remove them (a next step, not done here).
#  - the siamese loss: ~30 small eager kernels (softmax, bmm, ...) in baseline-amp vs two Triton
#    kernels (forward, backward) in fast-bf16; microseconds either way next to the CNN.
#  - optimizer: torch AdamW (foreach) launches multi_tensor_apply kernels per group, FusedAdam one
#    multi_tensor_adam per chunk; GradScaler adds a non-finite check and a device-to-host sync
#    (cudaStreamSynchronize / Memcpy DtoH) per step, DeepSpeed fp16 its own overflow check.
#  - ZeRO-2 on one GPU: reduce-scatter / all-gather become copies (ncclKernel or memcpy) in the
#    backward (overlap_comm: on a side stream); on 1 GPU they are pure overhead, paid back only
#    across GPUs (docs/scaling.md).
#  - gaps between kernels in the BERT part (72 sequences of ~28 tokens: small matrices): launch
#    bound; CUDA graphs or larger batches would close them.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$SECONDS
PY=${PY:-python3}
CONFIG=${CONFIG:-configs/clipbert_base.yaml}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-3}
VARIANTS=${VARIANTS:-}
PROFILE=${PROFILE:-baseline-amp fast-bf16}
DEADLINE_S=${DEADLINE_S:-450}
VARIANT_TIMEOUT_S=${VARIANT_TIMEOUT_S:-150}
NUM_VIDEOS=${NUM_VIDEOS:-384}
SITE=${SITE:-/tmp/site}
STAGE=${STAGE:-/tmp/stage}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS/logs"
say() { echo "[$((SECONDS - T0)) s] $*"; }

# 1. staged wheels (unless SKIP_STAGE=1); siasam_fast and siasam_kernels on the path -------------
# shellcheck source=scripts/gpu_stage.sh
source scripts/gpu_stage.sh
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed's JIT builds: this GPU only

# 2. what is importable ----------------------------------------------------------------------------
say "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "  /dev/shm: " $2 " (" $4 " free)"}'
"$PY" - <<'EOF'
import importlib
missing = []
for name in ("torch", "triton", "transformers", "deepspeed", "av", "nvidia.dali", "siasam_fast",
             "siasam_kernels"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:15s} {getattr(module, '__version__', 'ok')}")
    except Exception as err:  # noqa: BLE001
        print(f"  {name:15s} MISSING ({type(err).__name__}: {err})")
        missing.append(name)
import torch
print(f"  cuda {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (no GPU)'}")
need = [m for m in missing if m in ("deepspeed", "av", "siasam_fast", "siasam_kernels")]
if need:
    raise SystemExit(f"cannot run without {need}: stage them with ../shared/tools/stage-gpu-wheels "
                     "on the CPU machine, carry every .stage folder (one per call), then rerun")
EOF
[ $? -eq 0 ] || exit 3

# 3. FusedAdam JIT build in the background, data in the foreground ---------------------------------
BUILD=""
if command -v nvidia-smi >/dev/null; then
  say "building DeepSpeed FusedAdam (background) and generating the synthetic set"
  # bench_train's own build step: the arch list rewritten as DeepSpeed can parse it ("9.0a" on
  # the image stopped the plain FusedAdamBuilder().load() of earlier versions of this script).
  ( timeout 300 "$PY" benchmarks/bench_train.py --config "$CONFIG" --build-fused-adam ) \
    > "$RESULTS/logs/fused_adam_build.log" 2>&1 &
  BUILD=$!
fi
"$PY" benchmarks/bench_train.py --config "$CONFIG" --num-videos "$NUM_VIDEOS" --prepare-only \
  || { say "data generation failed"; exit 4; }
if [ -z "$BUILD" ]; then
  say "data ready (no GPU: no FusedAdam build)"
elif wait "$BUILD"; then
  say "data ready, FusedAdam built"
else
  rc=$?
  say "FusedAdam build failed (tail of $RESULTS/logs/fused_adam_build.log below): the fast-*" \
    "rows fall back to torch AdamW(fused=True) and say so; amp-fused-adam is skipped"
  tail -5 "$RESULTS/logs/fused_adam_build.log"
  # Handed to bench_train.py: it does not build again (the same failure, or the same 300 s).
  why=$(grep -v '^[[:space:]]*$' "$RESULTS/logs/fused_adam_build.log" | tail -1 | cut -c1-300)
  [ "$rc" -eq 124 ] && why="the build took over 300 s"
  export SIASAM_BENCH_FUSED_ADAM_PROBLEM="its build failed: ${why:-exit status $rc}"
fi

# 4. the benchmark --------------------------------------------------------------------------------
BUDGET=$((DEADLINE_S - (SECONDS - T0) - 15))
if [ "$BUDGET" -lt 30 ]; then
  say "no time left for bench_train (DEADLINE_S=$DEADLINE_S, ${BUDGET} s left after the set-up)"
  exit 5
fi
say "bench_train: $CONFIG, $STEPS steps x 2 passes, time budget ${BUDGET} s"
# shellcheck disable=SC2086  # VARIANTS and PROFILE are lists of variant names
"$PY" benchmarks/bench_train.py --config "$CONFIG" --steps "$STEPS" --warmup "$WARMUP" \
  --out "$RESULTS" ${VARIANTS:+--variants $VARIANTS} \
  --profile $PROFILE --profile-steps 2 --profile-gzip \
  --isolate process \
  --time-budget "$BUDGET" --variant-timeout "$VARIANT_TIMEOUT_S" 2>&1 \
  | tee "$RESULTS/logs/console.log"
STATUS=${PIPESTATUS[0]}

# 5. results to $OUT, then the table last ---------------------------------------------------------
# The newest of STEM.csv (a finished run) and STEM.partial.csv (a run cut short: the variants
# that finished, "complete" False).
CFG_NAME=$(basename "$CONFIG" .yaml)
NEWEST=$(ls -t "$RESULTS"/bench_train_*_"$CFG_NAME".csv \
  "$RESULTS"/bench_train_*_"$CFG_NAME".partial.csv 2>/dev/null | head -1)
STEM=${NEWEST%.csv}
STEM=${STEM%.partial}
if [ -n "${OUT:-}" ] && [ -n "$NEWEST" ] && mkdir -p "$OUT"; then
  FILES=("$STEM".csv "$STEM".md "$STEM".png "$STEM".json)
  [ "$NEWEST" = "$STEM.partial.csv" ] && FILES=("$STEM".partial.csv "$STEM".partial.md \
    "$STEM".partial.json)
  cp "${FILES[@]}" "$OUT"/ 2>/dev/null
  for t in "$RESULTS"/traces/trace_"$(basename "$STEM")"_*.json.gz; do
    [ -f "$t" ] && cp "$t" "$OUT"/
  done
  tar czf "$OUT/bench_train_logs.tgz" -C "$RESULTS" logs 2>/dev/null
  say "copied results to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
say "done (exit status $STATUS)"
sed -n '/^notes:/,$p' "$RESULTS/logs/console.log"
exit "$STATUS"
