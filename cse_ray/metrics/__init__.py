"""Segmentation metrics and the rules that read them: the threshold grid, the one-pass sweep, the results.

Definitions (the reference's, METHOD.md "Evaluation"): categories are background + the classes of a
`LabelSpace` (21 for VOC), ground truth 255 = ignore. At threshold t a CAM predicts argmax over
[t, class maps] in float32, ties to the first channel: a pixel with top class c and score s is
background exactly when t >= s. IoU = TP / (T + P - TP + 1e-10) over the whole list; mIoU is the mean
over all categories (an absent one counts 0), `miou_present` the mean over those in the ground truth.

One pass for all thresholds: a pixel only needs the index k of the first threshold >= s (searchsorted):
it predicts c below k and background from k on. An image costs one bincount over (k, gt, c); the
per-threshold confusions are suffix/prefix sums of those counts, taken once at the end.

Rules: the threshold is the best point of the curve (ties: the lowest threshold); the CRF alpha has the
highest mIoU (ties: the smallest alpha, the softer background). The pipeline and Tune's post-hoc search
both use them, so `best_config.yaml` and `report.json` agree. Numbers are percent; the JSON rounds them
to 3 decimals and thresholds to 6.
"""


from cse_ray.metrics.results import EvalResult, ImageStats, best_alpha
from cse_ray.metrics.sweep import ConfusionSweep, sweep_from_arrays
from cse_ray.metrics.thresholds import DEFAULT_THRESHOLD_RANGE, check_thresholds, threshold_grid

__all__ = [
    "DEFAULT_THRESHOLD_RANGE",
    "ConfusionSweep",
    "EvalResult",
    "ImageStats",
    "best_alpha",
    "check_thresholds",
    "sweep_from_arrays",
    "threshold_grid",
]
