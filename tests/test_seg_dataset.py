"""Segmentation datasets (ADE20K layout, generic folders), the synthetic generator, bad inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
import torch
from PIL import Image

from navit_dense.data.decode import BadInputLog, BadInputWarning, DataError, ImageDecodeError
from navit_dense.data.seg_dataset import (
    ADE20KDataset,
    SegDataError,
    SegFolderDataset,
    load_label_map,
    reduce_zero_label,
)



@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    load_tool("make_synthetic_seg").make_synthetic_seg(out, seed=0, n_train=6, n_val=3)
    return out


def _write_pair(root: Path, name: str, image: np.ndarray, label: Image.Image | np.ndarray, split="training"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
    lab = label if isinstance(label, Image.Image) else Image.fromarray(label)
    lab.save(root / "annotations" / split / f"{name}.png")
    return root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png"


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- reduce_zero_label and label reading -------------------------------------------------------


def test_reduce_zero_label_matches_mmseg_uint8_recipe():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    # mmseg's LoadAnnotations, verbatim on uint8
    ref = raw.copy()
    ref[ref == 0] = 255
    ref = ref - 1
    ref[ref == 254] = 255
    ours = reduce_zero_label(raw.astype(np.int64))
    np.testing.assert_array_equal(ours, ref.astype(np.int64))
    assert ours[0, 0] == 255 and ours[0, 1] == 0 and ours[-1, -1] == 255 and ours.flat[150] == 149


def test_palette_png_reads_indices_not_colours(tmp_path):
    idx = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    im = Image.fromarray(idx)
    im.putpalette([200, 10, 10] * 256)  # every index the same colour: colours carry no class information
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(load_label_map(tmp_path / "p.png"), idx.astype(np.int64))


def test_16bit_label_map(tmp_path):
    idx = np.array([[0, 300], [1000, 7]], np.uint16)
    Image.fromarray(idx).save(tmp_path / "l16.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "l16.png"), idx.astype(np.int64))


# ---- the synthetic dataset through ADE20KDataset -------------------------------------------------


def test_synthetic_dataset_loads_at_native_resolution(synth):
    meta = json.loads((synth / "meta.json").read_text())
    assert meta["num_classes"] == 8 and len(meta["classes"]) == 8 and len(meta["palette"]) == 8
    ds = ADE20KDataset(synth, "training")
    assert len(ds) == 6 and ds.num_classes == 8 and ds.reduce_zero_label and ds.classes == meta["classes"]
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        img, lab = item["image"], item["label"]
        assert img.dtype == torch.float32 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
        assert lab.dtype == torch.int64 and lab.shape == img.shape[1:]
        assert [int(lab.shape[0]), int(lab.shape[1])] == meta["sizes_hw"]["training"][i]
        raw = np.asarray(Image.open(item["ann_path"]))
        np.testing.assert_array_equal(lab.numpy(), reduce_zero_label(raw.astype(np.int64)))
        vals = set(torch.unique(lab).tolist())
        assert vals <= set(range(8)) | {255}
        seen |= vals
        assert Path(item["path"]).name == Path(item["ann_path"]).with_suffix(".jpg").name
    assert len(seen - {255}) >= 4  # several classes present
    sizes = {tuple(s) for s in meta["sizes_hw"]["training"]}
    assert len(sizes) == 6 and all(96 <= s <= 320 for hw in sizes for s in hw)
    assert len(ADE20KDataset(synth, "validation")) == 3
    assert ADE20KDataset(synth, "training").verify() == []


def test_synthetic_generator_is_deterministic(tmp_path):
    gen = load_tool("make_synthetic_seg")
    gen.make_synthetic_seg(tmp_path / "a", seed=3, n_train=2, n_val=1, min_side=64, max_side=96)
    gen.make_synthetic_seg(tmp_path / "b", seed=3, n_train=3, n_val=1, min_side=64, max_side=96)
    for rel in ("images/training/synth_0001.jpg", "annotations/training/synth_0001.png", "annotations/validation/synth_0000.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_folder_dataset_without_reduce_zero_label(tmp_path):
    lab = np.array([[0, 1, 2, 255]] * 4, np.uint8)
    img_dir, ann_dir = tmp_path / "img" / "sub", tmp_path / "ann" / "sub"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    Image.fromarray(_rgb(4, 4)).save(img_dir / "x.png")
    Image.fromarray(lab).save(ann_dir / "x_gt.png")
    ds = SegFolderDataset(tmp_path / "img", tmp_path / "ann", num_classes=3, img_suffix=".png", seg_map_suffix="_gt.png")
    item = ds[0]
    np.testing.assert_array_equal(item["label"].numpy(), lab.astype(np.int64))  # 0 is a class here
    assert item["image"].shape == (3, 4, 4)
    ds2 = SegFolderDataset(tmp_path / "img", tmp_path / "ann", num_classes=3, img_suffix=".png",
                           seg_map_suffix="_gt.png", transform=lambda it: {**it, "extra": 1})
    assert ds2[0]["extra"] == 1


# ---- bad inputs ------------------------------------------------------------------------------


def test_size_mismatch_names_both_files(tmp_path):
    img, ann = _write_pair(tmp_path, "a", _rgb(40, 60), np.ones((40, 59), np.uint8))
    ds = ADE20KDataset(tmp_path, num_classes=5)
    with pytest.raises(SegDataError, match="59x40") as e:
        ds[0]
    assert e.value.reason == "size_mismatch" and e.value.source == str(ann) and str(img) in str(e.value)


def test_values_outside_class_range(tmp_path):
    lab = np.ones((20, 20), np.uint8)
    lab[0, :3] = [7, 9, 255]  # with reduce_zero_label and 5 classes, file values 1..5 are valid
    _, ann = _write_pair(tmp_path, "a", _rgb(20, 20), lab)
    with pytest.raises(SegDataError, match=r"2 pixels have label values \{7, 9\}") as e:
        ADE20KDataset(tmp_path, num_classes=5)[0]
    assert e.value.reason == "label_out_of_range" and str(ann) in str(e.value)
    assert "reduce_zero_label" in str(e.value)
    # 6 classes: 7 (-> 6) still out, 9 too; 9 classes: all fine (9 -> 8)
    with pytest.raises(SegDataError):
        ADE20KDataset(tmp_path, num_classes=6)[0]
    assert ADE20KDataset(tmp_path, num_classes=9)[0]["label"].max() == 255
    # without reduce_zero_label the range is 0..C-1
    with pytest.raises(SegDataError, match=r"\{9\}"):
        ADE20KDataset(tmp_path, num_classes=9, reduce_zero_label=False)[0]


def test_rgb_label_map_rejected(tmp_path):
    _, ann = _write_pair(tmp_path, "a", _rgb(16, 16), _rgb(16, 16, seed=1))
    with pytest.raises(SegDataError, match="RGB colour image") as e:
        ADE20KDataset(tmp_path, num_classes=5)[0]
    assert e.value.reason == "rgb_label" and e.value.source == str(ann)
    grey_as_rgb = np.repeat(np.ones((16, 16, 1), np.uint8), 3, axis=2)
    _write_pair(tmp_path, "a", _rgb(16, 16), grey_as_rgb)
    with pytest.raises(SegDataError, match="re-save it as mode L"):
        ADE20KDataset(tmp_path, num_classes=5)[0]


def test_grey_alpha_label_map_rejected(tmp_path):
    _write_pair(tmp_path, "a", _rgb(8, 8), Image.new("LA", (8, 8)))
    with pytest.raises(SegDataError, match="mode LA") as e:
        ADE20KDataset(tmp_path, num_classes=5)[0]
    assert e.value.reason == "unsupported_label_mode"


def test_missing_annotation(tmp_path):
    _write_pair(tmp_path, "a", _rgb(8, 8), np.ones((8, 8), np.uint8))
    _write_pair(tmp_path, "b", _rgb(8, 8), np.ones((8, 8), np.uint8))
    (tmp_path / "annotations" / "training" / "a.png").unlink()
    with pytest.raises(SegDataError, match="no label map") as e:
        ADE20KDataset(tmp_path, num_classes=5)
    assert e.value.reason == "missing_annotation" and e.value.source.endswith("a.jpg")
    with pytest.raises(SegDataError):
        ADE20KDataset(tmp_path, num_classes=5, log=BadInputLog(strict=True))
    log = BadInputLog(strict=False)
    with pytest.warns(BadInputWarning, match="a.jpg"):
        ds = ADE20KDataset(tmp_path, num_classes=5, log=log)
    assert len(ds) == 1 and ds.samples[0][0].endswith("b.jpg") and log.skipped == {"missing_annotation": 1}


def test_corrupt_image_and_verify(tmp_path):
    _write_pair(tmp_path, "a", _rgb(8, 8), np.ones((8, 8), np.uint8))
    _write_pair(tmp_path, "b", _rgb(8, 8), np.ones((8, 9), np.uint8))
    _write_pair(tmp_path, "c", _rgb(8, 8), np.ones((8, 8), np.uint8))
    (tmp_path / "images" / "training" / "c.jpg").write_text("<html>not found</html>")
    ds = ADE20KDataset(tmp_path, num_classes=5)
    with pytest.raises(ImageDecodeError, match="c.jpg"):
        ds[2]
    errors = ds.verify()
    assert [e.reason for e in errors] == ["size_mismatch", "not_an_image"]
    assert all(isinstance(e, DataError) for e in errors)
    log = BadInputLog(strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadInputWarning)
        ds.verify(log)
    assert log.num_skipped == 2


def test_constructor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder"):
        ADE20KDataset(tmp_path, num_classes=5)
    with pytest.raises(ValueError, match="split"):
        ADE20KDataset(tmp_path, split="test")
    _write_pair(tmp_path, "a", _rgb(8, 8), np.ones((8, 8), np.uint8))
    with pytest.raises(ValueError, match="ignore_index must be 255"):
        ADE20KDataset(tmp_path, num_classes=5, ignore_index=254)
    with pytest.raises(ValueError, match="is a class id"):
        SegFolderDataset(tmp_path / "images" / "training", tmp_path / "annotations" / "training", num_classes=300)
    with pytest.raises(FileNotFoundError, match=r"no images ending in \('.bmp',\)"):
        ADE20KDataset(tmp_path, num_classes=5, img_suffix=".bmp")
