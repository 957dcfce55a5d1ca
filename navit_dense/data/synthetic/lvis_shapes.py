"""Generate a small LVIS-v1-format detection dataset of textured shapes.

Classes are (shape x colour) combinations, so a tiny model can learn them from pixels, with
an LVIS-like long tail: each class is assigned a rare / common / frequent group and a number
of train images in that group's range. LVIS draws the lines at 10 and 100 train images out
of ~100k; here they scale with the train split (defaults: rare <= 2% of train images,
common <= 10%, so 200 train images give rare 1-4, common 5-20, frequent > 20). ``frequency``,
``image_count`` and ``instance_count`` are then set from the train split actually produced,
identically in both JSON files (as in LVIS).

Per image (LVIS semantics): ``neg_category_ids`` are categories verified absent (a random
subset of the absent ones), ``not_exhaustive_category_ids`` are present categories with an
instance left unannotated (it is drawn, its annotation is removed). Every class, rare ones
included, occurs in val so APr is defined. Instances do not overlap, so polygons are exact.

Layout: OUT/lvis_v1_{train,val}.json, OUT/images/{train,val}/NNNNNN.jpg; each image has
``file_name`` ("train/000001.jpg", relative to OUT/images) and a ``coco_url`` whose last two
parts give the same path (the detectron2 LVIS convention).

    python tools/make_synthetic_lvis.py --out /tmp/synth_lvis [--train-images 200 --val-images 60]

or from Python: ``generate(LvisShapesSpec(out=...))``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "semicircle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 205, 215),
}


@dataclass
class LvisShapesSpec:
    """What :func:`generate` draws (the CLI flags of tools/make_synthetic_lvis.py)."""

    out: str | Path
    train_images: int = 200
    val_images: int = 60
    num_classes: int = 30  # at most len(SHAPES) * len(COLOURS) (shape x colour)
    min_side: int = 96
    max_side: int = 384
    # Shape radius as a fraction of the image's shorter side (uniform in this range; shapes
    # shrink towards 40% of it when the image is crowded).
    min_radius: float = 0.08
    max_radius: float = 0.22
    rare_max: int = 0  # max train images of a rare class (0: 2% of train images, >= 2)
    common_max: int = 0  # max train images of a common class (0: 10% of train images)
    min_val_images: int = 2  # every class appears in at least this many val images
    neg_fraction: float = 0.5  # fraction of absent classes listed in neg_category_ids
    not_exhaustive_prob: float = 0.15
    format: str = "jpg"  # jpg | png
    jpeg_quality: int = 92
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_side < 32 or self.max_side < self.min_side:
            raise ValueError(f"need 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 0 < self.min_radius <= self.max_radius <= 0.45:
            raise ValueError(f"need 0 < min_radius <= max_radius <= 0.45, got {self.min_radius}, {self.max_radius}")
        if self.val_images < self.min_val_images:
            raise ValueError(f"val_images ({self.val_images}) must be >= min_val_images ({self.min_val_images})")
        if self.format not in ("jpg", "png"):
            raise ValueError(f"format must be jpg or png, got {self.format!r}")


def shape_polygon(kind: str, cx: float, cy: float, r: float, aspect: float, angle: float) -> np.ndarray:
    """[n, 2] vertices of a shape of radius r centred at (cx, cy), stretched by aspect and rotated."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) / math.sqrt(2)
    elif kind == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif kind == "semicircle":
        t = np.linspace(0, np.pi, 17)
        pts = np.stack([np.cos(t), np.sin(t) - 0.42], 1)  # shift the centroid (4 / 3pi) to the middle
    elif kind == "cross":
        a = 0.35
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]])
    else:
        raise ValueError(kind)
    pts = pts * np.array([r * aspect, r / aspect])
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return pts + np.array([cx, cy])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted base colour + smooth low-frequency blobs + pixel noise."""
    base = rng.uniform(70, 170) + rng.uniform(-25, 25, size=3)
    coarse = rng.normal(0, 22, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None] + smooth + rng.normal(0, 6, size=(h, w, 3))
    return img.astype(np.float32)


def _assign(rng: np.random.Generator, counts: np.ndarray, n_images: int) -> list[list[int]]:
    """Categories per image: each category c goes to counts[c] distinct images, preferring
    lightly loaded ones, categories visited rarest first."""
    load = np.zeros(n_images)
    per_image: list[list[int]] = [[] for _ in range(n_images)]
    for c in np.argsort(counts, kind="stable"):
        p = 1.0 / (1.0 + load) ** 3
        chosen = rng.choice(n_images, size=min(int(counts[c]), n_images), replace=False, p=p / p.sum())
        for i in chosen:
            per_image[i].append(int(c))
            load[i] += 1
    return per_image


def _render_split(rng, split, per_image, groups, classes, first_image_id, first_ann_id, args, image_dir):
    """Draw the images of one split; returns (images, annotations)."""
    images, annotations = [], []
    ann_id = first_ann_id
    rank = {"r": 0, "c": 1, "f": 2}
    num_classes = len(classes)
    frequent = [c for c in range(num_classes) if groups[c] == "f"]
    for k, cats in enumerate(per_image):
        image_id = first_image_id + k
        h, w = (int(v) for v in rng.integers(args.min_side, args.max_side + 1, size=2))
        img = _background(rng, h, w)
        if not cats:  # every image shows something
            cats = [int(rng.choice(frequent))]
        placed_boxes: list[tuple[float, float, float, float]] = []
        instances: list[tuple[int, list[float]]] = []
        for c in sorted(cats, key=lambda c: (rank[groups[c]], c)):  # rarest first: they get the empty canvas
            n_inst = 1 + int(rng.geometric(0.6) - 1 if rng.random() < 0.5 else 0)
            for _ in range(min(n_inst, 3)):
                poly = _place(rng, classes[c][0], h, w, placed_boxes, (args.min_radius, args.max_radius))
                if poly is None:
                    break
                colour = np.array(COLOURS[classes[c][1]], dtype=np.float32) + rng.uniform(-20, 20, size=3)
                canvas = np.zeros((h, w), dtype=np.uint8)
                cv2.fillPoly(canvas, [poly.astype(np.int32)], 1)
                region = canvas.astype(bool)
                img[region] = colour + rng.normal(0, 7, size=(int(region.sum()), 3))
                instances.append((c, poly.reshape(-1).astype(float).tolist()))
        present = sorted({c for c, _ in instances})
        # not exhaustive: drop one annotation of a category that has >= 2 instances (pixels stay).
        not_exhaustive: list[int] = []
        multi = [c for c in present if sum(ci == c for ci, _ in instances) >= 2]
        if multi and rng.random() < args.not_exhaustive_prob:
            c = int(rng.choice(multi))
            drop = next(j for j, (ci, _) in enumerate(instances) if ci == c)
            instances.pop(drop)
            not_exhaustive = [c]
        absent = [c for c in range(num_classes) if c not in present]
        n_neg = int(round(args.neg_fraction * len(absent)))
        neg = sorted(int(c) for c in rng.choice(absent, size=n_neg, replace=False)) if n_neg else []

        rel = f"{split}/{image_id:06d}.{args.format}"
        out = np.clip(img, 0, 255).astype(np.uint8)[:, :, ::-1]  # RGB -> BGR for OpenCV
        params = [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality] if args.format == "jpg" else []
        cv2.imwrite(str(image_dir / rel), out, params)
        images.append({
            "id": image_id, "width": w, "height": h, "file_name": rel,
            "coco_url": f"http://synthetic.invalid/{rel}", "flickr_url": "", "license": 1,
            "date_captured": "2026-01-01 00:00:00",
            "neg_category_ids": [c + 1 for c in neg],
            "not_exhaustive_category_ids": [c + 1 for c in not_exhaustive],
        })  # fmt: skip
        for c, poly in instances:
            xs, ys = poly[0::2], poly[1::2]
            rle = mask_utils.frPyObjects([poly], h, w)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": c + 1, "segmentation": [poly],
                "area": float(mask_utils.area(rle).sum()),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            })  # fmt: skip
            ann_id += 1
    return images, annotations


def _place(rng, kind, h, w, placed, radius=(0.08, 0.22), tries: int = 60):
    """Rejection-sample a non-overlapping shape; shrinks as attempts fail. None if no room."""
    short = min(h, w)
    for t in range(tries):
        shrink = 1.0 - 0.6 * t / tries
        r = max(7.0, rng.uniform(*radius) * short * shrink)
        poly = np.round(shape_polygon(kind, rng.uniform(0, w), rng.uniform(0, h), r, rng.uniform(0.8, 1.25), rng.uniform(0, 2 * np.pi)))
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        if x0 < 1 or y0 < 1 or x1 > w - 2 or y1 > h - 2:
            continue
        if any(x0 < bx1 + 3 and bx0 < x1 + 3 and y0 < by1 + 3 and by0 < y1 + 3 for bx0, by0, bx1, by1 in placed):
            continue
        placed.append((x0, y0, x1, y1))
        return poly
    return None


def generate(args: LvisShapesSpec) -> dict[str, Path]:
    """Write the dataset under ``args.out``; returns the paths of both JSON files and the image root."""
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    if not 3 <= args.num_classes <= len(combos):
        raise ValueError(f"num_classes must be in [3, {len(combos)}]")
    order = rng.permutation(len(combos))[: args.num_classes]
    classes = [combos[i] for i in order]
    K, n_train = args.num_classes, args.train_images
    rare_max = args.rare_max or max(2, round(0.02 * n_train))
    common_max = args.common_max or max(rare_max + 2, round(0.10 * n_train))
    if common_max >= n_train:
        raise ValueError(f"train_images {n_train} is too small for common_max={common_max}")

    # LVIS v1 splits its categories about 28% rare / 38% common / 34% frequent.
    n_rare, n_common = max(1, round(0.28 * K)), max(1, round(0.38 * K))
    groups = ["r"] * n_rare + ["c"] * n_common + ["f"] * (K - n_rare - n_common)
    freq_hi = max(common_max + 1, round(0.3 * n_train))
    ranges = {"r": (1, rare_max), "c": (rare_max + 1, common_max), "f": (common_max + 1, freq_hi)}
    train_counts = np.array([rng.integers(ranges[g][0], ranges[g][1] + 1) for g in groups])
    # val keeps the long tail but every class, rare ones included, appears in >= min_val_images.
    val_counts = np.maximum(args.min_val_images, np.round(train_counts * args.val_images / n_train)).astype(int)
    val_counts = np.minimum(val_counts, args.val_images)

    train_imgs, train_anns = _render_split(rng, "train", _assign(rng, train_counts, n_train), groups, classes, 1, 1, args, out / "images")
    val_imgs, val_anns = _render_split(
        rng, "val", _assign(rng, val_counts, args.val_images), groups, classes, n_train + 1, len(train_anns) + 1, args, out / "images"
    )

    missing = sorted(set(range(1, K + 1)) - {a["category_id"] for a in val_anns})
    if missing:  # APr needs every rare class in val; only fails when images are too small to place shapes
        raise ValueError(f"categories {missing} got no val instance: raise val_images or min_side")
    image_count = np.zeros(K, dtype=int)
    instance_count = np.zeros(K, dtype=int)
    for c in {(a["image_id"], a["category_id"]) for a in train_anns}:
        image_count[c[1] - 1] += 1
    for a in train_anns:
        instance_count[a["category_id"] - 1] += 1
    categories = []
    for c, (shape, colour) in enumerate(classes):
        n = int(image_count[c])
        freq = "r" if n <= rare_max else ("c" if n <= common_max else "f")
        name = f"{colour}_{shape}"
        categories.append({
            "id": c + 1, "name": name, "synonyms": [name, f"{colour} {shape}"], "def": f"a {colour} {shape}",
            "synset": f"{name}.n.01", "frequency": freq, "image_count": n, "instance_count": int(instance_count[c]),
        })  # fmt: skip
    info = {
        "description": "navit_dense synthetic LVIS-format shapes",
        "version": "1.0",
        "year": 2026,
        "seed": args.seed,
        "frequency_thresholds": {"rare_max_images": rare_max, "common_max_images": common_max},
    }
    licenses = [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    paths = {}
    for split, imgs, anns in (("train", train_imgs, train_anns), ("val", val_imgs, val_anns)):
        paths[split] = out / f"lvis_v1_{split}.json"
        data = {"info": info, "licenses": licenses, "images": imgs, "annotations": anns, "categories": categories}
        paths[split].write_text(json.dumps(data))
    paths["images"] = out / "images"
    return paths
