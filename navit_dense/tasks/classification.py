"""Toy task "classification": synthetic textured shapes at random sizes and aspect ratios,
label = shape. Small enough to exercise the whole engine end to end on a CPU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import PackedBatch
from ..engine.config import DataConfig, ModelConfig
from ..engine.task import LossContext, PackPlan, Task, register_task

SHAPES = ("disk", "square", "triangle", "ring")


class ShapesDataset:
    """Image i: one textured shape on a noisy background; its size, aspect ratio, colours and
    textures are drawn from (seed, i), so ``image_size`` is known without rendering. Training
    images are flipped at random (global RNG, which the engine seeds per sample and epoch)."""

    def __init__(self, size: int, min_side: int, max_side: int, seed: int, train: bool):
        rng = np.random.default_rng([seed, 0])
        self.sizes = rng.integers(min_side, max_side + 1, size=(size, 2))
        self.labels = rng.integers(0, len(SHAPES), size=size)
        self.seed, self.train = seed, train

    def __len__(self) -> int:
        return len(self.labels)

    def image_size(self, index: int) -> tuple[int, int]:
        return int(self.sizes[index, 0]), int(self.sizes[index, 1])

    def __getitem__(self, index: int) -> dict:
        h, w = self.image_size(index)
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, 1, index])
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = rng.uniform(0.3, 0.45) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        dy, dx = y - cy, x - cx
        dist = np.hypot(dy, dx)
        mask = {
            "disk": dist < r,
            "square": np.maximum(abs(dy), abs(dx)) < 0.8 * r,
            "triangle": (dy > -r) & (dy < 0.7 * r) & (abs(dx) < 0.6 * (dy + r)),
            "ring": (dist < r) & (dist > 0.55 * r),
        }[SHAPES[label]]
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8)
        stripes = 0.5 + 0.5 * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))
        # A bright striped shape on a dark noisy background: learnable by a 2-block model in minutes.
        fg = (0.6 + 0.4 * rng.uniform(0, 1, 3))[:, None, None] * (0.75 + 0.25 * stripes)
        bg = rng.uniform(0, 0.4, 3)[:, None, None] + rng.normal(0, 0.05, (3, h, w))
        image = torch.from_numpy(np.where(mask, fg, bg).astype(np.float32)) * 2 - 1
        if self.train and torch.rand(()) < 0.5:  # global RNG: the engine seeds it per sample
            image = image.flip(-1)
        return {"image": image, "label": label}


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(batch), batch)


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


@dataclass
class ClassificationModelConfig(ModelConfig):
    label_smoothing: float = 0.0


@dataclass
class ClassificationDataConfig(DataConfig):
    train_size: int = 2048
    val_size: int = 256  # 0: no validation set
    min_side: int = 32
    max_side: int = 128


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
        return ShapesDataset(size, d.min_side, d.max_side, seed=0 if split == "train" else 1, train=split == "train") if size else None

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
