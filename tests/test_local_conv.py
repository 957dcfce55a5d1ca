"""local_conv: a depthwise conv on each image's own grid. It equals a plain conv2d on every
image's token map (zeros beyond the border and at dropped cells), and packing stays exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import navit_dense as nd
from navit_dense.data import TokenDrop
from navit_dense.models import unpack_to_maps
from navit_dense.models.navit import GridConv, NaViT


def pack(images, seq_len=64, **kw):
    return nd.pack_images(images, patch_size=8, max_tokens_per_image=48, seq_len=seq_len, **kw)


def images(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=gen) for h, w in ((40, 96), (120, 24), (64, 64), (24, 24))]


@pytest.mark.parametrize("drop", [None, TokenDrop(mode="constant", rate=0.4)])
def test_grid_conv_equals_conv2d_on_each_image_map(drop):
    torch.manual_seed(0)
    batch = pack(images(), token_drop=drop, seed=5)
    assert batch.num_sequences > 1  # images share and span sequences
    D = 6
    x = torch.randn(*batch.segment_ids.shape, D).masked_fill(batch.padding_mask[..., None], 0.0)
    conv = GridConv(D, 3)
    cells = torch.from_numpy(batch.layout.padded_cells)
    out = conv(x, batch, cells)
    flat_out = batch.flat(out)
    others = torch.ones(flat_out.shape[0], dtype=torch.bool)
    others[batch.patch_slots] = False
    assert torch.count_nonzero(flat_out[others]) == 0  # prefix / padding slots get nothing
    maps = unpack_to_maps(x, batch)  # [D, h, w] per image, zeros at dropped cells
    got = unpack_to_maps(out, batch)
    for i, (m, g) in enumerate(zip(maps, got)):
        ref = F.conv2d(m[None], conv.conv.weight, conv.conv.bias, padding=1, groups=D)[0]
        kept = torch.zeros(m.shape[1] * m.shape[2], dtype=torch.bool)
        kept[batch.kept_indices(i)] = True
        kept = kept.view(m.shape[1:])
        torch.testing.assert_close(g[:, kept], ref[:, kept], atol=1e-5, rtol=0)


def test_backbone_with_local_conv_packed_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = nd.build_backbone("navit_ti16", embed_dim=32, depth=2, num_heads=2, patch_size=8, local_conv=3, rope="cat",
                              pos_embed="none", global_pool="avg", class_token=True).eval()  # fmt: skip
    ims = images(1)
    with torch.no_grad():
        packed = model(pack(ims, num_prefix_tokens=1))
        for i, im in enumerate(ims):
            single = model(pack([im], num_prefix_tokens=1))
            torch.testing.assert_close(packed.feature_maps[i], single.feature_maps[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(packed.pooled[i], single.pooled[0], atol=1e-5, rtol=0)
    # it trains: every conv gets a gradient
    model.train()
    model(pack(ims, num_prefix_tokens=1)).pooled.sum().backward()
    assert all(c.conv.weight.grad is not None and c.conv.weight.grad.abs().sum() > 0 for c in model.local_convs)


def test_local_conv_must_be_odd():
    with pytest.raises(ValueError, match="odd kernel"):
        nd.build_backbone("navit_ti16", embed_dim=32, depth=1, num_heads=2, local_conv=2)


def test_local_conv_added_to_an_imported_trunk_starts_as_identity(tmp_path):
    """A pretrained trunk has no local convs: import (navit_from_timm, load_pretrained) zeroes
    them, so the model computes the source's function exactly, and they still learn (non-zero
    gradients at the zero weights)."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from conftest import perturbed
    from navit_dense.models.pretrained import load_pretrained
    from navit_dense.models.weight_import import navit_from_timm

    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, global_pool="avg", num_classes=0))
    plain = navit_from_timm(ref)
    added = navit_from_timm(ref, local_conv=3)
    assert all((p == 0).all() for p in added.local_convs.parameters())
    ims = [torch.rand(3, 64, 96), torch.rand(3, 48, 32)]
    batch = nd.pack_images(ims, patch_size=16, max_tokens_per_image=64, num_prefix_tokens=plain.num_prefix_tokens)
    torch.testing.assert_close(added(batch).tokens, plain(batch).tokens, atol=0, rtol=0)

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    net = NaViT(replace(plain.cfg, local_conv=3))
    report = load_pretrained(net, tmp_path / "vit.safetensors")
    assert report["zero_initialised"] == [f"local_convs.{i}.conv.{p}" for i in range(2) for p in ("bias", "weight")]
    assert not any(k.startswith("local_convs.") for k in report["kept_initialised"])
    net.train()
    net(batch).tokens.square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in net.local_convs.parameters())
    # a NaViT checkpoint with trained convs keeps them
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    saved["local_convs.0.conv.weight"].fill_(0.5)
    save_file(saved, str(tmp_path / "navit.safetensors"))
    report = load_pretrained(net, tmp_path / "navit.safetensors")
    assert report["zero_initialised"] == [] and (net.local_convs[0].conv.weight == 0.5).all()


def test_benchmark_seg_default_model_has_local_conv_and_checkpoints_must_match_the_variant(tmp_path):
    """tools/benchmark_seg.py trains the local-conv model unless told otherwise, records it, and
    refuses a checkpoint of another variant (mmengine would load it non-strictly, leaving the
    convs random) with the --backbone fields to pass."""
    import json

    from conftest import load_tool

    load_tool("make_synthetic_seg").make_synthetic_seg(tmp_path / "data", seed=0, n_train=4, n_val=2, min_side=64, max_side=96)
    tool = load_tool("benchmark_seg")
    common = ["--data-root", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work"), "--max-res", "64",
              "--num-images", "2", "--batch", "2"]  # fmt: skip
    try:
        assert tool.main(["--json", str(tmp_path / "a.json"), "--train-iters", "2", "--seed", "3", *common]) == 0
        report = json.loads((tmp_path / "a.json").read_text())
        assert report["weights"]["backbone"] == {"local_conv": 3} and report["weights"]["seed"] == 3
        checkpoint = report["weights"]["checkpoint"]
        with pytest.raises(SystemExit, match="local_conv=0"):
            tool.main(["--json", str(tmp_path / "b.json"), "--checkpoint", checkpoint, "--backbone", "local_conv=0", *common])
        assert tool.main(["--json", str(tmp_path / "c.json"), "--checkpoint", checkpoint, *common]) == 0
    finally:
        torch.set_num_threads(1)
    again = json.loads((tmp_path / "c.json").read_text())
    assert [r["mIoU"] for r in again["rows"]] == [r["mIoU"] for r in report["rows"]]  # the same weights, loaded


def test_local_conv_weight_strides_match_its_gradient_under_ddp(tmp_path):
    """The grid is channels-last in memory, so the conv weight's gradient is too; the weight is
    laid out the same way, or DDP warns ("Grad strides do not match bucket view strides") and
    copies every step. Single-process gloo DDP, two steps, no warning."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Loss(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net(batch).tokens.square().mean()

    net = nd.build_backbone("navit_ti16", depth=2, local_conv=3, embed_dim=32, num_heads=2, patch_size=8, global_pool="none")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(Loss(net), find_unused_parameters=True)
        batch = pack(images())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                ddp(batch).backward()
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "strides" in str(w.message)], [str(w.message) for w in caught]
    for conv in net.local_convs:
        assert conv.conv.weight.stride() == conv.conv.weight.grad.stride()
