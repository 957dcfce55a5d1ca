"""Training engine on the toy classification task: optimizer groups, schedule, EMA, gradient
accumulation, mixed precision, NaN skipping, checkpoints, exact resume (also after SIGKILL),
and the tools."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import load_tool
import torch
from safetensors.torch import load_file

from navit_dense.data.decode import BadInputWarning, DataError
from navit_dense.engine import checkpoint as ckpt
from navit_dense.engine.config import load_config, to_object
from navit_dense.engine.data import build_loader, steps
from navit_dense.engine.optim import build_ema, lr_factor, param_groups
from navit_dense.engine.task import get_task, register_task
from navit_dense.engine.trainer import NonFiniteLossError, Trainer, train
from navit_dense.data.synthetic.shapes import ShapesDataset
from navit_dense.tasks.classification import ClassificationModelConfig, ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "classification" / "toy.yaml"
# Tiny everything: 48 images of 16-48 px, <= 24 patches each, ~8 images per step.
TINY = [
    "data.train_size=48",
    "data.val_size=16",
    "data.image_min_side=16",
    "data.image_max_side=48",
    "data.max_tokens_per_image=24",
    "data.seq_len=96",
    "data.tokens_per_batch=160",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.best_metric=''",
]


def tiny_cfg(run_dir: Path, *overrides: str):
    return load_config(TOY, [f"output_dir={run_dir}", *TINY, *overrides])


def train_records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def weights(path: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve(path) / f"{name}.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


# ---- optimizer pieces -------------------------------------------------------------------------
def test_layerwise_lr_decay_groups_and_weight_decay_exclusions(tmp_path):
    cfg = to_object(tiny_cfg(tmp_path))
    model = get_task("classification")(cfg).build_model()  # depth 2: layers 0 (embed), 1, 2 (blocks), 3 (heads)
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.5)
    where = {name: g for g in groups for name in g["names"]}
    assert sorted(where) == sorted(n for n, _ in model.named_parameters())  # each parameter in exactly one group
    scale = {n: where[n]["lr_scale"] for n in where}
    wd = {n: where[n]["weight_decay"] for n in where}
    assert scale["backbone.patch_embed.weight"] == 0.5**3 and scale["backbone.pos_embed.row"] == 0.5**3
    assert scale["backbone.blocks.0.attn.qkv.weight"] == 0.5**2
    assert scale["backbone.blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["backbone.head.weight"] == 1.0 and scale["backbone.attn_pool.q.weight"] == 1.0 and scale["backbone.norm.weight"] == 1.0
    assert wd["backbone.blocks.0.attn.qkv.weight"] == 0.1 and wd["backbone.head.weight"] == 0.1
    # no_weight_decay() (pos embeddings, MAP latent), biases and norms are excluded
    for name in ("backbone.pos_embed.row", "backbone.attn_pool.latent", "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.1.norm2.weight", "backbone.head.bias"):
        assert wd[name] == 0.0, name
    # Mixed RoPE's learned frequencies (one [2, heads, head_dim / 2] slice per block) are a position
    # encoding: layer 0 with the embeddings, not the heads' last layer; no weight decay (timm lists them).
    mixed = get_task("classification")(to_object(tiny_cfg(tmp_path, "model.backbone.rope=mixed", "model.backbone.rope_temperature=10"))).build_model()
    assert tuple(mixed.backbone.rope.freqs.shape) == (2, 2, 2, 16)  # [x / y, depth, heads, head_dim / 2]
    where = {name: g for g in param_groups(mixed, weight_decay=0.1, layer_decay=0.5) for name in g["names"]}
    assert where["backbone.rope.freqs"]["layer"] == 0 and where["backbone.rope.freqs"]["lr_scale"] == 0.5**3
    assert where["backbone.rope.freqs"]["weight_decay"] == 0.0
    assert where["backbone.rope.freqs"] is where["backbone.pos_embed.row"]  # the position embedding's group
    # local_convs[i] runs before blocks[i]: it decays with that block, not at the heads' full lr
    local = get_task("classification")(to_object(tiny_cfg(tmp_path, "model.backbone.local_conv=3"))).build_model()
    where = {name: g for g in param_groups(local, weight_decay=0.1, layer_decay=0.5) for name in g["names"]}
    assert where["backbone.local_convs.0.conv.weight"] is where["backbone.blocks.0.attn.qkv.weight"]
    assert where["backbone.local_convs.1.conv.bias"]["layer"] == 2 and where["backbone.local_convs.1.conv.bias"]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and math.isclose(f[12], 0.55) and math.isclose(f[20], 0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone after warmup


def test_ema_update_rule():
    """timm's ModelEmaV3 computes exactly the rule the engine's own EMA did (a lerp)."""
    model = torch.nn.Linear(3, 2)
    ema = build_ema(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = torch.lerp(start, start + 1.0, 0.25)
    assert torch.equal(ema.module.weight, expected) and torch.allclose(expected, 0.75 * start + 0.25 * (start + 1.0))
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.lerp(expected, model.weight.detach(), 0.25))
    assert not ema.module.weight.requires_grad
    # Integer buffers are copied, not averaged.
    norm = torch.nn.BatchNorm1d(2)
    ema = build_ema(norm, decay=0.75)
    norm.train()(torch.randn(4, 2))
    ema.update(norm)
    assert int(ema.module.num_batches_tracked) == 1
    torch.testing.assert_close(ema.module.running_mean, 0.25 * norm.running_mean)


# ---- training-loop semantics ---------------------------------------------------------------------
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Same-size images (32 px -> 4x4 patches = 16 tokens), so 128 tokens hold exactly 8 images and
    # "2 micro-batches of 8" and "1 batch of 16" cover the same images in the same order.
    same = ["data.image_min_side=32", "data.image_max_side=32", "data.max_tokens_per_image=16", "train.steps=3", "data.val_size=0"]
    train(tiny_cfg(tmp_path / "accum", *same, "data.tokens_per_batch=128", "train.grad_accum=2"))
    train(tiny_cfg(tmp_path / "big", *same, "data.tokens_per_batch=256", "train.grad_accum=1"))
    accum, big = train_records(tmp_path / "accum"), train_records(tmp_path / "big")
    assert [r["images"] for r in accum.values()] == [16, 16, 16]
    for step in (1, 2, 3):
        assert math.isclose(accum[step]["loss"], big[step]["loss"], rel_tol=1e-5)
        assert math.isclose(accum[step]["grad_norm"], big[step]["grad_norm"], rel_tol=1e-4)
    assert_same_weights(weights(tmp_path / "accum"), weights(tmp_path / "big"), atol=1e-5)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    train(tiny_cfg(tmp_path / "fp32", "train.steps=3", "data.val_size=0"))
    summary = train(tiny_cfg(tmp_path / "bf16", "train.steps=3", "train.precision=bf16", "data.val_size=0"))
    fp32, bf16 = train_records(tmp_path / "fp32"), train_records(tmp_path / "bf16")
    assert summary["skipped_nonfinite_steps"] == 0
    for step in (1, 2, 3):
        assert math.isfinite(bf16[step]["loss"]) and abs(bf16[step]["loss"] - fp32[step]["loss"]) < 0.05
    assert any(bf16[s]["loss"] != fp32[s]["loss"] for s in (1, 2, 3))  # autocast really changed the math
    assert all(w.dtype == torch.float32 for w in weights(tmp_path / "bf16").values())  # master weights stay fp32


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(tiny_cfg(tmp_path / "fp16", "train.precision=fp16", "train.steps=1"))


@dataclass
class _NanModelConfig(ClassificationModelConfig):
    nan_loss_steps: list[int] = field(default_factory=list)  # NaN loss at these steps (0-based)


@register_task("engine_test_nan")
class _NanLossTask(ClassificationTask):
    ModelConfig = _NanModelConfig

    def losses(self, logits, targets, ctx):
        out = super().losses(logits, targets, ctx)
        if ctx.step in self.cfg.model.nan_loss_steps:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_skips_the_update(tmp_path):
    run = tmp_path / "nan"
    cfg = tiny_cfg(run, "train.steps=5", "train.ckpt_every=1", "train.keep_last=10", "train.ema_decay=0.5", "task=engine_test_nan", "model.nan_loss_steps=[2, 4]", "train.max_consecutive_nonfinite=2", "data.val_size=0")
    summary = train(cfg)
    assert summary["skipped_nonfinite_steps"] == 2 and summary["steps"] == 5
    records = train_records(run)
    assert math.isnan(records[3]["loss"]) and math.isnan(records[5]["loss"]) and math.isfinite(records[4]["loss"])
    root = run / "checkpoints"
    # step index 2 is the 3rd step: its checkpoint equals the previous one (weights, EMA, Adam state)
    for name in ("model", "ema", "optimizer"):
        assert_same_weights(weights(root / "step_000002", name), weights(root / "step_000003", name))
    assert not torch.equal(weights(root / "step_000003")["backbone.head.weight"], weights(root / "step_000004")["backbone.head.weight"])


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    cfg = tiny_cfg(tmp_path / "nan", "train.steps=6", "task=engine_test_nan", "model.nan_loss_steps=[1, 2, 3]", "train.max_consecutive_nonfinite=3", "data.val_size=0")
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        train(cfg)


class _SkippingShapes(ShapesDataset):
    """Every 5th image cannot be read (what a decoder reports for a corrupt file)."""

    def __getitem__(self, index):
        if index % 5 == 0:
            raise DataError(f"shape_{index}.png", "unreadable", "corrupt file")
        return super().__getitem__(index)


@register_task("engine_test_skips")
class _SkippingTask(ClassificationTask):
    def build_dataset(self, split):
        d = self.cfg.data
        size = {"train": d.train_size, "val": d.val_size}[split]
        return _SkippingShapes(size, d.image_min_side, d.image_max_side, seed=0, train=split == "train") if size else None


def test_bad_training_samples_are_dropped_counted_and_summarized_even_in_workers(tmp_path):
    with pytest.warns(BadInputWarning, match="skipped"):  # in-process loader; workers warn on their own stderr
        summary = train(tiny_cfg(tmp_path / "skip0", "task=engine_test_skips", "train.steps=2", "data.val_size=0"))
    assert summary["skipped_samples"] > 0 and summary["skipped_by_reason"] == {"unreadable": summary["skipped_samples"]}
    # Counted in the main process from what the micro-batches carry, not in worker copies of the dataset.
    cfg = tiny_cfg(tmp_path / "skip", "task=engine_test_skips", "train.steps=4", "data.num_workers=2", "data.val_size=0")
    summary = train(cfg)
    # What the sampler drew for those 4 steps (the run's first epoch covers them).
    c = to_object(cfg)
    sampler = build_loader(get_task(c.task)(c), _SkippingShapes(c.data.train_size, c.data.image_min_side, c.data.image_max_side, seed=0, train=True),
                           c, patch_size=8, num_prefix_tokens=0, train=True, world_size=1, rank=0).batch_sampler  # fmt: skip
    sampler.set_epoch(0)
    assert sampler.steps_in_epoch(0) >= 4
    drawn = [k.index for micro in list(sampler)[: 4 * c.train.grad_accum] for k in micro]
    bad = sum(1 for i in drawn if i % 5 == 0)
    assert bad > 0 and summary["steps"] == 4
    assert summary["skipped_samples"] == bad and summary["skipped_by_reason"] == {"unreadable": bad}
    assert sum(r["images"] for r in train_records(tmp_path / "skip").values()) == len(drawn) - bad


def test_a_bad_evaluation_sample_stops_the_evaluation(tmp_path):
    # Dropping it would let the metrics count the image as missed, silently.
    with pytest.raises(DataError, match="shape_0.png"):
        train(tiny_cfg(tmp_path / "skip", "task=engine_test_skips", "train.steps=1", "train.eval_every=1", "data.val_size=8"))


# ---- checkpoints and resume --------------------------------------------------------------------
def test_checkpoints_keep_last_best_pointer_and_weights_only_loading(tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, "train.steps=5", "train.ckpt_every=1", "train.keep_last=2", "train.eval_every=1", "train.best_metric=loss", "train.best_mode=min"))
    root = run / "checkpoints"
    steps = sorted(p.name for p in root.iterdir() if ckpt.STEP_DIR.match(p.name))
    best = f"step_{summary['best_step']:06d}"
    assert set(steps) == {"step_000004", "step_000005", best}
    assert os.readlink(root / "last") == "step_000005" and os.readlink(root / "best") == best
    evals = train_records(run, "eval")
    assert summary["best_value"] == min(r["loss"] for r in evals.values())
    # nothing to unpickle: safetensors + JSON (+ the YAML config)
    assert {p.suffix for p in (root / "step_000005").iterdir()} == {".safetensors", ".json", ".yaml"}
    assert not list(root.glob(".*"))  # no leftovers of the atomic writes
    # weights only, into a fresh model
    cfg = to_object(load_config(run / "config.yaml"))
    model = get_task(cfg.task)(cfg).build_model()
    model.load_state_dict(ckpt.load_weights(run))
    # TensorBoard got the same scalars as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5] and len(events.Scalars("eval/accuracy")) == 5
    # the lr logged each step follows the warmup + cosine schedule
    for step, record in train_records(run).items():
        assert math.isclose(record["lr"], cfg.optim.lr * lr_factor(step - 1, 2, 5, cfg.optim.min_lr_ratio), rel_tol=1e-9)


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.steps=3", "train.ckpt_every=1", "data.val_size=0"))
    root = run / "checkpoints"
    # a save killed before its commit rename, then a kill between commit and pointer update
    (root / ".step_000004.tmp").mkdir()
    (root / ".step_000004.tmp" / "model.safetensors").write_bytes(b"\0\0garbage")
    (root / "last").unlink()
    assert ckpt.latest(root) == root / "step_000003"
    summary = train(tiny_cfg(run, "train.steps=4", "train.ckpt_every=1", "data.val_size=0"), resume=True)
    assert summary["steps"] == 4 and not (root / ".step_000004.tmp").exists()
    assert ckpt.latest(root) == (root / "step_000004").resolve()


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=1", "data.val_size=0")
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_resume_from_a_middle_checkpoint_is_exact(tmp_path):
    # In-process and num_workers=0: continue a copy of the step-2 checkpoint, compare with the straight run.
    extra = ["train.steps=6", "train.ckpt_every=2", "train.ema_decay=0.8", "data.val_size=0", "data.token_drop.mode=beta", "model.backbone.drop_path_rate=0.2"]
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, *extra))
    middle = straight / "checkpoints" / "step_000002"
    assert json.loads((middle / "meta.json").read_text())["train_state"]["step_in_epoch"] > 0  # resumes mid-epoch
    resumed = tmp_path / "resumed"
    shutil.copytree(middle, resumed / "checkpoints" / middle.name)
    train(tiny_cfg(resumed, *extra), resume=True)
    a, b = train_records(straight), train_records(resumed)
    assert sorted(b) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"]
    assert_same_weights(weights(straight), weights(resumed))
    assert_same_weights(weights(straight, "ema"), weights(resumed, "ema"))


def _tool_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(TOY)]
    common = [*TINY, "train.steps=24", "train.ckpt_every=4", "data.num_workers=2", "data.val_size=0", "model.backbone.drop_path_rate=0.1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*tool, "--output-dir", str(straight), *common], env=_tool_env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen([*tool, "--output-dir", str(killed), *common], env=_tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # kill once a checkpoint exists and training has moved past it
            metrics = killed / "metrics.jsonl"
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if done >= 6 and ckpt.latest(killed / "checkpoints") is not None:
                break
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = json.loads((ckpt.latest(killed / "checkpoints") / "meta.json").read_text())["train_state"]["step"]
    assert 4 <= resumed_from < 24

    subprocess.run([*tool, "--output-dir", str(killed), "--resume", *common], env=_tool_env(), check=True, capture_output=True, timeout=300)
    a, b = train_records(straight), train_records(killed)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in range(1, 25):
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']} != {b[step]['loss']}"
    assert_same_weights(weights(straight), weights(killed))


# ---- tools -----------------------------------------------------------------------------------------
_tool = load_tool


@pytest.mark.parametrize("name, option", [("train", "--resume"), ("evaluate", "--checkpoint")])
def test_tools_help_lists_main_options(name, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        _tool(name).main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and option in out and "train.steps=" in out and "classification" in out


def test_evaluate_tool_reproduces_the_final_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, "train.steps=2", "train.ema_decay=0.5"))
    out = tmp_path / "eval.json"
    capsys.readouterr()  # drop the training log
    code = _tool("evaluate").main(["--config", str(run / "config.yaml"), "--checkpoint", str(run), "--output", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["step"] == 2 and record["metrics"] == summary["final_metrics"]  # EMA weights, as in training
    assert json.loads(capsys.readouterr().out.split("wrote")[0]) == summary["final_metrics"]


def test_gradscaler_overflow_skips_the_update_and_is_counted_on_cpu(tmp_path):
    """The fp16 bookkeeping of train_step without a GPU (fp16 itself is CUDA-only): a CPU
    GradScaler with a huge initial scale makes the scaled loss overflow (fp32: its largest value
    times a loss above 1 is inf), so the update is skipped, the scale backs off, and the step
    counts as an overflow, neither as a non-finite loss nor towards the EMA."""
    huge = torch.finfo(torch.float32).max
    trainer = Trainer(tiny_cfg(tmp_path / "run", "train.steps=3", "train.ema_decay=0.5"))
    stream = steps(trainer.train_loader, 0, 0)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # a scale that fits: the update goes through
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(next(stream))
    assert trainer.state.overflow_steps == 0
    assert any(not torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())

    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=huge)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}  # differs from the model now (decay 0.5)
    scalars = trainer.train_step(next(stream))
    assert scalars["loss"] > 1.0  # so the scaled loss is inf: the premise of the test
    assert trainer.state.overflow_steps == 1 and trainer.state.skipped_nonfinite == 0
    assert trainer.scaler.get_scale() == pytest.approx(huge / 2)
    assert_same_weights(before, trainer.model.state_dict())
    assert_same_weights(ema_before, trainer.ema.state_dict())
