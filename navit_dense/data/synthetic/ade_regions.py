"""Generate a small synthetic semantic-segmentation dataset in ADE20K layout.

    python tools/make_synthetic_seg.py --out data/synth_seg [--seed 0 --train 48 --val 16]

Layout (what navit_dense.data.seg_dataset.ADE20KDataset and mmseg's ADE20KDataset read)::

    OUT/images/{training,validation}/synth_XXXX.jpg        RGB, JPEG q95
    OUT/annotations/{training,validation}/synth_XXXX.png   palette-mode ('P') index maps
    OUT/meta.json                                           classes, palette, counts, seed

Label files use the ADE20K convention: 0 = unlabelled ("other", ignored after
reduce_zero_label), 1..8 = the 8 classes; so train with reduce_zero_label=True, num_classes=8.

Every image has a textured background class plus 2-6 shapes (polygons, ellipses, stripes)
of random classes; each class has its own colour statistics and texture (gradient, fine
noise, brick grid, waves, speckle, wood grain, checker, blobs) with per-image jitter, so a
model has to learn colour and texture. About half of the images also hold an unlabelled
clutter blob (label 0). Side lengths are drawn independently from [min_side, max_side], so
sizes and aspect ratios vary (up to ~3.3:1 with the defaults). Each image is drawn from its
own generator seeded by (seed, split, index): deterministic, and changing --train does not
change the validation images. 64 images take about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CLASSES = ["sky", "grass", "brick", "water", "sand", "wood", "metal", "foliage"]
# Display palette for classes 0..7 (reduced ids); file index k+1 gets PALETTE[k], index 0 black.
PALETTE = [
    [135, 206, 235],
    [60, 179, 60],
    [178, 34, 34],
    [30, 90, 200],
    [238, 214, 150],
    [139, 90, 43],
    [160, 160, 170],
    [20, 100, 40],
]
SPLITS = {"training": 0, "validation": 1}


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    small = rng.uniform(-1, 1, (max(2, h * cells // max(h, w)), max(2, w * cells // max(h, w)))).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), -1, 1)


def _texture(k: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Class ``k``'s texture over an h x w canvas, float32 RGB in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(PALETTE[k], np.float32) * rng.uniform(0.85, 1.15)  # per-image brightness jitter
    base = base + rng.normal(0, 6, 3)  # and a small tint
    if k == 0:  # sky: smooth vertical gradient, lighter towards the bottom
        t = (yy / max(h - 1, 1))[..., None]
        img = base * (0.8 + 0.35 * t) + 4 * _lowfreq(rng, h, w, 4)[..., None]
    elif k == 1:  # grass: strong fine per-pixel noise, mostly green
        img = base + rng.normal(0, 28, (h, w, 1)) * np.array([0.5, 1.0, 0.4], np.float32)
    elif k == 2:  # brick: running-bond grid of dark mortar lines
        bh, bw = rng.integers(10, 18), rng.integers(22, 36)
        row = (yy // bh).astype(np.int32)
        mortar = ((yy % bh) < 2) | (((xx + (row % 2) * bw / 2) % bw) < 2)
        img = base + rng.normal(0, 8, (h, w, 1))
        img[mortar] = [200, 195, 185]
    elif k == 3:  # water: horizontal sine waves
        f, ph = rng.uniform(0.25, 0.45), rng.uniform(0, 2 * np.pi)
        waves = np.sin(yy * f + 0.6 * np.sin(xx * 0.07) + ph)[..., None]
        img = base + 30 * waves * np.array([0.6, 0.8, 1.0], np.float32)
    elif k == 4:  # sand: sparse dark / bright speckle on a flat tone
        img = base + rng.normal(0, 5, (h, w, 1))
        speck = rng.random((h, w))
        img[speck < 0.06] *= 0.6
        img[speck > 0.96] = np.minimum(img[speck > 0.96] * 1.25, 255)
    elif k == 5:  # wood: oblique grain (distorted stripes)
        a = rng.uniform(-0.4, 0.4)
        u = xx * np.cos(a) + yy * np.sin(a)
        grain = np.sin(u * 0.5 + 3 * _lowfreq(rng, h, w, 3))[..., None]
        img = base * (0.85 + 0.2 * grain)
    elif k == 6:  # metal: diagonal checker with a sheen
        s = rng.integers(8, 14)
        chk = (((xx + yy) // s + (xx - yy) // s) % 2)[..., None]
        img = base * (0.8 + 0.3 * chk) + 10 * (xx / max(w - 1, 1))[..., None]
    else:  # foliage: dark green blobs
        blobs = _lowfreq(rng, h, w, 12)[..., None]
        img = base * (0.75 + 0.45 * (blobs > 0)) + rng.normal(0, 6, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.float32)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random polygon, ellipse or stripe as a uint8 0/1 mask."""
    mask = np.zeros((h, w), np.uint8)
    kind = rng.choice(["polygon", "ellipse", "stripe"], p=[0.4, 0.4, 0.2])
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    r = rng.uniform(0.12, 0.4) * min(h, w)
    if kind == "polygon":
        n = rng.integers(3, 8)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.5, 1.3, n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
    elif kind == "ellipse":
        axes = (max(2, int(r * rng.uniform(0.5, 1.5))), max(2, int(r * rng.uniform(0.3, 1.0))))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        a = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        d = (xx - cx) * np.sin(a) - (yy - cy) * np.cos(a)
        mask[np.abs(d) < rng.uniform(0.05, 0.15) * min(h, w)] = 1
    return mask


def make_sample(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, label uint8 HxW with 0 = unlabelled, 1..8 = classes)."""
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    label = np.full((h, w), rng.integers(len(CLASSES)) + 1, np.uint8)  # background class
    for _ in range(rng.integers(2, 7)):
        label[_shape_mask(rng, h, w) > 0] = rng.integers(len(CLASSES)) + 1
    if rng.random() < 0.5:  # unlabelled clutter blob (label 0, ignored by reduce_zero_label)
        clutter = np.zeros((h, w), np.uint8)
        cv2.circle(clutter, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(6, max(7, min(h, w) // 6))), 1, -1)
        label[clutter > 0] = 0
    image = np.zeros((h, w, 3), np.float32)
    for idx in np.unique(label):
        m = label == idx
        if idx == 0:
            image[m] = rng.uniform(0, 255, (int(m.sum()), 3))
        else:
            image[m] = _texture(int(idx) - 1, rng, h, w)[m]
    image = cv2.GaussianBlur(image, (3, 3), 0.6)  # soften hard shape edges a little, like a camera
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def make_synthetic_seg(
    out: str | Path,
    seed: int = 0,
    n_train: int = 48,
    n_val: int = 16,
    min_side: int = 96,
    max_side: int = 320,
) -> dict:
    """Write the dataset under ``out`` and return its meta dict (also written to meta.json)."""
    if not 8 <= min_side <= max_side:
        raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out)
    flat_palette = [0, 0, 0] + [c for rgb in PALETTE for c in rgb]
    flat_palette += [0, 0, 0] * (256 - len(flat_palette) // 3)
    sizes = {}
    for split, n in (("training", n_train), ("validation", n_val)):
        img_dir, ann_dir = out / "images" / split, out / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        sizes[split] = []
        for i in range(n):
            rng = np.random.default_rng([seed, SPLITS[split], i])
            image, label = make_sample(rng, min_side, max_side)
            name = f"synth_{i:04d}"
            Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=95)
            ann = Image.fromarray(label)  # mode L; putpalette makes it P keeping the indices
            ann.putpalette(flat_palette)
            ann.save(ann_dir / f"{name}.png")
            sizes[split].append([int(label.shape[0]), int(label.shape[1])])
    meta = {
        "format": "ade20k",
        "classes": CLASSES,
        "palette": PALETTE,
        "num_classes": len(CLASSES),
        "reduce_zero_label": True,
        "ignore_index": 255,
        "label_file_values": "0 = unlabelled (ignored), k + 1 = classes[k]",
        "seed": seed,
        "num_images": {"training": n_train, "validation": n_val},
        "side_range": [min_side, max_side],
        "sizes_hw": sizes,
        "generator": "navit_dense.data.synthetic.ade_regions v1",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
