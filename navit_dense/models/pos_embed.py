"""Positional embeddings for packed tokens of variable-size images.

Every module maps a PackedBatch to [S, L, D] embeddings for the patch tokens (zeros at prefix
slots and padding). None of them has a maximum grid: larger grids are handled by scaling
coordinates into the learned table (factorized) or resizing the table (learned 2D).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import create_rope_embed, resample_abs_pos_embed
from timm.layers.pos_embed_sincos import RotaryEmbeddingMixed

from ..data.packed_batch import PackedBatch

POS_EMBED_TYPES = ("factorized", "fractional", "sincos2d", "learned2d", "none")


def _lerp_lookup(table: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
    """Linear interpolation in a [G, D] table at continuous coordinates (clamped to [0, G-1])."""
    coord = coord.clamp(0, table.shape[0] - 1)
    lo = coord.floor().long()
    hi = (lo + 1).clamp(max=table.shape[0] - 1)
    t = (coord - lo.to(coord.dtype)).unsqueeze(-1).to(table.dtype)
    return table[lo] * (1 - t) + table[hi] * t


def gather_grid_tables(batch: PackedBatch, table_for, per_image: bool = False) -> torch.Tensor:
    """[S, L, C]: for every patch token, row ``row * w + col`` of its image's [h * w, C] table
    ``table_for(h, w)`` (built once per distinct grid, known on the host from the layout, or
    once per image with ``per_image``), in one gather. Prefix slots and padding get some
    table's row 0: callers mask them."""
    lay = batch.layout
    groups = {(i,): g for i, g in enumerate(lay.grids)} if per_image else {imgs: g for g, imgs in lay.grid_groups.items()}
    tables, starts, offset = [], [0] * lay.num_images, 0
    for images, (h, w) in groups.items():
        tables.append(table_for(h, w))
        for i in images:
            starts[i] = offset
        offset += h * w
    start = torch.tensor(starts, dtype=torch.long, device=batch.device)
    return torch.cat(tables).to(batch.device)[start[batch.segment_ids.clamp(min=0)] + batch.token_index.clamp(min=0)]


class FactorizedPosEmbed(nn.Module):
    """Separate learned row and column tables, summed (the paper's best variant).

    ``fractional=False``: a token at integer (row, col) reads entry row / col exactly. For an
    image whose grid side exceeds the table, its coordinates are rescaled onto the table
    (patch centres, linear interpolation), i.e. it falls back to fractional lookup.
    ``fractional=True``: always look up (row + .5) / h * G - .5, so a position is defined
    relative to the image extent and every aspect ratio spans the whole table.
    """

    def __init__(self, dim: int, max_grid: int, fractional: bool = False):
        super().__init__()
        self.max_grid = max_grid
        self.fractional = fractional
        self.row = nn.Parameter(torch.zeros(max_grid, dim))
        self.col = nn.Parameter(torch.zeros(max_grid, dim))
        nn.init.trunc_normal_(self.row, std=0.02)
        nn.init.trunc_normal_(self.col, std=0.02)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        G = self.max_grid
        frac_coord = batch.frac_positions * G - 0.5  # [S, L, 2]
        if self.fractional:
            coord = frac_coord
        else:
            grid = batch.grid_sizes[batch.segment_ids.clamp(min=0)]  # [S, L, 2]
            coord = torch.where(grid > G, frac_coord, batch.positions.to(frac_coord.dtype))
        emb = _lerp_lookup(self.row, coord[..., 0]) + _lerp_lookup(self.col, coord[..., 1])
        return emb * (batch.token_index >= 0).unsqueeze(-1).to(emb.dtype)


class SinCos2dPosEmbed(nn.Module):
    """Fixed 2D sine-cosine embedding of integer (row, col) (MoCo v3 / MAE layout)."""

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"sincos2d needs dim divisible by 4, got {dim}")
        omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
        self.register_buffer("omega", omega, persistent=False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        pos = batch.positions.to(torch.float32)
        angles_y = pos[..., 0:1] * self.omega
        angles_x = pos[..., 1:2] * self.omega
        emb = torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=-1)
        return emb * (batch.token_index >= 0).unsqueeze(-1).to(emb.dtype)


class Learned2dPosEmbed(nn.Module):
    """A learned [Gh, Gw, D] grid (ViT / SigLIP layout) resized to each image's grid.

    Resizing is done once per distinct grid size in the batch, then one gather serves all
    tokens. ``mode``/``antialias`` follow the source of imported weights: timm uses bicubic
    with antialias, HF SigLIP2 (NaFlex) bilinear with antialias.
    """

    def __init__(self, dim: int, grid: tuple[int, int], mode: str = "bicubic", antialias: bool = True):
        super().__init__()
        self.grid = tuple(grid)
        self.mode = mode
        self.antialias = antialias
        self.weight = nn.Parameter(torch.zeros(grid[0], grid[1], dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def resized(self, h: int, w: int) -> torch.Tensor:
        """[h * w, D] table for one grid size (timm's resample_abs_pos_embed: float32, back to the weight's dtype)."""
        table = resample_abs_pos_embed(self.weight.reshape(1, -1, self.weight.shape[-1]), [h, w], list(self.grid),
                                       num_prefix_tokens=0, interpolation=self.mode, antialias=self.antialias)  # fmt: skip
        return table[0]

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        emb = gather_grid_tables(batch, self.resized)
        return emb * (batch.token_index >= 0).unsqueeze(-1).to(emb.dtype)


def build_pos_embed(kind: str, dim: int, max_grid: int, **kwargs) -> nn.Module | None:
    if kind == "factorized":
        return FactorizedPosEmbed(dim, max_grid, fractional=False)
    if kind == "fractional":
        return FactorizedPosEmbed(dim, max_grid, fractional=True)
    if kind == "sincos2d":
        return SinCos2dPosEmbed(dim)
    if kind == "learned2d":
        grid = kwargs.get("grid") or (max_grid, max_grid)
        return Learned2dPosEmbed(dim, grid, mode=kwargs.get("mode", "bicubic"), antialias=kwargs.get("antialias", True))
    if kind == "none":
        return None
    raise ValueError(f"unknown pos_embed {kind!r}; choose one of {POS_EMBED_TYPES}")


# ---- rotary position embeddings (2D RoPE) --------------------------------------------------------
ROPE_TYPES = ("none", "cat", "dinov3", "mixed")


def build_rope(kind: str, dim: int, num_heads: int, *, depth: int = 0, temperature: float = 10000.0, rotate_half: bool = False,
               grid_offset: float = 0.0, grid_indexing: str = "ij", ref_grid: int = 0, shift_coords: float | None = None,
               jitter_coords: float | None = None, rescale_coords: float | None = None) -> nn.Module | None:  # fmt: skip
    """timm's rotary embedding module (``timm.layers.create_rope_embed``) with the arguments
    timm's Eva passes for a dynamic image size: "cat" is axial RoPE (EVA02, Perception
    Encoder, RoPE-ViT axial; ``ref_grid`` rescales coordinates to a reference grid), "dinov3"
    uses coordinates normalized per image with DINOv3's train-time shift / jitter / rescale,
    "mixed" is RoPE-ViT's RoPE-Mixed (timm ``RotaryEmbeddingMixed``): learned x / y frequencies
    per block (``depth``) and head, a parameter ``freqs`` [2, depth, heads, head_dim / 2]
    initialised at ``temperature`` (RoPE-ViT uses 10), integer grid coordinates, interleaved
    channels; see :func:`mixed_rope_coords` / :func:`mixed_rope_embed`."""
    if kind == "none":
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope {kind!r}; choose one of {ROPE_TYPES}")
    options = dict(feat_shape=None, temperature=temperature, grid_indexing=grid_indexing, rotate_half=rotate_half,
                   shift_coords=shift_coords, jitter_coords=jitter_coords, rescale_coords=rescale_coords, grid_offset=grid_offset)  # fmt: skip
    if kind == "mixed":
        # timm's Mixed RoPE has neither a grid offset nor a reference grid, and only interleaved channels.
        unsupported = [name for name, value in (("rope_rotate_half", rotate_half), ("rope_grid_offset", grid_offset), ("rope_ref_grid", ref_grid)) if value]
        if unsupported:
            raise ValueError(f"rope='mixed' (learned per-block frequencies) does not support {unsupported}: leave them at false / 0")
        if depth < 1:
            raise ValueError("rope='mixed' needs the model depth (one set of learned frequencies per block)")
        if (dim // num_heads) % 4:
            raise ValueError(f"rope='mixed' needs a head dim divisible by 4, got {dim // num_heads}")
        del options["rotate_half"], options["grid_offset"]
        return create_rope_embed(rope_type="mixed", dim=dim, num_heads=num_heads, depth=depth, **options)
    if kind == "cat":
        options.update(in_pixels=False, ref_feat_shape=(ref_grid, ref_grid) if ref_grid else None)
    return create_rope_embed(rope_type=kind, dim=dim, num_heads=num_heads, **options)


def is_mixed_rope(rope: nn.Module | None) -> bool:
    """Whether ``rope`` has learned per-block frequencies (evaluated per block, see mixed_rope_embed)."""
    return isinstance(rope, RotaryEmbeddingMixed)


def packed_rope(rope: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """float [S, 1, L, 2 * head_dim] concatenated (sin, cos) per packed token: each patch token
    gets its own image grid's embedding at its own (row, col), so dropped tokens leave the kept
    ones' coordinates unchanged; prefix slots and padding get the identity rotation (sin 0,
    cos 1). One table per distinct grid, or per image while coordinate augmentation is active
    (one draw per image, as timm's batched DINOv3 embeddings). Not for mixed RoPE, whose
    rotation differs per block (mixed_rope_coords / mixed_rope_embed)."""
    augment = rope.training and getattr(rope, "aug_active", False)
    emb = gather_grid_tables(batch, lambda h, w: rope.get_embed((h, w)).float().reshape(h * w, -1), per_image=augment)  # [S, L, 2 * Dh]
    identity = torch.cat([torch.zeros_like(emb[..., : emb.shape[-1] // 2]), torch.ones_like(emb[..., emb.shape[-1] // 2 :])], -1)
    return torch.where((batch.token_index >= 0)[..., None], emb, identity)[:, None]


def mixed_rope_coords(rope: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """float32 [S, L, 2]: timm's (t_x, t_y) of every packed token for mixed RoPE, computed once
    per forward: the token's own integer (row, col) in its image grid ((col, row) with
    grid_indexing "xy", as timm's get_mixed_grid), 0 at prefix slots and padding (angle 0: no
    rotation). While training with coordinate augmentation, one shift / jitter / rescale is drawn
    per image (timm's order and ranges, in patch-index units)."""
    pos = batch.positions.to(torch.float32)
    coords = pos if rope.grid_indexing == "ij" else pos.flip(-1)
    if rope.training and rope.aug_active:
        n, device = batch.num_images, batch.device
        image = batch.segment_ids.clamp(min=0)
        if rope.shift_coords is not None:
            s = float(rope.shift_coords)
            coords = coords + torch.empty(n, 2, device=device).uniform_(-s, s)[image]
        if rope.jitter_coords is not None:
            j = math.log(float(rope.jitter_coords))
            coords = coords * torch.empty(n, 2, device=device).uniform_(-j, j).exp()[image]
        if rope.rescale_coords is not None:
            r = math.log(float(rope.rescale_coords))
            coords = coords * torch.empty(n, 1, device=device).uniform_(-r, r).exp()[image]
    return coords * (batch.token_index >= 0)[..., None].to(coords.dtype)


def mixed_rope_embed(rope: nn.Module, coords: torch.Tensor, block: int) -> torch.Tensor:
    """float32 [S, heads, L, 2 * head_dim] (sin, cos) of block ``block`` for mixed RoPE from
    ``coords`` (mixed_rope_coords): angle = t_x * freqs[0, block] + t_y * freqs[1, block] per
    head, each value repeated for its channel pair (interleaved layout), as timm's
    get_mixed_freqs. Built from the parameter inside the forward, so ``freqs`` trains."""
    f = rope.freqs[:, block].float()[:, None, :, None, :]  # [2, 1, H, 1, Dh / 2]
    t = coords[:, None, :, :, None]  # [S, 1, L, 2, 1]
    angle = t[..., 0, :] * f[0] + t[..., 1, :] * f[1]  # [S, H, L, Dh / 2]
    return torch.cat([angle.sin().repeat_interleave(2, -1), angle.cos().repeat_interleave(2, -1)], -1)
