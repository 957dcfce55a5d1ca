"""Attention kernels over packed sequences: a token attends only to tokens of its own image.

Kernels (all take q, k, v as [S, H, L, Dh] and return [S, L, H, Dh], zeros at padding):
- ``segment``: one scaled_dot_product_attention call per image run, or per block of adjacent
  runs of one length (views, no mask, no copies but one cat of the outputs). Works on every
  device and in training; the CPU default.
- ``flex``: FlexAttention with a document mask (block-sparse); CUDA default when available.
- ``varlen``: flash varlen attention over the unpadded token stream via cu_seqlens (CUDA).
- ``dense``: SDPA with an explicit [S, 1, L, L] block-diagonal mask. Reference for tests only.

``auto`` picks varlen or flex on CUDA (varlen needs fp16/bf16), segment elsewhere.

Windowed attention (ViTDet, ``packed_attention(..., window_size=ws)``): each image's own grid
is cut into ws x ws windows (the last row / column of windows is smaller: padding inside a
window is masked, never attended, unlike ViTDet's zero tokens, and never crosses images). A
window holds the image's KEPT tokens in it (token dropping leaves windows with fewer tokens;
empty ones vanish). Patch tokens attend to their window and to their image's prefix tokens;
prefix tokens (class / registers) attend to their whole image, as in a global block. So a
window covering the whole grid is global attention, and packed equals one image at a time.
The windows are runs of a second packed layout built once per batch from the host layout
(:func:`window_layout`): each window is led by a copy of its image's prefix tokens, so every
kernel runs on it unchanged; prefix queries get one small masked SDPA over their image.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.packed_batch import PackedBatch, PackedLayout

KERNELS = ("auto", "segment", "flex", "varlen", "dense")


class AttentionContext:
    """Per-forward precomputation shared by all blocks (masks are built lazily, once)."""

    def __init__(self, batch: PackedBatch | AttentionRuns, kernel: str = "auto", rope: torch.Tensor | None = None, rope_half: bool = False):
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

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def windows(self, window_size: int) -> tuple["AttentionContext", "WindowLayout"]:
        """The context of the batch's window layout (its kernel, its own mask caches)."""

        def build():
            win = window_layout(self.batch, window_size)
            return AttentionContext(win.runs, self.kernel), win

        return self.cached(("windows", window_size), build)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, window_size: int = 0) -> torch.Tensor:
    """Attention of every token over its own image ([S, H, L, Dh] in, [S, L, H, Dh] out), or over
    its ``window_size`` window (see the module docstring) when that is > 0."""
    # The kernel is chosen from all three dtypes: mixed ones (fp32 q/k, bf16 v) fit neither
    # flash varlen nor Flex's backward, so they count as fp32.
    dtype = q.dtype if q.dtype == k.dtype == v.dtype else torch.float32
    if window_size > 0:
        return _windowed_attention(q, k, v, ctx, window_size, dtype)
    return _KERNEL_FNS[ctx.resolve(dtype)](q, k, v, ctx)


# ---- windowed attention ------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AttentionRuns:
    """What the kernels read of a packed batch: the host layout of its runs and their device
    tensors (see PackedBatch for each field). A PackedBatch is one (runs = images);
    :func:`window_layout` builds one whose runs are windows."""

    layout: PackedLayout
    segment_ids: torch.Tensor  # long [S, L]: run of each slot; -1 at padding
    padding_mask: torch.Tensor
    valid_slots: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.segment_ids.device


@dataclass(frozen=True, eq=False)
class WindowLayout:
    """A packed batch's windows (one window size), from its host layout; see :func:`window_layout`."""

    runs: AttentionRuns  # [S, Lw] slots: per sequence, its images' windows in order, each a run of
    # [copy of the image's prefix tokens, the window's kept tokens row-major]; >= 1 padding slot at the end
    gather: torch.Tensor  # long [S, 1, Lw, 1]: slot of the batch each window slot reads (in its sequence)
    scatter: torch.Tensor  # long [S, L, 1, 1]: window slot each patch token's output is read from; the
    # last (padding, zero output) slot for prefix and padding slots
    prefix_query: torch.Tensor  # long [S, 1, P, 1]: the sequence's prefix slots (P = most in a sequence; repeats pad)
    prefix_mask: torch.Tensor  # bool [S, 1, P, L]: keys of each prefix query = its image
    prefix_rows: torch.Tensor  # long [N * k]: row s * P + p of each prefix slot, in PackedBatch.prefix_slots order
    window_tokens: tuple[int, ...]  # kept patch tokens of each window (empty ones left out), flattened order
    prefix_pairs: int  # query-key pairs of the prefix queries (k per image over its run)

    @property
    def pairs(self) -> int:
        """Query-key pairs one windowed layer attends: each patch token to its window and its
        image's prefix tokens, each prefix token to its image (FLOPs: 4 * pairs * dim)."""
        k = self.runs.layout.num_prefix_tokens
        return sum(n * (n + k) for n in self.window_tokens) + self.prefix_pairs


def window_layout(batch: PackedBatch, window_size: int) -> WindowLayout:
    """The windows of ``batch`` (module docstring): built on the host from its layout once per
    batch, window size and device, and kept with the layout, so forwards never read the device."""
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    lay = batch.layout
    return lay.derived(("window_layout", window_size, str(batch.device)), lambda: _build_window_layout(batch, window_size))


def _build_window_layout(batch: PackedBatch, ws: int) -> WindowLayout:
    lay, device = batch.layout, batch.device
    S, L, k, N = lay.num_sequences, lay.seq_len, lay.num_prefix_tokens, lay.num_images
    h, w = np.array(lay.grids, dtype=np.int64).reshape(N, 2).T
    cols = -(-w // ws)  # windows per row of windows, per image
    first = np.concatenate([[0], np.cumsum(-(-h // ws) * cols)])  # image i's windows: [first[i], first[i + 1])
    image = np.repeat(np.arange(N), lay.num_kept)  # of every kept token, image-major
    row, col = lay.kept_cells // w[image], lay.kept_cells % w[image]
    window = first[image] + row // ws * cols[image] + col // ws
    counts = np.bincount(window, minlength=int(first[-1]))

    # Runs: per sequence, its images in packed order, each image's non-empty windows in order.
    runs = np.array([j for i in lay.packing_order for j in range(first[i], first[i + 1]) if counts[j]], dtype=np.int64)
    run_image = np.searchsorted(first, runs, side="right") - 1
    num_kept = counts[runs]
    lengths = num_kept + k
    seq = np.array(lay.seq_index, dtype=np.int64)[run_image]
    start = np.cumsum(lengths) - lengths  # over all sequences; runs are in flattened order
    seq_start = np.concatenate([[0], np.cumsum(np.bincount(seq, weights=lengths, minlength=S).astype(np.int64))])
    offset = start - seq_start[seq]
    Lw = -(-(int((seq_start[1:] - seq_start[:-1]).max()) + 1) // 8) * 8  # >= 1 padding slot per sequence
    run_slot = seq * Lw + offset
    local = runs - first[run_image]
    extent_h = np.minimum(ws, h[run_image] - local // cols[run_image] * ws)
    extent_w = np.minimum(ws, w[run_image] - local % cols[run_image] * ws)

    # Tokens grouped by run (row-major inside): their window slot and the batch slot they come from.
    run_of_window = np.full(len(counts), -1, dtype=np.int64)
    run_of_window[runs] = np.arange(len(runs))
    token_run = run_of_window[window]
    order = np.argsort(token_run, kind="stable")
    run = token_run[order]
    rank = np.arange(len(order)) - (np.cumsum(num_kept) - num_kept)[run]
    window_slot = run_slot[run] + k + rank
    image_start = np.array(lay.seq_index, dtype=np.int64) * L + np.array(lay.seq_offset, dtype=np.int64)
    token_slot = image_start[image[order]] + k + order - np.array(lay.token_offsets[:-1], dtype=np.int64)[image[order]]

    gather = np.zeros((S, Lw), dtype=np.int64)  # padding reads slot 0: kernels ignore padding
    gather.reshape(-1)[window_slot] = token_slot % L
    for j in range(k):  # the prefix copies leading each window run
        gather.reshape(-1)[run_slot + j] = (image_start[run_image] + j) % L
    scatter = np.full((S, L), Lw - 1, dtype=np.int64)
    scatter.reshape(-1)[token_slot] = window_slot % Lw
    valid = np.repeat(run_slot - start, lengths) + np.arange(int(lengths.sum()))
    segment = np.full((S, Lw), -1, dtype=np.int64)
    segment.reshape(-1)[valid] = np.repeat(np.arange(len(runs)), lengths)

    grids = tuple(zip(extent_h.tolist(), extent_w.tolist()))
    windows = PackedLayout(
        grids=grids, image_sizes=tuple((gh * lay.patch_size, gw * lay.patch_size) for gh, gw in grids),
        num_kept=tuple(num_kept.tolist()), seq_index=tuple(seq.tolist()), seq_offset=tuple(offset.tolist()),
        packing_order=tuple(range(len(runs))), kept_cells=row[order] % ws * extent_w[run] + col[order] % ws,
        num_sequences=S, seq_len=Lw, patch_size=lay.patch_size, num_prefix_tokens=k,
    )  # fmt: skip
    on_device = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    segment_ids = on_device(segment)
    query, query_image, rows = _prefix_queries(lay)
    return WindowLayout(
        runs=AttentionRuns(windows, segment_ids, segment_ids < 0, on_device(valid),
                           torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)),
        gather=on_device(gather)[:, None, :, None],
        scatter=on_device(scatter)[:, :, None, None],
        prefix_query=on_device(query)[:, None, :, None],
        prefix_mask=(batch.segment_ids[:, None, :] == on_device(query_image)[:, :, None])[:, None],
        prefix_rows=on_device(rows),
        window_tokens=windows.num_kept,
        prefix_pairs=k * lay.num_tokens,
    )  # fmt: skip


def _prefix_queries(lay: PackedLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence, its prefix slots (images in packed order) padded to P = the most any
    sequence has by repeating its first one: ([S, P] slot, [S, P] image of each, [N * k] row
    s * P + p of every prefix slot in PackedBatch.prefix_slots order)."""
    k, S = lay.num_prefix_tokens, lay.num_sequences
    P = k * max(len(r) for r in lay.runs_by_sequence)
    query, query_image = np.zeros((S, P), dtype=np.int64), np.zeros((S, P), dtype=np.int64)
    rows = np.zeros((lay.num_images, k), dtype=np.int64)
    filled = [0] * S
    for i, s, start, _ in lay.runs:
        p = filled[s]
        if p == 0:
            query[s], query_image[s] = start, i
        query[s, p : p + k], query_image[s, p : p + k] = start + np.arange(k), i
        rows[i] = s * P + p + np.arange(k)
        filled[s] += k
    return query, query_image, rows.reshape(-1)


def _windowed_attention(q, k, v, ctx: AttentionContext, window_size: int, dtype: torch.dtype) -> torch.Tensor:
    wctx, win = ctx.windows(window_size)
    S, H, L, Dh = q.shape
    # Gathered token-major ([S, Lw, H, Dh] memory, as the projection lays q / k / v out), so the
    # segment kernel reads the windows as views.
    index = win.gather.view(S, -1, 1, 1).expand(-1, -1, H, Dh)
    windows = (t.transpose(1, 2).gather(1, index).transpose(1, 2) for t in (q, k, v))
    out = _KERNEL_FNS[wctx.resolve(dtype)](*windows, wctx)
    out = out.gather(1, win.scatter.expand(S, L, H, Dh))  # [S, L, H, Dh]; prefix and padding slots 0
    if not win.runs.layout.num_prefix_tokens:
        return out
    P = win.prefix_query.shape[2]
    prefix = F.scaled_dot_product_attention(q.gather(2, win.prefix_query.expand(S, H, P, Dh)), k, v, attn_mask=win.prefix_mask)
    rows = prefix.transpose(1, 2).reshape(S * P, H, Dh).index_select(0, win.prefix_rows)
    return out.reshape(S * L, H, Dh).index_copy(0, ctx.batch.prefix_slots.reshape(-1), rows).view(S, L, H, Dh)


def attention_pairs(batch: PackedBatch, window_size: int = 0) -> int:
    """Query-key pairs one attention layer attends on ``batch`` (global, or windowed with
    ``window_size``), counted from the host layout; attention FLOPs are 4 * pairs * dim."""
    if window_size > 0:
        return window_layout(batch, window_size).pairs
    return sum(n * n for n in batch.layout.run_lengths)


def _segment_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    # One SDPA call per group of equally long, adjacent runs (packers place equal lengths side
    # by side: at a fixed budget most images share a few lengths), on views: q, k and v are read
    # token-major ([S * L, H, Dh]: a view of the qkv projection's output as the blocks pass it; a
    # copy only for separate [S > 1, H, L, Dh] tensors) and split ONCE into the pieces of every
    # sequence, so autograd joins each gradient with one cat (O(tokens), not a zero-filled
    # full-size gradient per image). The outputs come in SDPA's own [tokens, H, Dh] memory order
    # (CPU and flash kernels) and are joined by ONE cat: a contiguous [S, L, H, Dh], so the
    # block's reshape to [S, L, D] is free and the backward gets its gradient in that order too.
    S, H, L, Dh = q.shape
    lay = ctx.batch.layout
    sizes, counts = lay.derived("segment_groups", lambda: _sequence_pieces(lay))
    qs, ks, vs = (t.transpose(1, 2).reshape(S * L, H, Dh).split(sizes) for t in (q, k, v))
    out = []
    for count, qp, kp, vp in zip(counts, qs, ks, vs):
        if not count:  # padding: zeros, so padding slots stay well-defined through proj and residuals
            out.append(qp.new_zeros(qp.shape))
            continue
        n = qp.shape[0] // count
        o = F.scaled_dot_product_attention(*(t.unflatten(0, (count, n)).transpose(1, 2) for t in (qp, kp, vp)))
        out.append(o.transpose(1, 2).reshape(count * n, H, Dh))
    return (out[0] if len(out) == 1 else torch.cat(out)).view(S, L, H, Dh)


def _sequence_pieces(layout) -> tuple[list[int], list[int]]:
    """The consecutive pieces of the flattened [S * L] slots: their lengths and how many image
    runs each holds (m >= 1: m adjacent runs of one length in one sequence; 0: padding)."""
    sizes, counts = [], []
    for runs in layout.runs_by_sequence:
        cursor, first = 0, len(sizes)
        for start, length in runs:
            if start > cursor:
                sizes.append(start - cursor)
                counts.append(0)
            if len(sizes) > first and counts[-1] and start == cursor and sizes[-1] == counts[-1] * length:
                sizes[-1] += length
                counts[-1] += 1
            else:
                sizes.append(length)
                counts.append(1)
            cursor = start + length
        if cursor < layout.seq_len:
            sizes.append(layout.seq_len - cursor)
            counts.append(0)
    return sizes, counts


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
