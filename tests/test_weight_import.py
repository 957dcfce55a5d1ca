"""Weight import from timm VisionTransformer and HF Siglip2VisionModel: same inputs, same outputs.

Reference models are randomly initialized (no hub downloads), then every parameter is
perturbed so zero biases, unit norms and tiny LayerScale/cls inits cannot hide a mapping error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import perturbed
from navit_dense import pack_images
from navit_dense.models.weight_import import (
    config_from_timm,
    navit_from_siglip2,
    navit_from_timm,
)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel  # noqa: E402
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches  # noqa: E402

TOL = 1e-4
SMALL = dict(embed_dim=64, depth=2, num_heads=4, img_size=64)



def _pack_exact(images, patch_size: int, num_prefix: int, seq_len: int | None = None):
    """Pack images at exactly their own resolution (budget = their token count)."""
    grids = [(im.shape[1] // patch_size, im.shape[2] // patch_size) for im in images]
    budgets = [h * w for h, w in grids]
    seq_len = seq_len or max(budgets) + num_prefix
    # fixed_seq_len: keep images of different shapes sharing sequences (the capacity search
    # would otherwise prefer one image per shorter sequence for these few images).
    batch = pack_images(images, patch_size, max_tokens=budgets, seq_len=seq_len, num_prefix_tokens=num_prefix, fixed_seq_len=True)
    assert batch.grid_sizes.tolist() == [list(g) for g in grids]
    return batch


def _timm_diffs(ref, ours, images) -> tuple[float, float, float]:
    """Max abs diffs of (patch features, pre-logits pooled, head output), one timm call per image."""
    batch = _pack_exact(images, ours.patch_size, ours.num_prefix_tokens)
    with torch.no_grad():
        out = ours(batch)
        pre = ours.forward_head(out.tokens, batch, pre_logits=True)
        feats, pres, logits = [], [], []
        for im in images:
            f = ref.forward_features(im[None])
            feats.append(f[0, ref.num_prefix_tokens :])
            pres.append(ref.forward_head(f, pre_logits=True)[0])
            logits.append(ref.forward_head(f)[0])
    d_feat = max((m.flatten(1).T - f).abs().max().item() for m, f in zip(out.feature_maps, feats))
    d_pre = (pre - torch.stack(pres)).abs().max().item()
    d_out = (out.pooled - torch.stack(logits)).abs().max().item()
    return d_feat, d_pre, d_out


# ---- timm ----------------------------------------------------------------------------------
TIMM_CASES = [
    # (id, model name, create kwargs, config fields the import must have found)
    ("avg_no_cls", "vit_base_patch16_224", dict(SMALL, class_token=False, global_pool="avg"),
     dict(class_token=False, global_pool="avg", fc_norm=True)),
    ("gap_layerscale_nobias", "vit_medium_patch16_gap_256", SMALL,
     dict(global_pool="avg", fc_norm=False, qkv_bias=False, init_values=1.0)),
    ("reg4_no_embed_class", "vit_base_patch16_reg4_gap_256", SMALL,
     dict(reg_tokens=4, class_token=False, no_embed_class=True)),
    ("cls_reg2_qknorm_ls", "vit_base_patch16_224", dict(SMALL, reg_tokens=2, qk_norm=True, init_values=1e-5),
     dict(class_token=True, reg_tokens=2, no_embed_class=False, qk_norm=True, global_pool="token")),
    ("clip_prenorm_quickgelu", "vit_base_patch16_clip_quickgelu_224", SMALL,
     dict(pre_norm=True, act="quick_gelu", norm_eps=1e-5)),
    ("siglip_map", "vit_base_patch16_siglip_224", dict(SMALL, act_layer="gelu_tanh"),
     dict(global_pool="map", act="gelu_tanh", class_token=False)),
    ("reg4_map_odd_mlp", "vit_so150m_patch16_reg4_map_256", dict(SMALL, embed_dim=56),
     dict(global_pool="map", reg_tokens=4, map_include_prefix=False)),
    ("no_final_norm", "vit_base_patch16_224", dict(SMALL, final_norm=False), dict(final_norm=False, fc_norm=False)),
]


@pytest.mark.parametrize("name,kwargs,expect", [c[1:] for c in TIMM_CASES], ids=[c[0] for c in TIMM_CASES])
def test_timm_equivalence(name, kwargs, expect):
    torch.manual_seed(0)
    ref = perturbed(timm.create_model(name, pretrained=False, **kwargs))
    ours = navit_from_timm(ref)
    for key, value in expect.items():
        assert getattr(ours.cfg, key) == value, key
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    diffs = _timm_diffs(ref, ours, images)
    assert max(diffs) <= TOL, diffs


def test_timm_vit_base_patch16_224():
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_base_patch16_224", pretrained=False))
    ours = navit_from_timm(ref)
    assert (ours.cfg.embed_dim, ours.cfg.depth, ours.cfg.num_heads, ours.cfg.num_classes) == (768, 12, 12, 1000)
    assert ours.cfg.class_token and ours.cfg.global_pool == "token" and ours.cfg.pos_embed_grid == 14
    diffs = _timm_diffs(ref, ours, [torch.randn(3, 224, 224)])
    assert max(diffs) <= TOL, diffs


def test_timm_map_prefix_choice_matters():
    """timm's MAP pool ignores register tokens; attending to them (the NaViT default) is a
    different function, so the imported config must switch it off."""
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_so150m_patch16_reg4_map_256", pretrained=False, **dict(SMALL, embed_dim=56)))
    wrong = navit_from_timm(ref, map_include_prefix=True)
    assert _timm_diffs(ref, wrong, [torch.randn(3, 64, 64)])[1] > 1e-3


def test_timm_state_dict_path_matches_model_path():
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, **SMALL))
    from_model = navit_from_timm(ref)
    # eps, activation and head count are not in the weights: pass them.
    from_sd = navit_from_timm(ref.state_dict(), num_heads=4, norm_eps=1e-5, act="quick_gelu")
    assert from_sd.cfg == from_model.cfg
    a, b = from_model.state_dict(), from_sd.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "mask_token")
    assert max(_timm_diffs(ref, from_sd, [torch.randn(3, 64, 64)])) <= TOL


def test_timm_other_resolutions_match_dynamic_img_size():
    """Off the checkpoint grid NaViT resizes the table like timm's dynamic_img_size
    (bicubic + antialias), so features still match; several sizes share one packed batch."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True, reg_tokens=1, **SMALL)
    ref = perturbed(ref)
    ours = navit_from_timm(ref)
    images = [torch.randn(3, 48, 80), torch.randn(3, 112, 96), torch.randn(3, 32, 32)]  # grids 3x5, 7x6, 2x2 vs 4x4
    batch = _pack_exact(images, 16, ours.num_prefix_tokens, seq_len=64)
    assert batch.num_sequences < len(images)  # at least two images share a sequence
    with torch.no_grad():
        out = ours(batch)
        for im, fmap, pooled in zip(images, out.feature_maps, out.pooled):
            assert torch.isfinite(fmap).all()
            f = ref.forward_features(im[None])
            assert (fmap.flatten(1).T - f[0, ref.num_prefix_tokens :]).abs().max().item() <= TOL
            assert (pooled - ref.forward_head(f)[0]).abs().max().item() <= TOL


def test_timm_unsupported_features_are_named():
    from timm.layers import SwiGLUPacked

    mrope = timm.create_model("vit_small_patch16_rope_224", pretrained=False, rope_type="mrope", rope_grid_indexing="ij", **SMALL)
    with pytest.raises(ValueError, match="RotaryEmbeddingMRope"):  # multimodal (Qwen2-VL style) RoPE
        navit_from_timm(mrope)
    swiglu = timm.create_model(
        "vit_base_patch16_224", pretrained=False, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, **SMALL
    )
    for source in (swiglu, swiglu.state_dict()):
        with pytest.raises(ValueError, match="SwiGLU"):
            navit_from_timm(source, num_heads=4)
    no_cls = timm.create_model("vit_base_patch16_224", pretrained=False, class_token=False, global_pool="avg", **SMALL)
    with pytest.raises(ValueError, match="class token"):
        config_from_timm(no_cls.state_dict(), num_heads=4, global_pool="token")
    with pytest.raises(ValueError, match="num_heads"):
        config_from_timm(no_cls.state_dict())
    avgmax = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool="avgmax", **SMALL)
    with pytest.raises(ValueError, match="avgmax"):
        navit_from_timm(avgmax)


# ---- HF SigLIP2 (NaFlex) ---------------------------------------------------------------------
P = 8
SIGLIP_SMALL = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, patch_size=P, num_patches=64
)


def _siglip2_inputs(images, grids):
    """NaFlex inputs built with transformers' own patch cutter, padded to the longest image."""
    L = max(h * w for h, w in grids)
    pixel_values = torch.zeros(len(images), L, 3 * P * P)
    mask = torch.zeros(len(images), L, dtype=torch.long)
    for i, (im, (h, w)) in enumerate(zip(images, grids)):
        pixel_values[i, : h * w] = convert_image_to_patches(im, P)
        mask[i, : h * w] = 1
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor(grids))


def _siglip2_diffs(ref, ours, grids, seq_len):
    images = [torch.randn(3, h * P, w * P) for h, w in grids]
    batch = _pack_exact(images, P, 0, seq_len=seq_len)
    inputs = _siglip2_inputs(images, grids)
    # Our (c, py, px) patches are NaFlex's (py, px, c) patches, permuted.
    for i, (h, w) in enumerate(grids):
        ours_i = batch.patches[batch.seq_index[i], batch.seq_offset[i] : batch.seq_offset[i] + h * w]
        as_naflex = ours_i.view(h * w, 3, P, P).permute(0, 2, 3, 1).reshape(h * w, -1)
        assert torch.equal(as_naflex, inputs["pixel_values"][i, : h * w])
    with torch.no_grad():
        hf = ref(**inputs)
        out = ours(batch)
    d_feat = max(
        (m.flatten(1).T - hf.last_hidden_state[i, : h * w]).abs().max().item()
        for i, (m, (h, w)) in enumerate(zip(out.feature_maps, grids))
    )
    d_pool = (out.pooled - hf.pooler_output).abs().max().item() if hf.pooler_output is not None else 0.0
    return batch, d_feat, d_pool


@pytest.fixture(scope="module")
def siglip2():
    torch.manual_seed(0)
    return perturbed(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP_SMALL)))


def test_siglip2_mixed_aspect_batch(siglip2):
    ours = navit_from_siglip2(siglip2)
    cfg = ours.cfg
    assert (cfg.pos_embed_mode, cfg.pos_embed_grid, cfg.act, cfg.global_pool) == ("bilinear", 8, "gelu_tanh", "map")
    # Within the checkpoint's 64-patch budget: the table's own 8x8 grid and two non-square grids.
    batch, d_feat, d_pool = _siglip2_diffs(siglip2, ours, [(8, 8), (5, 12), (12, 5)], seq_len=128)
    assert batch.num_sequences < 3  # images of different shapes packed into shared sequences
    assert d_feat <= TOL and d_pool <= TOL, (d_feat, d_pool)


def test_siglip2_other_resolutions(siglip2):
    ours = navit_from_siglip2(siglip2)
    # Beyond the table (upsampled positions) and far below it.
    batch, d_feat, d_pool = _siglip2_diffs(siglip2, ours, [(10, 13), (3, 7)], seq_len=160)
    assert d_feat <= TOL and d_pool <= TOL, (d_feat, d_pool)
    # The resize mode is part of the function: timm's bicubic would not reproduce SigLIP2.
    wrong = navit_from_siglip2(siglip2, pos_embed_mode="bicubic")
    assert _siglip2_diffs(siglip2, wrong, [(10, 13)], seq_len=160)[1] > 1e-3


def test_siglip2_sources_and_no_head():
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    full = perturbed(Siglip2Model(Siglip2Config(text_config=text, vision_config=SIGLIP_SMALL)))
    reference = navit_from_siglip2(full.vision_model).state_dict()
    # A full Siglip2Model, and a (state dict with 'vision_model.' + text keys, config) pair.
    for source in (full, (full.state_dict(), full.config)):
        sd = navit_from_siglip2(source).state_dict()
        assert all(torch.equal(sd[k], reference[k]) for k in reference if k != "mask_token")

    headless = perturbed(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP_SMALL, vision_use_head=False)))
    ours = navit_from_siglip2(headless)
    assert ours.attn_pool is None
    assert _siglip2_diffs(headless, ours, [(6, 9)], seq_len=64)[1] <= TOL


def test_siglip2_unsupported_configs():
    for bad, match in [(dict(num_patches=60), "square"), (dict(hidden_act="relu"), "activation")]:
        with pytest.raises(ValueError, match=match):
            navit_from_siglip2(Siglip2VisionModel(Siglip2VisionConfig(**{**SIGLIP_SMALL, **bad})))


@pytest.mark.parametrize("fmt", ["NCHW", "NLC"])
def test_forward_intermediates_follows_timms_signature_and_values(fmt):
    """NaViT.forward_intermediates(batch, indices, return_prefix_tokens, norm, stop_early,
    output_fmt, intermediates_only) gives, per image, what timm's gives for that image alone."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, reg_tokens=2).eval()
    net = navit_from_timm(vit)
    image = torch.randn(3, 64, 64)
    with torch.no_grad():
        ref_final, ref = vit.forward_intermediates(image[None], indices=[1, -1], return_prefix_tokens=True, norm=True, output_fmt=fmt)
        batch = pack_images([image, torch.randn(3, 48, 32)], 16, 24, 64, num_prefix_tokens=net.num_prefix_tokens)
        final, ours = net.forward_intermediates(batch, indices=[1, -1], return_prefix_tokens=True, norm=True, output_fmt=fmt)
        only = net.forward_intermediates(batch, indices=2, intermediates_only=True, stop_early=True)
    assert len(ours) == 2 and all(len(layer) == 2 for layer in ours)  # layers x images
    for (ref_map, ref_prefix), layer in zip(ref, ours):
        our_map, our_prefix = layer[0]
        got = our_map if fmt == "NCHW" else our_map[None]
        torch.testing.assert_close(got[None] if fmt == "NCHW" else got, ref_map, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(our_prefix, ref_prefix[0], atol=1e-4, rtol=1e-4)
    assert final.shape[:2] == batch.segment_ids.shape
    assert len(only) == 2 and [tuple(m.shape[1:]) for m in only[0]] == list(batch.layout.grids)  # the last 2 blocks, per image
    with pytest.raises(ValueError, match="stop_early"):
        net.forward_intermediates(batch, stop_early=True)


@pytest.mark.parametrize(
    "name, size",
    [("vit_small_patch16_dinov3", 224), ("vit_small_patch16_rope_224", 224), ("eva02_tiny_patch14_224", 224),
     ("vit_small_patch16_rope_mixed_224", 224), ("vit_small_patch16_rope_mixed_ape_224", 224),
     ("vit_pe_spatial_tiny_patch16_512", 512)],
)
def test_timm_eva_family_imports_with_parity(name, size):
    """DINOv3 (normalized-coordinate RoPE, storage tokens, LayerScale), RoPE-ViT axial and EVA02
    (axial RoPE with a reference grid, absolute positions, q/v-only bias, SiLU GLU MLP), RoPE-ViT
    mixed (learned per-block frequencies, with / without absolute positions) and Perception
    Encoder spatial (no final norm): random timm models, one image at their own input size,
    patch-token features within 1e-4 (more cases, non-square sizes: tests/test_rope_mixed.py)."""
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, depth=2).eval()
    net = navit_from_timm(vit)
    image = torch.randn(3, size, size)
    n = (size // net.patch_size) ** 2
    with torch.no_grad():
        ref = vit.forward_features(image[None])[0, vit.num_prefix_tokens :]
        batch = pack_images([image, torch.randn(3, size // 2, size)], net.patch_size, n, n + 16, num_prefix_tokens=net.num_prefix_tokens)
        tokens = net.forward_features(batch)
        ours = batch.flat(tokens)[batch.patch_slots[:n]]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_unsupported_eva_features_are_named():
    for name, kwargs, feature in [("vit_small_patch16_rope_224", dict(rope_type="mrope", rope_grid_indexing="ij"), "RotaryEmbeddingMRope"),
                                  # PE core's own pool (8 heads) imports (map_num_heads); a pool MLP of another width does not
                                  ("vit_pe_core_tiny_patch16_384", dict(attn_pool_mlp_ratio=2.0), "attention pool whose norm eps, MLP width"),
                                  ("vit_small_patch16_rope_224", dict(use_post_norm=True), "post-norm")]:  # fmt: skip
        with pytest.raises(ValueError, match=feature):
            navit_from_timm(timm.create_model(name, pretrained=False, depth=1, **kwargs))


def test_timm_naflexvit_imports_with_parity_on_its_own_naflex_input():
    """naflexvit_base_patch16_gap (channels-last linear patches, learned grid resized per image,
    register tokens, avg pooling): one image at its own size, and a mixed-aspect batch in timm's
    own NaFlex format (one image per row, padded, patch_valid) against our packed batch."""
    torch.manual_seed(0)
    flex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2).eval()
    net = navit_from_timm(flex)
    P, C = 16, 3
    g = torch.Generator().manual_seed(1)
    ims = [torch.randn(3, h, w, generator=g) for h, w in [(256, 256), (96, 224), (208, 64), (128, 160)]]
    batch = pack_images(ims, P, 256, 1024, num_prefix_tokens=net.num_prefix_tokens)
    with torch.no_grad():
        ours = batch.flat(net.forward_features(batch))[batch.patch_slots]
        ref_square = flex.forward_features(ims[0][None])[0, flex.num_prefix_tokens :]
        lay = batch.layout
        torch.testing.assert_close(ours[: lay.token_offsets[1]], ref_square, atol=1e-4, rtol=0)
        # timm's own format: patches flattened (py, px, c), (row, col) coordinates, padded rows
        patches = batch.flat(batch.patches)[batch.patch_slots].reshape(-1, C, P, P).permute(0, 2, 3, 1).reshape(-1, P * P * C)
        coords = batch.flat(batch.positions)[batch.patch_slots]
        N, longest = lay.num_images, max(lay.num_kept)
        inputs = {"patches": patches.new_zeros(N, longest, P * P * C), "patch_coord": coords.new_zeros(N, longest, 2),
                  "patch_valid": torch.zeros(N, longest, dtype=torch.bool)}  # fmt: skip
        for i in range(N):
            lo, hi = lay.token_offsets[i], lay.token_offsets[i + 1]
            inputs["patches"][i, : hi - lo], inputs["patch_coord"][i, : hi - lo], inputs["patch_valid"][i, : hi - lo] = patches[lo:hi], coords[lo:hi], True
        ref = flex.forward_features(**inputs)
        ref = ref["patches"] if isinstance(ref, dict) else ref
        for i in range(N):
            lo, hi = lay.token_offsets[i], lay.token_offsets[i + 1]
            torch.testing.assert_close(ours[lo:hi], ref[i, flex.num_prefix_tokens : flex.num_prefix_tokens + hi - lo], atol=1e-4, rtol=0)


# ---- Perception Encoder core: an attention pool with its own head count ----------------------
def test_perception_encoder_core_attention_pool_imports_with_map_num_heads(tmp_path):
    """vit_pe_core_*: an 8-head attention pool (and a 512-wide projection) over 3-head blocks.
    ``map_num_heads`` carries the pool's head count, so the pooled output (pre-logits and
    projected) equals timm's, at the model's 384 input and (dynamic_img_size) on a non-square
    image; the blocks' head count in the pool is another function. From a file the head count is
    the config's to state: a NaViT with map_num_heads 8 loads the pool and head and matches too."""
    from dataclasses import replace

    from navit_dense.models import NaViT
    from navit_dense.models.pretrained import load_pretrained
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=2))
    net = navit_from_timm(ref)
    assert (net.cfg.num_heads, net.cfg.map_num_heads, net.attn_pool.num_heads, net.cfg.num_classes) == (3, 8, 8, 512)
    image = torch.randn(3, 384, 384)
    diffs = _timm_diffs(ref, net, [image])
    assert max(diffs) <= TOL, diffs
    wrong = navit_from_timm(ref, map_num_heads=3)  # the pool computed with the blocks' heads
    assert _timm_diffs(ref, wrong, [image])[1] > 1e-3
    dyn = perturbed(timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=2, dynamic_img_size=True))
    assert max(_timm_diffs(dyn, navit_from_timm(dyn), [torch.randn(3, 192, 384)])) <= TOL
    with pytest.raises(ValueError, match="map_num_heads=5"):
        NaViT(replace(net.cfg, map_num_heads=5))  # 192 does not split into 5 heads

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "pe_core.safetensors"))
    torch.manual_seed(1)
    fresh = NaViT(replace(net.cfg, mask_fill="zeros")).eval()
    report = load_pretrained(fresh, tmp_path / "pe_core.safetensors")
    assert report["skipped_source_keys"] == [] and report["kept_initialised"] == []  # pool and head loaded too
    assert max(_timm_diffs(ref, fresh, [image])) <= TOL


# ---- timm NaFlexVit files ---------------------------------------------------------------------
NAFLEX_SMALL = dict(depth=2, embed_dim=96, num_heads=4)


def _patch_token_diff(ref: nn.Module, net: nn.Module, size: tuple[int, int]) -> float:
    """Max abs diff of patch-token features: one image at its own size, NaViT packed vs timm."""
    image = torch.randn(3, *size)
    grid = (size[0] // net.patch_size, size[1] // net.patch_size)
    n = grid[0] * grid[1]
    batch = pack_images([image], net.patch_size, n, n + net.num_prefix_tokens, num_prefix_tokens=net.num_prefix_tokens)
    assert batch.grid_sizes.tolist() == [list(grid)]
    with torch.no_grad():
        ours = batch.flat(net.forward_features(batch))[batch.patch_slots]
        ref_out = ref.forward_features(image[None])
        ref_out = ref_out["patches"] if isinstance(ref_out, dict) else ref_out
    return (ours - ref_out[0, ref.num_prefix_tokens :]).abs().max().item()


@pytest.mark.parametrize("pos", ["learned", "factorized"])
def test_timm_naflexvit_file_loads_through_model_backbone_init(pos, tmp_path):
    """A timm NaFlexVit state dict (embeds.* names: a Linear over channels-last (py, px, c)
    patches, a [1, G, G, D] grid or factorized y / x tables, register tokens, LayerScale, fc_norm)
    saved to .safetensors and .pth starts a NaViT configured from the engine config
    (model.backbone.init, format auto and timm) that computes timm's patch features."""
    from safetensors.torch import save_file

    from navit_dense.engine.config import load_config, to_object
    from navit_dense.models import build_backbone
    from navit_dense.models.pretrained import _ARCH_FIELDS, load_pretrained

    torch.manual_seed(0)
    ref = perturbed(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, pos_embed=pos, **NAFLEX_SMALL))
    sd = ref.state_dict()
    assert tuple(sd["embeds.proj.weight"].shape) == (96, 16 * 16 * 3) and ref.embeds.channels_last
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    torch.save({"model": sd, "epoch": 1}, tmp_path / "naflex.pth")
    layout = ["name=navit_b16", "patch_size=16", "embed_dim=96", "num_heads=4", "depth=2", "reg_tokens=4", "init_values=1.0e-5",
              "no_embed_class=true", f"pos_embed={'learned2d' if pos == 'learned' else 'fractional'}", "pos_embed_grid=16",
              "fc_norm=true", "rope=none", "conv_stem=[]", "global_pool=none", "mask_fill=zeros"]  # fmt: skip
    expected = navit_from_timm(ref).cfg  # what the model object says
    for path, fmt in [(tmp_path / "model.safetensors", "auto"), (tmp_path / "naflex.pth", "timm")]:
        overrides = [f"model.backbone.{kv}" for kv in layout] + [f"model.backbone.init.path={path}", f"model.backbone.init.format={fmt}"]
        b = to_object(load_config("configs/detection/owl_navit_tiny_synthetic_lvis.yaml", overrides)).model.backbone
        net = build_backbone(b.name, **b.overrides()).eval()
        arch = [f for f in _ARCH_FIELDS if f != "init_values"]  # imports state LayerScale as 1.0: the weights hold the values
        assert {f: getattr(net.cfg, f) for f in arch} == {f: getattr(expected, f) for f in arch}
        report = load_pretrained(net, b.init.path, b.init.format, b.init.prefix)
        assert (report["format"], report["patch_layout"], report["kept_initialised"]) == ("timm", "channels_last", [])
        assert report["skipped_source_keys"] == ["head.bias", "head.weight"]  # the classifier
        assert _patch_token_diff(ref, net, (160, 224)) <= TOL
    # the state-dict path of navit_from_timm reads the same architecture from the names and shapes
    from_sd = navit_from_timm(sd, num_heads=4)
    assert from_sd.cfg == expected
    assert _patch_token_diff(ref, from_sd, (224, 96)) <= TOL


def test_naflexvit_patch_layout_is_timms_default_unless_told(tmp_path):
    """A file does not record the column order of a linear patch embedding. A NaFlexVit file is
    read channels-last (timm's patchify_channels_last=True, every naflexvit_* model); one saved
    with patchify_channels_last=False loads with patch_layout='channels_first' (read as the
    default it is another function); a linear embedding under the ViT name patch_embed.proj
    cannot be told at all: the error names the option."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from navit_dense.models import NaViT
    from navit_dense.models.pretrained import load_pretrained

    torch.manual_seed(0)
    ref = perturbed(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, patchify_channels_last=False, **NAFLEX_SMALL))
    assert not ref.embeds.channels_last
    assert _patch_token_diff(ref, navit_from_timm(ref), (64, 96)) <= TOL  # a model object states its layout
    with pytest.raises(ValueError, match="flattens patches channels_first"):
        navit_from_timm(ref, patch_layout="channels_last")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "cf.safetensors"))
    cfg = replace(navit_from_timm(ref).cfg, global_pool="none", num_classes=0, mask_fill="zeros")
    net = NaViT(cfg).eval()
    assert load_pretrained(net, tmp_path / "cf.safetensors", patch_layout="channels_first")["patch_layout"] == "channels_first"
    assert _patch_token_diff(ref, net, (64, 96)) <= TOL
    assert load_pretrained(net, tmp_path / "cf.safetensors")["patch_layout"] == "channels_last"
    assert _patch_token_diff(ref, net, (64, 96)) > 1e-3
    with pytest.raises(ValueError, match="patch_layout 'sideways' is not one of"):
        load_pretrained(net, tmp_path / "cf.safetensors", patch_layout="sideways")

    renamed = {("patch_embed.proj.weight" if k == "embeds.proj.weight" else k): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(renamed, str(tmp_path / "linear_vit.safetensors"))
    with pytest.raises(ValueError, match=r"linear_vit\.safetensors.*patch_embed\.proj\.weight \(96, 768\).*patch_layout='channels_last'"):
        load_pretrained(net, tmp_path / "linear_vit.safetensors")
