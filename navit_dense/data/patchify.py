"""Cutting images into flattened patches and back."""

from __future__ import annotations

import torch
from einops import rearrange


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, h*P, w*P] -> [h*w, C*P*P], row-major patches, (c, py, px) inside a patch so a
    Conv2d(kernel=stride=P) weight reshaped to [D, C*P*P] is the matching linear map."""
    return rearrange(image, "c (h p1) (w p2) -> (h w) (c p1 p2)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    h, w = grid
    return rearrange(patches, "(h w) (c p1 p2) -> c (h p1) (w p2)", h=h, w=w, p1=patch_size, p2=patch_size)
