"""2D rotary position embeddings in the packed backbone, through timm's own RoPE modules: each
patch token is rotated by its own image grid's embedding at its own (row, col) (kept tokens keep
their coordinates under token dropping), prefix slots and padding are not rotated, and a packed
batch equals running each image alone."""

from __future__ import annotations

import pytest
import torch

import navit_dense as nd
from navit_dense.data import TokenDrop
from navit_dense.engine.config import BackboneConfig
from navit_dense.models.pos_embed import build_rope, packed_rope

P = 8


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("kind, options", [("cat", {}), ("cat", {"ref_grid": 7}), ("dinov3", {})])
def test_packed_tables_are_timms_embeddings_at_each_kept_token(kind, options):
    rope = build_rope(kind, 64, 4, **options).eval()
    batch = nd.pack_images(images([(40, 88), (64, 24), (56, 56)]), P, 30, 96, num_prefix_tokens=1,
                           token_drop=TokenDrop("constant", rate=0.4), seed=[1, 2, 3])  # fmt: skip
    table = packed_rope(rope, batch)[:, 0]  # [S, L, 2 * Dh]
    lay = batch.layout
    for i, (h, w) in enumerate(lay.grids):
        ref = rope.get_embed((h, w)).reshape(h * w, -1)
        s, o = lay.seq_index[i], lay.seq_offset[i]
        kept = batch.kept_indices(i)
        torch.testing.assert_close(table[s, o + 1 : o + 1 + len(kept)], ref[kept])
        half = table.shape[-1] // 2
        assert bool((table[s, o, :half] == 0).all() and (table[s, o, half:] == 1).all())  # the class token is not rotated
    pad = batch.padding_mask
    assert bool((table[pad][:, :half] == 0).all() and (table[pad][:, half:] == 1).all())


@pytest.mark.parametrize("kind", ["cat", "dinov3"])
@pytest.mark.parametrize("rotate_half", [False, True])
def test_packed_rope_backbone_equals_one_image_at_a_time(kind, rotate_half):
    torch.manual_seed(0)
    net = nd.build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=64, num_heads=4, class_token=True, reg_tokens=1,
                            rope=kind, rope_rotate_half=rotate_half, pos_embed="none" if kind == "dinov3" else "learned2d",
                            pos_embed_grid=6, global_pool="avg").eval()  # fmt: skip
    ims = images([(40, 88), (64, 24), (56, 56), (16, 120)])
    pack = dict(patch_size=P, max_tokens_per_image=30, seq_len=96, num_prefix_tokens=net.num_prefix_tokens)
    with torch.no_grad():
        together = net(nd.pack_images(ims, **pack))
        for i, im in enumerate(ims):
            alone = net(nd.pack_images([im], **pack))
            torch.testing.assert_close(together.feature_maps[i], alone.feature_maps[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-5)
    # RoPE changes the function (a control that the rotation is applied at all)
    plain = nd.build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=64, num_heads=4, class_token=True, reg_tokens=1,
                              pos_embed="none" if kind == "dinov3" else "learned2d", pos_embed_grid=6, global_pool="avg").eval()  # fmt: skip
    plain.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        assert (plain(nd.pack_images(ims, **pack)).tokens - together.tokens).abs().max() > 1e-4


def test_dinov3_augmentation_draws_once_per_image_in_training():
    rope = build_rope("dinov3", 64, 4, shift_coords=0.5).train()
    batch = nd.pack_images(images([(48, 48), (48, 48)]), P, 36, 96)
    torch.manual_seed(0)
    table = packed_rope(rope, batch)[:, 0]
    a, b = (table[batch.layout.seq_index[i], batch.layout.seq_offset[i] : batch.layout.seq_offset[i] + 36] for i in range(2))
    assert not torch.allclose(a, b)  # same grid, independent coordinate shifts
    rope.eval()
    e = packed_rope(rope, batch)[:, 0]
    a, b = (e[batch.layout.seq_index[i], batch.layout.seq_offset[i] : batch.layout.seq_offset[i] + 36] for i in range(2))
    torch.testing.assert_close(a, b)  # no augmentation at evaluation


def test_rope_is_a_config_key():
    fields = {f for f in BackboneConfig.__dataclass_fields__}
    assert {"rope", "rope_rotate_half", "rope_ref_grid", "rope_shift_coords"} <= fields
    with pytest.raises(ValueError, match="unknown rope"):
        nd.build_backbone("navit_ti16", rope="spiral")
