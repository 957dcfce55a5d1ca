"""Detection data: flip / crop / resize keep boxes and masks consistent, repeat-factor
sampling, collate targets, the LVIS-format dataset reader and the synthetic LVIS generator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
import torch
from hypothesis import given
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from conftest import collate_detection
from navit_dense.data.detection import (
    CategoryMap,
    Compose,
    DetectionDataset,
    DetectionSample,
    RandomCrop,
    RandomHorizontalFlip,
    ScaleJitter,
    crop,
    hflip,
    lvis_repeat_factors,
    resize,
)

ROOT = Path(__file__).resolve().parents[1]
# pycocotools 2.0.11 under numpy 2 warns inside its own decode; the decoded masks are checked below.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_sample(H, W, rects, rle_index=(), seed=0) -> DetectionSample:
    """Instances are axis-aligned rectangles (integer corners); those in rle_index are stored
    as compressed RLE, the others as polygons."""
    masks = []
    for k, (x0, y0, x1, y1) in enumerate(rects):
        if k in rle_index:
            m = np.zeros((H, W), dtype=np.uint8)
            m[y0:y1, x0:x1] = 1
            masks.append(mask_utils.encode(np.asfortranarray(m)))
        else:
            masks.append(rect_polygon(x0, y0, x1, y1))
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))
    boxes = torch.tensor(rects, dtype=torch.float32).reshape(-1, 4)
    return DetectionSample(image, boxes, torch.arange(len(rects)), image_id=seed, orig_size=(H, W), masks=masks)


@st.composite
def samples(draw):
    H, W = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    rects = []
    for _ in range(draw(st.integers(0, 4))):
        x0, x1 = sorted(draw(st.lists(st.integers(0, W), min_size=2, max_size=2, unique=True)))
        y0, y1 = sorted(draw(st.lists(st.integers(0, H), min_size=2, max_size=2, unique=True)))
        rects.append((x0, y0, x1, y1))
    rle = draw(st.sets(st.integers(0, max(len(rects) - 1, 0))))
    return make_sample(H, W, rects, rle)


def mask_bbox(binary: np.ndarray) -> list[float]:
    """Tight xyxy box of a binary mask in pixel-edge coordinates."""
    ys, xs = np.nonzero(binary)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@given(samples())
def test_flip_twice_is_identity(sample):
    twice = hflip(hflip(sample))
    assert torch.equal(twice.image, sample.image)
    assert torch.allclose(twice.boxes, sample.boxes)
    assert np.array_equal(twice.decode_masks(), sample.decode_masks())
    for a, b in zip(twice.masks, sample.masks):
        assert type(a) is type(b)  # polygons stay polygons


@given(samples())
def test_flip_moves_boxes_with_masks_and_pixels(sample):
    H, W = sample.size
    flipped = hflip(sample)
    assert torch.equal(flipped.image, sample.image.flip(-1))
    assert np.array_equal(flipped.decode_masks(), sample.decode_masks()[:, :, ::-1])
    for box, binary in zip(flipped.boxes.tolist(), flipped.decode_masks()):
        assert box == pytest.approx(mask_bbox(binary))  # rectangles with integer corners rasterize exactly


@given(samples(), st.data())
def test_crop_keeps_boxes_masks_and_labels_aligned(sample, data):
    H, W = sample.size
    h, w = data.draw(st.integers(1, H)), data.draw(st.integers(1, W))
    y0, x0 = data.draw(st.integers(0, H - h)), data.draw(st.integers(0, W - w))
    out = crop(sample, x0, y0, w, h, min_size=1.0)
    assert out.size == (h, w) and torch.equal(out.image, sample.image[:, y0 : y0 + h, x0 : x0 + w])
    assert len(out.boxes) == len(out.labels) == len(out.masks)
    full = sample.decode_masks()[:, y0 : y0 + h, x0 : x0 + w]
    kept = out.labels.tolist()  # labels are the original instance indices
    assert not full[[i for i in range(len(sample.labels)) if i not in kept]].any()  # dropped ones are invisible
    assert np.array_equal(out.decode_masks(), full[kept])
    for box, binary in zip(out.boxes.tolist(), out.decode_masks()):
        assert box == pytest.approx(mask_bbox(binary))
    assert (out.boxes[:, 2:] - out.boxes[:, :2] >= 1).all()


def test_crop_keeps_uncut_polygons_and_rasterizes_cut_ones():
    s = make_sample(40, 60, [(5, 5, 15, 15), (30, 10, 58, 30)])
    out = crop(s, 2, 2, 40, 36)
    assert isinstance(out.masks[0], list) and out.masks[0] == rect_polygon(3, 3, 13, 13)
    assert isinstance(out.masks[1], dict)  # cut by the window: exact raster crop


@pytest.mark.parametrize("scale", [0.5, 1.7])
def test_resize_scales_boxes_masks_and_records_scale(scale):
    s = make_sample(40, 60, [(4, 8, 20, 24), (30, 10, 58, 30)], rle_index=(1,))
    out = resize(s, scale)
    H, W = out.size
    sy, sx = H / 40, W / 60
    assert (H, W) == (round(40 * scale), round(60 * scale)) and out.scale == pytest.approx((sy, sx))
    assert torch.allclose(out.boxes, s.boxes * torch.tensor([sx, sy, sx, sy]))
    for box, binary in zip(out.boxes.tolist(), out.decode_masks()):
        assert box == pytest.approx(mask_bbox(binary), abs=1.0)


def test_augmentations_are_seeded_and_aspect_preserving():
    s = make_sample(120, 200, [(10, 10, 60, 60), (100, 40, 190, 110)])
    aug = Compose([ScaleJitter(0.5, 2.0), RandomHorizontalFlip(), RandomCrop(0.4, 0.9, p=1.0)])
    a, b = aug(s, np.random.default_rng(3)), aug(s, np.random.default_rng(3))
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes) and a.budget_scale == b.budget_scale
    for seed in range(20):
        out = aug(s, np.random.default_rng(seed))
        H, W = out.size
        assert len(out.labels) >= 1  # crops retry until a box survives
        assert abs(math.log((H / W) / (120 / 200))) < 0.1
        assert 0.5 <= out.budget_scale <= 2.0
    img = ScaleJitter(0.5, 0.5, target="image")(s, np.random.default_rng(0))
    assert img.size == (60, 100) and img.budget_scale == 1.0 and img.scale == (0.5, 0.5)


def test_repeat_factors_match_hand_computed_values():
    labels = [{0}, {0, 1}, {1}, {2}, set()]
    # f = (2/5, 2/5, 1/5); t = 1: r_c = sqrt(t / f) = (sqrt(2.5), sqrt(2.5), sqrt(5))
    r = lvis_repeat_factors(labels, threshold=1.0)
    assert r == pytest.approx([math.sqrt(2.5), math.sqrt(2.5), math.sqrt(2.5), math.sqrt(5), 1.0])
    # Default LVIS threshold: only categories in < 0.1% of images repeat.
    many = [{0}] * 2000 + [{1}]
    r = lvis_repeat_factors(many)
    assert r[0] == 1.0 and r[-1] == pytest.approx(math.sqrt(0.001 * 2001))


def test_collate_packs_and_normalizes_targets():
    a = make_sample(48, 96, [(0, 0, 48, 24), (60, 12, 96, 48)])
    b = resize(make_sample(100, 40, [(10, 20, 30, 90)], seed=1), 0.8)
    b.budget_scale = 0.5
    batch, targets = collate_detection([a, b], patch_size=8, max_tokens_per_image=40, seq_len=64)
    assert batch.num_images == 2
    h, w = batch.grid_sizes.tolist()[1]
    assert h * w <= 10  # 40 * 0.5^2
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.8125, 0.625, 0.375, 0.75]]))
    assert targets[1]["size"] == (80, 32) and targets[1]["orig_size"] == (100, 40)
    assert targets[1]["scale"] == pytest.approx((0.8, 0.8))
    # normalized boxes, scaled by the size the model saw, are the boxes in resized pixels
    Hr, Wr = batch.resized_sizes[1].tolist()
    from torchvision.ops import box_convert

    resized = box_convert(targets[1]["boxes"], "cxcywh", "xyxy") * torch.tensor([Wr, Hr, Wr, Hr])
    assert torch.allclose(resized, b.boxes * torch.tensor([Wr / 32, Hr / 80, Wr / 32, Hr / 80]))
    assert targets[0]["masks"] is a.masks


def load_generator():
    return load_tool("make_synthetic_lvis")


@pytest.fixture(scope="module")
def synthetic_lvis(tmp_path_factory):
    gen = load_generator()
    out = tmp_path_factory.mktemp("synth")
    args = gen.parse_args(
        ["--out", str(out), "--train-images", "60", "--val-images", "20", "--num-classes", "24", "--max-side", "192", "--format", "png"]
    )
    return gen, args, gen.generate(args)


def test_synthetic_lvis_follows_lvis_semantics(synthetic_lvis):
    gen, args, paths = synthetic_lvis
    train, val = (json.loads(paths[s].read_text()) for s in ("train", "val"))
    assert train["categories"] == val["categories"] and len(train["categories"]) == 24
    thresholds = train["info"]["frequency_thresholds"]
    image_sets: dict[int, set] = {}
    for a in train["annotations"]:
        image_sets.setdefault(a["category_id"], set()).add(a["image_id"])
    for c in train["categories"]:
        n = len(image_sets.get(c["id"], ()))
        assert c["image_count"] == n >= 1
        assert c["instance_count"] == sum(a["category_id"] == c["id"] for a in train["annotations"])
        assert c["frequency"] == ("r" if n <= thresholds["rare_max_images"] else "c" if n <= thresholds["common_max_images"] else "f")
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}
    assert {a["category_id"] for a in val["annotations"]} == {c["id"] for c in val["categories"]}  # APr is defined

    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}
    for split in (train, val):
        positives: dict[int, set] = {}
        for a in split["annotations"]:
            positives.setdefault(a["image_id"], set()).add(a["category_id"])
        for im in split["images"]:
            pos = positives.get(im["id"], set())
            assert pos and not pos & set(im["neg_category_ids"])  # negatives are verified absent
            assert set(im["not_exhaustive_category_ids"]) <= pos
            assert args.min_side <= min(im["width"], im["height"]) and max(im["width"], im["height"]) <= args.max_side
            assert (paths["images"] / im["file_name"]).exists() and im["coco_url"].endswith(im["file_name"])
        for a in split["annotations"]:
            x, y, w, h = a["bbox"]
            im = next(i for i in split["images"] if i["id"] == a["image_id"])
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert a["area"] > 0.3 * w * h  # the polygon fills a good part of its box
    assert any(im["not_exhaustive_category_ids"] for im in train["images"])

    # Seeded: same arguments, same dataset.
    again = gen.generate(gen.parse_args(["--out", str(paths["images"].parent / "again"), *_args_tail(args)]))
    assert json.loads(again["train"].read_text()) == train


def _args_tail(args):
    return ["--train-images", str(args.train_images), "--val-images", str(args.val_images), "--num-classes", str(args.num_classes),
            "--max-side", str(args.max_side), "--format", args.format]  # fmt: skip


def test_dataset_reads_synthetic_lvis(synthetic_lvis):
    _, _, paths = synthetic_lvis
    ds = DetectionDataset(paths["val"], paths["images"], with_masks=True)
    cm = ds.categories
    assert isinstance(cm, CategoryMap) and len(cm) == 24 and cm.to_category_ids(cm.to_labels([3, 1])) == [3, 1]
    assert len(cm.labels_with_frequency("r")) >= 1
    raw = json.loads(paths["val"].read_text())
    s = ds[0]
    info = raw["images"][0]
    assert s.size == (info["height"], info["width"]) == s.orig_size == ds.image_size(0) and s.image.dtype == torch.float32
    anns = [a for a in raw["annotations"] if a["image_id"] == info["id"]]
    assert cm.to_category_ids(s.labels) == [a["category_id"] for a in anns]
    assert cm.to_category_ids(s.neg_labels) == info["neg_category_ids"]
    for box, binary in zip(s.boxes.tolist(), s.decode_masks()):
        assert box == pytest.approx(mask_bbox(binary), abs=1.5)
    # Pixels: each instance is drawn in its class colour, so the masked region is saturated.
    first = s.image[:, torch.from_numpy(s.decode_masks()[0]).bool()]
    assert (first.max(0).values - first.min(0).values).mean() > 0.3
    assert len(lvis_repeat_factors(ds.image_labels())) == len(ds)
    aug = DetectionDataset(paths["train"], paths["images"], transforms=Compose([RandomHorizontalFlip(), RandomCrop(p=1.0)]))
    torch.manual_seed(0)
    batch, targets = collate_detection([aug[i] for i in range(4)], patch_size=16, max_tokens_per_image=64, seq_len=128)
    assert batch.num_images == 4 and all(((t["boxes"] > 0) & (t["boxes"] <= 1)).all() for t in targets)
