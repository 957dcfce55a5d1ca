"""detectron2 plug-in (optional extra; needs detectron2 installed per its own guide).

Importing this package registers ``build_navit_simple_fp_backbone`` in BACKBONE_REGISTRY and
``NativeResolutionRCNN`` in META_ARCH_REGISTRY. The navit_dense core never imports it.
"""

from .backbone import (
    CompatLVISEvaluator,
    NativeResolutionRCNN,
    NaViTSimpleFPBackbone,
    add_navit_config,
    build_navit_simple_fp_backbone,
    fed_loss_cls_weights,
    vit_lr_decay,
)

__all__ = [
    "CompatLVISEvaluator",
    "NaViTSimpleFPBackbone",
    "NativeResolutionRCNN",
    "add_navit_config",
    "build_navit_simple_fp_backbone",
    "fed_loss_cls_weights",
    "vit_lr_decay",
]
