"""Image-level labels: multi-hot class vectors, and the one reader and one writer of their files.

Class k of the LabelSpace is entry k of a float32 vector. A `.npy` file is psa/OC-CSE's `cls_labels.npy`
(a pickled {name: float32[C]} dict), so lists made here work with the reference code and back; a `.json`
file holds {"classes": [...], "labels": {name: [class names]}} for humans and other tools.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from cse_ray import artifacts
from cse_ray.data.names import validate_name
from cse_ray.errors import UserError
from cse_ray.formats import write_seed_dict
from cse_ray.labels import VOC, LabelSpace

LABELS_FILE = "cls_labels.npy"


def multi_hot(class_names: Iterable[str], where: str, space: LabelSpace = VOC) -> np.ndarray:
    """The vector of the named classes; an unknown name is a UserError that starts with `where`."""
    index = space.class_index()
    vec = np.zeros(space.num_classes, np.float32)
    for class_name in class_names:
        if class_name not in index:
            raise UserError(
                f"{where}: unknown class name {class_name!r} "
                f"(expected one of the {space.num_classes} {space.dataset.upper()} classes)"
            )
        vec[index[class_name]] = 1.0
    return vec


def save_labels(
    path: str | os.PathLike, labels: dict[str, np.ndarray], space: LabelSpace = VOC
) -> Path:
    """Write image-level labels: `.json` as class names, anything else as psa's pickled-dict `.npy`."""
    path = Path(path)
    clean = {
        validate_name(name): np.asarray(vec, np.float32).reshape(space.num_classes)
        for name, vec in labels.items()
    }
    if path.suffix == ".json":
        names_of = {name: [space.class_names[k] for k in np.flatnonzero(vec)] for name, vec in clean.items()}
        payload = {"classes": list(space.class_names), "labels": dict(sorted(names_of.items()))}
        artifacts.write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    else:
        write_seed_dict(path, clean)
    return path


def load_labels(path: str | os.PathLike, space: LabelSpace = VOC) -> dict[str, np.ndarray]:
    """Read a labels file written by `save_labels` (or psa's cls_labels.npy)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: labels file not found")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))["labels"]
            return {name: multi_hot(names, f"{path}, image {name!r}", space) for name, names in raw.items()}
        loaded = np.load(path, allow_pickle=True)
        raw = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object else None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a pickled dict {{name: {space.num_classes} floats}} "
                            "(psa cls_labels.npy format)")
        labels = {}
        for name, vec in raw.items():
            array = np.asarray(vec, np.float32).reshape(-1)
            if array.shape != (space.num_classes,):
                raise UserError(
                    f"{path}: label of {name!r} has {array.size} entries, expected {space.num_classes}"
                )
            labels[str(name)] = array
        return labels
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable labels file ({exc})") from None


def cached_labels(
    names: list[str],
    label_of: Callable[[str], np.ndarray],
    cache_path: str | os.PathLike | None = None,
    space: LabelSpace = VOC,
) -> dict[str, np.ndarray]:
    """Labels of `names` from `cache_path` when it covers them all; else from `label_of(name)`, and the
    cache is then rewritten with the old and new entries."""
    cached: dict[str, np.ndarray] = {}
    if cache_path is not None and Path(cache_path).is_file():
        cached = load_labels(cache_path, space)
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
    labels = {name: label_of(name) for name in names}
    if cache_path is not None:
        save_labels(cache_path, {**cached, **labels}, space)
    return labels
