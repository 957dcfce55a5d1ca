"""Segmentation loss on per-image logit grids (Segmenter heads): each image's logits are
upsampled to its own label's size, so no batch-wide padding ever enters the loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.heads.segmenter import upsample


def seg_loss_sum(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], ignore_index: int = 255) -> torch.Tensor:
    """Sum over images of the pixel cross-entropy of image i's logits, upsampled to its label's
    size, against its label; ``ignore_index`` pixels count nothing. Divide by the global number
    of valid pixels to get the mean (see the segmentation task)."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    for lg, y in zip(logits, labels):
        up = upsample(lg.float(), y.shape)  # float32 before interpolating: bf16 logits under autocast
        total = total + F.cross_entropy(up[None], y[None].long(), ignore_index=ignore_index, reduction="sum")
    return total
