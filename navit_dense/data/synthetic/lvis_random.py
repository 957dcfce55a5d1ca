"""Small random LVIS-format datasets and matching noisy detections, for tests and benchmarks.

Nothing is rendered: images are just ids and sizes. Everything is drawn from one seeded
``numpy.random.Generator``, so a (function, arguments, seed) triple always gives the same data.
The data deliberately exercises the parts of LVIS evaluation that plain COCO evaluation lacks:
r/c/f frequency groups, per-image ``neg_category_ids`` (detections of those classes are counted
as false positives), ``not_exhaustive_category_ids`` (unmatched detections of those classes are
ignored), and detections of unverified classes (dropped by the evaluator).
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

FREQUENCIES = ("r", "c", "f")


def _polygons_in_boxes(rng: np.random.Generator, boxes: np.ndarray) -> list[list[float]]:
    """Star-shaped polygons, one per (x, y, w, h) box, spanning roughly the box (blobs, not
    rectangles, so masks differ from boxes)."""
    n, k = len(boxes), int(rng.integers(6, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, (n, k)), axis=1)
    radii = rng.uniform(0.6, 1.0, (n, k))
    x, y, w, h = (boxes[:, i : i + 1] for i in range(4))
    px = x + w / 2 + np.cos(angles) * radii * w / 2
    py = y + h / 2 + np.sin(angles) * radii * h / 2
    return np.round(np.stack([px, py], 2).reshape(n, 2 * k), 2).tolist()


def _polygon_area(poly: list[float], height: int, width: int) -> float:
    """Mask area in pixels, as the LVIS annotations store it."""
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
    return float(mask_utils.area(rle))


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """n random (x, y, w, h) boxes inside the image."""
    # Log-uniform side lengths so small (< 32^2), medium and large (> 96^2) objects all occur.
    side = np.exp(rng.uniform(np.log(6), np.log(0.9 * min(width, height)), n))
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    w = np.minimum(side * aspect, width - 1)
    h = np.minimum(side / aspect, height - 1)
    x = rng.uniform(0, 1, n) * (width - w)
    y = rng.uniform(0, 1, n) * (height - h)
    return np.round(np.stack([x, y, w, h], 1), 2)


def make_lvis_gt(
    num_images: int = 50,
    num_categories: int = 100,
    seed: int = 0,
    *,
    max_instances_per_image: int = 12,
    frequency_split: tuple[float, float, float] = (0.28, 0.38, 0.34),  # LVIS v1: 337 r / 461 c / 405 f
    frequency_weights: tuple[float, float, float] = (1.0, 3.0, 10.0),  # how often r/c/f classes occur
    max_neg_per_image: int = 8,
    not_exhaustive_prob: float = 0.15,
    image_size_range: tuple[int, int] = (160, 640),
) -> dict:
    """Random LVIS-format ground truth.

    Category and image ids are non-contiguous on purpose (bugs that confuse ids with indices show).
    ``frequency`` plays the role of LVIS's training-set frequency bucket, fixed per category;
    ``image_count`` / ``instance_count`` are counted on this generated split.
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.sort(rng.choice(np.arange(1, 3 * num_categories + 1), num_categories, replace=False))
    freq_idx = rng.choice(3, size=num_categories, p=np.asarray(frequency_split) / sum(frequency_split))
    weights = np.asarray(frequency_weights, float)[freq_idx]
    weights /= weights.sum()
    img_ids = np.sort(rng.choice(np.arange(1, 5 * num_images + 1), num_images, replace=False))

    images, annotations = [], []
    for img_id in img_ids:
        width, height = (int(v) for v in rng.integers(*image_size_range, size=2))
        k = int(rng.integers(0, max_instances_per_image + 1))
        present = set()
        for _ in range(k):
            cat = int(cat_ids[rng.choice(num_categories, p=weights)])
            box = _random_boxes(rng, 1, width, height)
            poly = _polygons_in_boxes(rng, box)[0]
            xs, ys = poly[0::2], poly[1::2]
            area = _polygon_area(poly, height, width)
            if area <= 0:  # a sliver that rasterises to nothing; LVIS has no such annotations
                continue
            present.add(cat)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": int(img_id),
                "category_id": cat,
                "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                "area": area,
                "segmentation": [poly],
            })
        absent = [int(c) for c in cat_ids if int(c) not in present]
        n_neg = int(rng.integers(0, max_neg_per_image + 1))
        neg = sorted(int(c) for c in rng.choice(absent, min(n_neg, len(absent)), replace=False))
        not_exhaustive = sorted(c for c in present if rng.random() < not_exhaustive_prob)
        images.append({
            "id": int(img_id),
            "width": width,
            "height": height,
            "file_name": f"{int(img_id):012d}.jpg",
            "neg_category_ids": neg,
            "not_exhaustive_category_ids": not_exhaustive,
        })

    categories = []
    for cat, fi in zip(cat_ids, freq_idx):
        cat = int(cat)
        anns = [a for a in annotations if a["category_id"] == cat]
        categories.append({
            "id": cat,
            "name": f"class_{cat}",
            "synset": f"class_{cat}.n.01",
            "frequency": FREQUENCIES[fi],
            "image_count": len({a["image_id"] for a in anns}),
            "instance_count": len(anns),
        })
    return {"info": {"description": f"synthetic LVIS, seed {seed}"}, "images": images,
            "annotations": annotations, "categories": categories}


def to_coco_format(gt: dict) -> dict:
    """The same data as plain COCO: no frequency / federated fields, ``iscrowd`` on every annotation."""
    return {
        "images": [{k: v for k, v in im.items() if k not in ("neg_category_ids", "not_exhaustive_category_ids")}
                   for im in gt["images"]],
        "categories": [{"id": c["id"], "name": c["name"]} for c in gt["categories"]],
        "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]],
    }


def _encode_polygon(poly: list[float], height: int, width: int) -> dict:
    rle = mask_utils.frPyObjects([poly], height, width)[0]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def make_detections(
    gt: dict,
    seed: int = 0,
    *,
    with_masks: bool = False,
    recall: float = 0.8,
    jitter: float = 0.12,
    duplicate_prob: float = 0.15,
    wrong_class_prob: float = 0.1,
    false_positives_per_image: tuple[int, int] = (0, 30),
    false_positive_scores: tuple[float, float] = (0.0, 0.6),
    score_decimals: int | None = None,
) -> list[dict]:
    """Noisy detections for ``gt``: jittered GT boxes, duplicates, wrong classes, false positives.

    Scores of true detections decrease with their jitter, so the ranking is informative but not
    perfect; false positives score uniformly in ``false_positive_scores`` (high values push true
detections out of the per-image top 300). ``score_decimals`` rounds scores to create ties (tests tie-breaking). With
    ``with_masks`` every detection also carries a compressed-RLE ``segmentation`` and the
    detections can be evaluated with ``iou_type="segm"``.
    """
    rng = np.random.default_rng(seed)
    imgs = {im["id"]: im for im in gt["images"]}
    all_cats = np.array([c["id"] for c in gt["categories"]])
    by_image: dict[int, list[dict]] = {im_id: [] for im_id in imgs}
    for a in gt["annotations"]:
        by_image[a["image_id"]].append(a)

    dets = []

    def add(im, cat, box, score, poly=None):
        x, y, w, h = (float(v) for v in box)  # plain JSON types, not numpy scalars
        # Clip to the image; a detector never predicts outside it.
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            return
        score = min(max(float(score), 1e-4), 1.0)
        if score_decimals is not None:
            score = max(round(score, score_decimals), 10.0 ** -score_decimals)
        det = {"image_id": im["id"], "category_id": int(cat),
               "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": score}
        if with_masks:
            det["segmentation"] = _encode_polygon(poly, im["height"], im["width"])
        dets.append(det)

    for im_id, im in imgs.items():
        pos = sorted({a["category_id"] for a in by_image[im_id]})
        for a in by_image[im_id]:
            if rng.random() > recall:
                continue
            for copy in range(2 if rng.random() < duplicate_prob else 1):
                x, y, w, h = a["bbox"]
                err = rng.normal(0, jitter, 4) * (1 + copy)
                scale_w, scale_h = np.exp(err[2]), np.exp(err[3])
                dx, dy = err[0] * w, err[1] * h
                box = (x + dx + w * (1 - scale_w) / 2, y + dy + h * (1 - scale_h) / 2, w * scale_w, h * scale_h)
                # Move the mask with the box: same affine map applied to the GT polygon.
                poly = np.asarray(a["segmentation"][0], float).reshape(-1, 2)
                cx, cy = x + w / 2, y + h / 2
                poly = np.stack([cx + dx + (poly[:, 0] - cx) * scale_w, cy + dy + (poly[:, 1] - cy) * scale_h], 1)
                poly[:, 0] = poly[:, 0].clip(0, im["width"])
                poly[:, 1] = poly[:, 1].clip(0, im["height"])
                cat = a["category_id"]
                if rng.random() < wrong_class_prob:
                    cat = int(rng.choice(all_cats))
                quality = float(np.exp(-4 * np.abs(err).mean()))
                add(im, cat, box, quality * rng.uniform(0.5, 1.0) - 0.1 * copy, np.round(poly.ravel(), 2).tolist())
        # False positives, vectorised per image (they are most of the detections). Their classes mix
        # what the evaluator treats differently: verified present (FP), verified absent (FP), and
        # unverified (dropped).
        n_fp = int(rng.integers(*false_positives_per_image, endpoint=True))
        if n_fp == 0:
            continue
        pools = [pos or list(all_cats), im["neg_category_ids"] or list(all_cats), list(all_cats)]
        pool_idx = rng.choice(3, n_fp, p=[0.5, 0.25, 0.25])
        pick = rng.integers(0, 1 << 30, n_fp)
        cats = [int(pools[p][i % len(pools[p])]) for p, i in zip(pool_idx, pick)]
        boxes = _random_boxes(rng, n_fp, im["width"], im["height"])
        scores = rng.uniform(*false_positive_scores, n_fp)
        polys = _polygons_in_boxes(rng, boxes) if with_masks else [None] * n_fp
        for cat, box, score, poly in zip(cats, boxes.tolist(), scores.tolist(), polys):
            add(im, cat, box, score, poly)
    # Detector output is not grouped by image in any particular order.
    order = rng.permutation(len(dets))
    return [dets[i] for i in order]
