"""Packing variable-length images into fixed-capacity sequences (the part of NaViT no library does).

Bin packing works on run lengths only (tokens per image, prefix slots included) and returns
bins of image indices; :func:`pack_images` turns images into a :class:`PackedBatch`.
"""

from __future__ import annotations

import bisect
import heapq
from itertools import accumulate
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .packed_batch import PackedBatch, PackedLayout, PixelNorm
from .patchify import patchify
from .resize import budget_grid, resize_to_grid
from .token_drop import TokenDrop

PACKING_ALGORITHMS = ("balanced", "best_fit_decreasing", "first_fit_decreasing", "first_fit", "next_fit")


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(
                f"image {i} needs {n} tokens but a sequence holds {capacity}: raise seq_len, lower "
                f"max_tokens_per_image, or pass fit_to_seq_len=True to resize it down"
            )


def _first_fit(order: Sequence[int], lengths: Sequence[int], capacity: int, max_images: int | None) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if room >= lengths[i] and (max_images is None or len(bins[b]) < max_images):
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _best_fit(order: Sequence[int], lengths: Sequence[int], capacity: int, max_images: int | None) -> list[list[int]]:
    """Each item into the open bin with the least room that still fits it (ties: the lowest
    bin index); bins full in image count leave the search. O(n log bins) with a sorted list."""
    bins: list[list[int]] = []
    open_rooms: list[tuple[int, int]] = []  # sorted (room, bin index)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(open_rooms, (n, -1))
        if j == len(open_rooms):
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        else:
            room, b = open_rooms.pop(j)
            bins[b].append(i)
            room -= n
        if max_images is None or len(bins[b]) < max_images:
            bisect.insort(open_rooms, (room, b))
    return bins


def _next_fit(order: Sequence[int], lengths: Sequence[int], capacity: int, max_images: int | None) -> list[list[int]]:
    bins: list[list[int]] = [[]]
    room = capacity
    for i in order:
        if lengths[i] > room or (max_images is not None and len(bins[-1]) >= max_images):
            bins.append([])
            room = capacity
        bins[-1].append(i)
        room -= lengths[i]
    return [b for b in bins if b]


def _rebalance(bins: list[list[int]], lengths: Sequence[int], capacity: int, max_images: int | None) -> list[list[int]]:
    """Spread images over the same number of bins so the fullest bin is as empty as possible
    (longest-processing-time first); keeps the input bins if that would break a constraint."""
    k = len(bins)
    heap = [(0, b) for b in range(k)]
    out: list[list[int]] = [[] for _ in range(k)]
    for i in sorted((i for b in bins for i in b), key=lambda i: (-lengths[i], i)):
        skipped = []
        while heap:
            load, b = heapq.heappop(heap)
            if max_images is None or len(out[b]) < max_images:
                break
            skipped.append((load, b))
        else:
            return bins
        for item in skipped:
            heapq.heappush(heap, item)
        out[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    if max(sum(lengths[i] for i in b) for b in out) > capacity:
        return bins
    return out


def pack_lengths(
    lengths: Sequence[int],
    capacity: int,
    algorithm: str = "balanced",
    max_images_per_seq: int | None = None,
    shrink_multiple: int | None = None,
) -> list[list[int]]:
    """Assign item indices to bins of ``capacity`` tokens. Every index appears exactly once.

    - ``first_fit``: the paper's greedy packing, in input order;
    - ``first_fit_decreasing`` / ``best_fit_decreasing``: classic offline heuristics;
    - ``next_fit``: the streaming baseline (close a bin as soon as an item does not fit);
    - ``balanced`` (default): best-fit-decreasing decides the number of bins, then items are
      spread across those bins so the fullest one is as short as possible. With
      ``shrink_multiple`` (the sequence length may shrink to a multiple of it) it also searches
      the bin capacity in [longest item, capacity] for the least total area
      (bins x longest bin), which is what padding costs.
    Ties are broken by index, so the result is deterministic.
    """
    if algorithm not in PACKING_ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; choose one of {PACKING_ALGORITHMS}")
    if max_images_per_seq is not None and max_images_per_seq < 1:
        raise ValueError(f"max_images_per_seq must be >= 1, got {max_images_per_seq}")
    _check_lengths(lengths, capacity)
    if not lengths:
        return []
    natural = list(range(len(lengths)))
    decreasing = sorted(natural, key=lambda i: (-lengths[i], i))
    greedy = {
        "first_fit": (_first_fit, natural),
        "next_fit": (_next_fit, natural),
        "first_fit_decreasing": (_first_fit, decreasing),
        "best_fit_decreasing": (_best_fit, decreasing),
    }
    if algorithm in greedy:
        fit, order = greedy[algorithm]
        return fit(order, lengths, capacity, max_images_per_seq)
    if not shrink_multiple:
        return _rebalance(_best_fit(decreasing, lengths, capacity, max_images_per_seq), lengths, capacity, max_images_per_seq)
    return _balanced_search(lengths, capacity, decreasing, max_images_per_seq, shrink_multiple)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _balanced_search(lengths, capacity, decreasing, max_images, multiple) -> list[list[int]]:
    """Least area (bins x longest bin, rounded up to ``multiple``) over capacities c in
    [longest item, capacity]: for each bin count n, the smallest c that best-fit packs into
    n bins (binary search), rebalanced; n grows until no packing with more bins can win."""
    total = sum(lengths)
    candidates = sorted({min(capacity, c) for c in range(_round_up(max(lengths), multiple), capacity + multiple, multiple)})
    # A true lower bound on the area of any packing into n bins: its longest bin holds at
    # least ceil(total / n) tokens. It is not monotone in n, hence the suffix minimum.
    N = len(lengths)
    floor = [0] + [n * min(capacity, _round_up(-(-total // n), multiple)) for n in range(1, N + 1)]
    for n in range(N - 1, 0, -1):
        floor[n] = min(floor[n], floor[n + 1])
    packed: dict[int, list[list[int]]] = {}

    def pack(j: int) -> list[list[int]]:
        if j not in packed:
            packed[j] = _best_fit(decreasing, lengths, candidates[j], max_images)
        return packed[j]

    best, best_area, tried = None, None, set()
    for n in range(len(pack(len(candidates) - 1)), N + 1):
        if best_area is not None and floor[n] >= best_area:
            break  # no packing with n or more bins can beat the best
        lo, hi = 0, len(candidates) - 1  # smallest capacity whose best-fit needs <= n bins
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(pack(mid)) <= n else (mid + 1, hi)
        if lo in tried:
            if lo == 0:
                break  # the smallest capacity is reached: more bins change nothing
            continue
        tried.add(lo)
        c = candidates[lo]
        bins = _rebalance([list(b) for b in pack(lo)], lengths, c, max_images)
        area = len(bins) * min(capacity, _round_up(max(sum(lengths[i] for i in b) for b in bins), multiple))
        if best_area is None or area < best_area:
            best, best_area = bins, area
    return best


_FLOAT_PIXEL_SLACK = 0.25 / 255


def to_uint8_pixels(image: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Float pixels in [0, max_value] -> uint8 [0, 255], rounded to the nearest level (exact
    for decoded 8-bit images, flipped or cropped; packing calls it after the budget resize)."""
    return image.mul(255.0 / max_value).round_().clamp_(0, 255).to(torch.uint8)


def _as_image(image: torch.Tensor, index: int, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
    if not torch.is_tensor(image):
        raise TypeError(f"images[{index}]: expected a CHW torch.Tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"images[{index}]: expected a 3-channel CHW tensor, got shape {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"images[{index}]: zero-size image {tuple(image.shape)}")
    if pixel_norm is not None:
        if pixel_norm.num_channels != image.shape[0]:
            raise ValueError(f"pixel_norm has {pixel_norm.num_channels} channel(s) but images[{index}] has {image.shape[0]}")
        if image.dtype == torch.uint8:
            return image
        if not image.is_floating_point():
            raise TypeError(f"images[{index}]: pixel_norm packs uint8 images in [0, 255] or float ones in [0, 1], got {image.dtype}")
        # NaN propagates and fails the range test. The slack admits float rounding of earlier
        # interpolations (a quarter of one 8-bit level; rounding to uint8 clamps it away).
        lo, hi = (float(v) for v in torch.aminmax(image))
        if not (-_FLOAT_PIXEL_SLACK <= lo and hi <= 1.0 + _FLOAT_PIXEL_SLACK):
            raise ValueError(
                f"images[{index}]: pixel values span [{lo:.4g}, {hi:.4g}], but pixel_norm packs un-normalized pixels: float "
                f"in [0, 1] or uint8 in [0, 255] (torchvision's convention). Pass images before normalization (the model "
                f"normalizes them on the device), or drop pixel_norm"
            )
        return image
    if not image.is_floating_point():
        raise TypeError(
            f"images[{index}]: expected a floating-point tensor, got {image.dtype} (normalize first, or pass pixel_norm to pack "
            f"un-normalized pixels as uint8 patches, normalized on the device)"
        )
    # One reduction instead of a full-size boolean mask: a NaN or inf anywhere makes the sum
    # non-finite; only then (or on overflow of huge finite values) is the exact test needed.
    if not bool(torch.isfinite(image.sum())) and not bool(torch.isfinite(image).all()):
        raise ValueError(f"images[{index}]: contains NaN or infinite pixel values")
    return image


def pack_images(
    images: Sequence[torch.Tensor],
    patch_size: int = 16,
    max_tokens_per_image: int = 256,
    seq_len: int = 1024,
    *,
    max_side: int | None = None,
    max_tokens: Sequence[int] | None = None,
    algorithm: str = "balanced",
    max_images_per_seq: int | None = None,
    fixed_seq_len: bool = False,
    pad_multiple: int = 8,
    num_prefix_tokens: int = 0,
    token_drop: TokenDrop | None = None,
    seed: int | Sequence[int] = 0,
    allow_upscale: bool = True,
    fit_to_seq_len: bool = False,
    pixel_norm: PixelNorm | None = None,
) -> PackedBatch:
    """Resize each image to its token budget, patchify it, and pack everything into sequences.

    images: float CHW tensors of any height/width (3 channels, finite values), normalized as
        the model expects; with ``pixel_norm``, un-normalized pixels: float in [0, 1] (as
        decoded) or uint8.
    max_tokens_per_image: patch budget per image (``max_tokens`` gives one per image, e.g.
        from resolution sampling); ``max_side`` additionally caps the longer side in pixels.
    seq_len: capacity of one sequence. Unless ``fixed_seq_len`` the returned sequence length is
        shrunk to the longest packed sequence rounded up to ``pad_multiple`` (never above seq_len).
    token_drop: sample a drop rate per image and pack only the kept tokens (training only).
    seed: seeds token dropping; one int for the whole call, or one per image so an image's
        drop pattern does not depend on which other images share its batch (DDP, resumes).
        Packing itself is deterministic.
    fit_to_seq_len: shrink images whose budget exceeds one sequence instead of raising.
    pixel_norm: store uint8 patches (rounded after the resize; 0 at padding) and record this
        normalization in the batch; ``batch.pixel_values()`` applies it where the batch lives.
        The host-to-device copy of the patches shrinks 4x, and the datasets skip their
        normalization pass. The model input differs from packing the normalized images by the
        rounding only, at most 0.5 / (255 * std): the budget resize (antialiased bilinear, a
        convex combination) commutes with the per-channel affine normalization. None when 8-bit
        pixels are not resized.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if len(images) == 0:
        raise ValueError("pack_images needs at least one image")
    if max_tokens is not None and len(max_tokens) != len(images):
        raise ValueError(f"max_tokens has {len(max_tokens)} entries for {len(images)} images")
    capacity_for_patches = seq_len - num_prefix_tokens
    if capacity_for_patches < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for patches after {num_prefix_tokens} prefix tokens")

    if isinstance(seed, (int, np.integer)):
        shared = np.random.default_rng(int(seed))
        rngs = [shared] * len(images)
    else:
        if len(seed) != len(images):
            raise ValueError(f"seed has {len(seed)} entries for {len(images)} images")
        rngs = [np.random.default_rng(int(s)) for s in seed]
    grids, sizes, tokens, kept_idx, rates = [], [], [], [], []
    for i, raw in enumerate(images):
        image = _as_image(raw, i, pixel_norm)
        H, W = int(image.shape[1]), int(image.shape[2])
        if min(H, W) < patch_size:
            raise ValueError(f"images[{i}]: {H}x{W} is smaller than one {patch_size}x{patch_size} patch")
        budget = int(max_tokens[i]) if max_tokens is not None else max_tokens_per_image
        if budget > capacity_for_patches:
            if not fit_to_seq_len:
                raise ValueError(
                    f"images[{i}]: a budget of {budget} patches (+{num_prefix_tokens} prefix) does not fit in "
                    f"seq_len={seq_len}; raise seq_len or pass fit_to_seq_len=True to resize it down"
                )
            budget = capacity_for_patches
        grid = budget_grid(H, W, patch_size, budget, max_side=max_side, allow_upscale=allow_upscale)
        resized = image
        if pixel_norm is None:
            resized = resize_to_grid(image, grid, patch_size)
        elif image.dtype != torch.uint8:  # rounded after the resize: only the resized image is converted
            resized = to_uint8_pixels(resize_to_grid(image, grid, patch_size))
        elif tuple(image.shape[-2:]) != (grid[0] * patch_size, grid[1] * patch_size):  # resized in float: see the bound below
            resized = to_uint8_pixels(resize_to_grid(image.float(), grid, patch_size), max_value=255.0)
        patches = patchify(resized, patch_size)
        n = grid[0] * grid[1]
        if token_drop is not None:
            rate, keep = token_drop.sample_keep(rngs[i], n)
            keep_t = torch.from_numpy(keep)
            patches = patches[keep_t]
        else:
            rate, keep_t = 0.0, torch.arange(n)
        grids.append(grid)
        sizes.append((H, W))
        tokens.append(patches)
        kept_idx.append(keep_t)
        rates.append(rate)

    run_lengths = [len(k) + num_prefix_tokens for k in kept_idx]
    bins = pack_lengths(run_lengths, seq_len, algorithm, max_images_per_seq, shrink_multiple=None if fixed_seq_len else pad_multiple)
    longest = max(sum(run_lengths[i] for i in b) for b in bins)
    L = seq_len if fixed_seq_len else min(seq_len, -(-longest // pad_multiple) * pad_multiple)
    return _assemble(tokens, kept_idx, grids, sizes, rates, bins, L, patch_size, num_prefix_tokens, images[0], pixel_norm)


def pack_native(
    images: Sequence[torch.Tensor], patch_size: int, seq_len: int = 0, num_prefix_tokens: int = 0, **pack_kwargs
) -> PackedBatch:
    """Pack images exactly at their own resolution: each is zero-padded bottom/right to a patch
    multiple and keeps its own grid (never resampled), so patch (r, c) covers pixels
    [P*r, P*(r+1)) x [P*c, P*(c+1)) and features stay aligned with image coordinates.
    For frameworks that already resized their inputs (detectron2, mmseg). ``seq_len`` is raised
    to fit the largest image. Those frameworks also normalize (and pad) their inputs on the
    device themselves, so their float tensors take the float path; ``pixel_norm`` in
    ``pack_kwargs`` packs un-normalized pixels as uint8 patches (zero-padded) instead."""
    padded = [F.pad(im, (0, -im.shape[-1] % patch_size, 0, -im.shape[-2] % patch_size)) for im in images]
    grids = [(im.shape[-2] // patch_size, im.shape[-1] // patch_size) for im in padded]
    budgets = [h * w for h, w in grids]
    batch = pack_images(
        padded, patch_size, max_tokens=budgets, seq_len=max(seq_len, max(budgets) + num_prefix_tokens),
        num_prefix_tokens=num_prefix_tokens, **pack_kwargs,
    )  # fmt: skip
    if batch.grid_sizes.tolist() != [list(g) for g in grids]:  # the budget grid of a patch multiple is itself
        raise AssertionError("pack_native: an image was resampled")
    return batch


def _assemble(tokens, kept_idx, grids, sizes, rates, bins, L, patch_size, num_prefix, like, pixel_norm=None) -> PackedBatch:
    """Write the packed tensors and the host-side layout of images already resized, patchified
    and binned. tokens[i]: [num_kept_i, C*P*P] (float, or uint8 with pixel_norm); kept_idx[i]:
    sorted kept grid indices."""
    S, N = len(bins), len(tokens)
    dim = tokens[0].shape[1]
    # Not torch.zeros: only prefix slots and the tail are zeroed below, the rest is overwritten
    # (zero-filling the whole [S, L, C*P*P] buffer cost as much as the copy itself).
    patches = torch.empty(S, L, dim, dtype=tokens[0].dtype, device=like.device)
    segment_ids = torch.full((S, L), -1, dtype=torch.long)
    positions = torch.zeros(S, L, 2, dtype=torch.long)
    frac_positions = torch.zeros(S, L, 2, dtype=torch.float32)
    token_index = torch.full((S, L), -1, dtype=torch.long)
    seq_index, seq_offset = [0] * N, [0] * N
    for s, members in enumerate(bins):
        offset = 0
        for i in members:
            h, w = grids[i]
            keep = kept_idx[i]
            start, end = offset + num_prefix, offset + num_prefix + len(keep)
            patches[s, offset:start] = 0
            patches[s, start:end] = tokens[i]
            segment_ids[s, offset:end] = i
            rows, cols = keep // w, keep % w
            positions[s, start:end, 0] = rows
            positions[s, start:end, 1] = cols
            frac_positions[s, start:end, 0] = (rows.float() + 0.5) / h
            frac_positions[s, start:end, 1] = (cols.float() + 0.5) / w
            token_index[s, start:end] = keep
            seq_index[i], seq_offset[i] = s, offset
            offset = end
        patches[s, offset:] = 0
    kept_cells = np.concatenate([np.zeros(0, np.int64), *(np.asarray(k, dtype=np.int64) for k in kept_idx)])
    kept_cells.setflags(write=False)  # shared by every copy of the layout
    layout = PackedLayout(
        grids=tuple((int(h), int(w)) for h, w in grids),
        image_sizes=tuple((int(h), int(w)) for h, w in sizes),
        num_kept=tuple(len(k) for k in kept_idx),
        seq_index=tuple(seq_index),
        seq_offset=tuple(seq_offset),
        packing_order=tuple(i for b in bins for i in b),
        kept_cells=kept_cells,
        num_sequences=S,
        seq_len=L,
        patch_size=patch_size,
        num_prefix_tokens=num_prefix,
    )
    batch = PackedBatch(
        patches=patches,
        segment_ids=segment_ids,
        positions=positions,
        frac_positions=frac_positions,
        token_index=token_index,
        padding_mask=segment_ids < 0,
        grid_sizes=torch.tensor(layout.grids, dtype=torch.long).view(N, 2),
        image_sizes=torch.tensor(layout.image_sizes, dtype=torch.long).view(N, 2),
        resized_sizes=torch.tensor(layout.resized_sizes, dtype=torch.long).view(N, 2),
        num_kept=torch.tensor(layout.num_kept, dtype=torch.long),
        drop_rates=torch.tensor(rates, dtype=torch.float32),
        seq_index=torch.tensor(seq_index, dtype=torch.long),
        seq_offset=torch.tensor(seq_offset, dtype=torch.long),
        packing_order=torch.tensor(layout.packing_order, dtype=torch.long),
        cu_seqlens=torch.tensor((0, *accumulate(layout.run_lengths[i] for i in layout.packing_order)), dtype=torch.int32),
        **_slot_tensors(layout, kept_idx),
        layout=layout,
        patch_size=patch_size,
        num_prefix_tokens=num_prefix,
        pixel_norm=pixel_norm,
    )
    # Pixels stay on the images' device (no host round trip on GPU); the index tensors follow.
    return batch.to(like.device) if like.device.type != "cpu" else batch


def _slot_tensors(layout: PackedLayout, kept_idx: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The index tensors of PackedBatch (see its field comments), from the host layout."""
    L, k = layout.seq_len, layout.num_prefix_tokens
    run_start = [layout.seq_index[i] * L + layout.seq_offset[i] for i in range(layout.num_images)]
    kept = [torch.as_tensor(x, dtype=torch.long) for x in kept_idx]
    arange = torch.arange(max(layout.num_kept, default=0) + k)
    empty = torch.zeros(0, dtype=torch.long)
    patch_slots = torch.cat([run_start[i] + k + arange[:n] for i, n in enumerate(layout.num_kept)] or [empty])
    patch_cells = torch.cat([layout.cell_offsets[i] + kept[i] for i in range(layout.num_images)] or [empty])
    valid_slots = torch.cat([run_start[i] + arange[:n] for i, _, _, n in layout.runs] or [empty])
    return dict(
        patch_slots=patch_slots,
        patch_image=torch.repeat_interleave(
            torch.arange(layout.num_images), torch.tensor(layout.num_kept, dtype=torch.long), output_size=sum(layout.num_kept)
        ),
        patch_cells=patch_cells,
        valid_slots=valid_slots,
        prefix_slots=torch.tensor(run_start, dtype=torch.long).view(-1, 1) + arange[:k],
    )


def grid_layout(batch: PackedBatch, num_prefix_tokens: int, pad_multiple: int = 8) -> PackedBatch:
    """The layout for a module that runs on ALL h_i * w_i cells of every image grid (dropped
    cells included) with ``num_prefix_tokens`` slots of its own before each image (e.g. the
    class slots of a mask-transformer decoder), each image in the same sequence as in
    ``batch``. ``patches`` is an empty [S, L, 0] tensor: only the layout (segment ids, runs,
    cu_seqlens, slot indices) is meant for the attention kernels and unpacking. Built on the
    host once per batch and kept with its layout."""

    def build() -> PackedBatch:
        lay = batch.layout
        bins: list[list[int]] = [[] for _ in range(lay.num_sequences)]
        for i, s, _, _ in lay.runs:
            bins[s].append(i)
        bins = [b for b in bins if b]
        longest = max(sum(lay.areas[i] + num_prefix_tokens for i in b) for b in bins)
        like = torch.empty(0)
        out = _assemble(
            tokens=[like.new_empty(n, 0) for n in lay.areas],
            kept_idx=[torch.arange(n) for n in lay.areas],
            grids=lay.grids,
            sizes=lay.image_sizes,
            rates=[0.0] * lay.num_images,
            bins=bins,
            L=-(-longest // pad_multiple) * pad_multiple,
            patch_size=lay.patch_size,
            num_prefix=num_prefix_tokens,
            like=like,
        )
        return out.to(batch.device) if batch.device.type != "cpu" else out

    return batch.layout.derived(("grid_layout", num_prefix_tokens, pad_multiple, str(batch.device)), build)
