"""Segmenter decoders (Strudel et al. 2021, arXiv 2105.05633) on NaViT's per-image token
grids, and the logits -> pixels step (upsampling, class ids). The loss is in
navit_dense.losses.segmentation, sliding-window inference in navit_dense.models.sliding_window.

Every image keeps its own patch grid (h_i, w_i) end to end: a decoder returns one logit map
[K, h_i, w_i] per packed image, and logits are upsampled (bilinear, align_corners=False) from
that map to a size covering the same image extent. No batch-wide padding is ever created, so
no padded pixel can enter a loss or leak into a neighbour's upsampling.

- :class:`LinearDecoder`: (optional LayerNorm +) Linear on each token (Segmenter "linear").
- :class:`MaskTransformerDecoder`: Segmenter's mask transformer. K learned class embeddings
  join each image's patch tokens; the decoder blocks run on a packed layout of its own (class
  slots as the "prefix" of every image run), so attention stays within one image with the
  same kernels as the backbone (segment / flex / varlen); masks are normalized patch features
  dot normalized class features, then LayerNorm over the classes (mask_norm), as in the paper
  and mmseg's SegmenterMaskTransformerHead.

Sizes: the loss upsamples logits to the size the image was PACKED at (``batch.resized_sizes``,
h_i * P x w_i * P) with the label resized to that size by nearest neighbour (as mmseg's
training pipeline resizes labels to the training scale). Evaluation upsamples to the image's
ORIGINAL size and compares with the untouched label (mmseg's protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ...data.packed_batch import PackedBatch
from ...data.packing import grid_layout
from ..attention import AttentionContext
from ..navit import Block, NaViTConfig, NaViTOutput
from ..unpack import unpack_prefix, unpack_to_maps

DECODERS = ("linear", "mask_transformer")


def _flatten_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image [D, h, w] maps -> [sum h*w, D] row-major tokens, images concatenated."""
    return torch.cat([rearrange(m, "d h w -> (h w) d") for m in maps])


def _split_maps(tokens: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`_flatten_maps`: [sum h*w, K] -> per-image [K, h, w]."""
    pieces = tokens.split([h * w for h, w in grids])
    return [rearrange(p, "(h w) k -> k h w", h=h, w=w) for p, (h, w) in zip(pieces, grids)]


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one Linear per token -> [K, h_i, w_i] per image. ``norm``
    adds a LayerNorm first (useful on un-normed intermediate features; the backbone's final
    features are already normed)."""

    def __init__(self, in_dim: int, num_classes: int, norm: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(in_dim) if norm else nn.Identity()
        self.head = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: NaViTOutput) -> list[torch.Tensor]:
        maps = features.feature_maps
        # All images' tokens in one matmul; the split restores each image's own grid.
        logits = self.head(self.norm(_flatten_maps(maps)))
        return _split_maps(logits, [tuple(m.shape[1:]) for m in maps])


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (mmseg SegmenterMaskTransformerHead semantics: pre-LN
    blocks, LayerNorm eps 1e-5, bias-free patch / class projections, L2-normalized features,
    mask_norm over the classes), with attention restricted to each image's own tokens."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 192,
        depth: int = 2,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        attn_kernel: str = "auto",
    ):
        super().__init__()
        self.num_classes, self.attn_kernel = num_classes, attn_kernel
        self.proj_dec = nn.Linear(in_dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(num_classes, dim))
        # The backbone's Block (pre-LN, per-image stochastic depth) so packed attention applies.
        cfg = NaViTConfig(embed_dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=1e-5)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.patch_proj = nn.Linear(dim, dim, bias=False)
        self.classes_proj = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes, eps=1e-5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, features: NaViTOutput) -> list[torch.Tensor]:
        maps, K = features.feature_maps, self.num_classes
        # Its own packed layout (K class slots + every grid cell per image), built once per batch.
        layout = grid_layout(features.batch, K)
        tokens = self.proj_dec(_flatten_maps(maps))  # [sum h*w, dim], image-major row-major: the layout's patch order
        N = layout.num_images
        x = tokens.new_zeros(layout.num_sequences * layout.seq_len, tokens.shape[-1])
        x = x.index_copy(0, layout.patch_slots, tokens)
        x = x.index_copy(0, layout.prefix_slots.reshape(-1), self.cls_emb.to(x.dtype).repeat(N, 1))
        x = x.view(layout.num_sequences, layout.seq_len, -1)
        ctx = AttentionContext(layout, self.attn_kernel)
        for block in self.blocks:
            x = block(x, ctx)
        x = self.decoder_norm(x)
        patches = unpack_to_maps(x, layout)  # per image [dim, h, w]
        classes = F.normalize(self.classes_proj(unpack_prefix(x, layout)), dim=-1)  # [N, K, dim]
        out = []
        for p, c in zip(patches, classes):  # one small matmul per image: no [T, K, dim] gather
            h, w = p.shape[1:]
            p = F.normalize(self.patch_proj(rearrange(p, "d h w -> (h w) d")), dim=-1)
            masks = self.mask_norm(p @ c.t())  # [h*w, K]
            out.append(rearrange(masks, "(h w) k -> k h w", h=h, w=w))
        return out


@dataclass
class SegOutput:
    logits: list[torch.Tensor]  # per packed image (or window), input order: [K, h_i, w_i] on its patch grid
    batch: PackedBatch


class Segmenter(nn.Module):
    """NaViT backbone + Segmenter decoder: ``model(packed_batch) -> SegOutput``."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, batch: PackedBatch) -> SegOutput:
        return SegOutput(self.decoder(self.backbone(batch)), batch)


def build_decoder(kind: str, in_dim: int, num_classes: int, **options) -> nn.Module:
    if kind == "linear":
        return LinearDecoder(in_dim, num_classes, **options)
    if kind == "mask_transformer":
        return MaskTransformerDecoder(in_dim, num_classes, **options)
    raise ValueError(f"unknown decoder {kind!r}; choose one of {DECODERS}")


# ---- logits -> pixels ------------------------------------------------------------------------
def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[K, h, w] logits covering an image's extent -> [K, H, W] (bilinear, align_corners=False)."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """[K, H, W] logits -> [H, W] int64 class ids, exactly ``logits.argmax(0)`` (the first
    maximum wins a tie, NaN counts as the maximum). ``max(0).indices`` computes the same ids,
    but on CPU argmax over a leading dim is the slowest stage of inference at low resolution
    (4-15x slower than max for K <= 20 at 500 x 700; 1.5x for K = 150)."""
    if logits.dim() != 3:
        raise ValueError(f"class_map expects [K, H, W] logits, got shape {tuple(logits.shape)}")
    return logits.max(0).indices


