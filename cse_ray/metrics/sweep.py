"""The one-pass sweep: confusion counts of every background threshold at once, then the metrics.

An image costs one bincount over (boundary k, gt, predicted class), k being the index of the first
threshold >= the pixel's top class score (searchsorted): the pixel predicts its class below k and
background from k on. The per-threshold confusion matrices are suffix/prefix sums of those counts, taken
once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cse_ray.errors import UserError
from cse_ray.labels import IGNORE_INDEX, VOC, LabelSpace
from cse_ray.metrics.results import EvalResult, ImageStats
from cse_ray.metrics.thresholds import check_thresholds, threshold_grid

_EPS = 1e-10


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

    `thresholds=None` makes a sweep for label maps only (one confusion matrix, `add_labels`). The counts
    are kept per *boundary* k (index of the first threshold >= the pixel's top score), of shape
    (num_thresholds + 1, C, C + 1) for C = `labels.num_categories`; column C counts label pixels with no
    prediction.
    """

    def __init__(self, thresholds: Sequence[float] | np.ndarray | None = None, keep_per_image: bool = True,
                 labels: LabelSpace = VOC):
        if thresholds is None:
            self.thresholds: np.ndarray | None = None
            self._slots = 1
        else:
            self.thresholds = check_thresholds(thresholds)
            self._slots = int(self.thresholds.size)
            # The reference writes t into a float32 tensor: compare in float32 to get the same ties.
            self._thresholds32 = self.thresholds.astype(np.float32)
        self.labels = labels
        self.keep_per_image = keep_per_image
        self.num_images = 0
        categories = labels.num_categories
        self._columns = categories + 1  # the last column: "no prediction" (label pixels predicted 255)
        self._cells = categories * self._columns  # (gt, pred) cells per threshold boundary
        self._boundary_counts = np.zeros((self._slots + 1, categories, self._columns), np.int64)
        self._images: list[_ImageCounts] = []
        self._valid_span = (self._slots + 1) * self._cells
        # gt value -> offset of its cell block; 255 -> "ignored" region, anything else -> "invalid" region.
        gt_offset = np.full(256, 2 * self._valid_span, np.int64)
        gt_offset[:categories] = np.arange(categories) * self._columns
        gt_offset[IGNORE_INDEX] = self._valid_span
        self._gt_offset = gt_offset

    # -- adding images
    def add_cams(self, cams: np.ndarray, classes: Sequence[int] | np.ndarray, gt: np.ndarray,
                 name: str | None = None, source: str | None = None) -> None:
        """Add one image: `cams` K x H x W scores of the present `classes`, `gt` H x W labels.

        `name` identifies the image in per-image statistics, `source` (default: name) in error messages.
        """
        if self.thresholds is None:
            raise ValueError("this ConfusionSweep is for label maps (thresholds=None): use add_labels")
        name = name if name is not None else f"image #{self.num_images}"
        source = source or name
        gt = _as_label_array(gt, source, "ground truth")
        cams, classes = _check_cams(cams, classes, gt.shape, source, self.labels.num_classes)
        if cams.shape[0] == 0:
            keys = np.zeros(gt.shape, np.intp)  # no class present: background at every threshold
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
            keys *= self._cells
            keys += predicted
        keys += self._gt_offset[gt]
        self._add_keys(keys, name, source, gt)

    def add_labels(self, label: np.ndarray, gt: np.ndarray, name: str | None = None,
                   source: str | None = None) -> None:
        """Add one label map (0..num_classes, 255 = no prediction); it counts the same at every threshold."""
        name = name if name is not None else f"image #{self.num_images}"
        source = source or name
        gt = _as_label_array(gt, source, "ground truth")
        label = _as_label_array(label, source, "prediction")
        if label.shape != gt.shape:
            raise UserError(f"{source}: prediction is {_size(label.shape)} but its ground truth is "
                            f"{_size(gt.shape)}")
        categories = self.labels.num_categories
        histogram = np.bincount(label.reshape(-1), minlength=256)
        bad = [int(v) for v in np.flatnonzero(histogram) if v >= categories and v != IGNORE_INDEX]
        if bad:
            raise UserError(f"{source}: prediction has values {bad[:10]} outside 0..{categories - 1} and "
                            f"{IGNORE_INDEX}")
        predicted = label.astype(np.intp)
        predicted[label == IGNORE_INDEX] = categories  # the "no prediction" column
        keys = predicted + self._slots * self._cells  # boundary past the last threshold: never background
        keys += self._gt_offset[gt]
        self._add_keys(keys, name, source, gt)

    def _add_keys(self, keys: np.ndarray, name: str, source: str, gt: np.ndarray) -> None:
        span = self._valid_span
        counts = np.bincount(keys.reshape(-1), minlength=3 * span)
        if counts[2 * span:].any():
            categories = self.labels.num_categories
            bad = [int(v) for v in np.unique(gt) if v >= categories and v != IGNORE_INDEX]
            raise UserError(f"{source}: ground truth has values {bad[:10]} outside 0..{categories - 1} and "
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
        """Add another sweep's counts (same thresholds and labels) into this one; returns self."""
        same = (self.thresholds is None and other.thresholds is None) or (
            self.thresholds is not None and other.thresholds is not None
            and np.array_equal(self.thresholds, other.thresholds))
        if not same:
            raise ValueError("cannot merge ConfusionSweeps with different thresholds")
        if self.labels != other.labels:
            raise ValueError("cannot merge ConfusionSweeps of different label spaces")
        # A new array, not +=: sweeps coming back from Ray tasks hold read-only (zero-copy) arrays.
        self._boundary_counts = self._boundary_counts + other._boundary_counts
        self.num_images += other.num_images
        if self.keep_per_image:
            self._images.extend(other._images)
        return self

    @property
    def boundary_counts(self) -> np.ndarray:
        """The raw int64 counts (num_thresholds + 1, C, C + 1), for reductions outside this class
        (training sums them over workers with one all-reduce)."""
        return self._boundary_counts

    @boundary_counts.setter
    def boundary_counts(self, value: np.ndarray) -> None:
        if value.shape != self._boundary_counts.shape:
            raise ValueError(f"counts of shape {value.shape}, expected {self._boundary_counts.shape}")
        self._boundary_counts = np.asarray(value, dtype=np.int64)

    def confusions(self) -> np.ndarray:
        """int64 (num_thresholds, C, C + 1): [i, gt, pred] pixels at threshold i; column C = no prediction."""
        counts = self._boundary_counts
        slots = counts.shape[0] - 1
        # Threshold i: pixels with boundary k > i keep their class, those with k <= i become background.
        confusions = np.ascontiguousarray(np.cumsum(counts[::-1], axis=0)[::-1][1:])
        confusions[:, :, 0] += np.cumsum(counts.sum(axis=2), axis=0)[:slots]
        return confusions

    def result(self, task: str | None = None) -> EvalResult:
        """Metrics over everything added: the curve, the best threshold and its per-class numbers."""
        if self.num_images == 0:
            raise UserError("nothing to evaluate: no image was added")
        task = task or ("label" if self.thresholds is None else "cam")
        confusions = self.confusions()
        iou, false_positive, false_negative, present = _class_metrics(confusions)
        curve_values = iou.mean(axis=1) * 100.0
        best = int(np.argmax(curve_values))  # ties: the lowest threshold
        names = self.labels.category_names
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
            per_image=[self._image_stats(image, best) for image in self._images],
            labels=self.labels,
        )

    def _image_stats(self, image: _ImageCounts, best: int) -> ImageStats:
        categories, columns, cells = self.labels.num_categories, self._columns, self._cells
        boundary, rest = np.divmod(image.cells.astype(np.int64), cells)
        gt, predicted = np.divmod(rest, columns)
        predicted = np.where(boundary > best, predicted, 0)
        confusion = np.bincount(gt * columns + predicted, weights=image.counts,
                                minlength=cells).reshape(categories, columns)
        iou, _, _, _ = _class_metrics(confusion)
        gt_total = confusion.sum(axis=1)
        predicted_total = confusion[:, :categories].sum(axis=0)
        involved = (gt_total > 0) | (predicted_total > 0)
        pixels = int(image.counts.sum())
        names = self.labels.category_names
        return ImageStats(
            name=image.name, source=image.source, height=image.height, width=image.width, pixels=pixels,
            ignored=image.ignored,
            accuracy=float(np.trace(confusion[:, :categories]) / pixels * 100.0) if pixels else None,
            miou=float(iou[involved].mean() * 100.0) if involved.any() else None,
            gt_classes=[names[i] for i in np.flatnonzero(gt_total)],
            predicted_classes=[names[i] for i in np.flatnonzero(predicted_total)],
        )


def sweep_from_arrays(items: Iterable[tuple[np.ndarray, Sequence[int] | np.ndarray, np.ndarray]],
                      thresholds: Sequence[float] | np.ndarray | None = None, keep_per_image: bool = False,
                      labels: LabelSpace = VOC) -> ConfusionSweep:
    """Sweep (cams K x H x W, classes, gt H x W) triples held in memory; call `.result()` for the metrics.

    `thresholds` defaults to the default grid (0.10..0.39 step 0.01).
    """
    grid = threshold_grid() if thresholds is None else thresholds
    sweep = ConfusionSweep(grid, keep_per_image, labels)
    for cams, classes, gt in items:
        sweep.add_cams(cams, classes, gt)
    return sweep


def _class_metrics(confusions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IoU, false-positive and false-negative fractions of the union (reference's +1e-10), gt presence."""
    diagonal = np.arange(confusions.shape[-2])
    true_positive = confusions[..., diagonal, diagonal].astype(np.float64)
    ground_truth = confusions.sum(axis=-1).astype(np.float64)
    predicted = confusions[..., :diagonal.size].sum(axis=-2).astype(np.float64)
    union = ground_truth + predicted - true_positive + _EPS
    return (true_positive / union, (predicted - true_positive) / union,
            (ground_truth - true_positive) / union, ground_truth > 0)


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


def _check_cams(cams: np.ndarray, classes: Sequence[int] | np.ndarray, shape: tuple[int, ...], source: str,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams)
    classes = np.asarray(classes).reshape(-1)
    if cams.ndim != 3:
        raise UserError(f"{source}: class maps must be K x H x W, got shape {cams.shape}")
    if classes.size != cams.shape[0]:
        raise UserError(f"{source}: {cams.shape[0]} class maps but {classes.size} class indices")
    if classes.size and (not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0
                         or classes.max() >= num_classes or np.unique(classes).size != classes.size):
        raise UserError(f"{source}: class indices must be distinct integers in 0..{num_classes - 1}, "
                        f"got {classes.tolist()}")
    if (cams.shape[0] or cams.shape[1] * cams.shape[2]) and cams.shape[1:] != shape:
        raise UserError(f"{source}: prediction is {_size(cams.shape)} but its ground truth is {_size(shape)}")
    return cams, classes.astype(np.int64)
