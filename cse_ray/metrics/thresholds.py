"""The one background-threshold grid (config validation, training, Tune and `cse-ray evaluate` all call
it) and the check of any explicit threshold list."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cse_ray.errors import UserError

DEFAULT_THRESHOLD_RANGE = (0.10, 0.39, 0.01)
MAX_THRESHOLDS = 10000


def threshold_grid(start: float = DEFAULT_THRESHOLD_RANGE[0], stop: float = DEFAULT_THRESHOLD_RANGE[1],
                   step: float = DEFAULT_THRESHOLD_RANGE[2]) -> np.ndarray:
    """THE background-threshold grid: start, start + step, ... up to stop (included when on the grid,
    never exceeded), rounded to 10 decimals so that 0.1 + 3 * 0.01 is exactly 0.13.

    A step larger than stop - start (when stop > start) is refused: the grid would hold only `start`.
    """
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
    steps = (stop - start) / step + 1e-6  # the tolerance keeps a stop that drifted below the grid
    if stop > start and steps < 1:
        raise UserError(f"threshold step {step:g} is larger than stop - start = {stop - start:g}: the grid "
                        f"would hold only the start {start:g}")
    count = int(math.floor(steps)) + 1
    if count > MAX_THRESHOLDS:
        raise UserError(f"threshold range gives {count} thresholds; at most {MAX_THRESHOLDS} are allowed")
    grid = np.round(start + step * np.arange(count), 10)
    return grid[grid <= round(stop, 10)]


def check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Thresholds as given (a grid or any list): float64, in [0, 1], strictly increasing."""
    values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise UserError("thresholds: at least one threshold is needed")
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise UserError(f"thresholds must lie in [0, 1], got {values.tolist()}")
    if values.size > 1 and not np.all(np.diff(values) > 0):
        raise UserError(f"thresholds must be strictly increasing, got {values.tolist()}")
    return values

