"""LVIS / COCO detection evaluation: official reference and a fast path with identical metrics.

``evaluate_lvis(gt, dets, ...)`` returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf (LVIS only)
and AR, ARs, ARm, ARl. Values are in [0, 1]; -1 means "undefined" (no ground truth in that
group), exactly as the official APIs report it.

Reference (``fast=False``): the official lvis API 0.5.3 (with the scoped numpy fix from
``lvis_compat``). Fast path (``fast=True``): faster-coco-eval's C++ matcher/accumulator in LVIS
mode (``COCOeval_faster(lvis_style=True)``), fed with detections selected exactly as
``LVISResults`` / ``LVISEval._prepare`` select them and with IoUs computed by pycocotools exactly
as lvis-api computes them. faster-coco-eval alone does not reproduce lvis-api; the differences
(found by reading both sources) and how they are closed here:

* lvis-api keeps the top ``max_dets`` detections per *image* (``LVISResults``); faster-coco-eval
  caps per (image, category). -> cap per image here, then set its per-pair cap to a no-op.
* lvis-api drops annotations and detections with ``area <= 0`` (``LVIS.get_ann_ids`` filters
  ``0 < area < inf``); faster-coco-eval keeps them. -> filtered here.
* lvis-api ignores ``iscrowd`` and honours a GT ``ignore`` flag; faster-coco-eval sets
  ``ignore = iscrowd`` and applies crowd IoU. -> GT copies get ``iscrowd=0``; GT carrying a truthy
  ``ignore`` flag (not part of LVIS) makes the fast path fall back to the reference.
* in segm mode faster-coco-eval rasterises the detections its LVIS filter drops, and crashes
  (``IndexError: unordered_map::at``) when one lies in an image with nothing else kept.
  -> the LVIS filter is applied here first, and masks never go through its mask code.
* faster-coco-eval's ``evaluate()`` builds Python dicts over all images x categories and its C++
  core allocates a record per (image, category, area range), empty or not (~1.3 s for
  200 x 1000; ~16 GB for LVIS val). -> ``_evaluate_accumulate`` computes IoUs of non-empty pairs
  only and calls the same C++ routine; categories are evaluated in chunks, each on the images
  that hold its annotations (exact: a category's curve depends only on its own annotations).
* precision is tp/(tp+fp) there and tp/(tp+fp+eps) in lvis-api: differences ~1e-16.

Protocols:
* ``standard``: LVIS v1 protocol, at most ``max_dets`` (300) detections per image.
* ``fixed``: Fixed AP (Dave et al. 2021): no per-image cap; the top ``dets_per_cat`` (10,000)
  detections of each category over the whole dataset, as in their ``evaluate_ap_fixed.py``
  (pre-filter per category, then ``LVISResults(max_dets=-1)``).

COCO-format ground truth (categories without ``frequency``) is evaluated with pycocotools'
COCOeval: its per (image, category) cap ``maxDets`` = ``max_dets`` (COCO protocol: 100), every
metric read at that cap, no APr/APc/APf.

Ground truth given as a path is read as the training data reads it
(:func:`~navit_dense.data.coco_json.load_instances`: the same skips, repairs and id shifts;
:func:`read_ground_truth`), and the detections follow it (:func:`results_for_reading`).
Detections with a zero-area box are dropped, as lvis-api drops them (LVIS: after the per-image
cap, as ``LVISResults``; COCO bbox: before pycocotools, which would score them as false
positives); callers count them with :func:`zero_area_detections`. :func:`recall_caps` says
where the detection cap limits recall.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import math
import os
import warnings
from collections import Counter, defaultdict
from numbers import Real

import numpy as np

from ..data.coco_json import InstanceDataset, load_instances

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR", "ARs", "ARm", "ARl")
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
PROTOCOLS = ("standard", "fixed")
FREQUENCIES = ("r", "c", "f")
LVIS_MAX_DETS = 300
COCO_MAX_DETS = 100
FIXED_AP_DETS_PER_CAT = 10_000

# Chunking of the fast path (see _lvis_fast): at most this many (image, category) pairs handed to
# faster-coco-eval at once, which bounds its memory (~170 B per pair and area range) whatever the
# dataset size, and at most this many categories per chunk (fewer images per chunk).
_MAX_PAIRS_PER_CHUNK = 2_000_000
_CATS_PER_CHUNK = 50


class EvalInputError(ValueError):
    """Ground truth or detections that cannot be evaluated; the message names the entry."""


# --------------------------------------------------------------------------------------------
# Loading and validation


def load_json(source, what: str):
    """`source` is a path (str / PathLike) or an already-loaded object."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise EvalInputError(f"{what} file {path!r} does not exist (expected a JSON file)") from None
    except IsADirectoryError:
        raise EvalInputError(f"{what} file {path!r} is a directory (expected a JSON file)") from None
    except OSError as e:
        raise EvalInputError(f"{what} file {path!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{what} file {path!r} is not UTF-8 text (bad byte at offset {e.start}; expected JSON)") from None
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{what} file {path!r} is not valid JSON: {e}") from None


def read_ground_truth(path) -> tuple[dict, InstanceDataset]:
    """(ground truth JSON, the reading) of a COCO / LVIS file, read as the training data reads
    it: the same skips, repairs and id shifts (warned about and counted in ``reading.log``)."""
    reading = load_instances(path)
    return reading.to_json(), reading


def results_for_reading(dets, reading: InstanceDataset) -> tuple[list, int]:
    """(detections, how many were left out) for ground truth read by :func:`read_ground_truth`:
    detections on images or of categories that the reading skipped are left out (skipped
    everywhere), and ids are shifted as the reading shifted the file's (a zero-based file).
    Anything that is not a list of objects is returned as it is, for validation to report."""
    if not isinstance(dets, list):
        return dets, 0
    skipped_images, skipped_categories = reading.skipped_ids.get("image", ()), reading.skipped_ids.get("category", ())
    kept = [d for d in dets if not (isinstance(d, dict) and (d.get("image_id") in skipped_images or d.get("category_id") in skipped_categories))]
    image, category = reading.id_offsets.get("image", 0), reading.id_offsets.get("category", 0)
    if image or category:
        shift = lambda v, n: v + n if _is_int(v) else v  # noqa: E731  (bad ids are reported by validation)
        kept = [{**d, "image_id": shift(d.get("image_id"), image), "category_id": shift(d.get("category_id"), category)}
                if isinstance(d, dict) else d for d in kept]  # fmt: skip
    return kept, len(dets) - len(kept)


def with_masks_only(gt: dict) -> tuple[dict, int]:
    """(ground truth for segm evaluation, annotations left out): those whose segmentation the
    reading dropped as invalid (it keeps their box), as every mask consumer skips them."""
    kept = [a for a in gt["annotations"] if "segmentation" in a]
    return {**gt, "annotations": kept}, len(gt["annotations"]) - len(kept)


def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)))


def _is_number(v) -> bool:
    if type(v) is float:  # fast path: runs on every coordinate of every detection
        return math.isfinite(v)
    if not isinstance(v, Real) or isinstance(v, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def gt_format(gt: dict, source: str = "ground truth") -> str:
    """'lvis' if every category has a ``frequency``, 'coco' if none has. ``source`` names the
    ground truth in errors (e.g. its file)."""
    cats = gt.get("categories") if isinstance(gt, dict) else None
    if not isinstance(cats, list) or not cats:
        raise EvalInputError(f"{source}: 'categories' must be a non-empty list")
    has = [isinstance(c, dict) and "frequency" in c for c in cats]
    if all(has):
        return "lvis"
    if not any(has):
        return "coco"
    raise EvalInputError(f"{source}: categories[{has.index(False)}] has no 'frequency' while others do "
                         "(LVIS needs it on every category, COCO on none)")


def _unique_ids(entries: list, what: str, positive: bool = False) -> set[int]:
    """The ids of a ground-truth list, each an integer (> 0 if ``positive``) used once."""
    ids: set[int] = set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise EvalInputError(f"{what}[{i}]: not an object")
        if not _is_int(e.get("id")) or (positive and e["id"] <= 0):
            raise EvalInputError(f"{what}[{i}]: 'id' must be a{' positive' if positive else 'n'} integer")
        if e["id"] in ids:
            raise EvalInputError(f"{what}[{i}]: duplicate id {e['id']}")
        ids.add(e["id"])
    return ids


def validate_gt(gt: dict, fmt: str, iou_type: str, source: str = "ground truth") -> None:
    """Raise EvalInputError naming ``source`` and the first bad entry."""
    try:
        _validate_gt(gt, fmt, iou_type)
    except EvalInputError as e:
        raise EvalInputError(f"{source}: {e}") from None


def _validate_gt(gt: dict, fmt: str, iou_type: str) -> None:
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvalInputError(f"'{key}' must be a list")
    cat_ids = _unique_ids(gt["categories"], "categories")
    for i, c in enumerate(gt["categories"]):
        if fmt == "lvis" and c["frequency"] not in FREQUENCIES:
            raise EvalInputError(f"categories[{i}] (id {c['id']}): frequency must be one of {FREQUENCIES}, got {c['frequency']!r}")
    img_ids = _unique_ids(gt["images"], "images")
    for i, im in enumerate(gt["images"]):
        for key in ("width", "height"):
            if not _is_int(im.get(key)) or im[key] <= 0:
                raise EvalInputError(f"images[{i}] (id {im['id']}): '{key}' must be a positive integer")
        if fmt == "lvis":
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                if not isinstance(im.get(key), list):
                    raise EvalInputError(f"images[{i}] (id {im['id']}): LVIS needs a '{key}' list")
    # Both evaluators store matched annotation ids with 0 meaning "unmatched": ids must be > 0
    # (load_instances shifts zero-based files).
    _unique_ids(gt["annotations"], "annotations", positive=True)
    for i, a in enumerate(gt["annotations"]):
        where = f"annotations[{i}] (id {a['id']})"
        if a.get("image_id") not in img_ids:
            raise EvalInputError(f"{where}: unknown image_id {a.get('image_id')!r}")
        if a.get("category_id") not in cat_ids:
            raise EvalInputError(f"{where}: unknown category_id {a.get('category_id')!r}")
        if not _is_number(a.get("area")):
            raise EvalInputError(f"{where}: 'area' must be a finite number")
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise EvalInputError(f"{where}: 'bbox' must be 4 finite numbers")
        if iou_type == "segm" and "segmentation" not in a:
            raise EvalInputError(f"{where}: no 'segmentation' (needed for segm)")
        if fmt == "coco" and "iscrowd" not in a:
            raise EvalInputError(f"{where}: COCO format needs 'iscrowd'")


def _detection_problem(d, imgs: dict, cat_ids: set, iou_type: str, first_has_bbox: bool) -> str | None:
    """What is wrong with one detection, or None. Cheap when nothing is (runs per detection)."""
    if type(d) is not dict:
        return "not an object"
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    if not ("image_id" in d and "category_id" in d and "score" in d and geometry in d):
        missing = [k for k in ("image_id", "category_id", "score", geometry) if k not in d]
        return f"missing {', '.join(map(repr, missing))}" + (
            " (segm evaluation needs a mask per detection)" if "segmentation" in missing else "")
    img_id, cat_id, score = d["image_id"], d["category_id"], d["score"]
    if not _is_int(img_id) or img_id not in imgs:
        return f"unknown image_id {img_id!r} (not in the ground-truth images)"
    if not _is_int(cat_id) or cat_id not in cat_ids:
        return f"unknown category_id {cat_id!r} (not in the ground-truth categories)"
    if not _is_number(score):
        if isinstance(score, (bool, np.bool_)) or not isinstance(score, Real):
            return f"score must be a number, got {score!r}"
        return f"score is {score} (NaN/inf scores cannot be ranked)"
    bbox = d.get("bbox")
    if bbox is not None:
        if type(bbox) not in (list, tuple):
            return f"bbox must be a list [x, y, width, height], got {type(bbox).__name__}"
        if len(bbox) != 4:
            return f"bbox must be [x, y, width, height], got length {len(bbox)}"
        x, y, w, h = bbox
        if not (_is_number(x) and _is_number(y) and _is_number(w) and _is_number(h)):
            return f"bbox values must be finite numbers, got {bbox!r}"
        if w < 0 or h < 0:  # zero-area boxes are valid results, dropped before scoring (as lvis-api does)
            return f"bbox width and height must be >= 0, got {bbox!r}"
    elif first_has_bbox:
        # LVISResults takes the area of every mask result from its box when the first result has
        # one, and crashes on a later result without: require all or none.
        return "no 'bbox' although detections[0] has one (give all or none)"
    if iou_type == "segm":
        seg, im = d["segmentation"], imgs[img_id]
        if not (type(seg) is dict and type(seg.get("counts")) in (str, bytes)
                and type(seg.get("size")) in (list, tuple)):
            return "segmentation must be a compressed RLE {'size': [h, w], 'counts': str}"
        if list(seg["size"]) != [im["height"], im["width"]]:
            return (f"segmentation size {list(seg['size'])} != image [height, width] "
                    f"{[im['height'], im['width']]}")
    return None


def validate_detections(dets, gt: dict, iou_type: str, source: str = "detections") -> None:
    """Raise EvalInputError naming ``source`` (e.g. the file) and the first bad entry (index, and
    image where known)."""
    if not isinstance(dets, list):
        raise EvalInputError(f"{source} must be a JSON list of objects, got {type(dets).__name__}")
    imgs = {im["id"]: im for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    first_has_bbox = bool(dets) and type(dets[0]) is dict and "bbox" in dets[0]
    for i, d in enumerate(dets):
        problem = _detection_problem(d, imgs, cat_ids, iou_type, first_has_bbox)
        if problem:
            img_id = d.get("image_id") if type(d) is dict else None
            known = _is_int(img_id) and img_id in imgs
            raise EvalInputError(f"{source}[{i}]" + (f" (image_id {img_id})" if known else "") + f": {problem}")


# --------------------------------------------------------------------------------------------
# Detection selection shared by both paths (mirrors the official code, including tie order)


def cap_per_image(dets: list[dict], max_dets: int) -> list[dict]:
    """Same selection *and order* as ``LVISResults.limit_dets_per_image``: grouped by image in
    first-seen order; images over the cap are sorted by descending score (stable) and cut."""
    by_img = defaultdict(list)
    for d in dets:
        by_img[d["image_id"]].append(d)
    out = []
    for anns in by_img.values():
        if len(anns) > max_dets:
            anns = sorted(anns, key=lambda d: d["score"], reverse=True)[:max_dets]
        out.extend(anns)
    return out


def top_k_per_category(dets: list[dict], k: int) -> list[dict]:
    """Fixed-AP pre-filter as in Dave et al.'s ``evaluate_ap_fixed.py``: per category (first-seen
    order), the k highest-scoring detections over the whole dataset."""
    by_cat = defaultdict(list)
    for d in dets:
        by_cat[d["category_id"]].append(d)
    return [d for anns in by_cat.values() for d in sorted(anns, key=lambda d: d["score"], reverse=True)[:k]]


def _zero_area(d: dict) -> bool:
    box = d.get("bbox")
    return box is not None and box[2] * box[3] == 0


def zero_area_detections(dets: list[dict], fmt: str, iou_type: str) -> int:
    """How many (validated) detections :func:`evaluate_lvis` drops for a zero-area box: in bbox
    evaluation, and in LVIS segm evaluation (lvis-api takes a result's area from its box);
    pycocotools scores COCO segm results by their masks."""
    if fmt == "coco" and iou_type == "segm":
        return 0
    return sum(map(_zero_area, dets))


def recall_caps(gt: dict, dets: list[dict], protocol: str = "standard", max_dets: int | None = None,
                dets_per_cat: int = FIXED_AP_DETS_PER_CAT) -> dict:  # fmt: skip
    """Where the protocol's detection cap limits recall. The cap applies per image (LVIS
    standard: ``LVISResults``), per image and category (COCO: pycocotools' ``maxDets``) or per
    category (Fixed AP). Returns the cap, its group, the ground-truth groups holding more
    objects than the cap (even perfect detections cannot reach AP 1 there), the largest group,
    and the groups / detections the cap cuts."""
    fmt = gt_format(gt)
    if protocol == "fixed":
        per, cap, key = "category", dets_per_cat, lambda a: a["category_id"]
    elif fmt == "lvis":
        per, cap, key = "image", max_dets or LVIS_MAX_DETS, lambda a: a["image_id"]
    else:
        per, cap, key = "image and category", max_dets or COCO_MAX_DETS, lambda a: (a["image_id"], a["category_id"])
    objects = Counter(key(a) for a in gt["annotations"] if not (fmt == "coco" and a.get("iscrowd")))
    results = Counter(key(d) for d in dets)
    cut = [n - cap for n in results.values() if n > cap]
    return {"cap": cap, "per": per, "gt_groups_over_cap": sum(n > cap for n in objects.values()),
            "max_gt_per_group": max(objects.values(), default=0), "groups_cut": len(cut), "detections_cut": sum(cut)}  # fmt: skip


def detections_per_image(fmt: str, topk: int) -> int:
    """A detector's per-image output cap under the format's protocol: ``topk`` for LVIS,
    at most COCO's 100 for COCO."""
    return topk if fmt == "lvis" else min(topk, COCO_MAX_DETS)


def _select(dets: list[dict], protocol: str, max_dets: int, dets_per_cat: int) -> tuple[list[dict], int]:
    """(detections to hand to LVISResults, its max_dets argument)."""
    if protocol == "fixed":
        return top_k_per_category(dets, dets_per_cat), -1
    return dets, max_dets


@contextlib.contextmanager
def _gc_paused():
    """The fast path allocates ~1e5 small dicts; with the caller's large heap of annotations
    Python's cyclic GC then runs full collections that cost ~30% of the fast path's time
    (measured on Python 3.11). Collection is only deferred to the end of the call."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# Public entry point


def evaluate_lvis(
    gt,
    dets,
    iou_type: str = "bbox",
    protocol: str = "standard",
    max_dets: int | None = None,
    fast: bool = True,
    dets_per_cat: int = FIXED_AP_DETS_PER_CAT,
    *,
    dets_source: str | None = None,
) -> dict[str, float]:
    """Evaluate detections against LVIS (or COCO) ground truth.

    gt: path or dict (LVIS or COCO format); a path is read by :func:`read_ground_truth` (the
    training data's reading) and the detections' ids are shifted as its ids were.
    dets: path or list of result dicts (``image_id``, ``category_id``, ``score``, ``bbox``
    [x, y, w, h] and/or ``segmentation`` as compressed RLE). Inputs are never modified.
    max_dets: the standard protocol's cap, per image for LVIS (default 300), per image and
    category for COCO (pycocotools' maxDets, default 100); unused by ``fixed``, which caps per
    category at ``dets_per_cat`` instead. Zero-area boxes are dropped (module docstring).
    dets_source: how errors name the detections (default: their file, or "detections").
    Returns floats keyed by LVIS_METRICS (COCO_METRICS for COCO-format ground truth).
    AR is the recall at the same detection budget as AP.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    for name, value in (("max_dets", max_dets), ("dets_per_cat", dets_per_cat)):
        if value is not None and not (_is_int(value) and value > 0):
            raise EvalInputError(f"{name} must be a positive integer, got {value!r}")
    source = "ground truth"
    if dets_source is None:
        dets_source = f"detections {os.fspath(dets)}" if isinstance(dets, (str, os.PathLike)) else "detections"
    dets = load_json(dets, "detections")
    if isinstance(gt, (str, os.PathLike)):
        source = f"ground truth {os.fspath(gt)}"
        gt, reading = read_ground_truth(gt)
        dets, left_out = results_for_reading(dets, reading)
        if left_out:
            warnings.warn(f"{left_out} detections on images / of categories skipped in {source} are left out", stacklevel=2)
        if iou_type == "segm":
            gt, _ = with_masks_only(gt)  # the reading warned about each dropped segmentation
    fmt = gt_format(gt, source)
    validate_gt(gt, fmt, iou_type, source)
    validate_detections(dets, gt, iou_type, dets_source)

    if fmt == "coco":
        if protocol != "standard":
            raise ValueError("the fixed protocol is defined for LVIS (federated) ground truth only")
        if iou_type == "bbox":
            dets = [d for d in dets if not _zero_area(d)]
        return _coco_reference(gt, dets, iou_type, COCO_MAX_DETS if max_dets is None else max_dets)

    max_dets = LVIS_MAX_DETS if max_dets is None else max_dets
    selected, results_max_dets = _select(dets, protocol, max_dets, dets_per_cat)
    if fast and any(a.get("ignore") for a in gt["annotations"]):
        warnings.warn("ground truth has 'ignore' flags, which faster-coco-eval cannot honour the way the "
                      "lvis API does: using the (slow) reference evaluator", stacklevel=2)
        fast = False
    if fast:
        with _gc_paused():
            return _lvis_fast(gt, selected, iou_type, results_max_dets)
    return _lvis_reference(gt, selected, iou_type, results_max_dets)


# --------------------------------------------------------------------------------------------
# Reference: the official lvis API


def _lvis_reference(gt: dict, dets: list[dict], iou_type: str, results_max_dets: int) -> dict[str, float]:
    from lvis import LVIS, LVISResults

    from .lvis_compat import lvis_eval_class

    # LVIS() only takes a path; build the same object from memory. Shallow copies suffice: the
    # lvis API only (re)assigns keys of annotation dicts ("segmentation", "area", "id", ...).
    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis.lvis")
    lvis_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    lvis_gt._create_index()
    results = [dict(d) for d in dets]
    if results:
        lvis_dt = LVISResults(lvis_gt, results, max_dets=results_max_dets)
    else:
        # LVISResults crashes on an empty list (it inspects results[0]); an empty result set is
        # otherwise well defined for LVISEval (AP = 0 where there is ground truth).
        lvis_dt = LVISResults.__new__(LVISResults)
        lvis_dt.logger = lvis_gt.logger
        lvis_dt.dataset = {**copy.deepcopy(lvis_gt.dataset), "annotations": []}
        lvis_dt._create_index()
    ev = lvis_eval_class()(lvis_gt, lvis_dt, iou_type=iou_type)
    ev.params.max_dets = results_max_dets  # only names the AR key (as in Dave et al.'s script)
    ev.run()
    out = {}
    for key, value in ev.get_results().items():
        out[key.split("@")[0]] = float(value)  # "AR@300" -> "AR"
    return {k: out[k] for k in LVIS_METRICS}


# --------------------------------------------------------------------------------------------
# Fast path: faster-coco-eval's C++ core, fed like lvis-api


def _mean_defined(s: np.ndarray) -> float:
    """Mean over the defined entries (-1 = undefined), -1 if none: the official summaries."""
    s = s[s > -1]
    return float(np.mean(s)) if s.size else -1.0


def _summarize(precision: np.ndarray, recall: np.ndarray, freq_groups: list[list[int]]) -> dict[str, float]:
    """LVISEval.summarize on precision [T, R, K, A] and recall [T, K, A] (areas all/s/m/l)."""
    iou_thrs = np.linspace(0.5, 0.95, 10)
    mean = _mean_defined
    t50, t75 = np.where(iou_thrs == 0.5)[0], np.where(iou_thrs == 0.75)[0]
    res = {
        "AP": mean(precision[..., 0]),
        "AP50": mean(precision[t50][..., 0]),
        "AP75": mean(precision[t75][..., 0]),
        "APs": mean(precision[..., 1]),
        "APm": mean(precision[..., 2]),
        "APl": mean(precision[..., 3]),
    }
    for name, idx in zip(("APr", "APc", "APf"), freq_groups):
        res[name] = mean(precision[:, :, idx, 0])
    res.update(AR=mean(recall[..., 0]), ARs=mean(recall[..., 1]), ARm=mean(recall[..., 2]), ARl=mean(recall[..., 3]))
    return res


def _evaluate_accumulate(ev, iou_key: str) -> dict:
    """``ev.evaluate(); ev.accumulate()`` of faster-coco-eval 1.8.0, with lvis-api's IoUs and
    without its Python overhead.

    Its evaluate() builds a dict over *all* (image, category) pairs keyed by numpy scalars
    (~1.3 s for 200 images x 1000 classes, minutes at LVIS-val scale) and computes IoUs with
    its own mask code. Here IoUs are computed for the non-empty pairs only, with pycocotools
    exactly as lvis-api does (from ``ann[iou_key]``: boxes, or masks), and the same C++
    matcher/accumulator is called.
    """
    import faster_coco_eval.faster_eval_api_cpp as _C
    import pycocotools.mask as mask_utils

    p = ev.params
    p.imgIds = sorted(int(i) for i in p.imgIds)
    p.catIds = sorted(int(c) for c in p.catIds)
    ev._prepare()
    ious = {}
    for img_id, cat_id in ev._nonempty_iou_pairs:
        gts = ev.gt_dataset.get_instances([img_id], [cat_id], True)[0][0]
        dts = ev.dt_dataset.get_instances([img_id], [cat_id], True)[0][0]
        # IoU rows in the C++ matcher's order: detections by descending score, stable (as its
        # computeIoU and lvis-api's compute_iou order them).
        dts = [dts[i] for i in np.argsort([-d["score"] for d in dts], kind="mergesort")]
        ious[img_id, cat_id] = mask_utils.iou([d[iou_key] for d in dts], [g[iou_key] for g in gts], [0] * len(gts))
    empty: list = []
    nested = [[ious.get((i, c), empty) for c in p.catIds] for i in p.imgIds]
    return _C.COCOevalEvaluateAccumulate(p, nested, ev.gt_dataset, ev.dt_dataset, p.imgIds, p.catIds, True)


def _lvis_fast(gt: dict, dets: list[dict], iou_type: str, results_max_dets: int) -> dict[str, float]:
    from faster_coco_eval import COCO, COCOeval_faster

    from ..data.coco_json import to_rle  # = LVIS.ann_to_rle

    segm = iou_type == "segm"
    if results_max_dets >= 0:
        dets = cap_per_image(dets, results_max_dets)

    gt_anns = [a for a in gt["annotations"] if 0 < a["area"] < math.inf]  # as LVIS.get_ann_ids
    gt_pairs = {(a["image_id"], a["category_id"]) for a in gt_anns}
    # Federated filter of LVISEval._prepare: a detection counts only if its category is verified
    # for its image (present in the GT or listed in neg_category_ids). faster-coco-eval's LVIS
    # mode applies the same rule; applying it first shrinks its input (and avoids its segm crash).
    verified = {im["id"]: set(im["neg_category_ids"]) for im in gt["images"]}
    for img_id, cat_id in gt_pairs:
        verified[img_id].add(cat_id)

    # Detections exactly as LVISResults leaves them: id = position + 1, area = box area when the
    # (first) result has a box, else mask area; then area > 0 only, as LVIS.get_ann_ids.
    box_area = bool(dets) and "bbox" in dets[0]
    if segm and not box_area:
        import pycocotools.mask as mask_utils  # what LVISResults uses

        areas = mask_utils.area([d["segmentation"] for d in dets]) if dets else []
    dt_anns = []
    for i, d in enumerate(dets):
        img_id, cat_id = d["image_id"], d["category_id"]
        area = d["bbox"][2] * d["bbox"][3] if box_area else float(areas[i])
        if area > 0 and cat_id in verified[img_id]:
            ann = {"id": i + 1, "image_id": img_id, "category_id": cat_id, "score": float(d["score"]), "area": area}
            if box_area:
                ann["bbox"] = d["bbox"]
            if segm:
                ann["_rle"] = d["segmentation"]  # compressed RLE (validated): used as is
            dt_anns.append(ann)
    dt_pairs = {(d["image_id"], d["category_id"]) for d in dt_anns}
    # Masks are needed only where IoUs are computed: pairs holding both GT and detections.
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    gt_anns = [{"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "area": a["area"], "iscrowd": 0,  # lvis-api knows no crowd regions
                **({"_rle": to_rle(a["segmentation"], *sizes[a["image_id"]])}
                   if segm and (a["image_id"], a["category_id"]) in dt_pairs else {})}
               for a in gt_anns]

    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    freq_groups = [[k for k, c in enumerate(cats) if c["frequency"] == f] for f in FREQUENCIES]
    gt_by_cat, dt_by_cat = defaultdict(list), defaultdict(list)
    for a in gt_anns:
        gt_by_cat[a["category_id"]].append(a)
    for d in dt_anns:
        dt_by_cat[d["category_id"]].append(d)
    # Per-(image, category) cap of faster-coco-eval made a no-op: the largest group size.
    per_pair = Counter((d["image_id"], d["category_id"]) for d in dt_anns)
    pair_cap = max(per_pair.values(), default=1)

    # Categories are evaluated in chunks, each on just the images holding its annotations or
    # detections. Exact: a category's curve depends on its own annotations only, an empty
    # (image, category) pair adds nothing, and image order is kept (it breaks score ties).
    # Categories without ground truth are skipped: their curves are -1, as in lvis-api.
    # Thus the C++ work (~1 us per image x category x area range, even when empty) scales with
    # the non-empty pairs rather than images x categories.
    chunks, cur, cur_imgs = [], [], set()
    for c in cats:
        if not gt_by_cat[c["id"]]:
            continue
        imgs = {a["image_id"] for a in gt_by_cat[c["id"]]} | {d["image_id"] for d in dt_by_cat[c["id"]]}
        if cur and (len(cur) >= _CATS_PER_CHUNK or (len(cur) + 1) * len(cur_imgs | imgs) > _MAX_PAIRS_PER_CHUNK):
            chunks.append((cur, cur_imgs))
            cur, cur_imgs = [], set()
        cur.append(c)
        cur_imgs |= imgs
    if cur:
        chunks.append((cur, cur_imgs))

    img_by_id = {im["id"]: im for im in gt["images"]}
    precision = -np.ones((10, 101, len(cats), 4))  # IoU thresholds x recall points x K x areas
    recall = -np.ones((10, len(cats), 4))
    quiet = lambda *args, **kwargs: None  # noqa: E731
    for chunk_cats, img_ids in chunks:
        ids = [c["id"] for c in chunk_cats]
        # Copies of the image dicts: faster-coco-eval may normalise ids in place. The annotation
        # dicts are our own, each in one chunk: it writes flags into them.
        images = [dict(img_by_id[i]) for i in sorted(img_ids)]
        cocos = [COCO({"images": images, "categories": chunk_cats, "annotations": [a for i in ids for a in by_cat[i]]},
                      print_function=quiet) for by_cat in (gt_by_cat, dt_by_cat)]
        # iouType "bbox" whatever the IoU type: it only makes faster-coco-eval skip its own mask
        # handling; _evaluate_accumulate supplies the IoUs (mask IoUs in segm mode).
        ev = COCOeval_faster(cocos[0], cocos[1], "bbox", lvis_style=True, print_function=quiet)
        ev.params.maxDets = [pair_cap]
        result = _evaluate_accumulate(ev, "_rle" if segm else "bbox")
        k = [cat_index[i] for i in ev.params.catIds]
        precision[:, :, k, :] = result["precision"][..., 0]
        recall[:, k, :] = result["recall"][..., 0]
    return _summarize(precision, recall, freq_groups)


# --------------------------------------------------------------------------------------------
# COCO format: pycocotools


def _coco_reference(gt: dict, dets: list[dict], iou_type: str, max_dets: int) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes([dict(d) for d in dets])
        else:  # loadRes crashes on an empty list (it inspects anns[0])
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    return _coco_summary(ev.eval["precision"], ev.eval["recall"], ev.params.maxDets.index(max_dets))


def _coco_summary(precision: np.ndarray, recall: np.ndarray, m: int) -> dict[str, float]:
    """COCOeval.summarize's AP / AR values, all read at maxDets index ``m``: summarize() reads
    AP at a hard-coded 100 detections and returns -1 for any other cap. precision [T, R, K, A, M],
    recall [T, K, A, M]; areas all/s/m/l; IoU thresholds 0.50:0.05:0.95."""
    mean = _mean_defined
    p, r = precision[..., m], recall[..., m]
    return {"AP": mean(p[..., 0]), "AP50": mean(p[0, ..., 0]), "AP75": mean(p[5, ..., 0]),
            "APs": mean(p[..., 1]), "APm": mean(p[..., 2]), "APl": mean(p[..., 3]),
            "AR": mean(r[..., 0]), "ARs": mean(r[..., 1]), "ARm": mean(r[..., 2]), "ARl": mean(r[..., 3])}  # fmt: skip
