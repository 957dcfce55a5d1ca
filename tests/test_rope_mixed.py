"""Mixed RoPE (RoPE-ViT's RoPE-Mixed, timm ``RotaryEmbeddingMixed``) in the packed backbone, and
the timm families it and the final-norm option open up: RoPE-ViT mixed (with and without an
absolute position embedding) and Perception Encoder (core / spatial / lang).

Mixed RoPE learns x / y frequencies per block and head (``rope.freqs``), so each block rotates q/k
with its own angles: every packed patch token at its own image-grid coordinates (kept tokens keep
theirs under token dropping), prefix slots and padding not at all, a packed batch equal to one
image at a time, and the same numbers as timm (random weights, fp32, patch features <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import navit_dense as nd
import navit_dense.tasks  # noqa: F401  (registers the tasks load_config needs)
from conftest import perturbed
from navit_dense.data import TokenDrop
from navit_dense.engine.config import load_config, to_object
from navit_dense.engine.optim import no_weight_decay_names
from navit_dense.models import build_backbone
from navit_dense.models.pos_embed import build_rope, mixed_rope_coords, mixed_rope_embed
from navit_dense.models.pretrained import load_pretrained
from navit_dense.models.weight_import import navit_from_timm
from navit_dense.utils.host_sync import HostSyncCounter

timm = pytest.importorskip("timm")
from timm.layers.pos_embed_sincos import RotaryEmbeddingMixed  # noqa: E402

P = 8
TOL = 1e-4


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]



def _patch_diffs(ref: nn.Module, net: nn.Module, sizes) -> tuple[float, float]:
    """Max abs diffs of (patch-token features, pooled output): our packed batch of every image
    against timm, one image per call at that image's size."""
    ims = [torch.randn(3, h, w) for h, w in sizes]
    budgets = [(h // net.patch_size) * (w // net.patch_size) for h, w in sizes]
    batch = nd.pack_images(ims, net.patch_size, max_tokens=budgets, seq_len=max(budgets) + net.num_prefix_tokens,
                           num_prefix_tokens=net.num_prefix_tokens)  # fmt: skip
    assert [h * w for h, w in batch.layout.grids] == budgets  # every image at its own size
    d_feat = d_pool = 0.0
    with torch.no_grad():
        out = net(batch)
        for i, im in enumerate(ims):
            f = ref.forward_features(im[None])
            d_feat = max(d_feat, (out.feature_maps[i].flatten(1).T - f[0, ref.num_prefix_tokens :]).abs().max().item())
            if out.pooled is not None:
                d_pool = max(d_pool, (out.pooled[i] - ref.forward_head(f)[0]).abs().max().item())
    return d_feat, d_pool


# ---- the packed rotation ---------------------------------------------------------------------
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_each_block_rotation_is_timms_embedding_at_each_kept_token(indexing):
    torch.manual_seed(0)
    rope = build_rope("mixed", 64, 4, depth=3, temperature=10.0, grid_indexing=indexing).eval()
    assert isinstance(rope, RotaryEmbeddingMixed) and tuple(rope.freqs.shape) == (2, 3, 4, 8)
    batch = nd.pack_images(images([(40, 88), (64, 24), (56, 56)]), P, 30, 96, num_prefix_tokens=1,
                           token_drop=TokenDrop("constant", rate=0.4), seed=[1, 2, 3])  # fmt: skip
    coords = mixed_rope_coords(rope, batch)
    lay = batch.layout
    for block in range(3):
        table = mixed_rope_embed(rope, coords, block)  # [S, H, L, 2 * Dh]
        assert tuple(table.shape) == (batch.num_sequences, 4, batch.seq_len, 32)
        for i, (h, w) in enumerate(lay.grids):
            ref = rope.get_embed((h, w))[block]  # [H, h * w, 2 * Dh]
            s, o = lay.seq_index[i], lay.seq_offset[i]
            kept = batch.kept_indices(i)
            torch.testing.assert_close(table[s, :, o + 1 : o + 1 + len(kept)], ref[:, kept], atol=1e-6, rtol=0)
            assert bool((table[s, :, o, :16] == 0).all() and (table[s, :, o, 16:] == 1).all())  # class token: no rotation
        pad = batch.padding_mask[:, None].expand(-1, 4, -1)
        assert bool((table[pad][:, :16] == 0).all() and (table[pad][:, 16:] == 1).all())


@pytest.mark.parametrize("window_size", [0, 3])
def test_packed_mixed_backbone_equals_one_image_at_a_time_with_token_dropping(window_size):
    torch.manual_seed(0)
    net = nd.build_backbone("navit_ti16", patch_size=P, depth=3, embed_dim=64, num_heads=4, class_token=True, reg_tokens=1,
                            rope="mixed", rope_temperature=10.0, rope_grid_indexing="xy", pos_embed="none",
                            window_size=window_size, global_pool="avg").eval()  # fmt: skip
    with torch.no_grad():  # distinct, non-trivial frequencies per block
        net.rope.freqs.mul_(3.0)
    ims = images([(40, 88), (64, 24), (56, 56), (16, 120)])
    pack = dict(patch_size=P, max_tokens_per_image=30, seq_len=96, num_prefix_tokens=net.num_prefix_tokens)
    drop = TokenDrop("constant", rate=0.3)
    with torch.no_grad():
        together = net(nd.pack_images(ims, **pack, token_drop=drop, seed=[5, 6, 7, 8]))
        assert together.batch.num_sequences < len(ims)
        for i, im in enumerate(ims):
            alone = net(nd.pack_images([im], **pack, token_drop=drop, seed=[5 + i]))
            torch.testing.assert_close(together.feature_maps[i], alone.feature_maps[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-5)
        # per-block frequencies matter: every block using block 0's changes the function
        shared = nd.build_backbone("navit_ti16", patch_size=P, depth=3, embed_dim=64, num_heads=4, class_token=True, reg_tokens=1,
                                   rope="mixed", rope_grid_indexing="xy", pos_embed="none", window_size=window_size,
                                   global_pool="avg").eval()  # fmt: skip
        shared.load_state_dict(net.state_dict())
        shared.rope.freqs.copy_(net.rope.freqs[:, :1].expand_as(net.rope.freqs))
        batch = nd.pack_images(ims, **pack)
        assert (shared(batch).tokens - net(batch).tokens).abs().max() > 1e-4


def test_mixed_frequencies_train_and_the_forward_adds_no_host_syncs():
    torch.manual_seed(0)
    net = nd.build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=64, num_heads=4, class_token=True,
                            rope="mixed", rope_shift_coords=1.0, rope_jitter_coords=1.2, rope_rescale_coords=1.5,
                            global_pool="avg").train()  # fmt: skip
    batch = nd.pack_images(images([(48, 48), (48, 48), (32, 72)]), P, 36, 96, num_prefix_tokens=1,
                           token_drop=TokenDrop("constant", rate=0.25), seed=[0, 1, 2])  # fmt: skip
    with HostSyncCounter() as syncs:
        net(batch).pooled.square().sum().backward()
    assert syncs.total == 0, dict(syncs.calls)
    grad = net.rope.freqs.grad
    assert grad is not None and bool((grad.abs().sum(dim=(0, 2, 3)) > 0).all())  # every block's frequencies learn
    assert "rope.freqs" in no_weight_decay_names(net)  # timm's module lists them
    # coordinate augmentation: one draw per image in training (same grid, different coordinates), none in eval
    batch = nd.pack_images(images([(48, 48), (48, 48)]), P, 36, 96, num_prefix_tokens=1)
    coords = mixed_rope_coords(net.rope, batch)
    lay = batch.layout
    a, b = (coords[lay.seq_index[i], lay.seq_offset[i] + 1 : lay.seq_offset[i] + 37] for i in range(2))
    assert not torch.allclose(a, b)
    assert bool((coords[batch.padding_mask] == 0).all() and (coords[batch.prefix_mask] == 0).all())
    net.eval()
    coords = mixed_rope_coords(net.rope, batch)
    patches = batch.token_index >= 0
    torch.testing.assert_close(coords[patches], batch.positions[patches].float().flip(-1) if net.rope.grid_indexing == "xy" else batch.positions[patches].float())


def test_mixed_rope_options_it_cannot_honour_are_refused():
    for bad, match in [(dict(rope_rotate_half=True), "rope_rotate_half"), (dict(rope_grid_offset=1.0), "rope_grid_offset"),
                       (dict(rope_ref_grid=14), "rope_ref_grid"), (dict(embed_dim=72, num_heads=4), "divisible by 4")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            nd.build_backbone("navit_ti16", **{"rope": "mixed", **bad})


def test_mixed_is_a_config_key_of_the_engine():
    c = to_object(load_config("configs/detection/owl_navit_tiny_synthetic_lvis.yaml",
                              ["model.backbone.rope=mixed", "model.backbone.rope_temperature=10", "model.backbone.rope_grid_indexing=xy"]))  # fmt: skip
    b = c.model.backbone
    assert b.rope == "mixed"
    net = build_backbone(b.name, **b.overrides())
    assert isinstance(net.rope, RotaryEmbeddingMixed) and net.rope.grid_indexing == "xy"
    assert tuple(net.rope.freqs.shape) == (2, b.depth, b.num_heads, b.embed_dim // b.num_heads // 2)
    with pytest.raises(ValueError, match="rope_rotate_half"):
        c = to_object(load_config("configs/detection/owl_navit_tiny_synthetic_lvis.yaml", ["model.backbone.rope=mixed", "model.backbone.rope_rotate_half=true"]))
        build_backbone(c.model.backbone.name, **c.model.backbone.overrides())


# ---- timm RoPE-ViT mixed -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_small_patch16_rope_mixed_224", "vit_small_patch16_rope_mixed_ape_224"])
def test_timm_rope_mixed_imports_with_parity(name):
    """RoPE-ViT RoPE-Mixed (class token, LayerScale, learned per-block frequencies, 'xy' grid;
    the _ape_ variant adds an absolute position table that skips the class token): random timm
    model at its own 224 x 224 input, and (dynamic_img_size) non-square images in one batch."""
    torch.manual_seed(0)
    ref = perturbed(timm.create_model(name, pretrained=False, depth=2))
    net = navit_from_timm(ref)
    cfg = net.cfg
    assert (cfg.rope, cfg.rope_grid_indexing, cfg.rope_temperature, cfg.global_pool) == ("mixed", "xy", 10.0, "token")
    assert cfg.pos_embed == ("learned2d" if "_ape_" in name else "none") and cfg.no_embed_class == ("_ape_" in name)
    torch.testing.assert_close(net.rope.freqs, ref.rope.freqs, atol=0, rtol=0)
    d_feat, d_pool = _patch_diffs(ref, net, [(224, 224)])
    assert d_feat <= TOL and d_pool <= TOL, (d_feat, d_pool)

    dyn = perturbed(timm.create_model(name, pretrained=False, depth=2, dynamic_img_size=True))
    net = navit_from_timm(dyn)
    d_feat, d_pool = _patch_diffs(dyn, net, [(160, 224), (224, 96)])
    assert d_feat <= TOL and d_pool <= TOL, (d_feat, d_pool)
    # the coordinate convention is part of the function: 'ij' would swap x and y
    wrong = navit_from_timm(dyn, rope_grid_indexing="ij")
    assert _patch_diffs(dyn, wrong, [(160, 224)])[0] > 1e-3


def test_timm_rope_mixed_file_loads_through_model_backbone_init(tmp_path):
    """A RoPE-ViT mixed weights file (timm names: rope.freqs, gamma_1 / gamma_2) starts a NaViT
    configured from the engine config (model.backbone.rope=mixed) that computes timm's features."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, depth=2))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    layout = ["name=navit_s16", "embed_dim=384", "num_heads=6", "depth=2", "class_token=true", "init_values=1.0e-5", "pos_embed=none", "rope=mixed", "conv_stem=[]",
              "rope_temperature=10", "rope_grid_indexing=xy", "global_pool=none", "mask_fill=zeros"]  # fmt: skip
    c = to_object(load_config("configs/detection/owl_navit_tiny_synthetic_lvis.yaml",
                              [f"model.backbone.{kv}" for kv in layout] + [f"model.backbone.init.path={tmp_path / 'model.safetensors'}"]))  # fmt: skip
    b = c.model.backbone
    net = build_backbone(b.name, **b.overrides()).eval()
    report = load_pretrained(net, b.init.path, b.init.format)
    assert report["format"] == "timm" and report["kept_initialised"] == []
    assert report["skipped_source_keys"] == ["head.bias", "head.weight"]  # the ImageNet classifier
    torch.testing.assert_close(net.rope.freqs, ref.rope.freqs, atol=0, rtol=0)
    d_feat, _ = _patch_diffs(ref, net, [(224, 224)])
    assert d_feat <= TOL, d_feat
    # a NaViT without mixed RoPE has no place for the learned frequencies: named, not dropped
    axial = build_backbone(b.name, **{**b.overrides(), "rope": "cat"})
    with pytest.raises(ValueError, match=r"rope\.freqs"):
        load_pretrained(axial, b.init.path, b.init.format)


# ---- timm Perception Encoder ---------------------------------------------------------------------
PE_CASES = [
    # (model, create kwargs, input size, import overrides)
    ("vit_pe_core_tiny_patch16_384", {}, 384, dict(global_pool="none")),
    ("vit_pe_spatial_tiny_patch16_512", {}, 512, {}),
    ("vit_pe_lang_large_patch14_448", dict(embed_dim=128, num_heads=2), 448, {}),  # narrowed: same layout, fewer FLOPs
]


@pytest.mark.parametrize("name, kwargs, size, overrides", PE_CASES, ids=[c[0] for c in PE_CASES])
def test_timm_perception_encoder_imports_with_parity(name, kwargs, size, overrides):
    """PE (axial RoPE on an 'xy' grid with offset 1 and a reference grid, absolute positions
    with the class token, pre-norm; spatial / lang: no final norm, LayerScale in lang): random
    timm model, one image at its own input size, plus a non-square image (dynamic_img_size)."""
    torch.manual_seed(0)
    ref = perturbed(timm.create_model(name, pretrained=False, depth=2, **kwargs))
    net = navit_from_timm(ref, **overrides)
    cfg = net.cfg
    assert (cfg.rope, cfg.rope_grid_indexing, cfg.rope_grid_offset, cfg.pre_norm) == ("cat", "xy", 1.0, True)
    assert cfg.final_norm == ("core" in name) and cfg.global_pool == ("none" if "core" in name else "avg")
    d_feat, d_pool = _patch_diffs(ref, net, [(size, size)])
    assert d_feat <= TOL and d_pool <= TOL, (d_feat, d_pool)
    dyn = perturbed(timm.create_model(name, pretrained=False, depth=2, dynamic_img_size=True, **kwargs))
    d_feat, d_pool = _patch_diffs(dyn, navit_from_timm(dyn, **overrides), [(size // 2, size)])
    assert d_feat <= TOL and d_pool <= TOL, (d_feat, d_pool)


def test_perception_encoder_core_trunk_import_leaves_out_the_pool():
    """PE core pools with an 8-head attention pool over a trunk with another head count (imported
    with map_num_heads: tests/test_weight_import.py); global_pool='none' imports the trunk alone
    and leaves out exactly attn_pool.* / head.*."""
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=1))
    assert navit_from_timm(ref).cfg.map_num_heads == 8
    net = navit_from_timm(ref, global_pool="none")  # strict: every other source tensor is used
    assert net.attn_pool is None and isinstance(net.head, nn.Identity) and net.cfg.num_classes == 0
    assert {k.split(".")[0] for k in ref.state_dict()} - {k.split(".")[0] for k in net.state_dict()} == {"attn_pool", "head", "cls_token"}
