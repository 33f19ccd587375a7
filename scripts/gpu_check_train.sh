#!/usr/bin/env bash
# One-shot GPU check of DeepSpeed training (issue 4, item 9), for a session with an H100 / H200.
#
# Needs DeepSpeed and PyAV on the machine (the H100 image lacks both): stage them here with
# ../shared/tools/stage-gpu-wheels, carry the .stage folders, reassemble into /tmp/site, then
#   PYTHONPATH=/tmp/site bash scripts/gpu_check_train.sh
# What it checks, each printed as PASS / FAIL, with a table of summary.json numbers last:
#   1. ZeRO-2 fp16 (dynamic loss scaling) + DeepSpeed FusedAdam, 300 steps: the loss falls, the
#      loss scale moves, overflow steps are skipped, no NaN weights (the final eval is finite);
#   2. the same in bf16;
#   3. a checkpoint saved after 150 fp16 steps resumes and runs to 300;
#   4. fp16 with the fused Triton siamese kernels (siamese.impl=triton);
#   5. steps/s and peak GPU memory per ZeRO stage (0-3, fp16) on the ClipBERT-base-like config;
#   6. fp16 with gradient accumulation (train.grad_accum=4 x 4 videos, the batch of 16 of the other
#      runs): the loss scaler with steps of several micro-batches (the CPU tests cannot run fp16);
#   7. fp16 with task=multi (open-ended and multiple-choice batches interleaved, one head each):
#      the loss scaler with heads that a step leaves without a gradient.
# About 6-8 minutes on an H100 (FusedAdam's JIT build included); QUICK=1 runs a third of the
# steps (100 + 100 resumed fp16, 100 bf16, 100 triton, 10 per ZeRO stage) in about 3-4 minutes.
# RUNS, if set, names the runs to do (space-separated, from fp16_half fp16_resume bf16_zero2
# fp16_triton fp16_accum fp16_multi base_zero2 base_zero3 base_zero1); the others are
# skipped.
set -u
source "$(dirname "$0")/gpu_env.sh"  # repository root, PYTHONPATH, $PY
OUT=${OUT:-/tmp/gpu_check_train}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then S_FULL=200; S_HALF=100; S_RUN=100; S_BASE=10; RUN_TIMEOUT=150
else S_FULL=300; S_HALF=150; S_RUN=300; S_BASE=40; RUN_TIMEOUT=600; fi
# The launcher script may not be on PATH when DeepSpeed was installed with pip --target.
read -r -a LAUNCH <<< "$(command -v deepspeed || echo "$PY -m deepspeed.launcher.runner")"
DATA=data/gpu_synthetic

if [ ! -f "$DATA/manifest.jsonl" ]; then
  $PY -m siasam_fast.cli synth --out "$DATA" --videos 800 --seed 0 --size 64 --workers 12 \
    > "$OUT/synth.log" 2>&1 || { echo "FAIL synth (see $OUT/synth.log)"; exit 1; }
fi

# Enough epochs that the learning-rate schedule (10 % warm-up, then linear decay) spans about
# 1.25 x the longest run: the checks then see the loss fall rather than the warm-up.
EPOCHS=$($PY -c "import json, math, sys; n = len(json.load(open(sys.argv[1])));
print(max(1, math.ceil(1.25 * $S_FULL / math.ceil(n / 16))))" "$DATA/annotations/train_qa.json")
common=(--config configs/synthetic.yaml
  --set "data.train=$DATA/annotations/train_qa.json" --set "data.val=$DATA/annotations/val_qa.json"
  --set "data.test=" --set "data.manifest=$DATA/manifest.jsonl" --set data.num_workers=6
  --set data.backend=pyav --set train.epochs=$EPOCHS --set train.batch_size=16)

run() {  # name, then train.py arguments
  local name=$1; shift
  if [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]]; then
    echo "SKIP $name (not in RUNS)"; return
  fi
  if timeout "$RUN_TIMEOUT" "${LAUNCH[@]}" --num_gpus 1 train.py "$@" > "$OUT/$name.log" 2>&1; then
    echo "PASS $name"
  else
    echo "FAIL $name (exit $?, see $OUT/$name.log)"; tail -5 "$OUT/$name.log"
  fi
}

# The resumed run doubles as the fp16 check: steps 1..S_HALF, then a restart from its checkpoint.
run fp16_half --deepspeed_config configs/ds/zero2_fp16.json "${common[@]}" \
  --set train.max_steps=$S_HALF --set "train.out_dir=$OUT/fp16_zero2"
run fp16_resume --deepspeed_config configs/ds/zero2_fp16.json "${common[@]}" \
  --set train.max_steps=$S_FULL --set "train.out_dir=$OUT/fp16_zero2" --resume auto
run bf16_zero2 --deepspeed_config configs/ds/zero2_bf16.json "${common[@]}" \
  --set train.max_steps=$S_RUN --set "train.out_dir=$OUT/bf16_zero2"
run fp16_triton --deepspeed_config configs/ds/zero2_fp16.json "${common[@]}" \
  --set train.max_steps=$S_RUN --set siamese.impl=triton --set "train.out_dir=$OUT/fp16_triton"
run fp16_accum --deepspeed_config configs/ds/zero2_fp16.json "${common[@]}" \
  --set train.batch_size=4 --set train.grad_accum=4 --set train.max_steps=$S_RUN \
  --set "train.out_dir=$OUT/fp16_accum"
run fp16_multi --deepspeed_config configs/ds/zero2_fp16.json "${common[@]}" \
  --set task=multi --set data.train= --set data.val= \
  --set "data.tasks={qa: {task: open, train: $DATA/annotations/train_qa.json, val: $DATA/annotations/val_qa.json}, choice: {task: mc, dataset: how2qa, train: $DATA/annotations/how2qa_train.jsonl, val: $DATA/annotations/how2qa_val.jsonl}}" \
  --set train.max_steps=$S_RUN --set "train.out_dir=$OUT/fp16_multi"
for stage in 2 3 1; do  # (fp16 with ZeRO-0 is refused: README, "Which ZeRO stage")
  run "base_zero$stage" --deepspeed_config "configs/ds/zero${stage}_fp16.json" \
    --config configs/clipbert_base.yaml --set "data.train=$DATA/annotations/train_qa.json" \
    --set "data.val=" --set "data.test=" --set "data.manifest=$DATA/manifest.jsonl" \
    --set data.backend=pyav --set data.num_workers=12 --set train.max_steps=$S_BASE \
    --set "train.out_dir=$OUT/base_zero$stage"
done

$PY - "$OUT" <<'EOF'
import csv, json, math, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    steps_csv = run / "metrics_steps.csv"
    if not steps_csv.is_file():
        continue
    steps = list(csv.DictReader(steps_csv.open()))
    losses = [float(r["loss"]) for r in steps]
    first, last = losses[:20], losses[-20:]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    rows.append({
        "run": run.name, "steps": len(steps),
        "loss first20": sum(first) / len(first), "loss last20": sum(last) / len(last),
        "nan losses": sum(not math.isfinite(x) for x in losses),
        "loss scale min/max": f"{min(float(r['loss_scale']) for r in steps):g}/"
                              f"{max(float(r['loss_scale']) for r in steps):g}",
        "skipped": steps[-1]["skipped_steps"],
        "steps/s": summary.get("steps_per_s"),
        # steady state: the median step after the first 3 (cuDNN autotuning, allocator warm-up)
        "median step s": statistics.median(float(r["step_s"]) for r in steps[3:] or steps),
        "data wait %": 100 * sum(float(r["data_s"]) for r in steps[3:] or steps)
                       / sum(float(r["step_s"]) for r in steps[3:] or steps),
        "peak GB": summary.get("peak_memory_gb"),
        "zero": summary.get("zero_stage"), "precision": summary.get("precision"),
        "optimizer": summary.get("optimizer"),
    })
    falls = rows[-1]["loss last20"] < rows[-1]["loss first20"]
    print(("PASS" if falls and not rows[-1]["nan losses"] else "CHECK"), run.name,
          "loss falls" if falls else "loss does not fall", flush=True)
from siasam_fast.benchutil import environment, format_table, write_csv
write_csv(rows, out / "train_check.csv", environment())
print(format_table(rows))
EOF
