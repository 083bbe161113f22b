"""The segmentation loss and the multi-scale + flip prediction every consumer shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cse_ray.segment import label_from_probabilities, predict_probabilities, segmentation_losses


class ColourSegmenter(nn.Module):
    """Scores at stride 8 that prefer class 1 where the (normalised) red channel is high: a network
    whose right answer is known, so the prediction's geometry (scales, flips, upsampling) can be checked."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        red = nn.functional.avg_pool2d(images[:, :1], 8, ceil_mode=True)
        return torch.cat([-4 * red, 4 * red, torch.zeros_like(red) - 8], dim=1)


def test_the_loss_scores_upsampled_predictions_and_ignores_255() -> None:
    model = ColourSegmenter()
    images = torch.full((1, 3, 16, 16), -2.0)
    images[..., :, 8:] = 2.0  # right half red: class 1
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[..., 8:] = 1
    right = segmentation_losses(model, images, labels)
    assert right["acc"].item() == 1.0
    wrong_corner = labels.clone()
    wrong_corner[..., :4, :4] = 2
    worse = segmentation_losses(model, images, wrong_corner)
    assert worse["acc"].item() == pytest.approx(1 - 16 / 256)
    assert worse["total"].item() > right["total"].item() + 0.5  # 16 pixels at a loss of ~16 each
    ignored = wrong_corner.clone()
    ignored[..., :4, :4] = 255  # the wrong pixels ignored: the loss is the mean over the others
    masked = segmentation_losses(model, images, ignored)
    assert masked["acc"].item() == 1.0
    assert masked["total"].item() == pytest.approx(right["total"].item(), rel=0.2)


def test_prediction_averages_probabilities_over_scales_and_flips_at_the_image_size() -> None:
    image = np.zeros((40, 56, 3), np.uint8)
    image[:, 28:, 0] = 255  # right half red
    model = ColourSegmenter().eval()
    probs = predict_probabilities(model, image, scales=(0.5, 1.0, 1.5), flip=True)
    assert probs.shape == (3, 40, 56) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    label = label_from_probabilities(probs)
    assert (label[:, :24] == 0).all() and (label[:, 32:] == 1).all()
    # a mirrored image gives the mirrored prediction, since every view is also flipped
    mirrored = predict_probabilities(model, np.ascontiguousarray(image[:, ::-1]), scales=(0.5, 1.0, 1.5))
    np.testing.assert_allclose(mirrored, probs[:, :, ::-1], atol=1e-5)


def test_prediction_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        predict_probabilities(ColourSegmenter().train(), np.zeros((8, 8, 3), np.uint8))
