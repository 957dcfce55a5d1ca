"""NaViT backbone: packed == one-image-at-a-time == dense-mask reference, positions, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import navit_dense as nd
from navit_dense.data import TokenDrop
from navit_dense.models import AttentionContext, SimpleFeaturePyramid, dense_block_mask, maps_to_padded, packed_attention

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)


def tiny(**kw):
    torch.manual_seed(0)
    return nd.build_backbone("navit_ti16", **{**TINY, **kw}).eval()


def pack(images, budget=48, seq_len=128, **kw):
    return nd.pack_images(images, patch_size=8, max_tokens_per_image=budget, seq_len=seq_len, **kw)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def assert_packed_equals_single(model, images, prefix=0, **pack_kw):
    with torch.no_grad():
        packed = model(pack(images, num_prefix_tokens=prefix, **pack_kw))
        singles = [model(pack([im], num_prefix_tokens=prefix, **pack_kw)) for im in images]
    assert max_diff(packed.feature_maps, [s.feature_maps[0] for s in singles]) <= 1e-5
    assert max_diff(list(packed.pooled), [s.pooled[0] for s in singles]) <= 1e-5
    return packed


image_sizes = st.lists(st.tuples(st.integers(8, 120), st.integers(8, 120)), min_size=2, max_size=6)


@given(sizes=image_sizes, pos_embed=st.sampled_from(["factorized", "fractional", "sincos2d", "learned2d"]))
def test_packed_matches_one_image_at_a_time(sizes, pos_embed):
    gen = torch.Generator().manual_seed(len(sizes))
    images = [torch.rand(3, h, w, generator=gen) for h, w in sizes]
    model = tiny(pos_embed=pos_embed, pos_embed_grid=6)  # grids up to 48 cells exceed the 6-cell tables
    out = assert_packed_equals_single(model, images)
    assert [tuple(m.shape[1:]) for m in out.feature_maps] == [tuple(g) for g in out.batch.grid_sizes.tolist()]


@pytest.mark.parametrize("global_pool, class_token, reg_tokens", [("token", True, 0), ("avg", True, 4), ("map", False, 2)])
def test_prefix_tokens_and_pooling_modes(global_pool, class_token, reg_tokens):
    model = tiny(global_pool=global_pool, class_token=class_token, reg_tokens=reg_tokens, qk_norm=True, init_values=0.1, pre_norm=True)
    images = [torch.rand(3, 40, 96), torch.rand(3, 120, 24), torch.rand(3, 64, 64)]
    out = assert_packed_equals_single(model, images, prefix=model.num_prefix_tokens)
    assert out.prefix_tokens.shape == (3, model.num_prefix_tokens, 32)
    with pytest.raises(ValueError, match="num_prefix_tokens=model.num_prefix_tokens"):
        model(pack(images))


@pytest.mark.parametrize("kernel", ["segment", "dense"])
def test_each_kernel_packed_equals_one_image_at_a_time(kernel):
    # The dense reference kernel too: its block mask must keep the images apart.
    images = [torch.rand(3, 16 * k, 8 * (5 - k)) for k in range(1, 5)]
    assert_packed_equals_single(tiny(attn_kernel=kernel), images, seq_len=64)


def test_segment_kernel_agrees_with_dense_reference():
    images = [torch.rand(3, 16 * k, 8 * (5 - k)) for k in range(1, 5)]
    batch = pack(images, seq_len=64)
    ref, model = tiny(attn_kernel="dense"), tiny(attn_kernel="segment")
    with torch.no_grad():
        a, b = ref(batch), model(batch)
    assert max_diff(a.feature_maps, b.feature_maps) <= 1e-5
    assert float((a.pooled - b.pooled).abs().max()) <= 1e-5


def test_flex_attention_forward_on_cpu_matches_segment():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from navit_dense.models.attention import packed_attention

    batch = pack([torch.rand(3, 64, 32), torch.rand(3, 24, 80), torch.rand(3, 48, 48)], seq_len=128)
    q, k, v = torch.randn(3, batch.num_sequences, 2, batch.seq_len, 16).unbind(0)
    seg = packed_attention(q, k, v, AttentionContext(batch, "segment"))
    flex = packed_attention(q, k, v, AttentionContext(batch, "flex"))
    torch.testing.assert_close(flex, seg, atol=1e-5, rtol=1e-5)


def test_no_cross_image_leakage():
    model = tiny()
    a, b = torch.rand(3, 64, 48), torch.rand(3, 48, 64)
    with torch.no_grad():
        out1 = model(pack([a, b], seq_len=256))
        out2 = model(pack([a, torch.rand(3, 48, 64)], seq_len=256))
    assert out1.batch.num_sequences == 1  # both images share one sequence
    torch.testing.assert_close(out1.feature_maps[0], out2.feature_maps[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out1.pooled[0], out2.pooled[0], atol=1e-6, rtol=0)
    mask = dense_block_mask(out1.batch)[0, 0]
    n0 = int(out1.batch.run_lengths[0])
    assert not bool(mask[:n0, n0:].any()) and bool(mask[:n0, :n0].all())


@pytest.mark.parametrize("pos_embed", ["factorized", "fractional", "sincos2d", "learned2d"])
def test_large_grids_stay_finite(pos_embed):
    model = tiny(pos_embed=pos_embed, pos_embed_grid=4)
    with torch.no_grad():
        out = model(pack([torch.rand(3, 8 * 40, 8 * 3), torch.rand(3, 8 * 9, 8 * 9)], budget=128, seq_len=256))
    assert all(bool(torch.isfinite(m).all()) for m in out.feature_maps)
    assert bool(torch.isfinite(out.pooled).all())


def test_factorized_positions_read_their_table_rows():
    model = tiny(pos_embed="factorized", pos_embed_grid=16)
    batch = pack([torch.rand(3, 8 * 3, 8 * 5)], budget=15)
    emb = model.pos_embed(batch)[0, :15]
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    expected = model.pos_embed.row[rows.flatten()] + model.pos_embed.col[cols.flatten()]
    torch.testing.assert_close(emb, expected)
    frac = tiny(pos_embed="fractional", pos_embed_grid=3)
    emb = frac.pos_embed(pack([torch.rand(3, 8 * 3, 8 * 3)], budget=9))[0, :9]
    r, c = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    torch.testing.assert_close(emb, frac.pos_embed.row[r.flatten()] + frac.pos_embed.col[c.flatten()])


def test_learned2d_resize_is_per_image_bilinear():
    model = tiny(pos_embed="learned2d", pos_embed_grid=4, pos_embed_mode="bilinear")
    batch = pack([torch.rand(3, 8 * 4, 8 * 4), torch.rand(3, 8 * 2, 8 * 6)], budget=16, seq_len=64)
    emb = model.pos_embed(batch)
    table = model.pos_embed.weight
    s, o = int(batch.seq_index[0]), int(batch.seq_offset[0])
    torch.testing.assert_close(emb[s, o : o + 16], table.reshape(16, -1))
    resized = torch.nn.functional.interpolate(table.permute(2, 0, 1)[None], size=(2, 6), mode="bilinear", align_corners=False, antialias=True)
    s, o = int(batch.seq_index[1]), int(batch.seq_offset[1])
    torch.testing.assert_close(emb[s, o : o + 12], resized[0].permute(1, 2, 0).reshape(12, -1))


def test_token_drop_feature_maps_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = nd.build_backbone("navit_ti16", **TINY, num_classes=5, drop_path_rate=0.1, class_token=True, qk_norm=True, init_values=0.5).train()
    images = [torch.rand(3, 64, 48), torch.rand(3, 40, 96), torch.rand(3, 96, 24)]
    batch = pack(images, token_drop=TokenDrop("constant", rate=0.5), num_prefix_tokens=1, seed=1)
    out = model(batch)
    loss = out.pooled.pow(2).mean() + sum((m * torch.randn_like(m)).mean() for m in out.feature_maps)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(torch.isfinite(p.grad).all()) or float(p.grad.abs().sum()) == 0]
    assert missing == []
    for i, m in enumerate(out.feature_maps):
        h, w = batch.grid_sizes[i].tolist()
        dropped = torch.ones(h * w, dtype=torch.bool)
        dropped[batch.kept_indices(i)] = False
        flat = m.detach().flatten(1).T
        assert bool((flat[dropped] == model.mask_token.detach()).all())
        assert int(dropped.sum()) == h * w - int(batch.num_kept[i])


def test_zero_fill_for_dropped_tokens_and_eval_determinism():
    model = tiny(mask_fill="zeros")
    batch = pack([torch.rand(3, 64, 64)], token_drop=TokenDrop("constant", rate=0.75), seed=0)
    with torch.no_grad():
        fmap = model(batch).feature_maps[0].flatten(1).T
        again = model(batch).feature_maps[0].flatten(1).T
    assert torch.equal(fmap, again)  # eval mode: no drop path, no randomness
    dropped = torch.ones(fmap.shape[0], dtype=torch.bool)
    dropped[batch.kept_indices(0)] = False
    assert bool((fmap[dropped] == 0).all()) and bool((fmap[~dropped].abs().sum(1) > 0).all())  # exactly the dropped cells


def test_padded_view_and_pyramid():
    model = tiny()
    images = [torch.rand(3, 8 * 2, 8 * 9), torch.rand(3, 8 * 7, 8 * 3), torch.rand(3, 8, 8 * 6)]
    with torch.no_grad():
        out = model(pack(images, budget=64, allow_upscale=False))
        padded, valid = out.padded(size_divisibility=4)
    assert padded.shape == (3, 32, 8, 12) and valid.shape == (3, 8, 12)
    for i, m in enumerate(out.feature_maps):
        h, w = m.shape[1:]
        assert torch.equal(padded[i, :, :h, :w], m) and int(valid[i].sum()) == h * w
        assert float(padded[i].abs().sum()) == pytest.approx(float(m.abs().sum()), rel=1e-6)
    pyramid = SimpleFeaturePyramid(32, 16, in_stride=8).eval()
    with torch.no_grad():
        levels = pyramid(out.feature_maps)
        alone = pyramid([out.feature_maps[1]])
    assert pyramid.strides == (2, 4, 8, 16)
    for i, m in enumerate(out.feature_maps):
        h, w = m.shape[1:]
        assert [tuple(levels[n][i].shape) for n in pyramid.names] == [(16, 4 * h, 4 * w), (16, 2 * h, 2 * w), (16, h, w), (16, -(-h // 2), -(-w // 2))]
    for n in pyramid.names:
        torch.testing.assert_close(levels[n][1], alone[n][0])
    default = SimpleFeaturePyramid(192)
    assert default.names == ("p2", "p3", "p4", "p5") and default.strides == (4, 8, 16, 32)


def test_out_indices_and_intermediates():
    model = tiny(out_indices=(0, 1))
    with torch.no_grad():
        out = model(pack([torch.rand(3, 40, 64)]))
    assert sorted(out.intermediates) == [0, 1]
    assert out.feature_maps is out.intermediates[1]
    assert not torch.allclose(out.intermediates[0][0], out.intermediates[1][0])


def test_real_photos_through_the_whole_path(photos):
    model = nd.build_backbone("navit_ti16", depth=2).eval()
    batch = nd.pack_images(photos, patch_size=16, max_tokens_per_image=256, seq_len=1024)
    batch.validate()
    shapes = [tuple(p.shape[1:]) for p in photos]
    assert len(set(round(h / w, 1) for h, w in shapes)) >= 4  # genuinely different aspect ratios
    with torch.no_grad():
        out = model(batch)
        single = model(nd.pack_images([photos[2]], 16, 256, 1024))
    for (H, W), m in zip(shapes, out.feature_maps):
        h, w = m.shape[1:]
        assert h * w <= 256 and abs(h / w - H / W) <= max(H / W / w, H / W / h) * 1.01 + 1e-6 or min(h, w) == 1
    torch.testing.assert_close(out.feature_maps[2], single.feature_maps[0], atol=1e-5, rtol=0)
    assert out.pooled.shape == (len(photos), 192) and bool(torch.isfinite(out.pooled).all())


def test_build_backbone_names_and_errors():
    assert nd.list_models() == ["navit_b16", "navit_l16", "navit_s16", "navit_ti16"]
    cfg = nd.build_backbone("navit_b16", depth=1).cfg
    assert (cfg.embed_dim, cfg.num_heads, cfg.patch_size) == (768, 12, 16)
    with pytest.raises(ValueError, match="unknown model"):
        nd.build_backbone("navit_x16")
    with pytest.raises(TypeError, match="embed_dimm"):
        nd.build_backbone("navit_ti16", embed_dimm=3)
    with pytest.raises(TypeError, match="PackedBatch"):
        tiny()(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="patch_size=16"):
        tiny()(nd.pack_images([torch.rand(3, 32, 32)], 16, 4, 16))


def test_packed_batch_to_and_maps_to_padded_roundtrip():
    batch = pack([torch.rand(3, 32, 48), torch.rand(3, 16, 16)])
    moved = batch.to("cpu")
    moved.validate()
    assert moved.pad_fraction == batch.pad_fraction
    maps = [torch.rand(4, 2, 3), torch.rand(4, 5, 1)]
    padded, valid = maps_to_padded(maps)
    assert padded.shape == (2, 4, 5, 3) and int(valid.sum()) == 11


def test_features_only_backbone_has_no_pooling_head():
    model = tiny(global_pool="none")
    assert model.attn_pool is None
    with torch.no_grad():
        out = model(pack([torch.rand(3, 40, 64)]))
    assert out.pooled is None and out.feature_maps[0].shape[0] == 32
    with pytest.raises(ValueError, match="num_classes needs a pooled vector"):
        tiny(global_pool="none", num_classes=3)


@pytest.mark.parametrize("block", [128, 32])
def test_flex_block_mask_from_the_layout_equals_create_block_mask(block):
    """The FlexAttention document mask is built from the host layout (no [S, L, L] tensor);
    its partial and full tiles are exactly what create_block_mask derives from the dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from navit_dense.models.attention import document_block_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        n = int(torch.randint(1, 12, (1,), generator=g))
        sizes = [(int(h), int(w)) for h, w in torch.randint(16, 200, (n, 2), generator=g)]
        drop = TokenDrop("constant", rate=0.3) if trial % 3 == 0 else None
        batch = nd.pack_images([torch.rand(3, h, w, generator=g) for h, w in sizes], 8, 200, 512, num_prefix_tokens=trial % 2, token_drop=drop)
        seg = batch.segment_ids

        def same_image(b, h, q, kv):
            return (seg[b, q] == seg[b, kv]) & (seg[b, q] >= 0)

        S, L = seg.shape
        ref = flex.create_block_mask(same_image, S, None, L, L, device="cpu", BLOCK_SIZE=block)
        ours = document_block_mask(batch, block)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            assert torch.equal(getattr(ours, name).long(), getattr(ref, name).long()), name
        assert document_block_mask(batch, block) is ours  # built once per batch


def test_varlen_wrapper_gathers_and_scatters_tokens_with_a_reference_kernel(monkeypatch):
    """flash varlen runs only on CUDA; its wrapper (token gather by valid slots, cu_seqlens, the
    scatter back with zeros at padding) is checked on CPU with a reference varlen kernel."""
    import torch.nn.attention.varlen as varlen
    import torch.nn.functional as F

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, **_):  # [T, H, Dh], runs delimited by cu_seqlens
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        bounds = cu_q.tolist()
        return torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)).transpose(0, 1)
                          for a, b in zip(bounds[:-1], bounds[1:])])  # fmt: skip

    monkeypatch.setattr(varlen, "varlen_attn", reference)
    batch = nd.pack_images([torch.rand(3, h, w) for h, w in [(40, 90), (100, 30), (64, 64), (20, 200)]], 8, 60, 160, num_prefix_tokens=1,
                           token_drop=TokenDrop("constant", rate=0.3), seed=[0, 1, 2, 3])  # fmt: skip
    S, L, H, Dh = batch.num_sequences, batch.seq_len, 2, 8
    q, k, v = (torch.randn(S, H, L, Dh, requires_grad=True) for _ in range(3))
    ref = packed_attention(q, k, v, AttentionContext(batch, "segment"))
    out = packed_attention(q, k, v, AttentionContext(batch, "varlen"))
    torch.testing.assert_close(out, ref)
    assert bool((out[batch.padding_mask] == 0).all())
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
