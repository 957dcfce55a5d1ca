"""One reading of the ground truth for training data, tools/evaluate.py and tools/eval_lvis.py:
zero-based ids renumbered alike for ground truth and detections, skipped boxes not scored, wrong
areas recomputed, COCO ground truth under the COCO protocol, dense scenes and cut detections
reported, zero-area predictions dropped and counted, clear CLI errors. All on generated data;
the detection task's side is in tests/test_detection_task.py."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from conftest import load_tool

from navit_dense.data.coco_json import load_instances
from navit_dense.data.decode import BadInputWarning
from navit_dense.data.synthetic.lvis_random import make_detections, make_lvis_gt, to_coco_format
from navit_dense.evaluation.evaluators import LvisEvaluator
from navit_dense.evaluation.lvis_eval import COCO_METRICS, LVIS_METRICS, EvalInputError, evaluate_lvis, recall_caps

logging.getLogger("lvis").setLevel(logging.ERROR)  # lvis-api warns on every in-memory result list
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def lvis():
    gt = make_lvis_gt(10, 12, seed=1)
    return gt, make_detections(gt, seed=2, with_masks=True)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _eval_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = load_tool("eval_lvis").main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def zero_based(gt: dict, dets: list[dict] = ()) -> tuple[dict, list[dict]]:
    """An annotation tool's export counting every id family from 0, and detections in its ids
    (also used by tests/test_data_robustness.py and tests/test_detection_task.py)."""
    gt = copy.deepcopy(gt)
    images = {im["id"]: i for i, im in enumerate(gt["images"])}
    cats = {c["id"]: i for i, c in enumerate(gt["categories"])}
    for im in gt["images"]:
        im["id"] = images[im["id"]]
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in im:
                im[key] = [cats[c] for c in im[key]]
    for c in gt["categories"]:
        c["id"] = cats[c["id"]]
    for i, a in enumerate(gt["annotations"]):
        a.update(id=i, image_id=images[a["image_id"]], category_id=cats[a["category_id"]])
    return gt, [{**d, "image_id": images[d["image_id"]], "category_id": cats[d["category_id"]]} for d in dets]


# ---- finding 1: zero-based ids ---------------------------------------------------------------------


@pytest.mark.parametrize("coco", [False, True])
def test_zero_based_export_is_renumbered_alike_for_ground_truth_and_detections(lvis, tmp_path, capsys, coco):
    gt, dets = lvis
    if coco:
        gt = to_coco_format(gt)
    expected = evaluate_lvis(gt, dets)
    zgt, zdets = zero_based(gt, dets)
    gt_path, dets_path = _write(tmp_path / "gt.json", zgt), _write(tmp_path / "dets.json", zdets)
    with pytest.warns(BadInputWarning) as caught:
        reading = load_instances(gt_path)
    assert len(caught) == 1 and "ids start at 0: shifted by +1" in str(caught[0].message)  # one warning for all
    assert reading.id_offsets == {"image": 1, "category": 1, "annotation": 1}
    assert reading.counts["fixed"] == {"shifted_image_ids": 10, "shifted_category_ids": 12, "shifted_annotation_ids": len(gt["annotations"])}
    with pytest.raises(EvalInputError, match="'id' must be a positive integer"):  # what the evaluators need
        evaluate_lvis(zgt, zdets)
    with pytest.warns(BadInputWarning):
        assert evaluate_lvis(gt_path, dets_path) == expected
        rc, _, err = _eval_cli(capsys, "--gt", gt_path, "--dets", dets_path, "--json", tmp_path / "r.json")
    assert rc == 0 and "ids shifted" in err and str(dets_path) in err
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["metrics"] == expected


def test_evaluator_validates_its_ground_truth_when_built(lvis):
    gt, _ = lvis
    ids = [c["id"] for c in gt["categories"]]
    LvisEvaluator(gt, ids)
    bad = copy.deepcopy(gt)
    bad["annotations"][0]["id"] = 0
    with pytest.raises(EvalInputError, match=r"data.val_json v.json: annotations\[0\].*'id' must be a positive integer"):
        LvisEvaluator(bad, ids, source="data.val_json v.json")
    bad = copy.deepcopy(gt)
    bad["categories"][2]["frequency"] = None  # what the reading leaves of a bad LVIS frequency
    with pytest.raises(EvalInputError, match=r"v.json: categories\[2\].*frequency must be one of"):
        LvisEvaluator(bad, ids, source="v.json")
    with pytest.raises(EvalInputError, match=r"v.json: has no categories with the model's ids \[100000\]"):
        LvisEvaluator(gt, [*ids, 100000], source="v.json")


# ---- finding 4: what the training data skips is not scored -----------------------------------------


def test_box_skipped_by_the_training_reading_is_not_scored(lvis, tmp_path, capsys):
    gt, dets = lvis
    bad = copy.deepcopy(gt)
    bad["annotations"][3]["bbox"][2] *= -1  # negative width: the training reading skips it
    removed = copy.deepcopy(gt)
    del removed["annotations"][3]
    expected = evaluate_lvis(removed, dets)
    assert evaluate_lvis(bad, dets) != expected  # scoring the raw file would change the number
    path = _write(tmp_path / "gt.json", bad)
    with pytest.warns(BadInputWarning, match="nonpositive_box"):
        reading = load_instances(path)
        assert evaluate_lvis(path, dets) == expected
        rc, _, err = _eval_cli(capsys, "--gt", path, "--dets", _write(tmp_path / "d.json", dets), "--json", tmp_path / "r.json")
    assert bad["annotations"][3]["id"] not in {a.id for im in reading.images for a in im.annotations}
    assert rc == 0 and "1 nonpositive_box" in err and str(path) in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ground_truth"]["skipped"] == {"nonpositive_box": 1} and report["runs"][0]["metrics"] == expected


def test_segmentation_dropped_by_the_reading_leaves_segm_only(lvis, tmp_path):
    gt, dets = lvis
    bad = copy.deepcopy(gt)
    bad["annotations"][5]["segmentation"] = [[1, 2, 3, 4]]  # dropped by the reading, the box kept
    no_mask = copy.deepcopy(gt)
    del no_mask["annotations"][5]
    path = _write(tmp_path / "gt.json", bad)
    with pytest.warns(BadInputWarning, match="bad_segmentation"):
        assert evaluate_lvis(path, dets, "segm") == evaluate_lvis(no_mask, dets, "segm")
        assert evaluate_lvis(path, dets, "bbox") == evaluate_lvis(gt, dets, "bbox")


# ---- finding 6: areas ------------------------------------------------------------------------------


def test_wrong_area_is_recomputed_and_counted(lvis, tmp_path, capsys):
    gt, dets = lvis
    bad = copy.deepcopy(gt)
    for a in bad["annotations"]:
        a["area"] = 1e7  # every object "large"
    expected = evaluate_lvis(gt, dets)
    assert evaluate_lvis(bad, dets)["APs"] == -1  # taken as given, the size split is meaningless
    path = _write(tmp_path / "gt.json", bad)
    with pytest.warns(BadInputWarning, match="inconsistent_area"):
        reading = load_instances(path)
        assert evaluate_lvis(path, dets) == expected
        rc, _, err = _eval_cli(capsys, "--gt", path, "--dets", _write(tmp_path / "d.json", dets))
    # The generator's areas are the masks' pixel counts: recomputed exactly.
    assert [a.area for im in reading.images for a in im.annotations] == [a["area"] for a in gt["annotations"]]
    assert reading.counts["fixed"] == {"inconsistent_area": len(gt["annotations"])}
    assert rc == 0 and f"{len(gt['annotations'])} inconsistent_area" in err


# ---- finding 2: COCO ground truth, COCO protocol ---------------------------------------------------


def test_coco_ground_truth_is_read_at_its_detection_cap(lvis):
    gt, dets = lvis
    coco = to_coco_format(gt)
    at_100 = evaluate_lvis(coco, dets)
    at_300 = evaluate_lvis(coco, dets, max_dets=300)  # pycocotools' summarize() gives -1 here
    assert at_300 == at_100 and at_100["AP"] > 0  # < 100 detections per (image, category) here: the cap cuts nothing
    evaluator = LvisEvaluator(coco, [c["id"] for c in coco["categories"]], topk=300)
    assert (evaluator.format, evaluator.topk, evaluator.max_dets, evaluator.metric_names) == ("coco", 100, 100, COCO_METRICS)
    evaluator.results, evaluator.image_ids = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets], {1}
    metrics = evaluator.metrics()
    assert {k: metrics[k] for k in COCO_METRICS} == at_100 and "APr" not in metrics
    assert LvisEvaluator(gt, [c["id"] for c in gt["categories"]], topk=300).metric_names == LVIS_METRICS


# ---- finding 5: dense scenes -----------------------------------------------------------------------


def _dense_gt(num_objects: int) -> tuple[dict, list[dict]]:
    """One 480x480 image holding num_objects 10x10 boxes of one class, and perfect detections."""
    boxes = [[20.0 * (k % 24), 20.0 * (k // 24), 10.0, 10.0] for k in range(num_objects)]
    gt = {"images": [{"id": 1, "width": 480, "height": 480, "file_name": "dense.jpg", "neg_category_ids": [], "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "dot", "frequency": "f"}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 100.0} for k, b in enumerate(boxes)]}  # fmt: skip
    dets = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - k / 1000} for k, b in enumerate(boxes)]
    return gt, dets


def test_dense_image_recall_cap_and_cut_detections_are_reported(tmp_path, capsys):
    gt, dets = _dense_gt(574)
    caps = recall_caps(gt, dets)
    assert caps == {"cap": 300, "per": "image", "gt_groups_over_cap": 1, "max_gt_per_group": 574, "groups_cut": 1, "detections_cut": 274}
    assert evaluate_lvis(gt, dets)["AP"] < 0.6  # perfect detections, cut to 300
    gt_path, dets_path = _write(tmp_path / "gt.json", gt), _write(tmp_path / "d.json", dets)
    rc, _, err = _eval_cli(capsys, "--gt", gt_path, "--dets", dets_path, "--json", tmp_path / "r.json")
    assert rc == 0 and "recall is capped: 1 image(s) hold more ground-truth objects than the 300 detections kept per image" in err
    assert "up to 574" in err and "detections were cut: 274" in err
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["recall_caps"] == caps
    rc, _, err = _eval_cli(capsys, "--gt", gt_path, "--dets", dets_path, "--max-dets", "600", "--json", tmp_path / "r.json")
    assert rc == 0 and "recall is capped" not in err and "cut" not in err
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["metrics"]["AP"] == pytest.approx(1.0)
    # COCO: pycocotools caps per image and category; Fixed AP per category.
    assert recall_caps(to_coco_format(gt), dets)["per"] == "image and category"
    assert recall_caps(gt, dets, "fixed", dets_per_cat=500)["detections_cut"] == 74


# ---- zero-area predicted boxes ---------------------------------------------------------------------


def test_zero_area_predictions_are_dropped_as_lvis_api_does_and_counted(lvis, tmp_path, capsys):
    gt, dets = lvis
    dets = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets]
    flat = copy.deepcopy(dets)
    for d in flat[::7]:
        d["bbox"][2 + (d["score"] > 0.5)] = 0.0  # a box clipped to nothing at the border
    kept = [d for d in flat if d["bbox"][2] * d["bbox"][3] > 0]
    reference = evaluate_lvis(gt, flat, fast=False)  # lvis-api itself
    assert evaluate_lvis(gt, flat) == pytest.approx(reference, abs=1e-9) == evaluate_lvis(gt, kept, fast=False)
    coco = to_coco_format(gt)
    assert evaluate_lvis(coco, flat) == evaluate_lvis(coco, kept)  # not scored as false positives
    evaluator = LvisEvaluator(gt, [c["id"] for c in gt["categories"]])
    evaluator.results, evaluator.image_ids = flat, {1}
    metrics = evaluator.metrics()
    assert metrics["zero_area_detections"] == len(flat) - len(kept) > 0 and metrics["AP"] == pytest.approx(reference["AP"], abs=1e-9)
    rc, _, err = _eval_cli(capsys, "--gt", _write(tmp_path / "gt.json", gt), "--dets", _write(tmp_path / "d.json", flat))
    assert rc == 0 and f"{len(flat) - len(kept)} detection(s) with a zero-area box dropped" in err


# ---- tools/eval_lvis.py messages -------------------------------------------------------------------


def test_cli_input_errors_name_the_file_or_flag(lvis, tmp_path, capsys):
    gt, dets = lvis
    gt_path, dets_path = _write(tmp_path / "gt.json", gt), _write(tmp_path / "d.json", dets)
    (tmp_path / "latin1.json").write_bytes('[{"name": "caf\u00e9"}]'.encode("latin-1"))
    cases = {
        "non-UTF-8": (["--dets", tmp_path / "latin1.json"], f"{tmp_path / 'latin1.json'}' is not UTF-8 text"),
        "directory": (["--dets", tmp_path], f"'{tmp_path}' is a directory (expected a JSON file)"),
        "missing detections": (["--dets", tmp_path / "nope.json"], f"'{tmp_path / 'nope.json'}' does not exist"),
        "max-dets 0": (["--dets", dets_path, "--max-dets", "0"], "--max-dets must be a positive integer, got 0"),
        "dets-per-cat 0": (["--dets", dets_path, "--protocol", "fixed", "--dets-per-cat", "0"], "--dets-per-cat must be a positive integer"),
    }
    for name, (argv, message) in cases.items():
        rc, _, err = _eval_cli(capsys, "--gt", gt_path, *argv)
        assert rc == 2 and message in err, (name, err)
    rc, _, err = _eval_cli(capsys, "--gt", tmp_path / "no_gt.json", "--dets", dets_path)
    assert rc == 2 and f"{tmp_path / 'no_gt.json'}: annotation file does not exist" in err
