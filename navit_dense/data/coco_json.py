"""Loading and validating COCO / LVIS v1 instance annotation JSON.

Fatal problems raise :class:`AnnotationError` in every mode: the file is missing, empty, not
JSON (the message gives line and column), or lacks a top-level list. Problems with single
entries go through :class:`~navit_dense.data.decode.BadInputLog`: strict mode raises at the
first one; otherwise the entry (or the bad part of it) is dropped, counted by reason and
warned about, naming the file, the entry (``annotations[12] (id=345)``) and the field.

Policy for entries (reason keys in brackets):
- an entry that is not an object [bad_entry], lacks a required key [missing_key], or has a
  wrongly typed value [bad_value] is skipped; a repeated id [duplicate_id] skips the later
  entry; images need a positive integer width/height [bad_image_size];
- annotations pointing at an unknown image or category are skipped [unknown_image_id,
  unknown_category_id], or [image_skipped, category_skipped] if that entry was itself bad;
- boxes (xywh, original image pixels): not 4 finite numbers [bad_bbox] or width/height <= 0
  [nonpositive_box] skips the annotation; a box reaching outside its image is clipped
  (counted as fixed [clipped_box], not raised even in strict mode, since COCO's own float
  boxes overshoot by fractions of a pixel); nothing left after clipping [box_outside_image];
- segmentation (polygons or RLE) is validated without decoding. Invalid polygons are dropped
  [bad_polygon]; a segmentation with nothing valid left is dropped and the box kept
  [bad_segmentation]: consumers that need masks skip annotations with ``segmentation=None``;
- ``area`` (it decides small / medium / large in evaluation) is kept when it can belong to the
  (clipped) box: 0 < area <= (w + 2)(h + 2) (a rasterized mask may reach one pixel past its
  box) and, for an object the file gives no segmentation, area >= (w - 2)(h - 2). Otherwise it
  is recomputed, as the mask's pixel count (what COCO / LVIS store) or, without a mask, the box
  area; counted as fixed [missing_area] when absent, [inconsistent_area] when wrong (e.g. not a
  number, <= 0, or the same huge value on every object);
- LVIS: ``frequency`` must be r/c/f (else None) [bad_frequency]; ``neg_category_ids`` and
  ``not_exhaustive_category_ids`` must be lists of known category ids (unknown ids are
  removed, a missing or non-list value becomes []) [bad_neg_category_ids,
  bad_not_exhaustive_category_ids].
LVIS v1 images carry ``coco_url`` instead of ``file_name``: ``file_name`` becomes its last
two path parts (``train2017/000000391895.jpg``), relative to the COCO image root.

Ids must be positive: the COCO / LVIS evaluators use 0 for "unmatched". An export whose image,
category or annotation ids start at 0 (common in annotation tools) is renumbered: each such
family is shifted so that its smallest id is 1, with every reference to it (``image_id``,
``category_id``, the LVIS category lists), counted as fixed [shifted_image_ids, ...] and
named in the file's one repair warning. ``InstanceDataset.id_offsets`` records the shifts;
tools/eval_lvis.py applies the same shift to the ids of a detections file scored against it.

Training data, ``tools/evaluate.py`` and ``tools/eval_lvis.py`` all read ground truth through
:func:`load_instances`; the evaluators score :meth:`InstanceDataset.to_json`, so what is
skipped here is skipped everywhere and what is repaired is repaired everywhere.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from .decode import BadInputLog, BadInputWarning, DataError

LVIS_FREQUENCIES = ("r", "c", "f")
LVIS_IMAGE_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


class AnnotationError(DataError):
    """A problem in an annotation file; the message names the file, the entry and the field."""


@dataclass
class Category:
    id: int
    name: str
    frequency: str | None = None  # LVIS: "r" (rare), "c" (common), "f" (frequent)
    image_count: int | None = None  # LVIS: images containing the category (federated loss)
    supercategory: str | None = None
    synonyms: tuple[str, ...] = ()  # LVIS: other names of the category (text queries)


@dataclass
class Annotation:
    id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in original image pixels, clipped to the image
    iscrowd: bool = False
    area: float | None = None
    segmentation: list[list[float]] | dict | None = None  # polygons, or RLE {"size": [h, w], "counts": ...}

    def mask(self, height: int, width: int) -> np.ndarray:
        """uint8 [height, width] binary mask decoded by pycocotools."""
        if self.segmentation is None:
            raise ValueError(f"annotation {self.id} has no segmentation")
        return segmentation_to_mask(self.segmentation, height, width)


@dataclass
class ImageRecord:
    id: int
    file_name: str
    height: int
    width: int
    annotations: list[Annotation] = field(default_factory=list)
    neg_category_ids: list[int] = field(default_factory=list)  # LVIS: verified absent
    not_exhaustive_category_ids: list[int] = field(default_factory=list)  # LVIS: not all instances labelled


@dataclass
class InstanceDataset:
    path: str
    flavor: str  # "coco" or "lvis"
    images: list[ImageRecord]
    categories: dict[int, Category]
    log: BadInputLog  # what was skipped / fixed while loading this file
    id_offsets: dict[str, int] = field(default_factory=dict)  # {"image": 1, ...}: id families shifted (zero-based file)
    skipped_ids: dict[str, set[int]] = field(default_factory=dict)  # {"image": ..., "category": ...}: skipped entries' file ids

    @property
    def counts(self) -> dict[str, Any]:
        return self.log.summary()

    @property
    def num_annotations(self) -> int:
        return sum(len(im.annotations) for im in self.images)

    def to_json(self) -> dict:
        """This reading as a COCO (LVIS) JSON object: every skip, repair and id shift applied.
        The evaluators score this, so they see exactly the ground truth training sees."""
        lvis = self.flavor == "lvis"
        categories = [{"id": c.id, "name": c.name, **({"frequency": c.frequency} if lvis else {}),
                       **({"image_count": c.image_count} if c.image_count is not None else {})}
                      for c in self.categories.values()]  # fmt: skip
        images, annotations = [], []
        for im in self.images:
            lists = {key: list(getattr(im, key)) for key in LVIS_IMAGE_LISTS} if lvis else {}
            images.append({"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height, **lists})
            for a in im.annotations:
                segm = {} if a.segmentation is None else {"segmentation": a.segmentation}
                annotations.append({"id": a.id, "image_id": im.id, "category_id": a.category_id, "bbox": list(a.bbox),
                                    "area": a.area, "iscrowd": int(a.iscrowd), **segm})  # fmt: skip
        return {"images": images, "annotations": annotations, "categories": categories}


def to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE
    (what lvis-api's ``ann_to_rle`` does; pycocotools decodes string counts as they are)."""
    if isinstance(segmentation, list):  # polygons: rasterize and merge the parts
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Polygons or RLE (compressed or not) -> uint8 [height, width] mask, via pycocotools."""
    return mask_utils.decode(to_rle(segmentation, height, width))


# ---- validation helpers ----------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _rle_string_counts(s: str | bytes) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' rleToString),
    or None if malformed. Needed because pycocotools' decoder does not check that the runs
    cover the mask exactly: too few leaves uninitialised memory in the result."""
    data = s.encode("ascii", "replace") if isinstance(s, str) else s
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = k = 0
        more = True
        while more:
            if p >= len(data):
                return None  # ends inside a number
            c = data[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:  # runs after the third are stored as differences
            x += counts[-2]
        counts.append(x)
    return counts


def _polygon_problem(poly: Any) -> str | None:
    try:
        arr = np.asarray(poly)
    except ValueError:  # ragged nesting
        return "is not a flat list of numbers"
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        return "is not a flat list of numbers"
    if arr.size < 6 or arr.size % 2:
        # pycocotools would read a 4-number polygon as a box: reject, do not guess.
        return f"has {arr.size} coordinates, expected an even count >= 6 (3 points)"
    if not np.isfinite(arr).all():
        return "contains NaN or infinite coordinates"
    return None


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"RLE 'size' is {size!r}, expected [height, width]"
    if size != [height, width]:
        return f"RLE size {size} does not match the image ({height}x{width})"
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            return "RLE 'counts' must be non-negative integers"
    elif isinstance(counts, (str, bytes)):
        counts = _rle_string_counts(counts)
        if counts is None or any(v < 0 for v in counts):
            return "compressed RLE 'counts' string is malformed"
    else:
        return f"RLE 'counts' is {type(counts).__name__}, expected a list of run lengths or a compressed string"
    if sum(counts) != height * width:
        return f"RLE runs cover {sum(counts)} pixels, expected height*width = {height * width}"
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise AnnotationError(path, "missing", "annotation file does not exist") from None
    except OSError as e:
        raise AnnotationError(path, "unreadable", f"cannot read the annotation file ({e.strerror or e})") from e
    if not raw.strip():
        raise AnnotationError(path, "empty", "annotation file is empty, expected a COCO/LVIS JSON object")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, "malformed_json", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(path, "malformed_json", f"not UTF-8 text (bad byte at offset {e.start}): {e.reason}") from None


class _Parser:
    def __init__(self, path: str, log: BadInputLog, lvis: bool):
        self.path, self.log, self.lvis = path, log, lvis
        self.skipped_images: set[Any] = set()
        self.skipped_categories: set[Any] = set()

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.log.skip(AnnotationError(self.path, reason, f"{where}: {detail}"))

    def entry(self, section: str, i: int, e: Any, required: tuple[str, ...]) -> str | None:
        """Location string for entry i if it is an object with ``required`` keys and an int id."""
        if not isinstance(e, dict):
            self.skip(f"{section}[{i}]", "bad_entry", f"is {type(e).__name__}, expected an object")
            return None
        where = f"{section}[{i}]" + (f" (id={e['id']!r})" if "id" in e else "")
        for key in required:
            if key not in e:
                self.skip(where, "missing_key", f"missing key {key!r}")
                return None
        if not _is_int(e["id"]):
            self.skip(where, "bad_value", f"'id' is {e['id']!r}, expected an integer")
            return None
        return where

    def categories(self, raw: list) -> dict[int, Category]:
        out: dict[int, Category] = {}
        for i, c in enumerate(raw):
            where = self.entry("categories", i, c, ("id", "name"))
            if where is None:
                self.skipped_categories.add(c.get("id") if isinstance(c, dict) else None)
                continue
            if c["id"] in out:
                self.skip(where, "duplicate_id", f"category id {c['id']} already used by an earlier entry; keeping the first")
                continue
            if not isinstance(c["name"], str):
                self.skip(where, "bad_value", f"'name' is {c['name']!r}, expected a string")
                self.skipped_categories.add(c["id"])
                continue
            freq = c.get("frequency")
            if self.lvis and freq not in LVIS_FREQUENCIES:
                self.skip(where, "bad_frequency", f"'frequency' is {freq!r}, expected one of 'r', 'c', 'f'; using None")
                freq = None
            count = c.get("image_count")
            synonyms = c.get("synonyms")
            synonyms = tuple(n for n in synonyms if isinstance(n, str)) if isinstance(synonyms, list) else ()
            out[c["id"]] = Category(c["id"], c["name"], freq, count if _is_int(count) else None, c.get("supercategory"), synonyms)
        return out

    def images(self, raw: list, categories: dict[int, Category]) -> dict[int, ImageRecord]:
        out: dict[int, ImageRecord] = {}
        for i, im in enumerate(raw):
            where = self.entry("images", i, im, ("id", "width", "height"))
            if where is None:
                self.skipped_images.add(im.get("id") if isinstance(im, dict) else None)
                continue
            if im["id"] in out:
                self.skip(where, "duplicate_id", f"image id {im['id']} already used by an earlier entry; keeping the first")
                continue
            record = self._image(where, im)
            if record is None:
                self.skipped_images.add(im["id"])
                continue
            if self.lvis:
                for key in LVIS_IMAGE_LISTS:
                    setattr(record, key, self._category_list(where, im, key, categories))
            out[record.id] = record
        return out

    def _image(self, where: str, im: dict) -> ImageRecord | None:
        w, h = im["width"], im["height"]
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            self.skip(where, "bad_image_size", f"width={w!r}, height={h!r}, expected positive integers")
            return None
        name = im.get("file_name")
        if name is None and isinstance(im.get("coco_url"), str):
            name = "/".join(im["coco_url"].rstrip("/").split("/")[-2:])  # LVIS v1: split/xxx.jpg
        if not isinstance(name, str) or not name:
            self.skip(where, "missing_key", f"no usable 'file_name' or 'coco_url' (file_name={name!r})")
            return None
        return ImageRecord(im["id"], name, h, w)

    def _category_list(self, where: str, im: dict, key: str, categories: dict[int, Category]) -> list[int]:
        value = im.get(key)
        if not isinstance(value, list):
            self.skip(where, f"bad_{key}", f"{key!r} is {value!r}, expected a list of category ids; using []")
            return []
        unknown = [v for v in value if not (_is_int(v) and v in categories)]
        if unknown:
            self.skip(where, f"bad_{key}", f"{key!r} has unknown category ids {unknown[:10]}; removed them")
        return [v for v in value if _is_int(v) and v in categories]

    def annotations(self, raw: list, images: dict[int, ImageRecord], categories: dict[int, Category]) -> None:
        seen: set[int] = set()
        for i, a in enumerate(raw):
            where = self.entry("annotations", i, a, ("id", "image_id", "category_id", "bbox"))
            if where is None:
                continue
            if a["id"] in seen:
                self.skip(where, "duplicate_id", f"annotation id {a['id']} already used by an earlier entry; keeping the first")
                continue
            seen.add(a["id"])
            image = images.get(a["image_id"]) if _is_int(a["image_id"]) else None
            if image is None:
                skipped = a["image_id"] in self.skipped_images
                detail = "its image entry was skipped" if skipped else "no image has this id"
                self.skip(where, "image_skipped" if skipped else "unknown_image_id", f"'image_id' {a['image_id']!r}: {detail}")
                continue
            if not (_is_int(a["category_id"]) and a["category_id"] in categories):
                skipped = a["category_id"] in self.skipped_categories
                detail = "its category entry was skipped" if skipped else "no category has this id"
                self.skip(where, "category_skipped" if skipped else "unknown_category_id", f"'category_id' {a['category_id']!r}: {detail}")
                continue
            ann = self._annotation(where, a, image)
            if ann is not None:
                image.annotations.append(ann)

    def _annotation(self, where: str, a: dict, image: ImageRecord) -> Annotation | None:
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            self.skip(where, "bad_bbox", f"'bbox' is {box!r}, expected [x, y, width, height] (4 finite numbers)")
            return None
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            self.skip(where, "nonpositive_box", f"'bbox' {box} has width or height <= 0")
            return None
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(image.width)), min(y + h, float(image.height))
        if x1 <= x0 or y1 <= y0:
            self.skip(where, "box_outside_image", f"'bbox' {box} lies outside its {image.width}x{image.height} image")
            return None
        clipped = (x0, y0, x1 - x0, y1 - y0)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            self.log.fix("clipped_box")
        else:
            clipped = (x, y, w, h)  # untouched: keep the exact file values
        iscrowd = a.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # also admits False/True
            self.skip(where, "bad_value", f"'iscrowd' is {iscrowd!r}, expected 0 or 1")
            return None
        segm = self._segmentation(where, a.get("segmentation"), image)
        area = self._area(a.get("area"), clipped, segm, image, box_only=a.get("segmentation") is None)
        return Annotation(a["id"], a["category_id"], clipped, bool(iscrowd), area, segm)

    def _area(self, area: Any, box: tuple[float, ...], segm: list | dict | None, image: ImageRecord, box_only: bool) -> float:
        """The file's area if it can belong to this box, else recomputed and counted (policy above).
        box_only: the file gives no segmentation (an invalid one still made the area a mask's)."""
        w, h = box[2], box[3]
        if _is_number(area) and 0 < area <= (w + 2) * (h + 2) and (not box_only or area >= (w - 2) * (h - 2)):
            return float(area)
        self.log.fix("missing_area" if area is None else "inconsistent_area")
        if segm is None:
            return w * h
        return float(mask_utils.area(to_rle(segm, image.height, image.width))) or w * h  # a sub-pixel mask: its box

    def _segmentation(self, where: str, segm: Any, image: ImageRecord) -> list | dict | None:
        if segm is None:
            return None
        if isinstance(segm, list):
            checked = [(poly, _polygon_problem(poly)) for poly in segm]
            problems = [(j, p) for j, (_, p) in enumerate(checked) if p]
            kept = [poly for poly, p in checked if p is None]
            if problems and kept:
                desc = "; ".join(f"polygon {j} {p}" for j, p in problems[:5])
                self.skip(where, "bad_polygon", f"'segmentation': {desc}; dropped those polygons")
            if kept:
                return kept
            problem = "has no polygons" if not segm else "; ".join(f"polygon {j} {p}" for j, p in problems[:5])
        elif isinstance(segm, dict):
            problem = _rle_problem(segm, image.height, image.width)
            if problem is None:
                return segm
        else:
            problem = f"is {type(segm).__name__}, expected a list of polygons or an RLE object"
        self.skip(where, "bad_segmentation", f"'segmentation' {problem}; dropped the segmentation, kept the box")
        return None


def load_instances(
    path: str | os.PathLike,
    *,
    strict: bool = False,
    flavor: str = "auto",
    require_annotations: bool = True,
    max_warnings: int | None = 100,
) -> InstanceDataset:
    """Load and validate a COCO or LVIS v1 instances JSON (policy in the module docstring).

    flavor: "coco", "lvis", or "auto" (LVIS if any category has 'frequency' or any image
        has 'neg_category_ids').
    require_annotations: False accepts image-info files without 'annotations' (test-dev).
    The returned dataset's ``log`` holds the skip/fix counts (``dataset.counts``); merge it
    into a run-level :class:`BadInputLog` for the run summary.
    """
    path = os.fspath(path)
    if flavor not in ("auto", "coco", "lvis"):
        raise ValueError(f"flavor must be 'auto', 'coco' or 'lvis', got {flavor!r}")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(path, "bad_top_level", f"top level is a JSON {type(data).__name__}, expected an object with 'images', 'annotations', 'categories'")
    required = ("images", "annotations", "categories") if require_annotations else ("images", "categories")
    missing = [k for k in required if k not in data]
    if missing:
        raise AnnotationError(path, "missing_key", f"missing top-level key(s) {missing}; found {sorted(data)[:10]}")
    for key in ("images", "annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise AnnotationError(path, "bad_top_level", f"top-level {key!r} is a {type(data[key]).__name__}, expected a list")
    if flavor == "auto":
        lvis = any(isinstance(c, dict) and "frequency" in c for c in data["categories"]) or any(
            isinstance(im, dict) and "neg_category_ids" in im for im in data["images"]
        )
        flavor = "lvis" if lvis else "coco"

    log = BadInputLog(strict=strict, max_warnings=max_warnings)
    parser = _Parser(path, log, flavor == "lvis")
    categories = parser.categories(data["categories"])
    images = parser.images(data["images"], categories)
    parser.annotations(data.get("annotations", []), images, categories)
    skipped_ids = {"image": {i for i in parser.skipped_images if _is_int(i)} - set(images),
                   "category": {c for c in parser.skipped_categories if _is_int(c)} - set(categories)}  # fmt: skip
    offsets = _shift_nonpositive_ids(images.values(), categories.values(), log)
    if log.fixed:  # repairs are not per-entry warnings (COCO has many sub-pixel overshoots): one line per file
        shifted = "".join(f"; {family} ids start at {1 - n}: shifted by +{n} with every reference to them" for family, n in offsets.items())
        warnings.warn(f"{path}: repaired {dict(log.fixed)}{shifted}", BadInputWarning, stacklevel=2)
    return InstanceDataset(path, flavor, list(images.values()), {c.id: c for c in categories.values()}, log, offsets, skipped_ids)


def _shift_nonpositive_ids(images: Iterable[ImageRecord], categories: Iterable[Category], log: BadInputLog) -> dict[str, int]:
    """Shift each id family holding an id <= 0 so that its smallest id is 1, with every reference
    to it (in place); returns {family: shift} (policy in the module docstring)."""
    images, categories = list(images), list(categories)
    annotations = [a for im in images for a in im.annotations]
    families = {"image": [im.id for im in images], "category": [c.id for c in categories], "annotation": [a.id for a in annotations]}
    offsets = {family: 1 - min(ids) for family, ids in families.items() if ids and min(ids) <= 0}
    for family, n in offsets.items():
        log.fix(f"shifted_{family}_ids", len(families[family]))
    image, category, annotation = (offsets.get(f, 0) for f in families)
    for c in categories:
        c.id += category
    for im in images:
        im.id += image
        im.neg_category_ids = [c + category for c in im.neg_category_ids]
        im.not_exhaustive_category_ids = [c + category for c in im.not_exhaustive_category_ids]
        for a in im.annotations:
            a.id += annotation
            a.category_id += category
    return offsets
