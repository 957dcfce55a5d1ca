"""Segmenter decoders on packed mixed-size batches: packed == one image at a time (with the
real block-diagonal attention masks too), the mask transformer == mmseg's
SegmenterMaskTransformerHead, sliding windows == mmseg's slide_inference, and a loss that
sees only each image's own valid pixels."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from navit_dense.data import pack_images
from navit_dense.models import build_backbone
from navit_dense.data.packing import grid_layout
from navit_dense.losses.segmentation import seg_loss_sum
from navit_dense.models.heads.segmenter import MaskTransformerDecoder, Segmenter, build_decoder, class_map, upsample
from navit_dense.models.sliding_window import merge_windows, segment_images, slide_windows

P, K, DIM = 8, 5, 32


def make_model(kind: str, kernel: str = "segment", class_token: bool = True) -> Segmenter:
    torch.manual_seed(0)
    backbone = build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=DIM, num_heads=2, global_pool="none",
                              mask_fill="zeros", class_token=class_token, attn_kernel=kernel)  # fmt: skip
    options = dict(dim=DIM, depth=2, num_heads=2, attn_kernel=kernel) if kind == "mask_transformer" else {}
    model = Segmenter(backbone, build_decoder(kind, DIM, K, **options)).eval()
    # Non-trivial norms (default init is weight 1, bias 0) so no term can hide.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in ((40, 72), (64, 24), (33, 33), (20, 90))]


def packer(budget: int = 24, seq_len: int = 128, **kw):
    return partial(pack_images, patch_size=P, max_tokens_per_image=budget, seq_len=seq_len, num_prefix_tokens=1, **kw)


# ---- decoders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["segment", "dense"])
@pytest.mark.parametrize("kind", ["linear", "mask_transformer"])
def test_packed_mixed_sizes_equal_one_image_at_a_time(kind, kernel):
    model, ims, pack = make_model(kind, kernel), images(), packer()
    batch = pack(ims)
    assert batch.num_sequences < len(ims) and len(set(map(tuple, batch.grid_sizes.tolist()))) == len(ims)  # really packed, mixed grids
    packed = segment_images(model, ims, pack)
    for im, logits in zip(ims, packed):
        single = segment_images(model, [im], pack)[0]
        assert logits.shape == (K, *im.shape[-2:])
        torch.testing.assert_close(logits, single, atol=2e-5, rtol=0)


def test_grid_layout_keeps_sequences_and_puts_class_slots_first():
    batch = packer()(images())
    layout = grid_layout(batch, K)
    layout.validate()
    assert torch.equal(layout.seq_index, batch.seq_index)
    assert layout.num_prefix_tokens == K and torch.equal(layout.grid_sizes, batch.grid_sizes)
    assert torch.equal(layout.num_kept, batch.grid_sizes.prod(1))  # every grid cell, none dropped


@pytest.mark.filterwarnings("ignore::UserWarning")  # mmseg deprecation notices on building the head
def test_mask_transformer_matches_mmseg_segmenter_head():
    from mmseg.models.decode_heads import SegmenterMaskTransformerHead

    model = make_model("mask_transformer")
    ours: MaskTransformerDecoder = model.decoder
    ref = SegmenterMaskTransformerHead(in_channels=DIM, channels=DIM, num_classes=K, num_layers=2, num_heads=2, embed_dims=DIM,
                                       drop_path_rate=0.0, in_index=-1).eval()  # fmt: skip
    mapping = {"proj_dec": "dec_proj", "patch_proj": "patch_proj", "classes_proj": "classes_proj",
               "decoder_norm": "decoder_norm", "mask_norm": "mask_norm"}  # fmt: skip
    for i in range(2):
        mapping.update({f"blocks.{i}.norm1": f"layers.{i}.ln1", f"blocks.{i}.norm2": f"layers.{i}.ln2",
                        f"blocks.{i}.attn.proj": f"layers.{i}.attn.attn.out_proj",
                        f"blocks.{i}.mlp.fc1": f"layers.{i}.ffn.layers.0.0", f"blocks.{i}.mlp.fc2": f"layers.{i}.ffn.layers.1"})  # fmt: skip
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        theirs["cls_emb"].copy_(ours.cls_emb[None])
        for i in range(2):
            theirs[f"layers.{i}.attn.attn.in_proj_weight"].copy_(ours.blocks[i].attn.qkv.weight)  # q, k, v rows in both
            theirs[f"layers.{i}.attn.attn.in_proj_bias"].copy_(ours.blocks[i].attn.qkv.bias)
        for src, dst in mapping.items():
            for name in ("weight", "bias"):
                if f"{dst}.{name}" in theirs:
                    theirs[f"{dst}.{name}"].copy_(ours.get_parameter(f"{src}.{name}"))
    ims = images()
    with torch.no_grad():
        out = model.backbone(packer()(ims))
        packed = ours(out)
        for fmap, logits in zip(out.feature_maps, packed):
            torch.testing.assert_close(logits, ref([fmap[None]])[0], atol=1e-5, rtol=1e-5)


# ---- sliding window -----------------------------------------------------------------------------
def test_slide_windows_follow_mmseg_grid():
    # 100 x 70 image, 48-pixel windows every 32: rows start 0, 32, then 52 (flush with the border).
    boxes = slide_windows(100, 70, 48, 32)
    assert sorted({(b[0], b[2]) for b in boxes}) == [(0, 48), (32, 80), (52, 100)]
    assert sorted({(b[1], b[3]) for b in boxes}) == [(0, 48), (22, 70)]
    assert slide_windows(30, 20, 48, 32) == [(0, 0, 30, 20)]  # smaller than a window: the image itself


def test_merge_windows_averages_overlaps():
    boxes = slide_windows(10, 14, 6, 4)  # overlapping windows
    values = torch.arange(1.0, len(boxes) + 1)
    logits = [torch.full((2, 3, 3), float(v)) for v in values]  # constant logits per window, any grid
    merged = merge_windows(logits, boxes, (10, 14))
    expected = torch.zeros(10, 14)
    count = torch.zeros(10, 14)
    for v, (y0, x0, y1, x1) in zip(values, boxes):
        expected[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    assert count.max() > 1  # the test needs overlaps
    torch.testing.assert_close(merged, (expected / count).expand(2, -1, -1))


@pytest.mark.parametrize("kind", ["linear", "mask_transformer"])
def test_slide_window_covering_the_image_equals_whole_inference(kind):
    model, ims, pack = make_model(kind), images(), packer()
    whole = segment_images(model, ims, pack)
    slide = segment_images(model, ims, pack, "slide", window=96, stride=64)  # one window per image
    for a, b in zip(whole, slide):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "mask_transformer"])
def test_slide_inference_matches_mmseg_slide_inference(kind):
    """All windows of all images in one packed forward pass == mmseg's EncoderDecoder.slide_inference
    (its real code: window grid, padding and averaging), fed one window at a time."""
    from mmseg.models.segmentors import EncoderDecoder

    model, ims, pack = make_model(kind), images(), packer(budget=16)
    window, stride = 32, 20
    ours = segment_images(model, ims, pack, "slide", window=window, stride=stride)

    def encode_decode(crop, metas):  # one window alone through our model, logits at the window's size
        return segment_images(model, [crop[0]], pack)[0][None]

    test_cfg = SimpleNamespace(stride=(stride, stride), crop_size=(window, window))
    host = SimpleNamespace(test_cfg=test_cfg, out_channels=K, encode_decode=encode_decode)  # mmseg's `self` for the call
    assert max(len(slide_windows(*im.shape[-2:], window, stride)) for im in ims) >= 4
    with torch.no_grad():
        for im, logits in zip(ims, ours):
            ref = EncoderDecoder.slide_inference(host, im[None], [{}])[0]
            torch.testing.assert_close(logits, ref, atol=2e-5, rtol=0)


# ---- loss ---------------------------------------------------------------------------------------
def labels_for(ims: list[torch.Tensor], seed: int, ignore_fraction: float = 0.2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for im in ims:
        y = torch.randint(0, K, im.shape[-2:], generator=g)
        y[torch.rand(im.shape[-2:], generator=g) < ignore_fraction] = 255
        out.append(y)
    return out


def test_loss_is_cross_entropy_over_each_images_own_valid_pixels():
    model, ims = make_model("mask_transformer"), images()
    batch = packer()(ims)
    sizes = batch.resized_sizes.tolist()
    labels = labels_for([torch.empty(1, *s) for s in sizes], seed=1)
    loss = seg_loss_sum(model(batch).logits, labels)
    expected = 0.0
    for im, y in zip(ims, labels):  # each image alone, by hand: -log p[label] summed over valid pixels
        logp = upsample(model(packer()([im])).logits[0], y.shape).log_softmax(0)
        valid = y != 255
        expected = expected - logp.permute(1, 2, 0)[valid].gather(1, y[valid][:, None]).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["segment", "dense"])
def test_other_images_and_padding_do_not_change_an_images_loss_or_gradients(kernel):
    model = make_model("mask_transformer", kernel)
    a, b = images()[0], images()[1]
    b_other = torch.rand_like(b)
    pack = packer(seq_len=256, fixed_seq_len=True)  # one sequence with padding at its end

    def run(image_b, label_b_seed, pad_value):
        batch = pack([a, image_b])
        assert batch.num_sequences == 1 and batch.padding_mask.any()
        batch.patches[batch.padding_mask] = pad_value  # whatever sits in padding slots
        batch.patches.requires_grad_(True)
        labels = labels_for([torch.empty(1, *s) for s in batch.resized_sizes.tolist()], seed=label_b_seed)
        labels[0] = labels_for([torch.empty(1, *batch.resized_sizes[0].tolist())], seed=7)[0]  # image a: same label
        logits = model(batch).logits
        loss_a = seg_loss_sum(logits[:1], labels[:1])
        total = seg_loss_sum(logits, labels)
        total.backward()
        mine = batch.segment_ids == 0
        return loss_a.detach(), batch.patches.grad[mine], batch.patches.grad[batch.padding_mask]

    loss1, grad1, pad_grad1 = run(b, 1, 0.0)
    loss2, grad2, pad_grad2 = run(b_other, 2, 123.0)
    torch.testing.assert_close(loss1, loss2, atol=1e-5, rtol=0)
    # The gradient of the WHOLE loss w.r.t. image a's patches: b's term contributes nothing, a's is unchanged.
    torch.testing.assert_close(grad1, grad2, atol=1e-6, rtol=1e-5)
    assert grad1.abs().sum() > 0
    assert pad_grad1.abs().max() == 0 and pad_grad2.abs().max() == 0


@given(
    k=st.integers(1, 12), h=st.integers(1, 9), w=st.integers(1, 9),
    levels=st.integers(1, 4), nans=st.integers(0, 3), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_class_map_is_argmax_including_ties_and_nan(k, h, w, levels, nans, seed):
    gen = torch.Generator().manual_seed(seed)
    # Few distinct values -> many ties; a few NaNs (argmax treats NaN as the maximum).
    logits = torch.randint(0, levels, (k, h, w), generator=gen).float()
    flat = logits.view(-1)
    flat[torch.randint(0, flat.numel(), (nans,), generator=gen)] = float("nan")
    assert torch.equal(class_map(logits), logits.argmax(0))
    assert class_map(logits).dtype == torch.int64


def test_class_map_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        class_map(torch.zeros(1, 2, 3, 4))


def test_seg_loss_keeps_one_image_of_full_resolution_logits_alive():
    """Per-image checkpointing: the same loss and gradients as the plain sum, with the peak of
    the backward bounded by one image's upsampled logits, not all of them."""
    from navit_dense.losses.segmentation import _image_loss
    from navit_dense.utils.benchmark import peak_memory

    g = torch.Generator().manual_seed(0)
    K, sizes = 40, [(12, 20), (16, 16), (20, 12), (14, 18)]
    logits = [torch.randn(K, h, w, generator=g, requires_grad=True) for h, w in sizes]
    labels = [torch.randint(0, K, (h * 16, w * 16), generator=g) for h, w in sizes]
    loss = seg_loss_sum(logits, labels)
    grads = torch.autograd.grad(loss, logits)
    ref = sum(_image_loss(lg, y, 255) for lg, y in zip(logits, labels))
    ref_grads = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    one_image = K * 20 * 12 * 256 * 4  # bytes of one image's upsampled float32 logits
    peak, _ = peak_memory(lambda: seg_loss_sum(logits, labels).backward())
    plain, _ = peak_memory(lambda: sum(_image_loss(lg, y, 255) for lg, y in zip(logits, labels)).backward())
    assert plain > 3 * one_image and peak < plain - one_image  # all four images' logits vs about one at a time
