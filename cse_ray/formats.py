"""One reader and one writer per file format: RGB images, palette label PNGs, CAM files, seed dicts.

Readers take local paths or `s3://`/`gs://` URIs (through `cse_ray.artifacts`) and turn a missing,
empty, truncated or wrong-mode file into a UserError that names it. Writers are atomic.
- Label maps are uint8 H x W class indices (0 background, k + 1 class k, 255 ignore) stored as palette
  PNGs with `labels.PALETTE`, so every viewer shows the same colours for every stage's output.
- CAM files (`NAME.npz`): `cams` float16 K x H x W in [0, 1] and `classes` int64 K, the present classes.
- Seed dicts (`NAME.npy`), the reference's pickled `{key: H x W float32}`: CAM seeds are keyed by class
  k, CRF seeds by category (0 background, k + 1 class k).
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from cse_ray import artifacts
from cse_ray.errors import UserError
from cse_ray.labels import PALETTE, VOC, LabelSpace

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


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a local image from its header alone (a file `image_problem` found sound)."""
    with Image.open(path) as img:
        return int(img.size[1]), int(img.size[0])


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


# ------------------------------------------------------------------------------------------ CAM files
def save_cam_npz(path: str | os.PathLike, cams: np.ndarray, classes: Sequence[int] | np.ndarray,
                 labels: LabelSpace = VOC) -> str:
    """Write a CAM file: `cams` as float16 K x H x W, `classes` int64 K (indices 0..num_classes - 1)."""
    cams = np.asarray(cams)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != classes.size:
        raise ValueError(f"save_cam_npz: cams must be K x H x W with K = len(classes), got {cams.shape} "
                         f"and {classes.size} classes")
    if classes.size and (classes.min() < 0 or classes.max() >= labels.num_classes):
        raise ValueError(f"save_cam_npz: class indices must be in 0..{labels.num_classes - 1}, "
                         f"got {classes.tolist()}")
    artifacts.write_npz(path, cams=cams.astype(np.float16), classes=classes)
    return os.fspath(path)


def load_cam_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CAM file, local or remote: (cams float32 K x H x W, classes int64 K)."""
    try:
        archive = np.load(io.BytesIO(artifacts.read_bytes(path)), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: not an .npz archive (expected arrays 'cams' and 'classes')")
        with archive:
            cams, classes = archive["cams"], archive["classes"]
    except KeyError as error:
        raise UserError(f"{path}: not a cse-ray CAM file (needs arrays 'cams' and 'classes'): "
                        f"{error}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise UserError(f"{path}: cannot read CAM file: {error}") from None
    return cams.astype(np.float32), classes.astype(np.int64).reshape(-1)


# ------------------------------------------------------------------------------------------ seed dicts
def write_seed_dict(path: str | os.PathLike, mapping: Mapping) -> str:
    """Write the reference's pickled-dict `.npy` (`np.load(path, allow_pickle=True).item()` reads it):
    seed dicts `{key: H x W float32}`, and psa's `cls_labels.npy` `{name: label vector}`."""
    buffer = io.BytesIO()
    np.save(buffer, dict(mapping), allow_pickle=True)
    artifacts.write_bytes(path, buffer.getvalue())
    return os.fspath(path)


def _read_seed_dict(path: str | os.PathLike) -> dict[int, np.ndarray]:
    try:
        loaded = np.load(io.BytesIO(artifacts.read_bytes(path)), allow_pickle=True)
        item = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object else None
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path}: cannot read seed file: {error}") from None
    if not isinstance(item, dict) or not all(isinstance(k, (int, np.integer)) for k in item):
        raise UserError(f"{path}: seed file must hold a pickled dict {{class_index: H x W array}}")
    return {int(k): np.asarray(v) for k, v in item.items()}


def _stack_maps(path: str | os.PathLike, maps: dict[int, np.ndarray], keys: np.ndarray,
                what: str) -> np.ndarray:
    shapes = {maps[k].shape for k in keys}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise UserError(f"{path}: {what} must all be H x W arrays of one size, got {sorted(shapes)}")
    return np.stack([maps[k] for k in keys])


def load_seed_cams(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CAM seed dict {class k: H x W} as (cams float32 K x H x W, sorted classes int64 K).

    The class indices are checked where they are used (the evaluation's sweep names the file)."""
    maps = _read_seed_dict(path)
    classes = np.array(sorted(maps), np.int64)
    if classes.size == 0:
        return np.zeros((0, 0, 0), np.float32), classes
    return _stack_maps(path, maps, classes, "seed maps").astype(np.float32, copy=False), classes


def load_seed_label(path: str | os.PathLike, labels: LabelSpace = VOC) -> np.ndarray:
    """Read a CRF seed dict {0: background, k + 1: class k} as the uint8 label map of its argmax
    (ties: the smallest key)."""
    scores = _read_seed_dict(path)
    keys = np.array(sorted(scores), np.int64)
    if keys.size == 0 or keys.min() < 0 or keys.max() > labels.num_classes:
        raise UserError(f"{path}: label seed keys must be in 0..{labels.num_classes}, got {keys.tolist()}")
    stacked = _stack_maps(path, scores, keys, "label seed maps")
    return keys.astype(np.uint8)[np.argmax(stacked, axis=0)]
