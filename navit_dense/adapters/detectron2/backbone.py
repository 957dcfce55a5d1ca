"""NaViT + simple feature pyramid as a detectron2 ``Backbone``, and a Generalized R-CNN that
hands the backbone each image at its own (native) resolution instead of the padded batch.

How an image enters the backbone: detectron2's mapper has already resized it (e.g.
ResizeShortestEdge). It is then only zero-padded on the bottom/right to whole patches
(ceil(h/P) x ceil(w/P)) and packed with exactly that many tokens, never resampled. So patch (r, c)
covers pixels [P*r, P*(r+1)) x [P*c, P*(c+1)) and a stride-s map is top-left aligned with the
image, as detectron2's anchors and ROIAlign assume. Zero is also what ``ImageList`` pads with
(after normalization), so the extra pixels are the ones a padded-batch backbone would see.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.data.detection_utils import get_fed_loss_cls_weights
from detectron2.evaluation import LVISEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone, GeneralizedRCNN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage

from ...data.packing import pack_native
from ...models.navit import NaViT, build_backbone
from ...models.pyramid import SimpleFeaturePyramid
from ...models.unpack import maps_to_canvas


class NaViTSimpleFPBackbone(Backbone):
    """NaViT -> ViTDet simple feature pyramid (p2..p5, strides P/4..2P) -> optional top block
    (default: detectron2's ``LastLevelMaxPool``, p6 at stride 4P). For P=16: strides 4..64.

    ``forward`` takes either detectron2's usual padded [N, 3, H, W] batch (each image is then the
    whole padded frame) or a list of un-padded [3, h_i, w_i] images (native resolution, used by
    :class:`NativeResolutionRCNN`), and returns {name: [N, C, ceil(H/s), ceil(W/s)]} with each
    image's maps top-left aligned and zeros beyond them.

    Build ``net`` with ``global_pool="avg"`` and ``mask_fill="zeros"``: a detector uses neither the
    MAP pooling head nor the mask token, and parameters without gradients break DDP.
    """

    def __init__(
        self,
        net: NaViT,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: nn.Module | bool = True,
        square_pad: int = 0,
        seq_len: int = 0,
    ):
        """
        top_block: True for LastLevelMaxPool (p6), False for none, or a detectron2-style top block
            (attributes ``num_levels`` and ``in_feature``).
        square_pad: if > 0, detectron2 pads every batch to this square size (ImageList). The
            backbone cost does not grow with it: only each image's own patches are computed.
        seq_len: capacity of one packed sequence; 0 (or anything smaller than the largest image)
            means the largest image's token count, so no image is ever resized.
        """
        super().__init__()
        P = net.patch_size
        if P & (P - 1):
            # Pyramid strides are P/4 .. 2P; detectron2's ROIPooler and p<k> names need powers of two.
            raise ValueError(f"patch_size must be a power of two for detectron2, got {P}")
        self.net = net
        self.pyramid = SimpleFeaturePyramid(net.embed_dim, out_channels, in_stride=P, scales=scale_factors)
        strides = {name: spec.stride for name, spec in self.pyramid.output_shape().items()}
        self.top_block = LastLevelMaxPool() if top_block is True else (None if top_block in (False, None) else top_block)
        if self.top_block is not None:
            base = strides[self.top_block.in_feature]
            for k in range(1, self.top_block.num_levels + 1):
                strides[f"p{int(math.log2(base)) + k}"] = base * 2**k
        self._out_features = list(strides)
        self._out_feature_strides = strides
        self._out_feature_channels = {name: out_channels for name in strides}
        # Each image's maps span its patch-aligned extent (ceil(h/P)*P pixels) at every stride,
        # so the padded batch must be a multiple of both P and the coarsest stride.
        self._size_divisibility = math.lcm(P, max(strides.values()))
        self._square_pad = square_pad
        self.seq_len = seq_len

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def forward(
        self, x: torch.Tensor | Sequence[torch.Tensor], padded_size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """x: padded [N, 3, H, W] or a list of [3, h_i, w_i]. padded_size: (H, W) of the batch the
        maps are scattered into; default x's size, or the largest image rounded up to
        ``size_divisibility``."""
        images = list(x)
        if padded_size is None:
            d = self.size_divisibility
            padded_size = (
                tuple(x.shape[-2:])
                if torch.is_tensor(x)
                else (-(-max(im.shape[-2] for im in images) // d) * d, -(-max(im.shape[-1] for im in images) // d) * d)
            )
        P = self.net.patch_size
        batch = pack_native(images, P, self.seq_len, self.net.num_prefix_tokens)
        maps = self.net(batch.to(images[0].device)).feature_maps  # per image [D, h_i/P, w_i/P]

        H, W = padded_size
        too_big = [(h, w) for h, w in batch.layout.resized_sizes if h > H or w > W]
        if too_big:
            raise ValueError(f"an image ({too_big[0][0]}x{too_big[0][1]} after patch padding) does not fit the padded "
                             f"batch {H}x{W}: pad batches to a multiple of size_divisibility={self.size_divisibility}")  # fmt: skip
        out: dict[str, torch.Tensor] = {}
        for name, per_image in self.pyramid(maps).items():
            s = self._out_feature_strides[name]
            out[name] = maps_to_canvas(per_image, -(-H // s), -(-W // s))
        if self.top_block is not None:
            # On the padded map, LastLevelMaxPool (1x1, stride 2) keeps cells 0, 2, 4, ... of each
            # image's map and zeros elsewhere: the same as running it per image.
            top = self.top_block(out[self.top_block.in_feature])
            out.update(zip(self._out_features[-len(top) :], top))
        return out


@META_ARCH_REGISTRY.register()
class NativeResolutionRCNN(GeneralizedRCNN):
    """GeneralizedRCNN whose backbone sees each image at its own size.

    Preprocessing is unchanged (normalize, pad into an ``ImageList``, which records each image's
    true size). The backbone gets the un-padded images, cropped from the padded batch with
    ``image_sizes``, and returns maps padded back to the batch size, so RPN and ROI heads work
    unmodified. ``forward`` / ``inference`` follow GeneralizedRCNN's; only the backbone call differs.
    """

    def extract_features(self, images: ImageList) -> dict[str, torch.Tensor]:
        crops = [images.tensor[i, :, :h, :w] for i, (h, w) in enumerate(images.image_sizes)]
        return self.backbone(crops, padded_size=tuple(images.tensor.shape[-2:]))

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs] if "instances" in batched_inputs[0] else None
        features = self.extract_features(images)
        if self.proposal_generator is not None:
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        else:
            proposals, proposal_losses = [x["proposals"].to(self.device) for x in batched_inputs], {}
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses}

    def inference(self, batched_inputs: list[dict], detected_instances=None, do_postprocess: bool = True):
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.extract_features(images)
        if detected_instances is not None:
            results = self.roi_heads.forward_with_given_boxes(features, [x.to(self.device) for x in detected_instances])
        else:
            if self.proposal_generator is not None:
                proposals, _ = self.proposal_generator(images, features, None)
            else:
                proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            results, _ = self.roi_heads(images, features, proposals, None)
        if do_postprocess:
            # Rescales boxes and masks to each input's "height"/"width" (the original image).
            return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)
        return results


class CompatLVISEvaluator(LVISEvaluator):
    """detectron2's LVISEvaluator, runnable with lvis 0.5.3 on numpy >= 1.24.

    detectron2 imports ``LVISEval`` from the ``lvis`` package when it evaluates; for the duration
    of ``evaluate`` that name points at navit_dense's ``LVISEvalCompat`` (the unmodified
    accumulate code with ``np.float`` defined), and is restored afterwards.
    """

    def evaluate(self):
        import lvis

        from ...evaluation.lvis_compat import lvis_eval_class

        original = lvis.LVISEval
        lvis.LVISEval = lvis_eval_class()
        try:
            return super().evaluate()
        finally:
            lvis.LVISEval = original


def fed_loss_cls_weights(dataset_names: str | Sequence[str], freq_weight_power: float = 0.5):
    """The zero-argument callable FastRCNNOutputLayers(get_fed_loss_cls_weights=...) expects, as a
    LazyCall target, so dataset names can be an interpolation that follows config overrides."""
    names = dataset_names if isinstance(dataset_names, str) else list(dataset_names)
    return partial(get_fed_loss_cls_weights, names, freq_weight_power)


def vit_lr_decay(num_layers: int, lr_decay_rate: float):
    """ViTDet's layer-wise lr decay as a LazyCall target (so num_layers can follow the net depth);
    matches NaViT's parameter names (backbone.net.patch_embed / pos_embed / blocks.<i>)."""
    return partial(get_vit_lr_decay_rate, num_layers=num_layers, lr_decay_rate=lr_decay_rate)


# ---- yacs configs ----------------------------------------------------------------------------
def add_navit_config(cfg: CfgNode) -> None:
    """Add MODEL.NAVIT to a yacs config (call before merge_from_file)."""
    cfg.MODEL.NAVIT = CfgNode()
    cfg.MODEL.NAVIT.NAME = "navit_b16"
    # Any NaViTConfig field, e.g. `depth: 2`; new keys come from YAML files (merge_from_file),
    # not from merge_from_list, which yacs restricts to existing keys.
    cfg.MODEL.NAVIT.OVERRIDES = CfgNode(new_allowed=True)
    cfg.MODEL.NAVIT.OUT_CHANNELS = 256
    cfg.MODEL.NAVIT.SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)
    cfg.MODEL.NAVIT.SQUARE_PAD = 0
    cfg.MODEL.NAVIT.SEQ_LEN = 0


@BACKBONE_REGISTRY.register()
def build_navit_simple_fp_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> NaViTSimpleFPBackbone:
    c = cfg.MODEL.NAVIT
    if input_shape.channels != 3:
        raise ValueError(f"NaViT packs 3-channel images, got input_shape.channels={input_shape.channels}")
    net = build_backbone(c.NAME, **{"global_pool": "avg", "mask_fill": "zeros", **dict(c.OVERRIDES)})
    return NaViTSimpleFPBackbone(
        net, c.OUT_CHANNELS, tuple(c.SCALE_FACTORS), top_block=True, square_pad=c.SQUARE_PAD, seq_len=c.SEQ_LEN
    )
