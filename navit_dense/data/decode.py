"""Robust image decoding and the bad-input policy shared by every dataset.

:func:`load_image` turns any file Pillow can read into the float CHW RGB tensor in [0, 1]
that :func:`~navit_dense.data.packing.pack_images` expects. Decisions made here:

- EXIF orientation is applied (``ImageOps.exif_transpose``), so sizes are display sizes.
- Transparency (RGBA, LA, PA, palette or grayscale with a tRNS entry) is composited onto
  ``background`` (white by default, how viewers show it); ``background=None`` drops alpha
  instead, exposing whatever colour the transparent pixels happen to store.
- 16-bit grayscale keeps its full precision (divided by 65535). Pillow reduces 16-bit
  RGB(A) PNGs to 8 bits per channel itself (keeping the high byte): the [0, 1] scale is
  right, the low byte is lost.
- CMYK JPEGs are converted by Pillow's plain formula (no ICC colour management).
- Multi-frame files (GIF, TIFF) give their first frame.
- ``max_pixels`` caps the decoded size: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg (``Image.draft``), then everything is area-downscaled in uint8/uint16 before the
  float conversion, so a huge image under a small token budget never exists as a full-size
  float tensor. ``DecodedImage.original_size`` keeps the full (H, W) for annotation scaling.
- Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is kept: bigger images
  fail with reason ``too_large``.

Every failure is an :class:`ImageDecodeError` (a ``ValueError``) naming the file, with a
machine-readable ``reason``. :class:`BadInputLog` applies the strict / non-strict policy.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

# ---- errors and the bad-input log -----------------------------------------------------------


class DataError(ValueError):
    """A bad input. ``source`` is the file, ``reason`` a short key used for counting."""

    def __init__(self, source: str, reason: str, detail: str):
        self.source, self.reason, self.detail = str(source), reason, detail
        super().__init__(f"{source}: {detail}")


class ImageDecodeError(DataError):
    """An image file that cannot be turned into pixels. Reasons: missing, not_a_file,
    unreadable, empty, not_an_image, corrupt, truncated, zero_size, too_large,
    unsupported_mode."""


class BadInputWarning(UserWarning):
    """Emitted for every input skipped in non-strict mode (filter it like any warning)."""


class BadInputLog:
    """The strict / non-strict policy and the run-summary counts.

    - ``skip(error)``: data is dropped. Strict: raise ``error``. Otherwise count it by
      ``error.reason``, keep it in ``records`` and warn with a :class:`BadInputWarning`
      naming the file. After ``max_warnings`` warnings one last warning says that further
      ones are only counted (``records`` and ``summary()`` still list every one).
    - ``fix(reason, n)``: a value was repaired, e.g. a box clipped to its image; counted in
      both modes, never raised.

    Logs are per process: merge DataLoader workers' logs with :meth:`merge`.
    """

    def __init__(self, strict: bool = False, max_warnings: int | None = 100):
        self.strict = strict
        self.max_warnings = max_warnings
        self.skipped: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()
        self.records: list[DataError] = []
        self._warned = 0

    def skip(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.skipped[error.reason] += 1
        self.records.append(error)
        if self.max_warnings is None or self._warned < self.max_warnings:
            warnings.warn(f"skipped ({error.reason}): {error}", BadInputWarning, stacklevel=2)
        elif self._warned == self.max_warnings:
            warnings.warn(f"more than {self.max_warnings} bad inputs; further ones are only counted (see summary())", BadInputWarning, stacklevel=2)
        self._warned += 1

    def fix(self, reason: str, n: int = 1) -> None:
        if n:
            self.fixed[reason] += n

    def guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None after :meth:`skip` if it raised a :class:`DataError`."""
        try:
            return fn(*args, **kwargs)
        except DataError as error:
            self.skip(error)
            return None

    def load_image(self, path: str | os.PathLike, **kwargs: Any) -> torch.Tensor | None:
        """:func:`load_image`, or None for a skipped file (non-strict)."""
        return self.guard(load_image, path, **kwargs)

    def merge(self, other: "BadInputLog") -> None:
        self.skipped.update(other.skipped)
        self.fixed.update(other.fixed)
        self.records.extend(other.records)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> dict[str, Any]:
        """Counts for the run summary: {"skipped": {reason: n}, "fixed": {reason: n}, "total_skipped": n}."""
        return {"skipped": dict(sorted(self.skipped.items())), "fixed": dict(sorted(self.fixed.items())), "total_skipped": self.num_skipped}

    def __str__(self) -> str:
        parts = [f"{n} {r}" for r, n in sorted(self.skipped.items())]
        fixes = [f"{n} {r}" for r, n in sorted(self.fixed.items())]
        return f"skipped {self.num_skipped} ({', '.join(parts) or 'none'}); fixed: {', '.join(fixes) or 'none'}"


# ---- decoding ----------------------------------------------------------------------------------

_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


@dataclass
class DecodedImage:
    pixels: np.ndarray  # HWC RGB, uint8 or uint16 (16-bit sources), display orientation
    original_size: tuple[int, int]  # (H, W) at full resolution after EXIF orientation, before max_pixels

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    def to_tensor(self) -> torch.Tensor:
        """float32 CHW in [0, 1]."""
        scale = 65535.0 if self.pixels.dtype == np.uint16 else 255.0
        # One float copy, made directly in CHW order (no intermediate full-size copies).
        return torch.from_numpy(np.ascontiguousarray(self.pixels.transpose(2, 0, 1), dtype=np.float32)).div_(scale)

    def to_uint8(self) -> np.ndarray:
        """uint8 HWC (16-bit sources rounded to 8 bits)."""
        if self.pixels.dtype == np.uint8:
            return self.pixels
        return ((self.pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _describe_non_image(head: bytes) -> str:
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "is an HTML/XML document, not an image (a failed download or an error page?)"
    if start.startswith((b"{", b"[")):
        return "looks like JSON, not an image"
    try:
        head.decode("utf-8")
        return f"is a text file, not an image (starts with {head[:24]!r})"
    except UnicodeDecodeError:
        return f"is not in any image format Pillow reads (starts with {head[:16]!r})"


def _unidentified(path: str, head: bytes) -> ImageDecodeError:
    fmt = next((f for sig, f in _SIGNATURES.items() if head.startswith(sig)), None)
    if fmt is None:
        return ImageDecodeError(path, "not_an_image", _describe_non_image(head))
    # Pillow refuses zero-size images without saying so; the PNG header tells us directly.
    if fmt == "PNG" and len(head) >= 24 and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if w == 0 or h == 0:
            return ImageDecodeError(path, "zero_size", f"PNG header declares a zero-size image ({w}x{h})")
    return ImageDecodeError(path, "corrupt", f"has a {fmt} signature but Pillow cannot read its header (truncated or corrupt)")


def _reduced_size(h: int, w: int, max_pixels: int) -> tuple[int, int]:
    """Largest (h', w') with the same aspect ratio (up to rounding) and h' * w' <= max_pixels."""
    s = math.sqrt(max_pixels / (h * w))
    nh = max(1, min(h, math.floor(h * s)))
    nw = max(1, min(w, math.floor(w * s), max_pixels // nh))
    return min(nh, max_pixels // nw), nw  # a side pinned at 1 pixel must not push the product over


def _to_array(im: Image.Image, path: str, background: tuple[int, int, int] | None) -> np.ndarray:
    """Pillow image (any mode) -> HWC RGB uint8, or uint16 for 16-bit grayscale."""
    mode = im.mode
    if mode.startswith("I;16"):
        gray = np.asarray(im).astype(np.uint16)  # also normalises the big-endian I;16B
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "I":  # 32-bit ints: 16-bit PNG/TIFF data on some Pillow paths
        gray = np.asarray(im)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise ImageDecodeError(path, "unsupported_mode", f"32-bit integer pixels (mode I) range {gray.min()}..{gray.max()}; expected 8- or 16-bit data")
        return np.repeat(gray.astype(np.uint16)[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageDecodeError(path, "unsupported_mode", "32-bit float pixels (mode F) have no defined [0, 1] range; expected 8- or 16-bit data")
    try:
        if "A" in mode or "a" in mode or "transparency" in im.info:
            rgba = im.convert("RGBA")
            if background is None:
                return np.asarray(rgba.convert("RGB"))
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
        return np.asarray(im.convert("RGB"))
    except ValueError as e:  # Pillow has no conversion for this mode (e.g. HSV)
        raise ImageDecodeError(path, "unsupported_mode", f"cannot convert mode {mode} to RGB ({e})") from e


def decode_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = None,
    background: tuple[int, int, int] | None = (255, 255, 255),
    exif: bool = True,
) -> DecodedImage:
    """Decode ``path`` to HWC RGB pixels (see the module docstring for the policy).

    max_pixels: if given, the result has at most this many pixels (aspect ratio kept).
    background: RGB colour transparency is composited onto; None drops alpha.
    exif: apply the EXIF orientation tag.
    Raises :class:`ImageDecodeError` naming the file and the problem.
    """
    path = os.fspath(path)
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise ImageDecodeError(path, "not_a_file", "is a directory, expected an image file")
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise ImageDecodeError(path, "missing", "file does not exist") from None
    except ImageDecodeError:
        raise
    except OSError as e:
        raise ImageDecodeError(path, "unreadable", f"cannot read the file ({e.strerror or e})") from e
    if size == 0:
        raise ImageDecodeError(path, "empty", "file is empty (0 bytes)")

    # Pillow's plugins raise many exception types on malformed data (OSError, SyntaxError,
    # struct.error, zlib.error, EOFError, ...): everything from open() to load() is mapped
    # to ImageDecodeError here; the conversion below runs on loaded pixels, outside this net.
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w == 0 or h == 0:
                raise ImageDecodeError(path, "zero_size", f"image has zero size ({w}x{h})")
            if max_pixels is not None and w * h > max_pixels and im.format == "JPEG":
                s = math.sqrt(max_pixels / (w * h))
                im.draft(im.mode, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))  # libjpeg DCT scaling
            im.load()
            if exif:
                try:
                    out = ImageOps.exif_transpose(im)
                except Exception as e:  # a broken EXIF block should not cost us the pixels
                    warnings.warn(f"{path}: unreadable EXIF ({e}); using the stored orientation", BadInputWarning, stacklevel=2)
                    out = im
            else:
                out = im
            # A transposing orientation swaps the reported sizes (a square needs no swap).
            original = (w, h) if out.size == im.size else (h, w)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, "too_large", f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS if this file is trusted)") from e
    except Image.UnidentifiedImageError:
        raise _unidentified(path, head) from None
    except Exception as e:
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise ImageDecodeError(path, reason, f"decoding failed: {type(e).__name__}: {e}") from e

    pixels = _to_array(out, path, background)  # pixels are loaded: the file may be closed
    if max_pixels is not None and pixels.shape[0] * pixels.shape[1] > max_pixels:
        nh, nw = _reduced_size(pixels.shape[0], pixels.shape[1], max_pixels)
        pixels = cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_AREA)  # area = antialiased downscale
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):  # arrays over Pillow buffers are read-only
        pixels = np.array(pixels, order="C")
    return DecodedImage(pixels, (original[1], original[0]))


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = None,
    background: tuple[int, int, int] | None = (255, 255, 255),
    exif: bool = True,
) -> torch.Tensor:
    """float32 CHW RGB tensor in [0, 1]; arguments as in :func:`decode_image`."""
    return decode_image(path, max_pixels=max_pixels, background=background, exif=exif).to_tensor()


def load_image_uint8(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = None,
    background: tuple[int, int, int] | None = (255, 255, 255),
    exif: bool = True,
) -> np.ndarray:
    """uint8 HWC RGB array (e.g. for OpenCV-style augmentation); arguments as in :func:`decode_image`."""
    return decode_image(path, max_pixels=max_pixels, background=background, exif=exif).to_uint8()
