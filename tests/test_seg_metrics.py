"""SegMetric against the real mmsegmentation 1.2.2 IoUMetric (mmseg is a required test
dependency: tools/install_mmseg.sh installs it). Results must be identical: the rounded
summary and per-class numbers bit for bit, the unrounded ones too (same float32 arithmetic)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
import torch
from mmcv.transforms import LoadImageFromFile
from mmengine.logging import MMLogger
from mmseg.datasets import BaseSegDataset
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.evaluation import IoUMetric

from navit_dense.data.seg_dataset import ADE20KDataset
from navit_dense.evaluation.seg_metrics import SegMetric



@pytest.fixture(autouse=True, scope="module")
def _quiet_mmseg_logger():
    # IoUMetric prints a per-class table through the current MMLogger on every evaluate().
    MMLogger.get_instance("navit_dense_tests", log_level="WARNING")
    logging.getLogger("navit_dense_tests").setLevel(logging.WARNING)
    yield


def mmseg_eval(pairs, num_classes, ignore_index=255, nan_to_num=None):
    """mmseg's numbers for [(pred, label)]: the compute_metrics() summary and the per-class
    table values (its printed table: np.round(x * 100, 2)), plus the unrounded ones."""
    metric = IoUMetric(ignore_index=ignore_index, iou_metrics=["mIoU"], nan_to_num=nan_to_num)
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(num_classes)]}
    for pred, label in pairs:  # one sample per batch, as a data_samples list like the model's
        sample = {
            "pred_sem_seg": {"data": torch.as_tensor(pred)[None]},
            "gt_sem_seg": {"data": torch.as_tensor(label)[None]},
        }
        metric.process({}, [sample])
    areas = [sum(r) for r in zip(*metric.results)]
    per_class = IoUMetric.total_area_to_metrics(*areas, ["mIoU"], nan_to_num)
    summary = metric.evaluate(size=len(pairs))
    return summary, per_class


def assert_same(ours: dict, summary: dict, per_class: dict):
    assert set(summary) == {"aAcc", "mIoU", "mAcc"}
    for key in ("aAcc", "mIoU", "mAcc"):
        np.testing.assert_array_equal(np.float32(ours[key]), summary[key], err_msg=key)  # NaN == NaN here
    for key in ("IoU", "Acc"):
        np.testing.assert_array_equal(np.asarray(ours[key], np.float32), np.round(per_class[key] * 100, 2), err_msg=key)


def run_both(pairs, num_classes, ignore_index=255, nan_to_num=None):
    ours = SegMetric(num_classes, ignore_index=ignore_index, nan_to_num=nan_to_num)
    for pred, label in pairs:
        ours.update(pred, label)
    summary, per_class = mmseg_eval(pairs, num_classes, ignore_index, nan_to_num)
    assert_same(ours.compute(), summary, per_class)
    # unrounded: same float32 operations, so equal too
    raw = ours.compute(digits=None)
    for key in ("IoU", "Acc"):
        np.testing.assert_array_equal(np.asarray(raw[key], np.float32), per_class[key] * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN
        for key, name in (("mIoU", "IoU"), ("mAcc", "Acc"), ("aAcc", "aAcc")):
            np.testing.assert_array_equal(np.float32(raw[key]), np.nanmean(per_class[name]) * 100, err_msg=key)
    return ours.compute(), summary


def random_pairs(rng, n, num_classes, *, ignore_frac=0.1, ignore_index=255, gt_classes=None, pred_classes=None, acc=0.6):
    """n random (pred, label) int64 maps of random sizes; preds agree with labels ~acc of the time."""
    gt_classes = np.arange(num_classes) if gt_classes is None else np.asarray(gt_classes)
    pred_classes = np.arange(num_classes) if pred_classes is None else np.asarray(pred_classes)
    pairs = []
    for _ in range(n):
        h, w = rng.integers(5, 60, 2)
        label = rng.choice(gt_classes, (h, w))
        pred = np.where(rng.random((h, w)) < acc, label, rng.choice(pred_classes, (h, w)))
        pred = np.where(np.isin(pred, pred_classes), pred, rng.choice(pred_classes, (h, w)))
        label = np.where(rng.random((h, w)) < ignore_frac, ignore_index, label)
        pairs.append((torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(label.astype(np.int64))))
    return pairs


@pytest.mark.parametrize("seed", range(12))
def test_random_predictions_with_ignore(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 20))
    pairs = random_pairs(rng, int(rng.integers(1, 6)), num_classes, ignore_frac=rng.uniform(0, 0.5), acc=rng.uniform(0, 1))
    run_both(pairs, num_classes)


def test_absent_classes_nan_and_zero():
    rng = np.random.default_rng(1)
    # GT uses {0, 1, 2}; predictions also hit 5 (IoU 0, Acc NaN); 3, 4, 6 appear nowhere (both NaN).
    pairs = random_pairs(rng, 4, 7, gt_classes=[0, 1, 2], pred_classes=[0, 1, 2, 5])
    ours, summary = run_both(pairs, 7)
    assert ours["IoU"][5] == 0.0 and np.isnan(ours["Acc"][5])
    assert all(np.isnan(ours["IoU"][c]) and np.isnan(ours["Acc"][c]) for c in (3, 4, 6))
    assert ours["mIoU"] == pytest.approx(np.mean([ours["IoU"][c] for c in (0, 1, 2, 5)]), abs=0.01)
    # nan_to_num, as mmseg's option, puts those classes into the means
    ours0, _ = run_both(pairs, 7, nan_to_num=0)
    assert ours0["mIoU"] < ours["mIoU"] and not np.isnan(ours0["IoU"]).any()


def test_out_of_range_values_follow_mmseg():
    rng = np.random.default_rng(2)
    pairs = random_pairs(rng, 3, 5)
    pred, label = pairs[0]
    pred[0, :4] = torch.tensor([-1, 5, 200, 255])  # predictions that are no class
    label[1, :3] = torch.tensor([5, 77, 254])  # labels that are no class and not ignore_index
    run_both(pairs, 5)


def test_custom_ignore_index_and_dtypes():
    rng = np.random.default_rng(3)
    pairs = random_pairs(rng, 3, 4, ignore_index=-1, ignore_frac=0.3)
    run_both(pairs, 4, ignore_index=-1)
    # uint8 maps with 255 = ignore and numpy inputs give the same as int64 tensors
    pairs = random_pairs(rng, 3, 6)
    ours = SegMetric(6)
    for pred, label in pairs:
        ours.update(pred.numpy().astype(np.uint8), label.numpy().astype(np.uint8))
    summary, per_class = mmseg_eval(pairs, 6)
    assert_same(ours.compute(), summary, per_class)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # mmseg's nanmean of all-NaN
def test_degenerate_cases():
    label = torch.randint(0, 3, (9, 7))
    run_both([(label.clone(), label)], 3)  # perfect: 100.0
    assert SegMetric(3).compute()["num_pixels"] == 0
    all_ignored = torch.full((4, 4), 255)
    run_both([(torch.zeros(4, 4, dtype=torch.long), all_ignored)], 3)  # NaN everywhere, as mmseg
    run_both([(torch.zeros(4, 4, dtype=torch.long), all_ignored), (label.clone(), label)], 3)


def test_float32_rounding_is_bit_identical():
    # IoU = 23 / 160 = 14.375 %, a rounding tie: mmseg's float32 arithmetic gives 14.38,
    # float64 would give 14.37. We must reproduce mmseg's digit.
    label = torch.zeros(16, 10, dtype=torch.long)
    pred = torch.ones_like(label)
    pred.view(-1)[:23] = 0
    ours, summary = run_both([(pred, label)], 2)
    assert ours["IoU"][0] == 14.38 and ours["Acc"][0] == 14.38


def test_streaming_merge_and_batch_update():
    rng = np.random.default_rng(4)
    pairs = random_pairs(rng, 6, 9)
    whole = SegMetric(9)
    for p, l in pairs:
        whole.update(p, l)
    a, b = SegMetric(9), SegMetric(9)
    for i, (p, l) in enumerate(pairs):
        (a if i % 2 else b).update(p, l)
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    same = [(torch.randint(0, 9, (8, 8)), torch.randint(0, 9, (8, 8))) for _ in range(3)]
    batched, single = SegMetric(9), SegMetric(9)
    batched.update(torch.stack([p for p, _ in same]), torch.stack([l for _, l in same]))
    for p, l in same:
        single.update(p, l)
    assert torch.equal(batched.confusion, single.confusion)
    single.reset()
    assert single.confusion.sum() == 0
    with pytest.raises(ValueError, match="shape"):
        single.update(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        single.update(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long))
    named = SegMetric(2, class_names=["a", "b"])
    named.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert named.compute()["per_class"]["a"] == {"IoU": 50.0, "Acc": 50.0}


def test_reduce_zero_label_dataset_end_to_end(tmp_path):
    """ADE-format data with reduce_zero_label: our dataset reads the same labels (and image
    sizes) as mmseg's loading pipeline, and our metric on them equals IoUMetric."""
    meta = load_tool("make_synthetic_seg").make_synthetic_seg(tmp_path, seed=5, n_train=1, n_val=5)

    ours = ADE20KDataset(tmp_path, "validation")
    theirs = BaseSegDataset(
        data_root=str(tmp_path),
        data_prefix={"img_path": "images/validation", "seg_map_path": "annotations/validation"},
        img_suffix=".jpg",
        seg_map_suffix=".png",
        reduce_zero_label=True,
        metainfo={"classes": tuple(meta["classes"]), "palette": meta["palette"]},
        pipeline=[LoadImageFromFile(), LoadAnnotations()],
    )
    assert len(theirs) == len(ours) == 5
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(len(ours)):
        item, ref = ours[i], theirs[i]
        assert Path(ref["img_path"]).name == Path(item["path"]).name
        np.testing.assert_array_equal(item["label"].numpy(), ref["gt_seg_map"].astype(np.int64))
        img_rgb = torch.from_numpy(ref["img"][..., ::-1].copy()).permute(2, 0, 1).float() / 255
        assert img_rgb.shape == item["image"].shape
        assert (img_rgb - item["image"]).abs().mean() < 2 / 255  # cv2 vs Pillow JPEG decoders
        label = item["label"]
        pred = torch.where(torch.from_numpy(rng.random(label.shape) < 0.7), label.clamp(max=7),
                           torch.from_numpy(rng.integers(0, 8, label.shape)))
        pairs.append((pred, label))
    assert any((l == 255).any() for _, l in pairs)  # the generator's unlabelled blobs (file value 0)
    run_both(pairs, len(meta["classes"]))
