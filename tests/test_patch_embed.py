"""The per-patch conv stem: packing stays exact, it is what the config asks for, bad shapes fail early."""

from __future__ import annotations

import pytest
import torch

import navit_dense as nd
from navit_dense.data import TokenDrop
from navit_dense.models.patch_embed import PatchConvStem


def pack(images, **kw):
    return nd.pack_images(images, patch_size=8, max_tokens_per_image=48, seq_len=128, **kw)


def test_conv_stem_packed_equals_one_image_at_a_time_with_token_dropping():
    torch.manual_seed(0)
    model = nd.build_backbone("navit_ti16", embed_dim=32, depth=2, num_heads=2, patch_size=8, conv_stem=(8, 16), rope="cat",
                              pos_embed="none", global_pool="avg").eval()  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in ((40, 96), (120, 24), (64, 64))]
    with torch.no_grad():
        packed = model(pack(images))
        for i, im in enumerate(images):
            single = model(pack([im]))
            torch.testing.assert_close(packed.feature_maps[i], single.feature_maps[0], atol=1e-5, rtol=0)
    # Dropped tokens are absent, the kept ones see only their own patch: same token as without dropping.
    drop = TokenDrop(mode="constant", rate=0.5)
    batch = pack(images, token_drop=drop, seed=3)
    full = pack(images)
    with torch.no_grad():
        kept = batch.flat(model.patch_embed(batch.patches))[batch.patch_slots]
        ref = full.flat(model.patch_embed(full.patches))[full.patch_slots]
    index = torch.cat([full.layout.token_offsets[i] + batch.kept_indices(i) for i in range(len(images))])
    torch.testing.assert_close(kept, ref[index], atol=1e-6, rtol=0)


def test_conv_stem_is_a_conv_net_on_each_patch():
    stem = PatchConvStem(3, 16, (8, 16, 32), 24)
    x = torch.randn(5, 3 * 16 * 16)
    assert stem(x).shape == (5, 24)
    assert [m.conv.stride for m in stem.convs] == [(2, 2)] * 3 and stem.proj.in_features == 32 * 2 * 2
    # one patch alone gives the same token: no mixing across the patches of a batch
    torch.testing.assert_close(stem(x[2:3]), stem(x)[2:3])
    with pytest.raises(ValueError, match="divisible by 2"):
        PatchConvStem(3, 14, (8, 16), 24)


def test_conv_stem_from_the_engine_config():
    import navit_dense.tasks  # noqa: F401
    from navit_dense.engine.config import load_config

    cfg = load_config("configs/detection/owl_navit_tiny_synthetic_lvis.yaml", ["model.backbone.conv_stem=[16,32]"])
    assert tuple(cfg.model.backbone.conv_stem) == (16, 32)
