"""Detection data: samples, the LVIS/COCO dataset, aspect-preserving augmentations, LVIS
repeat factors (consumed by the engine's token-budget sampler) and the per-image targets.

Coordinates: a sample's boxes are xyxy in the pixel coordinates of its current image; masks
are COCO polygons (lists of flat [x0, y0, x1, y1, ...]) or RLE dicts in the same frame.
Polygons stay polygons through flips and scales; they are rasterized (pycocotools) only when
a crop cuts them. Augmentations take ``(sample, rng)`` with a numpy Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from .coco_json import Category, ImageRecord, InstanceDataset, load_instances, segmentation_to_mask
from .decode import load_image

Mask = list | dict  # polygons (list of flat coordinate lists) or an RLE dict


def _long(values: Iterable[int] = ()) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.long)


@dataclass
class DetectionSample:
    image: torch.Tensor  # float [3, H, W] at native resolution
    boxes: torch.Tensor  # float [G, 4] xyxy in this image's pixel coordinates
    labels: torch.Tensor  # long [G] contiguous class indices
    image_id: int = 0
    orig_size: tuple[int, int] = (0, 0)  # (H, W) as decoded, before any augmentation
    masks: list[Mask] | None = None  # G instance masks (polygons or RLE), or None
    neg_labels: torch.Tensor = field(default_factory=_long)  # long: categories verified absent
    not_exhaustive_labels: torch.Tensor = field(default_factory=_long)  # long: categories not exhaustively labeled
    scale: tuple[float, float] = (1.0, 1.0)  # (sy, sx): image resizes applied since decoding (crops excluded)
    budget_scale: float = 1.0  # side-length factor on the token budget (budget scale jitter); tokens scale by its square

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def __post_init__(self) -> None:
        if self.boxes.shape[0] != self.labels.shape[0] or (self.masks is not None and len(self.masks) != len(self.labels)):
            raise ValueError(
                f"sample {self.image_id}: {len(self.boxes)} boxes, {len(self.labels)} labels, "
                f"{None if self.masks is None else len(self.masks)} masks must align"
            )

    def decode_masks(self) -> np.ndarray:
        """uint8 [G, H, W] binary masks (decoded on demand)."""
        H, W = self.size
        if not self.masks:
            return np.zeros((0, H, W), dtype=np.uint8)
        return np.stack([segmentation_to_mask(m, H, W) for m in self.masks])


class CategoryMap:
    """Dataset category ids <-> contiguous labels 0..K-1 (sorted by id), with LVIS metadata.
    categories: COCO/LVIS category dicts or :class:`~navit_dense.data.coco_json.Category`."""

    def __init__(self, categories: Iterable[dict | Category]):
        cats = [c if isinstance(c, dict) else vars(c) for c in categories]
        cats = sorted(cats, key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.names = [c.get("name", str(c["id"])) for c in cats]
        self.frequency = [c.get("frequency") for c in cats]  # "r" / "c" / "f" on LVIS, None on COCO
        self.image_counts = np.array([c.get("image_count") or 0 for c in cats], dtype=np.int64)
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_labels(self, category_ids: Iterable[int]) -> torch.Tensor:
        try:
            return _long(self._label[int(c)] for c in category_ids)
        except KeyError as e:
            raise KeyError(f"category id {e.args[0]} is not in the category list") from None

    def to_category_ids(self, labels: torch.Tensor | Sequence[int]) -> list[int]:
        return [self.category_ids[int(i)] for i in labels]

    def labels_with_frequency(self, freq: str) -> torch.Tensor:
        return _long(i for i, f in enumerate(self.frequency) if f == freq)


# ---- masks -------------------------------------------------------------------------------
def _encode(binary: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))


def _flip_mask(mask: Mask, width: int, height: int) -> Mask:
    if isinstance(mask, list):
        out = []
        for poly in mask:
            p = np.asarray(poly, dtype=np.float64).copy()
            p[0::2] = width - p[0::2]
            out.append(p.tolist())
        return out
    return _encode(segmentation_to_mask(mask, height, width)[:, ::-1])


def _scale_mask(mask: Mask, sy: float, sx: float, old: tuple[int, int], new: tuple[int, int]) -> Mask:
    if isinstance(mask, list):
        out = []
        for poly in mask:
            p = np.asarray(poly, dtype=np.float64).copy()
            p[0::2] *= sx
            p[1::2] *= sy
            out.append(p.tolist())
        return out
    binary = torch.from_numpy(segmentation_to_mask(mask, *old))[None, None].float()
    return _encode(F.interpolate(binary, size=new, mode="nearest")[0, 0].numpy())


def _crop_mask(mask: Mask, x0: int, y0: int, w: int, h: int, old: tuple[int, int]) -> Mask:
    if isinstance(mask, list):
        parts = [np.asarray(p, dtype=np.float64) for p in mask]
        inside = all(
            (p[0::2] >= x0).all() and (p[0::2] <= x0 + w).all() and (p[1::2] >= y0).all() and (p[1::2] <= y0 + h).all() for p in parts
        )
        if inside:  # the window does not cut it: a shift is exact, stay a polygon
            out = []
            for p in parts:
                q = p.copy()
                q[0::2] -= x0
                q[1::2] -= y0
                out.append(q.tolist())
            return out
    return _encode(segmentation_to_mask(mask, *old)[y0 : y0 + h, x0 : x0 + w])


# ---- augmentations -----------------------------------------------------------------------
def hflip(sample: DetectionSample) -> DetectionSample:
    """Mirror image, boxes (x -> W - x) and masks."""
    H, W = sample.size
    boxes = sample.boxes.clone()
    boxes[:, 0], boxes[:, 2] = W - sample.boxes[:, 2], W - sample.boxes[:, 0]
    masks = None if sample.masks is None else [_flip_mask(m, W, H) for m in sample.masks]
    return replace(sample, image=sample.image.flip(-1), boxes=boxes, masks=masks)


def resize(sample: DetectionSample, scale: float) -> DetectionSample:
    """Resize by ``scale`` (both axes, aspect kept up to pixel rounding); boxes and masks follow
    the exact per-axis factor that rounding produced."""
    H, W = sample.size
    new = (max(1, round(H * scale)), max(1, round(W * scale)))
    sy, sx = new[0] / H, new[1] / W
    image = F.interpolate(sample.image[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
    boxes = sample.boxes * sample.boxes.new_tensor([sx, sy, sx, sy])
    masks = None if sample.masks is None else [_scale_mask(m, sy, sx, (H, W), new) for m in sample.masks]
    return replace(sample, image=image, boxes=boxes, masks=masks, scale=(sample.scale[0] * sy, sample.scale[1] * sx))


def crop(sample: DetectionSample, x0: int, y0: int, w: int, h: int, min_size: float = 1.0) -> DetectionSample:
    """Cut the window [x0, x0 + w) x [y0, y0 + h); boxes are shifted and clipped to it, and
    instances whose clipped box is thinner than ``min_size`` pixels are dropped (boxes,
    labels and masks stay aligned)."""
    H, W = sample.size
    boxes = sample.boxes - sample.boxes.new_tensor([x0, y0, x0, y0])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    idx = keep.nonzero().squeeze(1).tolist()
    masks = None if sample.masks is None else [_crop_mask(sample.masks[i], x0, y0, w, h, (H, W)) for i in idx]
    return replace(sample, image=sample.image[:, y0 : y0 + h, x0 : x0 + w], boxes=boxes[keep], labels=sample.labels[keep], masks=masks)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: DetectionSample, rng: np.random.Generator) -> DetectionSample:
        return hflip(sample) if rng.random() < self.p else sample


class ScaleJitter:
    """Random scale s ~ U(min_scale, max_scale) of the side length, aspect kept.

    target="budget" (default, NaViT-native and free): the token budget is scaled by s^2 in
    the collate, the pixels are untouched (the packer resizes to the budget anyway).
    target="image": the image itself is resized (useful before a fixed-size crop).
    """

    def __init__(self, min_scale: float = 0.5, max_scale: float = 1.5, target: str = "budget"):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"ScaleJitter needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        if target not in ("budget", "image"):
            raise ValueError(f"ScaleJitter target must be 'budget' or 'image', got {target!r}")
        self.min_scale, self.max_scale, self.target = min_scale, max_scale, target

    def __call__(self, sample: DetectionSample, rng: np.random.Generator) -> DetectionSample:
        s = float(rng.uniform(self.min_scale, self.max_scale))
        if self.target == "budget":
            return replace(sample, budget_scale=sample.budget_scale * s)
        return resize(sample, s)


class RandomCrop:
    """With probability p, crop a window covering a fraction f ~ U(min_frac, max_frac) of
    each side (same f on both axes, so the aspect ratio is kept) at a random position.
    Retries up to ``max_tries`` windows that keep at least one box; otherwise no crop."""

    def __init__(
        self, min_frac: float = 0.5, max_frac: float = 1.0, p: float = 0.5, min_side: int = 32, min_size: float = 1.0, max_tries: int = 10
    ):
        if not 0 < min_frac <= max_frac <= 1:
            raise ValueError(f"RandomCrop needs 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
        self.min_frac, self.max_frac, self.p = min_frac, max_frac, p
        self.min_side, self.min_size, self.max_tries = min_side, min_size, max_tries

    def __call__(self, sample: DetectionSample, rng: np.random.Generator) -> DetectionSample:
        if rng.random() >= self.p:
            return sample
        H, W = sample.size
        for _ in range(self.max_tries):
            f = rng.uniform(self.min_frac, self.max_frac)
            h, w = min(H, max(self.min_side, round(H * f))), min(W, max(self.min_side, round(W * f)))
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            out = crop(sample, x0, y0, w, h, self.min_size)
            if len(out.labels) or not len(sample.labels):
                return out
        return sample


class Normalize:
    """(image - mean) / std per channel (e.g. ImageNet or CLIP statistics)."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, sample: DetectionSample, rng: np.random.Generator | None = None) -> DetectionSample:
        return replace(sample, image=(sample.image - self.mean) / self.std)


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, sample: DetectionSample, rng: np.random.Generator) -> DetectionSample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


# ---- dataset -----------------------------------------------------------------------------
class DetectionDataset(Dataset):
    """COCO / LVIS instances file + image folder -> :class:`DetectionSample`.

    annotations: a JSON path (loaded and validated by
        :func:`~navit_dense.data.coco_json.load_instances`) or an already loaded InstanceDataset.
    image_root: folder the images' ``file_name`` (LVIS: last two parts of ``coco_url``) is under.
    decode: path -> float CHW tensor in [0, 1] (default :func:`~navit_dense.data.decode.load_image`).
    transforms: ``(sample, rng) -> sample``; the rng is seeded from torch's RNG, which the
        DataLoader seeds per worker and epoch, so repeats of an image (repeat-factor sampling)
        get different augmentations while runs stay reproducible under torch.manual_seed.
    with_masks: attach segmentations; annotations without a valid one are then skipped.
    COCO crowd annotations are ignore regions, not instances, and are left out.
    """

    def __init__(
        self,
        annotations: str | Path | InstanceDataset,
        image_root: str | Path,
        transforms: Callable | None = None,
        decode: Callable[[Path], torch.Tensor] | None = None,
        with_masks: bool = False,
        strict: bool = False,
    ):
        self.instances = annotations if isinstance(annotations, InstanceDataset) else load_instances(annotations, strict=strict)
        self.image_root = Path(image_root)
        self.transforms = transforms
        self.decode = decode or load_image
        self.with_masks = with_masks
        self.categories = CategoryMap(self.instances.categories.values())
        self.images = sorted(self.instances.images, key=lambda im: im.id)

    def __len__(self) -> int:
        return len(self.images)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) from the annotations, without decoding (the engine's token-cost estimate)."""
        return self.images[index].height, self.images[index].width

    def image_file(self, index: int) -> str:
        """The item's image file (the engine names it in warnings and errors)."""
        return str(self.image_root / self.images[index].file_name)

    def _annotations(self, record: ImageRecord):
        return [a for a in record.annotations if not a.iscrowd and (a.segmentation is not None or not self.with_masks)]

    def num_objects(self, index: int) -> int:
        """Instances of an image that are targets (what a detector has to recall)."""
        return len(self._annotations(self.images[index]))

    def image_labels(self) -> list[set[int]]:
        """Per image, the set of class labels annotated in it (for repeat factors)."""
        return [set(self.categories.to_labels(a.category_id for a in self._annotations(im)).tolist()) for im in self.images]

    def load(self, index: int) -> DetectionSample:
        record = self.images[index]
        anns = self._annotations(record)
        image = self.decode(self.image_root / record.file_name)
        H, W = int(image.shape[-2]), int(image.shape[-1])
        if (H, W) != (record.height, record.width):
            raise ValueError(f"{record.file_name}: decoded {H}x{W} but the annotations say {record.height}x{record.width}")
        boxes = torch.tensor([a.bbox for a in anns], dtype=torch.float32).reshape(-1, 4)
        cm = self.categories
        return DetectionSample(
            image=image,
            boxes=box_convert(boxes, "xywh", "xyxy"),
            labels=cm.to_labels(a.category_id for a in anns),
            image_id=int(record.id),
            orig_size=(H, W),
            masks=[a.segmentation for a in anns] if self.with_masks else None,
            neg_labels=cm.to_labels(record.neg_category_ids),
            not_exhaustive_labels=cm.to_labels(record.not_exhaustive_category_ids),
        )

    def __getitem__(self, index: int) -> DetectionSample:
        sample = self.load(index)
        if self.transforms is not None:
            sample = self.transforms(sample, np.random.default_rng(int(torch.randint(0, 2**62, ()))))
        return sample


# ---- repeat-factor sampling (LVIS) -------------------------------------------------------
def lvis_repeat_factors(image_labels: Sequence[Iterable[int]], threshold: float = 0.001) -> np.ndarray:
    """float [num_images] repeat factors (Gupta et al. 2019): f_c = fraction of images
    containing category c, r_c = max(1, sqrt(t / f_c)), r_i = max over the image's categories
    (1 for images without annotations)."""
    sets = [set(int(c) for c in labels) for labels in image_labels]
    counts: dict[int, int] = {}
    for s in sets:
        for c in s:
            counts[c] = counts.get(c, 0) + 1
    n = max(len(sets), 1)
    r_cat = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.array([max((r_cat[c] for c in s), default=1.0) for s in sets], dtype=np.float64)


def detection_targets(samples: Sequence[DetectionSample]) -> list[dict]:
    """Loss / evaluation targets, one dict per sample (= packing input order):
    "labels" long [G]; "boxes" float [G, 4] NORMALIZED (cx, cy, w, h) in [0, 1] of the image
    extent, which is what the OWL head predicts: the budget resize stretches the whole image,
    so normalized boxes are the same in original, augmented and resized coordinates (times
    ``batch.resized_sizes`` gives resized pixels); "image_id" int; "orig_size" / "size" (H, W)
    before / after augmentation; "scale" (sy, sx) (pass to postprocess to map back to the
    original); "neg_labels", "not_exhaustive_labels" long; "masks" when samples carry them."""
    targets = []
    for s in samples:
        H, W = s.size
        t = {
            "labels": s.labels,
            "boxes": box_convert(s.boxes.float(), "xyxy", "cxcywh") / torch.tensor([W, H, W, H], dtype=torch.float32),
            "image_id": s.image_id,
            "orig_size": s.orig_size,
            "size": (H, W),
            "scale": s.scale,
            "neg_labels": s.neg_labels,
            "not_exhaustive_labels": s.not_exhaustive_labels,
        }
        if s.masks is not None:
            t["masks"] = s.masks
        targets.append(t)
    return targets


class LvisDetectionDataset(DetectionDataset):
    """DetectionDataset plus the engine hooks: the annotation file's skip counts for the run
    summary and, when a threshold is set, LVIS repeat factors for the token-budget sampler.
    Undecodable images raise DataError (the engine skips them in training only)."""

    def __init__(self, *args, repeat_threshold: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeat_threshold = repeat_threshold
        self.recall_capped: dict[str, int] = {}  # dense-scene check (the detection task fills it): images per cap

    def repeat_factors(self) -> np.ndarray:
        if self.repeat_threshold <= 0:
            return np.ones(len(self))
        return lvis_repeat_factors(self.image_labels(), self.repeat_threshold)

    def skip_summary(self) -> dict:
        return {"annotations": self.instances.counts, **({"recall_capped": self.recall_capped} if self.recall_capped else {})}
