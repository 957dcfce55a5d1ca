"""Models: backbone, positional embeddings, attention kernels, unpacking, pyramid, heads."""

from .attention import KERNELS, AttentionContext, dense_block_mask, packed_attention
from .navit import MODEL_CONFIGS, NaViT, NaViTConfig, NaViTOutput, build_backbone, list_models
from .pyramid import LevelSpec, SimpleFeaturePyramid
from .unpack import maps_to_canvas, maps_to_padded, unpack_prefix, unpack_to_maps

__all__ = [
    "KERNELS",
    "LevelSpec",
    "MODEL_CONFIGS",
    "AttentionContext",
    "NaViT",
    "NaViTConfig",
    "NaViTOutput",
    "SimpleFeaturePyramid",
    "build_backbone",
    "dense_block_mask",
    "list_models",
    "maps_to_canvas",
    "maps_to_padded",
    "packed_attention",
    "unpack_prefix",
    "unpack_to_maps",
]
