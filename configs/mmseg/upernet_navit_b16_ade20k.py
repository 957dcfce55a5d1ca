"""UPerNet (+ FCN auxiliary head) on a native-resolution NaViT-B/16, ADE20K (150 classes),
mmsegmentation 1.x. Dataset, runtime and 160k schedule come from mmseg's own base configs
(mmseg::_base_/...: ADE20KDataset with reduce_zero_label, RandomResize to (2048, 512) x
[0.5, 2] + 512x512 RandomCrop + flip + PhotoMetricDistortion, IoUMetric); optimizer and
warm-up follow mmseg's ViT-B UPerNet recipe (vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512):
8 GPUs x 2 images, AdamW 6e-5, no decay on position embeddings / norms.

Differences from that recipe: NaViT + NativeResolutionEncoderDecoder (each image runs at its
own size; in whole-image testing an ADE20K image resized to short side 512 is not squeezed into
512x512), and the pyramid comes from per-image resampling of blocks 3, 5, 7, 11
(see navit_dense/adapters/mmseg/backbone.py) instead of MultiLevelNeck.

Pretrained weights: the timm ViT-B/16 file itself (the overrides below match timm's layout;
navit_dense.models.pretrained converts it when the backbone is initialised), e.g.
    huggingface-cli download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k model.safetensors
        --local-dir pretrain/vit_base_patch16_224.augreg2_in21k_ft_in1k   (one command)
Train (data under data/ade/ADEChallengeData2016, as mmseg expects):
    bash <mmseg>/.mim/tools/dist_train.sh configs/mmseg/upernet_navit_b16_ade20k.py 8
"""

_base_ = [
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
custom_imports = dict(imports=["navit_dense.adapters.mmseg"], allow_failed_imports=False)

crop_size = (512, 512)
num_classes = 150
norm_cfg = dict(type="SyncBN", requires_grad=True)  # heads only; the backbone uses LayerNorm
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,  # training batches: 512x512 crops (smaller images are padded, not computed)
    test_cfg=dict(size_divisor=32),  # whole-image testing at native aspect: pad to 2 x patch only
)
model = dict(
    type="NativeResolutionEncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type="NaViTMMSegBackbone",
        arch="navit_b16",
        out_indices=(3, 5, 7, 11),
        scale_factors=(4.0, 2.0, 1.0, 0.5),  # strides 4, 8, 16, 32; channels 192, 384, 768, 768
        drop_path_rate=0.1,
        # timm ViT-B/16 layout (class token, learned 14x14 position table, resized per image)
        class_token=True,
        pos_embed="learned2d",
        pos_embed_grid=14,
        pretrained="pretrain/vit_base_patch16_224.augreg2_in21k_ft_in1k/model.safetensors",
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[192, 384, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=2,
        channels=256,
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

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            "pos_embed": dict(decay_mult=0.0),
            "prefix_tokens": dict(decay_mult=0.0),
            "prefix_pos": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
        }
    ),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)  # x 8 GPUs
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
