"""Sliding-window segmentation inference at the image's native pixels (mmseg's "slide" mode),
packed: the windows of every image go through ONE packed forward pass.

Windows of ``window`` pixels per side every ``stride`` pixels, the last one flush with the
border (mmseg's grid); each window is packed exactly as a whole image would be, its logits
are upsampled to the window's pixel size, and overlapping logits are averaged. An image no
bigger than one window gets a single window: the whole image, packed as in whole inference,
hence identical results.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..data.packed_batch import PackedBatch
from .heads.segmenter import upsample

def slide_windows(height: int, width: int, window: int | tuple[int, int], stride: int | tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) windows, mmseg's grid: starts every ``stride`` pixels, the last window
    moved back to end at the border, windows clipped to the image (one window per axis where
    the image is smaller than the window)."""
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(wh, ww, sh, sw) < 1:
        raise ValueError(f"window {window} and stride {stride} must be positive")
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh + wh, height), min(c * sw + ww, width)
            boxes.append((max(y1 - wh, 0), max(x1 - ww, 0), y1, x1))
    return boxes


def merge_windows(logits: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]], size: Sequence[int]) -> torch.Tensor:
    """Average window logits ([K, h, w] each, covering its box) into one [K, H, W] map."""
    K = logits[0].shape[0]
    total = logits[0].new_zeros(K, int(size[0]), int(size[1]), dtype=torch.float32)
    count = total.new_zeros(1, int(size[0]), int(size[1]))
    for lg, (y0, x0, y1, x1) in zip(logits, boxes):
        total[:, y0:y1, x0:x1] += upsample(lg.float(), (y1 - y0, x1 - x0))
        count[:, y0:y1, x0:x1] += 1
    if bool((count == 0).any()):
        raise ValueError("the windows do not cover the image")
    return total / count


def crop_windows(image: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    return [image[..., y0:y1, x0:x1] for y0, x0, y1, x1 in boxes]


@torch.no_grad()
def segment_images(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    pack: Callable[[list[torch.Tensor]], PackedBatch],
    mode: str = "whole",
    window: int | None = None,
    stride: int | None = None,
) -> list[torch.Tensor]:
    """Per image [K, H, W] logits at the image's own size, from ONE packed forward pass.

    pack: images -> PackedBatch (e.g. ``functools.partial(pack_images, patch_size=16,
    max_tokens_per_image=1024, seq_len=2048)``); in slide mode it receives the windows of
    every image. mode "whole": each image packed whole at its budget; "slide": windows of
    ``window`` pixels every ``stride`` pixels (see the module docstring)."""
    if mode == "whole":
        out = model(pack(list(images)))
        return [upsample(lg.float(), im.shape[-2:]) for lg, im in zip(out.logits, images)]
    if mode != "slide":
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if window is None or stride is None:
        raise ValueError("slide mode needs window and stride (pixels)")
    boxes = [slide_windows(im.shape[-2], im.shape[-1], window, stride) for im in images]
    out = model(pack([crop for im, b in zip(images, boxes) for crop in crop_windows(im, b)]))
    logits = iter(out.logits)
    return [merge_windows([next(logits) for _ in b], b, im.shape[-2:]) for im, b in zip(images, boxes)]
