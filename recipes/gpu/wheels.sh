#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index (issue 9).
#
#   bash recipes/gpu/wheels.sh [DIR]        (default .whl, git-ignored)
#
# Run it where pip can reach PyPI. It fetches, for CPython 3.12 on x86-64 Linux, the packages
# this project needs beyond what the lent machines' image already holds (torch, torchaudio,
# numpy, scipy, scikit-learn, numba, matplotlib, tqdm, tensorboard, pyyaml, requests, ...):
# about 2.6 MB. antlr4-python3-runtime 4.9.3, which hydra needs, is published only as source,
# so it is built here into a pure-Python wheel. recipes/gpu/run.sh installs whatever DIR
# holds before it imports anything (see the GPU checklist in docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.whl}
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The versions this project is tested with (pyproject's ranges allow newer).
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" \
  hydra-core==1.3.8 omegaconf==2.3.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 \
  librosa==0.11.0 audioread==3.1.0 soxr==1.1.0 pooch==1.9.0 platformdirs==4.14.7 \
  decorator==5.3.1
$py -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
ls -l "$dir"
du -sh "$dir"
