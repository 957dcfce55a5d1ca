"""Resize-to-budget: choose each image's patch grid from its aspect ratio and a token budget."""

from __future__ import annotations

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

    # The grid at scale s (patches per pixel) is (ceil(H*s), ceil(W*s)): rounding both sides up
    # keeps each within one patch of the exact aspect ratio (the SigLIP2 / NaFlex rule). It only
    # changes at s = k/H or s = k/W, so try those breakpoints exactly (integer arithmetic) and
    # keep the largest s whose grid fits.
    best, best_scale = (1, 1), (0, 1)
    for along, other in ((height, width), (width, height)):
        for k in range(1, min(max_cells, max_tokens) + 1):
            if not allow_upscale and k * patch_size > along:
                break
            a, b = k, max(1, -(-other * k // along))
            if a * b > max_tokens or b > max_cells:
                break
            if k * best_scale[1] > best_scale[0] * along:
                best, best_scale = ((a, b) if along == height else (b, a)), (k, along)
    return best


def scale_budgets(budgets, side_scales, cap: int) -> list[int]:
    """Token budgets for images whose sides are scaled by ``side_scales`` (budget scale
    jitter: tokens scale with the square), each in [1, cap]."""
    return [min(cap, max(1, round(b * s**2))) for b, s in zip(budgets, side_scales)]


def resize_to_grid(image: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Resize a CHW image to exactly (h * P, w * P) pixels (antialiased bilinear)."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
