"""Attention kernels over packed sequences: a token attends only to tokens of its own image.

Kernels (all take q, k, v as [S, H, L, Dh] and return [S, L, H, Dh], zeros at padding):
- ``segment``: one scaled_dot_product_attention call per image run (views, no mask). Works
  on every device and in training; the CPU default.
- ``flex``: FlexAttention with a document mask (block-sparse); CUDA default when available.
- ``varlen``: flash varlen attention over the unpadded token stream via cu_seqlens (CUDA).
- ``dense``: SDPA with an explicit [S, 1, L, L] block-diagonal mask. Reference for tests only.

``auto`` picks varlen or flex on CUDA (varlen needs fp16/bf16), segment elsewhere.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from ..data.packed_batch import PackedBatch

KERNELS = ("auto", "segment", "flex", "varlen", "dense")


class AttentionContext:
    """Per-forward precomputation shared by all blocks (masks are built lazily, once)."""

    def __init__(self, batch: PackedBatch, kernel: str = "auto", rope: torch.Tensor | None = None, rope_half: bool = False):
        """rope: [S, 1, L, 2 * head_dim] (sin, cos) rotary embedding of every packed token, applied
        to q and k by the blocks (identity at prefix slots and padding); rope_half: its channel
        layout (rotate-half instead of interleaved pairs)."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
        self.batch = batch
        self.kernel = kernel
        self.rope, self.rope_half = rope, rope_half
        self._cache: dict[str, object] = {}

    def resolve(self, dtype: torch.dtype) -> str:
        if self.kernel != "auto":
            return self.kernel
        if self.batch.device.type == "cuda":
            if dtype in (torch.float16, torch.bfloat16) and _varlen_available():
                return "varlen"
            if _flex_available():
                return "flex"
        return "segment"

    def cached(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    # The kernel is chosen from all three dtypes: mixed ones (fp32 q/k, bf16 v) fit neither
    # flash varlen nor Flex's backward, so they count as fp32.
    dtype = q.dtype if q.dtype == k.dtype == v.dtype else torch.float32
    return _KERNEL_FNS[ctx.resolve(dtype)](q, k, v, ctx)


def _segment_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    # Each tensor is unbound into sequences and each sequence split into its runs ONCE, so
    # autograd accumulates one stack / cat per sequence: O(tokens) backward, not a full-size
    # zero-filled gradient per image view (per-image slicing made ~30% of a training step).
    S, H, L, Dh = q.shape
    lay = ctx.batch.layout
    pieces = lay.derived("segment_pieces", lambda: _sequence_pieces(lay))
    out = []
    for (sizes, is_run), qs, ks, vs in zip(pieces, q.unbind(0), k.unbind(0), v.unbind(0)):
        parts = []
        for keep, qp, kp, vp in zip(is_run, qs.split(sizes, 1), ks.split(sizes, 1), vs.split(sizes, 1)):
            parts.append(F.scaled_dot_product_attention(qp, kp, vp) if keep else torch.zeros_like(qp))
        out.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
    return torch.stack(out).transpose(1, 2)


def _sequence_pieces(layout) -> list[tuple[list[int], list[bool]]]:
    """Per sequence: the lengths of its consecutive pieces (image runs and padding gaps) and
    whether each is a run."""
    pieces = []
    for runs in layout.runs_by_sequence:
        sizes, is_run, cursor = [], [], 0
        for start, length in runs:
            if start > cursor:
                sizes.append(start - cursor)
                is_run.append(False)
            sizes.append(length)
            is_run.append(True)
            cursor = start + length
        if cursor < layout.seq_len:
            sizes.append(layout.seq_len - cursor)
            is_run.append(False)
        pieces.append((sizes, is_run))
    return pieces


def dense_block_mask(batch: PackedBatch) -> torch.Tensor:
    """bool [S, 1, L, L]: True where query and key belong to the same image."""
    seg = batch.segment_ids
    return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0))[:, None]


def _dense_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    mask = ctx.cached("dense", lambda: dense_block_mask(ctx.batch))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _zero_padding(out.transpose(1, 2), ctx.batch)


def _zero_padding(out: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return out.masked_fill(batch.padding_mask[:, :, None, None], 0.0)


@functools.lru_cache(maxsize=None)
def _importable(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _flex_available() -> bool:
    return _importable("torch.nn.attention.flex_attention", "flex_attention")


def _varlen_available() -> bool:
    return _importable("torch.nn.attention.varlen", "varlen_attn")


@functools.lru_cache(maxsize=None)
def _compiled_flex(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Inductor's CPU flex template fails to compile with symbolic shapes (torch 2.14), so CPU
    # compiles per shape; on CUDA let torch decide when to go dynamic.
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


FLEX_BLOCK = 128  # FlexAttention's default tile


def document_block_mask(batch: PackedBatch, block_size: int = FLEX_BLOCK):
    """FlexAttention BlockMask of "same image" for a packed batch, built from the host layout:
    per sequence and tile pair, the image runs are intervals, so a tile pair interacts iff the
    run-id ranges of the two tiles overlap, and is full (no mask_mod call) iff both tiles lie
    in one run. No [S, L, L] tensor is ever built (create_block_mask materializes one); kept
    with the batch's layout, so every layer and forward reuses it."""
    import numpy as np
    from torch.nn.attention.flex_attention import BlockMask

    lay, seg = batch.layout, batch.segment_ids

    def build():
        L, nb = lay.seq_len, -(-lay.seq_len // block_size)
        run_id = np.full((lay.num_sequences, nb * block_size), -1, dtype=np.int64)
        for r, (_, s, start, length) in enumerate(lay.runs):
            run_id[s, start : start + length] = r
        tiles = run_id.reshape(lay.num_sequences, nb, block_size)
        valid = tiles >= 0
        lo = np.where(valid, tiles, np.iinfo(np.int64).max).min(-1)  # [S, nb]; empty tile: max
        hi = tiles.max(-1)  # empty tile: -1
        touch = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # [S, q tile, kv tile]
        single = valid.all(-1) & (lo == hi)
        full = touch & single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
        partial = touch & ~full

        def indices(m):  # per q tile: the count and the (ascending) kv tiles, padded
            count = m.sum(-1)
            order = np.argsort(~m, axis=-1, kind="stable")
            return torch.from_numpy(count[:, None].astype(np.int32)), torch.from_numpy(order[:, None].astype(np.int32))

        (kv_num, kv_idx), (full_num, full_idx) = indices(partial), indices(full)
        device = seg.device

        def same_image(b, h, q_idx, kv_idx):
            return (seg[b, q_idx] == seg[b, kv_idx]) & (seg[b, q_idx] >= 0)

        return BlockMask.from_kv_blocks(kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
                                        BLOCK_SIZE=block_size, mask_mod=same_image, seq_lengths=(L, L))  # fmt: skip

    return lay.derived(("flex_block_mask", block_size, str(seg.device)), build)


def _flex_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    out = _compiled_flex(q.device.type)(q, k, v, block_mask=document_block_mask(ctx.batch))
    return _zero_padding(out.transpose(1, 2), ctx.batch)


def _varlen_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    batch = ctx.batch
    S, H, L, Dh = q.shape
    valid = batch.valid_slots
    cu = ctx.cached("cu_seqlens", lambda: batch.cu_seqlens.to(device=q.device, dtype=torch.int32))
    max_len = batch.layout.max_run_length

    def tokens(x):  # [S, H, L, Dh] -> [T, H, Dh]
        return x.transpose(1, 2).reshape(S * L, H, Dh).index_select(0, valid)

    out = varlen_attn(tokens(q), tokens(k), tokens(v), cu, cu, max_len, max_len)
    full = q.new_zeros(S * L, H, Dh).index_copy(0, valid, out)
    return full.view(S, L, H, Dh)


_KERNEL_FNS = {"segment": _segment_attention, "dense": _dense_attention, "flex": _flex_attention, "varlen": _varlen_attention}
