"""Streaming semantic-segmentation metrics (aAcc, mIoU, mAcc) that reproduce mmsegmentation's
``IoUMetric`` (mmseg 1.2.2, ``mmseg/evaluation/metrics/iou_metric.py``) number for number.

Usage::

    metric = SegMetric(num_classes=150)
    for pred, label in ...:            # [H, W] integer maps (any equal shapes work)
        metric.update(pred, label)
    metric.compute()  # {"aAcc": 81.23, "mIoU": 44.1, "mAcc": 55.0, "IoU": [...], "Acc": [...], ...}

State is one ``(C+1) x (C+1)`` int64 confusion matrix (rows = ground truth, columns =
prediction), filled with one ``torch.bincount`` per update; it merges across processes by
addition (:meth:`SegMetric.merge`). Definitions, all as in mmseg:

- Pixels whose label equals ``ignore_index`` are dropped before anything is counted.
- ``area_intersect[c]`` = pixels with pred == label == c; ``area_label[c]`` = GT pixels of c;
  ``area_pred[c]`` = predicted pixels of c; ``area_union = area_pred + area_label - area_intersect``.
- Values outside ``[0, C-1]`` (a prediction, or a non-ignore label) fall outside mmseg's
  ``torch.histc`` bins: they count for no class. Such a GT pixel still counts as a false
  positive for the class predicted there, and such a prediction as a miss for the GT class.
  Row/column ``C`` of the confusion matrix holds exactly these pixels.
- ``aAcc = sum(area_intersect) / sum(area_label)``  (pixel accuracy over non-ignored pixels
  whose label is a valid class).
- ``IoU[c] = area_intersect / area_union``: NaN when class c is absent from both GT and
  prediction (0/0); 0 when it is predicted but absent from GT.
- ``Acc[c] = area_intersect / area_label``: NaN whenever class c is absent from GT, even if it
  was predicted (so false positives of GT-absent classes lower mIoU but not mAcc).
- ``nan_to_num`` (default None, as mmseg) replaces those NaNs before averaging.
- ``mIoU = nanmean(IoU)``, ``mAcc = nanmean(Acc)``: NaN classes are left out of the mean.
- Reported values are percentages (x100) rounded to 2 decimals (``np.round(x * 100, 2)``),
  the summary AFTER the mean (mean of unrounded values, then x100, then round), per-class
  values each rounded. ``compute(digits=None)`` skips the rounding. Values are Python floats
  (``np.float32(value)`` equals mmseg's np.float32 result bit for bit).

Arithmetic: mmseg accumulates histograms in float32 and divides in float32. We keep exact
int64 counts, then convert them to float32 and apply the same torch / numpy operations in the
same order, so results are bit-identical to mmseg whenever every count is below 2**24
(16.7 M pixels per class; float32 holds such integers exactly). Beyond that mmseg's own
float32 running sums start rounding (ADE20K val has ~0.7 G pixels); ours stay exact, so the
two may then differ in the last float32 digits (relative ~1e-7 per rounding step), which after
rounding to 2 decimals can at most flip the last digit.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["SegMetric"]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype} (argmax the logits first)")
    return x.detach()


class SegMetric:
    """Confusion-matrix aAcc / mIoU / mAcc, identical to mmseg's ``IoUMetric`` (see module doc).

    Args:
        num_classes: number of classes C; valid class ids are ``0 .. C-1``.
        ignore_index: label value excluded from evaluation (mmseg default 255).
        nan_to_num: if not None, per-class NaNs (classes absent from GT / from GT and pred) are
            replaced by this value before averaging, as mmseg's ``nan_to_num``.
        class_names: optional names, used as keys of ``compute()["per_class"]``.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        nan_to_num: float | None = None,
        class_names: Sequence[str] | None = None,
    ):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.nan_to_num = nan_to_num
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={self.num_classes}")
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        k = self.num_classes + 1
        self.confusion = torch.zeros(k, k, dtype=torch.int64)  # [gt, pred]; index C = out of range
        self.num_updates = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add one prediction / ground-truth pair (integer maps of equal shape, e.g. [H, W];
        a batch [N, H, W] is the same as N updates)."""
        pred = _as_tensor(pred, "pred")
        label = _as_tensor(label, "label")
        if pred.shape != label.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        c = self.num_classes
        pred = pred.reshape(-1).to(device="cpu", dtype=torch.int64)
        label = label.reshape(-1).to(device="cpu", dtype=torch.int64)
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        # Everything outside 0..C-1 goes to the extra bin C (no class), as torch.histc drops it.
        pred = torch.where((pred >= 0) & (pred < c), pred, c)
        label = torch.where((label >= 0) & (label < c), label, c)
        self.confusion += torch.bincount(label * (c + 1) + pred, minlength=(c + 1) ** 2).view(c + 1, c + 1)
        self.num_updates += 1

    def merge(self, other: "SegMetric") -> "SegMetric":
        """Add another metric's counts (e.g. from another process or data shard)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge metrics with different num_classes / ignore_index")
        self.confusion += other.confusion
        self.num_updates += other.num_updates
        return self

    # ---- the areas mmseg's IoUMetric accumulates --------------------------------------------

    def areas(self) -> dict[str, torch.Tensor]:
        """Exact int64 ``area_intersect``, ``area_union``, ``area_pred_label``, ``area_label`` [C]."""
        c = self.num_classes
        cm = self.confusion
        intersect = torch.diagonal(cm)[:c].clone()
        area_pred = cm.sum(dim=0)[:c]
        area_label = cm.sum(dim=1)[:c]
        return {
            "area_intersect": intersect,
            "area_union": area_pred + area_label - intersect,
            "area_pred_label": area_pred,
            "area_label": area_label,
        }

    def compute(self, digits: int | None = 2) -> dict[str, Any]:
        """Metrics as mmseg reports them: percentages, rounded to ``digits`` decimals (None: not rounded).

        Returns a dict with floats ``aAcc``, ``mIoU``, ``mAcc`` (mmseg's ``compute_metrics``
        keys), lists ``IoU`` and ``Acc`` (per class, NaN where undefined, as in mmseg's
        per-class table), ``per_class`` ({name or index: {"IoU", "Acc"}}) and the int
        ``num_pixels`` (non-ignored pixels with a valid label).
        """
        a = self.areas()
        # float32 exactly as mmseg (torch.histc returns float32 histograms).
        inter, union = a["area_intersect"].float(), a["area_union"].float()
        label = a["area_label"].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 and nanmean of all-NaN
            per_class = {
                "aAcc": (inter.sum() / label.sum()).numpy(),
                "IoU": (inter / union).numpy(),
                "Acc": (inter / label).numpy(),
            }
            if self.nan_to_num is not None:
                per_class = {k: np.nan_to_num(v, nan=self.nan_to_num) for k, v in per_class.items()}
            summary = {k: np.nanmean(v) * 100 for k, v in per_class.items()}
            table = {k: per_class[k] * 100 for k in ("IoU", "Acc")}
        if digits is not None:
            summary = {k: np.round(v, digits) for k, v in summary.items()}
            table = {k: np.round(v, digits) for k, v in table.items()}
        # mmseg returns np.float32; we return Python floats. Rounded values are re-rounded in
        # float64 so they print as mmseg's do (57.14, not 57.13999938964844);
        # np.float32(ours) == mmseg's value exactly.
        def py(v: Any) -> float:
            return round(float(v), digits) if digits is not None else float(v)

        names = self.class_names if self.class_names is not None else list(range(self.num_classes))
        iou, acc = [py(v) for v in table["IoU"]], [py(v) for v in table["Acc"]]
        return {
            "aAcc": py(summary["aAcc"]),
            "mIoU": py(summary["IoU"]),
            "mAcc": py(summary["Acc"]),
            "IoU": iou,
            "Acc": acc,
            "per_class": {n: {"IoU": i, "Acc": ac} for n, i, ac in zip(names, iou, acc)},
            "num_pixels": int(a["area_label"].sum()),
        }

    def __repr__(self) -> str:
        return f"SegMetric(num_classes={self.num_classes}, ignore_index={self.ignore_index}, updates={self.num_updates})"
