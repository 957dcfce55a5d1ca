"""From packed tokens back to per-image spatial maps."""

from __future__ import annotations

import torch

from ..data.packed_batch import PackedBatch


def unpack_to_maps(tokens: torch.Tensor, batch: PackedBatch, fill: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[S, L, D] packed tokens -> list (input order) of [D, h_i, w_i] maps.

    Grid cells whose token was dropped hold ``fill`` (a learned [D] mask token) or zeros when
    ``fill`` is None. One scatter for the whole batch; differentiable w.r.t. tokens and fill.
    """
    D = tokens.shape[-1]
    areas = (batch.grid_sizes[:, 0] * batch.grid_sizes[:, 1]).tolist()
    starts = torch.tensor([0] + areas[:-1], device=tokens.device).cumsum(0)
    is_patch = batch.token_index >= 0
    dest = starts[batch.segment_ids[is_patch]] + batch.token_index[is_patch]
    total = sum(areas)
    if fill is None:
        canvas = tokens.new_zeros(total, D)
    else:
        canvas = fill.to(tokens.dtype).expand(total, D)
    canvas = canvas.index_copy(0, dest, tokens[is_patch])
    maps = []
    for piece, (h, w) in zip(canvas.split(areas), batch.grid_sizes.tolist()):
        maps.append(piece.view(h, w, D).permute(2, 0, 1))
    return maps


def unpack_prefix(tokens: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[S, L, D] -> [N, num_prefix_tokens, D] prefix (class / register) token outputs."""
    k = batch.num_prefix_tokens
    offsets = torch.arange(k, device=tokens.device)
    seq = batch.seq_index.to(tokens.device)[:, None].expand(-1, k)
    pos = batch.seq_offset.to(tokens.device)[:, None] + offsets
    return tokens[seq, pos]


def maps_to_padded(maps: list[torch.Tensor], size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [C, h_i, w_i] maps -> (zero-padded [N, C, H, W], valid mask bool [N, H, W]),
    top-left aligned, H and W rounded up to ``size_divisibility``."""
    H = max(m.shape[1] for m in maps)
    W = max(m.shape[2] for m in maps)
    d = max(1, size_divisibility)
    H, W = -(-H // d) * d, -(-W // d) * d
    C = maps[0].shape[0]
    out = maps[0].new_zeros(len(maps), C, H, W)
    valid = torch.zeros(len(maps), H, W, dtype=torch.bool, device=maps[0].device)
    for i, m in enumerate(maps):
        out[i, :, : m.shape[1], : m.shape[2]] = m
        valid[i, : m.shape[1], : m.shape[2]] = True
    return out, valid
