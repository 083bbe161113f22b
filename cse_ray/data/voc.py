"""PASCAL VOC 2012 (+ SBD) layout: class names, palette, lists, images, masks and image-level labels.

This module is the single home of the class names, the palette and NUM_CLASSES, so that every stage
agrees on what index k means. Everything that reads user files turns bad input into a UserError that
names the file and the problem, because a half-broken dataset is the most common way a long run fails.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cse_ray import artifacts
from cse_ray.config import is_list_name
from cse_ray.errors import UserError
from cse_ray.formats import DECODE_ERRORS, read_label_png, write_seed_dict
from cse_ray.labels import IGNORE_INDEX, VOC

CLASS_NAMES: tuple[str, ...] = VOC.class_names
NUM_CLASSES = VOC.num_classes
CATEGORY_NAMES: tuple[str, ...] = VOC.category_names
CLASS_INDEX: dict[str, int] = VOC.class_index()

JPEG_EOI = b"\xff\xd9"
LABELS_FILE = "cls_labels.npy"


# ------------------------------------------------------------------------------------------ names/lists
def validate_name(name: str) -> str:
    """Reject names that could escape the dataset folders (path separators, '..', empty)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"image name {name!r} is empty")
    if "/" in name or "\\" in name or ".." in name or "\x00" in name:
        raise UserError(f"image name {name!r} must not contain '/', '\\', '..' or NUL")
    if name != name.strip():
        raise UserError(f"image name {name!r} has leading or trailing whitespace")
    return name


_PSA_LINE = re.compile(r"^/?JPEGImages/([^/\s]+)\.jpg$")


def read_list(path: str | os.PathLike) -> list[str]:
    """Names from a list file: one NAME per line, or the psa/OC-CSE form
    `/JPEGImages/NAME.jpg /SegmentationClassAug/NAME.png`. Blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: image list file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read image list ({exc})") from None
    names: list[str] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        match = _PSA_LINE.match(tokens[0])
        if match:
            candidate = match.group(1)
        elif len(tokens) == 1:
            candidate = tokens[0]
        else:
            raise UserError(
                f"{path}:{line_number}: expected 'NAME' or '/JPEGImages/NAME.jpg ...', got {line!r}"
            )
        try:
            names.append(validate_name(candidate))
        except UserError as exc:
            raise UserError(f"{path}:{line_number}: {exc}") from None
    return names


def write_list(path: str | os.PathLike, names: Iterable[str]) -> Path:
    """One name per line, written atomically."""
    names = [validate_name(name) for name in names]
    artifacts.write_text(path, "".join(f"{name}\n" for name in names))
    return Path(path)


def list_path(root: str | os.PathLike, list_name_or_path: str | os.PathLike) -> Path:
    """`"train"` -> ROOT/ImageSets/Segmentation/train.txt; anything that looks like a path is used as is."""
    text = str(list_name_or_path)
    if is_list_name(list_name_or_path):
        return Path(root) / "ImageSets" / "Segmentation" / f"{text}.txt"
    return Path(list_name_or_path)


def image_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / "JPEGImages" / f"{validate_name(name)}.jpg"


def annotation_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / "Annotations" / f"{validate_name(name)}.xml"


def mask_path(root: str | os.PathLike, name: str, sbd_root: str | os.PathLike | None = None) -> Path:
    """VOC's SegmentationClass/NAME.png if present, else SBD's SegmentationClassAug/NAME.png.

    Without `sbd_root`, ROOT/SegmentationClassAug (the psa layout) is tried. When nothing exists the VOC
    path is returned, so that the error a caller raises names the expected file.
    """
    voc = Path(root) / "SegmentationClass" / f"{validate_name(name)}.png"
    if voc.is_file():
        return voc
    aug_root = Path(sbd_root) if sbd_root is not None else Path(root)
    aug = aug_root / "SegmentationClassAug" / f"{name}.png"
    if aug.is_file() or sbd_root is not None:
        return aug
    return voc


def _jpeg_ends_with_eoi(path: Path) -> bool:
    """Cheap truncation test: a complete JPEG ends with the EOI marker (padding bytes tolerated)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64))
        tail = handle.read()
    return JPEG_EOI in tail.rstrip(b"\x00\r\n ")[-16:]


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
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


def check_images(root: str | os.PathLike, names: Iterable[str]) -> None:
    """Up-front check before a long run: every image exists, has a readable header, and a JPEG is complete.

    All problems are collected and reported at once (count + the first 10), rather than failing an hour in.
    """
    names = list(names)
    problems: list[str] = []
    for name in names:
        path = image_path(root, name)
        problem = _image_problem(path)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        folder = Path(root) / "JPEGImages"
        count = f"{len(problems)} of {len(names)} images"
        raise UserError(f"{count} under {folder} have problems:\n  {shown}{more}")


# ------------------------------------------------------------------------------------ image-level labels
def _classes_from_xml(path: Path) -> np.ndarray:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise UserError(f"{path}: malformed annotation XML ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read annotation ({exc})") from None
    multi_hot = np.zeros(NUM_CLASSES, np.float32)
    for obj in tree.getroot().findall("object"):
        name_node = obj.find("name")
        class_name = (name_node.text or "").strip() if name_node is not None else ""
        if class_name not in CLASS_INDEX:
            raise UserError(f"{path}: unknown class name {class_name!r} (expected one of the 20 VOC classes)")
        multi_hot[CLASS_INDEX[class_name]] = 1.0
    return multi_hot


def _classes_from_mask(path: Path) -> np.ndarray:
    mask = read_label_png(path)
    values = np.unique(mask)
    bad = [int(v) for v in values if NUM_CLASSES < v < IGNORE_INDEX]
    if bad:
        raise UserError(f"{path}: mask has values {bad} outside 0..{NUM_CLASSES} and {IGNORE_INDEX}")
    multi_hot = np.zeros(NUM_CLASSES, np.float32)
    for value in values:
        if 1 <= value <= NUM_CLASSES:
            multi_hot[value - 1] = 1.0
    return multi_hot


def image_label(root: str | os.PathLike, name: str, sbd_root: str | os.PathLike | None = None) -> np.ndarray:
    """20-dim float32 multi-hot from Annotations/NAME.xml, else from the classes in the mask PNG."""
    xml = annotation_path(root, name)
    if xml.is_file():
        return _classes_from_xml(xml)
    mask = mask_path(root, name, sbd_root)
    if mask.is_file():
        return _classes_from_mask(mask)
    raise UserError(f"no image-level label for {name!r}: neither {xml} nor {mask} exists")


def save_labels(path: str | os.PathLike, labels: dict[str, np.ndarray]) -> Path:
    """Write image-level labels. `.npy`: psa/OC-CSE's cls_labels.npy (a pickled {name: float32[20]} dict);
    `.json`: {"classes": [...], "labels": {name: [class names]}} for humans and other tools."""
    path = Path(path)
    clean = {
        validate_name(name): np.asarray(vec, np.float32).reshape(NUM_CLASSES) for name, vec in labels.items()
    }
    if path.suffix == ".json":
        payload = {
            "classes": list(CLASS_NAMES),
            "labels": {
                name: [CLASS_NAMES[k] for k in np.flatnonzero(vec)] for name, vec in sorted(clean.items())
            },
        }
        artifacts.write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    else:
        write_seed_dict(path, clean)
    return path


def load_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a labels file written by `save_labels` (or psa's cls_labels.npy)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: labels file not found")
    try:
        if path.suffix == ".json":
            payload = json.loads(path.read_text(encoding="utf-8"))
            raw = payload["labels"]
            labels = {}
            for name, class_names in raw.items():
                vec = np.zeros(NUM_CLASSES, np.float32)
                for class_name in class_names:
                    if class_name not in CLASS_INDEX:
                        raise UserError(f"{path}: unknown class name {class_name!r} for {name!r}")
                    vec[CLASS_INDEX[class_name]] = 1.0
                labels[name] = vec
            return labels
        loaded = np.load(path, allow_pickle=True)
        raw = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object else None
        if not isinstance(raw, dict):
            raise UserError(
                f"{path}: expected a pickled dict {{name: 20 floats}} (psa cls_labels.npy format)"
            )
        labels = {}
        for name, vec in raw.items():
            array = np.asarray(vec, np.float32).reshape(-1)
            if array.shape != (NUM_CLASSES,):
                raise UserError(f"{path}: label of {name!r} has {array.size} entries, expected {NUM_CLASSES}")
            labels[str(name)] = array
        return labels
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable labels file ({exc})") from None


def read_image_labels(
    root: str | os.PathLike,
    names: Iterable[str],
    cache_path: str | os.PathLike | None = None,
    sbd_root: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Image-level multi-hot labels for `names`, reusing `cache_path` when it already covers them all."""
    names = [validate_name(name) for name in names]
    cached: dict[str, np.ndarray] = {}
    if cache_path is not None and Path(cache_path).is_file():
        cached = load_labels(cache_path)
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
    labels = {name: image_label(root, name, sbd_root) for name in names}
    if cache_path is not None:
        save_labels(cache_path, {**cached, **labels})
    return labels


# ------------------------------------------------------------------------------------------------ lists
def _sbd_names(sbd_root: Path) -> list[str]:
    """SBD image names: its train.txt/val.txt lists if present, else the SegmentationClassAug PNGs."""
    lists = [sbd_root / "train.txt", sbd_root / "val.txt"]
    if any(path.is_file() for path in lists):
        names: list[str] = []
        for path in lists:
            if path.is_file():
                names.extend(read_list(path))
        return names
    aug = sbd_root / "SegmentationClassAug"
    if not aug.is_dir():
        raise UserError(
            f"{sbd_root}: SBD root has neither train.txt/val.txt nor a SegmentationClassAug folder"
        )
    return sorted(validate_name(path.stem) for path in aug.glob("*.png"))


def write_lists(
    voc_root: str | os.PathLike, out_dir: str | os.PathLike, sbd_root: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Write train.txt, val.txt, train_aug.txt (VOC train + SBD - VOC val) and cls_labels.npy to `out_dir`."""
    voc_root, out_dir = Path(voc_root), Path(out_dir)
    if not voc_root.is_dir():
        raise UserError(f"{voc_root}: VOC root folder not found")
    train = read_list(list_path(voc_root, "train"))
    val = read_list(list_path(voc_root, "val"))
    val_set = set(val)
    train_aug = list(dict.fromkeys(name for name in train if name not in val_set))
    if sbd_root is not None:
        seen = set(train_aug)
        extra = sorted(
            {name for name in _sbd_names(Path(sbd_root)) if name not in val_set and name not in seen}
        )
        train_aug.extend(extra)
    out = {
        "train": write_list(out_dir / "train.txt", train),
        "val": write_list(out_dir / "val.txt", val),
        "train_aug": write_list(out_dir / "train_aug.txt", train_aug),
    }
    everything = list(dict.fromkeys(train_aug + train + val))
    labels = {name: image_label(voc_root, name, sbd_root) for name in everything}
    out["labels"] = save_labels(out_dir / LABELS_FILE, labels)
    return out
