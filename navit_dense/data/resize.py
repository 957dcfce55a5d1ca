"""Resize-to-budget: choose each image's patch grid from its aspect ratio and a token budget."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def budget_grid(
    height: int,
    width: int,
    patch_size: int,
    max_tokens: int,
    max_side: int | None = None,
    allow_upscale: bool = True,
) -> tuple[int, int]:
    """Largest patch grid (h, w) with h * w <= max_tokens, aspect ratio kept as closely as
    whole patches allow, and max(h, w) * patch_size <= max_side when given.

    Each side is within one patch of the exact aspect ratio. Extreme aspect ratios keep at
    least one patch along the short side, so a 20000x50 strip becomes a 1 x max_tokens grid.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_side is not None and max_side < patch_size:
        raise ValueError(f"max_side={max_side} is smaller than one patch ({patch_size})")
    max_cells = max_side // patch_size if max_side is not None else max_tokens

    def grid(scale: float) -> tuple[int, int]:
        # Rounding both sides up keeps each within one patch of the exact aspect ratio.
        return max(1, math.ceil(height * scale - 1e-6)), max(1, math.ceil(width * scale - 1e-6))

    def fits(scale: float) -> bool:
        h, w = grid(scale)
        return h * w <= max_tokens and max(h, w) <= max_cells

    # Binary search the largest scale (patches per pixel) whose grid fits (SigLIP2 / NaFlex rule).
    lo, hi = 0.0, math.sqrt(max_tokens / (height * width)) * 2 + 1.0
    if not allow_upscale:
        hi = min(hi, 1.0 / patch_size)
        if fits(hi):
            lo = hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    h, w = grid(lo)
    if h * w > max_tokens or max(h, w) > max_cells:  # only when a side is pinned at one patch
        h, w = min(h, max_cells, max_tokens), min(w, max_cells, max_tokens)
        while h * w > max_tokens:
            h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h, w


def resize_to_grid(image: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Resize a CHW image to exactly (h * P, w * P) pixels (antialiased bilinear)."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
