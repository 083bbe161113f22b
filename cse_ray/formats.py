"""One reader and one writer per file format: RGB images and palette label PNGs.

Readers take local paths or `s3://`/`gs://` URIs (through `cse_ray.artifacts`) and turn a missing,
empty, truncated or wrong-mode file into a UserError that names it. Writers are atomic.
Label maps are uint8 H x W class indices (0 background, k + 1 class k, 255 ignore) stored as palette
PNGs with `labels.PALETTE`, so every viewer shows the same colours for every stage's output.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from cse_ray import artifacts
from cse_ray.errors import UserError
from cse_ray.labels import PALETTE

# Image exceptions PIL raises for broken files, besides OSError for truncation.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL fail on truncated files even if some other library relaxed the global flag."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """The decoded PIL image of a file (local or URI); any problem is a UserError naming the file."""
    try:
        data = artifacts.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} file ({exc})") from None
    if not data:
        raise UserError(f"{path}: {what} file is empty")
    try:
        with _strict_decoding():
            img = Image.open(io.BytesIO(data))
            img.load()
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (corrupt or unknown format)") from None
    except DECODE_ERRORS as exc:
        raise UserError(f"{path}: {what} is truncated or corrupt ({exc})") from None
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 H x W x 3 RGB; grayscale, CMYK, palette and alpha images are converted."""
    img = open_image(path, "image")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as exc:
            raise UserError(f"{path}: cannot convert {img.mode} image to RGB ({exc})") from None
    return np.array(img, dtype=np.uint8)


JPEG_EOI = b"\xff\xd9"


def _jpeg_ends_with_eoi(path: str | os.PathLike) -> bool:
    """Cheap truncation test: a complete JPEG ends with the EOI marker (padding bytes tolerated)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64))
        tail = handle.read()
    return JPEG_EOI in tail.rstrip(b"\x00\r\n ")[-16:]


def image_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a local image file, from its header and (for a JPEG) its last bytes, or None.

    Much cheaper than decoding: it lets a stage check thousands of images before a long run starts.
    """
    if not os.path.isfile(path):
        return "file not found"
    try:
        with Image.open(path) as img:
            fmt = img.format
            width, height = img.size
    except UnidentifiedImageError:
        return "not a readable image (corrupt or unknown format)"
    except DECODE_ERRORS as exc:
        return f"cannot read image header ({exc})"
    if width <= 0 or height <= 0:
        return f"empty image ({width}x{height})"
    if fmt == "JPEG" and not _jpeg_ends_with_eoi(path):
        return "JPEG is truncated (no end-of-image marker)"
    return None


def read_label_png(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None,
                   what: str = "mask") -> np.ndarray:
    """uint8 H x W class indices from a palette or grayscale PNG (a mask, a CRF map, a pseudo-label)."""
    img = open_image(path, what)
    if img.mode not in ("P", "L"):
        raise UserError(
            f"{path}: {what} must be a palette or grayscale PNG of class indices, got mode {img.mode}"
        )
    mask = np.array(img, dtype=np.uint8)
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        raise UserError(
            f"{path}: {what} size {mask.shape[1]}x{mask.shape[0]} (WxH) does not match the image size "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    return mask


def encode_label_png(label: np.ndarray, palette: list[int] | None = None) -> bytes:
    """PNG bytes of a uint8 H x W index map in palette mode (indices kept as they are)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must lie in 0..255")
        label = label.astype(np.uint8)
    label = np.ascontiguousarray(label)
    img = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    img.putpalette(PALETTE if palette is None else palette)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_label_png(path: str | os.PathLike, label: np.ndarray, fsync: bool = True) -> str:
    """Write a class-index map as a palette PNG, atomically (local path or URI); returns the path."""
    artifacts.write_bytes(path, encode_label_png(label), fsync=fsync)
    return os.fspath(path)


def encode_rgb_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 H x W x 3 (or H x W grey) picture: overlays, contact sheets."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_rgb_png(path: str | os.PathLike, image: np.ndarray) -> str:
    artifacts.write_bytes(path, encode_rgb_png(image))
    return os.fspath(path)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 H x W x 3 image (the synthetic datasets' images).

    Chroma is kept at full resolution (4:4:4): few-pixel saturated details, such as the synthetic
    set's parts, would otherwise bleed into their neighbours' colours.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buffer, format="JPEG", quality=quality, subsampling=0, optimize=False
    )
    return buffer.getvalue()
