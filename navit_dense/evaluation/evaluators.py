"""Evaluators: model outputs of each micro-batch in, metrics out (the engine's Evaluator
protocol: ``process`` per micro-batch, ``state``/``merge`` across DDP ranks, ``metrics`` on
rank 0). One class per task output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import clip_boxes_to_image

from ..models.heads.owl import DetectorOutput, postprocess, to_coco_results
from ..models.heads.segmenter import SegOutput, class_map, upsample
from ..models.sliding_window import merge_windows
from .lvis_eval import COCO_MAX_DETS, COCO_METRICS, LVIS_METRICS, EvalInputError, detections_per_image, evaluate_lvis, gt_format, validate_gt
from .seg_metrics import SegMetric


class LvisEvaluator:
    """Detections of every image as COCO / LVIS result records (original pixel coordinates),
    scored with :func:`evaluate_lvis` (bbox, standard protocol) under the ground truth's own
    protocol: LVIS keeps ``topk`` detections per image (LVIS: 300), COCO at most 100 (COCO's
    maxDets; its metric names, no APr/APc/APf).

    gt: the ground truth JSON (the detection task passes ``InstanceDataset.to_json()``: the
    training data's reading), validated here, so a bad validation file fails when the run
    starts rather than at its first evaluation; ``source`` names it in errors. Zero-area boxes
    (a prediction clipped to nothing at the image border) are dropped, as lvis-api drops
    them, and counted in ``metrics()["zero_area_detections"]``."""

    def __init__(self, gt: dict, category_ids: list[int], topk: int = 300, nms_iou: float | None = None,
                 score_thresh: float = 0.0, use_objectness: bool = False, source: str = "ground truth"):  # fmt: skip
        self.format = gt_format(gt, source)
        validate_gt(gt, self.format, "bbox", source)
        unknown = sorted(set(category_ids) - {c["id"] for c in gt["categories"]})
        if unknown:
            raise EvalInputError(f"{source}: has no categories with the model's ids {unknown[:10]}")
        self.metric_names = LVIS_METRICS if self.format == "lvis" else COCO_METRICS
        self.gt, self.category_ids = gt, category_ids
        self.topk = detections_per_image(self.format, topk)  # kept per image
        self.max_dets = topk if self.format == "lvis" else COCO_MAX_DETS  # the protocol's cap
        self.nms_iou, self.score_thresh, self.use_objectness = nms_iou, score_thresh, use_objectness
        self.results: list[dict] = []
        self.image_ids: set[int] = set()

    def process(self, outputs: DetectorOutput, targets: list[dict]) -> None:
        # Boxes are predicted relative to the packed image's extent: scale by its pre-packing
        # size divided by the augmentation scale (1 at evaluation) -> original pixels.
        scale = torch.tensor([t["scale"] for t in targets], dtype=torch.float32)
        dets = postprocess(outputs.owl, outputs.batch, self.topk, self.nms_iou, self.score_thresh,
                           use_objectness=self.use_objectness, scale=scale)  # fmt: skip
        for d, t in zip(dets, targets):  # a square-padded image (data.square_pad) is larger than the image itself
            if "orig_size" in t:
                d["boxes"] = clip_boxes_to_image(d["boxes"], tuple(int(v) for v in t["orig_size"]))
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
        kept = [r for r in self.results if r["bbox"][2] * r["bbox"][3] > 0]
        metrics = evaluate_lvis(self.gt, kept, "bbox", "standard", max_dets=self.max_dets)
        return {**metrics, "images": float(len(self.image_ids)), "detections": float(len(self.results)),
                "zero_area_detections": float(len(self.results) - len(kept))}  # fmt: skip


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
