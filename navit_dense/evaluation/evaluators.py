"""Evaluators: model outputs of each micro-batch in, metrics out (the engine's Evaluator
protocol: ``process`` per micro-batch, ``state``/``merge`` across DDP ranks, ``metrics`` on
rank 0). One class per task output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.heads.owl import DetectorOutput, postprocess, to_coco_results
from ..models.heads.segmenter import SegOutput, class_map, upsample
from ..models.sliding_window import merge_windows
from .lvis_eval import evaluate_lvis
from .seg_metrics import SegMetric


class LvisEvaluator:
    """Detections of every image as LVIS result records (original pixel coordinates), scored
    with :func:`evaluate_lvis` (bbox, LVIS standard protocol, at most ``topk`` per image)."""

    def __init__(self, gt: dict, category_ids: list[int], topk: int = 300, nms_iou: float | None = None,
                 score_thresh: float = 0.0, use_objectness: bool = False):  # fmt: skip
        self.gt, self.category_ids = gt, category_ids
        self.topk, self.nms_iou, self.score_thresh, self.use_objectness = topk, nms_iou, score_thresh, use_objectness
        self.results: list[dict] = []
        self.image_ids: set[int] = set()

    def process(self, outputs: DetectorOutput, targets: list[dict]) -> None:
        # Boxes are predicted relative to the packed image's extent: scale by its pre-packing
        # size divided by the augmentation scale (1 at evaluation) -> original pixels.
        scale = torch.tensor([t["scale"] for t in targets], dtype=torch.float32)
        dets = postprocess(outputs.owl, outputs.batch, self.topk, self.nms_iou, self.score_thresh,
                           use_objectness=self.use_objectness, scale=scale)  # fmt: skip
        ids = [t["image_id"] for t in targets]
        self.results += to_coco_results(dets, ids, self.category_ids)
        self.image_ids.update(ids)

    def state(self) -> tuple[list[dict], list[int]]:
        return self.results, sorted(self.image_ids)

    def merge(self, states: list[tuple[list[dict], list[int]]]) -> None:
        for results, ids in states:
            self.results += results
            self.image_ids.update(ids)

    def metrics(self) -> dict[str, float]:
        metrics = evaluate_lvis(self.gt, self.results, "bbox", "standard", max_dets=self.topk)
        return {**metrics, "images": float(len(self.image_ids)), "detections": float(len(self.results))}


class SegEvaluator:
    """Predictions at each image's original size -> SegMetric (mmseg IoUMetric numbers).
    ``keep`` > 0 also keeps the predicted maps of dataset items with index < keep (tools)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None, keep: int = 0):
        self.metric = SegMetric(num_classes, ignore_index=ignore_index, class_names=class_names)
        self.keep = keep
        self.predictions: dict[int, torch.Tensor] = {}

    def process(self, outputs: SegOutput, targets: dict) -> None:
        logits = iter(outputs.logits)
        for label, boxes, index in zip(targets["labels"], targets["windows"], targets["index"]):
            if boxes is None:
                full = upsample(next(logits).float(), label.shape)
            else:
                full = merge_windows([next(logits) for _ in boxes], boxes, label.shape)
            pred = class_map(full)
            self.metric.update(pred, label)
            if index < self.keep:
                self.predictions[index] = pred.to(torch.int16).cpu()

    def state(self) -> dict:
        return {"metric": self.metric, "predictions": self.predictions}

    def merge(self, states: list[dict]) -> None:
        for s in states:
            self.metric.merge(s["metric"])
            self.predictions.update(s["predictions"])

    def metrics(self) -> dict[str, float]:
        m = self.metric.compute()
        summary = {k: m[k] for k in ("mIoU", "mAcc", "aAcc")}
        return {**summary, "images": float(self.metric.num_updates), "pixels": float(m["num_pixels"])}


class AccuracyEvaluator:
    def __init__(self):
        self.correct, self.total, self.loss = 0, 0, 0.0

    def process(self, logits: torch.Tensor, targets: dict) -> None:
        labels = targets["labels"]
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.total += len(labels)
        self.loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))

    def state(self) -> tuple[int, int, float]:
        return self.correct, self.total, self.loss

    def merge(self, states: list[tuple[int, int, float]]) -> None:
        for correct, total, loss in states:
            self.correct, self.total, self.loss = self.correct + correct, self.total + total, self.loss + loss

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.correct / max(self.total, 1), "loss": self.loss / max(self.total, 1), "images": self.total}
