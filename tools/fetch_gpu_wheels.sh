#!/usr/bin/env bash
# Download, here (where the package registry is reachable), the wheels a bare CUDA machine lacks
# to run tools/gpu_check.sh: it has its own Python 3.12 + torch and no registry. The wheels land
# in third_party/wheels-cp312/ (ignored by git, about 4 MB; timm too: the machine's own timm may
# be another version than the pin the benchmark's NaFlexVit peer is written for); pass that
# folder along with the checkout (the device tool's `carry`). Pins follow requirements/core.txt and dev.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-third_party/wheels-cp312}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
pin() { grep -E "^$1==" requirements/core.txt requirements/dev.txt | head -1 | cut -d: -f2; }
$PY -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$DEST" "$(pin omegaconf)" "$(pin pycocotools)" "$(pin faster-coco-eval)" "$(pin lvis)" "$(pin vit-pytorch)" "$(pin timm)"
# omegaconf's parser runtime is published as an sdist only: build its (pure-Python) wheel here.
$PY -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
ls -1 "$DEST"
