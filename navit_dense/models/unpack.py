"""From packed tokens back to per-image spatial maps."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.packed_batch import PackedBatch


def unpack_to_maps(tokens: torch.Tensor, batch: PackedBatch, fill: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[S, L, D] packed tokens -> list (input order) of [D, h_i, w_i] maps.

    Grid cells whose token was dropped hold ``fill`` (a learned [D] mask token) or zeros when
    ``fill`` is None. One gather and one scatter for the whole batch, sizes from the host
    layout (no device sync); differentiable w.r.t. tokens and fill.
    """
    D, lay = tokens.shape[-1], batch.layout
    total = lay.cell_offsets[-1]
    if fill is None:
        canvas = tokens.new_zeros(total, D)
    else:
        canvas = fill.to(tokens.dtype).expand(total, D)
    canvas = canvas.index_copy(0, batch.patch_cells, batch.flat(tokens).index_select(0, batch.patch_slots))
    return [piece.view(h, w, D).permute(2, 0, 1) for piece, (h, w) in zip(canvas.split(lay.areas), lay.grids)]


def unpack_prefix(tokens: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[S, L, D] -> [N, num_prefix_tokens, D] prefix (class / register) token outputs."""
    return batch.flat(tokens)[batch.prefix_slots]


def maps_to_canvas(maps: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Per-image [C, h_i, w_i] maps -> zero [N, C, height, width] with each map top-left
    (the layout detectron2 / mmseg heads expect of a padded batch)."""
    too_big = [i for i, m in enumerate(maps) if m.shape[-2] > height or m.shape[-1] > width]
    if too_big:
        i = too_big[0]
        raise ValueError(f"map {i} ({maps[i].shape[-2]}x{maps[i].shape[-1]}) does not fit the {height}x{width} canvas")
    out = maps[0].new_zeros(len(maps), maps[0].shape[0], height, width)
    for i, m in enumerate(maps):
        out[i, :, : m.shape[-2], : m.shape[-1]] = m
    return out


def maps_to_padded(maps: list[torch.Tensor], size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [C, h_i, w_i] maps -> (zero-padded [N, C, H, W], valid mask bool [N, H, W]),
    top-left aligned, H and W rounded up to ``size_divisibility``."""
    d = max(1, size_divisibility)
    H = -(-max(m.shape[1] for m in maps) // d) * d
    W = -(-max(m.shape[2] for m in maps) // d) * d
    ones = [m.new_ones(1, *m.shape[1:], dtype=torch.bool) for m in maps]
    return maps_to_canvas(maps, H, W), maps_to_canvas(ones, H, W)[:, 0]
