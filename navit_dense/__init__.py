"""navit_dense: dense prediction with native-resolution (NaViT) Vision Transformers."""

from .data import PackedBatch, ResolutionSampler, TokenDrop, pack_images
from .models import NaViT, NaViTConfig, NaViTOutput, SimpleFeaturePyramid, build_backbone, list_models
from .models.heads.owl import OwlDetector, owl_detector_from_hf

__version__ = "0.1.0"

__all__ = [
    "NaViT",
    "NaViTConfig",
    "NaViTOutput",
    "OwlDetector",
    "PackedBatch",
    "ResolutionSampler",
    "SimpleFeaturePyramid",
    "TokenDrop",
    "build_backbone",
    "list_models",
    "owl_detector_from_hf",
    "pack_images",
]
