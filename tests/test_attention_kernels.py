"""The segment kernel: one SDPA call per group of equally long, adjacent image runs, on views of
q / k / v; exact against the dense block-mask reference (outputs and gradients) and against one
image at a time, zeros at padding, and a contiguous [S, L, H, Dh] result."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import navit_dense as nd
from navit_dense.models import AttentionContext, packed_attention

P = 8


def pack(sizes, seq_len, prefix=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    return nd.pack_images(images, patch_size=P, max_tokens_per_image=64, seq_len=seq_len, num_prefix_tokens=prefix)


def groups(batch) -> list[list[int]]:
    """Per sequence, the lengths of its maximal blocks of adjacent equal runs (the test's own count)."""
    return [[len(list(g)) for _, g in itertools.groupby(length for _, length in runs)] for runs in batch.layout.runs_by_sequence]


# Five images of one size (equal runs side by side), two others; one sequence, or several with
# prefix tokens, where padding ends every sequence.
LAYOUTS = {
    "one_sequence": dict(sizes=[(32, 32)] * 5 + [(40, 24), (16, 48)], seq_len=512),
    "sequences_prefix": dict(sizes=[(32, 32)] * 5 + [(40, 24), (16, 48), (24, 24)], seq_len=136, prefix=2),
}


def qkv_inputs(batch, H=2, Dh=8, layout="projection", seed=0):
    """Leaf q, k, v [S, H, L, Dh]: views of one [S, L, 3, H, Dh] projection as the blocks pass them,
    or separate contiguous tensors (as after RoPE / qk-norm)."""
    S, L = batch.segment_ids.shape
    g = torch.Generator().manual_seed(seed)
    if layout == "projection":
        qkv = torch.randn(S, L, 3, H, Dh, generator=g, requires_grad=True)
        return qkv, [t.transpose(1, 2) for t in qkv.unbind(2)]
    leaves = [torch.randn(S, H, L, Dh, generator=g, requires_grad=True) for _ in range(3)]
    return leaves, leaves


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("layout", ["projection", "contiguous"])
def test_segment_kernel_equals_dense_reference_outputs_and_gradients(name, layout):
    batch = pack(**LAYOUTS[name])
    assert any(n > 1 for seq in groups(batch) for n in seq), "the layout must hold adjacent equal runs"
    if name == "sequences_prefix":
        assert batch.num_sequences > 1 and batch.pad_fraction > 0
    leaves, (q, k, v) = qkv_inputs(batch, layout=layout)
    out = packed_attention(q, k, v, AttentionContext(batch, "segment"))
    ref = packed_attention(q, k, v, AttentionContext(batch, "dense"))
    S, H, L, Dh = q.shape
    assert out.shape == (S, L, H, Dh) and out.is_contiguous()  # the block's reshape to [S, L, D] copies nothing
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not out[batch.padding_mask].any()  # padding slots are exact zeros
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = leaves if isinstance(leaves, list) else [leaves]
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_one_sdpa_call_per_group_of_equal_adjacent_runs(name, monkeypatch):
    batch = pack(**LAYOUTS[name])
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):  # the real kernel, counted
        calls.append(q.shape[0])
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    _, (q, k, v) = qkv_inputs(batch)
    with torch.no_grad():
        packed_attention(q, k, v, AttentionContext(batch, "segment"))
    expected = [n for seq in groups(batch) for n in seq]  # batch size of each call: the group's runs
    assert calls == expected and len(calls) < batch.num_images


def test_equal_images_packed_equal_one_image_at_a_time_with_gradients():
    """A model on equal images (grouped SDPA calls) computes what it computes on each image alone,
    forward and parameter gradients."""
    torch.manual_seed(0)
    model = nd.build_backbone("navit_ti16", embed_dim=32, depth=2, num_heads=2, patch_size=P, class_token=True,
                              global_pool="token", attn_kernel="segment")  # fmt: skip
    sizes = [(32, 40)] * 4 + [(16, 48)]
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    kw = dict(patch_size=P, max_tokens_per_image=64, num_prefix_tokens=1)
    batch = nd.pack_images(images, seq_len=512, **kw)
    assert groups(batch) == [[4, 1]]

    def loss_and_grads(b, out_index=None):
        model.zero_grad()
        out = model(b)
        maps = out.feature_maps if out_index is None else [out.feature_maps[0]]
        loss = sum(m.square().mean() for m in maps) + out.pooled.square().sum()
        loss.backward()
        return maps, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_maps, packed_grads = loss_and_grads(batch)
    single_grads = {}
    for i, image in enumerate(images):
        maps, grads = loss_and_grads(nd.pack_images([image], seq_len=128, **kw), 0)
        torch.testing.assert_close(packed_maps[i], maps[0], atol=1e-5, rtol=1e-5)
        for n, grad in grads.items():
            single_grads[n] = single_grads.get(n, 0) + grad
    assert packed_grads.keys() == single_grads.keys()
    for n, grad in packed_grads.items():
        torch.testing.assert_close(grad, single_grads[n], atol=1e-5, rtol=1e-4, msg=n)
