"""OWL head: per-axis box bias, per-image layout under packing and token dropping, class
queries, post-processing back to original pixels, and a tiny end-to-end overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou

from conftest import collate_detection
from navit_dense.data import TokenDrop, pack_images
from navit_dense.data.detection import DetectionSample, resize
from navit_dense.losses.detection import DetectionLoss
from navit_dense.models import build_backbone
from navit_dense.models.heads.owl import OwlHead, OwlOutput, compute_box_bias, postprocess, to_coco_results, token_boxes


def tiny_backbone(patch_size: int = 8, dim: int = 64, **kw):
    return build_backbone("navit_ti16", patch_size=patch_size, depth=2, embed_dim=dim, num_heads=2, global_pool="avg", **kw)


def noise_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def test_box_bias_is_per_axis_on_a_non_square_grid():
    grid = torch.tensor([[2, 5]])  # 2 rows, 5 columns
    tok = torch.arange(10)
    cells = token_boxes(grid, torch.zeros(10, dtype=torch.long), tok)
    # token 8 = row 1, col 3: centre ((3 + .5) / 5, (1 + .5) / 2), size (1/5, 1/2)
    assert torch.allclose(cells[8], torch.tensor([0.7, 0.75, 0.2, 0.5]))
    bias = compute_box_bias(grid, torch.zeros(10, dtype=torch.long), tok)
    expected = torch.log(cells + 1e-4) - torch.log1p(-cells + 1e-4)  # OWLv2 formula
    assert torch.allclose(bias, expected)
    assert torch.allclose(bias.sigmoid(), cells, atol=1e-3)
    assert not torch.allclose(bias[:, 2], bias[:, 3])  # width and height biases differ


def test_untrained_boxes_are_token_cells_and_match_packer_positions():
    # Tall, wide and square images in one pack; zero-initialized box MLP -> each token predicts its cell.
    images = noise_images([(40, 160), (160, 40), (64, 64)])
    batch = pack_images(images, patch_size=8, max_tokens_per_image=48, seq_len=128)
    head = OwlHead(32, num_classes=3)
    tokens = torch.randn(batch.num_sequences, batch.seq_len, 32)
    out = head(tokens, batch)
    is_patch = batch.token_index >= 0
    order = torch.argsort(batch.segment_ids[is_patch] * 10_000 + batch.token_index[is_patch])
    frac = batch.frac_positions[is_patch][order]  # (row, col) centres computed by the packer
    assert torch.allclose(out.pred_boxes[:, 1], frac[:, 0], atol=1e-3)
    assert torch.allclose(out.pred_boxes[:, 0], frac[:, 1], atol=1e-3)
    hw = batch.grid_sizes[out.image_index].float()
    assert torch.allclose(out.pred_boxes[:, 2:], 1.0 / hw.flip(-1), atol=1e-3)


def test_rows_are_grouped_per_image_in_input_order_with_token_dropping():
    images = noise_images([(64, 96), (96, 32), (48, 48), (80, 80)], seed=1)
    batch = pack_images(images, 8, 64, seq_len=128, token_drop=TokenDrop(rate=0.4), seed=3)
    assert batch.num_sequences > 1 and batch.packing_order.tolist() != list(range(4))
    model, head = tiny_backbone(), OwlHead(64, num_classes=5)
    feats = model(batch)
    out = head(feats)
    assert torch.equal(out.offsets.diff(), batch.num_kept)
    assert out.logits.shape == (int(batch.num_kept.sum()), 5)
    for i in range(4):
        rows = slice(int(out.offsets[i]), int(out.offsets[i + 1]))
        assert (out.image_index[rows] == i).all()
        assert torch.equal(out.token_index[rows], batch.kept_indices(i).sort().values)
        # The same prediction computed from the unpacked [D, h, w] map at those cells.
        h, w = batch.grid_sizes[i].tolist()
        cells = feats.feature_maps[i].reshape(64, h * w).T[out.token_index[rows]]
        expected = F.normalize(head.class_proj(head.norm(cells)), dim=-1)
        assert torch.allclose(out.class_embeds[rows], expected, atol=1e-5)


def test_class_embeddings_set_load_and_shape_errors(tmp_path):
    from safetensors.torch import save_file

    head = OwlHead(32, query_dim=16)
    batch = pack_images(noise_images([(32, 48)]), 8, 24, 32)
    tokens = torch.randn(1, batch.seq_len, 32)
    with pytest.raises(RuntimeError, match="no class queries"):
        head(tokens, batch)
    with pytest.raises(ValueError, match=r"\[num_classes, 16\]"):
        head.set_class_embeddings(torch.randn(7, 15))
    with pytest.raises(ValueError, match=r"got shape \(16,\)"):
        head.set_class_embeddings(torch.randn(16))

    emb = torch.randn(7, 16)
    np.save(tmp_path / "q.npy", emb.numpy())
    save_file({"class_embeddings": emb, "other": torch.zeros(2)}, str(tmp_path / "q.safetensors"))
    np.savez(tmp_path / "q.npz", text=emb.numpy())
    for name in ("q.npy", "q.safetensors", "q.npz"):
        loaded = head.load_class_embeddings(tmp_path / name)
        assert torch.equal(loaded, emb) and head.num_classes == 7
        assert "class_embeddings" in head.state_dict() and not any(n == "class_embeddings" for n, _ in head.named_parameters())
    assert head(tokens, batch).logits.shape[1] == 7
    # A different vocabulary for one call; and a trainable query set.
    assert head(tokens, batch, class_embeddings=torch.randn(3, 16)).logits.shape[1] == 3
    head.set_class_embeddings(torch.randn(4, 16), trainable=True)
    assert any(n == "class_embeddings" for n, _ in head.named_parameters())
    np.save(tmp_path / "bad.npy", np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="bad.npy"):
        head.load_class_embeddings(tmp_path / "bad.npy")
    with pytest.raises(KeyError, match="available"):
        head.load_class_embeddings(tmp_path / "q.safetensors", key="nope")


def fake_output(boxes_per_image, logits_per_image, objectness=None) -> OwlOutput:
    """An OwlOutput built by hand (token_index = row within the image)."""
    logits = torch.cat(logits_per_image)
    counts = [len(b) for b in boxes_per_image]
    offsets = torch.tensor([0] + counts).cumsum(0)
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    token_index = torch.cat([torch.arange(c) for c in counts])
    return OwlOutput(logits, torch.cat(boxes_per_image), objectness, torch.zeros(len(logits), 1), image_index, token_index, offsets, tuple(offsets.tolist()))


def test_postprocess_topk_ordering_and_scores():
    batch = pack_images(noise_images([(48, 64), (64, 32)]), 8, 16, 64)
    T = batch.num_kept.tolist()
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(t, 5, generator=g) for t in T]
    boxes = [torch.rand(t, 4, generator=g) * 0.5 + 0.25 for t in T]
    obj = torch.randn(sum(T), generator=g)
    out = fake_output(boxes, logits, obj)
    res = postprocess(out, batch, topk=30)
    assert [len(r["scores"]) for r in res] == [30, 30]
    for r, lg in zip(res, logits):
        assert (r["scores"].diff() <= 0).all()
        assert torch.allclose(r["scores"], lg[r["token_index"], r["labels"]].sigmoid())
        assert torch.isclose(r["scores"][0], lg.sigmoid().max())
    res = postprocess(out, batch, topk=10_000)  # fewer pairs than topk: all T_i * K of them
    assert [len(r["scores"]) for r in res] == [t * 5 for t in T]
    with_obj = postprocess(out, batch, topk=5, use_objectness=True)[1]
    rows = with_obj["token_index"] + T[0]
    assert torch.allclose(with_obj["scores"], logits[1][with_obj["token_index"], with_obj["labels"]].sigmoid() * obj[rows].sigmoid())
    assert postprocess(out, batch, topk=30, score_thresh=0.99)[0]["scores"].numel() < 30


@pytest.mark.parametrize("aug_scale", [1.0, 0.37])
def test_box_round_trip_original_to_normalized_to_original(aug_scale):
    # Non-square original; the packer resizes it to a grid of another aspect ratio (budget).
    H, W = 75, 203
    gt = torch.tensor([[13.0, 5.5, 120.25, 70.0], [150.0, 20.0, 203.0, 75.0]])
    sample = DetectionSample(noise_images([(H, W)])[0], gt.clone(), torch.tensor([1, 2]), image_id=7, orig_size=(H, W))
    if aug_scale != 1.0:
        sample = resize(sample, aug_scale)
    batch, targets = collate_detection([sample], patch_size=8, max_tokens_per_image=20, seq_len=32)
    assert tuple(batch.resized_sizes[0].tolist()) != tuple(batch.image_sizes[0].tolist())
    T = int(batch.num_kept[0])
    boxes = torch.full((T, 4), 0.1).index_copy(0, torch.tensor([0, 1]), targets[0]["boxes"])
    logits = torch.full((T, 3), -10.0)
    logits[0, 1], logits[1, 2] = 5.0, 4.0
    for fmt in ("xyxy", "xywh"):
        res = postprocess(fake_output([boxes], [logits]), batch, topk=2, scale=[targets[0]["scale"]], box_format=fmt)[0]
        assert res["labels"].tolist() == [1, 2]
        assert torch.allclose(res["boxes"], box_convert(gt, "xyxy", fmt), atol=1e-3)


def test_postprocess_classwise_nms():
    batch = pack_images(noise_images([(64, 64)]), 8, 16, 16)
    T = int(batch.num_kept[0])
    boxes = torch.full((T, 4), 0.05)
    boxes[:3] = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]])
    logits = torch.full((T, 2), -20.0)
    logits[0, 0], logits[1, 0], logits[1, 1], logits[2, 0] = 6.0, 5.0, 4.0, 3.0
    out = fake_output([boxes], [logits])
    plain = postprocess(out, batch, topk=4)[0]
    assert plain["token_index"].tolist() == [0, 1, 1, 2]
    nms = postprocess(out, batch, topk=4, nms_iou=0.5, score_thresh=0.5)[0]
    # token 1 / class 0 overlaps token 0 / class 0 and goes; its class-1 score stays (class-wise).
    assert list(zip(nms["token_index"].tolist(), nms["labels"].tolist())) == [(0, 0), (1, 1), (2, 0)]


def test_to_coco_results():
    res = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 30.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}]
    assert to_coco_results(res, [42], [3, 9]) == [{"image_id": 42, "category_id": 9, "bbox": [10.0, 20.0, 30.0, 10.0], "score": 0.5}]


def test_merge_class_token_and_gradients_reach_every_parameter():
    model, head = tiny_backbone(class_token=True), OwlHead(64, num_classes=4, merge_class_token=True)
    images = noise_images([(48, 64), (64, 40)])
    batch = pack_images(images, 8, 32, 96, num_prefix_tokens=1)
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([3, 0]), "boxes": torch.tensor([[0.2, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3]])},
    ]
    params = [*head.parameters(), *model.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):  # the box MLP's last layer starts at zero: earlier layers get gradient from step 2
        opt.zero_grad()
        DetectionLoss()(head(model(batch)), targets)["loss"].backward()
        opt.step()
    for name, p in list(head.named_parameters()) + list(model.blocks.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="class token"):
        OwlHead(64, num_classes=4, merge_class_token=True)(tiny_backbone()(pack_images(images, 8, 32, 96)))


def _shapes_sample(h, w, objects, seed):
    rng = np.random.default_rng(seed)
    colours = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.2, 1.0)]
    img = (0.4 + 0.1 * rng.standard_normal((h, w, 3))).astype(np.float32)
    for x0, y0, x1, y1, c in objects:
        img[y0:y1, x0:x1] = colours[c]
    boxes = torch.tensor([o[:4] for o in objects], dtype=torch.float32)
    labels = torch.tensor([o[4] for o in objects])
    return DetectionSample(torch.from_numpy(img).permute(2, 0, 1).contiguous(), boxes, labels, image_id=seed, orig_size=(h, w))


def test_tiny_navit_with_owl_head_overfits_three_images():
    samples = [
        _shapes_sample(64, 96, [(8, 8, 40, 40, 0), (56, 20, 90, 60, 1)], 1),
        _shapes_sample(96, 64, [(10, 50, 50, 90, 2)], 2),
        _shapes_sample(80, 80, [(4, 4, 30, 30, 1), (40, 40, 76, 70, 0)], 3),
    ]
    batch, targets = collate_detection(samples, patch_size=8, max_tokens_per_image=64, seq_len=256)
    torch.manual_seed(0)
    model, head, criterion = tiny_backbone(), OwlHead(64, num_classes=3), DetectionLoss()
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(120):
        loss = criterion(head(model(batch)), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    model.eval()
    with torch.no_grad():
        results = postprocess(head(model(batch)), batch, topk=5, nms_iou=0.5)
    assert np.mean(history[-5:]) < 0.3 * history[0], history[::10]
    for sample, res in zip(samples, results):  # every object found with the right class, in original pixels
        iou = box_iou(sample.boxes, res["boxes"])
        hit = (iou > 0.5) & (res["labels"][None] == sample.labels[:, None])
        assert hit.any(1).all(), (iou, res["labels"], sample.labels)
