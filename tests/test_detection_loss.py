"""Hungarian matching against brute force, federated category masks, and the loss terms."""

from __future__ import annotations

import math

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchvision.ops import box_convert, generalized_box_iou

from navit_dense.losses.detection import (
    DetectionLoss,
    FederatedClassSampler,
    HungarianMatcher,
    focal_class_cost,
)
from navit_dense.models.heads.owl import OwlOutput


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """Valid normalized cxcywh boxes."""
    centre = torch.rand(n, 2, generator=g) * 0.8 + 0.1
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.02
    return torch.cat([centre, size], 1)


def make_output(logits: torch.Tensor, boxes: torch.Tensor, counts: list[int], objectness: torch.Tensor | None = None) -> OwlOutput:
    offsets = torch.tensor([0] + counts).cumsum(0)
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    token_index = torch.cat([torch.arange(c) for c in counts])
    return OwlOutput(logits, boxes, objectness, torch.zeros(len(logits), 1), image_index, token_index, offsets, tuple(offsets.tolist()))


@given(T=st.integers(1, 5), G=st.integers(0, 5), K=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_matcher_equals_brute_force(T, G, K, seed):
    g = torch.Generator().manual_seed(seed)
    logits, boxes = torch.randn(T, K, generator=g) * 2, random_boxes(T, g)
    labels, gt = torch.randint(0, K, (G,), generator=g), random_boxes(G, g)
    matcher = HungarianMatcher()
    rows, cols = matcher.match(logits, boxes, labels, gt)
    M = min(T, G)
    assert len(rows) == len(cols) == M
    assert len(set(rows.tolist())) == M and len(set(cols.tolist())) == M
    if M == 0:
        return
    cost = matcher.cost_matrix(logits, boxes, labels, gt).double()
    if G <= T:  # every GT gets a distinct prediction
        best = min(sum(cost[p[j], j] for j in range(G)) for p in itertools.permutations(range(T), G))
    else:  # every prediction gets a distinct GT
        best = min(sum(cost[i, p[i]] for i in range(T)) for p in itertools.permutations(range(G), T))
    assert float(cost[rows, cols].sum()) == pytest.approx(float(best), abs=1e-6)


def test_cost_matrix_terms():
    g = torch.Generator().manual_seed(0)
    logits, boxes, gt = torch.randn(4, 3, generator=g), random_boxes(4, g), random_boxes(2, g)
    labels = torch.tensor([2, 0])
    l1 = HungarianMatcher(cost_class=0, cost_l1=1, cost_giou=0).cost_matrix(logits, boxes, labels, gt)
    assert torch.allclose(l1, (boxes[:, None] - gt[None]).abs().sum(-1))
    giou = HungarianMatcher(cost_class=0, cost_l1=0, cost_giou=1).cost_matrix(logits, boxes, labels, gt)
    assert torch.allclose(giou, -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy")))
    cls = HungarianMatcher(cost_class=1, cost_l1=0, cost_giou=0).cost_matrix(logits, boxes, labels, gt)
    assert torch.allclose(cls, focal_class_cost(logits, labels))
    # By hand at logit 0 (p = 1/2): alpha (1-p)^2 ln 2 - (1-alpha) p^2 ln 2 = (0.25 - 0.75) / 4 ln 2.
    zero = focal_class_cost(torch.zeros(1, 3), torch.tensor([1]))
    assert float(zero) == pytest.approx((0.25 - 0.75) * 0.25 * math.log(2), rel=1e-6)
    # And at logit 2 with alpha 0.5, gamma 1: 0.5 (1-p) ln(1/p) - 0.5 p ln(1/(1-p)).
    p = 1 / (1 + math.exp(-2))
    two = focal_class_cost(torch.full((1, 1), 2.0), torch.tensor([0]), alpha=0.5, gamma=1.0)
    assert float(two) == pytest.approx(0.5 * (1 - p) * -math.log(p) - 0.5 * p * -math.log(1 - p), rel=1e-6)
    # A confident correct prediction is cheaper than a confident wrong one.
    c = focal_class_cost(torch.tensor([[8.0, -8.0], [-8.0, 8.0]]), torch.tensor([0]))
    assert c[0, 0] < 0 < c[1, 0]


def test_federated_sampler_semantics():
    counts = np.array([0, 1, 4, 100, 100, 9, 25, 0])
    sampler = FederatedClassSampler(counts, num_sampled=3, seed=5)
    pos, neg = torch.tensor([2]), torch.tensor([5, 7])
    mask = sampler(pos, neg, key=(0, 11))
    assert mask.dtype == torch.bool and mask.shape == (8,)
    assert mask[[2, 5, 7]].all()  # positives and verified negatives always count (even a zero-count negative)
    assert int(mask.sum()) == 3 + 3  # plus exactly num_sampled others
    assert not mask[0]  # categories never seen in training are never sampled
    assert torch.equal(mask, sampler(pos, neg, key=(0, 11)))  # keyed: reproducible
    assert any(not torch.equal(mask, sampler(pos, neg, key=(0, k))) for k in range(20))
    # Fewer candidates than num_sampled: all of them.
    assert int(FederatedClassSampler(counts, num_sampled=50)(pos, neg, key=(1,)).sum()) == 7
    # Probability proportional to count ** 0.5: 1 vs 100 images -> 1 : 10.
    two = FederatedClassSampler(np.array([1, 100, 5]), num_sampled=1, seed=0)
    hits = sum(bool(two(torch.tensor([2]), None, key=(k,))[1]) for k in range(2000))
    assert abs(hits / 2000 - 10 / 11) < 0.03


def one_image_setup():
    """Image with 2 GT (classes 1 and 3), 4 tokens, 5 classes; tokens 0 and 2 match."""
    logits = torch.zeros(4, 5, requires_grad=True)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.1, 0.1], [0.7, 0.2, 0.2, 0.3], [0.1, 0.9, 0.1, 0.1]])
    target = {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.2, 0.2, 0.3]])}
    return logits, boxes, target


def test_federated_and_not_exhaustive_masking_of_the_class_loss():
    logits, boxes, target = one_image_setup()
    target |= {"class_mask": torch.tensor([True, False, False, False, True]), "not_exhaustive_labels": torch.tensor([3, 4])}
    loss = DetectionLoss(weight_l1=0, weight_giou=0, weight_objectness=0)
    matches = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]
    loss(make_output(logits, boxes, [4]), [target], matches=matches)["loss_cls"].backward()
    g = logits.grad != 0
    # class 2: outside the mask -> no gradient anywhere
    assert not g[:, 2].any()
    # classes 1, 3: positives are always counted even if the given mask omits them
    assert g[:, 1].all()
    # class 3 is positive but not exhaustive: only its matched positive (token 2) gets gradient
    assert g[:, 3].tolist() == [False, False, True, False]
    # class 4: counted but not exhaustive and never positive -> no false-positive gradient at all
    assert not g[:, 4].any()
    # class 0: sampled negative, every token pushed down
    assert g[:, 0].all() and (logits.grad[:, 0] > 0).all()


def test_loss_uses_federated_sampler_when_no_mask_is_given():
    logits, boxes, target = one_image_setup()
    target |= {"neg_labels": torch.tensor([0]), "image_id": 17}
    sampler = FederatedClassSampler(np.array([10, 10, 10, 10, 10]), num_sampled=1, seed=0)
    loss = DetectionLoss(federated=sampler)
    loss(make_output(logits, boxes, [4]), [target], step=3)["loss"].backward()
    counted = (logits.grad != 0).any(0)
    assert torch.equal(counted, sampler(target["labels"], target["neg_labels"], key=(3, 17)))
    assert int(counted.sum()) == 4


def test_box_losses_normalization_and_empty_images():
    g = torch.Generator().manual_seed(0)
    counts = [6, 3]
    logits = torch.randn(9, 4, generator=g, requires_grad=True)
    raw = torch.randn(9, 4, generator=g, requires_grad=True)
    obj = torch.randn(9, generator=g, requires_grad=True)
    out = make_output(logits, raw.sigmoid() * 0.5 + 0.1, counts, obj)
    targets = [
        {"labels": torch.tensor([1, 2, 2]), "boxes": random_boxes(3, g)},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    crit = DetectionLoss()
    a = crit(out, targets)
    b = crit(out, targets, num_boxes=6.0)
    for k in ("loss_cls", "loss_l1", "loss_giou", "loss_objectness", "loss"):
        assert torch.isfinite(a[k]) and torch.isclose(b[k], a[k] / 2), k
    a["loss"].backward()
    assert raw.grad[:6].abs().sum() > 0 and raw.grad[6:].abs().sum() == 0  # no GT in image 1: no box gradient there
    assert logits.grad[6:].abs().sum() > 0 and obj.grad[6:].abs().sum() > 0  # but its tokens are negatives
    # Matched L1 by hand.
    rows, cols = crit.matcher(out, targets)[0]
    expected = (out.pred_boxes[rows] - targets[0]["boxes"][cols]).abs().sum() / 3
    assert torch.isclose(a["loss_l1"], expected)
    # Total = weighted sum of components.
    w = crit.weights
    assert torch.isclose(a["loss"], sum(w[k] * a[k] for k in w))
    with pytest.raises(ValueError, match="targets for"):
        crit(out, targets[:1])


def test_more_gt_than_tokens_matches_what_it_can():
    g = torch.Generator().manual_seed(1)
    out = make_output(torch.randn(2, 3, generator=g), random_boxes(2, g), [2])
    target = {"labels": torch.tensor([0, 1, 2, 0]), "boxes": random_boxes(4, g)}
    losses = DetectionLoss()(out, [target])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_give_a_non_finite_loss_not_an_exception(bad):
    """scipy's linear_sum_assignment raises on non-finite costs; a diverging step must instead
    reach the trainer as a non-finite loss (skipped and counted there)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g)
    logits[3, 1] = bad
    boxes = random_boxes(12, g)
    boxes[5, 0] = bad
    out = make_output(logits, boxes, [7, 5])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": random_boxes(2, g)}, {"labels": torch.tensor([0]), "boxes": random_boxes(1, g)}]
    losses = DetectionLoss()(out, targets)
    assert not torch.isfinite(losses["loss"])


def test_giou_loss_equals_torchvision():
    from torchvision.ops import generalized_box_iou_loss

    from navit_dense.losses.detection import giou_loss

    g = torch.Generator().manual_seed(0)
    a = box_convert(random_boxes(200, g), "cxcywh", "xyxy")
    b = box_convert(random_boxes(200, g), "cxcywh", "xyxy")
    b[:50] = a[:50] + 0.01 * torch.randn(50, 4, generator=g)  # overlapping pairs; the rest mostly disjoint
    b[50:60] = a[50:60]  # identical pairs
    torch.testing.assert_close(giou_loss(a, b), generalized_box_iou_loss(a, b, reduction="none"), atol=1e-6, rtol=1e-6)


# ---- one-to-many assignment ----------------------------------------------------------------
def test_topk_assign_on_a_hand_made_cost_matrix():
    from navit_dense.losses.detection import TopKMatcher

    #               gt0  gt1
    cost = torch.tensor([[0.1, 0.5],   # row 0: cheapest for gt0
                         [0.2, 0.1],   # row 1: in both top-2, serves gt1 (cheaper there)
                         [0.3, 0.4],   # row 2: gt0's next choice, but outside gt0's region
                         [0.9, 0.2],   # row 3
                         [0.4, 0.9]])  # row 4
    region = torch.ones(5, 2, dtype=torch.bool)
    region[2, 0] = False
    rows, cols, valid = TopKMatcher.assign(cost, region, k=2)
    chosen = {(int(r), int(c)) for r, c, v in zip(rows, cols, valid) if v}
    # gt0's top-2 in region: rows 0 and 1; row 1 serves gt1 -> gt0 keeps only row 0.
    # gt1's top-2: rows 1 and 3.
    assert chosen == {(0, 0), (1, 1), (3, 1)}
    assert rows.tolist()[:2] == [0, 1] and cols.tolist() == [0, 0, 1, 1]  # column-major, fixed size k * G

    # k above the row count, and a column without any candidate: nothing valid for it.
    region = torch.tensor([[True, False], [True, False]])
    rows, cols, valid = TopKMatcher.assign(torch.rand(2, 2), region, k=5)
    assert len(rows) == 4 and valid.tolist() == [1.0, 1.0, 0.0, 0.0]


@given(T=st.integers(1, 8), G=st.integers(1, 4), k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_topk_assign_invariants(T, G, k, seed):
    from navit_dense.losses.detection import TopKMatcher

    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(T, G, generator=g)
    region = torch.rand(T, G, generator=g) < 0.7
    rows, cols, valid = TopKMatcher.assign(cost, region, k)
    pairs = [(int(r), int(c)) for r, c, v in zip(rows, cols, valid) if v]
    assert len({r for r, _ in pairs}) == len(pairs)  # a row serves at most one column
    for r, c in pairs:
        assert region[r, c]
        assert cost[r, c] == cost[r][region[r]].min()  # its cheapest in-region column
        inside = cost[:, c][region[:, c]]
        assert int((inside < cost[r, c]).sum()) < k  # among the column's k cheapest in-region rows
    for c in range(G):  # a column's best in-region row, if that row prefers it, is always taken
        if region[:, c].any():
            best = int(torch.where(region[:, c], cost[:, c], torch.inf).argmin())
            if cost[best, c] == cost[best][region[best]].min():
                assert (best, c) in pairs


def test_candidate_region_reaches_small_objects():
    from navit_dense.losses.detection import TopKMatcher

    # 4 x 4 grid of cells (0.25 wide): centres at 0.125, 0.375, ...
    centres = (torch.arange(4) + 0.5) / 4
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cells = torch.stack([cx.flatten(), cy.flatten(), torch.full((16,), 0.25), torch.full((16,), 0.25)], 1)
    large = torch.tensor([[0.5, 0.5, 0.6, 0.6]])  # covers the 4 middle centres (0.375, 0.625) only
    small = torch.tensor([[0.3, 0.3, 0.05, 0.05]])  # inside cell (1, 1), smaller than a cell
    m = TopKMatcher(HungarianMatcher(), k=4, center_radius=0.5)
    assert m.candidates(cells, large)[:, 0].nonzero().flatten().tolist() == [5, 6, 9, 10]
    assert m.candidates(cells, small)[:, 0].nonzero().flatten().tolist() == [5]  # the cell holding its centre
    wide = TopKMatcher(HungarianMatcher(), k=4, center_radius=1.0)
    assert wide.candidates(cells, small)[:, 0].nonzero().flatten().tolist() == [0, 1, 4, 5]


def make_grid_output(logits, boxes, grid: int, images: int) -> OwlOutput:
    out = make_output(logits, boxes, [grid * grid] * images)
    centres = (torch.arange(grid) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cells = torch.stack([cx.flatten(), cy.flatten(), torch.full_like(cx.flatten(), 1 / grid), torch.full_like(cx.flatten(), 1 / grid)], 1)
    out.token_cells = cells.repeat(images, 1)
    return out


def test_one_to_many_targets_and_hybrid_sum():
    g = torch.Generator().manual_seed(0)
    grid, K = 4, 3
    logits = torch.randn(2 * grid * grid, K, generator=g, requires_grad=True)
    raw = torch.randn(2 * grid * grid, 4, generator=g, requires_grad=True)
    out = make_grid_output(logits, raw.sigmoid() * 0.5 + 0.1, grid, 2)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.6]])},
               {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.25, 0.25, 0.4, 0.4], [0.8, 0.8, 0.3, 0.3]])}]
    o2m = DetectionLoss(assignment="one_to_many", one_to_many_k=4, center_radius=0.5, weight_objectness=0)
    matches = o2m.o2m_matcher(out, targets)
    rows0, gt0, valid0 = matches[0]
    assert sorted(rows0[valid0 > 0].tolist()) == [5, 6, 9, 10]  # all four middle tokens learn the big box
    losses = o2m(out, targets, matches_o2m=matches)
    losses["loss"].backward()
    # Class targets: every valid candidate is a positive of its box's class -> its logit is pulled up.
    pos = [16 * i + int(r) for i, (r, _, v) in enumerate(matches) for r, v in zip(r, v) if v]
    labels = [int(t["labels"][gi]) for (_, gg, v), t in zip(matches, targets) for gi, vi in zip(gg, v) if vi]
    assert (logits.grad[pos, labels] < 0).all()
    # Box terms: only valid candidates get box gradient; L1 by hand with normalizer num_boxes * k.
    has_grad = raw.grad.abs().sum(1) > 0
    assert sorted(has_grad.nonzero().flatten().tolist()) == sorted(pos)
    gt_boxes = torch.cat([t["boxes"][gg[v > 0]] for (_, gg, v), t in zip(matches, targets)])
    expected = (out.pred_boxes[pos] - gt_boxes).abs().sum() / (3 * 4)
    assert torch.isclose(losses["loss_l1"], expected)

    hybrid = DetectionLoss(assignment="hybrid", one_to_many_k=4, center_radius=0.5, one_to_many_weight=0.5)
    one = DetectionLoss(assignment="one_to_one")
    h = hybrid(out, targets, matches_o2m=matches)
    o = one(out, targets)
    m = DetectionLoss(assignment="one_to_many", one_to_many_k=4, center_radius=0.5)(out, targets, matches_o2m=matches)
    assert torch.isclose(h["loss"], o["loss"] + 0.5 * m["loss"])
    assert torch.isclose(h["loss_o2m_cls"], m["loss_cls"]) and torch.isclose(h["loss_cls"], o["loss_cls"])
    with pytest.raises(ValueError, match="assignment"):
        DetectionLoss(assignment="many")


def test_one_to_many_loss_never_reads_the_device():
    from navit_dense.utils.host_sync import HostSyncCounter

    g = torch.Generator().manual_seed(0)
    out = make_grid_output(torch.randn(32, 3, generator=g, requires_grad=True), random_boxes(32, g), 4, 2)
    targets = [{"labels": torch.tensor([2]), "boxes": random_boxes(1, g)}, {"labels": torch.tensor([0, 1]), "boxes": random_boxes(2, g)}]
    for t in targets:
        t["class_mask"], t["not_exhaustive_mask"] = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)
    loss = DetectionLoss(assignment="one_to_many")
    with HostSyncCounter() as syncs:
        loss(out, targets, num_boxes=3.0)["loss"].backward()
    assert syncs.total == 0, dict(syncs.calls)


def test_iou_aware_class_target_is_the_iou_of_the_matched_box():
    from navit_dense.losses.detection import box_iou_pairs

    pred = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.62, 0.6, 0.2, 0.1], [0.1, 0.9, 0.1, 0.1]])
    target = {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]])}
    iou = box_iou_pairs(box_convert(pred[:2], "cxcywh", "xyxy"), box_convert(target["boxes"], "cxcywh", "xyxy"))
    torch.testing.assert_close(iou, torch.diag(torchvision_iou(pred[:2], target["boxes"])))
    # A positive whose score already equals its IoU gets no class gradient; a perfect box is pushed to 1.
    logits = torch.full((3, 2), -4.0)
    logits[1, 0] = torch.logit(iou[1])
    logits.requires_grad_(True)
    matches = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    loss = DetectionLoss(iou_aware=True, weight_objectness=0)
    loss(make_output(logits, pred, [3]), [target], matches=matches)["loss_cls"].backward()
    assert abs(float(logits.grad[1, 0])) < 1e-6 and float(logits.grad[0, 1]) < 0
    plain = torch.full((3, 2), -4.0, requires_grad=True)
    plain_logits = plain.clone()
    plain_logits.data[1, 0] = torch.logit(iou[1])
    DetectionLoss(weight_objectness=0)(make_output(plain_logits, pred, [3]), [target], matches=matches)["loss_cls"].backward()
    assert float(plain.grad[1, 0]) < 0  # with target 1 the same score is still pushed up


def torchvision_iou(a, b):
    from torchvision.ops import box_iou

    return box_iou(box_convert(a, "cxcywh", "xyxy"), box_convert(b, "cxcywh", "xyxy"))
