#!/usr/bin/env bash
# Install the mmsegmentation plug-in's dependencies into a venv:
#
#   tools/install_mmseg.sh VENV_PYTHON          e.g. tools/install_mmseg.sh .venv/bin/python
#
# mmseg 1.2.2 imports mmcv.ops at import time, so it needs FULL mmcv (compiled ops), and
# mmcv 2.1.0 has no wheel for torch 2.14 on PyPI. We build one from the PyPI sdist, once:
#   * setup.py passes -std=c++17, torch 2.14's headers need C++20  -> sed c++17 -> c++20
#   * setup.py imports pkg_resources                                -> setuptools < 81 in the venv
#   * --no-build-isolation so it compiles against the venv's torch
# The wheel is cached OUTSIDE the repo and reused by later runs (seconds instead of ~15 min):
#   ${MMCV_WHEEL_DIR:-${NAVIT_DENSE_CACHE:-$HOME/.cache/navit_dense}/wheels/torch-<torch version>}
# The cache is keyed by the torch version because the compiled ops are tied to torch's C++ ABI.
# The build writes into a temporary folder beside the cache and mv's the finished wheel into
# place, so an interrupted build never leaves a half-written wheel that a later run would trust.
#
# Then installs requirements/mmseg.txt (mmengine, mmsegmentation, ftfy, regex) and verifies the
# result (imports + one compiled op). Safe to re-run: a complete install is a quick no-op.
set -euo pipefail

die() { echo "install_mmseg: error: $*" >&2; exit 1; }
log() { echo "install_mmseg: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 VENV_PYTHON"
PY=$1
case $PY in */*) ;; *) PY=$(command -v "$PY") || die "python not found: $1" ;; esac
[ -x "$PY" ] || die "not an executable python: $PY"
# Absolute, but not symlink-resolved (a venv's python must keep its venv path).
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQS=$REPO/requirements/mmseg.txt
[ -f "$REQS" ] || die "missing $REQS"

MMCV_VERSION=2.1.0
MAX_JOBS=${MAX_JOBS:-2}

# Put the venv's bin first so torch's extension builder finds a `ninja` installed there.
PATH="$(dirname "$PY"):$PATH"
export PATH

pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

read -r TORCH_VERSION PYTAG < <("$PY" - <<'EOF'
import sys
import torch
print(torch.__version__.replace("+", "_"), f"cp{sys.version_info[0]}{sys.version_info[1]}")
EOF
) || die "could not import torch with $PY (install the core requirements first: make venv)"

CACHE_ROOT=${NAVIT_DENSE_CACHE:-$HOME/.cache/navit_dense}
WHEEL_DIR=${MMCV_WHEEL_DIR:-$CACHE_ROOT/wheels/torch-$TORCH_VERSION}
mkdir -p "$WHEEL_DIR"

# Serialise concurrent runs sharing one cache (two builds at once would only waste time).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$WHEEL_DIR/.lock"
    flock 9
fi

find_wheel() {
    local w
    for w in "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-"$PYTAG"-*.whl; do
        [ -f "$w" ] && { echo "$w"; return 0; }
    done
    return 1
}

build_wheel() {
    local start end tmp src partial whl
    start=$(date +%s)
    "$PY" -c "import pkg_resources" 2>/dev/null \
        || die "mmcv's setup.py needs pkg_resources: pin setuptools<81 (80.9.0) in the venv"
    if ! command -v ninja >/dev/null 2>&1; then
        # Without ninja torch compiles the ~100 sources one by one; ninja uses MAX_JOBS cores.
        log "ninja not found; installing it into the venv (build tool only)"
        pip_ install -q "ninja==1.13.2"
    fi

    tmp=$(mktemp -d "${TMPDIR:-/tmp}/navit_dense-mmcv.XXXXXX")
    # Same filesystem as the cache, so the final mv is an atomic rename.
    partial=$(mktemp -d "$WHEEL_DIR/.partial.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp' '$partial'" EXIT
    trap 'exit 130' INT TERM HUP  # so the EXIT cleanup also runs when interrupted

    log "downloading the mmcv==$MMCV_VERSION sdist from PyPI"
    pip_ download -q --no-deps --no-binary :all: --no-build-isolation \
        "mmcv==$MMCV_VERSION" -d "$tmp/sdist"
    tar -xzf "$tmp/sdist/mmcv-$MMCV_VERSION.tar.gz" -C "$tmp"
    src=$tmp/mmcv-$MMCV_VERSION
    grep -q -- '-std=c++17' "$src/setup.py" || die "patch target -std=c++17 not found in mmcv setup.py"
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"

    log "building the mmcv $MMCV_VERSION wheel with ops on CPU (MAX_JOBS=$MAX_JOBS; ~15 min on 2 idle cores, much longer on a busy machine)"
    log "build log: $tmp/build.log"
    # CUDA_VISIBLE_DEVICES= keeps it a CPU-ops build even on a machine with a GPU.
    if ! (cd "$src" && env MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$MAX_JOBS" CUDA_VISIBLE_DEVICES= \
            "$PY" -m pip --disable-pip-version-check wheel --no-build-isolation --no-deps \
            -w "$partial" . ) >"$tmp/build.log" 2>&1; then
        tail -n 60 "$tmp/build.log" >&2
        die "mmcv build failed (log above)"
    fi
    whl=$(ls "$partial"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1)
    [ -n "$whl" ] || die "pip wheel produced no mmcv wheel"
    mv -f "$whl" "$WHEEL_DIR/"
    end=$(date +%s)
    printf 'mmcv %s built %s in %ss, torch %s, %s\n' "$MMCV_VERSION" "$(date -u +%FT%TZ)" \
        "$((end - start))" "$TORCH_VERSION" "$PYTAG" >>"$WHEEL_DIR/build-info.txt"
    log "built $(basename "$whl") in $((end - start)) s"
    rm -rf "$tmp" "$partial"
    trap - EXIT INT TERM HUP
}

t0=$(date +%s)
if WHEEL=$(find_wheel); then
    log "using cached wheel $WHEEL"
else
    build_wheel
    WHEEL=$(find_wheel) || die "wheel missing from $WHEEL_DIR after build"
fi

# mmcv-lite ships the same mmcv/ package folder without ops: the two must not coexist.
if pip_ show -q mmcv-lite >/dev/null 2>&1; then
    log "removing mmcv-lite (conflicts with full mmcv)"
    pip_ uninstall -y -q mmcv-lite
fi

log "installing $(basename "$WHEEL") + $REQS"
pip_ install -q "$WHEEL" -r "$REQS"
pip_ check

log "verifying"
"$PY" - <<'EOF'
import torch
import mmcv
import mmcv.ops
import mmseg
from mmcv.ops import nms
from mmseg.evaluation import IoUMetric  # noqa: F401
from mmseg.models import build_segmentor  # noqa: F401

assert mmcv.__version__ == "2.1.0", mmcv.__version__
# Run one compiled op so a wheel built against another torch ABI fails here, not later.
boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
_, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
assert keep.tolist() == [0, 2], keep
print(f"install_mmseg: OK mmcv {mmcv.__version__} (ops), mmseg {mmseg.__version__}, torch {torch.__version__}")
EOF
log "done in $(( $(date +%s) - t0 )) s"
