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


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of matched xyxy box pairs, [M]: torchvision's generalized_box_iou_loss
    (reduction "none") with the empty intersection clamped to 0 instead of boolean-mask
    indexing, which would make the host wait for the device on every step."""
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    inter = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0) * (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (inter / (union + eps) - (hull - union) / (hull + eps))


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
    ):
        super().__init__()
        self.matcher = matcher or HungarianMatcher(weight_cls, weight_l1, weight_giou, focal_alpha, focal_gamma)
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
    ) -> dict[str, torch.Tensor]:
        """num_boxes: normalizer; default the local GT count (the engine passes the count of the
        whole global batch). step: keys federated sampling (default: an internal call counter).
        matches: reuse a precomputed matching."""
        if len(targets) != outputs.num_images:
            raise ValueError(f"{len(targets)} targets for {outputs.num_images} images")
        logits, device = outputs.logits, outputs.logits.device
        T, K = logits.shape
        if matches is None:
            matches = self.matcher(outputs, targets)
        if num_boxes is None:
            num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)

        offsets = outputs.row_offsets
        rows = torch.cat([offsets[i] + r for i, (r, _) in enumerate(matches)]).to(device)
        gt_labels = torch.cat([t["labels"].to(device)[g] for t, (_, g) in zip(targets, matches)])
        gt_boxes = torch.cat([t["boxes"].to(device, outputs.pred_boxes.dtype)[g] for t, (_, g) in zip(targets, matches)])

        cls_target = torch.zeros_like(logits)
        cls_target[rows, gt_labels] = 1.0
        counted, not_exh = self.class_masks(targets, K, step, device)
        img = outputs.image_index
        weight = counted[img] & ~(not_exh[img] & (cls_target == 0))
        focal = sigmoid_focal_loss(logits, cls_target, self.alpha, self.gamma, reduction="none")
        losses = {"loss_cls": (focal * weight).sum() / num_boxes}

        pred = outputs.pred_boxes[rows]
        losses["loss_l1"] = F.l1_loss(pred, gt_boxes, reduction="sum") / num_boxes
        losses["loss_giou"] = giou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy")).sum() / num_boxes
        if outputs.objectness is not None:
            obj_target = torch.zeros_like(outputs.objectness)
            obj_target[rows] = 1.0
            losses["loss_objectness"] = (
                sigmoid_focal_loss(outputs.objectness, obj_target, self.alpha, self.gamma, reduction="sum") / num_boxes
            )
        else:
            losses["loss_objectness"] = logits.new_zeros(())
        losses["loss"] = sum(self.weights[k] * v for k, v in losses.items())
        self._calls += 1
        return losses
