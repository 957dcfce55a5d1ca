"""CPU malloc tuning (utils/cpu_malloc.py, train.cpu_malloc_tuning): freed activation buffers
stay in the heap, so a repeated forward stops page-faulting; the user's own MALLOC_*_ settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from navit_dense.engine.config import load_config
from navit_dense.engine.trainer import Trainer, tune_cpu_malloc
from navit_dense.utils import cpu_malloc

# A timm ViT forward in a fresh interpreter (the allocator state of this test process is not
# glibc's default any more once a Trainer ran): minor page faults of each of 12 forwards.
FAULTS_SCRIPT = """
import json, resource, sys, timm, torch
from navit_dense.utils.cpu_malloc import keep_freed_buffers
torch.set_num_threads(1)
report = keep_freed_buffers() if sys.argv[1] == "tuned" else None
model = timm.models.vision_transformer.VisionTransformer(img_size=256, patch_size=16, embed_dim=192, depth=4, num_heads=3).eval()
x = torch.randn(8, 3, 256, 256)
faults = []
with torch.no_grad():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"report": report, "faults": faults}))
"""


def _forward_faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in cpu_malloc.ENV_VARS}
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], env=env, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_tuned_malloc_stops_page_faults_of_repeated_forwards():
    # Steady state: the last 8 forwards. Tuned, a forward now and then still grows the heap by a
    # few hundred pages (fragmentation); glibc's defaults fault ~6-12k pages in most forwards.
    tuned = _forward_faults("tuned")
    assert tuned["report"] == {"applied": True, "mmap_threshold": 32 << 20, "trim_threshold": 512 << 20}
    tuned_faults = sum(tuned["faults"][-8:])
    assert tuned_faults < 2000, tuned
    default = _forward_faults("default")
    default_faults = sum(default["faults"][-8:])
    if default_faults < 2000:
        pytest.skip(f"this C library hardly page-faults repeated forwards by default ({default}): the tuning has nothing to fix here")
    assert default_faults > 5 * tuned_faults, (tuned, default)


def test_users_malloc_variables_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    report = cpu_malloc.keep_freed_buffers()
    assert report["applied"] is False and "MALLOC_TRIM_THRESHOLD_" in report["reason"]


def test_tuning_follows_the_config_and_the_device(monkeypatch):
    for name in cpu_malloc.ENV_VARS:  # a user's own setting would (rightly) win over the tuning
        monkeypatch.delenv(name, raising=False)
    on = load_config(None, ["task=classification"]).train
    off = load_config(None, ["task=classification", "train.cpu_malloc_tuning=false"]).train
    assert tune_cpu_malloc(off, torch.device("cpu")) is None
    assert tune_cpu_malloc(on, torch.device("cuda")) is None  # the CUDA caching allocator already keeps its blocks
    if sys.platform.startswith("linux"):
        assert tune_cpu_malloc(on, torch.device("cpu"))["applied"] is True


def test_trainer_reports_the_tuning(tmp_path: Path, capsys):
    toy = Path(__file__).resolve().parents[1] / "configs" / "classification" / "toy.yaml"
    Trainer(load_config(toy, [f"output_dir={tmp_path / 'run'}", "train.steps=1", "data.train_size=8", "data.val_size=4"]))
    assert "CPU malloc tuning (train.cpu_malloc_tuning): {'applied': " in capsys.readouterr().out
