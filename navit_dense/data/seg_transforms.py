"""Segmentation training transforms at the image's own resolution: aspect-preserving crop,
flip and photometric jitter of image and label together, and nearest-neighbour label resizing
to the size an image was packed at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class SegAugment:
    """Training augmentation of ``{"image": float [3, H, W] in [0, 1], "label": [H, W]}``:
    random crop (same fraction of both sides: aspect kept; mmseg's cat_max_ratio retries),
    horizontal flip, photometric jitter (torchvision's brightness / contrast / saturation).
    Image and label are cropped and flipped together."""

    crop_prob: float = 0.5
    min_crop: float = 0.5  # crop f ~ U(min_crop, 1) of BOTH sides
    cat_max_ratio: float = 0.75  # retry (10x) crops where one class covers more; 1 disables
    flip_prob: float = 0.5
    photometric_prob: float = 0.5  # each of brightness / contrast / saturation applied with this probability
    brightness: float = 0.125  # factor ~ U(1 - b, 1 + b)
    contrast: float = 0.5
    saturation: float = 0.5
    scale_jitter: tuple[float, float] = (0.75, 1.25)  # side factor on the token budget, returned as budget_scale
    ignore_index: int = 255

    def _crop_box(self, label: torch.Tensor, rng: np.random.Generator) -> tuple[int, int, int, int]:
        d = self
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
        d = self
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


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """int [H, W] label -> [h, w] by nearest neighbour (exact for ids < 2^24)."""
    size = (int(size[0]), int(size[1]))
    if tuple(label.shape) == size:
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)
