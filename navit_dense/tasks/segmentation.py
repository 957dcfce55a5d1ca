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
  where they overlap (see navit_dense.models.sliding_window). Images no bigger than a window are
  evaluated exactly as in whole mode. The token-budget sampler plans micro-batches from one
  budget per image, so a slide micro-batch holds (windows per image) times more tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch
import torch.nn as nn

from ..data import PackedBatch
from ..data.resize import scale_budgets
from ..data.seg_dataset import ADE20KDataset, SegFolderDataset, SegTaskDataset, load_seg_meta
from ..data.seg_transforms import SegAugment, resize_label
from ..engine.config import DataConfig, ModelConfig, config_schema
from ..engine.task import LossContext, PackPlan, Task, register_task
from ..evaluation.evaluators import SegEvaluator
from ..losses.segmentation import seg_loss_sum
from ..models.heads.segmenter import DECODERS, Segmenter, SegOutput, build_decoder
from ..models.sliding_window import crop_windows, slide_windows


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
class _SegmentationData(DataConfig):
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
    class_names: Optional[list[str]] = None  # one per class (folder format; ade20k: read from root/meta.json when present)
    # ADE20K: file value 0 = "other" -> ignored, classes 1..K -> 0..K-1. None: root/meta.json's value, else
    # True for ade20k and False for folder; a value contradicting meta.json is an error.
    reduce_zero_label: Optional[bool] = None
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Evaluation
    eval_mode: str = "whole"  # whole | slide
    slide_window: int = 0  # window side in pixels; 0: sqrt(max_tokens_per_image) * patch_size
    slide_stride_ratio: float = 0.667  # stride = window * ratio (mmseg ADE: 341 / 512)
    # Stretch every image to a square (training and whole-image evaluation) before packing: the
    # fixed-resolution square ViT regime of tools/compare_navit_vit.py. Labels follow in training
    # (resized to the packed size); predictions are upsampled back to the original size.
    square_resize: bool = False


# The training augmentation (aspect-preserving crop, flip, photometric jitter, budget scale
# jitter) and ignore_index are SegAugment's own fields, generated from it.
SegmentationDataConfig = config_schema(SegAugment, "SegmentationDataConfig", bases=(_SegmentationData,))


def _stretch_to_square(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] -> [C, S, S], S = max(H, W): the short side is stretched (upsampling only, so
    no antialiasing is needed; the packer then resizes the square to its token budget). A uint8
    image (data.uint8_patches) stays uint8."""
    S = max(image.shape[-2:])
    if image.shape[-2] == image.shape[-1]:
        return image
    out = torch.nn.functional.interpolate(image[None].float(), size=(S, S), mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out.to(image.dtype)


# ---- task ------------------------------------------------------------------------------------
@register_task("segmentation")
class SegmentationTask(Task):
    ModelConfig = SegmentationModelConfig
    DataConfig = SegmentationDataConfig
    supports_uint8_patches = True

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
        if d.square_resize and d.eval_mode == "slide":
            raise ValueError("data.square_resize=true needs data.eval_mode=whole (slide windows are cut from the image's own pixels)")
        self._datasets: dict[str, SegTaskDataset] = {}

    @property
    def meta(self) -> dict:
        """The dataset's meta.json (class names, palette) when it has one."""
        return (load_seg_meta(self.cfg.data.root) if self.cfg.data.format == "ade20k" and self.cfg.data.root else None) or {}

    def class_names(self) -> list[str] | None:
        """data.class_names, else the dataset's meta.json classes (checked against the dataset when it is built)."""
        return self.cfg.data.class_names or self.meta.get("classes")

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
        common = dict(num_classes=d.num_classes, classes=d.class_names, ignore_index=d.ignore_index,
                      img_suffix=d.img_suffix, seg_map_suffix=d.seg_map_suffix)  # fmt: skip
        try:
            if d.format == "ade20k":
                name = {"train": d.train_split, "val": d.val_split}[split]
                if not name:
                    return None
                base = ADE20KDataset(d.root, split=name, reduce_zero_label=d.reduce_zero_label, **common)
            else:
                img_dir, ann_dir = {"train": (d.train_img_dir, d.train_ann_dir), "val": (d.val_img_dir, d.val_ann_dir)}[split]
                if not img_dir:
                    return None
                base = SegFolderDataset(img_dir, ann_dir, reduce_zero_label=bool(d.reduce_zero_label), **common)
        except ValueError as e:  # contradicting metadata, class names that do not fit num_classes
            raise ValueError(f"data ({split} split): {e}") from None
        augment = SegAugment(**{f.name: getattr(d, f.name) for f in fields(SegAugment)}) if split == "train" else None
        self._datasets[split] = SegTaskDataset(base, d.mean, d.std, augment, normalize=self.pixel_norm is None)
        return self._datasets[split]

    def collate(self, samples: list[dict], plan: PackPlan) -> tuple[PackedBatch, dict]:
        d = self.cfg.data
        plan = replace(plan, pixel_norm=self.pixel_norm)
        images = [s["image"] for s in samples]
        if d.square_resize:
            images = [_stretch_to_square(im) for im in images]
        targets: dict[str, Any] = {"index": [s["index"] for s in samples]}
        if plan.train:
            budgets = scale_budgets(plan.max_tokens, [s["budget_scale"] for s in samples], plan.seq_len - plan.num_prefix_tokens)
            batch = replace(plan, max_tokens=budgets).pack(images)
            # The loss is taken at the size each image was packed at (see seg_heads).
            targets["labels"] = [resize_label(s["label"], size) for s, size in zip(samples, batch.layout.resized_sizes)]
            # Counted here, in the data workers, so the training step never reads labels back from the device.
            targets["valid_pixels"] = sum(int((y != d.ignore_index).sum()) for y in targets["labels"])
            return batch, targets
        targets["labels"] = [s["label"] for s in samples]  # original size: evaluation is there
        if d.eval_mode == "whole":
            targets["windows"] = [None] * len(samples)
            return plan.pack(images), targets
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
        return replace(plan, max_tokens=budgets, seed=crop_seeds).pack(crops), targets

    def count(self, batch: PackedBatch, targets: dict) -> dict[str, float]:
        valid = targets.get("valid_pixels")
        if valid is None:  # evaluation batches (or targets made elsewhere): count on the spot
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
