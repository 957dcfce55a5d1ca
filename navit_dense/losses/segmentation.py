"""Segmentation loss on per-image logit grids (Segmenter heads): each image's logits are
upsampled to its own label's size, so no batch-wide padding ever enters the loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..models.heads.segmenter import upsample


def _image_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    up = upsample(logits.float(), label.shape)  # float32 before interpolating: bf16 logits under autocast
    return F.cross_entropy(up[None], label[None].long(), ignore_index=ignore_index, reduction="sum")


def seg_loss_sum(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], ignore_index: int = 255) -> torch.Tensor:
    """Sum over images of the pixel cross-entropy of image i's logits, upsampled to its label's
    size, against its label; ``ignore_index`` pixels count nothing. Divide by the global number
    of valid pixels to get the mean (see the segmentation task).

    Memory is bounded per image: with gradients, each image's upsampling and cross-entropy are
    recomputed in the backward pass (activation checkpointing), so only one image's
    full-resolution [K, H, W] logits exist at a time (150 classes at 512 x 512 are 157 MB each)
    instead of every image's for the whole step."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    for lg, y in zip(logits, labels):
        if lg.requires_grad and torch.is_grad_enabled():
            total = total + checkpoint(_image_loss, lg, y, ignore_index, use_reentrant=False)
        else:
            total = total + _image_loss(lg, y, ignore_index)
    return total
