"""UPerNet (+ FCN auxiliary head) on a tiny native-resolution NaViT, mmsegmentation 1.x config,
trained with mmseg's own runner (mmengine Runner) on the synthetic ADE20K-format dataset.

Data (8 classes; file value 0 = unlabelled -> ignored by reduce_zero_label; about 6 s):
    python tools/make_synthetic_seg.py --out runs/synth_seg --train 240 --val 40
Train on a CPU (a few minutes), from the repository root:
    python -c "from mmengine import Config; from mmengine.runner import Runner; \
Runner.from_cfg(Config.fromfile('configs/mmseg/upernet_navit_tiny_synthetic.py')).train()"
or with mmseg's training script: python <mmseg>/.mim/tools/train.py configs/mmseg/upernet_navit_tiny_synthetic.py

No crop: images keep their aspect ratio and size (RandomResize keep_ratio); a batch is padded
to a multiple of 32 and NativeResolutionEncoderDecoder runs the backbone on each image's own
pixels only (see navit_dense/adapters/mmseg/backbone.py).
"""

custom_imports = dict(imports=["navit_dense.adapters.mmseg"], allow_failed_imports=False)
default_scope = "mmseg"

data_root = "runs/synth_seg"
# tools/make_synthetic_seg.py CLASSES / PALETTE (reduced ids 0..7)
classes = ("sky", "grass", "brick", "water", "sand", "wood", "metal", "foliage")
palette = [[135, 206, 235], [60, 179, 60], [178, 34, 34], [30, 90, 200], [238, 214, 150], [139, 90, 43], [160, 160, 170], [20, 100, 40]]
num_classes = 8
scale = (256, 256)  # longer side ~256 (keep_ratio fits the image into scale)
max_iters = 300
val_interval = 150

# ---- model ---------------------------------------------------------------------------------
norm_cfg = dict(type="BN", requires_grad=True)  # heads only (SyncBN on multi-GPU); the backbone uses LayerNorm
embed_dim = 128
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size_divisor=32,  # = backbone.size_divisor (2 x patch): pyramid cells align with pixels
    test_cfg=dict(size_divisor=32),
)
model = dict(
    type="NativeResolutionEncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="NaViTMMSegBackbone",
        arch="navit_ti16",
        depth=4,
        embed_dim=embed_dim,
        num_heads=4,
        out_indices=(0, 1, 2, 3),  # one block per level (mmseg's ViT-UPerNet taps 2, 5, 8, 11 of 12)
        scale_factors=(4.0, 2.0, 1.0, 0.5),  # strides 4, 8, 16, 32
        drop_path_rate=0.0,
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[embed_dim // 4, embed_dim // 2, embed_dim, embed_dim],  # backbone.out_channels
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=64,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=embed_dim,
        in_index=2,  # stride 16
        channels=64,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)

# ---- data ------------------------------------------------------------------------------------
dataset_type = "BaseSegDataset"  # ADE20KDataset would impose its 150 classes
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=scale, ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=scale, keep_ratio=True),
    dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: metrics use the original label
    dict(type="PackSegInputs"),
]


def _dataset(split, pipeline):
    return dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
        img_suffix=".jpg",
        seg_map_suffix=".png",
        reduce_zero_label=True,
        pipeline=pipeline,
    )


train_dataloader = dict(
    batch_size=4,  # >= 2: the PPM's 1x1 pooled BatchNorm needs more than one value per channel
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=_dataset("training", train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=_dataset("validation", test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

# ---- schedule --------------------------------------------------------------------------------
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={"pos_embed": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=30),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=30, end=max_iters),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

# ---- runtime ---------------------------------------------------------------------------------
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=25, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=val_interval),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0), dist_cfg=dict(backend="gloo"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
work_dir = "runs/mmseg/upernet_navit_tiny_synthetic"
