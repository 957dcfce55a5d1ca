"""Toy task "classification": synthetic textured shapes at random sizes and aspect ratios
(navit_dense.data.synthetic.shapes), label = shape. Small enough to exercise the whole engine
end to end on a CPU. Wiring only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.synthetic.shapes import SHAPES, ShapesDataset
from ..engine.config import DataConfig, ModelConfig
from ..engine.task import LossContext, PackPlan, Task, register_task
from ..evaluation.evaluators import AccuracyEvaluator
from ..models.heads.classifier import Classifier


@dataclass
class ClassificationModelConfig(ModelConfig):
    label_smoothing: float = 0.0


@dataclass
class ClassificationDataConfig(DataConfig):
    train_size: int = 2048
    val_size: int = 256  # 0: no validation set
    image_min_side: int = 32  # synthetic image sides are drawn from [image_min_side, image_max_side]
    image_max_side: int = 128


@register_task("classification")
class ClassificationTask(Task):
    ModelConfig = ClassificationModelConfig
    DataConfig = ClassificationDataConfig

    def build_model(self) -> nn.Module:
        # No feature maps are unpacked here, so the mask token would be an unused parameter (DDP error).
        return Classifier(self.build_backbone(mask_fill="zeros", num_classes=len(SHAPES)))

    def build_dataset(self, split: str) -> ShapesDataset | None:
        d = self.cfg.data
        size = {"train": d.train_size, "val": d.val_size}[split]
        return ShapesDataset(size, d.image_min_side, d.image_max_side, seed=0 if split == "train" else 1, train=split == "train") if size else None

    def collate(self, samples: list[dict], plan: PackPlan):
        batch = plan.pack([s["image"] for s in samples])
        return batch, {"labels": torch.tensor([s["label"] for s in samples])}

    def losses(self, logits: torch.Tensor, targets: dict, ctx: LossContext) -> dict[str, torch.Tensor]:
        labels, n = targets["labels"], ctx.totals["images"]
        loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=self.cfg.model.label_smoothing) / n
        accuracy = (logits.argmax(-1) == labels).sum().float() / n
        return {"loss": loss, "accuracy": accuracy}

    def build_evaluator(self) -> AccuracyEvaluator:
        return AccuracyEvaluator()
