"""AffinityNet's training signal (psa): pair labels within radius 5 at stride 8 and the bg/fg/neg loss.

METHOD.md ("Random-walk refinement", items 2-3). The confident label map (0 background, k class k,
255 unknown; `cse_ray.rw.confident_labels`) of a training crop is reduced to stride 8, every pair of
`cse_ray.models.pair_offsets` gets a label: both background (bg_pos), the same foreground class
(fg_pos), different labels (neg), none when either side is 255; and the loss is
bg/4 + fg/4 + neg/2, each the mean over its pairs of -log(aff + 1e-5) (positives) or
-log(1 + 1e-5 - aff) (negatives).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cse_ray.labels import IGNORE_INDEX
from cse_ray.models import FEATURE_STRIDE, PAIR_RADIUS, pair_offsets, pair_region

LOG_EPS = 1e-5  # psa's guard inside the logs and on the pair counts
WEIGHTS = {"bg": 0.25, "fg": 0.25, "neg": 0.5}


def _as_batch(label: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    tensor = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if tensor.dim() not in (2, 3):
        raise ValueError(f"expected an H x W or N x H x W label map, got shape {tuple(tensor.shape)}")
    return (tensor.unsqueeze(0), True) if tensor.dim() == 2 else (tensor, False)


def downsample_labels(
    label: np.ndarray | torch.Tensor, stride: int = FEATURE_STRIDE,
    valid: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """The confident label map at stride 8 (uint8, `ceil(H/8) x ceil(W/8)`, batch dimension kept).

    psa average-pools the low- and high-alpha CRF scores over each 8 x 8 block, takes each argmax and
    combines them with the confident-label rule; blocks with no score at all (outside the image) are
    255. From the confident map alone the same rule reads, with b, u and f_k the block's counts of
    background, unknown and class-k pixels (u: background for the low-alpha CRF, foreground for the
    high-alpha one, of the block's main class k*): background when b >= f_k* + u, else unknown when
    b + u >= f_k*, else k* (ties to the smaller class, as argmax does). `valid` (False outside the
    image, e.g. a crop's padding) leaves pixels out of the counts; a block without valid pixels is 255.
    """
    labels, single = _as_batch(label)
    labels = labels.long()
    mask = torch.ones_like(labels, dtype=torch.bool) if valid is None else _as_batch(valid)[0].bool()
    if mask.shape != labels.shape:
        raise ValueError(
            f"valid mask of shape {tuple(mask.shape)} does not match labels {tuple(labels.shape)}"
        )
    count, height, width = labels.shape
    pad = (0, -width % stride, 0, -height % stride)
    labels = F.pad(labels, pad, value=IGNORE_INDEX)
    mask = F.pad(mask, pad, value=False)
    rows, cols = labels.shape[1] // stride, labels.shape[2] // stride
    unknown = labels == IGNORE_INDEX
    classes = int(labels[~unknown].max()) + 1 if bool((~unknown).any()) else 1
    channel = torch.where(unknown, torch.full_like(labels, classes), labels)  # 0 bg, 1..K, K+1 unknown
    block = (
        torch.arange(count, device=labels.device).view(-1, 1, 1) * rows
        + torch.arange(labels.shape[1], device=labels.device).view(1, -1, 1) // stride
    ) * cols + torch.arange(labels.shape[2], device=labels.device).view(1, 1, -1) // stride
    index = (block * (classes + 1) + channel)[mask]
    counts = torch.bincount(index, minlength=count * rows * cols * (classes + 1))
    counts = counts.view(count, rows, cols, classes + 1)
    background, foreground, band = counts[..., 0], counts[..., 1:classes], counts[..., classes]
    if foreground.shape[-1]:
        main_count, main_class = foreground.max(dim=-1)  # first maximum: the smaller class
        main_class = main_class + 1
    else:
        main_count = torch.zeros_like(background)
        main_class = torch.zeros_like(background)
    result = torch.where(background + band >= main_count, IGNORE_INDEX, main_class)
    result = torch.where(background >= main_count + band, 0, result)
    result = torch.where(counts.sum(dim=-1) == 0, IGNORE_INDEX, result).to(torch.uint8)
    return result[0] if single else result


def pair_labels(
    label: np.ndarray | torch.Tensor, radius: int = PAIR_RADIUS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg_pos, fg_pos, neg) bool masks, `N x D x rows x columns` like `pair_affinities`, of a stride-8
    label map (`h x w` or `N x h x w`; 0 background, k class k, 255 unknown)."""
    labels, single = _as_batch(label)
    labels = labels.long()
    rows, columns = pair_region(labels.shape[1], labels.shape[2], radius)
    left = radius - 1
    source = labels[:, :rows, left:left + columns].unsqueeze(1)
    target = torch.stack(
        [labels[:, dy:dy + rows, left + dx:left + dx + columns] for dy, dx in pair_offsets(radius)], dim=1
    )
    known = (source != IGNORE_INDEX) & (target != IGNORE_INDEX)
    same = source == target
    bg_pos = same & (source == 0)
    fg_pos = same & (source != 0) & known
    neg = ~same & known
    masks = (bg_pos, fg_pos, neg)
    return tuple(mask[0] for mask in masks) if single else masks  # type: ignore[return-value]


def affinity_loss(
    affinities: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> dict[str, torch.Tensor]:
    """psa's loss on `pair_affinities` and `pair_labels` of the same shape (a batch is one pool of pairs).

    Returns `bg`, `fg`, `neg` (each the mean over its pairs; 0 when it has none), `total`
    (bg/4 + fg/4 + neg/2) and the pair counts `bg_count`, `fg_count`, `neg_count`; nothing leaves the
    device.
    """
    for name, mask in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg)):
        if mask.shape != affinities.shape:
            raise ValueError(
                f"{name} of shape {tuple(mask.shape)} does not match affinities {tuple(affinities.shape)}"
            )
    positive = -torch.log(affinities + LOG_EPS)
    negative = -torch.log(1.0 + LOG_EPS - affinities)
    losses: dict[str, torch.Tensor] = {}
    for name, mask, values in (("bg", bg_pos, positive), ("fg", fg_pos, positive), ("neg", neg, negative)):
        weights = mask.to(affinities.dtype)
        losses[f"{name}_count"] = weights.sum()
        losses[name] = (values * weights).sum() / (losses[f"{name}_count"] + LOG_EPS)
    losses["total"] = sum(WEIGHTS[name] * losses[name] for name in WEIGHTS)
    return losses
