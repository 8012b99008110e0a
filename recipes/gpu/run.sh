#!/usr/bin/env bash
# The whole GPU measurement in one call (issue 9): synthesis speed of the paper-size models in
# every dtype and batch, with and without torch.compile, plus teacher-training and distillation
# throughput (bf16 autocast) on the generated demo corpus (no download needed).
#
#   bash recipes/gpu/run.sh [OUT_DIR]        (default exp/gpu)
#
# Environment: EXPERIMENT (paper), STEPS (30 training steps per run), SECONDS_OF_AUDIO (10),
# TEACHER_SECONDS (0.5), REPEATS (5); the tests run it on CPU at debug size with tiny values.
#
# Writes OUT_DIR/bench-*/bench.{json,md,png} and OUT_DIR/train-*/metrics.jsonl, and prints a
# summary. Runs on CPU too (slowly), which is how it is tested.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-exp/gpu}
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
device=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
experiment=${EXPERIMENT:-paper}
steps=${STEPS:-30}
seconds=${SECONDS_OF_AUDIO:-10}
teacher_seconds=${TEACHER_SECONDS:-0.5}
repeats=${REPEATS:-5}
echo "device $device, experiment $experiment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

dtypes="[fp32,tf32,bf16,fp16]"
if [ "$device" = cpu ]; then dtypes="[fp32]"; fi
$py -m vocoder.cli.bench output=$out/bench-eager device=$device experiment=$experiment \
  seconds=$seconds "batches=[1,8]" "dtypes=$dtypes" teacher_seconds=$teacher_seconds \
  repeats=$repeats
if [ "$device" = cuda ]; then
  $py -m vocoder.cli.bench output=$out/bench-compiled device=$device experiment=$experiment \
    seconds=$seconds "batches=[1,8]" "dtypes=$dtypes" "models=[student,waveglow]" compile=true \
    repeats=$repeats
fi

common=(data=demo data.n_utterances=60 data.cache_dir=$out/data experiment=$experiment
        trainer.device=$device trainer.max_steps=$steps trainer.val_every=100000
        trainer.ckpt_every=100000 trainer.log_every=10 trainer.warmup_steps=0
        trainer.segment_frames=32 trainer.num_workers=4 trainer.progress=false)
$py -m vocoder.cli.train model=teacher "${common[@]}" run_dir=$out/train-teacher-fp32
$py -m vocoder.cli.train model=teacher "${common[@]}" run_dir=$out/train-teacher-bf16 trainer.amp=bf16
for amp in none bf16; do
  $py -m vocoder.cli.distill teacher=$out/train-teacher-fp32/checkpoints/last.pt "${common[@]}" \
    run_dir=$out/train-student-$amp trainer.amp=$amp
done
$py -m vocoder.cli.train model=waveglow "${common[@]}" run_dir=$out/train-waveglow-bf16 trainer.amp=bf16

echo "== training throughput (audio samples/s through the whole step, last log window)"
for d in $out/train-*; do
  $py - "$d" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if '"train"' in l]
print(f"{sys.argv[1]}: {rows[-1]['samples_per_s']:,.0f} samples/s, {rows[-1]['steps_per_s']:.2f} steps/s")
PY
done
cat $out/bench-*/bench.md
