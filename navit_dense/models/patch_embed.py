"""Patch embeddings that see each patch as its own tiny image, so packing stays exact.

The ViT embedding is one linear map of the flattened patch. :class:`PatchConvStem` puts a few
stride-2 3x3 convolutions in front of it, inside every patch (Xiao et al. 2021, "Early
convolutions help transformers see better": a conv stem speeds up and stabilizes ViT
training). Nothing crosses a patch border, so tokens of different images, dropped tokens and
padding never mix, as with the linear embedding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, LayerNorm2d


class PatchConvStem(nn.Module):
    """[..., C * P * P] patches in (c, py, px) order -> [..., dim].

    channels: widths of the stride-2 3x3 conv layers (LayerNorm2d + GELU after each); after
    them each patch is a (P / 2^n)^2 map that one linear layer flattens into the token."""

    def __init__(self, in_chans: int, patch_size: int, channels: Sequence[int], dim: int):
        super().__init__()
        side = patch_size >> len(channels)
        if not channels or side << len(channels) != patch_size:
            raise ValueError(f"conv_stem {tuple(channels)}: patch_size {patch_size} must be divisible by 2^{len(channels)} (one halving per conv)")
        self.in_chans, self.patch_size = in_chans, patch_size
        widths = [in_chans, *channels]
        self.convs = nn.Sequential(*[ConvNormAct(a, b, 3, stride=2, padding=1, norm_layer=LayerNorm2d, act_layer=nn.GELU)
                                     for a, b in zip(widths[:-1], widths[1:])])  # fmt: skip
        self.proj = nn.Linear(channels[-1] * side * side, dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        lead = patches.shape[:-1]
        x = self.convs(patches.reshape(-1, self.in_chans, self.patch_size, self.patch_size))
        return self.proj(x.flatten(1)).view(*lead, -1)
