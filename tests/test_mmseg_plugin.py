"""mmsegmentation plug-in: registry + configs, native-resolution features of a padded batch,
mmengine Runner training / IoUMetric validation, mmseg.apis whole-image inference.

Runs against the real mmsegmentation 1.2.2 / mmengine / full mmcv (required, see tools/install_mmseg.sh).
"""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, timm_weight_file
import torch
from mmengine import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from mmseg.apis import inference_model, init_model
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from navit_dense.adapters.mmseg import NativeResolutionEncoderDecoder, NaViTMMSegBackbone, trusted_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SYNTH_CONFIG = ROOT / "configs" / "mmseg" / "upernet_navit_tiny_synthetic.py"
ADE_CONFIG = ROOT / "configs" / "mmseg" / "upernet_navit_b16_ade20k.py"
TINY = dict(arch="navit_ti16", depth=2, embed_dim=64, num_heads=2)


@pytest.fixture(autouse=True, scope="module")
def mmseg_scope():
    init_default_scope("mmseg")
    yield


def tiny_config(data_root: Path | None = None, work_dir: Path | None = None) -> Config:
    """The synthetic config shrunk for tests (2-block backbone, small heads)."""
    cfg = Config.fromfile(SYNTH_CONFIG)
    cfg.model.backbone.update(depth=2, embed_dim=64, num_heads=2, out_indices=(0, 0, 1, 1))
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 64], channels=32)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    if data_root is not None:
        for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[name].dataset.data_root = str(data_root)
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    return cfg


# ---- registry and configs ------------------------------------------------------------------
def test_registered_and_built_from_configs():
    assert MODELS.get("NaViTMMSegBackbone") is NaViTMMSegBackbone
    assert MODELS.get("NativeResolutionEncoderDecoder") is NativeResolutionEncoderDecoder
    for path in (SYNTH_CONFIG, ADE_CONFIG):
        cfg = Config.fromfile(path)
        if path == ADE_CONFIG:
            assert cfg.train_dataloader.dataset.type == "ADE20KDataset" and cfg.model.decode_head.num_classes == 150
            assert cfg.train_dataloader.dataset.pipeline[1].reduce_zero_label
            cfg.model.backbone.pretrained = None  # weights are the user's to provide
        model = MODELS.build(cfg.model)
        assert isinstance(model, NativeResolutionEncoderDecoder) and isinstance(model.backbone, NaViTMMSegBackbone)
        assert model.backbone.out_channels == list(cfg.model.decode_head.in_channels)
        assert model.backbone.strides == (4.0, 8.0, 16.0, 32.0) and model.backbone.size_divisor == 32
        assert cfg.model.test_cfg.mode == "whole"


def test_pretrained_timm_vit_weights_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    from navit_dense.models.weight_import import navit_from_timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    converted, raw = tmp_path / "navit_from_timm.pth", tmp_path / "timm_vit.safetensors"
    torch.save(navit_from_timm(vit).state_dict(), converted)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, raw)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = vit.forward_intermediates(x, indices=[1], norm=True, output_fmt="NCHW", intermediates_only=True)[0]
    for path in (converted, raw):  # a converted NaViT state dict, and the timm file itself
        # The ADE20K config's backbone overrides (timm layout), at tiny size.
        backbone = NaViTMMSegBackbone(
            arch="navit_ti16", depth=2, out_indices=(1,), scale_factors=(1.0,),
            class_token=True, pos_embed="learned2d", pos_embed_grid=14, pretrained=str(path),
        )  # fmt: skip
        backbone.init_weights()
        with torch.no_grad():
            (ours,) = backbone.eval()(x)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, kwargs", [("vit_small_patch16_dinov3", dict(depth=2)),
                                          ("naflexvit_base_patch16_gap", dict(depth=2, embed_dim=96, num_heads=4))])  # fmt: skip
def test_pretrained_dinov3_and_naflexvit_files_load_like_model_backbone_init(name, kwargs, tmp_path):
    """``pretrained=`` uses model.backbone.init's loader: a timm DINOv3 file (Eva names, RoPE, storage
    tokens, LayerScale) and a NaFlexVit file (embeds.* names, a Linear over channels-last patches;
    given as a dict with load_pretrained's options) fill the backbone with the weights a
    load_pretrained NaViT gets, and its stride-16 level is timm's patch features (a non-square image)."""
    from navit_dense.models import build_backbone
    from navit_dense.models.pretrained import _ARCH_FIELDS, load_pretrained
    from navit_dense.models.weight_import import navit_from_timm

    vit, path = timm_weight_file(name, kwargs, tmp_path)
    layout = {f: getattr(navit_from_timm(vit).cfg, f) for f in _ARCH_FIELDS}  # the config a user writes for this file
    naflex = name.startswith("naflex")
    pretrained = dict(path=str(path), format="timm", patch_layout="channels_last") if naflex else str(path)
    backbone = NaViTMMSegBackbone(arch="navit_s16", out_indices=(1,), scale_factors=(1.0,), pretrained=pretrained, **layout)
    backbone.init_weights()

    reference = build_backbone("navit_s16", global_pool="none", mask_fill="zeros", **layout)
    load_pretrained(reference, path)  # what model.backbone.init does
    ours = backbone.net.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ours.items())

    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        (level,) = backbone.eval()(x)  # [1, D, 10, 14]
        ref = vit.forward_features(x)
        ref = ref["patches"] if isinstance(ref, dict) else ref
    ref = ref[0, vit.num_prefix_tokens :].T.reshape(-1, 10, 14)
    torch.testing.assert_close(level[0], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layout'\]"):
        NaViTMMSegBackbone(arch="navit_s16", pretrained=dict(path=str(path), layout="channels_last"), **layout)


# ---- native resolution inside a padded batch ------------------------------------------------
def test_padded_batch_levels_equal_single_image_runs_and_are_zero_outside():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config().model).eval()
    sizes = [(70, 100), (130, 50)]  # not patch multiples, different aspect ratios
    images = [torch.randn(3, h, w) for h, w in sizes]
    padded = torch.randn(2, 3, 160, 128) * 100  # garbage padding: must never be read
    for i, (h, w) in enumerate(sizes):
        padded[i, :, :h, :w] = images[i]
    metas = [dict(img_shape=s) for s in sizes]
    with torch.no_grad():
        levels = model.extract_feat(padded, metas)
        alone = [model.backbone(im[None]) for im in images]
    assert len(levels) == 4
    for k, (level, stride) in enumerate(zip(levels, model.backbone.strides)):
        assert tuple(level.shape[-2:]) == (160 // stride, 128 // stride)
        for i, (h, w) in enumerate(sizes):
            # extent of image i's map: its patch grid, resampled (max-pool rounds up)
            eh = math.ceil(math.ceil(h / 16) * 16 / stride)
            ew = math.ceil(math.ceil(w / 16) * 16 / stride)
            torch.testing.assert_close(level[i, :, :eh, :ew], alone[i][k][0, :, :eh, :ew], atol=1e-5, rtol=1e-5)
            outside = torch.ones(level.shape[-2:], dtype=torch.bool)
            outside[:eh, :ew] = False
            assert bool((level[i][:, outside] == 0).all())
            assert bool((alone[i][k][0][:, outside[: alone[i][k].shape[-2], : alone[i][k].shape[-1]]] == 0).all())


def test_loss_on_batch_not_multiple_of_size_divisor_equals_padded_batch():
    from mmengine.structures import PixelData

    torch.manual_seed(0)
    model = MODELS.build(tiny_config().model).eval()  # eval: no dropout, BatchNorm running stats

    def samples(shape, label):
        s = SegDataSample(metainfo=dict(img_shape=(70, 100)))
        s.gt_sem_seg = PixelData(data=torch.nn.functional.pad(label, (0, shape[1] - 100, 0, shape[0] - 70), value=255))
        return [s]

    image, label = torch.randn(1, 3, 70, 100), torch.randint(0, 8, (1, 70, 100))
    with torch.no_grad():
        raw = model.loss(image, samples((70, 100), label))  # labels padded to the 96x128 canvas inside
        padded = model.loss(torch.nn.functional.pad(image, (0, 28, 0, 26)), samples((96, 128), label))
    for key in ("decode.loss_ce", "aux.loss_ce"):
        torch.testing.assert_close(raw[key], padded[key])


# ---- mmengine Runner: train + IoUMetric val, then mmseg.apis inference ------------------------
def _make_dataset(out: Path) -> None:
    load_tool("make_synthetic_seg").make_synthetic_seg(out, seed=0, n_train=8, n_val=3, min_side=48, max_side=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmseg")
    _make_dataset(tmp / "data")
    cfg = tiny_config(tmp / "data", tmp / "work")
    cfg.train_cfg.update(max_iters=8, val_interval=8)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=4)]
    cfg.train_dataloader.batch_size = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 8
    cfg.train_pipeline[2].scale = (96, 96)  # RandomResize
    cfg.train_dataloader.dataset.pipeline = cfg.train_pipeline
    runner = Runner.from_cfg(cfg)
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    metrics = runner.val()
    return dict(cfg=cfg, runner=runner, before=before, losses=losses, metrics=metrics, data=tmp / "data", work=tmp / "work")


def test_runner_trains_and_validates_with_iou_metric(trained):
    losses = np.asarray(trained["losses"], dtype=np.float64)
    assert len(losses) == 8 and np.isfinite(losses).all()
    after = trained["runner"].model.state_dict()
    assert not torch.equal(after["backbone.net.blocks.0.attn.qkv.weight"], trained["before"]["backbone.net.blocks.0.attn.qkv.weight"])
    metrics = trained["metrics"]
    assert {"aAcc", "mIoU", "mAcc"} <= set(metrics)
    assert 0.0 <= float(metrics["mIoU"]) <= 100.0
    assert (trained["work"] / "iter_8.pth").is_file()


def test_init_model_and_inference_model_whole_image(trained):
    import mmcv

    cfg, ckpt = trained["cfg"], str(trained["work"] / "iter_8.pth")
    image_path = sorted((trained["data"] / "images" / "validation").glob("*.jpg"))[0]
    image = mmcv.imread(image_path)  # BGR, as the config's pipeline loads it
    with trusted_checkpoints():  # our own Runner checkpoint (mmengine 0.10.7 vs torch >= 2.6)
        model = init_model(cfg, ckpt, device="cpu")
    result = inference_model(model, str(image_path))
    assert isinstance(result, SegDataSample)
    pred = result.pred_sem_seg.data
    assert tuple(pred.shape[-2:]) == image.shape[:2]
    assert int(pred.min()) >= 0 and int(pred.max()) < 8
    assert model.dataset_meta["classes"][0] == "sky"
    # The same image without SegDataPreProcessor padding (batch not a multiple of 32): the
    # segmentor crops canvas logits itself; must match the padded path up to float error.
    unpadded_cfg = cfg.copy()
    unpadded_cfg.model.data_preprocessor.test_cfg = None
    with trusted_checkpoints():
        unpadded = init_model(unpadded_cfg, ckpt, device="cpu")
    result2 = inference_model(unpadded, image)
    assert any(side % 32 for side in result.img_shape), "pick an image whose resized size is not a multiple of 32"
    torch.testing.assert_close(result2.seg_logits.data, result.seg_logits.data, atol=1e-4, rtol=1e-4)
