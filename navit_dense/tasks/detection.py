"""Task "detection": an OWL-ViT / OWLv2-style open-vocabulary detector (NaViT + OwlHead) on
COCO / LVIS-format data, evaluated with the LVIS protocol (AP, APr/APc/APf). Wiring only: the
detector is navit_dense.models.heads.owl, the data navit_dense.data.detection, the loss
navit_dense.losses.detection, the evaluator navit_dense.evaluation.evaluators.

Images are packed at native aspect ratio under the per-image token budget; the head predicts
boxes relative to each image's extent, so targets are normalized boxes and detections go back
to original pixels through the pre-packing size and the augmentation scale carried in the
targets. Rare classes are helped by repeat-factor sampling (a per-epoch list of repeated
image indices the engine's token-budget sampler consumes, see ``repeat_factors``) and by the
federated loss (only positives, verified negatives and sampled categories count per image).

Ground truth is read once per file (``load_instances``): the datasets and the evaluator use the
same reading, so an annotation skipped or repaired for training is skipped or repaired in
evaluation too (the evaluator scores ``InstanceDataset.to_json()``). COCO-format ground truth is
evaluated with the COCO protocol (at most 100 detections per image, COCO metric names).
Dense scenes are checked when a split is built (see ``_check_recall_caps``).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn

from ..data import PackedBatch
from ..data.coco_json import InstanceDataset, load_instances
from ..data.decode import BadInputWarning
from ..data.detection import (
    CategoryMap,
    Compose,
    LvisDetectionDataset,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ScaleJitter,
    detection_targets,
)
from ..data.resize import budget_grid, scale_budgets
from ..engine.config import DataConfig, ModelConfig
from ..engine.task import LossContext, PackPlan, Task, register_task
from ..evaluation.evaluators import LvisEvaluator
from ..evaluation.lvis_eval import detections_per_image
from ..losses.detection import DetectionLoss, DetectionLossConfig, FederatedClassSampler
from ..models.heads.owl import DetectorOutput, OwlDetector, OwlHead, check_query_order, owl_detector_from_hf, word_embeddings


# ---- config ----------------------------------------------------------------------------------
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
    # An HF OWL-ViT / OWLv2 detector (save_pretrained directory): the backbone and heads are
    # built from its config.json and initialised from its weights (the backbone section then
    # only sets options such as attn_kernel / drop_path_rate; objectness, merge_class_token,
    # query_dim, prior_prob and init_logit_scale come from the checkpoint).
    hf_owl: str = ""
    prior_prob: float = 0.01
    init_logit_scale: float = 3.0
    loss: DetectionLossConfig = field(default_factory=DetectionLossConfig)


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
    # Pad every image bottom/right to a square of its longer side with black (HF Owlv2Processor's
    # layout) before packing, instead of packing it at native aspect; in training too (the
    # fixed-resolution square ViT regime of tools/compare_navit_vit.py), boxes then relative to the square.
    square_pad: bool = False


# ---- task ------------------------------------------------------------------------------------
@register_task("detection")
class DetectionTask(Task):
    ModelConfig = DetectionModelConfig
    DataConfig = DetectionDataConfig
    supports_uint8_patches = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._instances: dict[str, InstanceDataset] = {}  # loaded annotation files, by path
        self._datasets: dict[str, LvisDetectionDataset] = {}
        self._loss: DetectionLoss | None = None
        self._gt: dict | None = None  # val ground truth (the datasets' reading as JSON), built once for all evaluations
        self._patch_size: int | None = None  # the built model's, for the dense-scene check

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
        cats = self.categories()
        learned = m.class_embeddings == ""
        if m.hf_owl:
            try:
                detector = owl_detector_from_hf(m.hf_owl, load_weights=self.load_pretrained, **self.cfg.model.backbone.overrides())
            except (OSError, ValueError) as e:
                raise type(e)(f"model.hf_owl: {e}") from None
            head, query_dim = detector.head, detector.head.query_dim
            if learned:  # closed vocabulary on an imported detector: one trainable query per category
                head.set_class_embeddings(torch.randn(len(cats), query_dim, generator=torch.Generator().manual_seed(self.cfg.seed)),
                                          trainable=True)  # fmt: skip
        else:
            # No pooled vector and no feature maps are used: the MAP head / mask token would be
            # parameters without gradients (DDP errors), so they are off unless asked for.
            backbone = self.build_backbone(global_pool="none", mask_fill="zeros")
            query_dim = m.query_dim or backbone.embed_dim
            head = OwlHead(backbone.embed_dim, len(cats) if learned else 0, query_dim, objectness=m.objectness,
                           merge_class_token=m.merge_class_token, prior_prob=m.prior_prob,
                           init_logit_scale=m.init_logit_scale)  # fmt: skip
            detector = OwlDetector(backbone, head)
        if m.class_embeddings == "words":
            head.set_class_embeddings(word_embeddings(cats.names, query_dim), trainable=m.trainable_class_embeddings)
        elif not learned:
            head.load_class_embeddings(m.class_embeddings, trainable=m.trainable_class_embeddings)
        if head.num_classes != len(cats):
            raise ValueError(f"{m.class_embeddings}: {head.num_classes} class embeddings for {len(cats)} categories")
        if not learned and m.class_embeddings != "words":
            try:
                check_query_order(m.class_embeddings, cats.category_ids)
            except ValueError as e:
                raise ValueError(f"model.class_embeddings {e}") from None
        self._patch_size = detector.backbone.patch_size
        return detector

    # ---- data ----
    def build_dataset(self, split: str) -> LvisDetectionDataset | None:
        d = self.cfg.data
        path, root = {"train": (d.train_json, d.train_images), "val": (d.val_json, d.val_images)}[split]
        if not path:
            return None
        if split not in self._datasets:
            train = split == "train"
            steps = [] if self.pixel_norm is not None else [Normalize(d.mean, d.std)]  # uint8 patches: the model normalizes
            if train:
                lo, hi = d.scale_jitter
                steps = [RandomHorizontalFlip(d.flip_prob), RandomCrop(d.min_crop, 1.0, p=d.crop_prob), ScaleJitter(lo, hi), *steps]
            ds = LvisDetectionDataset(self.instances(path), root, Compose(steps), repeat_threshold=d.repeat_threshold if train else 0.0)
            model_classes = self.categories()
            if (ds.categories.category_ids, ds.categories.names) != (model_classes.category_ids, model_classes.names):
                raise ValueError(f"{path}: its category list (ids and names) differs from {d.val_json or d.train_json} (the model's classes)")
            self._check_recall_caps(ds, split)
            self._datasets[split] = ds
        return self._datasets[split]

    def _check_recall_caps(self, ds: LvisDetectionDataset, split: str) -> None:
        """Dense scenes: each kept patch token predicts one box, and evaluation keeps data.topk
        detections per image (COCO: at most 100), so an image holding more objects cannot be
        fully recalled. One warning per split, counts in the split's ``skip_summary()``. The
        token count is that of the configured budget (before token dropping), known once the
        model is built (the trainer and the tools build it first)."""
        d = self.cfg.data
        limits = {}
        if self._patch_size:
            grid = functools.cache(lambda h, w: math.prod(budget_grid(h, w, self._patch_size, d.max_tokens_per_image, d.max_side)))
            limits["more_objects_than_tokens"] = (lambda i: grid(*ds.image_size(i)),
                                                  f"kept tokens at data.max_tokens_per_image={d.max_tokens_per_image} (one box per token)")  # fmt: skip
        if split == "val":
            cap = detections_per_image(ds.instances.flavor, d.topk)
            coco = " and the COCO protocol's 100" if ds.instances.flavor == "coco" else ""
            limits["more_objects_than_topk"] = (lambda i: cap, f"the {cap} detections kept per image (data.topk={d.topk}{coco})")
        objects = [ds.num_objects(i) for i in range(len(ds))]
        notes = []
        for key, (limit, what) in limits.items():
            over = [(i, n, limit(i)) for i, n in enumerate(objects) if n > limit(i)]
            ds.recall_capped[key] = len(over)
            if over:
                i, n, lim = max(over, key=lambda o: o[1] - o[2])
                notes.append(f"{len(over)} image(s) hold more objects than {what}, e.g. {ds.images[i].file_name!r}: {n} objects, limit {lim}")
        if notes:
            warnings.warn(f"{ds.instances.path} ({split} split): recall is capped in dense scenes: " + "; ".join(notes), BadInputWarning, stacklevel=2)

    def collate(self, samples: list, plan: PackPlan):
        # Budget scale jitter multiplies each image's token budget (capped at one sequence).
        budgets = scale_budgets(plan.max_tokens, [s.budget_scale for s in samples], plan.seq_len - plan.num_prefix_tokens)
        plan = replace(plan, max_tokens=budgets, pixel_norm=self.pixel_norm)
        images = [s.image for s in samples]
        if self.cfg.data.square_pad:
            images = [self._pad_to_square(im) for im in images]
        batch = plan.pack(images)
        targets = detection_targets(samples)  # normalized cxcywh boxes + image_id, scale, LVIS lists
        if self.cfg.data.square_pad and plan.train:
            # The head predicts relative to the packed (square) extent: the image fills W/S x H/S
            # of it, top-left. Evaluation needs nothing: pixels of the square are the image's own.
            for t in targets:
                H, W = t["size"]
                t["boxes"] = t["boxes"] * torch.tensor([W, H, W, H], dtype=torch.float32) / max(H, W)
        for t in targets:
            t.pop("masks", None)
        if plan.train:
            # The loss's class masks (federated negatives, not-exhaustive classes) are drawn here, in
            # the data workers, keyed by each sample's seed (reproducible across workers, ranks and
            # resumes), so the training step never reads labels back from the device.
            loss, K = self.loss_module(), len(self.categories())
            seeds = plan.seed if isinstance(plan.seed, list) else [plan.seed] * len(targets)
            for t, seed in zip(targets, seeds):
                t["class_mask"], t["not_exhaustive_mask"] = loss.target_masks(t, K, key=(int(seed),))
        return batch, targets

    def _pad_to_square(self, image: torch.Tensor) -> torch.Tensor:
        """Bottom/right padding to the longer side with a black pixel (normalized, or 0 when
        the images are not: uint8 patches), so the image keeps its top-left pixel coordinates:
        detections map back unchanged."""
        _, H, W = image.shape
        S = max(H, W)
        d = self.cfg.data
        black = torch.zeros(3, 1, 1, dtype=image.dtype)
        if self.pixel_norm is None:
            black = (-torch.tensor(d.mean) / torch.tensor(d.std)).to(image.dtype).view(3, 1, 1)
        out = black.expand(3, S, S).clone()
        out[:, :H, :W] = image
        return out

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
            self._loss = DetectionLoss.from_config(m, federated)
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
            self._gt = self.instances(d.val_json).to_json()
        return LvisEvaluator(self._gt, self.categories().category_ids, d.topk, d.nms_iou or None, d.score_thresh, d.use_objectness,
                             source=f"data.val_json {d.val_json}")  # fmt: skip
