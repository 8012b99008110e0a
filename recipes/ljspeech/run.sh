#!/usr/bin/env bash
# LJSpeech: the demo's stages at published sizes, on GPU(s).
#
#   bash recipes/ljspeech/run.sh /path/to/LJSpeech-1.1 [--experiment paper|base|debug]
#        [--stage N] [--stop-stage N] [--exp DIR] [--device cuda|cpu] [-- extra overrides]
#
# Stages: 0 prepare, 1 teacher, 2 student, 3 waveglow, 4 synth, 5 bench, 6 eval + report.
# Held-out split: the last 250 utterances of metadata.csv are the test set, the 250 before
# them validation (data/ljspeech.yaml). With more than one visible GPU the training stages run
# under torchrun, one process per GPU (trainer.batch_size is per process).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then sed -n 2,10p "$0"; exit 2; fi
root=$1; shift
experiment=paper
stage=0
stop_stage=100
exp=""
device=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --experiment) experiment=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
exp=${exp:-exp/ljspeech-$experiment}
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if [ -z "$device" ]; then
  device=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
n_gpus=0
if [ "$device" = cuda ]; then n_gpus=$($py -c "import torch; print(torch.cuda.device_count())"); fi
launch=($py -m)
if [ "$n_gpus" -gt 1 ]; then launch=($py -m torch.distributed.run --standalone --nproc_per_node=$n_gpus -m); fi

common=(data=ljspeech data.root=$root data.cache_dir=$exp/data experiment=$experiment
        trainer.device=$device)
run() { echo "+ $*"; "$@"; }

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  run $py -m vocoder.cli.prepare "${common[@]}" run_dir=$exp/teacher \
    export.split=test export.dir=$exp/test_audio "${extra[@]}"
fi
if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  run "${launch[@]}" vocoder.cli.train model=teacher "${common[@]}" run_dir=$exp/teacher "${extra[@]}"
fi
if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  run "${launch[@]}" vocoder.cli.distill teacher=$exp/teacher/checkpoints/last.pt "${common[@]}" \
    run_dir=$exp/student "${extra[@]}"
fi
if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  run "${launch[@]}" vocoder.cli.train model=waveglow "${common[@]}" run_dir=$exp/waveglow "${extra[@]}"
fi
if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  # The autoregressive teacher is left out here (minutes per utterance); stage 6 scores a few.
  for m in student waveglow; do
    run $py -m vocoder.cli.synth checkpoint=$exp/$m/checkpoints/best.pt input=$exp/test_audio \
      output=$exp/synth/$m device=$device
  done
fi
if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
  run $py -m vocoder.cli.bench output=$exp/bench device=$device experiment=$experiment \
    teacher=$exp/teacher/checkpoints/best.pt student=$exp/student/checkpoints/best.pt \
    waveglow=$exp/waveglow/checkpoints/best.pt
fi
if [ $stage -le 6 ] && [ $stop_stage -ge 6 ]; then
  for m in student waveglow teacher; do
    # Student and WaveGlow: score stage 4's wavs; the teacher synthesises its 10 files here.
    limit=null; given=synthesis=$exp/synth/$m
    if [ $m = teacher ]; then limit=10; given=""; fi
    run $py -m vocoder.cli.eval checkpoint=$exp/$m/checkpoints/best.pt input=$exp/test_audio \
      output=$exp/eval/$m device=$device max_files=$limit $given
  done
  run $py -m vocoder.cli.report exp=$exp
fi
echo "done: $exp"
