"""The packed batch: the single contract by which images enter the backbone.

Shapes use S = number of packed sequences, L = sequence length, N = number of images,
P = patch size, C = image channels (3).

Layout rules (relied upon by every attention kernel and by unpacking):
- each image occupies ONE contiguous run of a sequence: ``num_prefix_tokens`` prefix slots
  (e.g. a class token, filled in by the model) followed by its kept patch tokens in
  row-major order;
- padding only appears at the end of a sequence;
- so the non-padding tokens, read in flattened ``[S * L]`` order, are a concatenation of the
  image runs in ``packing_order``, delimited by ``cu_seqlens`` (the varlen / flash layout).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PackedBatch:
    patches: torch.Tensor  # float [S, L, C*P*P], (c, py, px) order = nn.Conv2d weight order; 0 at padding
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
    patch_size: int
    num_prefix_tokens: int = 0

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
        total = self.padding_mask.numel()
        return float(self.padding_mask.sum()) / total if total else 0.0

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
        return int(self.run_lengths.max()) if self.num_images else 0

    def kept_indices(self, i: int) -> torch.Tensor:
        """long [num_kept_i]: flattened grid indices of image i's kept tokens, in packed order."""
        s, o, n = int(self.seq_index[i]), int(self.seq_offset[i]), int(self.run_lengths[i])
        return self.token_index[s, o + self.num_prefix_tokens : o + n]

    def runs(self) -> list[tuple[int, int, int, int]]:
        """(image, sequence, start, length) for every image run, in flattened order (cached)."""
        cached = getattr(self, "_runs_cache", None)
        if cached is None:
            order = self.packing_order.tolist()
            seq, off, length = self.seq_index.tolist(), self.seq_offset.tolist(), self.run_lengths.tolist()
            cached = [(i, seq[i], off[i], length[i]) for i in order]
            object.__setattr__(self, "_runs_cache", cached)
        return cached

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
