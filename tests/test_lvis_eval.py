"""LVIS / COCO evaluation: lvis-api numpy fix, fast path == official API, protocols, input errors, CLI."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

from navit_dense.evaluation import lvis_eval
from navit_dense.evaluation.lvis_eval import (
    COCO_METRICS,
    LVIS_METRICS,
    EvalInputError,
    cap_per_image,
    evaluate_lvis,
    top_k_per_category,
)
from navit_dense.data.synthetic.lvis_random import make_detections, make_lvis_gt, to_coco_format

logging.getLogger("lvis").setLevel(logging.ERROR)  # lvis-api warns on every in-memory result list
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
TOL = 1e-6  # required parity is 1e-4; measured differences are ~1e-16 (float rounding only)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# A tiny case whose metrics are worked out by hand


def _box_ann(ann_id, image_id, cat, box):
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": list(box), "area": w * h,
            "segmentation": [[x, y, x, y + h, x + w, y + h, x + w, y]]}


def tiny_gt() -> dict:
    return {
        "images": [
            # category 3 is not exhaustively annotated in image 1
            {"id": 1, "width": 300, "height": 300, "file_name": "1.jpg", "neg_category_ids": [], "not_exhaustive_category_ids": [3]},
            # category 2 is verified absent from image 2
            {"id": 2, "width": 300, "height": 300, "file_name": "2.jpg", "neg_category_ids": [2], "not_exhaustive_category_ids": []},
        ],
        "categories": [
            {"id": 1, "name": "f1", "frequency": "f"},
            {"id": 2, "name": "r1", "frequency": "r"},
            {"id": 3, "name": "c1", "frequency": "c"},
            {"id": 4, "name": "c2", "frequency": "c"},  # no ground truth anywhere -> excluded (-1)
        ],
        "annotations": [
            _box_ann(1, 1, 1, (0, 0, 10, 10)),
            _box_ann(2, 1, 1, (50, 50, 10, 10)),
            _box_ann(3, 1, 2, (100, 100, 20, 20)),
            _box_ann(4, 1, 3, (200, 200, 30, 30)),
        ],
    }


def tiny_dets() -> list[dict]:
    def det(img, cat, box, score):
        return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}

    return [
        det(1, 1, (0, 0, 10, 10), 0.9),  # TP
        det(1, 1, (150, 10, 10, 10), 0.8),  # FP
        det(1, 1, (50, 50, 10, 10), 0.7),  # TP
        det(1, 2, (100, 100, 20, 15.4), 0.6),  # IoU 0.77 with GT 3: TP for IoU thresholds 0.50..0.75
        det(2, 2, (10, 10, 20, 20), 0.95),  # FP: class 2 verified absent from image 2
        det(1, 3, (250, 250, 20, 20), 0.99),  # unmatched but class 3 not exhaustive in image 1: ignored
        det(1, 3, (200, 200, 30, 30), 0.5),  # TP
        det(2, 1, (0, 0, 10, 10), 1.0),  # class 1 unverified in image 2: dropped
        det(1, 4, (0, 0, 10, 10), 1.0),  # class 4 unverified in image 1: dropped
    ]


def tiny_expected() -> dict:
    # class 1: TP, FP, TP -> precision [1, 1/2, 2/3], recall [.5, .5, 1]; interpolated precision is
    # 1 at the 51 recall points 0.00..0.50 and 2/3 at the 50 points 0.51..1.00, at every IoU.
    ap1 = (51 * 1 + 50 * 2 / 3) / 101
    # class 2: FP (0.95) then TP (0.6) -> interpolated precision 1/2 everywhere, at the 6 IoU
    # thresholds <= 0.77; no TP at 0.80..0.95 -> 0.
    ap2_at = [0.5 if t <= 0.77 else 0.0 for t in np.linspace(0.5, 0.95, 10)]
    ap2 = sum(ap2_at) / 10
    ap3 = 1.0  # the higher-scored FP is ignored
    rec2 = sum(t <= 0.77 for t in np.linspace(0.5, 0.95, 10)) / 10
    return {
        "AP": (ap1 + ap2 + ap3) / 3, "AP50": (ap1 + 0.5 + 1) / 3, "AP75": (ap1 + 0.5 + 1) / 3,
        "APs": (ap1 + ap2 + ap3) / 3, "APm": -1, "APl": -1,  # every object is small (< 32^2)
        "APr": ap2, "APc": ap3, "APf": ap1,
        "AR": (1 + rec2 + 1) / 3, "ARs": (1 + rec2 + 1) / 3, "ARm": -1, "ARl": -1,
    }


def _lvis_objects(gt, dets):
    from lvis import LVIS, LVISResults

    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis")
    lvis_gt.dataset = copy.deepcopy(gt)
    lvis_gt._create_index()
    return lvis_gt, LVISResults(lvis_gt, copy.deepcopy(dets))


def test_plain_lvis_eval_fails_on_this_numpy():
    from lvis import LVISEval

    if not hasattr(np, "float"):  # numpy >= 1.24
        ev = LVISEval(*_lvis_objects(tiny_gt(), tiny_dets()), iou_type="bbox")
        with pytest.raises(AttributeError, match="float"):
            ev.run()
    else:
        pytest.skip("this numpy still has np.float; lvis 0.5.3 runs unpatched")


def test_compat_lvis_eval_matches_hand_computed_metrics():
    import lvis.eval
    from lvis import LVISEval

    from navit_dense.evaluation.lvis_compat import LVISEvalCompat

    numpy_had_float = hasattr(np, "float")
    ev = LVISEvalCompat(*_lvis_objects(tiny_gt(), tiny_dets()), iou_type="bbox")
    ev.run()
    got = {k.split("@")[0]: float(v) for k, v in ev.get_results().items()}
    expected = tiny_expected()
    for key in LVIS_METRICS:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    # Scoped: numpy, lvis.eval and the original class are unchanged.
    assert hasattr(np, "float") == numpy_had_float
    assert lvis.eval.np is np and LVISEval.accumulate.__globals__["np"] is np
    assert LVISEvalCompat.accumulate.__code__ is LVISEval.accumulate.__code__  # same code, not a copy


@pytest.mark.parametrize("fast", [True, False])
def test_evaluate_lvis_tiny_case(fast):
    got = evaluate_lvis(tiny_gt(), tiny_dets(), "bbox", fast=fast)
    for key, value in tiny_expected().items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------------------
# Fast path == official lvis API on generated data


def _assert_same(fast: dict, ref: dict):
    assert set(fast) == set(ref) == set(LVIS_METRICS)
    diffs = {k: abs(fast[k] - ref[k]) for k in ref}
    assert max(diffs.values()) <= TOL, diffs


def _dataset(seed, images, cats, **det_kwargs):
    gt = make_lvis_gt(images, cats, seed=seed)
    return gt, make_detections(gt, seed=seed + 100, with_masks=True, **det_kwargs)


PARITY_CASES = {
    # name: (seed, images, categories, detection options, fixed-AP dets_per_cat)
    # dets_per_cat is scaled down from 10,000 so the per-class cap bites on these small sets.
    "small": (0, 12, 20, {}, 20),
    # images over the 300 cap, with confident false positives so the cap also drops true detections
    "capped": (1, 25, 60, {"false_positives_per_image": (250, 500), "false_positive_scores": (0.2, 0.9)}, 150),
    "medium": (3, 40, 150, {}, 15),
    "ties": (2, 20, 40, {"score_decimals": 1, "false_positives_per_image": (20, 80)}, 25),  # many tied scores
}


@pytest.fixture(scope="module")
def datasets():
    return {name: _dataset(seed, n_img, n_cat, **kw) for name, (seed, n_img, n_cat, kw, _) in PARITY_CASES.items()}


@pytest.mark.parametrize("name", list(PARITY_CASES))
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("protocol", ["standard", "fixed"])
def test_fast_matches_reference(datasets, name, iou_type, protocol):
    gt, dets = datasets[name]
    kw = {"dets_per_cat": PARITY_CASES[name][-1]}
    ref = evaluate_lvis(gt, dets, iou_type, protocol, fast=False, **kw)
    fast = evaluate_lvis(gt, dets, iou_type, protocol, fast=True, **kw)
    _assert_same(fast, ref)
    # Meaningful comparison: real, non-degenerate numbers in every frequency group.
    assert 0 < ref["AP"] < 1 and all(ref[k] > 0 for k in ("APr", "APc", "APf"))


def test_segm_without_boxes_uses_mask_area(datasets):
    # LVISResults takes the area (for the size ranges) from the box when results have one, else
    # from the mask; both paths must follow.
    gt, dets = datasets["small"]
    no_box = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    ref = evaluate_lvis(gt, no_box, "segm", fast=False)
    _assert_same(evaluate_lvis(gt, no_box, "segm", fast=True), ref)
    assert ref != evaluate_lvis(gt, dets, "segm", fast=False)


def test_generated_data_exercises_caps_and_ties(datasets):
    for name, (*_, dets_per_cat) in PARITY_CASES.items():
        assert max(Counter(d["category_id"] for d in datasets[name][1]).values()) > dets_per_cat, name
    gt, dets = datasets["capped"]
    assert max(Counter(d["image_id"] for d in dets).values()) > 300
    # the per-image cap changes the metrics a lot (it drops true detections too)
    capped, uncapped = evaluate_lvis(gt, dets, "bbox", max_dets=300), evaluate_lvis(gt, dets, "bbox", max_dets=10**6)
    assert max(abs(capped[k] - uncapped[k]) for k in capped) > 0.01
    _, dets = datasets["ties"]
    assert len({d["score"] for d in dets}) < len(dets) / 10


def test_chunked_fast_path_is_exact(datasets, monkeypatch):
    gt, dets = datasets["capped"]
    whole = evaluate_lvis(gt, dets, "bbox")
    monkeypatch.setattr(lvis_eval, "_CATS_PER_CHUNK", 3)
    _assert_same(evaluate_lvis(gt, dets, "bbox"), whole)
    monkeypatch.setattr(lvis_eval, "_MAX_PAIRS_PER_CHUNK", 2 * len(gt["images"]))  # <= 2 classes per chunk
    _assert_same(evaluate_lvis(gt, dets, "bbox"), whole)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_zero_area_boxes_are_dropped_after_the_cap_as_lvis_api_does(datasets, iou_type):
    # Zero-area results still take a place under the per-image cap in LVISResults, and are then
    # dropped by LVIS.get_ann_ids (area > 0); the fast path must follow that order.
    gt, dets = datasets["capped"]
    flat = copy.deepcopy(dets)
    for d in flat[::5]:
        d["bbox"][2] = 0.0
    ref = evaluate_lvis(gt, flat, iou_type, fast=False)
    _assert_same(evaluate_lvis(gt, flat, iou_type, fast=True), ref)
    assert ref != evaluate_lvis(gt, dets, iou_type, fast=False)


def test_inputs_are_not_modified(datasets):
    gt, dets = datasets["small"]
    gt0, dets0 = copy.deepcopy(gt), copy.deepcopy(dets)
    for fast in (True, False):
        evaluate_lvis(gt, dets, "segm", fast=fast)
    assert gt == gt0 and dets == dets0


# ------------------------------------------------------------------------------------------
# Protocol semantics


def test_standard_cap_is_lvis_results_selection_and_order(datasets):
    from lvis import LVISResults

    gt, dets = datasets["capped"]
    lvis_gt, _ = _lvis_objects(gt, dets[:1])
    tied = [{**d, "score": round(d["score"], 1)} for d in dets]  # ties at the cut: order must match too
    for case in (tied, dets):
        official = LVISResults(lvis_gt, copy.deepcopy(case), max_dets=300).dataset["annotations"]
        ours = cap_per_image(case, 300)
        assert [(d["image_id"], d["category_id"], d["score"], d["bbox"]) for d in ours] == \
            [(d["image_id"], d["category_id"], d["score"], d["bbox"]) for d in official]
    _assert_same(evaluate_lvis(gt, tied, "bbox", fast=True), evaluate_lvis(gt, tied, "bbox", fast=False))
    per_img = Counter(d["image_id"] for d in official)
    assert max(per_img.values()) == 300
    # the kept ones are the top scores of their image
    for img, n in Counter(d["image_id"] for d in dets).items():
        if n > 300:
            kept = min(d["score"] for d in official if d["image_id"] == img)
            assert sorted((d["score"] for d in dets if d["image_id"] == img), reverse=True)[299] == kept
    # max_dets=-1 (used by fixed AP): nothing is dropped
    assert len(LVISResults(lvis_gt, copy.deepcopy(dets), max_dets=-1).dataset["annotations"]) == len(dets)


def test_fixed_protocol_selection(datasets):
    gt, dets = datasets["capped"]
    top = top_k_per_category(dets, 25)
    for cat, n in Counter(d["category_id"] for d in dets).items():
        mine = sorted((d["score"] for d in top if d["category_id"] == cat), reverse=True)
        assert mine == sorted((d["score"] for d in dets if d["category_id"] == cat), reverse=True)[:25]
    # Without a per-class cap biting, fixed differs from standard only through the per-image cap.
    huge = 10**9
    fixed = evaluate_lvis(gt, dets, "bbox", "fixed", dets_per_cat=huge)
    assert fixed == evaluate_lvis(gt, dets, "bbox", "standard", max_dets=huge)
    assert fixed != evaluate_lvis(gt, dets, "bbox", "standard")


# ------------------------------------------------------------------------------------------
# Bad input


def _set(i, **values):
    return lambda dets: dets[i].update(values)


BAD_DETECTIONS = {  # name: (mutation of tiny_dets(), expected message)
    "missing key": (lambda dets: dets[2].pop("score"), r"detections\[2\] \(image_id 1\): missing 'score'"),
    "unknown image": (_set(1, image_id=77), r"detections\[1\]: unknown image_id 77"),
    "unknown category": (_set(3, category_id=999), r"detections\[3\] \(image_id 1\): unknown category_id 999"),
    "nan score": (_set(0, score=float("nan")), r"detections\[0\] \(image_id 1\): score is nan .*NaN/inf"),
    "inf score": (_set(4, score=float("inf")), r"detections\[4\] \(image_id 2\): score is inf"),
    "string score": (_set(4, score="0.5"), r"detections\[4\].*score must be a number"),
    "negative height": (_set(6, bbox=[1, 1, 5, -2]), r"detections\[6\].*width and height must be >= 0"),
    "bbox length": (_set(1, bbox=[1, 1, 5]), r"detections\[1\].*\[x, y, width, height\], got length 3"),
    "nan coordinate": (_set(1, bbox=[1, float("nan"), 5, 5]), r"detections\[1\].*finite numbers"),
    "not an object": (lambda dets: dets.__setitem__(7, [1, 2]), r"detections\[7\]: not an object"),
}


@pytest.mark.parametrize("case", list(BAD_DETECTIONS))
def test_bad_detections_raise_clear_errors(case):
    mutate, pattern = BAD_DETECTIONS[case]
    dets = tiny_dets()
    mutate(dets)
    with pytest.raises(EvalInputError, match=pattern):
        evaluate_lvis(tiny_gt(), dets, "bbox")


def test_bad_detection_files(tmp_path):
    with pytest.raises(EvalInputError, match="must be a JSON list"):
        evaluate_lvis(tiny_gt(), {"annotations": tiny_dets()})
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(tiny_gt()))
    (tmp_path / "dict.json").write_text(json.dumps({"annotations": tiny_dets()}))
    with pytest.raises(EvalInputError, match="must be a JSON list"):
        evaluate_lvis(str(gt_path), str(tmp_path / "dict.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(EvalInputError, match="not valid JSON"):
        evaluate_lvis(gt_path, tmp_path / "broken.json")


def test_segm_detections_need_masks():
    with pytest.raises(EvalInputError, match=r"detections\[0\].*missing 'segmentation'"):
        evaluate_lvis(tiny_gt(), tiny_dets(), "segm")
    gt = make_lvis_gt(4, 5, seed=3)
    dets = make_detections(gt, seed=3, with_masks=True)
    dets[1]["segmentation"] = {"size": [1, 1], "counts": dets[1]["segmentation"]["counts"]}
    with pytest.raises(EvalInputError, match=r"detections\[1\].*segmentation size \[1, 1\]"):
        evaluate_lvis(gt, dets, "segm")


def test_bad_ground_truth():
    gt = tiny_gt()
    gt["categories"][1]["frequency"] = "x"
    with pytest.raises(EvalInputError, match=r"categories\[1\].*frequency"):
        evaluate_lvis(gt, tiny_dets())
    gt = tiny_gt()
    del gt["images"][0]["neg_category_ids"]
    with pytest.raises(EvalInputError, match=r"images\[0\].*neg_category_ids"):
        evaluate_lvis(gt, tiny_dets())


# ------------------------------------------------------------------------------------------
# Empty detections, GT ignore flags, COCO format


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_detections(datasets, iou_type):
    gt, _ = datasets["small"]
    ref = evaluate_lvis(gt, [], iou_type, fast=False)
    _assert_same(evaluate_lvis(gt, [], iou_type, fast=True), ref)
    _assert_same(evaluate_lvis(gt, [], iou_type, "fixed", fast=True), ref)
    # nothing detected: 0 wherever there is ground truth
    assert all(ref[k] == 0 for k in ("AP", "AP50", "APr", "APc", "APf", "AR"))
    assert evaluate_lvis(tiny_gt(), [])["APm"] == -1  # no medium-sized ground truth at all


def test_zero_area_ground_truth_is_dropped_like_lvis_api():
    # LVIS.get_ann_ids keeps 0 < area < inf only: such an annotation neither counts as a positive
    # nor verifies its class for the image (faster-coco-eval alone would keep it).
    gt = tiny_gt()
    gt["annotations"].append({**_box_ann(5, 2, 1, (0, 0, 10, 10)), "area": 0})
    ref = evaluate_lvis(gt, tiny_dets(), fast=False)
    _assert_same(evaluate_lvis(gt, tiny_dets(), fast=True), ref)
    assert ref == pytest.approx(tiny_expected(), abs=1e-9)


def test_gt_ignore_flag_falls_back_to_reference():
    gt = tiny_gt()
    gt["annotations"][1]["ignore"] = 1
    with pytest.warns(UserWarning, match="ignore"):
        fast = evaluate_lvis(gt, tiny_dets(), fast=True)
    assert fast == evaluate_lvis(gt, tiny_dets(), fast=False)
    assert fast["APf"] != tiny_expected()["APf"]


def _pycocotools_direct(gt, dets, iou_type):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_format_uses_pycocotools(datasets, iou_type):
    gt, dets = datasets["small"]
    coco_gt = to_coco_format(gt)
    coco_gt["annotations"][0]["iscrowd"] = 1  # COCO semantics, unlike LVIS: a crowd region
    got = evaluate_lvis(coco_gt, dets, iou_type)
    assert list(got) == list(COCO_METRICS)
    stats = _pycocotools_direct(coco_gt, dets, iou_type)
    expected = dict(zip(COCO_METRICS, list(stats[0:6]) + list(stats[8:12])))
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got["AP"] < 1
    with pytest.raises(ValueError, match="fixed"):
        evaluate_lvis(coco_gt, dets, iou_type, "fixed")
    empty = evaluate_lvis(coco_gt, [], iou_type)
    assert empty["AP"] == 0 and empty["AR"] == 0


# ------------------------------------------------------------------------------------------
# CLI


def _load_cli():
    return load_tool("eval_lvis")


def test_cli_files_mode(datasets, tmp_path, capsys):
    gt, dets = datasets["small"]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "out" / "metrics.json"
    cli = _load_cli()
    rc = cli.main(["--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json"), "--iou-type", "both",
                   "--protocol", "both", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "APr" in printed and "segm" in printed and "fixed" in printed
    report = json.loads(out.read_text())
    assert [(r["iou_type"], r["protocol"]) for r in report["runs"]] == [
        ("bbox", "standard"), ("bbox", "fixed"), ("segm", "standard"), ("segm", "fixed")]
    for run in report["runs"]:
        expected = evaluate_lvis(gt, dets, run["iou_type"], run["protocol"])
        assert run["metrics"] == pytest.approx(expected, abs=1e-12)
    # a bad file is reported, not a traceback
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a list"}))
    assert cli.main(["--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "bad.json")]) == 2
    assert "JSON list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--gt", str(tmp_path / "gt.json")])  # file mode needs both files
    with pytest.raises(SystemExit):  # file-mode options are refused in sweep mode, not ignored
        cli.main(["--config", "c.yaml", "--checkpoint", "ckpt", "--protocol", "fixed"])
    assert "apply to file mode only" in capsys.readouterr().err


def test_generator_is_seeded_and_well_formed():
    a, b = make_lvis_gt(6, 10, seed=5), make_lvis_gt(6, 10, seed=5)
    assert a == b and a != make_lvis_gt(6, 10, seed=6)
    assert make_detections(a, seed=1, with_masks=True) == make_detections(b, seed=1, with_masks=True)
    for cat in a["categories"]:
        assert cat["frequency"] in "rcf"
        assert cat["instance_count"] == sum(x["category_id"] == cat["id"] for x in a["annotations"])
    for ann in a["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 < ann["area"] <= w * h + 2 * (w + h) + 4 and math.isfinite(ann["area"])
    lvis_eval.validate_gt(a, "lvis", "segm")
