"""Multi-scale + flip CAM inference, and turning the maps into a label map or the reference's seed dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cse_ray.cam import (
    cams_to_label,
    cams_to_seed_dict,
    inference_views,
    multiscale_cam,
    multiscale_cam_reference_way,
)
from cse_ray.data.transforms import normalize
from cse_ray.models import build_classifier

SCALES = (0.5, 1.0, 1.5, 2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_classifier("resnet38d_tiny")
    # Non-trivial BatchNorm statistics so that eval mode matters.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, size=(37, 45, 3), dtype=np.uint8)


def label_of(*classes: int) -> np.ndarray:
    label = np.zeros(20, np.float32)
    label[list(classes)] = 1.0
    return label


def assert_each_map_peaks_at_one(cams: np.ndarray) -> None:
    """Each map is normalised by its maximum; a map of zeros would make the comparisons vacuous."""
    np.testing.assert_allclose(cams.max(axis=(1, 2)), 1.0, atol=1e-2)


def test_inference_views_pair_each_scale_with_its_mirror(image):
    views = inference_views(image, SCALES)
    assert [tuple(v.shape) for v in views] == [(2, 3, 18, 22), (2, 3, 37, 45), (2, 3, 56, 68), (2, 3, 74, 90)]
    assert all(v.dtype == torch.float32 for v in views)
    for batch in views:
        assert torch.equal(batch[1], batch[0].flip(-1))
    np.testing.assert_allclose(views[1][0].numpy(), normalize(image).transpose(2, 0, 1))


def test_multiscale_cam_shapes_range_and_classes(model, image):
    cams, classes = multiscale_cam(model, image, label_of(1, 7, 14), SCALES, device="cpu")
    assert cams.shape == (3, 37, 45) and cams.dtype == np.float32
    assert classes.tolist() == [1, 7, 14] and classes.dtype == np.int64
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    assert_each_map_peaks_at_one(cams)


def test_batched_views_equal_the_reference_one_view_at_a_time(model, image):
    label = label_of(8, 10, 19)
    ours, ours_classes = multiscale_cam(model, image, label, SCALES)
    reference, reference_classes = multiscale_cam_reference_way(model, image, label, SCALES)
    assert ours_classes.tolist() == reference_classes.tolist() == [8, 10, 19]
    assert_each_map_peaks_at_one(ours)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_mirrored_image_gives_mirrored_cams(model, image):
    label = label_of(4, 11)
    cams, _ = multiscale_cam(model, image, label, SCALES)
    assert_each_map_peaks_at_one(cams)
    mirrored, _ = multiscale_cam(model, np.ascontiguousarray(image[:, ::-1]), label, SCALES)
    np.testing.assert_allclose(mirrored, cams[:, :, ::-1], atol=1e-4)


def test_symmetric_image_gives_symmetric_cams(model):
    half = np.random.default_rng(1).integers(0, 256, size=(32, 24, 3), dtype=np.uint8)
    symmetric = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))
    cams, _ = multiscale_cam(model, symmetric, label_of(6, 13), SCALES)
    assert_each_map_peaks_at_one(cams)
    # The network itself is not mirror-equivariant; only summing each view with its flipped-back mirror is.
    single, _ = multiscale_cam(model, symmetric, label_of(6, 13), (1.0,))
    np.testing.assert_allclose(cams, cams[:, :, ::-1], atol=1e-4)
    np.testing.assert_allclose(single, single[:, :, ::-1], atol=1e-4)


def test_bf16_autocast_stays_close_to_float32(model, image):
    label = label_of(4, 9)
    exact, _ = multiscale_cam(model, image, label, (1.0,))
    approx, _ = multiscale_cam(model, image, label, (1.0,), amp_dtype=torch.bfloat16)
    assert approx.dtype == np.float32
    assert np.abs(approx - exact).mean() < 0.05


def test_channels_last_gives_the_same_cams(image):
    torch.manual_seed(0)
    contiguous = build_classifier("resnet38d_tiny").eval()
    nhwc = build_classifier("resnet38d_tiny").eval()
    nhwc.load_state_dict(contiguous.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    assert nhwc.conv1a.weight.is_contiguous(memory_format=torch.channels_last)
    label = label_of(4, 9)
    exact, classes = multiscale_cam(contiguous, image, label, (1.0, 1.5))
    same, same_classes = multiscale_cam(nhwc, image, label, (1.0, 1.5), channels_last=True)
    assert same_classes.tolist() == classes.tolist() == [4, 9]
    assert_each_map_peaks_at_one(exact)
    np.testing.assert_allclose(same, exact, atol=1e-4)


def test_image_without_classes_and_training_mode(model, image):
    cams, classes = multiscale_cam(model, image, np.zeros(20), SCALES)
    assert cams.shape == (0, 37, 45) and classes.size == 0
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            multiscale_cam(model, image, label_of(1), SCALES)
    finally:
        model.eval()


def test_cams_to_label_thresholds_the_background():
    cams = np.zeros((2, 2, 3), np.float32)
    cams[0] = [[0.9, 0.1, 0.3], [0.0, 0.5, 0.2]]
    cams[1] = [[0.2, 0.05, 0.6], [0.0, 0.7, 0.1]]
    label = cams_to_label(cams, np.array([4, 12]), threshold=0.25, shape=(2, 3))
    assert label.dtype == np.uint8
    assert label.tolist() == [[5, 0, 13], [0, 13, 0]]
    assert cams_to_label(np.zeros((0, 2, 3), np.float32), np.array([], np.int64), 0.2, (2, 3)).tolist() == [
        [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        cams_to_label(cams, np.array([4]), 0.25, (2, 3))


def test_seed_dict_maps_class_index_to_its_map(tmp_path):
    cams = np.random.default_rng(0).random((2, 4, 5)).astype(np.float32)
    seed = cams_to_seed_dict(cams, np.array([6, 15]))
    np.save(tmp_path / "img.npy", seed)
    loaded = np.load(tmp_path / "img.npy", allow_pickle=True).item()
    assert sorted(loaded) == [6, 15] and all(type(k) is int for k in loaded)
    np.testing.assert_array_equal(loaded[15], cams[1])
    assert loaded[6].dtype == np.float32
