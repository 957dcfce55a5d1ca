#!/usr/bin/env bash
# One command for a bare CUDA machine that has its own Python 3.12 + torch and no package
# registry: installs what it lacks from local wheels (made beforehand, where the registry is
# reachable, by tools/fetch_gpu_wheels.sh into third_party/wheels-cp312/), then runs
#   1. the cuda-marked tests (varlen / flex kernels, autocast, GradScaler, nccl DDP, uint8 patches),
#   2. the backbone benchmark on the GPU (packed NaViT vs timm's NaFlexViT, eval and train, fixed
#      and sampled budgets; bf16 attention kernels chosen automatically),
#   3. profile_step on the detection demo config (step time split and host round trips at two
#      batch sizes),
# and writes everything under $OUT (default runs/gpu_check): cuda_tests.{log,xml},
# bench_backbone.json, profile_step_detection.json, summary.json. Budget: under 8 minutes.
#   OUT=/some/dir bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-third_party/wheels-cp312}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

# ---- 0. what the machine lacks, from the local wheels only (never a registry) ----
# timm is on such machines but maybe at another version than the pin the NaFlexVit peer of the
# benchmark is written for: the pinned wheel replaces it then.
TIMM_PIN=$(grep -E '^timm==' requirements/core.txt)
missing=$(TIMM_PIN="$TIMM_PIN" $PY - <<'EOF'
import importlib.metadata, importlib.util, os
need = {"omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "pycocotools": "pycocotools",
        "faster_coco_eval": "faster-coco-eval", "lvis": "lvis", "vit_pytorch": "vit-pytorch"}
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
try:
    timm_version = importlib.metadata.version("timm")
except importlib.metadata.PackageNotFoundError:
    timm_version = None
if f"timm=={timm_version}" != os.environ["TIMM_PIN"]:
    missing.append(os.environ["TIMM_PIN"])
print(" ".join(missing))
EOF
)
if [ -n "$missing" ]; then
    log "installing from $WHEELS: $missing"
    $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" $missing 2>&1 | tee -a "$OUT/gpu_check.log"
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu_check.log" || exit 1

status=0
# ---- 1. cuda-marked tests ----
log "cuda tests"
timeout 240 $PY -m pytest -q -m cuda tests/test_cuda.py tests/test_uint8_patches.py -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" || status=1

# ---- 2. packed NaViT vs timm NaFlexViT on the GPU ----
log "backbone benchmark"
timeout 180 $PY tools/benchmark_backbone.py --quick --device cuda --no-vit-pytorch --json "$OUT/bench_backbone.json" 2>&1 | tail -40 | tee "$OUT/bench_backbone.log" || status=1

# ---- 3. detection step: time split and host round trips ----
log "profile_step (detection demo config)"
DATA="$OUT/synthetic_lvis"
[ -f "$DATA/lvis_v1_val.json" ] || timeout 60 $PY tools/make_synthetic_lvis.py --out "$DATA" --train-images 200 --val-images 40 >> "$OUT/gpu_check.log" 2>&1
timeout 120 $PY tools/profile_step.py --config configs/detection/owl_navit_tiny_synthetic_lvis.yaml --batches 16,64 --repeats 3 \
    --json "$OUT/profile_step_detection.json" "data.train_json=$DATA/lvis_v1_train.json" "data.val_json=$DATA/lvis_v1_val.json" \
    "data.train_images=$DATA/images" "data.val_images=$DATA/images" train.precision=bf16 2>&1 | tail -8 | tee "$OUT/profile_step.log" || status=1

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for name in ("bench_backbone", "profile_step_detection"):
    f = out / f"{name}.json"
    summary[name] = json.loads(f.read_text()) if f.is_file() else None
summary["cuda_tests_log_tail"] = (out / "cuda_tests.log").read_text().splitlines()[-3:] if (out / "cuda_tests.log").is_file() else None
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("wrote", out / "summary.json")
EOF
log "done (status $status)"
exit $status
