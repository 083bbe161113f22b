"""What an evaluation reports: `EvalResult` (the curve, the best threshold, per-class numbers; its JSON,
Markdown and terminal table), `ImageStats` per image, and `best_alpha`, the rule that reads results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cse_ray.labels import VOC, LabelSpace


def best_alpha(miou_by_alpha: Mapping[float, float]) -> float | None:
    """The CRF alpha with the highest mIoU (ties: the smallest alpha); None when nothing was evaluated."""
    if not miou_by_alpha:
        return None
    return max(miou_by_alpha, key=lambda alpha: (miou_by_alpha[alpha], -float(alpha)))


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
    confusion: np.ndarray | None = field(default=None, repr=False)  # C x (C + 1) at the best threshold
    per_image: list[ImageStats] = field(default_factory=list, repr=False)
    labels: LabelSpace = field(default=VOC, repr=False)

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
            f"- mIoU ({self.labels.num_categories} categories, absent ones count 0): "
            f"**{self.miou:.2f}**{where}",
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
