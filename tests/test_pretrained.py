"""model.backbone.init: a configured NaViT started from weights on disk (timm ViT files, HF
SigLIP2 save_pretrained directories, navit_dense checkpoints) computes what the source
computes; mismatches name the config fields to set; the engine logs it, a resumed run and
checkpoint evaluation do not need the file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import load_tool, perturbed
from safetensors.torch import save_file

from navit_dense import pack_images
from navit_dense.engine.config import load_config, to_object
from navit_dense.engine.task import get_task
from navit_dense.engine.trainer import evaluate_checkpoint, train
from navit_dense.models import build_backbone
from navit_dense.models.pretrained import detect_format, load_pretrained, read_state_dict, with_pretrained
from navit_dense.models.weight_import import navit_from_siglip2

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TIMM_SMALL = dict(embed_dim=64, depth=2, num_heads=4, img_size=64)
# The dense backbone a task would build for that timm model (see configs/_base_/backbones/).
TIMM_LAYOUT = dict(embed_dim=64, depth=2, num_heads=4, class_token=True, pos_embed="learned2d", pos_embed_grid=4)
SIGLIP_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8, num_patches=16)
SIGLIP_LAYOUT = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, act="gelu_tanh", pos_embed="learned2d",
                     pos_embed_grid=4, pos_embed_mode="bilinear")  # fmt: skip



@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return perturbed(timm.create_model("vit_base_patch16_224", pretrained=False, **TIMM_SMALL))


def dense(**overrides):
    return build_backbone("navit_ti16", global_pool="none", mask_fill="zeros", **overrides).eval()


def test_timm_file_gives_timm_features(timm_vit, tmp_path):
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, tmp_path / "vit.safetensors")
    torch.save({"state_dict": timm_vit.state_dict(), "epoch": 3}, tmp_path / "vit.pth")
    for path in (tmp_path / "vit.safetensors", tmp_path / "vit.pth"):
        net = dense(**TIMM_LAYOUT)
        report = load_pretrained(net, path)
        assert report["format"] == "timm" and report["prefix"] == ""
        assert report["skipped_source_keys"] == ["head.bias", "head.weight"]  # the ImageNet classifier
        assert report["kept_initialised"] == []
        image = torch.randn(3, 64, 64)
        with torch.no_grad():
            ours = net(pack_images([image], 16, 16, 17, num_prefix_tokens=1)).feature_maps[0]  # [D, 4, 4]
            ref = timm_vit.forward_features(image[None])[0, 1:]  # [16, D] after the class token
        assert (ours.flatten(1).T - ref).abs().max() <= 1e-4


def test_avg_pool_timm_checkpoint_with_fc_norm(tmp_path):
    # MAE / avg-pool layout: no final norm, fc_norm after pooling; the trunk keeps that choice.
    torch.manual_seed(0)
    vit = perturbed(timm.create_model("vit_base_patch16_224", pretrained=False, global_pool="avg", fc_norm=True, **TIMM_SMALL))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "mae.safetensors")
    with pytest.raises(ValueError, match="fc_norm: true"):
        load_pretrained(dense(**TIMM_LAYOUT), tmp_path / "mae.safetensors")
    net = dense(**TIMM_LAYOUT, fc_norm=True)
    report = load_pretrained(net, tmp_path / "mae.safetensors")
    assert report["skipped_source_keys"] == ["head.bias", "head.weight"]
    image = torch.randn(3, 64, 64)
    with torch.no_grad():
        ours = net(pack_images([image], 16, 16, 17, num_prefix_tokens=1)).feature_maps[0]
        ref = vit.forward_features(image[None])[0, 1:]
    assert (ours.flatten(1).T - ref).abs().max() <= 1e-4
    torch.testing.assert_close(net.fc_norm.weight, vit.fc_norm.weight)


def test_a_file_that_does_not_fit_names_the_fields_to_set(timm_vit, tmp_path):
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError) as info:
        load_pretrained(dense(embed_dim=64, depth=2, num_heads=4), tmp_path / "vit.safetensors")  # factorized, no cls
    message = str(info.value)
    assert "vit.safetensors" in message
    for hint in ("class_token: true", "pos_embed: learned2d", "pos_embed_grid: 4"):
        assert hint in message
    with pytest.raises(ValueError, match="embed_dim: 64"):
        load_pretrained(dense(**{**TIMM_LAYOUT, "embed_dim": 32, "num_heads": 2}), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="look like 'timm'"):
        load_pretrained(dense(**TIMM_LAYOUT), tmp_path / "vit.safetensors", format="siglip2")


def test_hints_name_final_norm_rope_and_pool_fields_where_the_file_records_them(tmp_path):
    """Hints compare the model's config with the one the file describes, over _ARCH_FIELDS. A timm
    file records final_norm (no norm / fc_norm tensors), mixed RoPE (rope.freqs, which also gives
    the head count) and Eva's LayerScale / GLU; what no tensor records (eps, activation, other RoPE
    options, rope_shift / jitter / rescale_coords, map_num_heads) is taken from the model, so a
    hint never asks to change it; a source config that states them is named."""
    from dataclasses import replace

    from navit_dense.models.pretrained import _architecture_hint

    torch.manual_seed(0)
    vit = perturbed(timm.create_model("vit_base_patch16_224", pretrained=False, final_norm=False, **TIMM_SMALL))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "no_norm.safetensors")
    model = dense(**TIMM_LAYOUT, rope_shift_coords=1.0, map_num_heads=2)
    with pytest.raises(ValueError, match="final_norm: false") as info:
        load_pretrained(model, tmp_path / "no_norm.safetensors")
    assert "rope_shift_coords" not in str(info.value) and "map_num_heads" not in str(info.value)
    net = dense(**TIMM_LAYOUT, final_norm=False)
    assert load_pretrained(net, tmp_path / "no_norm.safetensors")["kept_initialised"] == []
    image = torch.randn(3, 64, 64)
    with torch.no_grad():  # timm's features are the last block's output
        ours = net(pack_images([image], 16, 16, 17, num_prefix_tokens=1)).feature_maps[0]
        assert (ours.flatten(1).T - vit.forward_features(image[None])[0, 1:]).abs().max() <= 1e-4

    mixed = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, depth=1, embed_dim=64, num_heads=4)
    save_file({k: v.contiguous() for k, v in mixed.state_dict().items()}, tmp_path / "mixed.safetensors")
    with pytest.raises(ValueError) as info:  # an axial-RoPE, 2-head layout without LayerScale
        load_pretrained(dense(embed_dim=64, depth=1, num_heads=2, class_token=True, pos_embed="none", rope="cat"), tmp_path / "mixed.safetensors")
    for hint in ("rope: mixed", "num_heads: 4", "init_values: 1.0"):
        assert hint in str(info.value), hint
    with pytest.raises(ValueError) as info:  # a conv stem the file has none of; LayerScale on both sides (its values are weights)
        load_pretrained(dense(embed_dim=64, depth=1, num_heads=4, class_token=True, pos_embed="none", rope="mixed", init_values=1e-5,
                              conv_stem=(16, 32)), tmp_path / "mixed.safetensors")  # fmt: skip
    assert "conv_stem: []" in str(info.value) and "init_values" not in str(info.value)

    base = dense(**TIMM_LAYOUT).cfg
    stated = replace(base, final_norm=False, rope_shift_coords=1.0, rope_jitter_coords=1.2, rope_rescale_coords=2.0, map_num_heads=8)
    hint = _architecture_hint(stated, base)
    for field in ("final_norm: false", "rope_shift_coords: 1.0", "rope_jitter_coords: 1.2", "rope_rescale_coords: 2.0", "map_num_heads: 8"):
        assert field in hint, field


def test_conv_stem_navit_checkpoint_is_not_taken_for_timm(tmp_path):
    """A conv-stem NaViT names its linear part patch_embed.proj, as timm's ViT stem is named:
    its own stem convs tell the formats apart."""
    torch.manual_seed(0)
    source = nn.Module()
    source.backbone = build_backbone("navit_ti16", embed_dim=32, depth=1, num_heads=2, conv_stem=(8, 16), global_pool="none", mask_fill="zeros")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "stem.safetensors")
    assert detect_format(read_state_dict(tmp_path / "stem.safetensors")) == ("navit", "backbone.")
    net = build_backbone("navit_ti16", embed_dim=32, depth=1, num_heads=2, conv_stem=(8, 16), global_pool="none", mask_fill="zeros")
    report = load_pretrained(net, tmp_path / "stem.safetensors")
    assert report["format"] == "navit" and report["kept_initialised"] == []
    assert all(torch.equal(v, source.backbone.state_dict()[k]) for k, v in net.state_dict().items())


def test_siglip2_save_pretrained_directory(tmp_path):
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    full = perturbed(Siglip2Model(Siglip2Config(text_config=text, vision_config=SIGLIP_SMALL)))
    full.save_pretrained(tmp_path / "siglip2")
    net = dense(**SIGLIP_LAYOUT)
    report = load_pretrained(net, tmp_path / "siglip2")
    assert report["format"] == "siglip2" and report["prefix"] == "vision_model."
    assert report["skipped_source_keys"] and all(k.startswith("head.") for k in report["skipped_source_keys"])  # MAP head
    reference = navit_from_siglip2(full.vision_model).state_dict()
    ours = net.state_dict()
    assert set(ours) <= set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    # A wrong layout: the hint comes from the directory's config.json.
    with pytest.raises(ValueError, match="act: gelu_tanh"):
        load_pretrained(dense(**{**SIGLIP_LAYOUT, "act": "gelu", "pos_embed_grid": 8}), tmp_path / "siglip2")


def test_navit_task_checkpoint_with_prefix_and_heads(tmp_path):
    torch.manual_seed(0)
    source = nn.Module()
    source.backbone = build_backbone("navit_ti16", embed_dim=32, depth=1, num_heads=2, num_classes=5)  # MAP + head
    source.decoder = nn.Linear(32, 3)
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "ckpt" / "model.safetensors")
    torch.manual_seed(1)
    net = dense(embed_dim=32, depth=1, num_heads=2)
    report = load_pretrained(net, tmp_path / "ckpt")
    assert report["format"] == "navit" and report["prefix"] == "backbone."
    assert "head.weight" in report["skipped_source_keys"] and any(k.startswith("attn_pool.") for k in report["skipped_source_keys"])
    expected = source.backbone.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    # Same heads on both sides: they are loaded too.
    twin = build_backbone("navit_ti16", embed_dim=32, depth=1, num_heads=2, num_classes=5)
    assert load_pretrained(twin, tmp_path / "ckpt")["skipped_source_keys"] == []
    assert torch.equal(twin.head.weight, source.backbone.head.weight)
    # The LazyConfig form (detectron2): "" leaves the model as built.
    fresh = dense(embed_dim=32, depth=1, num_heads=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert with_pretrained(fresh, "") is fresh and all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    assert torch.equal(with_pretrained(fresh, tmp_path / "ckpt").patch_embed.weight, expected["patch_embed.weight"])
    # A different head size: skipped and left as initialised, never a shape error.
    other = build_backbone("navit_ti16", embed_dim=32, depth=1, num_heads=2, num_classes=7)
    report = load_pretrained(other, tmp_path / "ckpt")
    assert "head.weight" in report["skipped_source_keys"] and "head.weight" in report["kept_initialised"]


def test_bad_files_get_clear_errors(tmp_path):
    net = dense(embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(net, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="format 'vit'"):
        load_pretrained(net, tmp_path / "missing.safetensors", format="vit")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_state_dict(tmp_path / "evil.pth")
    torch.save({"lr": 0.1, "w": torch.zeros(2)}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="mapping of parameter names to tensors"):
        read_state_dict(tmp_path / "mixed.pth")
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(read_state_dict(tmp_path / "other.safetensors"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_state_dict(tmp_path / "empty_dir")


# ---- engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_seg_pretrained")
    load_tool("make_synthetic_seg").make_synthetic_seg(out, seed=0, n_train=8, n_val=4, min_side=64, max_side=128)
    return out


def test_fine_tune_from_timm_through_the_engine(timm_vit, seg_data, tmp_path, capsys):
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, weights)
    run = tmp_path / "run"
    layout = [f"model.backbone.{k}={json.dumps(v)}" for k, v in TIMM_LAYOUT.items()]
    cfg = load_config(ROOT / "configs" / "segmentation" / "segmenter_linear_tiny_synthetic.yaml", [
        f"output_dir={run}", f"data.root={seg_data}", *layout, f"model.backbone.init.path={weights}",
        "data.max_tokens_per_image=36", "data.seq_len=128", "data.tokens_per_batch=256", "data.num_workers=0",
        "train.steps=2", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=2",
    ])  # fmt: skip
    task = get_task("segmentation")(to_object(cfg))
    backbone = task.build_model().backbone
    reference = dense(**TIMM_LAYOUT)
    load_pretrained(reference, weights)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in backbone.state_dict().items() if k != "mask_token")
    assert task.pretrained_report["loaded"] == len(reference.state_dict())

    train(cfg)
    assert f"backbone initialised from {weights} (timm" in capsys.readouterr().out
    weights.unlink()  # evaluation and resuming rely on the checkpoint alone
    metrics, _ = evaluate_checkpoint(cfg, run / "checkpoints" / "last")
    assert 0 <= metrics["mIoU"] <= 100
    with pytest.raises(FileNotFoundError, match="model.backbone.init: pretrained weights not found"):
        get_task("segmentation")(to_object(cfg)).build_model()


def test_every_field_a_hint_can_name_is_a_config_key():
    from dataclasses import fields

    from navit_dense.engine.config import BackboneConfig
    from navit_dense.models.pretrained import _ARCH_FIELDS

    assert set(_ARCH_FIELDS) - {"in_chans"} <= {f.name for f in fields(BackboneConfig)}  # packing is RGB-only


def test_dinov3_file_through_the_config_layout(tmp_path):
    """A timm DINOv3 weights file (random, saved like the hub's model.safetensors) loads through
    model.backbone.init into the layout configs/_base_/backbones/dinov3_vit_small_patch16.yaml
    describes, and the NaViT then computes timm's patch features; the detection and segmentation
    configs built on that layout resolve."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=2).eval()
    save_file(vit.state_dict(), str(tmp_path / "model.safetensors"))
    c = to_object(load_config(ROOT / "configs" / "detection" / "owl_navit_dinov3_s16_lvis.yaml", [f"model.backbone.init.path={tmp_path / 'model.safetensors'}", "model.backbone.depth=2"]))
    b = c.model.backbone
    net = build_backbone(b.name, **b.overrides()).eval()
    report = load_pretrained(net, b.init.path, b.init.format)
    assert report["format"] == "timm"
    assert all(k.startswith(("attn_pool.", "head.", "fc_norm.", "mask_token")) for k in report["kept_initialised"])  # the trunk is loaded
    image = torch.randn(3, 160, 224)
    with torch.no_grad():
        ref = vit.forward_features(image[None])[0, vit.num_prefix_tokens :]
        batch = pack_images([image], 16, 140, 160, num_prefix_tokens=net.num_prefix_tokens)
        ours = batch.flat(net.forward_features(batch))[batch.patch_slots]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    seg = to_object(load_config(ROOT / "configs" / "segmentation" / "segmenter_linear_navit_dinov3_s16_ade20k.yaml"))
    assert seg.model.backbone.rope == "dinov3" and seg.model.backbone.reg_tokens == 4
