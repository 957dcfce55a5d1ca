"""Data side: decode, resize to a token budget, patchify, pack."""

from .packed_batch import PackedBatch
from .packing import PACKING_ALGORITHMS, pack_images, pack_lengths, pack_native
from .patchify import patchify, unpatchify
from .resize import budget_grid, resize_to_grid
from .resolution import ResolutionSampler
from .token_drop import TokenDrop

__all__ = [
    "PACKING_ALGORITHMS",
    "PackedBatch",
    "ResolutionSampler",
    "TokenDrop",
    "budget_grid",
    "pack_images",
    "pack_lengths",
    "pack_native",
    "patchify",
    "resize_to_grid",
    "unpatchify",
]
