#!/usr/bin/env bash
# The GPU measurement of issue 9, in stages that each fit one call of a lent machine.
#
#   bash recipes/gpu/run.sh [OUT_DIR] [STAGE ...]        (default exp/gpu, every stage)
#
# Stages, in this order:
#   check     tests/test_cuda.py: the CUDA paths (teacher CUDA graph, every dtype, compile,
#             bf16 autocast, vocoder-synth device=cuda) give the CPU's results
#   bench     vocoder-bench of the paper-size student and WaveGlow (fp32/tf32/bf16/fp16,
#             batches 1 and 8) -> bench-eager/, and of the teacher's cached sampling through
#             its CUDA graph (fp32/bf16, batches 1 and 8) -> bench-teacher/
#   compiled  the student/WaveGlow bench with torch.compile: bf16 at batch 1 (the target's
#             setting) -> bench-compiled/, then fp32/bf16 at batch 8 -> bench-compiled-more/
#   train     teacher training (fp32, bf16), distillation (fp32, bf16, and on CUDA bf16 with
#             trainer.compile=true) and WaveGlow training (bf16) throughput on the generated
#             demo corpus -> train-*/metrics.jsonl
#
# Environment: EXPERIMENT (paper), STEPS (30 training steps per run), SECONDS_OF_AUDIO (10),
# TEACHER_SECONDS (0.5), REPEATS (5); STAGE_LIMIT (seconds, default none) stops a stage that
# runs longer and goes on with the next; BUNDLE=FILE.tgz packs the results (no checkpoints,
# no data) into one file, for a machine that returns few files.
#
# Wheels: if .whl/ holds wheels (recipes/gpu/wheels.sh) and hydra is not importable, they are
# installed into /tmp/site first: the lent machines' image has torch but not hydra, librosa
# or soundfile, and cannot reach a package index.
#
# A stage that fails or runs out of time is reported and the next one still runs; the exit
# status is 1 if any stage failed. Runs on CPU too (slowly), which is how it is tested.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-exp/gpu}
shift || true
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then stages=(check bench compiled train); fi
for stage in "${stages[@]}"; do
  case $stage in
    check|bench|compiled|train) ;;
    *) echo "unknown stage $stage (check, bench, compiled, train)"; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

if ! $py -c "import hydra, librosa, soundfile" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $py -c "import hydra, librosa, soundfile" || {
    echo "missing packages: run recipes/gpu/wheels.sh where pip works and carry .whl"; exit 1; }
fi
# The package from this checkout, installed or not.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

device=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
experiment=${EXPERIMENT:-paper}
steps=${STEPS:-30}
seconds=${SECONDS_OF_AUDIO:-10}
teacher_seconds=${TEACHER_SECONDS:-0.5}
repeats=${REPEATS:-5}
limit=${STAGE_LIMIT:-0}
mkdir -p "$out"
echo "device $device, experiment $experiment, stages ${stages[*]}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

dtypes="[fp32,tf32,bf16,fp16]"
compiled_dtypes="[bf16,fp32]"
teacher_dtypes="[fp32,bf16]"
if [ "$device" = cpu ]; then dtypes="[fp32]"; compiled_dtypes="[fp32]"; teacher_dtypes="[fp32]"; fi

bench() {
  $py -m vocoder.cli.bench device=$device experiment=$experiment seconds=$seconds \
    teacher_seconds=$teacher_seconds repeats=$repeats "$@"
}

stage_check() {
  local workers=()
  # Four processes share the GPU: the compile tests take a minute each.
  if [ "$device" = cuda ]; then workers=(-n 4); fi
  $py -m pytest -p no:cacheprovider -q -o addopts="" "${workers[@]}" tests/test_cuda.py -rs
}

stage_bench() {
  local rc=0
  bench output=$out/bench-eager "dtypes=$dtypes" "batches=[1,8]" "models=[student,waveglow]" ||
    rc=1
  bench output=$out/bench-teacher "dtypes=$teacher_dtypes" "batches=[1,8]" "models=[teacher]" ||
    rc=1
  return $rc
}

stage_compiled() {
  if [ "$device" = cpu ]; then echo "compiled: CUDA only, skipped"; return 0; fi
  # The target setting first (bf16, batch 1), in case the stage runs out of time.
  local rc=0
  bench output=$out/bench-compiled "dtypes=[bf16]" "batches=[1]" "models=[student,waveglow]" \
    compile=true || rc=1
  bench output=$out/bench-compiled-more "dtypes=$compiled_dtypes" "batches=[8]" \
    "models=[student,waveglow]" compile=true || rc=1
  return $rc
}

stage_train() {
  local common=(data=demo data.n_utterances=60 data.cache_dir=$out/data experiment=$experiment
        trainer.device=$device trainer.max_steps=$steps trainer.val_every=100000
        trainer.ckpt_every=100000 trainer.log_every=10 trainer.warmup_steps=0
        trainer.segment_frames=32 trainer.num_workers=4 trainer.progress=false)
  local rc=0
  $py -m vocoder.cli.train model=teacher "${common[@]}" run_dir=$out/train-teacher-fp32 || rc=1
  $py -m vocoder.cli.train model=teacher "${common[@]}" run_dir=$out/train-teacher-bf16 \
    trainer.amp=bf16 || rc=1
  for amp in none bf16; do
    $py -m vocoder.cli.distill teacher=$out/train-teacher-fp32/checkpoints/last.pt \
      "${common[@]}" run_dir=$out/train-student-$amp trainer.amp=$amp || rc=1
  done
  $py -m vocoder.cli.train model=waveglow "${common[@]}" run_dir=$out/train-waveglow-bf16 \
    trainer.amp=bf16 || rc=1
  if [ "$device" = cuda ]; then  # last: compiling forward and backward takes a while
    $py -m vocoder.cli.distill teacher=$out/train-teacher-fp32/checkpoints/last.pt \
      "${common[@]}" run_dir=$out/train-student-bf16-compiled trainer.amp=bf16 \
      trainer.compile=true || rc=1
  fi
  echo "== training throughput (audio samples/s through the whole step, last log window)"
  for d in "$out"/train-*; do
    $py - "$d" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if '"train"' in l]
    print(f"{sys.argv[1]}: {rows[-1]['samples_per_s']:,.0f} samples/s, "
          f"{rows[-1]['steps_per_s']:.2f} steps/s")
except (OSError, IndexError) as e:
    print(f"{sys.argv[1]}: no training rows ({e})")
PY
  done
  return $rc
}

failed=()
for stage in "${stages[@]}"; do
  echo "== stage $stage"
  start=$SECONDS
  if [ "$limit" -gt 0 ]; then
    # A function cannot run under timeout(1); run the stage in a child bash that has them.
    export -f bench stage_check stage_bench stage_compiled stage_train
    export py device experiment seconds teacher_seconds repeats steps out dtypes \
      compiled_dtypes teacher_dtypes
    timeout --kill-after=20 "$limit" bash -c "stage_$stage"
  else
    "stage_$stage"
  fi
  rc=$?
  echo "== stage $stage: rc $rc after $((SECONDS - start)) s"
  echo "$stage rc=$rc seconds=$((SECONDS - start))" >>"$out/stages.txt"
  [ $rc -eq 0 ] || failed+=("$stage")
done

for md in "$out"/bench-*/bench.md; do
  [ -f "$md" ] && { echo "== $md"; cat "$md"; }
done
echo "== targets (issue 9)"
$py recipes/gpu/summary.py "$out" "$([ "$device" = cuda ] && echo bf16 || echo fp32)"
if [ -n "${BUNDLE:-}" ]; then
  tar czf "$BUNDLE" --exclude=checkpoints --exclude=data --exclude='*.pt' -C "$out" . &&
    echo "packed $(du -h "$BUNDLE" | cut -f1) into $BUNDLE"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "failed stages: ${failed[*]}"; exit 1; fi
