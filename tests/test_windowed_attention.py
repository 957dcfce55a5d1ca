"""ViTDet windowed attention inside packed sequences: each image's own grid is cut into windows
(padding inside a window is masked; windows never cross images), patch tokens attend to their
window and their image's prefix tokens, prefix tokens to their whole image. Checked against a
reference built on timm's ``window_partition`` and against timm's ViTDet (SAM) blocks; packed
equals one image at a time with token dropping, RoPE, learned position grids and prefix tokens;
every kernel agrees; the window layout comes from the host layout (no host syncs)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import window_partition, window_unpartition

import navit_dense as nd
from navit_dense.data import TokenDrop
from navit_dense.engine.config import load_config, to_object
from navit_dense.models import AttentionContext, packed_attention
from navit_dense.models.attention import attention_pairs, window_layout
from navit_dense.utils.host_sync import HostSyncCounter

from conftest import ROOT

P = 8
SIZES = [(40, 88), (64, 24), (56, 56), (16, 120), (72, 48)]


def images(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def pack(ims, prefix=0, drop=None, seeds=None, budget=40, seq_len=96):
    return nd.pack_images(ims, P, budget, seq_len, num_prefix_tokens=prefix, token_drop=drop,
                          seed=list(seeds if seeds is not None else range(len(ims))))  # fmt: skip


def reference_windowed(q, k, v, grid, kept, ws, prefix):
    """One image run ([H, prefix + kept, Dh] each) the plain way: scatter the kept tokens onto
    the full grid, timm's window_partition (its zero padding and the dropped cells masked as
    keys), each window's queries over [prefix keys, window keys]; prefix queries over the run."""
    H, _, Dh = q.shape
    h, w = grid

    def on_grid(x):
        full = x.new_zeros(h * w, H * Dh)
        full[kept] = x[:, prefix:].transpose(0, 1).reshape(-1, H * Dh)
        return full.view(1, h, w, H * Dh)

    valid = torch.zeros(h * w, dtype=torch.bool)
    valid[kept] = True
    valid_win = window_partition(valid.view(1, h, w, 1).float(), ws)[0].reshape(-1, ws * ws) > 0  # [nW, ws * ws]
    qw, kw, vw = (window_partition(on_grid(x), ws)[0].reshape(-1, ws * ws, H, Dh).transpose(1, 2) for x in (q, k, v))
    nW = qw.shape[0]
    kp, vp = (x[:, :prefix][None].expand(nW, -1, -1, -1) for x in (k, v))
    mask = torch.cat([torch.ones(nW, prefix, dtype=torch.bool), valid_win], 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(qw, torch.cat([kp, kw], 2), torch.cat([vp, vw], 2), attn_mask=mask)  # [nW, H, ws*ws, Dh]
    out = window_unpartition(out.transpose(1, 2).reshape(nW, ws, ws, H * Dh), ws, (h, w), (-(-h // ws) * ws, -(-w // ws) * ws))
    patches = out.reshape(h * w, H, Dh)[kept]
    prefix_out = F.scaled_dot_product_attention(q[:, :prefix], k, v).transpose(0, 1)
    return torch.cat([prefix_out, patches])  # [prefix + kept, H, Dh]


@pytest.mark.parametrize("ws", [3, 4, 7])
@pytest.mark.parametrize("prefix, drop", [(0, False), (2, True), (1, False), (0, True)])
def test_packed_windows_equal_the_window_partition_reference(ws, prefix, drop):
    batch = pack(images(), prefix, TokenDrop("constant", rate=0.4) if drop else None)
    S, L, H, Dh = batch.num_sequences, batch.seq_len, 2, 8
    g = torch.Generator().manual_seed(ws)
    q, k, v = (torch.randn(S, H, L, Dh, generator=g) for _ in range(3))
    out = packed_attention(q, k, v, AttentionContext(batch, "segment"), window_size=ws)
    lay = batch.layout
    for i, s, start, n in lay.runs:
        run = slice(start, start + n)
        ref = reference_windowed(q[s, :, run], k[s, :, run], v[s, :, run], lay.grids[i], batch.kept_indices(i), ws, prefix)
        torch.testing.assert_close(out[s, run], ref, atol=1e-5, rtol=1e-5)
    assert bool((out[batch.padding_mask] == 0).all())


def test_blocks_equal_timm_vitdet_blocks_on_a_whole_number_of_windows():
    """No padding inside windows (grid a multiple of the window): exactly ViTDet's semantics,
    computed by timm's SAM / ViTDet blocks (window_partition, per-window attention) with our weights."""
    from functools import partial

    from timm.models.vision_transformer_sam import Block as SamBlock

    torch.manual_seed(0)
    net = nd.build_backbone("navit_ti16", patch_size=P, depth=3, embed_dim=32, num_heads=2, pos_embed="none",
                            window_size=4, global_attn_indexes=(1,), global_pool="none").eval()  # fmt: skip
    grid = (8, 12)
    batch = pack([torch.rand(3, grid[0] * P, grid[1] * P)], budget=96)
    assert batch.layout.grids == (grid,)
    timm_blocks = [SamBlock(32, 2, window_size=net.cfg.block_window_size(i), norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
                   for i in range(3)]  # fmt: skip
    for ours, theirs in zip(net.blocks, timm_blocks):
        theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        tokens = net.forward_intermediates(batch, indices=[2], output_fmt="NLC", intermediates_only=True)[0][0]
        x = net.embed(batch)[0, : grid[0] * grid[1]].view(1, *grid, 32)
        for blk in timm_blocks:
            x = blk(x)
    torch.testing.assert_close(tokens, x.reshape(-1, 32), atol=1e-5, rtol=1e-5)


def backbone(**kw):
    torch.manual_seed(0)
    base = dict(patch_size=P, depth=3, embed_dim=32, num_heads=2, window_size=3, global_attn_indexes=(1,), global_pool="avg")
    return nd.build_backbone("navit_ti16", **{**base, **kw}).eval()


def loss_of(out, weights):
    return sum((m * r).sum() for m, r in zip(out.feature_maps, weights)) + out.pooled.square().sum()


CASES = {
    "plain": dict(),
    "learned_grid_cls_registers": dict(pos_embed="learned2d", pos_embed_grid=6, class_token=True, reg_tokens=2),
    "rope_cat_cls": dict(rope="cat", pos_embed="none", class_token=True),
    "rope_dinov3_learned_grid": dict(rope="dinov3", pos_embed="learned2d", pos_embed_grid=6, rope_rotate_half=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("drop", [False, True])
def test_packed_windowed_backbone_equals_one_image_at_a_time_forward_and_backward(case, drop):
    net = backbone(**CASES[case])
    ims = images()
    options = dict(prefix=net.num_prefix_tokens, drop=TokenDrop("constant", rate=0.4) if drop else None)
    together = pack(ims, seeds=range(len(ims)), **options)
    alone = [pack([im], seeds=[i], **options) for i, im in enumerate(ims)]
    out = net(together)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(m.shape, generator=g) for m in out.feature_maps]
    packed_grads = torch.autograd.grad(loss_of(out, weights), list(net.parameters()), allow_unused=True)
    single_grads = [torch.zeros_like(p) for p in net.parameters()]
    for i, b in enumerate(alone):
        single = net(b)
        torch.testing.assert_close(out.feature_maps[i], single.feature_maps[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[i], single.pooled[0], atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(loss_of(single, weights[i : i + 1]), list(net.parameters()), allow_unused=True)
        single_grads = [a + (0 if b is None else b) for a, b in zip(single_grads, grads)]
    for name, a, b in zip([n for n, _ in net.named_parameters()], packed_grads, single_grads):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, atol=1e-4, rtol=1e-4, msg=name)
    # control: the windows change the function
    with torch.no_grad():
        global_net = backbone(**CASES[case], window_size=0)
        assert float((global_net(together).tokens - out.tokens).abs().max()) > 1e-3


@pytest.mark.parametrize("prefix", [0, 2])
def test_a_window_covering_the_grid_is_global_attention(prefix):
    ims = images()
    batch = pack(ims, prefix, TokenDrop("constant", rate=0.3))
    extra = dict(class_token=True, reg_tokens=1) if prefix else {}
    with torch.no_grad():
        windowed = backbone(window_size=max(max(g) for g in batch.layout.grids), **extra)(batch)
        plain = backbone(window_size=0, **extra)(batch)
    torch.testing.assert_close(windowed.tokens, plain.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(windowed.pooled, plain.pooled, atol=1e-5, rtol=1e-5)


def test_global_attn_indexes_keep_those_blocks_global():
    net = backbone(depth=4, window_size=3, global_attn_indexes=[1, -1])  # a YAML list; -1 = the last block
    assert [b.attn.window_size for b in net.blocks] == [3, 0, 3, 0]
    assert net.cfg.global_attn_indexes == (1, -1)
    batch = pack(images())
    every = backbone(depth=4, window_size=3, global_attn_indexes=(0, 1, 2, 3))
    every.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(every(batch).tokens, backbone(depth=4, window_size=0)(batch).tokens)
    assert backbone(window_size=0, global_attn_indexes=(1,)).blocks[0].attn.window_size == 0  # no windows: ignored
    with pytest.raises(ValueError, match="window_size must be >= 0"):
        backbone(window_size=-2)
    with pytest.raises(ValueError, match=r"global_attn_indexes \[3\] are not blocks of a depth-3 model"):
        backbone(global_attn_indexes=(3,))


def test_window_size_and_global_blocks_are_config_keys():
    cfg = to_object(load_config(ROOT / "configs" / "classification" / "toy.yaml",
                                ["model.backbone.window_size=4", "model.backbone.global_attn_indexes=[1]", "model.backbone.depth=3"]))  # fmt: skip
    b = cfg.model.backbone
    assert b.window_size == 4 and list(b.global_attn_indexes) == [1]
    net = nd.build_backbone(b.name, **b.overrides())
    assert [blk.attn.window_size for blk in net.blocks] == [4, 0, 4]


def _kernel_out(batch, kernel, q, k, v, ws):
    out = packed_attention(q, k, v, AttentionContext(batch, kernel), window_size=ws)
    return out, torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))


def test_kernels_agree_on_windows(monkeypatch):
    """segment, the dense reference and the varlen wrapper (with a reference varlen kernel on
    CPU, as in test_backbone) on the window layout, forward and backward."""
    import torch.nn.attention.varlen as varlen

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, **_):
        bounds = cu_q.tolist()
        assert torch.equal(cu_q, cu_k) and max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        return torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
                          for a, b in zip(bounds[:-1], bounds[1:])])  # fmt: skip

    monkeypatch.setattr(varlen, "varlen_attn", reference)
    batch = pack(images(), 1, TokenDrop("constant", rate=0.3))
    S, L, H, Dh = batch.num_sequences, batch.seq_len, 2, 8
    q, k, v = (torch.randn(S, H, L, Dh, requires_grad=True) for _ in range(3))
    ref, ref_grads = _kernel_out(batch, "segment", q, k, v, 3)
    for kernel in ("dense", "varlen"):
        out, grads = _kernel_out(batch, kernel, q, k, v, 3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_windowed_forward_on_cpu_matches_segment():
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = pack(images(), 1, TokenDrop("constant", rate=0.3), budget=60, seq_len=256)
    # torch's compiled CPU flex kernel lets masked keys leak when L < 128 and L % 16 == 8
    # (pytorch/pytorch#159247 family): keep the window layout clear of it.
    assert window_layout(batch, 4).runs.layout.seq_len > 128
    q, k, v = torch.randn(3, batch.num_sequences, 2, batch.seq_len, 16).unbind(0)
    seg = packed_attention(q, k, v, AttentionContext(batch, "segment"), window_size=4)
    flex = packed_attention(q, k, v, AttentionContext(batch, "flex"), window_size=4)
    torch.testing.assert_close(flex, seg, atol=1e-5, rtol=1e-5)


def test_window_layout_is_built_once_from_the_host_layout():
    batch = pack(images(), 2, TokenDrop("constant", rate=0.4))
    win = window_layout(batch, 3)
    assert window_layout(batch, 3) is win and window_layout(batch, 4) is not win
    lay, wl = batch.layout, win.runs.layout
    assert sum(wl.num_kept) == sum(lay.num_kept)  # every kept token in exactly one window
    assert all(n <= gh * gw <= 9 for n, (gh, gw) in zip(wl.num_kept, wl.grids))
    assert wl.num_prefix_tokens == 2 and wl.num_sequences == lay.num_sequences
    # windows never cross images: each window run reads the tokens of one image
    seg = batch.segment_ids.gather(1, win.gather[:, 0, :, 0])
    for _, s, start, n in wl.runs:
        assert len(set(seg[s, start : start + n].tolist())) == 1
    # attention cost from the layout: patches x (window + prefix), prefix x image
    assert win.pairs == sum(n * (n + 2) for n in wl.num_kept) + 2 * lay.num_tokens
    assert attention_pairs(batch) == sum(n * n for n in lay.run_lengths) > win.pairs
    # the host data windows need survive pickling with the batch
    again = pickle.loads(pickle.dumps(batch))
    again.validate()
    assert (again.layout.kept_cells == lay.kept_cells).all()
    for i in range(lay.num_images):
        assert lay.kept_cells[lay.token_offsets[i] : lay.token_offsets[i + 1]].tolist() == batch.kept_indices(i).tolist()


def test_windowed_forward_and_backward_never_read_the_device():
    torch.manual_seed(0)
    net = nd.build_backbone("navit_ti16", patch_size=P, depth=3, embed_dim=32, num_heads=2, class_token=True, reg_tokens=1,
                            rope="cat", pos_embed="learned2d", pos_embed_grid=6, global_pool="map", drop_path_rate=0.2,
                            window_size=3, global_attn_indexes=(1,)).train()  # fmt: skip
    batch = pack(images(), net.num_prefix_tokens, TokenDrop("constant", rate=0.3))
    with HostSyncCounter() as syncs:
        out = net(batch)
        (out.pooled.sum() + sum(m.sum() for m in out.feature_maps)).backward()
    assert syncs.total == 0, dict(syncs.calls)
