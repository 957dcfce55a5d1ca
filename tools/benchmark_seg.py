#!/usr/bin/env python
"""Segmentation inference benchmark: packed native resolution vs square padding vs mmseg.

    python tools/benchmark_seg.py --json OUT.json [--plot OUT.png] [--csv OUT.csv]
        [--max-res 256,384,512,768] [--quick] [--checkpoint CKPT] [--work-dir DIR]

One process, one set of weights, the same held-out synthetic images, for each max resolution R:

(a) ``native``: NaViT packed native-resolution inference: every image resized to the largest
    whole-patch grid that fits R x R with its aspect ratio (navit_dense budget_grid), --batch
    images packed into shared sequences (pack_images), one forward of a navit_dense
    Segmenter with a LinearDecoder (navit_dense.models.heads.segmenter), logits upsampled to the
    original size.
(b) ``square``: the same model ViT-style: every image resized (aspect kept) to fit R x R,
    zero-padded to R x R (after normalization), --batch images per forward, (R/16)^2 tokens each;
    logits are cropped to the image before upsampling.
(c) ``mmseg``: ``mmseg.apis.inference_model`` on one image at a time (batch size 1) through
    the plug-in (NativeResolutionEncoderDecoder + NaViTMMSegBackbone), test pipeline
    Resize(scale=(R, R), keep_ratio=True), SegDataPreProcessor padding to a multiple of 16.

Same weights: the model is an mmseg model whose backbone is NaViTMMSegBackbone with one level
(block 3 of 4, stride 16, ``scale_factors=(1.0,)``; a local convolution, ``local_conv``: see below)
and whose decode head is an FCNHead with ``num_convs=0`` and no dropout, i.e. a 1x1 conv =
Segmenter's linear decoder. (a) and (b) run the very same NaViT module (``model.backbone.net``) with a LinearDecoder holding the conv's
weights; the tool checks that both paths give the same logits on a patch-aligned image.
Weights: ``--checkpoint`` (a Runner checkpoint of this model), or else the model is first
trained with mmseg's Runner (configs/mmseg/upernet_navit_tiny_synthetic.py with the model
above; RandomResize around 384 px, flip, photometric) for --train-iters iterations, about a
minute or two on a CPU. Data: tools/make_synthetic_seg.py (sides 160..640, aspect up to 4:1),
generated under --work-dir unless --data-root is given; metrics use the validation split.
``--seed`` seeds training (initialization, data order, augmentations); the data stay fixed.
A ``--checkpoint`` must be of the model the flags describe (same ``--backbone`` fields).

Why a local convolution (``BENCH_BACKBONE``: ``local_conv=3``, a 3x3 depthwise conv on each
image's own grid before every block; ``--backbone local_conv=0`` for the plain model): the model
trains at native resolution, yet without it (b)'s zero-canvas tokens help it at test time (plain
model, --quick, seeds 0 / 1: native minus square mIoU -1.5 to -2.4 / -2.1 to -4.8 over R =
256..768). The canvas keys are no sink (image queries give them about their share of the keys'
attention mass); the help grows with the number of canvas tokens appended, i.e. the canvas tells
border tokens where the image ends. The zero-padded depthwise conv tells them that at native
resolution: native minus square +0.7 to +1.1 / +1.0 to +1.5 (seeds 0 / 1). Gated attention
(``attn_gated``) alone narrowed the gap without closing it (+0.4 to -0.2 / -1.1 to -3.7).

Every method starts from the same decoded BGR uint8 arrays (what mmseg's loader yields) and
ends with an int prediction at the image's original size: images/s covers resizing, normalization,
packing / mmseg's pipeline, forward, upsampling and class ids (decoding and metric updates
excluded). All three resize the uint8 image with cv2 bilinear before normalizing (mmseg's Resize).
Class ids: (a) and (b) use navit_dense's ``class_map`` (ids identical to ``argmax(0)``, tested),
(c) mmseg's ``postprocess_result`` (``argmax(0)``, several times slower on CPU for a leading
dim). Each row therefore also splits wall ms/image into stages, so the gain from packing
(``forward``: backbone + head) is visible apart from post-processing:
``prepare`` (a, b: resize + normalize (+ pad); c: test pipeline, collate, SegDataPreProcessor),
``pack`` (pack_images; c: none), ``forward``, ``postprocess`` (upsampling to the original size
+ class ids; c: the head's predict_by_feat + postprocess_result, timed in place).
Methods are interleaved chunk by chunk (--batch images) so load changes on a
shared machine hit all three alike; ``cpu_images_per_s`` uses process CPU time instead of wall
time (less sensitive to being descheduled). mIoU/mAcc/aAcc: navit_dense.evaluation.seg_metrics
(= mmseg IoUMetric) against the original labels. Tokens per image: patch tokens the backbone
ran, mean over images. Peak memory (``peak_tensor_mb``, not process RSS as in the sweeps' peak_mem_mb):
navit_dense.utils.benchmark.peak_memory on the first chunk
(a, b: one packed forward of --batch images; c: the --batch images one after another), i.e.
on CPU the peak of live tensor bytes recorded by torch.profiler(profile_memory=True), weights
excluded; on CUDA max_memory_allocated.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("native", "square", "mmseg")
LABELS = {"native": "(a) NaViT packed native", "square": "(b) square-padded", "mmseg": "(c) mmseg inference_model, bs 1"}
STAGES = ("prepare", "pack", "forward", "postprocess")
COLUMNS = ("max_res", "method", "images", "images_per_s", "cpu_images_per_s", "seconds", "tokens_per_image",
           "peak_tensor_mb", "mIoU", "mAcc", "aAcc", "agreement_with_mmseg", *(f"{k}_ms_per_image" for k in STAGES))  # fmt: skip
MEAN = [123.675, 116.28, 103.53]  # RGB, 0..255 (SegDataPreProcessor)
STD = [58.395, 57.12, 57.375]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- model and weights ---------------------------------------------------------------------
# The benchmark model's NaViT fields beyond the tiny config: a 3x3 depthwise conv on each image's
# grid before every block (NaViTConfig.local_conv). --backbone local_conv=0 gives the plain model.
BENCH_BACKBONE = {"local_conv": 3}


def bench_config(data_root: Path, work_dir: Path, train_iters: int, backbone_overrides: dict | None = None, seed: int = 0):
    """The synthetic mmseg config with the linear-head model described in the docstring
    (``backbone_overrides``: NaViT config fields for a variant, e.g. reg_tokens; ``seed``:
    mmengine's training seed: initialization, data order and augmentations)."""
    from mmengine import Config

    cfg = Config.fromfile(ROOT / "configs" / "mmseg" / "upernet_navit_tiny_synthetic.py")
    cfg.model.backbone.update(out_indices=(3,), scale_factors=(1.0,))  # one stride-16 level, block 3
    cfg.model.backbone.update({**BENCH_BACKBONE, **(backbone_overrides or {})})
    cfg.model.decode_head = dict(
        type="FCNHead", in_channels=128, channels=128, in_index=0, num_convs=0, concat_input=False,
        dropout_ratio=0.0, num_classes=8, norm_cfg=None, align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )  # fmt: skip
    cfg.model.auxiliary_head = None
    cfg.model.data_preprocessor.update(size_divisor=16, test_cfg=dict(size_divisor=16))  # backbone.size_divisor
    cfg.train_pipeline[2].update(scale=(384, 384), ratio_range=(0.5, 1.5))  # long side ~190..580
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[name].dataset.data_root = str(data_root)
    cfg.train_dataloader.dataset.pipeline = cfg.train_pipeline
    cfg.train_cfg.update(max_iters=train_iters, val_interval=train_iters)
    cfg.param_scheduler[0].end = max(1, train_iters // 10)
    cfg.param_scheduler[1].update(begin=max(1, train_iters // 10), end=train_iters)
    cfg.default_hooks.checkpoint.interval = train_iters
    cfg.default_hooks.logger.interval = max(1, train_iters // 6)
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = str(work_dir)
    return cfg


def load_model(cfg, checkpoint: str | None):
    """(eval mmseg model, info). Trains with mmseg's Runner unless a checkpoint is given."""
    from mmengine.runner import Runner

    from mmseg.apis import init_model
    from navit_dense.adapters.mmseg import trusted_checkpoints

    info = {}
    if checkpoint is None:
        t0 = time.perf_counter()
        runner = Runner.from_cfg(cfg)
        runner.train()
        losses = runner.message_hub.get_scalar("train/loss").data[0]
        info = {"train_iters": cfg.train_cfg.max_iters, "train_seconds": round(time.perf_counter() - t0, 1),
                "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}  # fmt: skip
        checkpoint = str(Path(cfg.work_dir) / f"iter_{cfg.train_cfg.max_iters}.pth")
    with trusted_checkpoints():  # our own Runner checkpoint (mmengine 0.10.7 vs torch >= 2.6)
        model = init_model(cfg, checkpoint, device="cpu")
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # mmengine loads non-strictly: a checkpoint of another variant would leave weights random.
    saved, own = set(saved.get("state_dict", saved)), set(model.state_dict())
    if saved != own:
        raise SystemExit(f"--checkpoint {checkpoint} is not this model variant: missing {sorted(own - saved)[:4]}, "
                         f"unexpected {sorted(saved - own)[:4]}; pass the --backbone fields it was trained with "
                         f"(the default model has {BENCH_BACKBONE}; e.g. --backbone local_conv=0)")  # fmt: skip
    info["checkpoint"] = checkpoint
    return model, info


def native_segmenter(model):
    """Segmenter(model.backbone.net, LinearDecoder) sharing the mmseg model's weights."""
    from navit_dense.models.heads.segmenter import LinearDecoder, Segmenter

    conv = model.decode_head.conv_seg  # 1x1 conv [K, D, 1, 1]
    decoder = LinearDecoder(conv.in_channels, conv.out_channels)
    with torch.no_grad():
        decoder.head.weight.copy_(conv.weight[:, :, 0, 0])
        decoder.head.bias.copy_(conv.bias)
    return Segmenter(model.backbone.net, decoder).eval()


@torch.no_grad()
def check_same_function(model, segmenter) -> float:
    """Max |logit difference| between the mmseg path and the Segmenter on a patch-aligned image."""
    from navit_dense.data.packing import pack_images

    x = torch.randn(3, 96, 160)
    (feat,) = model.backbone([x])
    mm = model.decode_head.forward([feat])[0]
    prefix = segmenter.backbone.num_prefix_tokens
    native = segmenter(pack_images([x], 16, max_tokens_per_image=60, seq_len=64 + prefix, num_prefix_tokens=prefix)).logits[0]
    diff = float((mm - native).abs().max())
    if diff > 1e-4:
        raise AssertionError(f"(a)/(b) and (c) do not compute the same function: max logit diff {diff}")
    return diff


# ---- the three inference paths ---------------------------------------------------------------
def to_normalized(bgr: np.ndarray) -> torch.Tensor:
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1).float()
    return (rgb - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def fit_size(h: int, w: int, R: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale into R x R (Resize(scale=(R, R), keep_ratio=True))."""
    s = min(R / max(h, w), R / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def resize_bgr(bgr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of the uint8 image, as mmseg's Resize (mmcv.imresize = cv2 INTER_LINEAR),
    before normalization, as in mmseg's pipeline."""
    import cv2

    return bgr if bgr.shape[:2] == (h, w) else cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)


@torch.no_grad()
def run_native(segmenter, bgrs, R: int, clock) -> list[torch.Tensor]:
    from navit_dense.data.packing import pack_images
    from navit_dense.data.resize import budget_grid
    from navit_dense.models.heads.segmenter import class_map, upsample

    budget = (R // 16) ** 2
    with clock("prepare"):
        grids = [budget_grid(*b.shape[:2], 16, budget, max_side=R) for b in bgrs]  # fits R x R, whole patches
        images = [to_normalized(resize_bgr(b, gh * 16, gw * 16)) for b, (gh, gw) in zip(bgrs, grids)]
    with clock("pack"):  # each image already has its grid's size: pack_images only patchifies and packs
        prefix = segmenter.backbone.num_prefix_tokens
        batch = pack_images(images, 16, max_tokens=[gh * gw for gh, gw in grids], seq_len=2 * (budget + prefix), num_prefix_tokens=prefix)
    with clock("forward"):
        logits = segmenter(batch).logits
    with clock("postprocess"):
        return [class_map(upsample(lg, b.shape[:2])) for lg, b in zip(logits, bgrs)]


@torch.no_grad()
def run_square(segmenter, bgrs, R: int, clock) -> list[torch.Tensor]:
    from navit_dense.data.packing import pack_images
    from navit_dense.models.heads.segmenter import class_map, upsample

    squares, fitted = [], []
    with clock("prepare"):
        for bgr in bgrs:
            h, w = fit_size(*bgr.shape[:2], R)
            x = to_normalized(resize_bgr(bgr, h, w))
            squares.append(F.pad(x, (0, R - w, 0, R - h)))  # 0 = the mean colour after normalization
            fitted.append((h, w))
    budget = (R // 16) ** 2
    with clock("pack"):
        prefix = segmenter.backbone.num_prefix_tokens
        batch = pack_images(squares, 16, max_tokens_per_image=budget, seq_len=budget + prefix, num_prefix_tokens=prefix)
    with clock("forward"):
        logits = segmenter(batch).logits
    with clock("postprocess"):
        return [class_map(upsample(upsample(lg, (R, R))[:, :h, :w], b.shape[:2])) for lg, (h, w), b in zip(logits, fitted, bgrs)]


@torch.no_grad()
def run_mmseg(model, bgrs, clock) -> list[torch.Tensor]:
    """mmseg's own inference; its forward and post-processing methods are timed in place (the
    rest of the call, test pipeline, collate and SegDataPreProcessor, is its "prepare")."""
    from mmseg.apis import inference_model

    stages = {
        "forward": [(model, "extract_feat"), (model.decode_head, "forward")],
        "postprocess": [(model.decode_head, "predict_by_feat"), (model, "postprocess_result")],
    }
    with clock.methods(stages):
        return [inference_model(model, bgr).pred_sem_seg.data[0] for bgr in bgrs]


def set_mmseg_resolution(model, R: int) -> None:
    model.cfg.test_pipeline = [
        dict(type="LoadImageFromNDArray"),
        dict(type="Resize", scale=(R, R), keep_ratio=True),
        dict(type="PackSegInputs"),
    ]


class TokenCounter:
    """Patch tokens the NaViT ran, per method, counted by a forward pre-hook on the one NaViT
    module all three paths share (mmseg's backbone included): measured, not derived."""

    def __init__(self, net: torch.nn.Module):
        self.method: str | None = None  # counting only while set (timed calls)
        self.tokens: dict[str, int] = {}
        net.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if self.method is not None:
            self.tokens[self.method] = self.tokens.get(self.method, 0) + int(args[0].num_kept.sum())


# ---- benchmark -------------------------------------------------------------------------------
def benchmark(model, segmenter, samples, resolutions, batch: int, log=print) -> list[dict]:
    from navit_dense.evaluation.seg_metrics import SegMetric
    from navit_dense.utils.benchmark import StageClock, peak_memory

    rows = []
    chunks = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    counter = TokenCounter(segmenter.backbone)
    for R in resolutions:
        if R % 16:
            raise ValueError(f"max resolution {R} is not a multiple of the patch size 16")
        set_mmseg_resolution(model, R)
        clocks = {m: StageClock() for m in METHODS}
        run = {
            "native": lambda bgrs, clock: run_native(segmenter, bgrs, R, clock),
            "square": lambda bgrs, clock: run_square(segmenter, bgrs, R, clock),
            "mmseg": lambda bgrs, clock: run_mmseg(model, bgrs, clock),
        }
        first = [s[0] for s in chunks[0]]
        for m in METHODS:  # warm-up (allocator, first-call overheads), untimed
            run[m](first[:2], StageClock())
        wall = dict.fromkeys(METHODS, 0.0)
        cpu = dict.fromkeys(METHODS, 0.0)
        metrics = {m: SegMetric(num_classes=8) for m in METHODS}
        agree = {m: [0, 0] for m in METHODS}
        for chunk in chunks:
            bgrs = [s[0] for s in chunk]
            preds = {}
            for m in METHODS:
                staged = sum(clocks[m].seconds.values())
                counter.method = f"{R}/{m}"
                c0, t0 = time.process_time(), time.perf_counter()
                preds[m] = run[m](bgrs, clocks[m])
                elapsed = time.perf_counter() - t0
                counter.method = None
                wall[m] += elapsed
                cpu[m] += time.process_time() - c0
                if m == "mmseg":  # everything of the call outside the timed methods
                    clocks[m].add("prepare", elapsed - (sum(clocks[m].seconds.values()) - staged))
            for m in METHODS:
                for p, (_, label) in zip(preds[m], chunk):
                    metrics[m].update(p, label)
                for p, q, (_, label) in zip(preds[m], preds["mmseg"], chunk):
                    valid = label != 255
                    agree[m][0] += int((p[valid] == q[valid]).sum())
                    agree[m][1] += int(valid.sum())
        for m in METHODS:
            peak, _ = peak_memory(lambda: run[m](first, StageClock()))
            res = metrics[m].compute()
            rows.append({
                "max_res": R, "method": m, "images": len(samples),
                "images_per_s": round(len(samples) / wall[m], 3), "cpu_images_per_s": round(len(samples) / cpu[m], 3),
                "seconds": round(wall[m], 3), "tokens_per_image": round(counter.tokens[f"{R}/{m}"] / len(samples), 1),
                "peak_tensor_mb": round(peak / 2**20, 1), "mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"],
                "agreement_with_mmseg": round(100 * agree[m][0] / max(agree[m][1], 1), 2),
                **{f"{k}_ms_per_image": round(1000 * clocks[m].seconds.get(k, 0.0) / len(samples), 2) for k in STAGES},
            })  # fmt: skip
            stages = " ".join(f"{k} {rows[-1][f'{k}_ms_per_image']:.1f}" for k in STAGES)
            log(f"R={R:4d} {LABELS[m]:32s} {rows[-1]['images_per_s']:7.2f} img/s  {rows[-1]['tokens_per_image']:7.1f} tok/img  "
                f"peak {rows[-1]['peak_tensor_mb']:7.1f} MiB  mIoU {res['mIoU']:.2f}  ms/img: {stages}")  # fmt: skip
    return rows


def summarize(rows) -> dict:
    by = {(r["max_res"], r["method"]): r for r in rows}
    out = {}
    for R in sorted({r["max_res"] for r in rows}):
        a, b, c = by[R, "native"], by[R, "square"], by[R, "mmseg"]
        out[str(R)] = {
            "native_over_mmseg_speed": round(a["images_per_s"] / c["images_per_s"], 2),
            "native_over_mmseg_cpu_speed": round(a["cpu_images_per_s"] / c["cpu_images_per_s"], 2),
            # The packing / batching part alone: backbone + head time per image, (c) over (a).
            "native_over_mmseg_forward_speed": round(c["forward_ms_per_image"] / max(a["forward_ms_per_image"], 1e-9), 2),
            "native_over_square_speed": round(a["images_per_s"] / b["images_per_s"], 2),
            "native_minus_square_mIoU": round(a["mIoU"] - b["mIoU"], 2),
            "native_over_square_tokens": round(a["tokens_per_image"] / b["tokens_per_image"], 3),
            "native_over_mmseg_speed_target_2x_met": a["images_per_s"] >= 2 * c["images_per_s"],
        }
    return out


def plot(rows, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, marker in zip(METHODS, "osd"):
        rs = [r for r in rows if r["method"] == m]
        res = [r["max_res"] for r in rs]
        ax1.plot(res, [r["mIoU"] for r in rs], marker=marker, label=LABELS[m])
        ax2.plot(res, [r["images_per_s"] for r in rs], marker=marker, label=LABELS[m])
    ax1.set(xlabel="max resolution R (px)", ylabel="mIoU (%)", title="mIoU vs max resolution")
    ax2.set(xlabel="max resolution R (px)", ylabel="images / s (log)", title="throughput vs max resolution", yscale="log")
    speeds = [r["images_per_s"] for r in rows]
    ax2.set_yticks([v for v in (0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500) if min(speeds) / 1.5 <= v <= max(speeds) * 1.5])
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["max_res"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The tool's layout (P = 16 pixel pipeline, 128-wide 1x1 head, block 3, token maps) is fixed.
FIXED_FIELDS = ("patch_size", "embed_dim", "in_chans", "out_indices", "global_pool", "num_classes")


def parse_backbone_overrides(items: list[str]) -> dict:
    import yaml

    from navit_dense.models import NaViTConfig

    valid = sorted({f.name for f in fields(NaViTConfig)} - set(FIXED_FIELDS))
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in valid:
            raise SystemExit(f"--backbone {item!r}: expected FIELD=VALUE with FIELD one of {valid} (fixed here: {list(FIXED_FIELDS)})")
        out[key] = yaml.safe_load(value)
    return out


def load_samples(data_root: Path, limit: int | None):
    """(BGR uint8 HxWx3, int64 label with reduce_zero_label) for the validation split."""
    import cv2

    from navit_dense.data.seg_dataset import ADE20KDataset

    ds = ADE20KDataset(data_root, "validation")
    n = len(ds) if limit is None else min(limit, len(ds))
    out = []
    for i in range(n):
        img_path, _ = ds.samples[i]
        bgr = cv2.imread(img_path, cv2.IMREAD_COLOR)
        out.append((bgr, ds.load_label(i, size=bgr.shape[:2])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="output JSON")
    ap.add_argument("--plot", help="output PNG (mIoU and images/s vs max resolution)")
    ap.add_argument("--csv", help="output CSV")
    ap.add_argument("--max-res", default="256,384,512,768", help="comma-separated max resolutions (multiples of 16)")
    ap.add_argument("--quick", action="store_true", help="smaller data and training (a few minutes)")
    ap.add_argument("--checkpoint", help="Runner checkpoint of the benchmark model (skips training)")
    ap.add_argument("--data-root", help="ADE20K-format data (default: generated under --work-dir)")
    ap.add_argument("--work-dir", default="runs/benchmark_seg")
    ap.add_argument("--train-iters", type=int, help="training iterations (default 600, --quick 200)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (weights init, data order, augmentations); the data stay fixed")
    ap.add_argument("--num-images", type=int, help="held-out images (default 40, --quick 16)")
    ap.add_argument("--batch", type=int, default=8, help="images per packed forward in (a) and (b)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every method")
    ap.add_argument("--backbone", action="append", default=[], metavar="FIELD=VALUE",
                    help="NaViT config override for a model variant (YAML value; repeatable), e.g. reg_tokens=4")
    args = ap.parse_args(argv)

    from navit_dense.utils.benchmark import set_threads

    threads = set_threads(args.threads)
    resolutions = [int(r) for r in args.max_res.split(",")]
    work = Path(args.work_dir)
    n_train, n_val = (96, 16) if args.quick else (240, 40)
    train_iters = args.train_iters or (200 if args.quick else 600)
    data_root = Path(args.data_root) if args.data_root else work / "data"
    meta = data_root / "meta.json"
    wanted = {"training": n_train, "validation": n_val}
    if not args.data_root and (not meta.is_file() or json.loads(meta.read_text()).get("num_images") != wanted):
        t0 = time.perf_counter()
        if data_root.exists():  # made for the other mode (--quick or not): never benchmark a mix
            shutil.rmtree(data_root)
        _tool("make_synthetic_seg").make_synthetic_seg(data_root, seed=0, n_train=n_train, n_val=n_val, min_side=160, max_side=640)
        print(f"generated {n_train} + {n_val} images in {data_root} ({time.perf_counter() - t0:.1f} s)")

    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    overrides = parse_backbone_overrides(args.backbone)
    backbone = {**BENCH_BACKBONE, **overrides}
    cfg = bench_config(data_root, work / "train", train_iters, overrides, seed=args.seed)
    model, train_info = load_model(cfg, args.checkpoint)
    segmenter = native_segmenter(model)
    same_fn_diff = check_same_function(model, segmenter)
    samples = load_samples(data_root, args.num_images or (16 if args.quick else 40))
    print(f"benchmarking {len(samples)} held-out images, same weights in (a), (b), (c) (max logit diff {same_fn_diff:.1e})")
    t0 = time.perf_counter()
    rows = benchmark(model, segmenter, samples, resolutions, args.batch)

    import mmseg

    report = {
        "rows": rows,
        "summary": summarize(rows),
        "methods": LABELS,
        "weights": {**train_info, "model": "NaViT-Ti depth 4, dim 128, 4 heads, P=16, block 3 -> linear (1x1 conv) head, "
                                           f"NaViT fields {backbone} (tool default {BENCH_BACKBONE})",
                    "backbone": backbone, "backbone_overrides": overrides, "seed": args.seed,
                    "same_function_max_logit_diff": same_fn_diff},  # fmt: skip
        "data": {"root": str(data_root), "held_out_images": len(samples),
                 "image_sizes_hw": [list(s[0].shape[:2]) for s in samples]},  # fmt: skip
        "method_notes": {
            "images_per_s": "images / wall seconds, normalization + resize + packing/pipeline + forward + upsample + argmax; methods interleaved per chunk",
            "cpu_images_per_s": "images / process CPU seconds of the same calls",
            "peak_tensor_mb": "navit_dense.utils.benchmark.peak_memory on the first chunk (a, b: one packed forward of --batch images; "
                           "c: those images one by one): CPU = peak live torch tensor bytes (torch.profiler profile_memory), weights excluded",
            "tokens_per_image": "patch tokens the backbone ran per image (mean)",
            "agreement_with_mmseg": "percent of labelled pixels where the method's prediction equals (c)'s",
            "<stage>_ms_per_image": "wall ms per image in prepare / pack / forward / postprocess (see the tool's docstring)",
        },  # fmt: skip
        "env": {"threads": threads, "batch": args.batch, "torch": torch.__version__, "mmseg": mmseg.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg()),
                "benchmark_seconds": round(time.perf_counter() - t0, 1)},  # fmt: skip
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, Path(args.plot))
    for R, s in report["summary"].items():
        print(f"R={R}: (a)/(c) speed {s['native_over_mmseg_speed']}x (cpu {s['native_over_mmseg_cpu_speed']}x, "
              f"forward only {s['native_over_mmseg_forward_speed']}x), "
              f"(a)/(b) speed {s['native_over_square_speed']}x, mIoU (a)-(b) {s['native_minus_square_mIoU']:+.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
