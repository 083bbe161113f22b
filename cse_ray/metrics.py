"""Segmentation metrics and the rules that read them.

The one rule that picks the CRF alpha from evaluations: the highest mIoU, ties going to the smallest
alpha (the softer background, which keeps more foreground). The CAM threshold comes from the same
sweep everywhere: the best point of its curve, ties going to the lowest threshold. The pipeline and
Tune's post-hoc search both call these, so `best_config.yaml` and `report.json` agree.
"""

from __future__ import annotations

from collections.abc import Mapping


def best_alpha(miou_by_alpha: Mapping[float, float]) -> float | None:
    """The CRF alpha with the highest mIoU (ties: the smallest alpha); None when nothing was evaluated."""
    if not miou_by_alpha:
        return None
    return max(miou_by_alpha, key=lambda alpha: (miou_by_alpha[alpha], -float(alpha)))
