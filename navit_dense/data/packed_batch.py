"""The packed batch: the single contract by which images enter the backbone.

Shapes use S = number of packed sequences, L = sequence length, N = number of images,
P = patch size, C = image channels (3), T = kept patch tokens over the batch.

Layout rules (relied upon by every attention kernel and by unpacking):
- each image occupies ONE contiguous run of a sequence: ``num_prefix_tokens`` prefix slots
  (e.g. a class token, filled in by the model) followed by its kept patch tokens in
  row-major order;
- padding only appears at the end of a sequence;
- so the non-padding tokens, read in flattened ``[S * L]`` order, are a concatenation of the
  image runs in ``packing_order``, delimited by ``cu_seqlens`` (the varlen / flash layout).

Everything per image that kernels, unpacking, heads, decoders and losses need is computed
ONCE, at pack time, on the host: :class:`PackedLayout` holds it as Python ints and one numpy
array of kept grid cells (it survives ``.to(device)`` untouched, so no module ever reads sizes
or token positions back from the device), and the ``*_slots`` / ``patch_*`` index tensors of
:class:`PackedBatch` let modules gather and scatter tokens without boolean masks (which would
sync the host on every call).

Pixels travel either as float patches, already normalized, or (``pack_images(...,
pixel_norm=...)``) as uint8 patches of the un-normalized image with the :class:`PixelNorm`
to apply: 4x fewer bytes to pin and copy to the device, normalized there by
:meth:`PackedBatch.pixel_values`, the one reader of ``patches`` every model goes through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from itertools import accumulate
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Host-side layout of one packed batch (Python ints and one numpy array, input order unless stated)."""

    grids: tuple[tuple[int, int], ...]  # (h_i, w_i) patch grid
    image_sizes: tuple[tuple[int, int], ...]  # original (H_i, W_i) before resizing
    num_kept: tuple[int, ...]  # patch tokens kept after token dropping
    seq_index: tuple[int, ...]  # sequence holding each image
    seq_offset: tuple[int, ...]  # start of the image's run (prefix slots included) in its sequence
    packing_order: tuple[int, ...]  # image index of each run, in flattened [S * L] order
    # int64 [T], read-only: grid index row * w + col of every kept patch token, image-major and
    # row-major (the host copy of PackedBatch.patch_cells minus cell offsets). One array, not
    # T Python ints, so pickling a batch stays cheap.
    kept_cells: np.ndarray
    num_sequences: int
    seq_len: int
    patch_size: int
    num_prefix_tokens: int = 0
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_images(self) -> int:
        return len(self.grids)

    @cached_property
    def run_lengths(self) -> tuple[int, ...]:
        """Tokens per image run (prefix slots + kept patches)."""
        return tuple(n + self.num_prefix_tokens for n in self.num_kept)

    @cached_property
    def runs(self) -> tuple[tuple[int, int, int, int], ...]:
        """(image, sequence, start, length) of every image run, in flattened order."""
        return tuple((i, self.seq_index[i], self.seq_offset[i], self.run_lengths[i]) for i in self.packing_order)

    @cached_property
    def runs_by_sequence(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per sequence, the (start, length) of its image runs in order."""
        by_seq: list[list[tuple[int, int]]] = [[] for _ in range(self.num_sequences)]
        for _, s, start, length in self.runs:
            by_seq[s].append((start, length))
        return tuple(tuple(r) for r in by_seq)

    @cached_property
    def max_run_length(self) -> int:
        return max(self.run_lengths, default=0)

    @cached_property
    def num_tokens(self) -> int:
        """Non-padding tokens (prefix slots included)."""
        return sum(self.run_lengths)

    @cached_property
    def areas(self) -> tuple[int, ...]:
        """h_i * w_i: grid cells per image (kept or not)."""
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def cell_offsets(self) -> tuple[int, ...]:
        """[N + 1]: image i's cells are [cell_offsets[i], cell_offsets[i + 1]) of all grids concatenated."""
        return (0, *accumulate(self.areas))

    @cached_property
    def token_offsets(self) -> tuple[int, ...]:
        """[N + 1]: image i's kept patch tokens are rows [token_offsets[i], token_offsets[i + 1])
        of the image-major patch stream (``PackedBatch.patch_slots`` order)."""
        return (0, *accumulate(self.num_kept))

    @cached_property
    def resized_sizes(self) -> tuple[tuple[int, int], ...]:
        """(h_i * P, w_i * P): the size each image's patches were cut from."""
        return tuple((h * self.patch_size, w * self.patch_size) for h, w in self.grids)

    @cached_property
    def grid_groups(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """Distinct grid sizes -> the images that have them (first-seen order)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(self.grids):
            groups.setdefault(g, []).append(i)
        return {g: tuple(v) for g, v in groups.items()}

    @property
    def pad_fraction(self) -> float:
        """Fraction of the S * L slots that carry no token."""
        total = self.num_sequences * self.seq_len
        return 1.0 - self.num_tokens / total if total else 0.0

    @cached_property
    def padded_cells(self) -> np.ndarray:
        """int64 [T]: every kept patch token's cell in the zero-padded grid stack [N, H, W]
        (H, W the largest grid sides), image-major and row-major like ``kept_cells``."""
        W = max((w for _, w in self.grids), default=0)
        H = max((h for h, _ in self.grids), default=0)
        image = np.repeat(np.arange(self.num_images, dtype=np.int64), self.num_kept)
        width = np.repeat(np.array([w for _, w in self.grids], dtype=np.int64), self.num_kept)
        row, col = np.divmod(np.asarray(self.kept_cells, dtype=np.int64), np.maximum(width, 1))
        return (image * H + row) * W + col

    def derived(self, key, build: Callable[[], object]):
        """A value computed once from this layout and kept with it (e.g. a decoder's own
        layout), so modules that need more than the fields above never rebuild it per call."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


@dataclass(frozen=True)
class PixelNorm:
    """The normalization of uint8 patches, ``(x / 255 - mean) / std`` per channel (mean and std
    in [0, 1] units, as the data configs give them): host metadata of a uint8
    :class:`PackedBatch`, applied on the device by :meth:`PackedBatch.pixel_values`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"PixelNorm: mean {list(mean)} and std {list(std)} need one value per channel")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"PixelNorm: mean {list(mean)} must be finite and std {list(std)} positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def num_channels(self) -> int:
        return len(self.mean)


@dataclass
class PackedBatch:
    # [S, L, C*P*P], (c, py, px) order = nn.Conv2d weight order; 0 at padding and prefix slots.
    # float: normalized pixels; uint8: [0, 255] pixels, normalized by pixel_values() with pixel_norm.
    patches: torch.Tensor
    segment_ids: torch.Tensor  # long [S, L]: input index of the image owning the token; -1 at padding
    positions: torch.Tensor  # long [S, L, 2]: integer (row, col) in the image's patch grid; 0 at padding/prefix
    frac_positions: torch.Tensor  # float [S, L, 2]: ((row + .5) / h, (col + .5) / w) in (0, 1); 0 at padding/prefix
    token_index: torch.Tensor  # long [S, L]: kept-token index row * w + col; -1 at padding and prefix slots
    padding_mask: torch.Tensor  # bool [S, L]: True at padding
    grid_sizes: torch.Tensor  # long [N, 2]: (h_i, w_i) patch grid of each image, input order
    image_sizes: torch.Tensor  # long [N, 2]: original (H, W) before resizing
    resized_sizes: torch.Tensor  # long [N, 2]: (h_i * P, w_i * P), the size the patches were cut from
    num_kept: torch.Tensor  # long [N]: patch tokens kept after token dropping
    drop_rates: torch.Tensor  # float [N]: the drop rate sampled for each image (0 when not dropping)
    seq_index: torch.Tensor  # long [N]: sequence holding each image
    seq_offset: torch.Tensor  # long [N]: start of the image's run (prefix slots included) in that sequence
    packing_order: torch.Tensor  # long [N]: image index of each run, in flattened [S*L] order
    cu_seqlens: torch.Tensor  # int32 [N + 1]: run boundaries over non-padding tokens, in packing_order
    patch_slots: torch.Tensor  # long [T]: flat [S * L] index of every kept patch token, image-major (input order), row-major within an image
    patch_image: torch.Tensor  # long [T]: image of each patch_slots entry
    patch_cells: torch.Tensor  # long [T]: its cell in all grids concatenated (cell_offsets[image] + row * w + col)
    valid_slots: torch.Tensor  # long [S * L - padding]: flat index of every non-padding token, flattened order
    prefix_slots: torch.Tensor  # long [N, num_prefix_tokens]: flat index of each image's prefix slots
    layout: PackedLayout  # host-side ints, computed at pack time (survives .to())
    patch_size: int
    num_prefix_tokens: int = 0
    pixel_norm: PixelNorm | None = None  # set iff patches are uint8

    # ---- pixels ------------------------------------------------------------------------
    def pixel_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[S, L, C*P*P] model input in ``dtype``: the float patches as they are, or the uint8
        patches normalized where they live (on the device after ``.to``), with padding and
        prefix slots 0 as in a float batch. Elementwise ops with Python-scalar constants: no
        host round trip and no constant tensor to copy over. The ops are the float path's own
        ((x / 255 - mean) / std in float32, as decoding + Normalize compute them), so on the CPU
        the result equals a float batch packed from the same uint8 pixels bit for bit when no
        resize happens; CUDA divides by a scalar as a multiply by its reciprocal (<= 1 ulp)."""
        if self.pixel_norm is None:
            if self.patches.dtype == torch.uint8:
                raise ValueError("PackedBatch.patches are uint8 but pixel_norm is None: pack with pack_images(..., pixel_norm=...)")
            return self.patches.to(dtype)
        norm = self.pixel_norm
        x = self.patches.to(torch.float32).div_(255.0)
        per_channel = x.view(*x.shape[:2], norm.num_channels, -1)
        for c, (mean, std) in enumerate(zip(norm.mean, norm.std)):
            per_channel[:, :, c].sub_(mean).div_(std)
        return x.masked_fill_(self.token_index[..., None] < 0, 0.0).to(dtype)

    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of each tensor field: what ``pin_memory()`` and ``.to(device)`` copy (sum them
        for the batch)."""
        return {f.name: v.nbytes for f in fields(self) for v in [getattr(self, f.name)] if torch.is_tensor(v)}

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.grid_sizes.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.patches.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.patches.shape[1])

    @property
    def device(self) -> torch.device:
        return self.patches.device

    @property
    def pad_fraction(self) -> float:
        """Fraction of the S * L slots that carry no token."""
        return self.layout.pad_fraction

    @property
    def run_lengths(self) -> torch.Tensor:
        """long [N]: tokens per image run (prefix slots + kept patches), input order."""
        return self.num_kept + self.num_prefix_tokens

    @property
    def prefix_mask(self) -> torch.Tensor:
        """bool [S, L]: True at prefix slots."""
        return (~self.padding_mask) & (self.token_index < 0)

    @property
    def max_run_length(self) -> int:
        return self.layout.max_run_length

    def kept_indices(self, i: int) -> torch.Tensor:
        """long [num_kept_i]: flattened grid indices of image i's kept tokens, in packed order."""
        lo, hi = self.layout.token_offsets[i], self.layout.token_offsets[i + 1]
        return self.patch_cells[lo:hi] - self.layout.cell_offsets[i]

    def runs(self) -> tuple[tuple[int, int, int, int], ...]:
        """(image, sequence, start, length) for every image run, in flattened order."""
        return self.layout.runs

    def flat(self, tokens: torch.Tensor) -> torch.Tensor:
        """[S, L, ...] -> [S * L, ...], the view the ``*_slots`` index tensors address."""
        return tokens.reshape(-1, *tokens.shape[2:])

    def _map_tensors(self, fn) -> "PackedBatch":
        return PackedBatch(**{f.name: (fn(v) if torch.is_tensor(v) else v) for f in fields(self) for v in [getattr(self, f.name)]})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map_tensors(torch.Tensor.pin_memory)

    # ---- consistency ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check the layout rules above; raises ValueError naming the violated field."""
        S, L = self.segment_ids.shape
        n = self.num_images
        expected = {
            "patches": (S, L),
            "positions": (S, L, 2),
            "frac_positions": (S, L, 2),
            "token_index": (S, L),
            "padding_mask": (S, L),
            "grid_sizes": (n, 2),
            "image_sizes": (n, 2),
            "resized_sizes": (n, 2),
            "num_kept": (n,),
            "drop_rates": (n,),
            "seq_index": (n,),
            "seq_offset": (n,),
            "packing_order": (n,),
            "cu_seqlens": (n + 1,),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got[: len(shape)] != shape:
                raise ValueError(f"PackedBatch.{name}: expected leading shape {shape}, got {got}")
        if (self.patches.dtype == torch.uint8) != (self.pixel_norm is not None):
            raise ValueError(f"PackedBatch.pixel_norm must be set exactly when patches are uint8 (patches: {self.patches.dtype}, "
                             f"pixel_norm: {self.pixel_norm})")  # fmt: skip
        if self.pixel_norm is not None and self.patches.shape[-1] != self.pixel_norm.num_channels * self.patch_size**2:
            raise ValueError(f"PackedBatch.pixel_norm has {self.pixel_norm.num_channels} channels for patches of "
                             f"{self.patches.shape[-1]} values at patch_size={self.patch_size}")  # fmt: skip
        if not torch.equal(self.padding_mask, self.segment_ids < 0):
            raise ValueError("PackedBatch.padding_mask must equal segment_ids < 0")
        if sorted(self.packing_order.tolist()) != list(range(n)):
            raise ValueError("PackedBatch.packing_order must be a permutation of the image indices")
        ends = self.seq_offset + self.run_lengths
        if n and int(ends.max()) > L:
            raise ValueError("PackedBatch.seq_offset: an image run overflows its sequence")
        for i, s, o, length in self.runs():
            if not bool((self.segment_ids[s, o : o + length] == i).all()):
                raise ValueError(f"PackedBatch.segment_ids: image {i} run at seq {s}[{o}:{o + length}] is not contiguous")
        counts = torch.bincount(self.segment_ids[~self.padding_mask], minlength=n)
        if not torch.equal(counts, self.run_lengths):
            raise ValueError("PackedBatch.num_kept: token counts per image do not match segment_ids")
        cu = torch.zeros(n + 1, dtype=torch.long)
        cu[1:] = torch.cumsum(self.run_lengths[self.packing_order], 0)
        if not torch.equal(self.cu_seqlens.long().cpu(), cu):
            raise ValueError("PackedBatch.cu_seqlens does not match run lengths in packing_order")
        self._validate_layout()

    def _validate_layout(self) -> None:
        """The host layout and the index tensors say what the per-token tensors say."""
        lay, cpu = self.layout, lambda t: t.detach().cpu()
        host = {
            "grids": [list(g) for g in lay.grids], "image_sizes": [list(s) for s in lay.image_sizes],
            "num_kept": list(lay.num_kept), "seq_index": list(lay.seq_index), "seq_offset": list(lay.seq_offset),
            "packing_order": list(lay.packing_order),
        }  # fmt: skip
        tensors = {"grids": self.grid_sizes, "image_sizes": self.image_sizes, "num_kept": self.num_kept, "seq_index": self.seq_index,
                   "seq_offset": self.seq_offset, "packing_order": self.packing_order}  # fmt: skip
        for name, value in host.items():
            if cpu(tensors[name]).tolist() != value:
                raise ValueError(f"PackedBatch.layout.{name} does not match the batch's tensors")
        if (lay.num_sequences, lay.seq_len, lay.patch_size, lay.num_prefix_tokens) != (
            self.num_sequences, self.seq_len, self.patch_size, self.num_prefix_tokens
        ):
            raise ValueError("PackedBatch.layout sizes (sequences, seq_len, patch_size, prefix) do not match the batch")
        seg, tok = cpu(self.segment_ids).reshape(-1), cpu(self.token_index).reshape(-1)
        slots = cpu(self.patch_slots)
        image = torch.repeat_interleave(torch.arange(lay.num_images), torch.tensor(lay.num_kept, dtype=torch.long))
        if not (torch.equal(seg[slots], image) and torch.equal(cpu(self.patch_image), image)):
            raise ValueError("PackedBatch.patch_slots / patch_image: not the kept patch tokens, image-major")
        cells = torch.tensor(lay.cell_offsets[:-1], dtype=torch.long)[image] + tok[slots]
        if not torch.equal(cpu(self.patch_cells), cells) or bool((tok[slots] < 0).any()):
            raise ValueError("PackedBatch.patch_cells does not match token_index")
        if not torch.equal(torch.tensor(lay.kept_cells, dtype=torch.long), tok[slots]):
            raise ValueError("PackedBatch.layout.kept_cells does not match token_index")
        if not torch.equal(cpu(self.valid_slots), (seg >= 0).nonzero().squeeze(1)):
            raise ValueError("PackedBatch.valid_slots is not the non-padding tokens in flattened order")
        start = torch.tensor(lay.seq_index, dtype=torch.long) * lay.seq_len + torch.tensor(lay.seq_offset, dtype=torch.long)
        if not torch.equal(cpu(self.prefix_slots), start[:, None] + torch.arange(lay.num_prefix_tokens)):
            raise ValueError("PackedBatch.prefix_slots does not match seq_index / seq_offset")
