"""LVIS v1 Mask R-CNN on a native-resolution NaViT-B/16 + simple feature pyramid (detectron2 LazyConfig).

The recipe follows ViTDet's LVIS Mask R-CNN (projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_b_100ep.py:
LN heads, 4conv1fc box head, 2-conv RPN head, sigmoid CE + federated loss, repeat-factor
sampling at 0.001, 300 detections per image at score >= 0.02) with two changes:
- backbone: NaViTSimpleFPBackbone (p2..p6, strides 4..64) and NativeResolutionRCNN, which runs
  the ViT on each image at its own size instead of on the padded batch;
- data: multi-scale ResizeShortestEdge instead of LSJ's 1024x1024 square crops: with native
  resolution there is nothing to gain from making every image the same square.

Train (needs detectron2 installed; run from the repository root so `navit_dense` imports):
    python <detectron2>/tools/lazyconfig_train_net.py --config-file configs/detectron2/mask_rcnn_navit_lvis.py

Tiny CPU smoke variant: append these overrides (plus dataset names if not using lvis_v1_*):
    model.backbone.net.model.depth=2 model.backbone.net.model.embed_dim=64 model.backbone.net.model.num_heads=2
    model.backbone.out_channels=32 model.roi_heads.box_head.conv_dims=[32] model.roi_heads.box_head.fc_dims=[64]
    model.roi_heads.mask_head.conv_dims=[32] model.roi_heads.batch_size_per_image=64
    model.proposal_generator.batch_size_per_image=64 model.proposal_generator.pre_nms_topk=[200,100]
    model.proposal_generator.post_nms_topk=[100,50]
    dataloader.train.mapper.augmentations.0.short_edge_length=[96,128] dataloader.train.mapper.augmentations.0.max_size=200
    dataloader.test.mapper.augmentations.0.short_edge_length=112 dataloader.test.mapper.augmentations.0.max_size=224
    dataloader.train.total_batch_size=2 dataloader.train.num_workers=0 dataloader.test.num_workers=0 train.device=cpu
(for a dataset with K classes also: model.roi_heads.num_classes=K model.roi_heads.box_predictor.fed_loss_num_classes=<=K)
"""

from fvcore.common.param_scheduler import MultiStepParamScheduler

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler

from navit_dense.adapters.detectron2 import (
    CompatLVISEvaluator,
    NativeResolutionRCNN,
    NaViTSimpleFPBackbone,
    fed_loss_cls_weights,
    vit_lr_decay,
)
from navit_dense.models.navit import build_backbone
from navit_dense.models.pretrained import with_pretrained

# ---- model -------------------------------------------------------------------------------------
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model  # RGB, LN heads, 4conv1fc
model._target_ = NativeResolutionRCNN
model.backbone = L(NaViTSimpleFPBackbone)(
    net=L(with_pretrained)(
        model=L(build_backbone)(
            name="navit_b16",
            depth=12,  # explicit so the layer-wise lr decay below can follow it
            drop_path_rate=0.1,
            global_pool="avg",  # no MAP head: a detector would leave its parameters without gradients
            mask_fill="zeros",  # no mask token: nothing is dropped at detection time
        ),
        # Weights to start from (timm ViT / SigLIP2 / NaViT file, see navit_dense.models.pretrained);
        # the architecture above must fit them, e.g. for timm's vit_base_patch16_224:
        # class_token=True, pos_embed="learned2d", pos_embed_grid=14. "" = random init.
        path="",
    ),
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=True,  # LastLevelMaxPool: p6 at stride 64
    square_pad=0,
    seq_len=0,  # 0: one packed sequence holds the largest image of the batch
)
# Heads follow the backbone width (so one override resizes everything).
model.proposal_generator.head.in_channels = "${...backbone.out_channels}"
model.roi_heads.box_head.input_shape = L(ShapeSpec)(channels="${....backbone.out_channels}", height=7, width=7)
model.roi_heads.mask_head.input_shape = L(ShapeSpec)(channels="${....backbone.out_channels}", height=14, width=14)
# The predictor reads the (single, 4conv1fc) fc layer of the box head.
model.roi_heads.box_predictor.input_shape = L(ShapeSpec)(channels="${...box_head.fc_dims.0}")

# LVIS v1 (as ViTDet's LVIS configs)
model.roi_heads.num_classes = 1203
model.roi_heads.box_predictor.test_score_thresh = 0.02
model.roi_heads.box_predictor.test_topk_per_image = 300
model.roi_heads.box_predictor.use_sigmoid_ce = True
model.roi_heads.box_predictor.use_fed_loss = True  # federated loss; set False for plain sigmoid CE
model.roi_heads.box_predictor.get_fed_loss_cls_weights = L(fed_loss_cls_weights)(
    dataset_names="${dataloader.train.dataset.names}", freq_weight_power=0.5
)

# ---- data --------------------------------------------------------------------------------------
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "lvis_v1_train"
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows it
dataloader.train.total_batch_size = 64
dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
    repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
        dataset_dicts="${dataloader.train.dataset}", repeat_thresh=0.001
    )
)
dataloader.test.dataset.names = "lvis_v1_val"
dataloader.evaluator = L(CompatLVISEvaluator)(dataset_name="${..test.dataset.names}", max_dets_per_image=300)

# ---- schedule / optimizer (ViTDet LVIS, 100 epochs at batch 64) ---------------------------------
train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = ""  # a detectron2 checkpoint of this model (backbone-only weights: model.backbone.net.path)
train.max_iter = 156250
train.eval_period = 30000

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[138889, 150463], num_updates=train.max_iter
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 2e-4
# ViTDet's layer-wise lr decay over backbone.net.blocks.<i>.
optimizer.params.lr_factor_func = L(vit_lr_decay)(num_layers="${model.backbone.net.model.depth}", lr_decay_rate=0.7)
# No weight decay on positional tables and learned tokens (module parameter names in NaViT).
optimizer.params.overrides = {
    name: {"weight_decay": 0.0} for name in ("row", "col", "prefix_tokens", "prefix_pos", "mask_token")
}
