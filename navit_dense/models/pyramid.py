"""ViTDet-style simple feature pyramid (Li et al. 2022) over per-image stride-P maps.

Each image is processed on its own grid (no padding between images), so a 1x40 strip and a
40x1 strip in the same batch cost what they would alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a [..., C, H, W] tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-3, -1)).movedim(-1, -3)


def _scale_stage(scale: float, dim: int) -> tuple[nn.Module, int]:
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
    raise ValueError(f"unsupported pyramid scale {scale}; use 4, 2, 1 or 0.5")


class SimpleFeaturePyramid(nn.Module):
    """Maps per-image [C, h, w] (stride ``in_stride``) to {"p2".."p5"}: per-image lists of
    [out_channels, h*s, w*s] for scales s in ``scales`` (default strides 4, 8, 16, 32)."""

    def __init__(self, in_channels: int, out_channels: int = 256, in_stride: int = 16, scales=(4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.strides = tuple(int(in_stride / s) for s in self.scales)
        self.names = tuple(f"p{int(torch.log2(torch.tensor(float(st))).item())}" for st in self.strides)
        self.stages = nn.ModuleList()
        for scale in self.scales:
            up, dim = _scale_stage(scale, in_channels)
            self.stages.append(
                nn.Sequential(
                    up,
                    nn.Conv2d(dim, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )
        self.out_channels = out_channels

    def forward(self, maps: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for m in maps:
            x = m[None]
            for name, stage in zip(self.names, self.stages):
                out[name].append(stage(x)[0])
        return out
