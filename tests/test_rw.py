"""The random walk: confident labels, psa's padding and pooling, and the sparse walk against psa's dense
matrix powers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cse_ray.models import pair_affinities, pair_offsets, pair_region
from cse_ray.rw import (
    WalkResult,
    confident_labels,
    label_at_size,
    pad_to_stride,
    padded_size,
    psa_dense_random_walk,
    psa_dense_transition,
    random_walk,
    rescale_for_walk,
    sparse_transition,
    stride_cams,
)

U = 255

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def scene(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """CAMs that under-cover 2 elliptic objects, and affinities high inside each region, low across."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    regions = np.zeros((height, width), np.int64)
    cams = np.zeros((2, height, width), np.float32)
    for index in range(2):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
        distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        regions[distance <= 1] = index + 1
        cams[index] = np.exp(-3 * distance**2) + 0.1 * rng.random((height, width), np.float32)
    cams /= cams.reshape(2, -1).max(axis=1)[:, None, None] + 1e-5
    padded = np.zeros(padded_size(height, width), np.int64)
    padded[:height, :width] = regions
    embedding = rng.normal(size=(3, 8)).astype(np.float32)
    features = embedding[padded[4::8, 4::8]].transpose(2, 0, 1)
    features = features + 0.1 * rng.normal(size=features.shape).astype(np.float32)
    return cams, np.sort(rng.choice(20, 2, replace=False)), pair_affinities(torch.from_numpy(features)[None])


# ------------------------------------------------------------------------------------------ confident labels


def test_confident_labels_follow_psas_rule_where_the_crfs_agree_and_disagree():
    low = np.array([[0, 0, 3, 3, 5, 0]], np.uint8)
    high = np.array([[0, 3, 3, 0, 5, U]], np.uint8)
    # bg+bg -> bg; low bg, high fg -> unknown; fg+fg -> fg; low fg, high bg -> bg (the high alpha wins);
    # an ignored pixel of the high map leaves the low map's verdict
    assert confident_labels(low, high).tolist() == [[0, U, 3, 0, 5, U]]
    assert confident_labels(low, high).dtype == np.uint8
    with pytest.raises(ValueError, match="two label maps of one H x W shape"):
        confident_labels(low, high[:, :3])


# ------------------------------------------------------------------------------------------ psa's preparation


def test_images_are_padded_at_the_bottom_and_right_to_a_multiple_of_8():
    assert padded_size(375, 500) == (376, 504) and padded_size(64, 64) == (64, 64)
    images = torch.ones(1, 3, 13, 17)
    padded = pad_to_stride(images)
    assert padded.shape == (1, 3, 16, 24)
    assert torch.equal(padded[..., :13, :17], images) and padded[..., 13:, :].abs().sum() == 0


def test_stride_cams_add_the_background_row_pad_and_average_pool():
    cams = np.zeros((2, 10, 9), np.float32)
    cams[0, :8, :8] = 0.5
    cams[1, 8:, :] = 1.0
    pooled = stride_cams(cams, bg_power=2)
    assert pooled.shape == (3, 2, 2)
    # block (0, 0): background (1 - 0.5)^2 = 0.25, class 0 at 0.5, class 1 absent
    assert torch.allclose(pooled[:, 0, 0], torch.tensor([0.25, 0.5, 0.0]))
    # block (1, 1): one real pixel row of 2 x 1 (rows 8-9, column 8): class 1 = 1, background 0;
    # the other 62 pixels are padding (zero for every row, background included)
    assert torch.allclose(pooled[:, 1, 1], torch.tensor([0.0, 0.0, 2 / 64]))
    # block (0, 1): column 8 of rows 0-7, no CAM: background 1 on 8 of 64 pixels
    assert torch.allclose(pooled[:, 0, 1], torch.tensor([8 / 64, 0.0, 0.0]))


# ------------------------------------------------------------------------------------------ the transition


def test_the_sparse_transition_is_psas_column_normalised_matrix_transposed():
    generator = torch.Generator().manual_seed(0)
    height, width = 7, 11
    affinities = torch.rand(34, *pair_region(height, width), generator=generator)
    sparse = sparse_transition(affinities, height, width, beta=8)
    dense = psa_dense_transition(affinities, height, width, beta=8)
    assert torch.allclose(sparse.to_dense(), dense.t(), atol=1e-7)
    assert torch.allclose(dense.sum(dim=0), torch.ones(height * width))
    # one entry per position and two per pair: linear in the image, never N x N
    assert sparse.values().numel() == height * width + 2 * affinities.numel()


def test_affinities_of_the_wrong_grid_are_refused():
    with pytest.raises(ValueError, match=r"do not fit a 7 x 11 grid \(expected \(34, 3, 3\)"):
        sparse_transition(torch.rand(34, 3, 4), 7, 11)


# ------------------------------------------------------------------------------------------ the walk


@pytest.mark.parametrize("height,width,seed", [(120, 160, 0), (75, 100, 1), (97, 131, 2), (200, 90, 3)])
def test_sparse_walk_gives_psas_dense_labels_and_maps(height, width, seed):
    cams, classes, affinities = scene(height, width, seed)
    ours = random_walk(cams, classes, affinities)
    psa = psa_dense_random_walk(cams, classes, affinities)
    assert isinstance(ours, WalkResult)
    assert ours.label.shape == (height, width) and ours.label.dtype == np.uint8
    assert ours.refined.shape == (3, *(side // 8 for side in padded_size(height, width)))
    assert torch.allclose(ours.refined, psa.refined, rtol=1e-4, atol=1e-5)
    assert (ours.label == psa.label).mean() >= 0.995
    assert set(np.unique(ours.label)) <= {0, *(int(c) + 1 for c in classes)}


def test_sparse_walk_agrees_with_psa_on_random_affinities_and_cams():
    generator = torch.Generator().manual_seed(5)
    cams = torch.rand(3, 61, 83, generator=generator)
    affinities = torch.rand(34, *pair_region(8, 11), generator=generator)
    for logt in (1, 4, 8):
        ours = random_walk(cams, [2, 7, 11], affinities, logt=logt)
        psa = psa_dense_random_walk(cams, [2, 7, 11], affinities, logt=logt)
        assert torch.allclose(ours.refined, psa.refined, rtol=1e-4, atol=1e-6)
        assert (ours.label == psa.label).mean() >= 0.995


def test_the_walk_fills_a_region_and_stops_at_its_border():
    """Two halves with affinity 1 inside and 0 across: a CAM covering most of the left half spreads to
    all of it and not at all into the right half."""
    features = torch.zeros(1, 4, 8, 16)
    features[..., 8:] = 100.0
    cams = np.zeros((1, 64, 128), np.float32)
    cams[0, :, :52] = 0.8  # 52 of the left half's 64 pixel columns
    before = stride_cams(cams)
    assert (before[1] > before[0]).sum(dim=1).tolist() == [6] * 8  # grid columns 6 and 7: background
    walked = random_walk(cams, [4], pair_affinities(features))
    assert bool((walked.refined[1, :, :8] > walked.refined[0, :, :8]).all())
    assert not walked.refined[1, :, 8:].any()  # nothing leaks across a zero affinity
    assert bool((walked.label[:, :56] == 5).all()) and not walked.label[:, 72:].any()


def test_no_class_is_background_everywhere_and_a_tiny_image_has_no_pairs():
    affinities = pair_affinities(torch.rand(1, 4, 3, 4))  # a 24 x 32 image: no position starts a pair
    assert affinities.shape == (1, 34, 0, 0)
    empty = random_walk(np.zeros((0, 24, 32), np.float32), [], affinities)
    assert not empty.label.any() and empty.refined.shape == (1, 3, 4)
    cams = np.zeros((1, 24, 32), np.float32)
    cams[0, :, :16] = 0.9
    alone = random_walk(cams, [0], affinities)  # T is the identity: labels from the pooled CAMs alone
    assert (alone.label[:, :12] == 1).all() and not alone.label[:, 20:].any()
    assert len(pair_offsets()) == 34


def test_rw_scale_walks_on_a_finer_grid_and_returns_the_label_at_the_image_size():
    """`rw.scale: 2`: image and CAMs doubled (a 16 x 32 grid for a 64 x 128 image instead of 8 x 16), the
    walk stops at the border there, and the label comes back at 64 x 128."""
    images = torch.zeros(1, 3, 64, 128)
    cams = np.zeros((1, 64, 128), np.float32)
    cams[0, :, :52] = 0.8
    bigger, maps = rescale_for_walk(images, cams, 2.0)
    assert bigger.shape == (1, 3, 128, 256) and maps.shape == (1, 128, 256)
    assert float(maps[0, :, :100].min()) == pytest.approx(0.8) and not maps[0, :, 108:].any()
    features = torch.zeros(1, 4, 16, 32)  # AffinityNet's features of the doubled image: two halves
    features[..., 16:] = 100.0
    walked = random_walk(maps, [4], pair_affinities(features))
    assert walked.label.shape == (128, 256)
    label = label_at_size(walked.label, 64, 128)
    assert label.shape == (64, 128)
    assert bool((label[:, :56] == 5).all()) and not label[:, 72:].any()
    empty_images, no_cams = rescale_for_walk(images, np.zeros((0, 64, 128), np.float32), 0.5)
    assert empty_images.shape == (1, 3, 32, 64) and no_cams.shape == (0, 32, 64)


def test_label_at_size_keeps_blocks_and_leaves_a_fitting_label_alone():
    label = np.arange(6, dtype=np.uint8).reshape(2, 3)
    doubled = np.kron(label, np.ones((2, 2), np.uint8))
    assert (label_at_size(doubled, 2, 3) == label).all()
    assert label_at_size(label, 2, 3) is label
