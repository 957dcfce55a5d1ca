"""NaViT as an mmsegmentation backbone, and an EncoderDecoder that runs it on each image's own
pixels instead of the padded batch.

The problem: mmseg's ``SegDataPreProcessor`` stacks a batch into one padded [N, 3, H, W]
tensor (bottom/right padding with 0 after normalization, to ``size`` or ``size_divisor``).
A plain ViT backbone would then compute every padded pixel, for every image. NaViT does not
need a common size, so:

1. :class:`NativeResolutionEncoderDecoder` (a drop-in ``EncoderDecoder``) crops each image out
   of the padded batch using its ``img_shape`` (the un-padded size mmseg records in every
   ``SegDataSample``) and hands the crops to the backbone, with the batch size.
2. :class:`NaViTMMSegBackbone` zero-pads each crop on the bottom/right to whole patches only
   (ceil(h/P) x ceil(w/P)), packs all crops with ``pack_native`` at exactly that many tokens
   (no resampling: patch (r, c) covers pixels [P*r, P*(r+1)) x [P*c, P*(c+1))), runs NaViT
   once on the packed sequences (attention stays within each image), resamples every image's
   maps on its own grid, and scatters them top-left into zero canvases, one per level.
3. The canvases cover the batch rounded up to ``size_divisor`` (2P with the default stride-2P
   level), so cell (i, j) of the stride-s level is exactly pixels [s*i, s*(i+1)) and mmseg's
   heads (UPerHead, FCNHead, ...) work unmodified. When the batch is not already a multiple of
   ``size_divisor`` the segmentor pads the labels (with the ignore index) in training and
   crops the logits in inference, so no head ever sees a stretched map.

Pyramid (4 levels, strides P/4, P/2, P, 2P = 4/8/16/32 for P=16, channels D/4, D/2, D, D):
level k is block ``out_indices[k]``'s output (NaViT's final LayerNorm applied to every tapped
block) resampled by ``scale_factors[k]`` on each image's own grid with ViTDet's stages
(4x: ConvT, LN, GELU, ConvT; 2x: ConvT; 1x: identity; 0.5x: 2x2 max-pool). Multi-level by
default, like mmseg's ViT/MAE/BEiT UPerNet recipes (blocks 3, 5, 7, 11 of 12), because
UPerHead fuses levels that should carry different depths of features; with a single
``out_indices`` entry every level reads that one block (ViTDet's simple pyramid from the last
layer). All stages use LayerNorm, not BatchNorm, so an image's features do not depend on the
other images of its batch.

Cost: the ViT runs on sum_i ceil(h_i/P) * ceil(w_i/P) tokens, not N * H * W / P^2; only the
(cheap) decode heads see the padded canvas. Slide inference works too (mmseg sets
``img_shape`` to the window, at test batch size 1): each window is packed the same way.
"""

from __future__ import annotations

from os import PathLike
from typing import Mapping, Sequence

import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.models.segmentors import EncoderDecoder
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from ...data.packing import pack_native
from ...models.navit import build_backbone
from ...models.pretrained import load_pretrained
from ...models.pyramid import SimpleFeaturePyramid
from ...models.unpack import maps_to_canvas

# load_pretrained's options besides the path (those of model.backbone.init, and patch_layout). What
# the dense backbone (global_pool="none", mask_fill="zeros") has no place for (pooling, classifier,
# mask token) is skipped and reported by load_pretrained.
_PRETRAINED_OPTIONS = ("format", "prefix", "patch_layout")


@MODELS.register_module()
class NaViTMMSegBackbone(BaseModule):
    """NaViT + per-image feature pyramid; returns a tuple of [N, C_k, H_c / s_k, W_c / s_k].

    Args:
        arch: a named NaViT (navit_ti16, navit_s16, navit_b16, navit_l16).
        out_indices: block index per level (negative counts from the end), or one index for
            all levels (ViTDet simple pyramid).
        scale_factors: resampling of each level relative to stride P; any of 4, 2, 1, 0.5
            (default: all four, strides P/4 .. 2P, what UPerHead expects).
        seq_len: capacity of one packed sequence; 0 (or anything smaller than the largest
            image) means the largest image's token count, so no image is ever resized.
        pretrained: weights file or directory (a timm ViT, Eva (DINOv3, EVA02, RoPE-ViT, PE) or
            NaFlexVit file, a HF SigLIP2 checkpoint, or a NaViT state dict), loaded in
            ``init_weights`` (so mmengine's Runner loads it once, before training) by the loader of
            ``model.backbone.init`` (navit_dense.models.pretrained.load_pretrained). A path, or
            ``dict(path=..., format=..., prefix=..., patch_layout=...)`` with that function's
            options. It must fit the architecture given here (e.g. class_token / pos_embed /
            pos_embed_grid for timm ViTs, rope options for RoPE models).
        **net_overrides: any NaViTConfig field (depth, embed_dim, drop_path_rate, pos_embed, ...).
            Defaults here: global_pool="none", mask_fill="zeros" (a dense backbone uses neither
            a pooled vector nor the mask token; parameters without gradients break DDP).
    """

    def __init__(
        self,
        arch: str = "navit_b16",
        out_indices: Sequence[int] = (3, 5, 7, 11),
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        seq_len: int = 0,
        pretrained: str | dict | None = None,
        init_cfg: dict | None = None,
        **net_overrides,
    ):
        super().__init__(init_cfg=init_cfg)
        out_indices = tuple(int(i) for i in out_indices)
        scale_factors = tuple(float(s) for s in scale_factors)
        if len(out_indices) not in (1, len(scale_factors)):
            raise ValueError(f"out_indices {out_indices} must have one entry or one per scale factor {scale_factors}")
        if not set(scale_factors) <= {4.0, 2.0, 1.0, 0.5}:
            raise ValueError(f"scale_factors must be taken from 4, 2, 1, 0.5, got {scale_factors}")
        self.net = build_backbone(arch, **{"global_pool": "none", "mask_fill": "zeros", **net_overrides, "out_indices": out_indices})
        P = self.patch_size = self.net.patch_size
        if P % 4:
            raise ValueError(f"patch_size must be a multiple of 4 (strides P/4 .. 2P), got {P}")
        depth = self.net.cfg.depth
        self.layers = tuple(i % depth for i in (out_indices * len(scale_factors) if len(out_indices) == 1 else out_indices))
        self.scale_factors = scale_factors
        self.strides = tuple(P / s for s in scale_factors)
        # Canvas granularity: one cell of the coarsest level = size_divisor pixels.
        self.size_divisor = int(P / min(scale_factors))
        self.cells_per_block = tuple(int(self.size_divisor * s / P) for s in scale_factors)
        # The same pyramid as the detectron2 plug-in, without projections: UPerHead takes the
        # stage channels (D/4, D/2, D, D), one backbone block per level.
        self.pyramid = SimpleFeaturePyramid(self.net.embed_dim, None, in_stride=P, scales=scale_factors)
        self.out_channels = [spec.channels for spec in self.pyramid.output_shape().values()]
        self.register_load_state_dict_pre_hook(_rename_levels)
        self.seq_len = seq_len
        self.pretrained = pretrained
        self._pretrained_args()  # a misspelt option fails when the model is built, not at init_weights

    def _pretrained_args(self) -> dict:
        """load_pretrained keyword arguments from ``pretrained`` ({} when there is none)."""
        spec = self.pretrained
        if not spec:
            return {}
        if isinstance(spec, (str, PathLike)):
            return {"path": spec}
        if not isinstance(spec, Mapping) or not spec.get("path"):
            raise ValueError(f"NaViTMMSegBackbone pretrained={spec!r}: expected a path or dict(path=..., [{', '.join(_PRETRAINED_OPTIONS)}])")
        unknown = sorted(set(spec) - {"path", *_PRETRAINED_OPTIONS})
        if unknown:
            raise ValueError(f"NaViTMMSegBackbone pretrained: unknown option(s) {unknown}; valid: path, {', '.join(_PRETRAINED_OPTIONS)}")
        return dict(spec)

    def init_weights(self) -> None:
        super().init_weights()
        args = self._pretrained_args()
        if args:
            report = load_pretrained(self.net, **args)
            print_log(f"NaViTMMSegBackbone: {report['loaded']} tensors from {report['path']} ({report['format']}); "
                      f"skipped {report['skipped_source_keys'] or 'none'}", logger="current")  # fmt: skip

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        """(H_c, W_c): the pixel extent the output maps cover for a batch of height x width."""
        d = self.size_divisor
        return -(-height // d) * d, -(-width // d) * d

    def forward(self, x: Tensor | Sequence[Tensor], padded_size: tuple[int, int] | None = None) -> tuple[Tensor, ...]:
        """x: padded [N, 3, H, W] (each image is then the whole frame) or a list of un-padded
        [3, h_i, w_i] images (:class:`NativeResolutionEncoderDecoder` passes these).
        padded_size: (H, W) of the batch; default x's size or the largest image.
        Returns one [N, C_k, H_c / s_k, W_c / s_k] tensor per level, (H_c, W_c) = canvas_size(H, W);
        image i's maps sit top-left, zeros beyond its patch-padded extent."""
        images = list(x)
        if padded_size is None:
            padded_size = (max(im.shape[-2] for im in images), max(im.shape[-1] for im in images))
        P = self.patch_size
        batch = pack_native(images, P, self.seq_len, self.net.num_prefix_tokens)
        sizes = batch.layout.resized_sizes  # patch-padded (h, w) per image
        maps = self.net(batch.to(images[0].device)).intermediates  # layer -> per image [D, h_i/P, w_i/P]

        Hc, Wc = self.canvas_size(*padded_size)
        if any(h > Hc or w > Wc for h, w in sizes):
            raise ValueError(f"an image ({sizes}) is larger than the padded batch {tuple(padded_size)}")
        d = self.size_divisor
        levels = self.pyramid([maps[layer] for layer in self.layers]).values()  # each image on its own grid
        return tuple(maps_to_canvas(per_image, Hc // d * cells, Wc // d * cells) for per_image, cells in zip(levels, self.cells_per_block))


def _rename_levels(module, state_dict, prefix, *args) -> None:
    """Checkpoints saved before the shared pyramid named its stages ``levels.k``."""
    old = prefix + "levels."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "pyramid.stages." + key[len(old):]] = state_dict.pop(key)


@MODELS.register_module()
class NativeResolutionEncoderDecoder(EncoderDecoder):
    """EncoderDecoder whose backbone sees each image at its own size (see the module docstring).

    Data preprocessing, heads, losses, whole / slide inference and post-processing are
    mmseg's; only what reaches the backbone differs: image i of the padded batch is cropped to
    ``data_samples[i].metainfo["img_shape"]`` (clipped to the batch). Without metainfo (e.g.
    ``model(inputs, mode="tensor")``) each image is the whole padded frame, as in EncoderDecoder.
    """

    def extract_feat(self, inputs: Tensor, batch_img_metas: list[dict] | None = None) -> list[Tensor]:
        H, W = inputs.shape[-2:]
        if batch_img_metas is None:
            crops = list(inputs)
        else:
            shapes = [(min(int(m["img_shape"][0]), H), min(int(m["img_shape"][1]), W)) for m in batch_img_metas]
            crops = [inputs[i, :, :h, :w] for i, (h, w) in enumerate(shapes)]
        x = self.backbone(crops, padded_size=(H, W))
        return self.neck(x) if self.with_neck else x

    def _canvas(self, inputs: Tensor) -> tuple[int, int]:
        return self.backbone.canvas_size(*inputs.shape[-2:])

    def loss(self, inputs: Tensor, data_samples: list) -> dict:
        x = self.extract_feat(inputs, [s.metainfo for s in data_samples])
        # The maps cover the canvas (batch rounded up to size_divisor): pad the labels to it with
        # the ignore index, as SegDataPreProcessor(size_divisor=...) would, so the heads' resize
        # of logits to the label size is exact.
        Hc, Wc = self._canvas(inputs)
        for s in data_samples:
            seg = s.gt_sem_seg.data
            if tuple(seg.shape[-2:]) != (Hc, Wc):
                del s.gt_sem_seg.data  # PixelData refuses a new size otherwise (mmseg's stack_batch does the same)
                s.gt_sem_seg.data = F.pad(seg, (0, Wc - seg.shape[-1], 0, Hc - seg.shape[-2]), value=self.decode_head.ignore_index)
        losses = dict(self._decode_head_forward_train(x, data_samples))
        if self.with_auxiliary_head:
            losses.update(self._auxiliary_head_forward_train(x, data_samples))
        return losses

    def encode_decode(self, inputs: Tensor, batch_img_metas: list[dict]) -> Tensor:
        x = self.extract_feat(inputs, batch_img_metas)
        (Hc, Wc), (H, W) = self._canvas(inputs), tuple(inputs.shape[-2:])
        if (Hc, Wc) == (H, W):
            return self.decode_head.predict(x, batch_img_metas, self.test_cfg)
        # Logits cover the canvas: bring them to canvas pixels, drop the part beyond the batch,
        # then mmseg's own resize to img_shape / pad_shape (now the identity).
        logits = resize(self.decode_head.forward(x), size=(Hc, Wc), mode="bilinear", align_corners=self.align_corners)
        return self.decode_head.predict_by_feat(logits[..., :H, :W], batch_img_metas)

