"""Task "segmentation": Segmenter (linear or mask-transformer decoder) on NaViT, trained and
evaluated on packed mixed-size batches at native aspect ratio; ADE20K-format or folder data.

Training: each image is augmented at its own resolution (aspect-preserving random crop,
horizontal flip, brightness / contrast / saturation jitter), packed at its token budget times
a random budget scale (scale jitter: the packer does the resizing), and its label is resized
by nearest neighbour to the size it was packed at; the loss is the cross-entropy over the
valid pixels of every image, divided by the number of valid pixels in the whole global batch.

Evaluation (mmseg's protocol): logits are upsampled to each image's ORIGINAL size and the
argmax is compared with the untouched label (:class:`~navit_dense.evaluation.seg_metrics.SegMetric`:
aAcc, mIoU, mAcc in percent, as mmseg's IoUMetric). ``data.eval_mode``:

- ``whole``: every image packed whole at the token budget (downscaled or upscaled to it);
- ``slide``: every image cut into windows of ``slide_window`` native pixels (default: the
  budget's side, sqrt(max_tokens_per_image) * patch), ``slide_stride_ratio`` * window apart;
  the windows of all images of a micro-batch are packed together and their logits averaged
  where they overlap (see navit_dense.models.seg_heads). Images no bigger than a window are
  evaluated exactly as in whole mode. The token-budget sampler plans micro-batches from one
  budget per image, so a slide micro-batch holds (windows per image) times more tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ..data import PackedBatch
from ..data.resize import scale_budgets
from ..data.seg_dataset import ADE20KDataset, SegFolderDataset, load_seg_meta
from ..engine.config import DataConfig, ModelConfig
from ..engine.task import LossContext, PackPlan, Task, register_task
from ..evaluation.seg_metrics import SegMetric
from ..models.seg_heads import (
    DECODERS,
    Segmenter,
    SegOutput,
    build_decoder,
    class_map,
    crop_windows,
    merge_windows,
    resize_label,
    seg_loss_sum,
    slide_windows,
    upsample,
)


# ---- config ----------------------------------------------------------------------------------
@dataclass
class DecoderConfig:
    type: str = "linear"  # linear | mask_transformer
    norm: bool = False  # linear: LayerNorm before the Linear (the backbone's final features are already normed)
    # mask_transformer (Segmenter: 2 layers at the backbone's width and heads)
    dim: int = 0  # 0: the backbone's embed_dim
    depth: int = 2
    num_heads: int = 0  # 0: the backbone's num_heads
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0


@dataclass
class SegmentationModelConfig(ModelConfig):
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class SegmentationDataConfig(DataConfig):
    format: str = "ade20k"  # ade20k: root/{images,annotations}/{split}; folder: the *_img_dir / *_ann_dir below
    root: str = ""
    train_split: str = "training"  # "" : no training set
    val_split: str = "validation"  # "" : no validation set
    train_img_dir: str = ""
    train_ann_dir: str = ""
    val_img_dir: str = ""
    val_ann_dir: str = ""
    img_suffix: str = ".jpg"
    seg_map_suffix: str = ".png"
    num_classes: int = 0  # required (ADE20K: 150)
    reduce_zero_label: bool = True  # ADE20K: file value 0 = "other" -> ignored, classes 1..K -> 0..K-1
    ignore_index: int = 255
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Training augmentations, all aspect-preserving.
    scale_jitter: list[float] = field(default_factory=lambda: [0.75, 1.25])  # side factor on the token budget (tokens: its square)
    crop_prob: float = 0.5
    min_crop: float = 0.5  # crop f ~ U(min_crop, 1) of BOTH sides
    cat_max_ratio: float = 0.75  # mmseg RandomCrop: retry (10x) crops where one class covers more; 1 disables
    flip_prob: float = 0.5
    photometric_prob: float = 0.5  # each of brightness / contrast / saturation applied with this probability
    brightness: float = 0.125  # factor ~ U(1 - b, 1 + b)
    contrast: float = 0.5
    saturation: float = 0.5
    # Evaluation
    eval_mode: str = "whole"  # whole | slide
    slide_window: int = 0  # window side in pixels; 0: sqrt(max_tokens_per_image) * patch_size
    slide_stride_ratio: float = 0.667  # stride = window * ratio (mmseg ADE: 341 / 512)
    max_side: Optional[int] = None  # cap on the longer side in pixels when packing (the resolution sweep sets it)


# ---- data ------------------------------------------------------------------------------------
def header_size(path: str, exif: bool = True) -> tuple[int, int]:
    """(H, W) of an image file from its header only (no pixel decoding), after the EXIF
    orientation load_image applies. PNG's getexif() would decode the file to look for a late
    eXIf chunk, so the base Image.getexif (header info only) is used."""
    with Image.open(path) as im:
        w, h = im.size
        if exif:
            try:
                orientation = Image.Image.getexif(im).get(0x0112, 1)  # ExifTags.Base.Orientation
            except Exception:  # broken EXIF: load_image keeps the stored orientation too
                orientation = 1
            if orientation in (5, 6, 7, 8):  # transposing orientations swap the sides
                w, h = h, w
    return h, w


class SegAugment:
    """Training augmentation of ``{"image": float [3, H, W] in [0, 1], "label": [H, W]}``:
    random crop (same fraction of both sides: aspect kept; mmseg's cat_max_ratio retries),
    horizontal flip, photometric jitter (torchvision's brightness / contrast / saturation).
    Image and label are cropped and flipped together."""

    def __init__(self, d: SegmentationDataConfig):
        self.d = d

    def _crop_box(self, label: torch.Tensor, rng: np.random.Generator) -> tuple[int, int, int, int]:
        d = self.d
        H, W = label.shape
        for _ in range(10):
            f = rng.uniform(d.min_crop, 1.0)
            h, w = max(1, round(H * f)), max(1, round(W * f))
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            if d.cat_max_ratio >= 1:
                break
            window = label[y0 : y0 + h, x0 : x0 + w]
            counts = torch.unique(window[window != d.ignore_index], return_counts=True)[1]
            if len(counts) > 1 and counts.max() / counts.sum() < d.cat_max_ratio:
                break  # as mmseg: otherwise the last try is used
        return y0, x0, h, w

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        d = self.d
        image, label = item["image"], item["label"]
        if rng.random() < d.crop_prob:
            y0, x0, h, w = self._crop_box(label, rng)
            image, label = image[:, y0 : y0 + h, x0 : x0 + w], label[y0 : y0 + h, x0 : x0 + w]
        if rng.random() < d.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        jitters = ((d.brightness, TF.adjust_brightness), (d.contrast, TF.adjust_contrast), (d.saturation, TF.adjust_saturation))
        for amount, adjust in jitters:
            if amount > 0 and rng.random() < d.photometric_prob:
                image = adjust(image, float(rng.uniform(1 - amount, 1 + amount)))
        lo, hi = d.scale_jitter
        budget_scale = float(rng.uniform(lo, hi))
        return {**item, "image": image.contiguous(), "label": label.contiguous(), "budget_scale": budget_scale}


class SegTaskDataset:
    """A segmentation dataset as the engine wants it: ``image_size`` from file headers,
    augmented (train) and normalized samples ``{"image", "label", "index", "train",
    "budget_scale"}``. Bad inputs raise DataError: the engine skips (and counts) them in
    training and stops an evaluation, so metrics always cover the whole split."""

    def __init__(self, base: SegFolderDataset, d: SegmentationDataConfig, train: bool):
        self.base, self.d, self.train = base, d, train
        self.augment = SegAugment(d) if train else None
        self.mean = torch.tensor(d.mean).view(3, 1, 1)
        self.std = torch.tensor(d.std).view(3, 1, 1)
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.base)

    def image_size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            img, ann = self.base.samples[index]
            try:
                self._sizes[index] = header_size(img, self.base.exif)
            except Exception:  # unreadable header: the label map has the same size by contract
                self._sizes[index] = header_size(ann, exif=False)
        return self._sizes[index]

    def __getitem__(self, index: int) -> dict | None:
        item = self.base[index]  # a bad input raises DataError: the engine skips it in training only
        item = {"image": item["image"], "label": item["label"], "index": index, "train": self.train, "budget_scale": 1.0}
        if self.augment is not None:  # global RNG: the engine seeds it per (seed, epoch, index)
            item = self.augment(item, np.random.default_rng(int(torch.randint(0, 2**62, ()))))
        item["image"] = (item["image"] - self.mean) / self.std
        return item

    def unnormalized(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image in [0, 1], label) of an item as stored, for visualization."""
        item = self.base[index]
        return item["image"], item["label"]


# ---- evaluation ------------------------------------------------------------------------------
class SegEvaluator:
    """Predictions at each image's original size -> SegMetric (mmseg IoUMetric numbers).
    ``keep`` > 0 also keeps the predicted maps of dataset items with index < keep (tools)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None, keep: int = 0):
        self.metric = SegMetric(num_classes, ignore_index=ignore_index, class_names=class_names)
        self.keep = keep
        self.predictions: dict[int, torch.Tensor] = {}

    def process(self, outputs: SegOutput, targets: dict) -> None:
        logits = iter(outputs.logits)
        for label, boxes, index in zip(targets["labels"], targets["windows"], targets["index"]):
            if boxes is None:
                full = upsample(next(logits).float(), label.shape)
            else:
                full = merge_windows([next(logits) for _ in boxes], boxes, label.shape)
            pred = class_map(full)
            self.metric.update(pred, label)
            if index < self.keep:
                self.predictions[index] = pred.to(torch.int16).cpu()

    def state(self) -> dict:
        return {"metric": self.metric, "predictions": self.predictions}

    def merge(self, states: list[dict]) -> None:
        for s in states:
            self.metric.merge(s["metric"])
            self.predictions.update(s["predictions"])

    def metrics(self) -> dict[str, float]:
        m = self.metric.compute()
        summary = {k: m[k] for k in ("mIoU", "mAcc", "aAcc")}
        return {**summary, "images": float(self.metric.num_updates), "pixels": float(m["num_pixels"])}


# ---- task ------------------------------------------------------------------------------------
@register_task("segmentation")
class SegmentationTask(Task):
    ModelConfig = SegmentationModelConfig
    DataConfig = SegmentationDataConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.data
        if d.num_classes < 1:
            raise ValueError("segmentation task: set data.num_classes (ADE20K: 150)")
        if d.eval_mode not in ("whole", "slide"):
            raise ValueError(f"data.eval_mode must be whole or slide, got {d.eval_mode!r}")
        if cfg.model.decoder.type not in DECODERS:
            raise ValueError(f"model.decoder.type must be one of {DECODERS}, got {cfg.model.decoder.type!r}")
        if d.format not in ("ade20k", "folder"):
            raise ValueError(f"data.format must be ade20k or folder, got {d.format!r}")
        self._datasets: dict[str, SegTaskDataset] = {}

    @property
    def meta(self) -> dict:
        """The dataset's meta.json (class names, palette) when it has one."""
        return (load_seg_meta(self.cfg.data.root) if self.cfg.data.format == "ade20k" and self.cfg.data.root else None) or {}

    def class_names(self) -> list[str] | None:
        names = self.meta.get("classes")
        return names if names is not None and len(names) == self.cfg.data.num_classes else None

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        # No pooled vector is used (MAP head off); the mask token only receives gradients when
        # tokens are dropped: otherwise both would be unused parameters (DDP errors).
        mask_fill = "token" if self.cfg.data.token_drop.mode != "none" else "zeros"
        backbone = self.build_backbone(global_pool="none", mask_fill=mask_fill)
        dec = m.decoder
        K = self.cfg.data.num_classes
        if dec.type == "linear":
            decoder = build_decoder("linear", backbone.embed_dim, K, norm=dec.norm)
        else:
            decoder = build_decoder("mask_transformer", backbone.embed_dim, K, dim=dec.dim or backbone.embed_dim, depth=dec.depth,
                                    num_heads=dec.num_heads or backbone.cfg.num_heads, mlp_ratio=dec.mlp_ratio,
                                    drop_path_rate=dec.drop_path_rate, attn_kernel=backbone.cfg.attn_kernel)  # fmt: skip
        return Segmenter(backbone, decoder)

    def build_dataset(self, split: str) -> SegTaskDataset | None:
        if split in self._datasets:
            return self._datasets[split]
        d = self.cfg.data
        common = dict(num_classes=d.num_classes, reduce_zero_label=d.reduce_zero_label, ignore_index=d.ignore_index,
                      img_suffix=d.img_suffix, seg_map_suffix=d.seg_map_suffix)  # fmt: skip
        if d.format == "ade20k":
            name = {"train": d.train_split, "val": d.val_split}[split]
            if not name:
                return None
            base = ADE20KDataset(d.root, split=name, **common)
        else:
            img_dir, ann_dir = {"train": (d.train_img_dir, d.train_ann_dir), "val": (d.val_img_dir, d.val_ann_dir)}[split]
            if not img_dir:
                return None
            base = SegFolderDataset(img_dir, ann_dir, **common)
        self._datasets[split] = SegTaskDataset(base, d, train=split == "train")
        return self._datasets[split]

    def collate(self, samples: list[dict], plan: PackPlan) -> tuple[PackedBatch, dict]:
        d = self.cfg.data
        images = [s["image"] for s in samples]
        targets: dict[str, Any] = {"index": [s["index"] for s in samples]}
        if samples[0]["train"]:
            budgets = scale_budgets(plan.max_tokens, [s["budget_scale"] for s in samples], plan.seq_len - plan.num_prefix_tokens)
            batch = replace(plan, max_tokens=budgets, max_side=d.max_side).pack(images)
            # The loss is taken at the size each image was packed at (see seg_heads).
            targets["labels"] = [resize_label(s["label"], size) for s, size in zip(samples, batch.resized_sizes.tolist())]
            return batch, targets
        targets["labels"] = [s["label"] for s in samples]  # original size: evaluation is there
        if d.eval_mode == "whole":
            targets["windows"] = [None] * len(samples)
            return replace(plan, max_side=d.max_side).pack(images), targets
        seeds = plan.seed if isinstance(plan.seed, list) else [plan.seed] * len(samples)
        crops, budgets, crop_seeds, windows = [], [], [], []
        for image, budget, seed in zip(images, plan.max_tokens, seeds):
            window = d.slide_window or math.isqrt(budget) * plan.patch_size
            boxes = slide_windows(image.shape[-2], image.shape[-1], window, max(1, round(window * d.slide_stride_ratio)))
            crops += crop_windows(image, boxes)
            budgets += [budget] * len(boxes)
            crop_seeds += [seed] * len(boxes)
            windows.append(boxes)
        targets["windows"] = windows
        return replace(plan, max_tokens=budgets, seed=crop_seeds, max_side=d.max_side).pack(crops), targets

    def count(self, batch: PackedBatch, targets: dict) -> dict[str, float]:
        valid = sum(int((y != self.cfg.data.ignore_index).sum()) for y in targets["labels"])
        return {"images": float(batch.num_images), "pixels": float(valid)}

    def losses(self, outputs: SegOutput, targets: dict, ctx: LossContext) -> dict[str, torch.Tensor]:
        # Sum over the valid pixels of every image / valid pixels of the GLOBAL batch: summing
        # micro-batches and ranks gives the pixel-mean loss of the whole step.
        loss = seg_loss_sum(outputs.logits, targets["labels"], self.cfg.data.ignore_index) / max(ctx.totals["pixels"], 1.0)
        return {"loss": loss}

    def build_evaluator(self, keep: int = 0) -> SegEvaluator:
        d = self.cfg.data
        return SegEvaluator(d.num_classes, d.ignore_index, self.class_names(), keep=keep)
