"""The PASCAL VOC 2012 (+ SBD) layout: where lists, images, masks and annotations live, the up-front image
check, image-level labels from annotation XML or masks, and `write_lists` (`cse-ray data lists`).

Class names come from `cse_ray.labels.VOC` (aliased below for this module's users); functions that map
class names or mask values to indices take a LabelSpace, so another dataset in the same layout reuses
them. Everything that reads user files turns bad input into a UserError that names the file and the
problem, because a half-broken dataset is the most common way a long run fails.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cse_ray.config import is_list_name
from cse_ray.data.image_labels import LABELS_FILE, cached_labels, multi_hot, save_labels
from cse_ray.data.image_labels import load_labels as load_labels  # re-exported: the VOC layout's label file
from cse_ray.data.names import read_list, validate_name, write_list
from cse_ray.errors import UserError
from cse_ray.formats import image_problem, read_label_png
from cse_ray.labels import IGNORE_INDEX, VOC, LabelSpace

CLASS_NAMES: tuple[str, ...] = VOC.class_names
NUM_CLASSES = VOC.num_classes
CATEGORY_NAMES: tuple[str, ...] = VOC.category_names
CLASS_INDEX: dict[str, int] = VOC.class_index()



# ------------------------------------------------------------------------------------------------ paths
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


def check_images(root: str | os.PathLike, names: Iterable[str]) -> None:
    """Up-front check before a long run: every image exists, has a readable header, and a JPEG is complete.

    All problems are collected and reported at once (count + the first 10), rather than failing an hour in.
    """
    names = list(names)
    problems: list[str] = []
    for name in names:
        path = image_path(root, name)
        problem = image_problem(path)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        folder = Path(root) / "JPEGImages"
        count = f"{len(problems)} of {len(names)} images"
        raise UserError(f"{count} under {folder} have problems:\n  {shown}{more}")


# ------------------------------------------------------------------------------------ image-level labels
def _classes_from_xml(path: Path, space: LabelSpace) -> np.ndarray:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise UserError(f"{path}: malformed annotation XML ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read annotation ({exc})") from None
    names = []
    for obj in tree.getroot().findall("object"):
        name_node = obj.find("name")
        names.append((name_node.text or "").strip() if name_node is not None else "")
    return multi_hot(names, str(path), space)


def _classes_from_mask(path: Path, space: LabelSpace) -> np.ndarray:
    mask = read_label_png(path)
    values = np.unique(mask)
    count = space.num_classes
    bad = [int(v) for v in values if count < v < IGNORE_INDEX]
    if bad:
        raise UserError(f"{path}: mask has values {bad} outside 0..{count} and {IGNORE_INDEX}")
    vec = np.zeros(count, np.float32)
    for value in values:
        if 1 <= value <= count:
            vec[value - 1] = 1.0
    return vec


def image_label(
    root: str | os.PathLike, name: str, sbd_root: str | os.PathLike | None = None, space: LabelSpace = VOC
) -> np.ndarray:
    """float32 multi-hot (one entry per class) from Annotations/NAME.xml, else from the mask's classes."""
    xml = annotation_path(root, name)
    if xml.is_file():
        return _classes_from_xml(xml, space)
    mask = mask_path(root, name, sbd_root)
    if mask.is_file():
        return _classes_from_mask(mask, space)
    raise UserError(f"no image-level label for {name!r}: neither {xml} nor {mask} exists")


def read_image_labels(
    root: str | os.PathLike,
    names: Iterable[str],
    cache_path: str | os.PathLike | None = None,
    sbd_root: str | os.PathLike | None = None,
    space: LabelSpace = VOC,
) -> dict[str, np.ndarray]:
    """Image-level multi-hot labels for `names`, reusing `cache_path` when it already covers them all."""
    names = [validate_name(name) for name in names]
    return cached_labels(names, lambda name: image_label(root, name, sbd_root, space), cache_path, space)


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
    voc_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    sbd_root: str | os.PathLike | None = None,
    space: LabelSpace = VOC,
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
    labels = {name: image_label(voc_root, name, sbd_root, space) for name in everything}
    out["labels"] = save_labels(out_dir / LABELS_FILE, labels, space)
    return out
