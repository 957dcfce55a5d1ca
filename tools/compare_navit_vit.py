#!/usr/bin/env python
"""Does packing help? NaViT against a square fixed-resolution ViT at equal training compute.

For each task (detection on the synthetic LVIS shapes, segmentation on the synthetic ADE-format
regions) and each seed, two runs of the same architecture and recipe:

- ``navit``: packed at native aspect ratio, resolution sampling, token dropping
  (``configs/compare/{task}_navit.yaml``: the task's tiny config, taken by reference, plus
  ``data.resolution`` and ``data.token_drop``);
- ``vit``: every image made square at one fixed resolution, one image per sequence, no scale
  jitter, no resolution sampling, no token dropping (``configs/compare/{task}_vit.yaml``:
  ``data.square_pad`` for detection, OWL-ViT's padding; ``data.square_resize`` for segmentation).

Equal compute: the NaViT run trains for its configured steps and its FLOPs are counted from the
tokens it actually ran; the ViT run then gets the number of steps whose FLOPs match that best,
found by going through its own (deterministic) data stream once beforehand, and its FLOPs are
counted the same way while it trains. The run fails (exit 1) when the counted FLOPs of the two
differ by more than ``--tolerance`` (5%).

FLOPs (``train_flops``): forward x 3 (backward = 2 x forward) of what the training forwards
ran: every ``nn.Linear`` / ``nn.Conv`` of the model (conv stem, patch embedding, blocks, heads,
decoder) on the tensors it actually got, so every slot of the packed ``[S, L]`` tensor in the
blocks (sequence padding and square-padding tokens included: they are run), plus attention
``4 * D * pairs`` per block, ``pairs`` being the query-key pairs of each image's own run (the
kernels never attend across images or to padding; windowed blocks count their windows). Counted
by forward hooks, in training mode only; ``train_flops_blocks`` is the transformer blocks' share.
``train_tokens``: the slots run (S x L summed over micro-batches); ``image_tokens``: the tokens
of images among them (prefix + kept patches; square padding is part of the image); ``images``:
images trained on.

Both runs are evaluated after training at every ``--max-res`` R (``navit_dense.engine.
resolution_sweep.resolution_config``: budget (R / 16)^2 tokens, longer side <= R; NaViT at native
aspect, ViT square as it was trained) with the task's evaluator: LVIS AP / APr (APc, APf, AP50)
and mIoU. ``--curve-points`` evaluations during training (each run's own training resolution)
give the metric against training compute. Mean and sample standard deviation over seeds.

    python tools/compare_navit_vit.py --quick --json runs/compare/quick.json [--markdown]
    python tools/compare_navit_vit.py --json runs/compare/default.json          # longer, 3 seeds
    python tools/compare_navit_vit.py --quick --navit data.token_drop.mode=none  # an ablation

Writes the JSON (``--json``), and beside it a CSV and a PNG (metrics against max resolution and
against training compute). Exit codes: 0 done, 1 compute not matched within the tolerance,
2 bad input (a config key, a file).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import json
import math
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
from navit_dense.data import PackedBatch
from navit_dense.data.synthetic.ade_regions import make_synthetic_seg
from navit_dense.data.synthetic.lvis_shapes import LvisShapesSpec
from navit_dense.engine.config import ConfigError, load_config
from navit_dense.engine.data import steps as step_stream
from navit_dense.engine.optim import find_backbone
from navit_dense.engine.resolution_sweep import PeakMemory, evaluate_at, resolution_config
from navit_dense.engine.trainer import Trainer
from navit_dense.models.attention import attention_pairs

ROOT = Path(__file__).resolve().parents[1]
REGIMES = ("navit", "vit")
TASKS = {
    "detection": {"metrics": ("AP", "APr", "APc", "APf", "AP50"), "plot": ("AP", "APr")},
    "segmentation": {"metrics": ("mIoU", "mAcc", "aAcc"), "plot": ("mIoU",)},
}


def regime_config(task: str, regime: str) -> Path:
    return ROOT / "configs" / "compare" / f"{task}_{regime}.yaml"


def _demo_module():
    """tools/demo.py: the demo's dataset parameters and cached generator, by reference."""
    spec = importlib.util.spec_from_file_location("navit_dense_tool_demo", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Training lengths are the NaViT run's optimizer steps (the ViT's follow from the compute);
# None keeps the config's own train.steps. "overrides": config overrides of both regimes.
PRESETS = {
    "quick": {"seeds": [0, 1], "max_res": [128, 192, 256, 384], "curve_points": 2,
              "detection": {"steps": 80, "data": {"train_images": 200, "val_images": 32}, "overrides": []},
              "segmentation": {"steps": 30, "data": {"n_train": 96, "n_val": 16}, "overrides": ["data.tokens_per_batch=1024"]}},
    "default": {"seeds": [0, 1, 2], "max_res": [128, 192, 256, 384, 512, 768], "curve_points": 4,
                "detection": {"steps": None, "data": {}, "overrides": []},
                "segmentation": {"steps": None, "data": {"n_train": 240, "n_val": 40}, "overrides": []}},
}  # fmt: skip


# ---- FLOP accounting ---------------------------------------------------------------------------
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def layer_flops(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Multiply-add FLOPs (2 per MAC) of one Linear / Conv call on input ``x`` giving ``y``."""
    if isinstance(layer, nn.Linear):
        return 2.0 * layer.in_features * layer.out_features * (x.numel() // layer.in_features)
    return 2.0 * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size) * y.numel()


def attention_flops(block: nn.Module, batch: PackedBatch) -> float:
    """QK^T and AV of one block: 4 * width * the query-key pairs of each image's own run (or
    window); the kernels never attend across images or to padding."""
    attn = block.attn
    return 4.0 * attn.num_heads * attn.head_dim * attention_pairs(batch, getattr(attn, "window_size", 0))


def linear_flops_per_token(block: nn.Module) -> float:
    """2 * in * out summed over the block's Linear layers (qkv, proj, gate, MLP): what one slot costs."""
    return float(sum(2 * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear)))


def blocks_forward_flops(blocks: Sequence[nn.Module], batch: PackedBatch) -> float:
    """Forward FLOPs of the transformer blocks over ``batch`` from its host layout alone: their
    linears on every slot of the [S, L] tensor (padding included) plus attention."""
    slots = batch.layout.num_sequences * batch.layout.seq_len
    return sum(linear_flops_per_token(b) * slots + attention_flops(b, batch) for b in blocks)


class TrainCompute:
    """The FLOPs the training forwards of a model ran: forward hooks on every Linear / Conv of
    the model (stem, blocks, heads, decoder) count them on the tensors they actually got
    (padding slots included), and forward pre-hooks on the backbone's blocks add attention.
    Evaluation forwards (eval mode) are not counted. Matmuls outside Linear / Conv layers (e.g.
    the OWL head's token x query logits) and elementwise work are not counted."""

    def __init__(self):
        self.forward_flops = 0.0
        self.blocks_forward_flops = 0.0  # the transformer blocks' share (linears + attention)
        self.train_tokens = 0  # slots run: S x L per micro-batch (sequence padding included)
        self.image_tokens = 0  # prefix + kept patch tokens of the images (square padding included)
        self.images = 0
        self.forwards = 0
        self._handles: list = []

    @property
    def train_flops(self) -> float:
        return 3.0 * self.forward_flops  # forward + backward (2 x forward)

    def attach(self, model: nn.Module) -> "TrainCompute":
        _, backbone = find_backbone(model)
        if backbone is None:
            raise TypeError("no NaViT backbone in the model: nothing to count")
        in_blocks = {id(m) for b in backbone.blocks for m in b.modules()}
        for m in model.modules():
            if isinstance(m, LAYERS):
                self._handles.append(m.register_forward_hook(partial(self._count_layer, id(m) in in_blocks)))
        for i, block in enumerate(backbone.blocks):
            self._handles.append(block.register_forward_pre_hook(partial(self._count_block, i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _count_layer(self, in_block: bool, layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if layer.training:
            flops = layer_flops(layer, args[0], output)
            self.forward_flops += flops
            self.blocks_forward_flops += flops if in_block else 0.0

    def _count_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> None:
        if not block.training:
            return
        x = args[0] if args else kwargs["x"]
        batch = (args[1] if len(args) > 1 else kwargs["ctx"]).batch
        flops = attention_flops(block, batch)
        self.forward_flops += flops
        self.blocks_forward_flops += flops
        if index == 0:
            self.forwards += 1
            self.train_tokens += int(x.shape[0]) * int(x.shape[1])
            self.image_tokens += batch.layout.num_tokens
            self.images += batch.num_images

    def as_dict(self) -> dict:
        return {"train_flops": self.train_flops, "train_flops_blocks": 3.0 * self.blocks_forward_flops, "train_tokens": self.train_tokens,
                "image_tokens": self.image_tokens, "images": self.images, "forwards": self.forwards}  # fmt: skip


@torch.no_grad()
def steps_for_flops(trainer: Trainer, target_train_flops: float, max_steps: int) -> tuple[int, float]:
    """(optimizer steps, their planned train FLOPs) of the trainer's own data stream whose FLOPs
    come closest to ``target_train_flops``. Goes through the stream once, from the start, as the
    training run will see it (it depends on seed, epoch and index alone). The blocks' FLOPs of
    each micro-batch come from its layout exactly; the rest of the model (stem, heads) is
    measured once, per image token, on a training-mode forward of the first micro-batch."""
    model = trainer.model
    _, backbone = find_backbone(model)
    stream = step_stream(trainer.train_loader, 0, 0)
    per_token = None
    total = previous = 0.0
    for k in range(1, max_steps + 1):
        for m in next(stream):
            if m.batch is None:
                continue
            blocks = blocks_forward_flops(backbone.blocks, m.batch)
            if per_token is None:
                probe = TrainCompute().attach(model)
                was_training = model.training
                try:
                    model.train()(m.batch)
                finally:
                    probe.detach()
                    model.train(was_training)
                per_token = (probe.forward_flops - blocks) / m.batch.layout.num_tokens
            total += 3.0 * (blocks + per_token * m.batch.layout.num_tokens)
        if total >= target_train_flops:
            return (k, total) if total - target_train_flops <= target_train_flops - previous or k == 1 else (k - 1, previous)
        previous = total
    raise RuntimeError(f"{max_steps} steps of {trainer.cfg.output_dir}'s stream hold only {total:.3g} of {target_train_flops:.3g} FLOPs")


# ---- runs ------------------------------------------------------------------------------------
@torch.no_grad()
def sweep(trainer: Trainer, max_res: Sequence[int], metric_names: Sequence[str]) -> dict[str, dict]:
    """The trained model (EMA when enabled) evaluated at each max resolution, in its regime's own
    layout (the config's data.square_pad / square_resize); per resolution the metrics plus the
    mean tokens per image."""
    model = (trainer.ema.module if trainer.ema is not None else trainer.model).eval()
    _, backbone = find_backbone(model)
    task, c = trainer.task, trainer.cfg
    memory = PeakMemory(trainer.env.device)
    segmentation = c.task == "segmentation"
    out = {}
    try:
        for r in sorted(max_res):
            c_res = resolution_config(c, r, backbone.patch_size, backbone.num_prefix_tokens)
            stats = evaluate_at(task, model, backbone, trainer.val_set, c_res, trainer.env, memory, task.build_evaluator(),
                                images_of=(lambda b, t: len(t["labels"])) if segmentation else (lambda b, t: b.num_images))  # fmt: skip
            out[str(r)] = {**{k: float(stats["metrics"][k]) for k in metric_names}, "tokens_per_image": stats["mean_tokens_per_image"]}
    finally:
        task.cfg = c
    return out


def train_run(cfg, compute: TrainCompute, curve: list) -> tuple[Trainer, dict]:
    """Train with the FLOP counter attached; every evaluation during training is recorded with
    the compute spent so far (the curve against training compute)."""
    trainer = Trainer(cfg)
    compute.attach(trainer.model)
    evaluate = trainer.evaluate

    def evaluate_and_record() -> dict:
        metrics = evaluate()
        curve.append({"step": trainer.state.step, "train_flops": compute.train_flops, "images": compute.images, "metrics": metrics})
        return metrics

    trainer.evaluate = evaluate_and_record  # the trainer calls it at train.eval_every and at the end
    try:
        t0 = time.perf_counter()
        summary = trainer.fit()
        summary["train_and_eval_s"] = time.perf_counter() - t0
    finally:
        compute.detach()
    return trainer, summary


def run_pair(task: str, seed: int, data_overrides: list[str], navit_steps: int | None, args, work: Path) -> dict:
    """One seed of one task: the NaViT run, then the ViT run at the same training FLOPs."""
    spec = TASKS[task]
    common = [f"seed={seed}", *data_overrides, *args.preset_overrides[task], "train.ckpt_every=1000000"]  # only the final checkpoint
    overrides = {"navit": [*common, *([f"train.steps={navit_steps}"] if navit_steps else []), *args.navit], "vit": [*common, *args.vit]}
    _check_same_resolution(*(load_config(regime_config(task, r), overrides[r]) for r in REGIMES))
    out: dict = {}
    for regime in REGIMES:  # NaViT first: its FLOPs are the budget
        run_dir = work / f"{task}_{regime}_s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        planned = None
        if regime == "vit":
            vit_steps, planned = plan_vit_steps(task, overrides["vit"], out["navit"]["train_flops"], work / f"{task}_vit_s{seed}_plan",
                                                max_steps=20 * out["navit"]["steps"] + 100)  # fmt: skip
            overrides["vit"].append(f"train.steps={vit_steps}")
        cfg = load_config(regime_config(task, regime), [*overrides[regime], f"output_dir={run_dir}"])
        every = max(1, math.ceil(cfg.train.steps / max(args.curve_points, 1)))  # about curve_points evaluations
        cfg = load_config(regime_config(task, regime), [*overrides[regime], f"output_dir={run_dir}", f"train.eval_every={every}"])
        compute, curve = TrainCompute(), []
        print(f"[{task} seed {seed}] {regime}: training {cfg.train.steps} steps", flush=True)
        trainer, summary = train_run(cfg, compute, curve)
        t0 = time.perf_counter()
        evals = sweep(trainer, args.max_res, spec["metrics"])
        sweep_s = time.perf_counter() - t0
        out[regime] = {**compute.as_dict(), "steps": trainer.state.step, "planned_train_flops": planned,
                       "eval": evals, "curve": [{**p, "metrics": {k: float(p["metrics"][k]) for k in spec["metrics"]}} for p in curve],
                       "train_and_eval_s": round(summary["train_and_eval_s"], 1), "sweep_s": round(sweep_s, 1),
                       "skipped_samples": summary["skipped_samples"]}  # fmt: skip
        line = ", ".join(f"{r}: " + "/".join(f"{v[k]:.3f}" for k in spec["plot"]) for r, v in evals.items())
        print(f"[{task} seed {seed}] {regime}: {trainer.state.step} steps, {compute.train_flops / 1e12:.4f} TFLOPs, "
              f"{compute.train_tokens} tokens, {compute.images} images; {'/'.join(spec['plot'])} by max res {line}", flush=True)  # fmt: skip
        del trainer
    out["flops_ratio_vit_to_navit"] = out["vit"]["train_flops"] / out["navit"]["train_flops"]
    return out


def plan_vit_steps(task: str, overrides: list[str], target_train_flops: float, plan_dir: Path, max_steps: int) -> tuple[int, float]:
    """The ViT run's steps for ``target_train_flops``, from a throwaway trainer of the same
    config (same data stream) that loads the data and runs one forward, no training."""
    shutil.rmtree(plan_dir, ignore_errors=True)
    try:
        planner = Trainer(load_config(regime_config(task, "vit"), [*overrides, "train.steps=1", f"output_dir={plan_dir}"]))
        return steps_for_flops(planner, target_train_flops, max_steps)
    finally:
        shutil.rmtree(plan_dir, ignore_errors=True)


def _check_same_resolution(navit_cfg, vit_cfg) -> None:
    if navit_cfg.data.max_tokens_per_image != vit_cfg.data.max_tokens_per_image:
        raise ConfigError(f"data.max_tokens_per_image differs between the regimes ({navit_cfg.data.max_tokens_per_image} NaViT, "
                          f"{vit_cfg.data.max_tokens_per_image} ViT): the comparison trains both at the same maximum resolution")  # fmt: skip


# ---- data ------------------------------------------------------------------------------------
def detection_data(out: Path, params: dict) -> list[str]:
    path, _ = _demo_module().make_data(out, params)
    return [f"data.{s}_json={path}/lvis_v1_{s}.json" for s in ("train", "val")] + [f"data.{s}_images={path}/images" for s in ("train", "val")]


def segmentation_data(out: Path, params: dict) -> list[str]:
    stamp = out / "params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        shutil.rmtree(out, ignore_errors=True)
        make_synthetic_seg(out, **params)
        stamp.write_text(json.dumps(params))
    return [f"data.root={out}"]


DATA_DEFAULTS = {  # parameter -> default, whose type parses a --data value
    "detection": lambda: {f: getattr(LvisShapesSpec(out=""), f) for f in LvisShapesSpec.__dataclass_fields__ if f != "out"},
    "segmentation": lambda: {n: p.default for n, p in inspect.signature(make_synthetic_seg).parameters.items() if n != "out"},
}


# ---- summary ---------------------------------------------------------------------------------
def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(task: str, per_seed: list[dict]) -> dict:
    """Mean over seeds (sample sd under "sd") of every figure; the per-seed runs under "seeds"."""
    names = TASKS[task]["metrics"]
    out = {}
    for regime in REGIMES:
        runs = [s[regime] for s in per_seed]
        entry = {}
        for key in ("train_flops", "train_flops_blocks", "train_tokens", "image_tokens", "images", "steps"):
            entry[key], entry[f"{key}_sd"] = _mean_sd([r[key] for r in runs])
        entry["eval"] = {}
        for res in runs[0]["eval"]:
            row = {}
            for k in (*names, "tokens_per_image"):
                row[k], sd = _mean_sd([r["eval"][res][k] for r in runs])
                row.setdefault("sd", {})[k] = sd
            row["n"] = len(runs)
            entry["eval"][res] = row
        points = min(len(r["curve"]) for r in runs)
        entry["curve"] = [{"train_flops": _mean_sd([r["curve"][i]["train_flops"] for r in runs])[0],
                           **{k: _mean_sd([r["curve"][i]["metrics"][k] for r in runs])[0] for k in names},
                           "sd": {k: _mean_sd([r["curve"][i]["metrics"][k] for r in runs])[1] for k in names}}
                          for i in range(points)]  # fmt: skip
        entry["seeds"] = runs
        out[regime] = entry
    ratios = [s["flops_ratio_vit_to_navit"] for s in per_seed]
    out["flops_ratio_vit_to_navit"] = _mean_sd(ratios)[0]
    out["max_flops_mismatch"] = max(abs(r - 1.0) for r in ratios)
    return out


def write_csv(result: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "regime", "max_res", "metric", "mean", "sd", "seeds", "tokens_per_image", "train_flops", "train_tokens", "images", "steps"])
        for task in TASKS:
            if task not in result:
                continue
            for regime in REGIMES:
                e = result[task][regime]
                for res, row in e["eval"].items():
                    for k in TASKS[task]["metrics"]:
                        w.writerow([task, regime, res, k, row[k], row["sd"][k], row["n"], row["tokens_per_image"], e["train_flops"],
                                    e["train_tokens"], e["images"], e["steps"]])  # fmt: skip


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in result]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    styles = {"navit": "-", "vit": "--"}
    for col, task in enumerate(tasks):
        by_res, by_flops = axes[0, col], axes[1, col]
        pct = 100.0 if task == "detection" else 1.0  # LVIS AP in percent, as mIoU already is
        for regime in REGIMES:
            e = result[task][regime]
            res = sorted(e["eval"], key=int)
            for k, marker in zip(TASKS[task]["plot"], "os"):
                by_res.errorbar([int(r) for r in res], [pct * e["eval"][r][k] for r in res], yerr=[pct * e["eval"][r]["sd"][k] for r in res],
                                fmt=marker + styles[regime], capsize=3, label=f"{k} {regime}")  # fmt: skip
                by_flops.errorbar([p["train_flops"] / 1e12 for p in e["curve"]], [pct * p[k] for p in e["curve"]],
                                  yerr=[pct * p["sd"][k] for p in e["curve"]], fmt=marker + styles[regime], capsize=3, label=f"{k} {regime}")  # fmt: skip
        unit = "LVIS box AP (%)" if task == "detection" else "mIoU (%)"
        by_res.set(xlabel="max resolution at evaluation (pixels, longer side)", ylabel=unit, title=f"{task}: after equal training compute")
        by_flops.set(xlabel="training compute (TFLOPs, forward + backward)", ylabel=unit,
                     title=f"{task}: during training (each at its training resolution)")  # fmt: skip
        for a in (by_res, by_flops):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    fig.suptitle("NaViT (packed, native aspect, resolution sampling, token dropping) vs square ViT; mean +- sd over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The README tables: per task one row per regime, mean +- sd over seeds."""
    lines = []
    for task in (t for t in TASKS if t in result):
        names = TASKS[task]["plot"]
        res = sorted(result[task]["navit"]["eval"], key=int)
        header = ["task", "regime", "train TFLOPs", "train tokens (k)", "images seen", *(f"{k} @{r}" for r in res for k in names)]
        lines += ([""] if lines else []) + ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        scale = 100.0 if task == "detection" else 1.0  # AP in percent, mIoU is already
        for regime in REGIMES:
            e = result[task][regime]
            cells = [task, regime, f"{e['train_flops'] / 1e12:.3f}", f"{e['train_tokens'] / 1e3:.1f}", f"{e['images']:.0f}"]
            cells += [f"{scale * e['eval'][r][k]:.1f} +- {scale * e['eval'][r]['sd'][k]:.1f}" for r in res for k in names]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI size: 2 seeds, small data, short runs (a few minutes on 2 cores)")
    parser.add_argument("--json", default="runs/compare/compare.json", help="result JSON; the CSV and PNG are written beside it")
    parser.add_argument("--work", default="", help="data and run directories (default: beside the JSON, <json stem>_work)")
    parser.add_argument("--tasks", default="detection,segmentation", help="comma-separated, from " + ", ".join(TASKS))
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--max-res", default="", help="comma-separated max resolutions in pixels (default: the preset's)")
    parser.add_argument("--steps", action="append", default=[], metavar="TASK=N", help="NaViT optimizer steps of a task (the ViT's follow from the compute)")
    parser.add_argument("--data", action="append", default=[], metavar="TASK.KEY=VALUE",
                        help="synthetic data parameter, e.g. detection.train_images=500 or segmentation.n_train=100")
    parser.add_argument("--curve-points", type=int, default=0, help="evaluations during each run (default: the preset's)")
    parser.add_argument("--navit", action="append", default=[], metavar="KEY=VALUE", help="config override of the NaViT runs (every task)")
    parser.add_argument("--vit", action="append", default=[], metavar="KEY=VALUE", help="config override of the ViT runs (every task)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference of the two regimes' training FLOPs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["quick" if args.quick else "default"]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ConfigError(f"--tasks: unknown task(s) {bad}; choose from {', '.join(TASKS)}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
        args.max_res = [int(r) for r in args.max_res.split(",")] if args.max_res else preset["max_res"]
        args.curve_points = args.curve_points or preset["curve_points"]
        args.preset_overrides = {t: preset[t]["overrides"] for t in TASKS}
        steps = {t: preset[t]["steps"] for t in TASKS}
        for item in args.steps:
            key, _, value = item.partition("=")
            if key not in TASKS or not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--steps {item!r}: expected TASK=N with TASK in {', '.join(TASKS)} and N >= 1")
            steps[key] = int(value)
        data_params = {"detection": {**_demo_module().DATA_PARAMS, **preset["detection"]["data"]},
                       "segmentation": {"seed": 0, **preset["segmentation"]["data"]}}  # fmt: skip
        for item in args.data:
            key, _, value = item.partition("=")
            task, _, name = key.partition(".")
            if task not in data_params or not value:
                raise ConfigError(f"--data {item!r}: expected TASK.KEY=VALUE with TASK in {', '.join(TASKS)}")
            defaults = DATA_DEFAULTS[task]()
            if name not in defaults:
                raise ConfigError(f"--data {item!r}: {name!r} is not a {task} data parameter ({', '.join(defaults)})")
            data_params[task][name] = type(defaults[name])(value)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    json_path = Path(args.json)
    work = Path(args.work) if args.work else json_path.with_name(json_path.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict = {}
    try:
        for task in tasks:
            make = detection_data if task == "detection" else segmentation_data
            data_over = make(work / f"data_{task}", data_params[task])
            per_seed = [run_pair(task, seed, data_over, steps[task], args, work) for seed in seeds]
            result[task] = aggregate(task, per_seed)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t_start
    result["meta"] = {
        "mode": "quick" if args.quick else "default", "seeds": seeds, "max_res": args.max_res, "data": {t: data_params[t] for t in tasks},
        "navit_steps": {t: steps[t] for t in tasks},
        "overrides": {"both": {t: args.preset_overrides[t] for t in tasks}, "navit": args.navit, "vit": args.vit},
        "configs": {t: {r: str(regime_config(t, r).relative_to(ROOT)) for r in REGIMES} for t in tasks},
        "flops": "3 x forward FLOPs (forward + backward): every Linear / Conv of the model on the tensors it ran (padding slots included) + attention on each image's own query-key pairs",
        "threads": torch.get_num_threads(), "wall_s": round(wall, 1), "tolerance": args.tolerance,
    }  # fmt: skip
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_csv(result, json_path.with_suffix(".csv"))
    write_plot(result, json_path.with_suffix(".png"))
    table = markdown(result)
    if args.markdown:
        print(table)
    print(f"results: {json_path} (+ .csv, .png); wall {wall:.0f} s")
    worst = {t: result[t]["max_flops_mismatch"] for t in tasks}
    if any(v > args.tolerance for v in worst.values()):
        print(f"error: training FLOPs of the two regimes differ by more than {args.tolerance:.0%}: {worst}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
