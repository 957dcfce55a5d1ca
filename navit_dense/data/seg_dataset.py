"""Semantic-segmentation datasets at native resolution: ADE20K layout and generic folders.

Each item is ``{"image": float32 [3, H, W] in [0, 1], "label": int64 [H, W], "path": str,
"ann_path": str}`` at the file's own resolution (resizing to a token budget happens later,
in packing). Images are decoded by :func:`navit_dense.data.decode.load_image` (EXIF
orientation applied, transparency composited, see that module).

Label maps follow mmsegmentation 1.2.2 (``LoadAnnotations`` + ``BaseSegDataset``):

- Files are single-channel class-index maps: mode ``L`` (8-bit), ``P`` (palette: the stored
  INDICES are the classes, the palette colours are ignored), ``I;16`` / ``I`` (16-bit), or
  ``1``. RGB(A) colour maps, and grey+alpha maps, are rejected with an error: convert colours
  to indices first.
- ``reduce_zero_label`` (ADE20K: 0 = "other", not a class): 0 -> 255, v -> v - 1, and 255 stays
  255, exactly as mmseg (``gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255``).
- ``ignore_index`` (255) marks pixels excluded from loss and metrics. With
  ``reduce_zero_label`` it must be 255 (mmseg hard-codes that value there).
- Pairing: images are listed recursively under ``img_dir`` by ``img_suffix`` and sorted; the
  label of ``img_dir/a/b.jpg`` is ``ann_dir/a/b.png`` (suffix swapped, as mmseg). Label maps
  without an image are ignored, as in mmseg.

Bad inputs raise :class:`SegDataError` (a :class:`~navit_dense.data.decode.DataError`, so a
``ValueError`` with ``source`` = the file and a ``reason`` key), naming the file:

- ``missing_annotation`` (at construction): an image has no label map. With a non-strict
  :class:`~navit_dense.data.decode.BadInputLog` passed as ``log`` the image is dropped with a
  warning instead, and counted.
- ``size_mismatch``: label map size differs from the image size.
- ``label_out_of_range``: label values (after ``reduce_zero_label``) outside ``0..C-1`` that
  are not ``ignore_index``; the message lists the raw file values.
- ``rgb_label`` / ``unsupported_label_mode``: not a single-channel index map.
- image decoding problems: :class:`~navit_dense.data.decode.ImageDecodeError` (same family).

Per-item checks run in ``__getitem__`` and always raise (a map-style DataLoader cannot skip
an item); run :meth:`SegFolderDataset.verify` once to find every bad file up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import BadInputLog, DataError, load_image

__all__ = ["ADE20KDataset", "SegDataError", "SegFolderDataset", "SegTaskDataset", "header_size", "load_label_map", "load_seg_meta", "reduce_zero_label"]

ADE20K_NUM_CLASSES = 150
META_FILE = "meta.json"


class SegDataError(DataError):
    """A bad segmentation sample. Reasons: missing_annotation, size_mismatch,
    label_out_of_range, rgb_label, unsupported_label_mode, unreadable_label."""


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduction: 0 -> 255, v -> v - 1 for 1..254, 255 -> 255 (int64 in, int64 out).
    Values above 255 (16-bit maps) also move down by one, as in mmseg."""
    out = label - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out


def load_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel class-index map as int64 [H, W] (palette PNGs: indices, not colours)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SegDataError(path, "missing_annotation", "label map does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "P", "1") or mode.startswith("I;16") or mode == "I":
                arr = np.asarray(im)  # mode P: the palette indices; I;16B is byte-swapped by numpy
            elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(im.convert("RGB"))
                hint = ""
                if arr.size and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
                    hint = " Its three channels are equal: it looks like a greyscale index map saved as RGB; re-save it as mode L."
                raise SegDataError(
                    path, "rgb_label",
                    f"label map is a {mode} colour image; expected a single-channel class-index map "
                    f"(8/16-bit greyscale or palette PNG). Convert colours to class indices with the dataset palette.{hint}",
                )
            else:  # LA, PA, F, ...
                raise SegDataError(
                    path, "unsupported_label_mode",
                    f"label map has mode {mode}; expected a single-channel class-index map (L, P, I;16 or 1)",
                )
    except DataError:
        raise
    except Exception as e:  # PIL raises many types on broken files
        raise SegDataError(path, "unreadable_label", f"cannot read label map: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise SegDataError(path, "unsupported_label_mode", f"label map has shape {arr.shape}; expected [H, W]")
    return arr.astype(np.int64)


def load_seg_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta.json`` beside a dataset (as written by tools/make_synthetic_seg.py), or None.
    A file that is not a JSON object is an error naming it, never silently ignored."""
    p = Path(root) / META_FILE
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e}); fix or delete it") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(meta).__name__}")
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{p}: 'classes' must be a list of names")
    return meta


def _list_images(img_dir: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = [p for p in img_dir.rglob("*") if p.is_file() and p.name.endswith(suffixes)]
    return sorted(files, key=lambda p: p.relative_to(img_dir).as_posix())


class SegFolderDataset(Dataset):
    """Images under ``img_dir`` paired with label maps under ``ann_dir`` (see module doc).

    Args:
        img_dir, ann_dir: folders; listed recursively.
        num_classes: C, valid class ids are ``0..C-1`` after ``reduce_zero_label``. Give this or
            ``classes``.
        classes: class names (sets ``num_classes``).
        img_suffix: image file ending(s), e.g. ``".jpg"`` or ``(".jpg", ".png")``.
        seg_map_suffix: label file ending that replaces the image's suffix.
        reduce_zero_label: mmseg's ADE20K convention (0 = ignore, classes start at 1 in the file).
        ignore_index: the ignore label value (255).
        transform: optional ``callable(item) -> item`` applied last.
        log: optional :class:`BadInputLog`; non-strict drops images without a label map (warns,
            counts); strict (or None) raises at construction.
        exif: apply EXIF orientation to images (mmseg's cv2 loader does too).
    """

    def __init__(
        self,
        img_dir: str | os.PathLike,
        ann_dir: str | os.PathLike,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        img_suffix: str | Sequence[str] = ".jpg",
        seg_map_suffix: str = ".png",
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        log: BadInputLog | None = None,
        exif: bool = True,
    ):
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        if classes is not None:
            if num_classes is not None and num_classes != len(classes):
                raise ValueError(f"num_classes={num_classes} but {len(classes)} class names")
            num_classes = len(classes)
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes (or classes) is required and must be >= 1, got {num_classes}")
        if reduce_zero_label and ignore_index != 255:
            raise ValueError("reduce_zero_label maps 0 to 255 (as mmseg), so ignore_index must be 255")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class id (num_classes={num_classes})")
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        self.img_suffixes = (img_suffix,) if isinstance(img_suffix, str) else tuple(img_suffix)
        self.seg_map_suffix = seg_map_suffix
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.transform = transform
        self.exif = exif

        for d, what in ((self.img_dir, "image"), (self.ann_dir, "annotation")):
            if not d.is_dir():
                raise FileNotFoundError(f"{what} folder does not exist: {d}")
        images = _list_images(self.img_dir, self.img_suffixes)
        if not images:
            raise FileNotFoundError(f"no images ending in {self.img_suffixes} under {self.img_dir}")
        self.samples: list[tuple[str, str]] = []
        for img in images:
            rel = img.relative_to(self.img_dir).as_posix()
            suffix = next(s for s in self.img_suffixes if rel.endswith(s))
            ann = self.ann_dir / (rel[: -len(suffix)] + seg_map_suffix)
            if not ann.is_file():
                err = SegDataError(str(img), "missing_annotation", f"no label map for this image (expected {ann})")
                if log is None:
                    raise err
                log.skip(err)  # strict: raises; non-strict: warns, counts, drops the image
                continue
            self.samples.append((str(img), str(ann)))
        if not self.samples:
            raise FileNotFoundError(f"no image under {self.img_dir} has a label map under {self.ann_dir}")

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The checked int64 [H, W] label of item ``index``; ``size`` (H, W) is the image's."""
        img_path, ann_path = self.samples[index]
        raw = load_label_map(ann_path)
        if size is not None and raw.shape != tuple(size):
            raise SegDataError(
                ann_path, "size_mismatch",
                f"label map is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {img_path} is {size[1]}x{size[0]}",
            )
        label = reduce_zero_label(raw) if self.reduce_zero_label else raw
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(map(str, values[:10].tolist())) + (", ..." if len(values) > 10 else "")
            if self.reduce_zero_label:
                valid = f"1..{self.num_classes} (0 and 255 = ignore; reduce_zero_label)"
            else:
                valid = f"0..{self.num_classes - 1} (or {self.ignore_index} = ignore)"
            raise SegDataError(
                ann_path, "label_out_of_range",
                f"{int(bad.sum())} pixels have label values {{{shown}}} outside the valid range {valid}",
            )
        return torch.from_numpy(label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, ann_path = self.samples[index]
        image = load_image(img_path, exif=self.exif)
        label = self.load_label(index, size=(image.shape[1], image.shape[2]))
        item = {"image": image, "label": label, "path": img_path, "ann_path": ann_path}
        return self.transform(item) if self.transform is not None else item

    def verify(self, log: BadInputLog | None = None) -> list[DataError]:
        """Decode and check every item once (no transform); return every error found, and pass
        each to ``log.skip`` if given (a strict log raises the first)."""
        errors: list[DataError] = []
        for i in range(len(self)):
            try:
                image = load_image(self.samples[i][0], exif=self.exif)
                self.load_label(i, size=(image.shape[1], image.shape[2]))
            except DataError as e:
                errors.append(e)
                if log is not None:
                    log.skip(e)
        return errors

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} items, img_dir={self.img_dir}, num_classes={self.num_classes}, "
            f"reduce_zero_label={self.reduce_zero_label})"
        )


class ADE20KDataset(SegFolderDataset):
    """ADE20K layout: ``root/images/{training,validation}/*.jpg`` and
    ``root/annotations/{training,validation}/*.png``, ``reduce_zero_label=True``.

    ``num_classes`` / ``classes`` / ``reduce_zero_label`` default to ``root/meta.json`` when
    present (as written by tools/make_synthetic_seg.py), else ADE20K's 150 and True. A value
    given here that contradicts meta.json is an error naming both: the labels would shift or
    the class count would not match the files.
    """

    SPLITS = ("training", "validation")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        reduce_zero_label: bool | None = None,
        **kwargs: Any,
    ):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        root = Path(root)
        meta = load_seg_meta(root) or {}
        where = root / META_FILE
        for key, given in (("reduce_zero_label", reduce_zero_label), ("num_classes", num_classes)):
            if given is not None and meta.get(key) is not None and meta[key] != given:
                raise ValueError(f"{key}={given} contradicts {where} ({key}: {meta[key]}); set it to {meta[key]} or fix the file")
        if classes is not None and meta.get("classes") is not None and list(classes) != meta["classes"]:
            raise ValueError(f"class names {list(classes)[:4]}... contradict {where} (classes: {meta['classes'][:4]}...)")
        if classes is None and meta.get("classes") is not None and num_classes in (None, len(meta["classes"])):
            classes = meta["classes"]
        if classes is None and num_classes is None:
            num_classes = meta.get("num_classes", ADE20K_NUM_CLASSES)
        if reduce_zero_label is None:
            reduce_zero_label = bool(meta.get("reduce_zero_label", True))
        kwargs.setdefault("img_suffix", ".jpg")
        kwargs.setdefault("seg_map_suffix", ".png")
        self.root, self.split, self.meta = root, split, meta
        super().__init__(
            root / "images" / split,
            root / "annotations" / split,
            num_classes=num_classes,
            classes=classes,
            reduce_zero_label=reduce_zero_label,
            **kwargs,
        )


# ---- the engine's view ---------------------------------------------------------------------
def header_size(path: str, exif: bool = True) -> tuple[int, int]:
    """(H, W) of an image file from its header only (no pixel decoding), after the EXIF
    orientation load_image applies. PNG's getexif() would decode the file to look for a late
    eXIf chunk, so the base Image.getexif (header info only) is used."""
    with Image.open(path) as im:
        w, h = im.size
        if exif:
            try:
                orientation = Image.Image.getexif(im).get(0x0112, 1)  # ExifTags.Base.Orientation
            except Exception:  # broken EXIF: load_image keeps the stored orientation too
                orientation = 1
            if orientation in (5, 6, 7, 8):  # transposing orientations swap the sides
                w, h = h, w
    return h, w


class SegTaskDataset:
    """A segmentation dataset as the engine wants it: ``image_size`` from file headers,
    augmented (train) and normalized samples ``{"image", "label", "index", "train",
    "budget_scale"}``. Bad inputs raise DataError: the engine skips (and counts) them in
    training and stops an evaluation, so metrics always cover the whole split.
    ``normalize=False``: hand the images in [0, 1] as decoded and augmented (packed as uint8
    patches, normalized by the model on the device with mean / std)."""

    def __init__(self, base: SegFolderDataset, mean: Sequence[float], std: Sequence[float], augment: Callable | None = None,
                 normalize: bool = True):  # fmt: skip
        self.base, self.augment, self.train, self.normalize = base, augment, augment is not None, normalize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.base)

    def image_file(self, index: int) -> str:
        """The item's image file (the engine names it in warnings and errors)."""
        return str(self.base.samples[index][0])

    def image_size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            img, ann = self.base.samples[index]
            try:
                self._sizes[index] = header_size(img, self.base.exif)
            except Exception:  # unreadable header: the label map has the same size by contract
                self._sizes[index] = header_size(ann, exif=False)
        return self._sizes[index]

    def __getitem__(self, index: int) -> dict | None:
        item = self.base[index]  # a bad input raises DataError: the engine skips it in training only
        item = {"image": item["image"], "label": item["label"], "index": index, "train": self.train, "budget_scale": 1.0}
        if self.augment is not None:  # global RNG: the engine seeds it per (seed, epoch, index)
            item = self.augment(item, np.random.default_rng(int(torch.randint(0, 2**62, ()))))
        if self.normalize:
            item["image"] = (item["image"] - self.mean) / self.std
        return item

    def unnormalized(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image in [0, 1], label) of an item as stored, for visualization."""
        item = self.base[index]
        return item["image"], item["label"]
