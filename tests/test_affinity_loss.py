"""AffinityNet's training signal: stride-8 confident labels, psa's pair labels and the bg/fg/neg loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cse_ray.affinity_loss import affinity_loss, downsample_labels, pair_labels
from cse_ray.models import pair_affinities, pair_offsets, pair_region
from cse_ray.rw import confident_labels

U = 255  # unknown

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------ pair labels


def loop_pair_labels(label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """psa's definition pair by pair: sources in [0, h-4) x [4, w-4), targets at the 34 offsets."""
    rows, columns = pair_region(*label.shape)
    offsets = pair_offsets(5)
    masks = np.zeros((3, len(offsets), rows, columns), bool)
    for d, (dy, dx) in enumerate(offsets):
        for y in range(rows):
            for x in range(columns):
                a, b = int(label[y, x + 4]), int(label[y + dy, x + 4 + dx])
                known = a != U and b != U
                masks[0, d, y, x] = a == b == 0
                masks[1, d, y, x] = known and a == b != 0
                masks[2, d, y, x] = known and a != b
    return masks[0], masks[1], masks[2]


def test_pair_labels_match_psas_definition_on_a_hand_made_map():
    label = np.zeros((9, 14), np.uint8)
    label[2:6, 3:8] = 1  # an object
    label[1:4, 9:13] = 2  # another class
    label[6:9, 0:5] = U  # unknown band
    label[4, 10] = U
    bg, fg, neg = pair_labels(label)
    expected = loop_pair_labels(label)
    assert bg.shape == (34, 5, 6) and bg.dtype == torch.bool
    for ours, theirs in zip((bg, fg, neg), expected):
        assert np.array_equal(ours.numpy(), theirs)
    assert int(bg.sum()) > 0 and int(fg.sum()) > 0 and int(neg.sum()) > 0
    # each pair has at most one label; pairs touching 255 have none unless both are... never both 0
    assert int((bg.int() + fg.int() + neg.int()).max()) == 1


def test_pair_labels_of_a_batch_and_of_special_maps():
    background = np.zeros((2, 10, 12), np.uint8)
    bg, fg, neg = pair_labels(background)
    assert bg.shape == (2, 34, 6, 4) and bool(bg.all()) and not fg.any() and not neg.any()
    unknown = np.full((8, 12), U, np.uint8)
    assert not any(mask.any() for mask in pair_labels(unknown))
    too_small = pair_labels(np.zeros((4, 8), np.uint8))  # no position starts a pair
    assert all(mask.shape == (34, 0, 0) for mask in too_small)


# ------------------------------------------------------------------------------------------ the loss


def test_identical_features_give_zero_positive_losses_and_the_largest_negative_loss():
    label = np.zeros((12, 16), np.uint8)
    label[3:9, 5:12] = 3
    bg, fg, neg = pair_labels(label[None])
    affinities = pair_affinities(torch.ones(1, 8, 12, 16))
    losses = affinity_loss(affinities, bg, fg, neg)
    assert losses["bg"].item() == pytest.approx(-math.log(1 + 1e-5), abs=1e-7)
    assert losses["fg"].item() == pytest.approx(-math.log(1 + 1e-5), abs=1e-7)
    largest = -math.log(float(np.float32(1 + 1e-5) - np.float32(1.0)))  # -log(1e-5) in float32
    assert losses["neg"].item() == pytest.approx(largest, rel=1e-5)
    assert losses["total"].item() == pytest.approx(
        losses["bg"].item() / 4 + losses["fg"].item() / 4 + losses["neg"].item() / 2
    )
    assert losses["bg_count"].item() == int(bg.sum()) and losses["neg_count"].item() == int(neg.sum())


def test_the_loss_separates_regions_when_the_features_do():
    label = np.zeros((12, 16), np.uint8)
    label[:, 8:] = 1
    features = torch.zeros(1, 4, 12, 16)
    features[..., 8:] = 30.0  # affinity 1 inside each half, ~0 across
    losses = affinity_loss(pair_affinities(features), *pair_labels(label[None]))
    assert losses["total"].item() < 1e-4
    flipped = affinity_loss(pair_affinities(torch.zeros(1, 4, 12, 16)), *pair_labels(label[None]))
    assert flipped["neg"].item() > 11.0  # the same features everywhere: every negative pair is wrong


def test_empty_pair_sets_give_zero_not_nan_and_gradients_flow():
    features = torch.randn(2, 6, 10, 12, requires_grad=True)
    affinities = pair_affinities(features)
    bg, fg, neg = pair_labels(np.zeros((2, 10, 12), np.uint8))  # only background pairs
    losses = affinity_loss(affinities, bg, fg, neg)
    assert losses["fg"].item() == 0.0 and losses["neg"].item() == 0.0
    assert losses["fg_count"].item() == 0 and losses["neg_count"].item() == 0
    losses["total"].backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_the_loss_is_psas_weighted_means_over_the_batch():
    generator = torch.Generator().manual_seed(0)
    affinities = torch.rand(2, 34, 4, 6, generator=generator)
    label = torch.randint(0, 3, (2, 8, 14), generator=generator).to(torch.uint8)
    label[0, :2] = U
    bg, fg, neg = pair_labels(label)
    losses = affinity_loss(affinities, bg, fg, neg)
    a = affinities.double()
    expected_bg = (-torch.log(a + 1e-5))[bg].sum() / (bg.sum() + 1e-5)
    expected_neg = (-torch.log(1 + 1e-5 - a))[neg].sum() / (neg.sum() + 1e-5)
    assert losses["bg"].item() == pytest.approx(expected_bg.item(), rel=1e-5)
    assert losses["neg"].item() == pytest.approx(expected_neg.item(), rel=1e-5)
    with pytest.raises(ValueError, match="does not match affinities"):
        affinity_loss(affinities[:, :, :3], bg, fg, neg)


# ------------------------------------------------------------------------------------------ stride 8


def block(values: dict[int, int]) -> np.ndarray:
    """One 8 x 8 block with the given number of pixels of each label (row-major fill)."""
    flat = np.concatenate([np.full(count, value, np.uint8) for value, count in values.items()])
    assert flat.size == 64
    return flat.reshape(8, 8)


@pytest.mark.parametrize("counts,expected", [
    ({0: 64}, 0), ({2: 64}, 2), ({U: 64}, U),
    ({0: 40, 3: 24}, 0),  # the high-alpha CRF says background: b >= f + u
    ({0: 20, U: 20, 3: 24}, U),  # b < f + u, b + u >= f: the low-alpha CRF says background
    ({0: 10, U: 10, 3: 44}, 3),  # foreground
    ({0: 30, U: 10, 3: 24}, U),  # 30 < 24 + 10
    ({0: 34, U: 10, 3: 20}, 0),
    ({1: 32, 4: 32}, 1),  # a tie goes to the smaller class
    ({0: 10, 2: 20, 5: 34}, 5),
])
def test_one_block_follows_psas_pooled_rule(counts, expected):
    assert downsample_labels(block(counts)).tolist() == [[expected]]


def test_valid_mask_and_sizes_that_are_not_multiples_of_8():
    label = np.zeros((20, 27), np.uint8)
    label[:, 16:] = 7
    valid = np.ones_like(label, bool)
    valid[:, 24:] = False  # a crop's padding: the last columns vote for nothing
    small = downsample_labels(label, valid=valid)
    assert small.shape == (3, 4) and small.dtype == torch.uint8
    assert small[:, :2].unique().tolist() == [0] and small[:, 2].unique().tolist() == [7]
    assert small[:, 3].unique().tolist() == [U]  # no valid pixel in the last block column
    batch = downsample_labels(np.stack([label, label]))
    assert batch.shape == (2, 3, 4) and batch[:, :, 3].unique().tolist() == [7]


def psa_pooled(low: np.ndarray, high: np.ndarray, classes: int) -> np.ndarray:
    """psa's way with hard CRF labels: average-pool each CRF's one-hot scores over 8 x 8 blocks, argmax
    each (first maximum), then the confident rule on the two block labels."""
    def block_argmax(label: np.ndarray) -> np.ndarray:
        h, w = label.shape
        onehot = np.eye(classes + 1)[label].reshape(h // 8, 8, w // 8, 8, classes + 1)
        return onehot.mean(axis=(1, 3)).argmax(axis=-1)
    low_block, high_block = block_argmax(low), block_argmax(high)
    result = low_block.copy()
    result[low_block == 0] = U
    result[high_block == 0] = 0
    return result


def test_the_confident_map_reduces_to_what_psa_gets_from_the_two_crf_maps():
    """On maps where the high-alpha CRF grows each object by a band (the usual case), pooling the
    confident map gives the labels psa pools from the two CRF outputs, block for block."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    for _ in range(20):
        low = np.zeros((96, 128), np.int64)
        high = np.zeros((96, 128), np.int64)
        for lo, hi in ((0, 56), (72, 128)):  # one object per side, far apart
            cls = int(rng.integers(1, 21))
            cy, cx = rng.uniform(20, 76), rng.uniform(lo + 16, hi - 16)
            ry, rx = rng.uniform(6, 20), rng.uniform(4, 12)
            distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            band = rng.uniform(1.1, 1.6)
            low[distance <= 1.0] = cls
            high[distance <= band] = cls
        ours = downsample_labels(confident_labels(low.astype(np.uint8), high.astype(np.uint8)))
        assert np.array_equal(ours.numpy(), psa_pooled(low, high, 20))
