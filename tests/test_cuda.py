"""CUDA paths (collected everywhere, run where CUDA is: `pytest -m cuda`; tools/gpu_check.sh runs
them on a bare GPU machine): the varlen and flex kernels against the segment kernel, forward and
backward in bf16, globally and in ViTDet windows; qk_norm under bf16 / fp16 autocast through
detection and segmentation training steps; the fp16 GradScaler skipping an overflow; single-process nccl DDP."""

from __future__ import annotations

import os

import pytest
import torch

from navit_dense import build_backbone, pack_images
from navit_dense.data import TokenDrop
from navit_dense.losses.detection import DetectionLoss
from navit_dense.losses.segmentation import seg_loss_sum
from navit_dense.models import AttentionContext, packed_attention
from navit_dense.models.attention import _flex_available, _varlen_available
from navit_dense.models.heads.owl import OwlDetector, OwlHead
from navit_dense.models.heads.segmenter import Segmenter, build_decoder

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
P = 16


def packed(n: int = 6, seed: int = 0, drop: bool = False, prefix: int = 1):
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(h), int(w)) for h, w in torch.randint(48, 400, (n, 2), generator=g)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    batch = pack_images(images, P, 196, 512, num_prefix_tokens=prefix, token_drop=TokenDrop("constant", rate=0.4) if drop else None,
                        seed=list(range(n)))  # fmt: skip
    return batch.to("cuda")


def _kernel_matches_segment_bf16(kernel: str, window_size: int) -> None:
    """Forward and backward of ``kernel`` against the segment kernel, bf16, prefix token and token dropping."""
    if kernel == "varlen" and not _varlen_available():
        pytest.skip("torch.nn.attention.varlen is not in this torch")
    if kernel == "flex" and not _flex_available():
        pytest.skip("FlexAttention is not in this torch")
    batch = packed(drop=True)
    S, L, H, Dh = batch.num_sequences, batch.seq_len, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(S, H, L, Dh, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    grad_out = torch.randn(S, L, H, Dh, device="cuda", generator=g, dtype=torch.bfloat16)
    results = {}
    for name in ("segment", kernel):
        out = packed_attention(q, k, v, AttentionContext(batch, name), window_size=window_size)
        dq, dk, dv = torch.autograd.grad((out.float() * grad_out.float()).sum(), (q, k, v))
        valid = ~batch.padding_mask
        results[name] = (out[valid].float(), dq.transpose(1, 2)[valid].float(), dk.transpose(1, 2)[valid].float(), dv.transpose(1, 2)[valid].float())
    for ref, got in zip(results["segment"], results[kernel]):
        torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_cuda_kernels_match_segment_forward_and_backward_bf16(kernel):
    _kernel_matches_segment_bf16(kernel, window_size=0)


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_cuda_windowed_kernels_match_segment_forward_and_backward_bf16(kernel):
    _kernel_matches_segment_bf16(kernel, window_size=7)  # ViTDet windows through the window layout's runs


def test_auto_kernel_choice_sees_all_three_dtypes():
    batch = packed()
    ctx = AttentionContext(batch, "auto")
    assert ctx.resolve(torch.float32) in ("flex", "segment")
    if _varlen_available():
        assert ctx.resolve(torch.bfloat16) == "varlen"


def _detector(kernel: str = "auto"):
    net = build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=128, num_heads=2, qk_norm=True, class_token=True,
                         global_pool="none", mask_fill="zeros", attn_kernel=kernel)  # fmt: skip
    return OwlDetector(net, OwlHead(128, num_classes=5, merge_class_token=True)).cuda().train()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["auto", "flex", "segment"])
def test_qk_norm_detection_step_under_autocast(dtype, kernel):
    if kernel == "flex" and not _flex_available():
        pytest.skip("FlexAttention is not in this torch")
    torch.manual_seed(0)
    model = _detector(kernel)
    batch = packed(drop=True)
    g = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.randint(0, 5, (3,), generator=g).cuda(), "boxes": (torch.rand(3, 4, generator=g) * 0.4 + 0.3).cuda()}
               for _ in range(batch.num_images)]  # fmt: skip
    with torch.autocast("cuda", dtype=dtype):
        out = model(batch)
        losses = DetectionLoss()(out.owl, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_qk_norm_segmentation_step_under_autocast(dtype, decoder):
    torch.manual_seed(0)
    net = build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=128, num_heads=2, qk_norm=True, global_pool="none", mask_fill="token")
    options = {} if decoder == "linear" else {"dim": 128, "depth": 1, "num_heads": 2}
    model = Segmenter(net, build_decoder(decoder, 128, 7, **options)).cuda().train()
    batch = packed(drop=True, prefix=0)
    g = torch.Generator().manual_seed(2)
    labels = [torch.randint(0, 7, (h, w), generator=g).cuda() for h, w in batch.layout.resized_sizes]
    with torch.autocast("cuda", dtype=dtype):
        out = model(batch)
        loss = seg_loss_sum(out.logits, labels) / sum(y.numel() for y in labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp16_gradscaler_skips_an_overflow_step():
    model = _detector()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**120)  # the first scaled gradients overflow fp16
    before = [p.detach().clone() for p in model.parameters()]
    batch = packed()
    targets = [{"labels": torch.tensor([1], device="cuda"), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], device="cuda")}] * batch.num_images
    with torch.autocast("cuda", dtype=torch.float16):
        loss = DetectionLoss()(model(batch).owl, targets)["loss"]
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**120  # the overflow was seen and the scale backed off
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))  # and the step was skipped


def test_single_process_nccl_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_nccl_available():
        pytest.skip("this torch has no nccl")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        net = build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=128, num_heads=2, global_pool="avg", mask_fill="zeros").cuda()
        ddp = DistributedDataParallel(net, device_ids=[0])
        out = ddp(packed(prefix=0))
        out.pooled.float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
        t = torch.ones(1, device="cuda")
        dist.all_reduce(t)
        assert float(t) == 1.0
    finally:
        dist.destroy_process_group()


def test_micro_batches_are_pinned_for_asynchronous_copies():
    from navit_dense.engine.data import MicroBatch

    batch = pack_images([torch.rand(3, 40, 60), torch.rand(3, 90, 30)], P, 16, 64)
    m = MicroBatch(batch, [{"labels": torch.tensor([1]), "boxes": torch.rand(1, 4), "image_id": 3}], 0, 0, {})
    pinned = m.pin_memory()
    assert pinned.batch.patches.is_pinned() and pinned.batch.patch_slots.is_pinned()
    assert pinned.targets[0]["boxes"].is_pinned() and pinned.targets[0]["image_id"] == 3
    assert pinned.batch.layout is batch.layout
