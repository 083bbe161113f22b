"""Metrics: the one threshold grid, the sweep over any label space, and the rules that pick from results.

The sweep's counts against the reference's per-threshold loop are checked in tests/test_evaluate.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from cse_ray.errors import UserError
from cse_ray.labels import IGNORE_INDEX, custom_label_space
from cse_ray.metrics import ConfusionSweep, best_alpha, sweep_from_arrays, threshold_grid


# -------------------------------------------------------------------------------------------- the grid
def test_threshold_grid_has_no_float_drift_and_rejects_bad_ranges():
    grid = threshold_grid()
    assert grid.size == 30
    assert grid[0] == 0.1 and grid[-1] == 0.39 and grid[7] == 0.17
    assert threshold_grid(0.2, 0.3, 0.05).tolist() == [0.2, 0.25, 0.3]
    bad_ranges = [(0.3, 0.2, 0.01), (0.1, 0.2, 0.0), (-0.1, 0.2, 0.01), (0.1, 1.5, 0.01), (0.1, np.nan, 0.1)]
    for bad in bad_ranges:
        with pytest.raises(UserError, match="threshold"):
            threshold_grid(*bad)
    with pytest.raises(UserError, match="strictly increasing"):
        ConfusionSweep([0.3, 0.2])


def test_the_stop_is_included_when_on_the_grid_and_never_exceeded():
    assert threshold_grid(0.1, 0.395, 0.01).tolist() == [round(0.1 + 0.01 * i, 2) for i in range(30)]
    assert threshold_grid(0.1, 0.3999999999, 0.01)[-1] == 0.39  # 0.4 would exceed the stop
    assert threshold_grid(0.05, 0.95, 0.01).size == 91  # the demo's grid: both ends included
    assert threshold_grid(0.5, 0.5, 0.3).tolist() == [0.5]  # start == stop: one threshold, any step
    assert threshold_grid(0.0, 1.0, 0.5).tolist() == [0.0, 0.5, 1.0]


def test_a_step_larger_than_the_range_is_refused():
    """Such a grid would hold only the start: refused, so config validation can refuse it too."""
    with pytest.raises(UserError, match=r"threshold step 0.015 is larger than stop - start = 0.01"):
        threshold_grid(0.99, 1.0, 0.015)
    assert threshold_grid(0.99, 1.0, 0.01).tolist() == [0.99, 1.0]
    with pytest.raises(UserError, match="at most 10000"):
        threshold_grid(0.0, 1.0, 1e-5)


# ------------------------------------------------------------------------------------ any label space
def test_the_sweep_takes_its_categories_from_the_label_space():
    labels = custom_label_space(3)  # categories: background, class0, class1, class2
    gt = np.array([[0, 1, 1, 3], [3, 3, IGNORE_INDEX, 0]], np.uint8)
    cams = np.zeros((2, 2, 4), np.float32)
    cams[0][gt == 1] = 0.8  # class0 = category 1, found
    cams[1][gt == 3] = 0.3  # class2 = category 3, found only below threshold 0.3
    sweep = ConfusionSweep([0.2, 0.3, 0.5], labels=labels)
    sweep.add_cams(cams, [0, 2], gt, name="only")
    assert sweep.confusions().shape == (3, 4, 5)
    result = sweep.result()
    assert list(result.per_class) == ["background", "class0", "class1", "class2"]
    assert result.threshold == 0.2
    assert result.per_class["class2"] == pytest.approx(100.0) and result.per_class["class1"] == 0.0
    assert result.miou == pytest.approx(75.0)  # class1 is absent from both: it counts 0
    assert result.miou_present == pytest.approx(100.0)
    assert "4 categories" in result.to_markdown()
    (stats,) = result.per_image
    assert stats.gt_classes == ["background", "class0", "class2"] == stats.predicted_classes

    with pytest.raises(UserError, match=r"class indices must be distinct integers in 0..2, got \[3\]"):
        sweep.add_cams(cams[:1], [3], gt)
    with pytest.raises(UserError, match=r"ground truth has values \[4\] outside 0..3"):
        sweep.add_cams(cams, [0, 2], np.full(gt.shape, 4, np.uint8))
    labels_only = ConfusionSweep(None, labels=labels)
    with pytest.raises(UserError, match=r"prediction has values \[4\] outside 0..3"):
        labels_only.add_labels(np.full(gt.shape, 4, np.uint8), gt)
    with pytest.raises(ValueError, match="different label spaces"):
        sweep_from_arrays([(cams, [0, 2], gt)], [0.2, 0.3, 0.5]).merge(sweep)


def test_twenty_class_sweeps_by_default():
    sweep = sweep_from_arrays([(np.full((1, 2, 2), 0.5, np.float32), [19], np.full((2, 2), 20, np.uint8))])
    assert sweep.confusions().shape == (30, 21, 22)
    assert sweep.result().per_class["tvmonitor"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------- the rules
def test_best_alpha_prefers_the_highest_miou_then_the_smallest_alpha():
    assert best_alpha({24.0: 50.0, 6.0: 52.0, 10.0: 52.0}) == 6.0
    assert best_alpha({10.0: 52.0, 6.0: 51.0}) == 10.0
    assert best_alpha({}) is None
