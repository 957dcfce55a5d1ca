"""Task "detection": an OWL-ViT / OWLv2-style open-vocabulary detector (NaViT + OwlHead) on
COCO / LVIS-format data, evaluated with the LVIS protocol (AP, APr/APc/APf).

Images are packed at native aspect ratio under the per-image token budget; the head predicts
boxes relative to each image's extent, so targets are normalized boxes and detections go back
to original pixels through the pre-packing size and the augmentation scale carried in the
targets. Rare classes are helped by repeat-factor sampling (a per-epoch list of repeated
image indices the engine's token-budget sampler consumes, see ``repeat_factors``) and by the
federated loss (only positives, verified negatives and sampled categories count per image).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..data import PackedBatch
from ..data.coco_json import InstanceDataset, load_instances
from ..data.resize import scale_budgets
from ..data.detection import (
    CategoryMap,
    Compose,
    DetectionDataset,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ScaleJitter,
    detection_targets,
    lvis_repeat_factors,
)
from ..engine.config import DataConfig, ModelConfig
from ..engine.task import LossContext, PackPlan, Task, register_task
from ..losses.detection import DetectionLoss, FederatedClassSampler, HungarianMatcher
from ..models.owl_head import OwlHead, OwlOutput, postprocess, to_coco_results


# ---- config ----------------------------------------------------------------------------------
@dataclass
class LossConfig:
    weight_cls: float = 2.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    weight_objectness: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class DetectionModelConfig(ModelConfig):
    query_dim: int = 0  # width of the class-query space; 0: the backbone width
    objectness: bool = True  # OWLv2 objectness head (trained on detached features)
    # "" : one learned query per category; "words": fixed bag-of-words embeddings of the category
    # names (a stand-in text encoder: classes sharing a word share a query direction, which is
    # what lets rare classes borrow from frequent ones); else a .npy/.npz/.safetensors
    # [num_classes, query_dim] file, e.g. CLIP text embeddings of the class names.
    class_embeddings: str = ""
    trainable_class_embeddings: bool = False  # for "words" / file queries
    merge_class_token: bool = False  # OWL-ViT: multiply tokens by the class token (needs backbone.class_token)
    prior_prob: float = 0.01
    init_logit_scale: float = 3.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class DetectionDataConfig(DataConfig):
    train_json: str = ""  # "" : no training split
    train_images: str = ""  # image root of train_json's file_name entries
    val_json: str = ""
    val_images: str = ""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Training augmentations: budget scale jitter (side factor; tokens scale by its square),
    # horizontal flip, aspect-preserving random crop of min_crop..1 of each side.
    scale_jitter: list[float] = field(default_factory=lambda: [0.75, 1.25])
    flip_prob: float = 0.5
    crop_prob: float = 0.0
    min_crop: float = 0.5
    repeat_threshold: float = 0.0  # LVIS repeat-factor sampling threshold t (LVIS: 0.001); 0 disables
    # Federated loss: per image, positives + verified negatives + this many categories sampled
    # by image_count ** 0.5 (LVIS: 50); -1 counts every category (exhaustively labelled data).
    federated_negatives: int = 50
    # Evaluation: detections per image (LVIS: 300), class-wise NMS IoU (0: none), score floor,
    # scores multiplied by sigmoid(objectness), and an optional cap on the longer side in pixels.
    topk: int = 300
    nms_iou: float = 0.0
    score_thresh: float = 0.0
    use_objectness: bool = False
    max_side: Optional[int] = None  # cap on the longer side in pixels when packing (the resolution sweep sets it)


# ---- model -----------------------------------------------------------------------------------
@dataclass
class DetectorOutput:
    owl: OwlOutput  # per-token logits / boxes / objectness
    batch: PackedBatch  # the packed input: image sizes for post-processing


class OwlDetector(nn.Module):
    def __init__(self, backbone: nn.Module, head: OwlHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: PackedBatch) -> DetectorOutput:
        # Packed tokens straight into the head: no per-image feature maps are needed.
        return DetectorOutput(self.head(self.backbone.forward_features(batch), batch), batch)


def word_embeddings(names: list[str], dim: int) -> torch.Tensor:
    """[K, dim] unit vectors: the normalized sum of one fixed Gaussian vector per word of each
    name (words split on '_' and spaces; a word's vector is seeded by its SHA-256, so it is the
    same for every run and vocabulary)."""
    out = []
    for name in names:
        vecs = []
        for word in name.lower().replace("_", " ").split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            vecs.append(np.random.default_rng(seed).standard_normal(dim))
        out.append(np.sum(vecs, axis=0))
    emb = torch.tensor(np.stack(out), dtype=torch.float32)
    return emb / emb.norm(dim=-1, keepdim=True)


def check_query_order(path: str, category_ids: list[int]) -> None:
    """A query file that records its ``category_ids`` (tools/make_text_queries.py) must list
    this dataset's categories in label order (sorted ids); files without them are trusted."""
    if not str(path).endswith(".safetensors"):
        return
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if "category_ids" not in f.keys():
            return
        ids = f.get_tensor("category_ids").tolist()
    if ids != list(category_ids):
        diff = next((i for i, (a, b) in enumerate(zip(ids, category_ids)) if a != b), min(len(ids), len(category_ids)))
        raise ValueError(f"model.class_embeddings {path}: its category_ids differ from the dataset's at label {diff} "
                         f"({ids[diff:diff + 3]} vs {list(category_ids)[diff:diff + 3]}): made for another category list")  # fmt: skip


# ---- data ------------------------------------------------------------------------------------
class LvisDetectionDataset(DetectionDataset):
    """DetectionDataset plus the engine hooks: the annotation file's skip counts for the run
    summary and, when a threshold is set, LVIS repeat factors for the token-budget sampler.
    Undecodable images raise DataError (the engine skips them in training only)."""

    def __init__(self, *args, repeat_threshold: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeat_threshold = repeat_threshold

    def repeat_factors(self) -> np.ndarray:
        if self.repeat_threshold <= 0:
            return np.ones(len(self))
        return lvis_repeat_factors(self.image_labels(), self.repeat_threshold)

    def skip_summary(self) -> dict:
        return {"annotations": self.instances.counts}


# ---- evaluation ------------------------------------------------------------------------------
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
        from ..evaluation.lvis_eval import evaluate_lvis  # imported on use: registering the task stays light

        metrics = evaluate_lvis(self.gt, self.results, "bbox", "standard", max_dets=self.topk)
        return {**metrics, "images": float(len(self.image_ids)), "detections": float(len(self.results))}


# ---- task ------------------------------------------------------------------------------------
@register_task("detection")
class DetectionTask(Task):
    ModelConfig = DetectionModelConfig
    DataConfig = DetectionDataConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self._instances: dict[str, InstanceDataset] = {}  # loaded annotation files, by path
        self._datasets: dict[str, LvisDetectionDataset] = {}
        self._loss: DetectionLoss | None = None
        self._gt: dict | None = None  # val ground truth, loaded once for all evaluations

    # ---- categories and files ----
    def instances(self, path: str) -> InstanceDataset:
        if path not in self._instances:
            self._instances[path] = load_instances(path)
        return self._instances[path]

    def categories(self) -> CategoryMap:
        """The class list: that of val_json when set (smaller to load than LVIS train), else train_json."""
        d = self.cfg.data
        path = d.val_json or d.train_json
        if not path:
            raise ValueError("detection task: set data.train_json and/or data.val_json")
        return CategoryMap(self.instances(path).categories.values())

    # ---- model ----
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        # No pooled vector and no feature maps are used: the MAP head / mask token would be
        # parameters without gradients (DDP errors), so they are off unless asked for.
        backbone = self.build_backbone(global_pool="none", mask_fill="zeros")
        cats = self.categories()
        query_dim = m.query_dim or backbone.embed_dim
        learned = m.class_embeddings == ""
        head = OwlHead(backbone.embed_dim, len(cats) if learned else 0, query_dim, objectness=m.objectness,
                       merge_class_token=m.merge_class_token, prior_prob=m.prior_prob,
                       init_logit_scale=m.init_logit_scale)  # fmt: skip
        if m.class_embeddings == "words":
            head.set_class_embeddings(word_embeddings(cats.names, query_dim), trainable=m.trainable_class_embeddings)
        elif not learned:
            head.load_class_embeddings(m.class_embeddings, trainable=m.trainable_class_embeddings)
        if head.num_classes != len(cats):
            raise ValueError(f"{m.class_embeddings}: {head.num_classes} class embeddings for {len(cats)} categories")
        if not learned and m.class_embeddings != "words":
            check_query_order(m.class_embeddings, cats.category_ids)
        return OwlDetector(backbone, head)

    # ---- data ----
    def build_dataset(self, split: str) -> LvisDetectionDataset | None:
        d = self.cfg.data
        path, root = {"train": (d.train_json, d.train_images), "val": (d.val_json, d.val_images)}[split]
        if not path:
            return None
        if split not in self._datasets:
            train = split == "train"
            steps = [Normalize(d.mean, d.std)]
            if train:
                lo, hi = d.scale_jitter
                steps = [RandomHorizontalFlip(d.flip_prob), RandomCrop(d.min_crop, 1.0, p=d.crop_prob), ScaleJitter(lo, hi), *steps]
            ds = LvisDetectionDataset(self.instances(path), root, Compose(steps), repeat_threshold=d.repeat_threshold if train else 0.0)
            if ds.categories.category_ids != self.categories().category_ids:
                raise ValueError(f"{path}: its category list differs from {d.val_json or d.train_json} (the model's classes)")
            self._datasets[split] = ds
        return self._datasets[split]

    def collate(self, samples: list, plan: PackPlan):
        # Budget scale jitter multiplies each image's token budget (capped at one sequence).
        budgets = scale_budgets(plan.max_tokens, [s.budget_scale for s in samples], plan.seq_len - plan.num_prefix_tokens)
        plan = replace(plan, max_tokens=budgets, max_side=self.cfg.data.max_side)
        batch = plan.pack([s.image for s in samples])
        targets = detection_targets(samples)  # normalized cxcywh boxes + image_id, scale, LVIS lists
        for t in targets:
            t.pop("masks", None)
        return batch, targets

    def count(self, batch: PackedBatch, targets: list[dict]) -> dict[str, float]:
        return {"images": float(batch.num_images), "boxes": float(sum(len(t["labels"]) for t in targets))}

    # ---- loss ----
    def loss_module(self) -> DetectionLoss:
        if self._loss is None:
            m, d = self.cfg.model.loss, self.cfg.data
            federated = None
            if d.federated_negatives >= 0:
                counts = self.categories().image_counts
                if not counts.any():  # COCO-style files carry no image_count: count the train split
                    counts = np.bincount([c for s in self.build_dataset("train").image_labels() for c in s], minlength=len(counts))
                federated = FederatedClassSampler(counts, d.federated_negatives, seed=self.cfg.seed)
            matcher = HungarianMatcher(m.weight_cls, m.weight_l1, m.weight_giou, m.focal_alpha, m.focal_gamma)
            self._loss = DetectionLoss(matcher, m.weight_cls, m.weight_l1, m.weight_giou, m.weight_objectness,
                                       m.focal_alpha, m.focal_gamma, federated)  # fmt: skip
        return self._loss

    def losses(self, outputs: DetectorOutput, targets: list[dict], ctx: LossContext) -> dict[str, torch.Tensor]:
        # Normalized by the GT boxes of the whole global batch (all ranks, all micro-batches).
        num_boxes = max(ctx.totals["boxes"], 1.0)
        return self.loss_module()(outputs.owl, targets, num_boxes=num_boxes, step=ctx.step)

    # ---- evaluation ----
    def build_evaluator(self) -> LvisEvaluator:
        d = self.cfg.data
        if not d.val_json:
            raise ValueError("detection evaluation needs data.val_json")
        if self._gt is None:
            self._gt = json.loads(Path(d.val_json).read_text())
        return LvisEvaluator(self._gt, self.categories().category_ids, d.topk, d.nms_iou or None, d.score_thresh, d.use_objectness)
