"""Set-prediction detection loss for the OWL head: Hungarian matching, sigmoid focal
classification with LVIS federated category masks, L1 + GIoU box losses, objectness.

Targets are one dict per image, in the order the images were packed:
    "labels": long [G] class indices (0..K-1)
    "boxes": float [G, 4] normalized (cx, cy, w, h) in [0, 1] of the image's extent
optional:
    "class_mask": bool [K] categories whose classification loss counts (federated loss)
    "neg_labels": long [*] categories verified absent (LVIS neg_category_ids)
    "not_exhaustive_labels": long [*] categories with unlabeled instances (LVIS not_exhaustive_category_ids)
    "image_id": int, keys federated sampling so it is reproducible
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from ..models.heads.owl import OwlOutput


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """[T, K] logits, [G] labels -> [T, G]: focal loss of calling token t class labels[g]
    minus that of calling it background (Deformable DETR's matching cost)."""
    x = logits[:, labels]
    pos = sigmoid_focal_loss(x, torch.ones_like(x), alpha, gamma, reduction="none")
    neg = sigmoid_focal_loss(x, torch.zeros_like(x), alpha, gamma, reduction="none")
    return pos - neg


def _inter_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of matched xyxy box pairs, [M] each."""
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return inter, area(boxes1) + area(boxes2) - inter


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of matched xyxy box pairs, [M]: torchvision's generalized_box_iou_loss
    (reduction "none") with the empty intersection clamped to 0 instead of boolean-mask
    indexing, which would make the host wait for the device on every step."""
    inter, union = _inter_union(boxes1, boxes2)
    hull_wh = torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return 1 - (inter / (union + eps) - (hull - union) / (hull + eps))


def box_iou_pairs(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of matched xyxy box pairs, [M] (the diagonal of torchvision's box_iou, without the [M, M] matrix)."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / (union + eps)


def varifocal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise varifocal loss (Zhang et al. 2021, mmdet's VarifocalLoss) for soft targets in
    [0, 1]: binary cross-entropy weighted by the target q where q > 0 (minimal at sigmoid = q,
    so a score learns its box's IoU), by (1 - alpha) * p^gamma where q = 0 (focal down-weighting
    of easy negatives; alpha keeps sigmoid_focal_loss's meaning, 0.25 -> 0.75 on negatives)."""
    p = logits.sigmoid()
    weight = torch.where(target > 0, target, (1 - alpha) * p.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


class HungarianMatcher:
    """One-to-one assignment of predictions to ground truth per image, minimizing
    w_cls * focal class cost + w_l1 * L1(cxcywh) + w_giou * (-GIoU)."""

    def __init__(self, cost_class: float = 2.0, cost_l1: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0):
        self.cost_class, self.cost_l1, self.cost_giou = cost_class, cost_l1, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """[T, K] logits, [T, 4] and [G, 4] cxcywh boxes, [G] labels -> float [T, G]."""
        logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
        cls = focal_class_cost(logits, gt_labels, self.alpha, self.gamma)
        l1 = torch.cdist(boxes, gt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
        return self.cost_class * cls + self.cost_l1 * l1 - self.cost_giou * giou

    @torch.no_grad()
    def match(self, logits, boxes, gt_labels, gt_boxes) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction rows, gt indices), long [M] each, M = min(T, G), for one image."""
        return self.match_many([logits], [boxes], [gt_labels], [gt_boxes])[0]

    @torch.no_grad()
    def match_many(self, logits, boxes, gt_labels, gt_boxes) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`match` for many images with ONE device-to-host copy: every cost matrix is
        computed on the device, the concatenation crosses to the host once, the Hungarian
        assignments run there (scipy), and the indices come back in one copy."""
        device = boxes[0].device if boxes else torch.device("cpu")
        shapes = [(len(bx), len(lb)) for bx, lb in zip(boxes, gt_labels)]  # host ints: tensor shapes
        costs = [self.cost_matrix(lg, bx, lb, gb).flatten() for lg, bx, lb, gb, (t, g) in zip(logits, boxes, gt_labels, gt_boxes, shapes)
                 if t and g]  # fmt: skip
        # Non-finite logits or boxes (a diverging step) would make scipy raise before the trainer
        # can skip the step: assign on finite stand-ins; the loss stays non-finite, so the
        # trainer's non-finite-step path skips, counts and, after N in a row, stops.
        flat = torch.nan_to_num(torch.cat(costs), nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy() if costs else np.zeros(0)
        found, start = [], 0
        for t, g in shapes:
            if t and g:
                found.append(linear_sum_assignment(flat[start : start + t * g].reshape(t, g)))
                start += t * g
            else:
                found.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
        sizes = [len(r) for r, _ in found]
        both = torch.from_numpy(np.concatenate([np.concatenate([r for r, _ in found]), np.concatenate([c for _, c in found])]).astype(np.int64))
        rows, cols = both.to(device, non_blocking=True).split([sum(sizes)] * 2)
        return list(zip(rows.split(sizes), cols.split(sizes)))

    def __call__(self, outputs: OwlOutput, targets: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (rows local to that image's slice of ``outputs``, gt indices)."""
        return self.match_many(outputs.split("logits"), outputs.split("pred_boxes"), [t["labels"] for t in targets],
                               [t["boxes"] for t in targets])  # fmt: skip


class TopKMatcher:
    """One-to-many assignment (DETA / H-DETR's one-to-many branch, TOOD's candidate rule):
    each ground-truth box takes its ``k`` cheapest tokens under the Hungarian cost among the
    tokens whose cell centre lies in its box or within ``center_radius`` cells of its centre
    (so an object smaller than a cell still gets the tokens next to it); a token claimed by
    several boxes serves the cheapest. Many tokens then learn each object at once, which is
    what makes dense detectors converge in few steps; duplicates are removed by NMS at
    evaluation (``data.nms_iou``).

    Fixed-size result, no host round trip: per image ``(rows [k * G], gt [k * G], valid
    [k * G] float)``, rows local to the image; invalid candidates (outside every candidate
    region, or serving a cheaper box) carry valid = 0."""

    def __init__(self, cost: HungarianMatcher, k: int = 4, center_radius: float = 1.0):
        if k < 1:
            raise ValueError(f"one_to_many_k must be >= 1, got {k}")
        if center_radius < 0:
            raise ValueError(f"center_radius must be >= 0, got {center_radius}")
        self.cost, self.k, self.center_radius = cost, k, center_radius

    def candidates(self, cells: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """bool [T, G]: token t may serve box g (its cell centre is inside the box, or within
        ``center_radius`` cells of the box centre on both axes). Normalized cxcywh inputs."""
        offset = (cells[:, None, :2] - gt_boxes[None, :, :2]).abs()  # [T, G, 2]
        reach = torch.maximum(gt_boxes[None, :, 2:] / 2, self.center_radius * cells[:, None, 2:])
        return (offset <= reach).all(-1)

    @staticmethod
    def assign(cost: torch.Tensor, region: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rule on a [T, G] cost matrix and a bool [T, G] candidate region: each column
        takes its min(k, T) cheapest rows inside the region; a row valid for several columns
        serves its cheapest in-region one. -> (rows, cols, valid float), each [min(k, T) * G],
        column-major (the k rows of column 0 first)."""
        T, G = cost.shape
        k = min(k, T)
        cost = torch.nan_to_num(cost.float(), nan=1e8, posinf=1e8, neginf=-1e8) + 1e9 * (~region)
        owner = cost.argmin(1)  # [T]: the column each row would serve
        rows = cost.topk(k, dim=0, largest=False).indices  # [k, G]
        cols = torch.arange(G, device=cost.device).expand(k, G)
        valid = region.gather(0, rows) & (owner[rows] == cols)
        return rows.T.flatten(), cols.T.flatten(), valid.T.flatten().float()

    @torch.no_grad()
    def match_one(self, logits, boxes, cells, gt_labels, gt_boxes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, K] logits, [T, 4] predicted and [T, 4] cell boxes, [G] labels, [G, 4] gt boxes (all
        normalized cxcywh) -> (rows, gt, valid), each [min(k, T) * G]."""
        if not len(boxes) or not len(gt_labels):
            empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
            return empty, empty, torch.zeros(0, device=boxes.device)
        gt_boxes = gt_boxes.to(boxes.device, torch.float32)
        cost = self.cost.cost_matrix(logits, boxes, gt_labels, gt_boxes)
        return self.assign(cost, self.candidates(cells.float(), gt_boxes), self.k)

    def __call__(self, outputs: OwlOutput, targets: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if outputs.token_cells is None:
            raise ValueError("one-to-many matching needs OwlOutput.token_cells (each token's grid cell)")
        return [self.match_one(lg, bx, cl, t["labels"].to(bx.device), t["boxes"])
                for lg, bx, cl, t in zip(outputs.split("logits"), outputs.split("pred_boxes"), outputs.split("token_cells"), targets)]  # fmt: skip


# ---- federated category masks (LVIS) -----------------------------------------------------
class FederatedClassSampler:
    """Per-image bool [K] mask of the categories whose classification loss counts: the
    image's positives, its verified negatives, and ``num_sampled`` more categories drawn
    without replacement with probability proportional to image_count ** power (Zhou et al.,
    "Probabilistic two-stage detection"; detectron2 federated loss uses power 0.5).
    Draws are keyed by (seed, *key) so they do not depend on call order or worker layout."""

    def __init__(self, image_counts: Sequence[int] | np.ndarray, num_sampled: int = 50, power: float = 0.5, seed: int = 0):
        counts = np.asarray(image_counts, dtype=np.float64)
        if counts.ndim != 1 or (counts < 0).any():
            raise ValueError("image_counts must be a 1-D array of non-negative per-category image counts")
        self.weights = counts**power  # categories never seen in training get weight 0: never sampled
        self.num_classes = len(counts)
        self.num_sampled = num_sampled
        self.seed = seed

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor | None = None, key: Sequence[int] = ()) -> torch.Tensor:
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[np.asarray(positive.cpu() if torch.is_tensor(positive) else positive, dtype=np.int64)] = True
        if negative is not None:
            mask[np.asarray(negative.cpu() if torch.is_tensor(negative) else negative, dtype=np.int64)] = True
        weights = np.where(mask, 0.0, self.weights)
        candidates = np.flatnonzero(weights > 0)
        n = min(self.num_sampled, len(candidates))
        if n:
            rng = np.random.default_rng([self.seed, *[int(k) for k in key]])
            mask[rng.choice(candidates, size=n, replace=False, p=weights[candidates] / weights[candidates].sum())] = True
        return torch.from_numpy(mask)


@dataclass
class DetectionLossConfig:
    """Loss weights (the Hungarian matching cost uses the same weights) and focal parameters:
    the ``model.loss`` section of detection configs."""

    weight_cls: float = 2.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    weight_objectness: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Which tokens learn each object: "one_to_one" (Hungarian, OWL-ViT / DETR: no NMS needed),
    # "one_to_many" (each object's k cheapest tokens near it, TopKMatcher: converges in far
    # fewer steps; evaluate with data.nms_iou), or "hybrid" (both on the same head, the
    # one-to-many terms scaled by one_to_many_weight, as H-DETR's auxiliary branch).
    assignment: str = "one_to_one"
    one_to_many_k: int = 4
    one_to_many_weight: float = 1.0
    center_radius: float = 1.0  # in cells: one-to-many candidates also within this of the box centre
    # Class (and objectness) target of a positive = the IoU of its predicted box with its object
    # (detached) instead of 1, so scores rank well-placed boxes first (VarifocalNet, Stable-DINO).
    iou_aware: bool = False


ASSIGNMENTS = ("one_to_one", "one_to_many", "hybrid")


class DetectionLoss(nn.Module):
    """Hungarian-matched set loss for :class:`~navit_dense.models.heads.owl.OwlOutput`.

    Returns {"loss": weighted total, "loss_cls", "loss_l1", "loss_giou", "loss_objectness"}
    (components unweighted), each summed over the batch and divided by ``num_boxes``.

    Classification: sigmoid focal loss over [T, K] logits with target 1 at (matched token,
    its GT class). Entry (t, c) counts only if c is in the image's class mask (``class_mask``
    in the target, else sampled by ``federated``, else all classes) and, for categories in
    ``not_exhaustive_labels``, only where it is a matched positive: unlabeled instances of such
    categories may be what an unmatched token sees, so they never get a false-positive push.
    """

    def __init__(
        self,
        matcher: HungarianMatcher | None = None,
        weight_cls: float = 2.0,
        weight_l1: float = 5.0,
        weight_giou: float = 2.0,
        weight_objectness: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        federated: FederatedClassSampler | None = None,
        assignment: str = "one_to_one",
        one_to_many_k: int = 4,
        one_to_many_weight: float = 1.0,
        center_radius: float = 1.0,
        iou_aware: bool = False,
    ):
        super().__init__()
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"model.loss.assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        self.matcher = matcher or HungarianMatcher(weight_cls, weight_l1, weight_giou, focal_alpha, focal_gamma)
        self.o2m_matcher = TopKMatcher(self.matcher, one_to_many_k, center_radius)
        self.assignment, self.o2m_weight = assignment, one_to_many_weight
        self.iou_aware = iou_aware
        self.weights = {"loss_cls": weight_cls, "loss_l1": weight_l1, "loss_giou": weight_giou, "loss_objectness": weight_objectness}
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.federated = federated
        self._calls = 0

    @classmethod
    def from_config(cls, cfg: DetectionLossConfig, federated: FederatedClassSampler | None = None) -> "DetectionLoss":
        return cls(None, **asdict(cfg), federated=federated)

    def class_masks(
        self, targets: Sequence[dict], num_classes: int, step: int | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(counted [N, K], not_exhaustive [N, K]) bool masks, positives always counted.

        Targets that carry both masks already ("class_mask" with the positives set, and
        "not_exhaustive_mask", as the detection task's collate builds them in the data workers)
        are stacked as they are, with no host round trip; otherwise they are built here."""
        if targets and all("class_mask" in t and "not_exhaustive_mask" in t for t in targets):
            return torch.stack([t["class_mask"] for t in targets]).to(device), torch.stack([t["not_exhaustive_mask"] for t in targets]).to(device)
        step = self._calls if step is None else step
        masks = [self.target_masks(t, num_classes, key=(step, int(t.get("image_id", i)))) for i, t in enumerate(targets)]
        return torch.stack([m[0] for m in masks]).to(device), torch.stack([m[1] for m in masks]).to(device)

    def target_masks(self, target: dict, num_classes: int, key: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(counted [K], not_exhaustive [K]) bool masks of one target on the host: its own
        "class_mask" when given, else the federated sampler's draw keyed by ``key``, else all
        classes; positives always counted."""
        labels = torch.as_tensor(target["labels"]).cpu()
        if "class_mask" in target:
            counted = torch.as_tensor(target["class_mask"]).cpu().clone()
        elif self.federated is not None:
            counted = self.federated(labels, target.get("neg_labels"), key=key)
        else:
            counted = torch.ones(num_classes, dtype=torch.bool)
        counted[labels] = True
        not_exh = torch.zeros(num_classes, dtype=torch.bool)
        if "not_exhaustive_labels" in target:
            not_exh[torch.as_tensor(target["not_exhaustive_labels"]).cpu()] = True
        return counted, not_exh

    def forward(
        self,
        outputs: OwlOutput,
        targets: Sequence[dict],
        num_boxes: float | None = None,
        step: int | None = None,
        matches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        matches_o2m: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """num_boxes: normalizer; default the local GT count (the engine passes the count of the
        whole global batch). step: keys federated sampling (default: an internal call counter).
        matches / matches_o2m: reuse a precomputed one-to-one / one-to-many matching."""
        if len(targets) != outputs.num_images:
            raise ValueError(f"{len(targets)} targets for {outputs.num_images} images")
        logits, device = outputs.logits, outputs.logits.device
        K = logits.shape[1]
        if matches is None and self.assignment != "one_to_many":
            matches = self.matcher(outputs, targets)
        if num_boxes is None:
            num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)

        counted, not_exh = self.class_masks(targets, K, step, device)
        counted = counted[outputs.image_index]
        not_exh = not_exh[outputs.image_index]
        losses = {}
        if self.assignment != "one_to_many":
            rows, gt = self._gather(outputs, targets, [(r, g) for r, g, *_ in matches])
            losses.update(self._terms(outputs, rows, *gt, None, counted, not_exh, num_boxes))
        if self.assignment != "one_to_one":
            o2m = matches_o2m if matches_o2m is not None else self.o2m_matcher(outputs, targets)
            rows, gt = self._gather(outputs, targets, [(r, g) for r, g, _ in o2m])
            valid = torch.cat([v for _, _, v in o2m]).to(outputs.pred_boxes.dtype)
            terms = self._terms(outputs, rows, *gt, valid, counted, not_exh, num_boxes * self.o2m_matcher.k)
            prefix = "" if self.assignment == "one_to_many" else "o2m_"
            losses.update({k.replace("loss_", f"loss_{prefix}"): v for k, v in terms.items()})
        losses["loss"] = sum(self.weights[k.replace("o2m_", "")] * (self.o2m_weight if "o2m_" in k else 1.0) * v for k, v in losses.items())
        self._calls += 1
        return losses

    def _class_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.iou_aware:
            return varifocal_loss(logits, target, self.alpha, self.gamma)
        return sigmoid_focal_loss(logits, target, self.alpha, self.gamma, reduction="none")

    @staticmethod
    def _gather(outputs: OwlOutput, targets: Sequence[dict], matches) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Global rows of the matched tokens and their gt (labels, boxes), concatenated over images."""
        device = outputs.logits.device
        rows = torch.cat([outputs.row_offsets[i] + r.to(device) for i, (r, _) in enumerate(matches)])
        labels = torch.cat([t["labels"].to(device)[g.to(device)] for t, (_, g) in zip(targets, matches)])
        boxes = torch.cat([t["boxes"].to(device, outputs.pred_boxes.dtype)[g.to(device)] for t, (_, g) in zip(targets, matches)])
        return rows, (labels, boxes)

    def _terms(self, outputs: OwlOutput, rows, gt_labels, gt_boxes, valid, counted, not_exh, norm: float) -> dict[str, torch.Tensor]:
        """Class, box and objectness losses of one assignment: tokens ``rows`` are positives of
        (gt_labels, gt_boxes), weighted by ``valid`` (1 for every row when None); each summed and
        divided by ``norm``."""
        logits = outputs.logits
        w = torch.ones_like(rows, dtype=logits.dtype) if valid is None else valid
        pred = outputs.pred_boxes[rows]
        pred_xyxy, gt_xyxy = box_convert(pred, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy")
        score = w * box_iou_pairs(pred_xyxy.detach(), gt_xyxy).clamp(min=0.01) if self.iou_aware else w
        # Positive (token, class) pairs hold their score, > 0 exactly where w > 0 (the IoU is
        # clamped to >= 0.01), so a soft target of a non-exhaustive class still counts.
        cls_target = torch.zeros_like(logits).index_put_((rows, gt_labels), score, accumulate=True).clamp_(max=1.0)
        weight = counted & ~(not_exh & (cls_target == 0))
        focal = self._class_loss(logits, cls_target)
        terms = {"loss_cls": (focal * weight).sum() / norm}
        terms["loss_l1"] = (F.l1_loss(pred, gt_boxes, reduction="none").sum(-1) * w).sum() / norm
        terms["loss_giou"] = (giou_loss(pred_xyxy, gt_xyxy) * w).sum() / norm
        if outputs.objectness is not None:
            obj_target = torch.zeros_like(outputs.objectness).index_put_((rows,), score, accumulate=True).clamp_(max=1.0)
            terms["loss_objectness"] = self._class_loss(outputs.objectness, obj_target).sum() / norm
        else:
            terms["loss_objectness"] = logits.new_zeros(())
        return terms
