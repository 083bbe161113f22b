"""Segmentation evaluation: mIoU of CAMs over every background threshold in one pass, or of label maps.

Definitions (those of the reference, METHOD.md "Evaluation"): 21 categories (background + 20 VOC classes),
ground-truth 255 = ignore. For CAMs the prediction at threshold t is argmax over [t, class maps], where
t is written into a float32 tensor (so the comparison is float32(t) against float32 scores) and ties go to
the first channel: a pixel whose top class score is s and top class c is *background exactly when
t >= s*, class c otherwise. IoU = TP / (T + P - TP + 1e-10) over the whole list; mIoU = mean over all 21
categories, so a category absent from both ground truth and prediction counts 0 (`miou_present` also
gives the mean over the categories that occur in the ground truth).

One pass for all thresholds: for each pixel we only need the index k of the first threshold >= s
(`np.searchsorted`); pixels with boundary k predict c for thresholds below index k and background from
k on. So each image costs one `np.bincount` over (k, gt, c) and the per-threshold confusion matrices are
suffix/prefix sums of those counts, computed once at the end. Files are read once.

Prediction formats (`PRED/NAME.<ext>`):
- task cam, fmt native: `NAME.npz` with `cams` (float16, K x H x W, maps in [0, 1]) and `classes`
  (int64, K class indices 0..19); write it with `save_cam_npz`, read it with `load_cam_npz`.
- task cam, fmt seed: the reference's pickled `{class_index 0..19: HxW float32}` in `NAME.npy`.
- task label, fmt native: palette PNG `NAME.png` with values 0..20; 255 means "no prediction": the pixel
  counts towards the ground-truth class (a false negative) but towards no predicted class.
- task label, fmt seed: `NAME.npy` with `{0: background, k + 1: class k}` scores; the label is the key of
  the largest score (ties: smallest key).

Parallelism rule: a local thread pool reads the files (numpy, zlib and PNG decoding release the GIL);
Ray tasks over chunks of names are used when `use_ray=True`, or when `use_ray=None`, Ray is already
initialised and the list has more than `RAY_MIN_IMAGES` (2000) images (`use_ray=True` starts a local
Ray when none is running). Ray tasks read the files by path, so prediction and ground-truth directories
must be visible to every node (local or shared filesystem).

Reported numbers are percent (0..100) in `EvalResult` and in the JSON; the JSON rounds them to 3 decimals
and thresholds to 6; the dataclass keeps full floats.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cse_ray import artifacts
from cse_ray.data.voc import CATEGORY_NAMES, IGNORE_INDEX, NUM_CLASSES, read_list, validate_name
from cse_ray.errors import UserError
from cse_ray.formats import read_label_png

NUM_CATEGORIES = NUM_CLASSES + 1  # background + classes
NO_PREDICTION = NUM_CATEGORIES  # extra confusion column: label pixels predicted 255 ("no prediction")
_COLUMNS = NUM_CATEGORIES + 1
_CELLS = NUM_CATEGORIES * _COLUMNS  # (gt, pred) cells per threshold boundary
RAY_MIN_IMAGES = 2000
DEFAULT_THRESHOLD_RANGE = (0.10, 0.39, 0.01)
TASKS = ("cam", "label")
FORMATS = ("native", "seed")
_EPS = 1e-10


# --------------------------------------------------------------------------------------------- thresholds
def threshold_grid(start: float = 0.10, stop: float = 0.39, step: float = 0.01) -> np.ndarray:
    """Thresholds start, start + step, ..., stop (stop included), rounded to 10 decimals against drift."""
    try:
        start, stop, step = float(start), float(stop), float(step)
    except (TypeError, ValueError):
        raise UserError(f"threshold range must be three numbers (start, stop, step), got "
                        f"{(start, stop, step)}") from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise UserError(f"threshold range must be finite, got {(start, stop, step)}")
    if step <= 0:
        raise UserError(f"threshold step must be > 0, got {step}")
    if not 0.0 <= start <= stop <= 1.0:
        raise UserError(f"threshold range must satisfy 0 <= start <= stop <= 1, got start={start} "
                        f"stop={stop}")
    count = int(math.floor((stop - start) / step + 1e-6)) + 1
    if count > 10000:
        raise UserError(f"threshold range gives {count} thresholds; at most 10000 are allowed")
    return np.round(start + step * np.arange(count), 10)


def _check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise UserError("thresholds: at least one threshold is needed")
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise UserError(f"thresholds must lie in [0, 1], got {values.tolist()}")
    if values.size > 1 and not np.all(np.diff(values) > 0):
        raise UserError(f"thresholds must be strictly increasing, got {values.tolist()}")
    return values


# ----------------------------------------------------------------------------------------- accumulation
@dataclass
class _ImageCounts:
    """Sparse per-image counts (flat (boundary, gt, pred) cell -> pixels) for per-image statistics."""

    name: str
    source: str
    height: int
    width: int
    ignored: int
    cells: np.ndarray  # int32 flat cell indices
    counts: np.ndarray  # int64 pixels per cell


class ConfusionSweep:
    """Confusion counts for every threshold at once; add images, merge partial sweeps, reduce once.

    `thresholds=None` makes a sweep for label maps only (one confusion matrix, `add_labels`).
    Internally the counts are kept per *boundary* k (index of the first threshold >= the pixel's top
    score), of shape (num_thresholds + 1, 21, 22); column 21 counts label pixels with no prediction.
    """

    def __init__(self, thresholds: Sequence[float] | np.ndarray | None = None, keep_per_image: bool = True):
        if thresholds is None:
            self.thresholds: np.ndarray | None = None
            self._slots = 1
        else:
            self.thresholds = _check_thresholds(thresholds)
            self._slots = int(self.thresholds.size)
            # The reference writes t into a float32 tensor: compare in float32 to get the same ties.
            self._thresholds32 = self.thresholds.astype(np.float32)
        self.keep_per_image = keep_per_image
        self.num_images = 0
        self._boundary_counts = np.zeros((self._slots + 1, NUM_CATEGORIES, _COLUMNS), np.int64)
        self._images: list[_ImageCounts] = []
        valid_span = (self._slots + 1) * _CELLS
        self._valid_span = valid_span
        # gt value -> offset of its cell block; 255 -> "ignored" region, anything else -> "invalid" region.
        gt_offset = np.full(256, 2 * valid_span, np.int64)
        gt_offset[:NUM_CATEGORIES] = np.arange(NUM_CATEGORIES) * _COLUMNS
        gt_offset[IGNORE_INDEX] = valid_span
        self._gt_offset = gt_offset

    # -- adding images
    def add_cams(self, cams: np.ndarray, classes: Sequence[int] | np.ndarray, gt: np.ndarray,
                 name: str | None = None, source: str | None = None) -> None:
        """Add one image: `cams` K x H x W scores of the present `classes` (0..19), `gt` H x W labels.

        `name` identifies the image in per-image statistics, `source` (default: name) in error messages.
        """
        if self.thresholds is None:
            raise ValueError("this ConfusionSweep is for label maps (thresholds=None): use add_labels")
        name = name if name is not None else f"image #{self.num_images}"
        source = source or name
        gt = _as_label_array(gt, source, "ground truth")
        cams, classes = _check_cams(cams, classes, gt.shape, source)
        if cams.shape[0] == 0:
            boundary = np.zeros(gt.shape, np.intp)  # no class present: background at every threshold
            keys = boundary
        else:
            order = np.argsort(classes, kind="stable")  # ties between classes go to the smaller index
            if not np.array_equal(order, np.arange(order.size)):
                cams, classes = cams[order], classes[order]
            maps = cams.astype(np.float32, copy=False)
            if np.isnan(maps).any():
                raise UserError(f"{source}: the class maps contain NaN")
            predicted = np.full(gt.shape, classes[0] + 1, np.intp)
            if maps.shape[0] == 1:
                top = maps[0]
            else:
                # argmax along the class axis, first index wins ties; a running maximum is several
                # times faster than ndarray.argmax(axis=0) for the few maps of an image.
                top = maps[0].copy()
                for class_index, class_map in zip(classes[1:], maps[1:]):
                    better = class_map > top
                    np.copyto(top, class_map, where=better)
                    np.copyto(predicted, class_index + 1, where=better)
            keys = np.searchsorted(self._thresholds32, top, side="left")
            keys *= _CELLS
            keys += predicted
        keys += self._gt_offset[gt]
        self._add_keys(keys, name, source, gt)

    def add_labels(self, label: np.ndarray, gt: np.ndarray, name: str | None = None,
                   source: str | None = None) -> None:
        """Add one label map (0..20, 255 = no prediction); it counts the same at every threshold."""
        name = name if name is not None else f"image #{self.num_images}"
        source = source or name
        gt = _as_label_array(gt, source, "ground truth")
        label = _as_label_array(label, source, "prediction")
        if label.shape != gt.shape:
            raise UserError(f"{source}: prediction is {_size(label.shape)} but its ground truth is "
                            f"{_size(gt.shape)}")
        histogram = np.bincount(label.reshape(-1), minlength=256)
        bad = [int(v) for v in np.flatnonzero(histogram) if v >= NUM_CATEGORIES and v != IGNORE_INDEX]
        if bad:
            raise UserError(f"{source}: prediction has values {bad[:10]} outside 0..{NUM_CLASSES} and "
                            f"{IGNORE_INDEX}")
        predicted = label.astype(np.intp)
        predicted[label == IGNORE_INDEX] = NO_PREDICTION
        keys = predicted + self._slots * _CELLS  # boundary past the last threshold: never background
        keys += self._gt_offset[gt]
        self._add_keys(keys, name, source, gt)

    def _add_keys(self, keys: np.ndarray, name: str, source: str, gt: np.ndarray) -> None:
        span = self._valid_span
        counts = np.bincount(keys.reshape(-1), minlength=3 * span)
        if counts[2 * span:].any():
            values = np.unique(gt)
            bad = [int(v) for v in values if v >= NUM_CATEGORIES and v != IGNORE_INDEX]
            raise UserError(f"{source}: ground truth has values {bad[:10]} outside 0..{NUM_CLASSES} and "
                            f"{IGNORE_INDEX}")
        valid = counts[:span]
        self._boundary_counts += valid.reshape(self._boundary_counts.shape)
        self.num_images += 1
        if self.keep_per_image:
            cells = np.flatnonzero(valid)
            self._images.append(_ImageCounts(name, source, int(gt.shape[0]), int(gt.shape[1]),
                                             int(counts[span:2 * span].sum()), cells.astype(np.int32),
                                             valid[cells]))

    # -- reduction
    def merge(self, other: ConfusionSweep) -> ConfusionSweep:
        """Add another sweep's counts (same thresholds) into this one; returns self."""
        same = (self.thresholds is None and other.thresholds is None) or (
            self.thresholds is not None and other.thresholds is not None
            and np.array_equal(self.thresholds, other.thresholds))
        if not same:
            raise ValueError("cannot merge ConfusionSweeps with different thresholds")
        # A new array, not +=: sweeps coming back from Ray tasks hold read-only (zero-copy) arrays.
        self._boundary_counts = self._boundary_counts + other._boundary_counts
        self.num_images += other.num_images
        if self.keep_per_image:
            self._images.extend(other._images)
        return self

    @property
    def boundary_counts(self) -> np.ndarray:
        """The raw int64 counts (num_thresholds + 1, 21, 22), for reductions outside this class
        (training sums them over workers with one all-reduce)."""
        return self._boundary_counts

    @boundary_counts.setter
    def boundary_counts(self, value: np.ndarray) -> None:
        if value.shape != self._boundary_counts.shape:
            raise ValueError(f"counts of shape {value.shape}, expected {self._boundary_counts.shape}")
        self._boundary_counts = np.asarray(value, dtype=np.int64)

    def confusions(self) -> np.ndarray:
        """int64 (num_thresholds, 21, 22): [i, gt, pred] pixels at threshold i; column 21 = no prediction."""
        return _confusions_from_boundaries(self._boundary_counts)

    def result(self, task: str | None = None) -> EvalResult:
        """Metrics over everything added: the curve, the best threshold and its per-class numbers."""
        if self.num_images == 0:
            raise UserError("nothing to evaluate: no image was added")
        task = task or ("label" if self.thresholds is None else "cam")
        confusions = self.confusions()
        iou, false_positive, false_negative, present = _class_metrics(confusions)
        curve_values = iou.mean(axis=1) * 100.0
        best = int(np.argmax(curve_values))  # ties: the lowest threshold
        names = list(CATEGORY_NAMES)
        present_best = present[best]
        miou_present = float(iou[best][present_best].mean() * 100.0) if present_best.any() else 0.0
        thresholds = None if self.thresholds is None else tuple(float(t) for t in self.thresholds)
        return EvalResult(
            task=task,
            miou=float(curve_values[best]),
            threshold=None if thresholds is None else thresholds[best],
            per_class={n: float(v * 100.0) for n, v in zip(names, iou[best])},
            curve=[] if thresholds is None else [(t, float(m)) for t, m in zip(thresholds, curve_values)],
            num_images=self.num_images,
            miou_present=miou_present,
            false_positive={n: float(v * 100.0) for n, v in zip(names, false_positive[best])},
            false_negative={n: float(v * 100.0) for n, v in zip(names, false_negative[best])},
            thresholds=thresholds,
            best_index=best,
            confusion=confusions[best],
            per_image=[_image_stats(image, best) for image in self._images],
        )


def _confusions_from_boundaries(boundary_counts: np.ndarray) -> np.ndarray:
    """Threshold i: pixels with boundary k > i keep their class, those with k <= i become background."""
    slots = boundary_counts.shape[0] - 1
    kept = np.cumsum(boundary_counts[::-1], axis=0)[::-1][1:]  # sum over k > i, for i = 0..slots-1
    confusions = np.ascontiguousarray(kept)
    confusions[:, :, 0] += np.cumsum(boundary_counts.sum(axis=2), axis=0)[:slots]
    return confusions


def _class_metrics(confusions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IoU, false-positive and false-negative fractions of the union (reference's +1e-10), gt presence."""
    diagonal = np.arange(NUM_CATEGORIES)
    true_positive = confusions[..., diagonal, diagonal].astype(np.float64)
    ground_truth = confusions.sum(axis=-1).astype(np.float64)
    predicted = confusions[..., :NUM_CATEGORIES].sum(axis=-2).astype(np.float64)
    union = ground_truth + predicted - true_positive + _EPS
    return (true_positive / union, (predicted - true_positive) / union,
            (ground_truth - true_positive) / union, ground_truth > 0)


# -------------------------------------------------------------------------------------------- results
@dataclass
class ImageStats:
    """One image at the best threshold: pixel accuracy and mIoU over the categories it involves."""

    name: str
    source: str  # the prediction file, or the name for in-memory arrays
    height: int
    width: int
    pixels: int  # labelled (non-ignored) pixels
    ignored: int
    accuracy: float | None  # percent of labelled pixels predicted right
    miou: float | None  # percent, mean IoU over categories in its ground truth or prediction
    gt_classes: list[str]
    predicted_classes: list[str]


def _image_stats(image: _ImageCounts, best: int) -> ImageStats:
    boundary, rest = np.divmod(image.cells.astype(np.int64), _CELLS)
    gt, predicted = np.divmod(rest, _COLUMNS)
    predicted = np.where(boundary > best, predicted, 0)
    confusion = np.bincount(gt * _COLUMNS + predicted, weights=image.counts,
                            minlength=_CELLS).reshape(NUM_CATEGORIES, _COLUMNS)
    iou, _, _, _ = _class_metrics(confusion)
    gt_total = confusion.sum(axis=1)
    predicted_total = confusion[:, :NUM_CATEGORIES].sum(axis=0)
    involved = (gt_total > 0) | (predicted_total > 0)
    pixels = int(image.counts.sum())
    names = CATEGORY_NAMES
    return ImageStats(
        name=image.name, source=image.source, height=image.height, width=image.width, pixels=pixels,
        ignored=image.ignored,
        accuracy=float(np.trace(confusion[:, :NUM_CATEGORIES]) / pixels * 100.0) if pixels else None,
        miou=float(iou[involved].mean() * 100.0) if involved.any() else None,
        gt_classes=[names[i] for i in np.flatnonzero(gt_total)],
        predicted_classes=[names[i] for i in np.flatnonzero(predicted_total)],
    )


@dataclass
class EvalResult:
    """Evaluation of one prediction set. Percent values; `threshold` is None for label maps."""

    task: str
    miou: float
    threshold: float | None
    per_class: dict[str, float]
    curve: list[tuple[float, float]]
    num_images: int
    miou_present: float
    false_positive: dict[str, float]
    false_negative: dict[str, float]
    thresholds: tuple[float, ...] | None = None
    best_index: int = 0
    confusion: np.ndarray | None = field(default=None, repr=False)  # 21 x 22 at the best threshold
    per_image: list[ImageStats] = field(default_factory=list, repr=False)

    def to_json_dict(self) -> dict[str, Any]:
        """The INTERFACE.md JSON plus `task`, `miou_present`, `false_positive`, `false_negative`."""
        return {
            "miou": _pct(self.miou),
            "threshold": None if self.threshold is None else round(self.threshold, 6),
            "per_class": {k: _pct(v) for k, v in self.per_class.items()},
            "curve": [[round(t, 6), _pct(m)] for t, m in self.curve],
            "num_images": self.num_images,
            "task": self.task,
            "miou_present": _pct(self.miou_present),
            "false_positive": {k: _pct(v) for k, v in self.false_positive.items()},
            "false_negative": {k: _pct(v) for k, v in self.false_negative.items()},
        }

    def to_markdown(self) -> str:
        """A Markdown summary: headline numbers, the per-class table and (task cam) the threshold curve."""
        where = "" if self.threshold is None else f" at background threshold {self.threshold:g}"
        lines = [
            f"# Evaluation ({self.task})",
            "",
            f"- mIoU (21 categories, absent ones count 0): **{self.miou:.2f}**{where}",
            f"- mIoU over categories present in the ground truth: {self.miou_present:.2f}",
            f"- images: {self.num_images}",
        ]
        if self.threshold is not None:
            lines.append("- the threshold is chosen against the ground truth (a known optimistic bias)")
        lines += ["", "| category | IoU | false positive | false negative |", "|---|---:|---:|---:|"]
        for name, value in self.per_class.items():
            lines.append(f"| {name} | {value:.2f} | {self.false_positive[name]:.2f} | "
                         f"{self.false_negative[name]:.2f} |")
        if self.curve:
            lines += ["", "| threshold | mIoU |", "|---:|---:|"]
            lines += [f"| {t:g} | {m:.2f}{' (best)' if i == self.best_index else ''} |"
                      for i, (t, m) in enumerate(self.curve)]
        return "\n".join(lines) + "\n"

    def summary_table(self) -> str:
        """A compact plain-text table for the terminal."""
        where = "" if self.threshold is None else f" at threshold {self.threshold:g}"
        lines = [f"mIoU {self.miou:.2f}{where} over {self.num_images} images "
                 f"(present categories: {self.miou_present:.2f})"]
        items = list(self.per_class.items())
        for row in range(0, len(items), 3):
            lines.append("  ".join(f"{name:>12s} {value:6.2f}" for name, value in items[row:row + 3]))
        return "\n".join(lines)


def _pct(value: float) -> float:
    return round(float(value), 3)


# ----------------------------------------------------------------------------------------- array checks
def _size(shape: Sequence[int]) -> str:
    return f"{shape[-1]}x{shape[-2]} (WxH)"


def _as_label_array(values: np.ndarray, source: str, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise UserError(f"{source}: {what} must be a 2-D label map, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise UserError(f"{source}: {what} has values outside 0..255")
        array = array.astype(np.uint8)
    return array


def _check_cams(cams: np.ndarray, classes: Sequence[int] | np.ndarray, shape: tuple[int, ...],
                source: str) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams)
    classes = np.asarray(classes).reshape(-1)
    if cams.ndim != 3:
        raise UserError(f"{source}: class maps must be K x H x W, got shape {cams.shape}")
    if classes.size != cams.shape[0]:
        raise UserError(f"{source}: {cams.shape[0]} class maps but {classes.size} class indices")
    if classes.size and (not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0
                         or classes.max() >= NUM_CLASSES or np.unique(classes).size != classes.size):
        raise UserError(f"{source}: class indices must be distinct integers in 0..{NUM_CLASSES - 1}, "
                        f"got {classes.tolist()}")
    if (cams.shape[0] or cams.shape[1] * cams.shape[2]) and cams.shape[1:] != shape:
        raise UserError(f"{source}: prediction is {_size(cams.shape)} but its ground truth is {_size(shape)}")
    return cams, classes.astype(np.int64)


def sweep_from_arrays(items: Iterable[tuple[np.ndarray, Sequence[int] | np.ndarray, np.ndarray]],
                      thresholds: Sequence[float] | np.ndarray | None = None,
                      keep_per_image: bool = False) -> ConfusionSweep:
    """Sweep (cams K x H x W, classes, gt H x W) triples held in memory, e.g. during training validation.

    `thresholds` defaults to 0.10..0.39 step 0.01; call `.result()` for the metrics.
    """
    sweep = ConfusionSweep(threshold_grid() if thresholds is None else thresholds, keep_per_image)
    for cams, classes, gt in items:
        sweep.add_cams(cams, classes, gt)
    return sweep


# --------------------------------------------------------------------------------------------- readers
def save_cam_npz(path: str | os.PathLike[str], cams: np.ndarray, classes: Sequence[int] | np.ndarray) -> Path:
    """Write the native CAM file: `cams` float16 K x H x W in [0, 1], `classes` int64 K (indices 0..19)."""
    cams = np.asarray(cams)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != classes.size:
        raise ValueError(f"save_cam_npz: cams must be K x H x W with K = len(classes), got {cams.shape} "
                         f"and {classes.size} classes")
    if classes.size and (classes.min() < 0 or classes.max() >= NUM_CLASSES):
        raise ValueError(f"save_cam_npz: class indices must be in 0..{NUM_CLASSES - 1}, "
                         f"got {classes.tolist()}")
    artifacts.write_npz(path, cams=cams.astype(np.float16), classes=classes)
    return Path(path)


def load_cam_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a native CAM file, local or remote: (cams float32 K x H x W, classes int64 K)."""
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


def _load_seed_dict(path: str | os.PathLike[str]) -> dict[int, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=True)
        item = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object else None
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path}: cannot read seed file: {error}") from None
    if not isinstance(item, dict) or not all(isinstance(k, (int, np.integer)) for k in item):
        raise UserError(f"{path}: seed file must hold a pickled dict {{class_index: H x W array}}")
    return {int(k): np.asarray(v) for k, v in item.items()}


def load_seed_cams(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read the reference's CAM `.npy` dict {class 0..19: H x W} as (cams float32, sorted classes)."""
    maps = _load_seed_dict(path)
    classes = np.array(sorted(maps), np.int64)
    if classes.size == 0:
        return np.zeros((0, 0, 0), np.float32), classes
    shapes = {maps[k].shape for k in classes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise UserError(f"{path}: seed maps must all be H x W arrays of one size, got {sorted(shapes)}")
    return np.stack([maps[k].astype(np.float32, copy=False) for k in classes]), classes


def load_seed_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Read the reference's CRF `.npy` dict {0: background, k+1: class k} and take the argmax as labels."""
    scores = _load_seed_dict(path)
    keys = np.array(sorted(scores), np.int64)
    if keys.size == 0 or keys.min() < 0 or keys.max() > NUM_CLASSES:
        raise UserError(f"{path}: label seed keys must be in 0..{NUM_CLASSES}, got {keys.tolist()}")
    shapes = {scores[k].shape for k in keys}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise UserError(f"{path}: label seed maps must all be H x W arrays of one size, got {sorted(shapes)}")
    stacked = np.stack([scores[k] for k in keys])
    return keys.astype(np.uint8)[np.argmax(stacked, axis=0)]


def _read_png(path: str, what: str) -> np.ndarray:
    """A palette/grayscale PNG of class indices; unreadable files become a UserError naming them."""
    try:
        return read_label_png(path)
    except UserError:
        raise
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read {what} PNG: {error}") from None


def prediction_suffix(task: str, fmt: str) -> str:
    """File extension of one prediction for a task and format."""
    return {("cam", "native"): ".npz", ("cam", "seed"): ".npy",
            ("label", "native"): ".png", ("label", "seed"): ".npy"}[(task, fmt)]


# -------------------------------------------------------------------------------------------- evaluate
def _sweep_chunk(pred_dir: str, gt_dir: str, names: Sequence[str], task: str, fmt: str,
                 thresholds: np.ndarray | None, keep_per_image: bool) -> ConfusionSweep:
    """Read and add one chunk of images (runs in a thread or a Ray task)."""
    sweep = ConfusionSweep(thresholds, keep_per_image)
    suffix = prediction_suffix(task, fmt)
    for name in names:
        pred_path = os.path.join(pred_dir, name + suffix)
        gt = _read_png(os.path.join(gt_dir, name + ".png"), "ground-truth")
        if task == "cam":
            cams, classes = load_cam_npz(pred_path) if fmt == "native" else load_seed_cams(pred_path)
            sweep.add_cams(cams, classes, gt, name=name, source=pred_path)
        else:
            label = _read_png(pred_path, "label") if fmt == "native" else load_seed_label(pred_path)
            sweep.add_labels(label, gt, name=name, source=pred_path)
    return sweep


def _chunks(names: Sequence[str], count: int) -> list[list[str]]:
    count = max(1, min(count, len(names)))
    bounds = np.linspace(0, len(names), count + 1).round().astype(int)
    return [list(names[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _missing(directory: str, names: Sequence[str], suffix: str) -> list[str]:
    return [n for n in names if not os.path.isfile(os.path.join(directory, n + suffix))]


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def evaluate(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str], names: Sequence[str],
             task: str = "cam", fmt: str = "native", thresholds: Sequence[float] | np.ndarray | None = None,
             workers: int | None = None, use_ray: bool | None = None,
             keep_per_image: bool = True) -> EvalResult:
    """Evaluate `PRED/NAME.*` against `GT/NAME.png` for every name, reading each file once.

    task "cam": sweep `thresholds` (default 0.10..0.39 step 0.01) and report the best; task "label":
    label maps, no threshold. See the module docstring for formats and for when Ray is used.
    """
    if task not in TASKS:
        raise UserError(f"task must be one of {TASKS}, got {task!r}")
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {fmt!r}")
    names = [str(n) for n in names]
    if not names:
        raise UserError("the image list is empty: nothing to evaluate")
    for name in names:
        validate_name(name)
    if task == "cam":
        grid = threshold_grid() if thresholds is None else _check_thresholds(thresholds)
    elif thresholds is not None:
        raise UserError("thresholds apply to task 'cam' only; label maps are evaluated as they are")
    else:
        grid = None
    pred_dir, gt_dir = os.fspath(pred_dir), os.fspath(gt_dir)
    for directory, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not os.path.isdir(directory):
            raise UserError(f"{directory}: {what} directory does not exist")
    suffix = prediction_suffix(task, fmt)
    for directory, ext, what in ((pred_dir, suffix, "predictions"), (gt_dir, ".png", "ground truths")):
        missing = _missing(directory, names, ext)
        if missing:
            raise UserError(f"{directory}: {len(missing)} of {len(names)} listed images have no {what} "
                            f"(NAME{ext}); first ten: {', '.join(missing[:10])}")

    if use_ray is None:
        use_ray = len(names) > RAY_MIN_IMAGES and _ray_is_initialized()
    if use_ray:
        sweep = _run_on_ray(pred_dir, gt_dir, names, task, fmt, grid, keep_per_image)
    else:
        sweep = _run_locally(pred_dir, gt_dir, names, task, fmt, grid, keep_per_image, workers)
    return sweep.result(task)


def _run_locally(pred_dir: str, gt_dir: str, names: list[str], task: str, fmt: str, grid: np.ndarray | None,
                 keep_per_image: bool, workers: int | None) -> ConfusionSweep:
    workers = _default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(names) < 8:
        return _sweep_chunk(pred_dir, gt_dir, names, task, fmt, grid, keep_per_image)
    chunks = _chunks(names, workers * 4)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cse-ray-eval") as pool:
        parts = list(pool.map(lambda chunk: _sweep_chunk(pred_dir, gt_dir, chunk, task, fmt, grid,
                                                         keep_per_image), chunks))
    total = parts[0]
    for part in parts[1:]:
        total.merge(part)
    return total


def _ray_is_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _run_on_ray(pred_dir: str, gt_dir: str, names: list[str], task: str, fmt: str, grid: np.ndarray | None,
                keep_per_image: bool) -> ConfusionSweep:
    """One Ray task per chunk of names (about four per CPU), partial sweeps merged on the driver."""
    import ray

    if not ray.is_initialized():
        ray.init()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_count = min(len(names), max(cpus * 4, math.ceil(len(names) / 500)))
    remote_chunk = ray.remote(num_cpus=1)(_sweep_chunk)
    pred_dir, gt_dir = artifacts.absolute(pred_dir), artifacts.absolute(gt_dir)  # tasks run elsewhere
    pending = [remote_chunk.remote(pred_dir, gt_dir, chunk, task, fmt, grid, keep_per_image)
               for chunk in _chunks(names, chunk_count)]
    try:
        parts = ray.get(pending)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise UserError(str(error.cause)) from None
        raise
    total = parts[0]
    for part in parts[1:]:
        total.merge(part)
    return total


# --------------------------------------------------------------------------------------------- reports
def report_paths(out_json: str | os.PathLike[str]) -> dict[str, str]:
    """Where `write_reports` puts each report, beside the JSON: STEM.md, STEM.images.parquet, STEM.curve.png.

    Plain string handling, so that `s3://`/`gs://` URIs work as well as local paths.
    """
    out = os.fspath(out_json)
    stem = out[: -len(".json")] if out.endswith(".json") else out
    return {"json": out, "markdown": f"{stem}.md", "per_image": f"{stem}.images.parquet",
            "plot": f"{stem}.curve.png"}


def per_image_table(result: EvalResult) -> Any:
    """The per-image statistics as a pyarrow Table (one row per image)."""
    import pyarrow as pa

    rows = result.per_image
    return pa.table({
        "name": pa.array([r.name for r in rows], pa.string()),
        "prediction_file": pa.array([r.source for r in rows], pa.string()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "width": pa.array([r.width for r in rows], pa.int32()),
        "pixels": pa.array([r.pixels for r in rows], pa.int64()),
        "ignored_pixels": pa.array([r.ignored for r in rows], pa.int64()),
        "accuracy": pa.array([r.accuracy for r in rows], pa.float64()),
        "miou": pa.array([r.miou for r in rows], pa.float64()),
        "gt_classes": pa.array([r.gt_classes for r in rows], pa.list_(pa.string())),
        "predicted_classes": pa.array([r.predicted_classes for r in rows], pa.list_(pa.string())),
    })


def write_tensorboard(result: EvalResult, log_dir: str | os.PathLike[str], step: int = 0,
                      prefix: str = "eval") -> None:
    """Scalars `eval/miou`, `eval/miou_present`, `eval/threshold`, `eval/iou/<class>` at `step`, and the
    curve as `eval/curve_miou` (and `eval/curve_threshold`) with step = threshold index."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=os.fspath(log_dir))
    try:
        writer.add_scalar(f"{prefix}/miou", result.miou, step)
        writer.add_scalar(f"{prefix}/miou_present", result.miou_present, step)
        if result.threshold is not None:
            writer.add_scalar(f"{prefix}/threshold", result.threshold, step)
        for name, value in result.per_class.items():
            writer.add_scalar(f"{prefix}/iou/{name}", value, step)
        for index, (threshold, miou) in enumerate(result.curve):
            writer.add_scalar(f"{prefix}/curve_miou", miou, index)
            writer.add_scalar(f"{prefix}/curve_threshold", threshold, index)
    finally:
        writer.close()


def write_reports(result: EvalResult, out_json: str | os.PathLike[str],
                  log_dir: str | os.PathLike[str] | None = None, step: int = 0) -> dict[str, str]:
    """Write the JSON, a Markdown table, per-image Parquet and (task cam) the curve PNG, each atomically
    (`cse_ray.artifacts`, local path or URI); TensorBoard scalars too when `log_dir` is given.
    Returns {kind: path written}."""
    from cse_ray.plots import render_line_plot

    paths = report_paths(out_json)
    artifacts.write_json(paths["json"], result.to_json_dict())
    artifacts.write_text(paths["markdown"], result.to_markdown())
    artifacts.write_parquet(paths["per_image"], per_image_table(result))
    written = {k: paths[k] for k in ("json", "markdown", "per_image")}
    if result.curve and result.threshold is not None:
        png = render_line_plot(result.curve, title=f"CAM mIoU against background threshold "
                               f"({result.num_images} images)", x_label="background threshold",
                               y_label="mIoU (%)", highlight=(result.threshold, result.miou),
                               highlight_text=f"best {result.miou:.2f} at {result.threshold:g}")
        artifacts.write_bytes(paths["plot"], png)
        written["plot"] = paths["plot"]
    if log_dir is not None:
        write_tensorboard(result, log_dir, step)
        written["tensorboard"] = os.fspath(log_dir)
    return written


# ------------------------------------------------------------------------------------------------- CLI
def run_evaluate(pred: str, gt: str, list_path: str, task: str, fmt: str, out: str | None,
                 thresholds: tuple[float, float, float] | None, log_dir: str | None = None,
                 workers: int | None = None, use_ray: bool | None = None) -> EvalResult:
    """`cse-ray evaluate`: read the list, evaluate, print a short table, write reports when `out` is given.

    `thresholds` is (start, stop, step) with stop included, task cam only.
    """
    names = read_list(list_path)
    if not names:
        raise UserError(f"{list_path}: the image list is empty: nothing to evaluate")
    grid = None
    if thresholds is not None:
        if task != "cam":
            raise UserError("--thresholds applies to --task cam only")
        if len(thresholds) != 3:
            raise UserError(f"thresholds must be (start, stop, step), got {thresholds}")
        grid = threshold_grid(*(float(v) for v in thresholds))
    result = evaluate(pred, gt, names, task=task, fmt=fmt, thresholds=grid, workers=workers, use_ray=use_ray)
    print(result.summary_table())
    if out is not None:
        for kind, path in write_reports(result, out, log_dir=log_dir).items():
            print(f"{kind}: {path}")
    return result
