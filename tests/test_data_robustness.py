"""Robustness of the shared data loading: a corpus of bad (and awkward but valid) inputs,
all generated in tmp_path, driven through the strict and non-strict policies.

Every case must end in exactly one of: loaded correctly; in strict mode an error naming the
file/field; in non-strict mode a counted skip with a warning naming the file.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from test_ground_truth import zero_based

from navit_dense.data import pack_images
from navit_dense.data.coco_json import AnnotationError, load_instances
from navit_dense.data.decode import BadInputLog, BadInputWarning, ImageDecodeError, decode_image, load_image, load_image_uint8

# ---- image corpus ------------------------------------------------------------------------------


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _blocks(h: int, w: int) -> np.ndarray:
    """Four flat colour quadrants: survive JPEG, and show where each corner ends up."""
    out = np.zeros((h, w, 3), np.uint8)
    out[: h // 2, : w // 2] = (230, 20, 20)
    out[: h // 2, w // 2 :] = (20, 230, 20)
    out[h // 2 :, : w // 2] = (20, 20, 230)
    out[h // 2 :, w // 2 :] = (230, 230, 20)
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b"")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, image: Image.Image | np.ndarray, **kwargs) -> Path:
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path, **kwargs)
    return path


def _prefix(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    return _write(dst, data[: int(len(data) * fraction)])


def _jpeg(d: Path) -> Path:
    return _save(d / "src.jpg", _rgb(64, 64), quality=90)


def _png(d: Path) -> Path:
    return _save(d / "src.png", _rgb(64, 64))


def _garble_jpeg(d: Path) -> Path:
    data = bytearray(_jpeg(d).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 50] = bytes(range(50))  # inside the entropy-coded scan
    return _write(d / "garbled.jpg", bytes(data))


def _corrupt_idat_png(d: Path) -> Path:
    data = bytearray(_png(d).read_bytes())
    data[data.find(b"IDAT") + 10] ^= 0xFF
    return _write(d / "bad_idat.png", bytes(data))


def _dir(d: Path) -> Path:
    (d / "folder.jpg").mkdir()
    return d / "folder.jpg"


# name -> (builder(tmp dir) -> path, expected ImageDecodeError.reason)
BAD_IMAGES = {
    "missing_file": (lambda d: d / "does_not_exist.jpg", "missing"),
    "directory_named_jpg": (_dir, "not_a_file"),
    "zero_byte_jpg": (lambda d: _write(d / "empty.jpg", b""), "empty"),
    "text_named_jpg": (lambda d: _write(d / "notes.jpg", b"this is not a picture\n"), "not_an_image"),
    "html_named_png": (lambda d: _write(d / "page.png", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"), "not_an_image"),
    "json_named_jpg": (lambda d: _write(d / "meta.jpg", b'{"error": "not found"}'), "not_an_image"),
    "random_bytes_png": (lambda d: _write(d / "noise.png", bytes(np.random.default_rng(1).integers(128, 256, 512, dtype=np.uint8))), "not_an_image"),
    "truncated_jpeg_half": (lambda d: _prefix(_jpeg(d), d / "half.jpg", 0.5), "truncated"),
    "truncated_jpeg_99pct": (lambda d: _prefix(_jpeg(d), d / "most.jpg", 0.99), "truncated"),
    "jpeg_header_only": (lambda d: _prefix(_jpeg(d), d / "head.jpg", 0.05), "truncated"),
    "truncated_png_half": (lambda d: _prefix(_png(d), d / "half.png", 0.5), "truncated"),
    "png_cut_inside_header": (lambda d: _write(d / "sig.png", _png(d).read_bytes()[:30]), "corrupt"),
    "png_corrupt_idat": (_corrupt_idat_png, "corrupt"),
    "zero_size_png": (lambda d: _write(d / "zero.png", _png_with_header(0, 10)), "zero_size"),
    "decompression_bomb_png": (lambda d: _write(d / "bomb.png", _png_with_header(100_000, 100_000)), "too_large"),
    "float32_tiff": (lambda d: _save(d / "depth.tif", np.full((4, 5), 0.5, np.float32)), "unsupported_mode"),
    "int32_tiff_out_of_range": (lambda d: _save(d / "ints.tif", np.full((4, 5), 100_000, np.int32)), "unsupported_mode"),
}


def _check_cmyk(t: torch.Tensor, d: Path) -> None:
    # The source of the CMYK file: Pillow's own naive CMYK conversion round-trips closely.
    assert t.shape == (3, 32, 48)
    assert (t - _as_float(_blocks(32, 48))).abs().mean() < 0.03


def _as_float(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def _gray16() -> np.ndarray:
    g = np.zeros((8, 10), np.uint16)
    g[:, :5] = 65535
    g[:, 5:] = 32768  # Image.convert("RGB") would clip this to 255 (white)
    g[0, 0] = 0
    return g


def _rgb16() -> np.ndarray:
    a = np.zeros((8, 10, 3), np.uint16)
    a[..., 0], a[..., 1], a[..., 2] = 65535, 32896, 0  # 32896 = 128 * 257
    return a


def _palette(transparent: bool) -> Image.Image:
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    if transparent:
        im.info["transparency"] = 1
    return im


def _expect(rgb: list):
    def check(t: torch.Tensor, d: Path) -> None:
        assert torch.allclose(t, _as_float(np.array(rgb, np.uint8)), atol=1.5 / 255)

    return check


def _exif_jpeg(d: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(d / f"exif{orientation}.jpg", _blocks(20, 40), quality=100, subsampling=0, exif=exif)  # 4:4:4: no colour bleed


def _check_exif6(t: torch.Tensor, d: Path) -> None:
    # Stored 40 wide x 20 high with "rotate 90 degrees clockwise to display": 20 wide x 40 high,
    # and the stored top-left (red) quadrant becomes the displayed top-right one.
    assert t.shape == (3, 40, 20)
    expected = _as_float(np.rot90(_blocks(20, 40), k=-1).copy())
    assert (t - expected).abs().max() < 0.1
    assert t[0, 5, 15] > 0.8 and t[1, 5, 15] < 0.2


def _thin() -> np.ndarray:
    a = np.zeros((50, 20000, 3), np.uint8)
    a[:, :, 0] = (np.arange(20000) % 256)[None]
    return a


def _multiframe_gif(d: Path) -> Path:
    frames = [Image.fromarray(np.full((6, 7, 3), c, np.uint8)) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    return d / "anim.gif"


def _la() -> np.ndarray:
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 0  # black ...
    la[..., 1] = [[255, 0], [128, 255]]  # ... opaque, transparent, half
    return la


def _rgba() -> np.ndarray:
    px = np.zeros((1, 3, 4), np.uint8)
    px[0] = [(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)]
    return px


def _save_rgb16(d: Path) -> Path:
    path = d / "rgb16.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(_rgb16()[..., ::-1]))  # Pillow cannot write 48-bit PNG
    return path


def _png_named_jpg(d: Path) -> Path:
    return _png(d).rename(d / "liar.jpg")


def _equals(rgb: np.ndarray):
    def check(t: torch.Tensor, d: Path) -> None:
        assert torch.equal(t, _as_float(rgb))

    return check


def _check_gray16(t: torch.Tensor, d: Path) -> None:
    expected = torch.from_numpy(_gray16().astype(np.float32)) / 65535  # full 16-bit precision
    assert torch.equal(t[0], expected) and torch.equal(t[0], t[2])


def _check_shape(h: int, w: int):
    def check(t: torch.Tensor, d: Path) -> None:
        assert t.shape == (3, h, w)

    return check


# name -> (builder(tmp dir) -> path, check(tensor, tmp dir))
GOOD_IMAGES = {
    "cmyk_jpeg": (lambda d: _save(d / "cmyk.jpg", Image.fromarray(_blocks(32, 48)).convert("CMYK"), quality=95), _check_cmyk),
    "gray16_png": (lambda d: _save(d / "g16.png", Image.fromarray(_gray16())), _check_gray16),
    "gray16_tiff": (lambda d: _save(d / "g16.tif", Image.fromarray(_gray16())), _check_gray16),
    "rgb16_png": (_save_rgb16, _expect([[(255, 128, 0)] * 10] * 8)),
    "palette_png": (lambda d: _save(d / "pal.png", _palette(False)), _expect([[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (0, 255, 0)]])),
    "palette_transparency_png": (lambda d: _save(d / "palt.png", _palette(True), transparency=1), _expect([[(255, 0, 0), (255, 255, 255)], [(0, 0, 255), (255, 255, 255)]])),
    "grayscale_png": (lambda d: _save(d / "gray.png", np.array([[0, 100], [200, 255]], np.uint8)), _expect([[(0,) * 3, (100,) * 3], [(200,) * 3, (255,) * 3]])),
    "la_png": (lambda d: _save(d / "la.png", _la()), _expect([[(0,) * 3, (255,) * 3], [(127,) * 3, (0,) * 3]])),
    "rgba_png": (lambda d: _save(d / "rgba.png", _rgba()), _expect([[(255, 0, 0), (255, 255, 255), (127, 127, 127)]])),
    "bilevel_png": (lambda d: _save(d / "bw.png", Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")), _expect([[(0,) * 3, (255,) * 3]])),
    "exif_rotated_jpeg": (lambda d: _exif_jpeg(d, 6), _check_exif6),
    "thin_20000x50_png": (lambda d: _save(d / "thin.png", _thin()), _equals(_thin())),
    "one_pixel_png": (lambda d: _save(d / "dot.png", np.array([[[10, 20, 30]]], np.uint8)), _expect([[(10, 20, 30)]])),
    "png_named_jpg": (_png_named_jpg, _equals(_rgb(64, 64))),
    "multiframe_gif_first_frame": (_multiframe_gif, _expect([[(255, 0, 0)] * 7] * 6)),
    "garbled_jpeg_scan": (_garble_jpeg, _check_shape(64, 64)),  # libjpeg decodes it, with artefacts
    "lossless_webp": (lambda d: _save(d / "x.webp", _blocks(16, 16), lossless=True), _equals(_blocks(16, 16))),
    "bmp": (lambda d: _save(d / "x.bmp", _rgb(5, 7)), _equals(_rgb(5, 7))),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_strict_names_file_and_problem(tmp_path, name):
    build, reason = BAD_IMAGES[name]
    path = build(tmp_path)
    with pytest.raises(ImageDecodeError) as info:
        BadInputLog(strict=True).load_image(path)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_non_strict_counts_and_warns(tmp_path, name):
    build, reason = BAD_IMAGES[name]
    path = build(tmp_path)
    log = BadInputLog(strict=False)
    with pytest.warns(BadInputWarning, match=re.escape(str(path))):
        assert log.load_image(path) is None
    assert log.summary() == {"skipped": {reason: 1}, "fixed": {}, "total_skipped": 1}
    assert log.records[0].source == str(path)


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_awkward_but_valid_image_loads(tmp_path, name):
    build, check = GOOD_IMAGES[name]
    path = build(tmp_path)
    for log in (BadInputLog(strict=True), BadInputLog(strict=False)):
        t = log.load_image(path)
        assert t is not None and t.dtype == torch.float32 and t.dim() == 3 and t.shape[0] == 3
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
        check(t, tmp_path)
        assert log.num_skipped == 0


def test_whole_image_corpus_is_accounted_for(tmp_path):
    """One run over every file: nothing crashes, loaded + skipped == all, counts by reason."""
    log = BadInputLog(strict=False, max_warnings=5)
    loaded = 0
    cases = {**BAD_IMAGES, **GOOD_IMAGES}
    with pytest.warns(BadInputWarning) as caught:
        for i, name in enumerate(sorted(cases)):
            d = tmp_path / f"{i:02d}"
            d.mkdir()
            loaded += log.load_image(cases[name][0](d)) is not None
    assert loaded == len(GOOD_IMAGES) and log.num_skipped == len(BAD_IMAGES)
    expected: dict[str, int] = {}
    for _, reason in BAD_IMAGES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert log.summary()["skipped"] == expected
    assert len(log.records) == len(BAD_IMAGES)  # past max_warnings nothing is lost, only quieter
    assert len(caught) == 6 and "further ones are only counted" in str(caught[-1].message)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(tmp_path, orientation):
    stored = _blocks(20, 40)
    expected = {
        1: stored,
        2: stored[:, ::-1],
        3: stored[::-1, ::-1],
        4: stored[::-1],
        5: stored.transpose(1, 0, 2),
        6: np.rot90(stored, -1),
        7: stored[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(stored, 1),
    }[orientation]
    path = _exif_jpeg(tmp_path, orientation)
    out = decode_image(path)
    assert out.size == expected.shape[:2] == out.original_size
    assert np.abs(out.pixels.astype(int) - expected).max() < 25
    assert decode_image(path, exif=False).size == (20, 40)


def test_alpha_can_be_dropped_or_composited_on_any_background(tmp_path):
    path = _save(tmp_path / "rgba.png", _rgba())
    assert load_image_uint8(path, background=None)[0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 0, 0]]
    assert load_image_uint8(path, background=(0, 0, 0))[0].tolist() == [[255, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_uint8_variant_rounds_16_bit(tmp_path):
    path = _save(tmp_path / "g16.png", Image.fromarray(_gray16()))
    px = load_image_uint8(path)
    assert px.dtype == np.uint8 and px.shape == (8, 10, 3)
    assert px[0, 0, 0] == 0 and px[0, 1, 0] == 255 and px[0, 7, 0] == 128


def test_max_pixels_reduces_at_decode_time(tmp_path):
    big = np.kron(_blocks(2, 2), np.ones((750, 1000, 1), np.uint8))  # 1500 x 2000
    jpg = _save(tmp_path / "big.jpg", big, quality=90)
    png = _save(tmp_path / "big.png", big)
    for path in (jpg, png):
        out = decode_image(path, max_pixels=40_000)
        h, w = out.size
        assert h * w <= 40_000 and abs(w / h - 4 / 3) < 0.02
        assert out.original_size == (1500, 2000)
        assert np.abs(out.pixels[h // 4, w // 4].astype(int) - (230, 20, 20)).max() < 20
    thin = decode_image(_save(tmp_path / "thin.png", _thin()), max_pixels=1000)
    assert thin.size[0] >= 1 and thin.size[0] * thin.size[1] <= 1000 and thin.original_size == (50, 20000)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(jpg, max_pixels=0)


def test_thin_image_packs(tmp_path):
    image = load_image(_save(tmp_path / "thin.png", _thin()))
    batch = pack_images([image], patch_size=16, max_tokens_per_image=64, seq_len=128)
    batch.validate()
    assert batch.grid_sizes.tolist() == [[1, 64]] and batch.image_sizes.tolist() == [[50, 20000]]


def test_logs_merge_for_the_run_summary(tmp_path):
    a, b = BadInputLog(), BadInputLog()
    with pytest.warns(BadInputWarning):
        a.load_image(tmp_path / "nope.jpg")
        b.load_image(_write(tmp_path / "e.png", b""))
    b.fix("clipped_box", 3)
    a.merge(b)
    assert a.summary() == {"skipped": {"empty": 1, "missing": 1}, "fixed": {"clipped_box": 3}, "total_skipped": 2}
    assert "skipped 2" in str(a)


# ---- real photos shipped with scikit-image ------------------------------------------------------

SKIMAGE_DATA = Path(__import__("skimage.data", fromlist=["data"]).__file__).parent
REAL = {  # file -> (H, W), source mode
    "astronaut.png": ((512, 512), "RGB"),
    "chelsea.png": ((300, 451), "RGB"),
    "coffee.png": ((400, 600), "RGB"),
    "text.png": ((172, 448), "L"),
    "camera.png": ((512, 512), "L"),
    "horse.png": ((328, 400), "RGBA"),
    "logo.png": ((500, 500), "RGBA"),
    "rocket.jpg": ((427, 640), "RGB"),
    "hubble_deep_field.jpg": ((872, 1000), "RGB"),
    "no_time_for_that_tiny.gif": ((25, 14), "P"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_photos_decode(name):
    path = SKIMAGE_DATA / name
    if not path.exists():
        pytest.skip(f"{name} not shipped with this scikit-image")
    (h, w), mode = REAL[name]
    t = load_image(path)
    assert t.shape == (3, h, w) and t.dtype == torch.float32
    assert 0 <= float(t.min()) and float(t.max()) <= 1 and float(t.std()) > 0.01
    if mode == "L":
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    if mode == "RGB":  # an independent decoder agrees (JPEG IDCTs may differ by a level or two)
        ref = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(load_image_uint8(path).astype(int) - ref).mean() < (1.0 if name.endswith(".jpg") else 1e-9)


def test_real_photo_under_a_small_budget():
    out = decode_image(SKIMAGE_DATA / "retina.jpg", max_pixels=128 * 128)
    assert out.original_size == (1411, 1411) and out.size[0] * out.size[1] <= 128 * 128 and out.size[0] >= 120


# ---- COCO / LVIS JSON corpus --------------------------------------------------------------------


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major, starting with a background run)."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _masks() -> tuple[np.ndarray, np.ndarray]:
    crowd = np.zeros((48, 64), np.uint8)
    crowd[20:30, 30:40] = 1
    small = np.zeros((32, 32), np.uint8)
    small[0:8, 0:8] = 1
    return crowd, small


def _base(lvis: bool = False) -> dict:
    crowd, small = _masks()
    compressed = mask_utils.encode(np.asfortranarray(small))["counts"].decode()
    data = {
        "info": {"description": "generated"},
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 11, "file_name": "b.jpg", "width": 32, "height": 32},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "bird"}],
        "annotations": [
            {"id": 100, "image_id": 10, "category_id": 1, "bbox": [4, 4, 20, 10], "area": 200.0, "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]},
            {"id": 101, "image_id": 10, "category_id": 2, "bbox": [30, 20, 10, 10], "area": 100.0, "iscrowd": 1, "segmentation": {"size": [48, 64], "counts": _runs(crowd)}},
            {"id": 102, "image_id": 11, "category_id": 5, "bbox": [0, 0, 8, 8], "area": 64.0, "iscrowd": 0, "segmentation": {"size": [32, 32], "counts": compressed}},
        ],
    }
    if lvis:
        for cat, freq in zip(data["categories"], "rcf", strict=True):
            cat.update(frequency=freq, image_count=3)
        for im in data["images"]:
            im.update(neg_category_ids=[5], not_exhaustive_category_ids=[])
        del data["images"][1]["file_name"]
        data["images"][1]["coco_url"] = "http://images.cocodataset.org/val2017/000000000011.jpg"
        for ann in data["annotations"]:
            del ann["iscrowd"]
    return data


def _set(path: str, value):
    """Mutator setting data[a][b]... = value (path like 'annotations.0.bbox'); DELETE removes."""

    def mutate(data: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = data
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


DELETE = object()


def _append(section: str, entry):
    return lambda data: data[section].append(copy.deepcopy(entry(data)) if callable(entry) else entry)


def _extra_polygon(poly):
    return lambda data: data["annotations"][0]["segmentation"].append(poly)


def _segm_kept(ds) -> None:
    ann = ds.images[0].annotations[0]
    assert ann.segmentation == [[4, 4, 24, 4, 24, 14, 4, 14]]


def _segm_dropped(ann_index: int = 0, image_index: int = 0):
    def check(ds) -> None:
        ann = ds.images[image_index].annotations[ann_index]
        assert ann.segmentation is None and ann.bbox  # the box survives

    return check


def _clipped(box):
    return lambda ds: ds.images[0].annotations[0].bbox == pytest.approx(box)


MASK_AREA = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([[4, 4, 24, 4, 24, 14, 4, 14]], 48, 64))))


def _set_all(section: str, key: str, value):
    return lambda data: [entry.__setitem__(key, value) for entry in data[section]]


def _chain(*mutations):
    return lambda data: [m(data) for m in mutations]


def _area(ann_index: int, expected: float):
    return lambda ds: [a.area for im in ds.images for a in im.annotations][ann_index] == expected


def _zero_based(data: dict) -> None:
    """The export of an annotation tool that counts from 0: every id family starts at 0."""
    data.update(zero_based(data)[0])


def _shifted(ds) -> bool:
    # ids + 1, references included: the same structure as the base file with ids 1, 2, 3...
    return ([im.id for im in ds.images], sorted(ds.categories), [a.id for im in ds.images for a in im.annotations]) == ([1, 2], [1, 2, 3], [1, 2, 3]) \
        and [a.category_id for im in ds.images for a in im.annotations] == [1, 2, 3] and ds.images[0].neg_category_ids == [3]


# name -> (lvis, mutate(data), skipped-by-reason, fixed-by-reason, text the error must contain, check(dataset))
COCO_CASES = {
    "image_missing_width": (False, _set("images.0.width", DELETE), {"missing_key": 1, "image_skipped": 2}, {}, "images[0] (id=10): missing key 'width'", None),
    "image_zero_width": (False, _set("images.0.width", 0), {"bad_image_size": 1, "image_skipped": 2}, {}, "width=0", None),
    "image_id_is_string": (False, _set("images.0.id", "10"), {"bad_value": 1, "unknown_image_id": 2}, {}, "'id' is '10', expected an integer", None),
    "image_entry_not_object": (False, _append("images", "oops"), {"bad_entry": 1}, {}, "images[2]: is str", None),
    "image_without_file_name": (False, _set("images.1.file_name", DELETE), {"missing_key": 1, "image_skipped": 1}, {}, "'file_name'", None),
    "duplicate_image_id": (False, _append("images", lambda d: d["images"][0]), {"duplicate_id": 1}, {}, "images[2] (id=10): image id 10 already used", None),
    "duplicate_annotation_id": (False, _append("annotations", lambda d: d["annotations"][0]), {"duplicate_id": 1}, {}, "annotations[3] (id=100)", None),
    "duplicate_category_id": (False, _append("categories", {"id": 2, "name": "wolf"}), {"duplicate_id": 1}, {}, "categories[3] (id=2)", lambda ds: ds.categories[2].name == "dog"),
    "category_missing_name": (False, _set("categories.0.name", DELETE), {"missing_key": 1, "category_skipped": 1}, {}, "categories[0] (id=1): missing key 'name'", None),
    "annotation_missing_bbox": (False, _set("annotations.0.bbox", DELETE), {"missing_key": 1}, {}, "annotations[0] (id=100): missing key 'bbox'", None),
    "annotation_missing_category": (False, _set("annotations.2.category_id", DELETE), {"missing_key": 1}, {}, "missing key 'category_id'", None),
    "unknown_image_id": (False, _set("annotations.0.image_id", 999), {"unknown_image_id": 1}, {}, "'image_id' 999: no image has this id", None),
    "unknown_category_id": (False, _set("annotations.0.category_id", 77), {"unknown_category_id": 1}, {}, "'category_id' 77: no category has this id", None),
    "negative_width_box": (False, _set("annotations.0.bbox", [4, 4, -5, 10]), {"nonpositive_box": 1}, {}, "width or height <= 0", None),
    "zero_height_box": (False, _set("annotations.0.bbox", [4, 4, 5, 0]), {"nonpositive_box": 1}, {}, "annotations[0] (id=100): 'bbox' [4, 4, 5, 0]", None),
    "bbox_three_numbers": (False, _set("annotations.0.bbox", [1, 2, 3]), {"bad_bbox": 1}, {}, "expected [x, y, width, height]", None),
    "bbox_nan": (False, _set("annotations.0.bbox", [1, 2, float("nan"), 3]), {"bad_bbox": 1}, {}, "4 finite numbers", None),
    "bbox_strings": (False, _set("annotations.0.bbox", ["1", "2", "3", "4"]), {"bad_bbox": 1}, {}, "'bbox' is ['1'", None),
    # The clipped boxes no longer hold the file's area (200): it is recomputed from the mask.
    "box_overhangs_right_bottom": (False, _set("annotations.0.bbox", [50, 40, 30, 20]), {}, {"clipped_box": 1, "inconsistent_area": 1}, None, _clipped((50, 40, 14, 8))),
    "box_negative_origin": (False, _set("annotations.0.bbox", [-5, -5, 10, 10]), {}, {"clipped_box": 1, "inconsistent_area": 1}, None, _clipped((0, 0, 5, 5))),
    "box_entirely_outside": (False, _set("annotations.0.bbox", [100, 100, 5, 5]), {"box_outside_image": 1}, {}, "outside its 64x48 image", None),
    "iscrowd_two": (False, _set("annotations.0.iscrowd", 2), {"bad_value": 1}, {}, "'iscrowd' is 2, expected 0 or 1", None),
    "area_negative": (False, _set("annotations.0.area", -3), {}, {"inconsistent_area": 1}, None, _area(0, MASK_AREA)),
    "area_huge_everywhere": (False, _set_all("annotations", "area", 1e7), {}, {"inconsistent_area": 3}, None, _area(2, 64.0)),
    "area_string": (False, _set("annotations.0.area", "200"), {}, {"inconsistent_area": 1}, None, _area(0, MASK_AREA)),
    "area_missing": (False, _set("annotations.0.area", DELETE), {}, {"missing_area": 1}, None, _area(0, MASK_AREA)),
    "area_of_box_only_object_too_small": (False, _chain(_set("annotations.0.segmentation", DELETE), _set("annotations.0.area", 5)), {},
                                          {"inconsistent_area": 1}, None, _area(0, 200.0)),
    "ids_start_at_zero": (True, _zero_based, {}, {"shifted_image_ids": 2, "shifted_category_ids": 3, "shifted_annotation_ids": 3}, None,
                          _shifted),
    "polygon_odd_length_dropped": (False, _extra_polygon([1, 2, 3, 4, 5, 6, 7]), {"bad_polygon": 1}, {}, "polygon 1 has 7 coordinates", _segm_kept),
    "polygon_nested_garbage_dropped": (False, _extra_polygon([[1, 2], [3]]), {"bad_polygon": 1}, {}, "polygon 1 is not a flat list", _segm_kept),
    "only_polygon_has_four_numbers": (False, _set("annotations.0.segmentation", [[1, 2, 3, 4]]), {"bad_segmentation": 1}, {}, "has 4 coordinates", _segm_dropped()),
    "segmentation_empty_list": (False, _set("annotations.0.segmentation", []), {"bad_segmentation": 1}, {}, "has no polygons", _segm_dropped()),
    "segmentation_is_string": (False, _set("annotations.0.segmentation", "mask.png"), {"bad_segmentation": 1}, {}, "'segmentation' is str", _segm_dropped()),
    "rle_size_mismatch": (False, _set("annotations.1.segmentation.size", [48, 63]), {"bad_segmentation": 1}, {}, "does not match the image (48x64)", _segm_dropped(1)),
    "rle_counts_too_short": (False, _set("annotations.1.segmentation.counts", [5, 2, 3]), {"bad_segmentation": 1}, {}, "cover 10 pixels, expected height*width = 3072", _segm_dropped(1)),
    "rle_negative_count": (False, _set("annotations.1.segmentation.counts", [3080, -8]), {"bad_segmentation": 1}, {}, "non-negative integers", _segm_dropped(1)),
    "rle_compressed_garbage": (False, _set("annotations.2.segmentation.counts", "garbage!!zz"), {"bad_segmentation": 1}, {}, "string is malformed", _segm_dropped(0, 1)),
    "rle_compressed_too_short": (False, _set("annotations.2.segmentation.counts", "52"), {"bad_segmentation": 1}, {}, "cover 7 pixels", _segm_dropped(0, 1)),
    "lvis_bad_frequency": (True, _set("categories.1.frequency", "x"), {"bad_frequency": 1}, {}, "categories[1] (id=2): 'frequency' is 'x'", lambda ds: ds.categories[2].frequency is None),
    "lvis_missing_frequency": (True, _set("categories.0.frequency", DELETE), {"bad_frequency": 1}, {}, "'frequency' is None", None),
    "lvis_neg_unknown_category": (True, _set("images.0.neg_category_ids", [5, 999]), {"bad_neg_category_ids": 1}, {}, "unknown category ids [999]", lambda ds: ds.images[0].neg_category_ids == [5]),
    "lvis_neg_missing": (True, _set("images.0.neg_category_ids", DELETE), {"bad_neg_category_ids": 1}, {}, "images[0] (id=10): 'neg_category_ids' is None", lambda ds: ds.images[0].neg_category_ids == []),
    "lvis_not_exhaustive_not_list": (True, _set("images.1.not_exhaustive_category_ids", "1,2"), {"bad_not_exhaustive_category_ids": 1}, {}, "expected a list of category ids", None),
}

# name -> (file bytes or None for a missing file, reason, text the error must contain)
FATAL_JSON = {
    "malformed_trailing_comma": (b'{\n  "images": [],\n  "categories": [],\n}\n', "malformed_json", "line 4, column 1"),
    "truncated_json": (json.dumps(_base()).encode()[:200], "malformed_json", "invalid JSON at line 1"),
    "empty_json": (b"", "empty", "file is empty"),
    "whitespace_json": (b"  \n ", "empty", "file is empty"),
    "missing_json": (None, "missing", "does not exist"),
    "top_level_list": (b"[]", "bad_top_level", "top level is a JSON list"),
    "missing_annotations_key": (json.dumps({"images": [], "categories": []}).encode(), "missing_key", "missing top-level key(s) ['annotations']"),
    "images_is_object": (json.dumps({"images": {}, "annotations": [], "categories": []}).encode(), "bad_top_level", "top-level 'images' is a dict"),
    "not_utf8": (b'{"images": "\xff\xfe"}', "malformed_json", "not UTF-8"),
}


def _write_case(tmp_path: Path, name: str) -> Path:
    lvis, mutate, *_ = COCO_CASES[name]
    data = _base(lvis)
    mutate(data)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def test_valid_coco_and_lvis_load_exactly(tmp_path):
    crowd, small = _masks()
    for lvis in (False, True):
        path = tmp_path / f"base_{lvis}.json"
        path.write_text(json.dumps(_base(lvis)))
        ds = load_instances(path, strict=True)
        assert ds.flavor == ("lvis" if lvis else "coco")
        assert ds.counts == {"skipped": {}, "fixed": {}, "total_skipped": 0}
        assert [im.id for im in ds.images] == [10, 11] and ds.num_annotations == 3
        a, b = ds.images
        assert [ann.id for ann in a.annotations] == [100, 101] and a.annotations[0].bbox == (4, 4, 20, 10)
        assert a.annotations[1].iscrowd is (not lvis)
        assert a.annotations[0].mask(a.height, a.width).sum() == pytest.approx(200, abs=40)
        assert np.array_equal(a.annotations[1].mask(a.height, a.width), crowd)
        assert np.array_equal(b.annotations[0].mask(b.height, b.width), small)
        if lvis:
            assert [c.frequency for c in ds.categories.values()] == ["r", "c", "f"]
            assert b.file_name == "val2017/000000000011.jpg" and b.neg_category_ids == [5]


def test_image_info_file_without_annotations(tmp_path):
    path = tmp_path / "test_dev.json"
    path.write_text(json.dumps({k: v for k, v in _base().items() if k != "annotations"}))
    with pytest.raises(AnnotationError, match="annotations"):
        load_instances(path)
    assert load_instances(path, require_annotations=False).num_annotations == 0


@pytest.mark.parametrize("name", sorted(COCO_CASES))
def test_coco_case_non_strict_skips_counts_and_warns(tmp_path, name):
    _, _, skipped, fixed, _, check = COCO_CASES[name]
    path = _write_case(tmp_path, name)
    with pytest.warns(BadInputWarning, match=re.escape(str(path))):
        ds = load_instances(path, strict=False)
    assert ds.counts["skipped"] == skipped and ds.counts["fixed"] == fixed
    for error in ds.log.records:
        assert isinstance(error, AnnotationError) and error.source == str(path)
    if check is not None:
        assert check(ds) is not False


@pytest.mark.parametrize("name", sorted(COCO_CASES))
def test_coco_case_strict_raises_naming_file_and_field(tmp_path, name):
    _, _, skipped, fixed, message, _ = COCO_CASES[name]
    path = _write_case(tmp_path, name)
    if not skipped:  # repairs only (clipping, areas, ids): strict mode loads and still counts them, in one warning
        with pytest.warns(BadInputWarning, match="repaired") as caught:
            assert load_instances(path, strict=True).counts["fixed"] == fixed
        assert len(caught) == 1
        return
    with pytest.raises(AnnotationError) as info:
        load_instances(path, strict=True)
    assert info.value.reason in skipped and str(path) in str(info.value)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("name", sorted(FATAL_JSON))
@pytest.mark.parametrize("strict", [True, False])
def test_fatal_json_problems_raise_in_both_modes(tmp_path, name, strict):
    content, reason, message = FATAL_JSON[name]
    path = tmp_path / f"{name}.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AnnotationError) as info:
        load_instances(path, strict=strict)
    assert info.value.reason == reason and str(path) in str(info.value)
    assert message in str(info.value), str(info.value)


# ---- the corpus through evaluation: one reading for training and evaluation ---------------------

def _lvis_fields(data: dict, section: str) -> dict:
    if "frequency" not in data["categories"][0]:
        return {}
    return {"frequency": "r"} if section == "categories" else {"neg_category_ids": [], "not_exhaustive_category_ids": []}


# Unusual but valid files: read without any skip or repair, and scored exactly like the base file.
GOOD_JSON = {
    "extra_unknown_keys": lambda data: data["annotations"][0].update(score=1, attributes={"occluded": False}),
    "annotations_reversed": lambda data: data["annotations"].reverse(),
    "image_without_annotations": _append("images", lambda data: {"id": 12, "file_name": "c.jpg", "width": 8, "height": 8, **_lvis_fields(data, "images")}),
    "unused_category": _append("categories", lambda data: {"id": 9, "name": "fish", **_lvis_fields(data, "categories")}),
    # (20 + 2) * (10 + 2) - 1: a rasterized mask may reach one pixel past its box
    "area_within_raster_slack": _set("annotations.0.area", 263.0),
}
# Readings that training accepts (counted) but that evaluation cannot score: an error naming the file.
# (image_id_is_string: the detections name image 10, an id the reading refused: reported with the detections file.)
EVAL_ERRORS = {"lvis_bad_frequency": "frequency must be one of", "lvis_missing_frequency": "frequency must be one of",
               "image_id_is_string": "dets.json[0]: unknown image_id 10"}  # fmt: skip


def _perfect_dets(lvis: bool, case: str = "") -> list[dict]:
    """The base file's objects as detections, in the ids of case ``case``'s file."""
    anns = [a for a in _base(lvis)["annotations"] if not a.get("iscrowd")]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9 - 0.1 * k} for k, a in enumerate(anns)]
    if case == "ids_start_at_zero":  # detections of a zero-based export use its ids
        dets = zero_based(_base(lvis), dets)[1]
    return dets


def _eval_cli(tmp_path: Path, gt: Path, lvis: bool, capsys, case: str = "") -> tuple[int, dict | None, str]:
    from conftest import load_tool

    dets, out = tmp_path / "dets.json", tmp_path / "report.json"
    dets.write_text(json.dumps(_perfect_dets(lvis, case)))
    rc = load_tool("eval_lvis").main(["--gt", str(gt), "--dets", str(dets), "--json", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, json.loads(out.read_text()) if rc == 0 else None, err


def _base_metrics(tmp_path: Path, lvis: bool) -> dict:
    from navit_dense.evaluation.lvis_eval import evaluate_lvis

    return evaluate_lvis(_base(lvis), _perfect_dets(lvis))


@pytest.mark.parametrize("name", sorted(COCO_CASES))
def test_coco_case_class_in_evaluation(tmp_path, name, capsys):
    """Every corpus case, scored by tools/eval_lvis.py: an error naming the file, or exactly the
    training reading's counted skips / repairs, printed, and the metrics of what that reading kept
    (the training targets and the evaluated objects are the same per image)."""
    from navit_dense.data.detection import DetectionDataset
    from navit_dense.evaluation.lvis_eval import evaluate_lvis, results_for_reading

    lvis, _, skipped, fixed, _, _ = COCO_CASES[name]
    path = _write_case(tmp_path, name)
    with pytest.warns(BadInputWarning, match=re.escape(str(path))):
        rc, report, err = _eval_cli(tmp_path, path, lvis, capsys, name)
        reading = load_instances(path)
    if name in EVAL_ERRORS:
        assert rc == 2 and str(path) in err and EVAL_ERRORS[name] in err, err
        return
    assert rc == 0, err
    assert {k: report["ground_truth"][k] for k in ("skipped", "fixed")} == {"skipped": skipped, "fixed": fixed}
    assert str(path) in err and all(reason in err for reason in {**skipped, **fixed}), err
    gt = reading.to_json()
    assert report["runs"][0]["metrics"] == evaluate_lvis(gt, results_for_reading(_perfect_dets(lvis, name), reading)[0])
    training = DetectionDataset(reading, tmp_path)  # never decodes here
    for i, im in enumerate(training.images):
        scored = [a for a in gt["annotations"] if a["image_id"] == im.id and not a["iscrowd"]]
        assert training.num_objects(i) == len(scored)
    if report["runs"][0]["metrics"] != _base_metrics(tmp_path, lvis):
        assert skipped or fixed  # a changed number always comes with its reason


@pytest.mark.parametrize("lvis", [False, True])
@pytest.mark.parametrize("name", sorted(GOOD_JSON))
def test_valid_variants_score_like_the_base_file(tmp_path, name, lvis, capsys):
    data = _base(lvis)
    GOOD_JSON[name](data)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    rc, report, err = _eval_cli(tmp_path, path, lvis, capsys)
    assert rc == 0 and report["ground_truth"]["total_skipped"] == 0 and not report["ground_truth"]["fixed"], err
    assert report["runs"][0]["metrics"] == _base_metrics(tmp_path, lvis)


@pytest.mark.parametrize("name", sorted(FATAL_JSON))
def test_fatal_json_in_evaluation_is_an_error_naming_the_file(tmp_path, name, capsys):
    content, _, message = FATAL_JSON[name]
    path = tmp_path / f"{name}.json"
    if content is not None:
        path.write_bytes(content)
    rc, _, err = _eval_cli(tmp_path, path, False, capsys)
    assert rc == 2 and str(path) in err and message in err, err
