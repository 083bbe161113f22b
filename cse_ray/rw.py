"""Random-walk refinement of CAMs with AffinityNet's affinities (psa), and its confident training labels.

METHOD.md ("Random-walk refinement"): A is the symmetric affinity matrix of the stride-8 grid of the
image padded to a multiple of 8 (1 on the diagonal, psa's radius-5 pairs elsewhere, 0 for every other
pair), raised element-wise to beta; T is A with each column divided by its sum; the CAMs, with a
background row (1 - max over classes) ** bg_power, are padded, average-pooled to stride 8 and multiplied
by T^(2^logt); the result is upsampled bilinearly and its argmax over background + present classes is
the pseudo-label.

psa forms T as a dense N x N matrix and squares it logt times: O(N^3) time and O(N^2) memory (N grid
positions; about 3,000 for a VOC image, 12,000 at 1000 x 750, where one matrix is 0.55 GB). Here T
stays sparse (at most 69 entries per column) and is applied 2^logt times to the (classes x N) maps,
which is the same product in another order: O(N) memory, O(2^logt * N) time. `psa_dense_random_walk`
keeps psa's way as the reference (benchmarks/random_walk.py, tests/test_rw.py).

`rw.scale` (1 in psa) walks on the image and CAMs resized by that factor and brings the label back:
on small images (the synthetic demo's 128 px give a 16 x 16 grid, which psa's radius of 5 nearly
spans) a finer grid lets the walk stop at object borders.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cse_ray.labels import IGNORE_INDEX
from cse_ray.models import FEATURE_STRIDE, PAIR_RADIUS, pair_offsets, pair_region

BETA = 8
LOGT = 8  # 2^8 = 256 steps
BG_POWER = 16  # psa's infer_aff default alpha for the background row


class WalkResult(NamedTuple):
    label: np.ndarray  # uint8 H x W: 0 background, k + 1 for class k
    refined: torch.Tensor  # (1 + K) x h x w at stride 8: background row, then the classes given


def confident_labels(low_alpha_label: np.ndarray, high_alpha_label: np.ndarray) -> np.ndarray:
    """AffinityNet's training labels from two CRF label maps (0 background, k + 1 class k).

    psa's rule: the low-alpha CRF's class where it says foreground, background where the high-alpha
    CRF says background (this wins where the two disagree), 255 (unknown) where the low-alpha CRF says
    background and the high-alpha one does not. The low alpha keeps the background score high, so its
    foreground is the confident foreground; the high alpha shrinks it, so its background is confident.
    """
    low = np.asarray(low_alpha_label)
    high = np.asarray(high_alpha_label)
    if low.shape != high.shape or low.ndim != 2:
        raise ValueError(f"expected two label maps of one H x W shape, got {low.shape} and {high.shape}")
    label = low.astype(np.uint8, copy=True)
    label[low == 0] = IGNORE_INDEX
    label[high == 0] = 0
    return label


def padded_size(height: int, width: int, stride: int = FEATURE_STRIDE) -> tuple[int, int]:
    """psa pads the image at the bottom and right to the next multiple of the stride."""
    return -(-height // stride) * stride, -(-width // stride) * stride


def pad_to_stride(images: torch.Tensor, stride: int = FEATURE_STRIDE) -> torch.Tensor:
    """`N x C x H x W` normalised images padded with zeros (the mean colour) at the bottom and right."""
    height, width = images.shape[-2:]
    padded_h, padded_w = padded_size(height, width, stride)
    return F.pad(images, (0, padded_w - width, 0, padded_h - height))


def stride_cams(
    cams: np.ndarray | torch.Tensor, bg_power: float = BG_POWER, stride: int = FEATURE_STRIDE,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`(1 + K) x h x w`: the background row (1 - max) ** bg_power over K x H x W CAMs, then the CAMs,
    padded with zeros to a multiple of the stride and average-pooled to it, as psa does."""
    maps = torch.as_tensor(cams, dtype=torch.float32, device=device)
    if maps.dim() != 3:
        raise ValueError(f"expected K x H x W CAMs, got shape {tuple(maps.shape)}")
    height, width = maps.shape[1:]
    peak = maps.amax(dim=0, keepdim=True) if maps.shape[0] else maps.new_zeros((1, height, width))
    stacked = torch.cat([(1.0 - peak) ** bg_power, maps])
    padded_h, padded_w = padded_size(height, width, stride)
    stacked = F.pad(stacked, (0, padded_w - width, 0, padded_h - height))
    return F.avg_pool2d(stacked.unsqueeze(0), stride, stride)[0]


def rescale_for_walk(images: torch.Tensor, cams: np.ndarray | torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`N x 3 x H x W` normalised images and `K x H x W` CAMs resized (bilinear) by `scale`, for a walk
    on a finer grid than stride 8 of the image gives: `rw.scale`. `label_at_size` brings the walk's
    label back."""
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    maps = torch.as_tensor(cams, dtype=torch.float32)
    if maps.shape[0]:
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    else:
        maps = maps.new_zeros((0, *size))
    return images, maps


def label_at_size(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map resized to `height x width` by nearest neighbour (the pixel centres' labels)."""
    from PIL import Image

    if label.shape == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def _pairs(affinities: torch.Tensor, height: int, width: int, radius: int) -> tuple[torch.Tensor, ...]:
    """(first, second, affinity) of every pair, flat indices into the h x w grid."""
    if affinities.dim() == 4 and affinities.shape[0] == 1:
        affinities = affinities[0]
    offsets = pair_offsets(radius)
    expected = (len(offsets), *pair_region(height, width, radius))
    if tuple(affinities.shape) != expected:
        raise ValueError(
            f"affinities of shape {tuple(affinities.shape)} do not fit a {height} x {width} grid "
            f"(expected {expected}: offsets x pair rows x pair columns)"
        )
    device = affinities.device
    grid = torch.arange(height * width, device=device).view(height, width)
    left = radius - 1
    first = grid[: expected[1], left:left + expected[2]].reshape(1, -1)
    shift = torch.tensor([dy * width + dx for dy, dx in offsets], device=device).view(-1, 1)
    second = first + shift
    first = first.expand_as(second)
    return first.reshape(-1), second.reshape(-1), affinities.reshape(-1).float()


def sparse_transition(
    affinities: torch.Tensor, height: int, width: int, beta: float = BETA, radius: int = PAIR_RADIUS
) -> torch.Tensor:
    """T transposed (N x N, sparse CSR): row j holds column j of T, A[:, j] ** beta / its sum, so that
    `T_t @ maps_t` is one step of the walk on N x C maps."""
    first, second, values = _pairs(affinities, height, width, radius)
    size = height * width
    diagonal = torch.arange(size, device=first.device)
    rows = torch.cat([diagonal, first, second])
    cols = torch.cat([diagonal, second, first])
    weights = values**beta
    values = torch.cat([torch.ones(size, device=first.device), weights, weights])
    column_sums = torch.zeros(size, device=first.device).index_add_(0, rows, values)
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values / column_sums[rows], (size, size), check_invariants=False
    )
    with warnings.catch_warnings():  # CSR matmul is the fast path on CPU and GPU; torch calls it beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.coalesce().to_sparse_csr()


def sparse_walk(maps: torch.Tensor, transition_t: torch.Tensor, steps: int) -> torch.Tensor:
    """`maps (C x N) @ T^steps`, one sparse product per step; memory stays O(N * C)."""
    walked = maps.t().contiguous()
    for _ in range(steps):
        walked = transition_t @ walked
    return walked.t()


def psa_dense_transition(
    affinities: torch.Tensor, height: int, width: int, beta: float = BETA, radius: int = PAIR_RADIUS
) -> torch.Tensor:
    """psa's T: the dense N x N affinity matrix, ** beta, each column divided by its sum."""
    first, second, values = _pairs(affinities, height, width, radius)
    size = height * width
    dense = torch.zeros((size, size), device=first.device)
    dense[first, second] = values
    dense[second, first] = values
    dense.fill_diagonal_(1.0)
    dense = dense**beta
    return dense / dense.sum(dim=0, keepdim=True)


def _label(refined: torch.Tensor, classes: Sequence[int], height: int, width: int) -> np.ndarray:
    padded_h, padded_w = padded_size(height, width)
    scores = F.interpolate(
        refined.unsqueeze(0), size=(padded_h, padded_w), mode="bilinear", align_corners=False
    )
    winner = scores[0, :, :height, :width].argmax(dim=0).cpu().numpy()
    lookup = np.concatenate([[0], np.asarray(classes, np.int64) + 1]).astype(np.uint8)
    return lookup[winner]


def _prepare(cams, classes, affinities, bg_power) -> tuple[torch.Tensor, int, int]:
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"cams of shape {tuple(cams.shape)} do not match {len(classes)} classes")
    pooled = stride_cams(cams, bg_power, device=affinities.device)
    return pooled, pooled.shape[1], pooled.shape[2]


def random_walk(
    cams: np.ndarray | torch.Tensor, classes: Sequence[int], affinities: torch.Tensor, beta: float = BETA,
    logt: int = LOGT, bg_power: float = BG_POWER, radius: int = PAIR_RADIUS,
) -> WalkResult:
    """The pseudo-label of one image: K x H x W CAMs of `classes`, refined by psa's random walk.

    affinities: `pair_affinities` of AffinityNet's features for the image padded by `pad_to_stride`
    (`D x rows x columns`, or with a batch dimension of 1); the walk runs on their device.
    """
    pooled, height, width = _prepare(cams, classes, affinities, bg_power)
    transition_t = sparse_transition(affinities, height, width, beta, radius)
    refined = sparse_walk(pooled.reshape(pooled.shape[0], -1), transition_t, 2**logt)
    refined = refined.reshape(pooled.shape)
    return WalkResult(_label(refined, classes, *cams.shape[1:]), refined)


def psa_dense_random_walk(
    cams: np.ndarray | torch.Tensor, classes: Sequence[int], affinities: torch.Tensor, beta: float = BETA,
    logt: int = LOGT, bg_power: float = BG_POWER, radius: int = PAIR_RADIUS,
) -> WalkResult:
    """`random_walk` computed as psa publishes it: dense T squared logt times, then one product."""
    pooled, height, width = _prepare(cams, classes, affinities, bg_power)
    transition = psa_dense_transition(affinities, height, width, beta, radius)
    for _ in range(logt):
        transition = transition @ transition
    refined = (pooled.reshape(pooled.shape[0], -1) @ transition).reshape(pooled.shape)
    return WalkResult(_label(refined, classes, *cams.shape[1:]), refined)
