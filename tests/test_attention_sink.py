"""Gated attention (``attn_gated``): the sigmoid output gate that lets a query attend to nothing,
so packed native-resolution images need no padding tokens to act as attention sinks.
Packed == one image at a time (forward and backward), no host syncs, config keys, timm parity."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import navit_dense as nd
from navit_dense.utils.host_sync import HostSyncCounter

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, attn_gated=True)


def tiny(**kw):
    torch.manual_seed(0)
    return nd.build_backbone("navit_ti16", **{**TINY, **kw})


def pack(images, prefix=0, **kw):
    return nd.pack_images(images, patch_size=8, max_tokens_per_image=48, seq_len=128, num_prefix_tokens=prefix, **kw)


def images():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=gen) for h, w in [(40, 96), (120, 24), (64, 64), (24, 24)]]


def loss_of(out) -> torch.Tensor:
    # Every image's maps and pooled vector, weighted differently so a mixed-up image shows.
    return sum((i + 1) * (m.square().mean() + p.square().mean()) for i, (m, p) in enumerate(zip(out.feature_maps, out.pooled)))


@pytest.mark.parametrize("kernel, window_size, reg_tokens", [("segment", 0, 0), ("dense", 0, 2), ("segment", 2, 1)])
def test_gated_packed_equals_one_image_at_a_time_forward_and_backward(kernel, window_size, reg_tokens):
    model = tiny(attn_kernel=kernel, window_size=window_size, reg_tokens=reg_tokens, global_pool="avg").train()
    ims, prefix = images(), model.num_prefix_tokens
    packed = model(pack(ims, prefix))
    loss_of(packed).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(grads[f"blocks.{i}.attn.gate.weight"].abs().sum() > 0 for i in range(2))  # the gate learns
    model.zero_grad()
    singles = [model(pack([im], prefix)) for im in ims]
    sum((i + 1) * (s.feature_maps[0].square().mean() + s.pooled[0].square().mean()) for i, s in enumerate(singles)).backward()
    for a, b in zip(packed.feature_maps, [s.feature_maps[0] for s in singles]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gate_is_the_attention_branch_switch():
    """Open (sigmoid = 1) the gated model is the ungated one with the same weights; closed (0),
    no token sees any other: a patch's features do not depend on the rest of its image."""
    gated, plain = tiny().eval(), tiny(attn_gated=False).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if ".attn.gate." not in k})
    ims = images()
    with torch.no_grad():
        for block in gated.blocks:
            block.attn.gate.weight.zero_()
            block.attn.gate.bias.fill_(40.0)
        torch.testing.assert_close(gated(pack(ims)).tokens, plain(pack(ims)).tokens, atol=1e-6, rtol=0)
        assert (tiny(attn_gated=True).eval()(pack(ims)).tokens - plain(pack(ims)).tokens).abs().max() > 1e-3  # the gate matters
        for block in gated.blocks:
            block.attn.gate.bias.fill_(-40.0)
        changed = [im.clone() for im in ims]
        changed[3][:, 8:, :] = torch.rand_like(changed[3][:, 8:, :])  # all but the first patch row (24 x 24: not resized)
        a, b = gated(pack(ims)).feature_maps[3], gated(pack(changed)).feature_maps[3]
        torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-6, rtol=0)
        assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3


def test_gated_forward_and_backward_add_no_host_syncs():
    model = tiny(reg_tokens=1, global_pool="avg").train()
    batch = pack(images(), prefix=1, token_drop=nd.TokenDrop("constant", rate=0.25), seed=[0, 1, 2, 3])
    with HostSyncCounter() as syncs:
        loss_of(model(batch)).backward()
    assert syncs.total == 0, dict(syncs.calls)


def test_attn_gated_config_key_reaches_every_entry_point(tmp_path):
    from navit_dense.engine.config import load_config, to_object

    assert not hasattr(tiny(attn_gated=False).blocks[0].attn.gate, "weight")  # None: off by default
    assert nd.build_backbone("navit_ti16", depth=1).cfg.attn_gated is False
    assert tiny().blocks[1].attn.gate.weight.shape == (32, 32)
    assert tiny(qkv_bias=False).blocks[0].attn.gate.bias is None  # timm: the gate's bias follows qkv_bias
    # task YAML: model.backbone.attn_gated (the schema is generated from NaViTConfig)
    cfg = to_object(load_config("configs/segmentation/segmenter_linear_tiny_synthetic.yaml", ["model.backbone.attn_gated=true"]))
    overrides = cfg.model.backbone.overrides()
    assert overrides["attn_gated"] is True
    assert nd.build_backbone(cfg.model.backbone.name, **overrides).blocks[0].attn.gate is not None
    # mmseg plug-in: model.backbone.attn_gated
    from mmengine import Config
    from mmengine.registry import init_default_scope

    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    mm = Config.fromfile("configs/mmseg/upernet_navit_tiny_synthetic.py")
    mm.model.backbone.update(attn_gated=True, depth=1)
    backbone = MODELS.build(mm.model.backbone)
    assert backbone.net.cfg.attn_gated and backbone.net.blocks[0].attn.gate is not None


def test_detectron2_backbone_takes_attn_gated():
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    from detectron2.layers import ShapeSpec

    from navit_dense.adapters.detectron2.backbone import add_navit_config, build_navit_simple_fp_backbone

    cfg = get_cfg()
    add_navit_config(cfg)
    cfg.MODEL.NAVIT.OVERRIDES.update(depth=1, embed_dim=32, num_heads=2, attn_gated=True)  # MODEL.NAVIT.OVERRIDES.attn_gated
    backbone = build_navit_simple_fp_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.net.cfg.attn_gated and backbone.net.blocks[0].attn.gate is not None


# ---- timm's gated attention imports as attn_gated ----------------------------------------------
def _patch_features(net, image: torch.Tensor) -> torch.Tensor:
    """NaViT's patch tokens for one image at its own size ([h * w, D], row-major)."""
    n = (image.shape[1] // net.patch_size) * (image.shape[2] // net.patch_size)
    batch = nd.pack_images([image], net.patch_size, n, n + net.num_prefix_tokens, num_prefix_tokens=net.num_prefix_tokens)
    with torch.no_grad():
        return batch.flat(net.forward_features(batch))[batch.patch_slots]


def _timm_patch_features(ref, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = ref.forward_features(image[None])
    return (out["patches"] if isinstance(out, dict) else out)[0, ref.num_prefix_tokens :]


def _timm_gated_vit(timm):
    """A timm VisionTransformer whose blocks use timm's own Attention(gated=True)."""
    from timm.layers.attention import Attention

    class GatedAttention(Attention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, gated=True, **kwargs)

    return timm.create_model("vit_base_patch16_224", pretrained=False, depth=2, embed_dim=64, num_heads=4, img_size=64,
                             dynamic_img_size=True, attn_layer=GatedAttention)  # fmt: skip


def test_timm_gated_attention_imports_with_parity():
    """timm's sigmoid output gate (NaFlexVit ``attn_gated``, which builds Eva blocks for it;
    Attention(gated=True) in a VisionTransformer) is NaViT's attn_gated with the same
    ``attn.gate`` weights: patch features equal timm's forward (random perturbed weights), from
    the model and from its state dict; without the gate the imported function differs."""
    from conftest import perturbed

    from navit_dense.models import NaViT
    from navit_dense.models.weight_import import navit_from_timm

    timm = pytest.importorskip("timm")
    image = torch.randn(3, 96, 160)
    torch.manual_seed(0)
    flex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2, embed_dim=96, num_heads=4, attn_gated=True)
    with torch.no_grad():  # LayerScale ~1 instead of timm's 1e-5 init, so the gate shows in the features
        for blk in flex.blocks:
            blk.gamma_1.add_(1.0), blk.gamma_2.add_(1.0)
    flex, vit = perturbed(flex), perturbed(_timm_gated_vit(timm))
    for name, ref, from_model in [("naflex", flex, True), ("vit", vit, False)]:
        assert ref.blocks[0].attn.gate is not None, name
        expected = _timm_patch_features(ref, image)
        # the state-dict path finds the gate by its tensor names (a NaFlex file with Eva blocks
        # cannot tell whether it had RoPE: the caller says)
        nets = [navit_from_timm(ref.state_dict(), num_heads=4, **({"rope": "none"} if name == "naflex" else {}))]
        if from_model:
            nets.append(navit_from_timm(ref))
        else:  # the model path knows timm's Attention class only, and names the subclass
            with pytest.raises(ValueError, match="attention type GatedAttention"):
                navit_from_timm(ref)
        for net in nets:
            assert net.cfg.attn_gated, name
            torch.testing.assert_close(_patch_features(net, image), expected, atol=1e-4, rtol=0, msg=name)
        # the gate's weights are used: the same weights without it are another function
        plain = NaViT(replace(net.cfg, attn_gated=False)).eval()
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if ".attn.gate." not in k})
        assert (_patch_features(plain, image) - expected).abs().max() > 1e-3, name


def test_timm_gate_in_some_blocks_only_is_refused_by_name():
    from conftest import perturbed

    from navit_dense.models.weight_import import navit_from_timm

    timm = pytest.importorskip("timm")
    ref = perturbed(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2, embed_dim=96, num_heads=4, attn_gated=True))
    ref.blocks[1].attn.gate = None
    with pytest.raises(ValueError, match="gated attention in some blocks only"):
        navit_from_timm(ref)
