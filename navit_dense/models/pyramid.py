"""ViTDet-style simple feature pyramid (Li et al. 2022) over per-image stride-P maps.

Each image is processed on its own grid (no padding between images), so a 1x40 strip and a
40x1 strip in the same batch cost what they would alone. One pyramid serves every consumer:
the detectron2 plug-in (ViTDet: every level from the last block, projected to
``out_channels`` by 1x1 + 3x3 convs with LayerNorm) and the mmsegmentation plug-in (one block
per level, ``out_channels=None``: the resampling stages alone, channels D/4, D/2, D, D).
``output_shape()`` is the typed contract of what comes out, as detectron2's ShapeSpec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LevelSpec:
    """One pyramid level: its channels and its stride in input pixels."""

    channels: int
    stride: int


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a [..., C, H, W] tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-3, -1)).movedim(-1, -3)


SCALES = (4.0, 2.0, 1.0, 0.5)


def scale_stage(scale: float, dim: int) -> tuple[nn.Module, int]:
    """ViTDet's resampling of a stride-P map by ``scale`` (4x: ConvT, LN, GELU, ConvT; 2x: ConvT;
    1x: identity; 0.5x: 2x2 max-pool) and the channels it outputs."""
    if scale == 4.0:
        half, quarter = dim // 2, dim // 4
        return nn.Sequential(
            nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(), nn.ConvTranspose2d(half, quarter, 2, stride=2)
        ), quarter
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2, ceil_mode=True), dim  # ceil: a 1-cell side stays 1 cell
    raise ValueError(f"unsupported pyramid scale {scale}; use {', '.join(map(str, SCALES))}")


class SimpleFeaturePyramid(nn.Module):
    """Maps per-image [C, h, w] (stride ``in_stride``) to {"p2".."p5"}: per-image lists of
    [channels, h*s, w*s] for scales s in ``scales`` (default strides 4, 8, 16, 32).

    out_channels: each level projected to this many channels (1x1 conv, LN, 3x3 conv, LN);
        None keeps the resampling stage's channels (D/4 at 4x, D/2 at 2x, D otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int | None = 256, in_stride: int = 16, scales: Sequence[float] = SCALES):
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        if any(in_stride / s != int(in_stride / s) for s in self.scales):
            raise ValueError(f"stride {in_stride} / scale must be a whole number of pixels for every scale in {self.scales}")
        self.strides = tuple(int(in_stride / s) for s in self.scales)
        self.names = tuple(f"p{int(math.log2(st))}" if st & (st - 1) == 0 else f"s{st}" for st in self.strides)
        self.stages = nn.ModuleList()
        channels = []
        for scale in self.scales:
            up, dim = scale_stage(scale, in_channels)
            if out_channels is None:
                self.stages.append(up)
                channels.append(dim)
                continue
            self.stages.append(
                nn.Sequential(
                    up,
                    nn.Conv2d(dim, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )
            channels.append(out_channels)
        self.channels = tuple(channels)
        self.out_channels = out_channels

    def output_shape(self) -> dict[str, LevelSpec]:
        return {name: LevelSpec(c, s) for name, c, s in zip(self.names, self.channels, self.strides)}

    def forward(self, maps: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """maps: per-image [C, h_i, w_i] maps feeding every level, or one such list per level
        (e.g. a different backbone block for each)."""
        per_level = [maps] * len(self.stages) if torch.is_tensor(maps[0]) else list(maps)
        if len(per_level) != len(self.stages):
            raise ValueError(f"{len(per_level)} input lists for {len(self.stages)} pyramid levels")
        return {name: [stage(m[None])[0] for m in level] for name, stage, level in zip(self.names, self.stages, per_level)}
