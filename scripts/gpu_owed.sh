#!/usr/bin/env bash
# The GPU measurements the open issues still owe, in one loan of two calls (the device stops a
# call at 600 s), each part within its own time:
#
#   checks     siasam-fast env; pytest tests/test_model.py tests/test_frame_fit.py  the machine
#              report (fused loss and NVDEC on tiny inputs), the GPU-only model tests, and NVDEC's
#              data.frame_fit=pad against PyAV
#   dali       python scripts/gpu_check_dali.py           issue 5: NVDEC correctness + throughput
#   transcode  python benchmarks/bench_transcode.py ...   issue 7: DALI on GOP 8/16/32 copies
#   train      bash scripts/gpu_bench_train.sh            issue 6: baselines vs siasam-fast
#
# Run from the repository root after staging (docs/gpu_runbook.md: ../shared/tools/stage-gpu-wheels
# here, then the run calls back to back, this script in the last ones). The device tool stops a
# call at 600 s, so a 15-minute loan takes this script twice, in the same message as the staging
# calls (the machine stays warm between them and the second call finds the packages installed):
#
#     bash scripts/gpu_owed.sh                          # checks + dali, within 570 s
#     PARTS=train BUDGET_S=330 bash scripts/gpu_owed.sh # the next call (what is left)
#
# Knobs: PARTS (default "checks dali": which parts, in this order; "train" takes the second call
# of a loan, "transcode" the next loan), BUDGET_S (default 570: this call, staging included; keep
# it under the 600 s per-call limit so that the last part's files get packed), PACK_EVERY_S
# (default 20: how often the running part's folder is packed), SKIP_STAGE=1, PY (python3), KEEP
# (default /tmp/owed: full outputs).
# CHECKS_S (default 120: the most the checks part takes; `siasam-fast env` gets half of it, at
# most 30 s, the model tests the rest, at most 90 s), TRANSCODE_ARGS (arguments of
# bench_transcode.py without --out-dir; default: the ones set below, not those of the runbook's
# item 3, which passes its own), DALI_ARGS (more arguments of
# gpu_check_dali.py, e.g. --skip-bench: its correctness sections only, trimmed files included),
# DALI_S (default: none: the most the dali part takes, below its share; e.g. 150 with
# --skip-bench, so that a slow check leaves the next part its time).
#
# Time: each part gets what is left of BUDGET_S minus the minimum of the parts after it (checks
# 20 s, dali 240 s, transcode 120 s, train 150 s); a part whose share is below its own minimum is
# skipped and said so. checks (at most 120 s), dali (~5 min) and transcode (~2-3 min) are cut by
# `timeout` at their share; train passes its share to gpu_bench_train.sh as DEADLINE_S, whose
# time budget skips the variants that no longer fit and says so in its table. Put the part that
# must finish first in PARTS.
#
# Output: every part writes under $KEEP/<part>/ (its console log included). While a part runs,
# its folder is packed into $OUT/<part>.tgz every PACK_EVERY_S seconds, and once more when it ends,
# so a call stopped from outside (the device's limit) still returns what had finished: the DALI
# check rewrites its CSV after each measurement, bench_train.py and bench_transcode.py their
# NAME.partial.csv (NAME.csv once they finish). At most 8 files come back
# from $OUT: a tarball per part and owed.log. The console ends with each part's status.
#
# A CPU dry run of the flow (the GPU parts fail or skip quickly and say why):
#   SKIP_STAGE=1 PY=.venv/bin/python BUDGET_S=900 PARTS="checks dali" OUT=/tmp/owed_out \
#     bash scripts/gpu_owed.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$SECONDS
PY=${PY:-python3}
PARTS=${PARTS:-checks dali}
BUDGET_S=${BUDGET_S:-570}
PACK_EVERY_S=${PACK_EVERY_S:-20}
CHECKS_S=${CHECKS_S:-120}
DALI_ARGS=${DALI_ARGS:-}
DALI_S=${DALI_S:-}
TRANSCODE_ARGS=${TRANSCODE_ARGS:---workers 16 --backend dali --samplings paper shift16 --batch-size 8 --min-videos 128 --dali-groups 1 --dali-trim both}
KEEP=${KEEP:-/tmp/owed}
# train: 150 s is set-up on a warm machine (data and FusedAdam cached), a base row and a toggle;
# the runbook's second call of a loan gives it BUDGET_S=230.
declare -A MIN=([checks]=20 [dali]=240 [transcode]=120 [train]=150)
declare -A STATUS=()
mkdir -p "$KEEP"
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
LOG=$KEEP/owed.log
: > "$LOG"
say() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$LOG"; }
pack() {  # $KEEP/$1 -> $OUT/$1.tgz (written aside, then renamed: never half a tarball); quiet=$2
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/$1.tgz.part" -C "$KEEP" "$1" 2>/dev/null && mv -f "$OUT/$1.tgz.part" "$OUT/$1.tgz" \
    && [ -z "${2:-}" ] && say "packed $KEEP/$1 -> \$OUT/$1.tgz"
  cp "$LOG" "$OUT/owed.log"
}
packer() {  # pack part $1 every PACK_EVERY_S seconds until TERM
  # On TERM a pack in progress finishes first (bash runs the trap after its foreground tar), so
  # the final pack below never races a half-written one; the sleep is waited on in the background
  # so that TERM ends it at once, and the trap ends the sleep too: left running, it would hold
  # this script's stdout open for up to PACK_EVERY_S after the script ended (a reader of the
  # output through a pipe, the device tool's included, waits for that).
  local nap=""
  trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "$PACK_EVERY_S" &
    nap=$!
    wait "$nap"
    pack "$1" quiet
  done
}
for part in $PARTS; do
  [ -n "${MIN[$part]:-}" ] || {
    echo "PARTS: unknown part '$part' (valid: checks dali transcode train)"; exit 2; }
done

# Staged packages (unless SKIP_STAGE=1), and siasam_fast / siasam_kernels on the path.
# shellcheck source=scripts/gpu_stage.sh
source scripts/gpu_stage.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# FusedAdam's JIT build (about a minute of nvcc) starts now, in the background, when train is one
# of the parts: the parts before it use that time, and gpu_bench_train.sh's own build step then
# finds it in torch's extension cache (a build still running holds its lock: it waits, then
# loads). Its log: $KEEP/fused_adam_early.log.
if [[ " $PARTS " == *" train "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  ( timeout 300 "$PY" benchmarks/bench_train.py --build-fused-adam ) \
    > "$KEEP/fused_adam_early.log" 2>&1 &
  say "FusedAdam build started in the background"
fi

share() {  # seconds for part $1: what is left minus the minimum of the parts after it
  local after=0 seen=0 p
  for p in $PARTS; do
    [ "$seen" = 1 ] && after=$((after + MIN[$p]))
    [ "$p" = "$1" ] && seen=1
  done
  echo $((BUDGET_S - (SECONDS - T0) - after))
}

run_checks() {  # `siasam-fast env` (at most 30 s), then the GPU-only tests of the model
  local dir=$KEEP/checks t=$1 start=$SECONDS rc env_t
  mkdir -p "$dir"
  [ "$t" -gt "$CHECKS_S" ] && t=$CHECKS_S
  env_t=$((t / 2))
  [ "$env_t" -gt 30 ] && env_t=30
  timeout --kill-after=5 "$env_t" "$PY" -m siasam_fast.envcheck --json "$dir/env.json" 2>&1 \
    | tee "$dir/env.log"
  rc=${PIPESTATUS[0]}
  echo "siasam-fast env: exit status $rc (1: a fail row; 124: cut at $env_t s)" \
    | tee -a "$dir/env.log"
  t=$((t - (SECONDS - start)))
  [ "$t" -gt 90 ] && t=90
  if [ "$t" -lt 10 ]; then
    echo "tests/test_model.py tests/test_frame_fit.py: not run, $t s left of the part's share" \
      | tee "$dir/console.log"
    return 124
  fi
  timeout --kill-after=10 "$t" "$PY" -m pytest -q -rs tests/test_model.py tests/test_frame_fit.py 2>&1 \
    | tee "$dir/console.log"
  return "${PIPESTATUS[0]}"
}

run_dali() {
  local dir=$KEEP/dali t=$1
  mkdir -p "$dir"
  [ -n "$DALI_S" ] && [ "$t" -gt "$DALI_S" ] && t=$DALI_S
  # shellcheck disable=SC2086  # DALI_ARGS is a list of arguments
  timeout --kill-after=10 "$t" "$PY" scripts/gpu_check_dali.py --out "$dir" \
    --work /tmp/owed_dali_work $DALI_ARGS 2>&1 | tee "$dir/console.log"
  return "${PIPESTATUS[0]}"
}

run_transcode() {
  local dir=$KEEP/transcode
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # TRANSCODE_ARGS is a list of arguments
  timeout --kill-after=10 "$1" "$PY" benchmarks/bench_transcode.py $TRANSCODE_ARGS \
    --out-dir "$dir" 2>&1 \
    | tee "$dir/console.log"
  return "${PIPESTATUS[0]}"
}

run_train() {
  local dir=$KEEP/train
  mkdir -p "$dir"
  # gpu_bench_train.sh keeps its own clock: its deadline is this part's share.
  # 6 timed steps x 2 passes after 2 warm-ups (gpu_bench_train.sh alone: 8 and 3) so that the
  # 12 variants fit one call (the second of a loan, after checks and dali).
  STEPS=${STEPS:-6} WARMUP=${WARMUP:-2} SKIP_STAGE=1 DEADLINE_S="$1" RESULTS="$dir/results" \
    OUT="" PY="$PY" bash scripts/gpu_bench_train.sh 2>&1 \
    | tee "$dir/console.log"
  return "${PIPESTATUS[0]}"
}

for part in $PARTS; do
  budget=$(share "$part")
  if [ "$budget" -lt "${MIN[$part]}" ]; then
    STATUS[$part]="skipped: ${budget} s left for it, it needs ${MIN[$part]} s"
    say "$part ${STATUS[$part]}"
    continue
  fi
  say "$part: up to $budget s"
  start=$SECONDS
  packer_pid=""
  if [ -n "${OUT:-}" ]; then
    packer "$part" &
    packer_pid=$!
  fi
  "run_$part" "$budget"
  rc=$?
  [ -n "$packer_pid" ] && { kill "$packer_pid" 2>/dev/null; wait "$packer_pid" 2>/dev/null; }
  case $rc in
    0) STATUS[$part]="ok" ;;
    124 | 137) STATUS[$part]="cut at its ${budget} s share (what finished is in the log)" ;;
    *) STATUS[$part]="exit status $rc" ;;
  esac
  say "$part: ${STATUS[$part]}, $((SECONDS - start)) s"
  pack "$part"
done

say "summary (budget $BUDGET_S s)"
for part in $PARTS; do
  say "  $part: ${STATUS[$part]}"
done
[ -n "${OUT:-}" ] && cp "$LOG" "$OUT/owed.log"
exit 0
