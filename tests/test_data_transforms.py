"""Augmentation functions and the torch datasets built on them, on real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cse_ray.data import transforms as T
from cse_ray.data import voc
from cse_ray.data.datasets import ImageDataset, TrainDataset
from cse_ray.errors import UserError
from cse_ray.labels import custom_label_space


def gradient_image(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), 128 + 0 * xs], -1).astype(
        np.uint8
    )


def test_normalize_uses_imagenet_statistics() -> None:
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0] = 255
    out = T.normalize(img)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3)
    assert np.allclose(out[0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-6)


def test_resize_long_side_keeps_aspect() -> None:
    img = gradient_image(60, 90)
    assert T.resize_long_side(img, 180).shape == (120, 180, 3)
    assert T.resize_long_side(img[:, :45], 30).shape == (30, 22, 3)
    rng = np.random.default_rng(0)
    sizes = {max(T.random_resize_long(img, rng, 40, 44).shape[:2]) for _ in range(40)}
    assert sizes == {40, 41, 42, 43, 44}


def test_resize_to_handles_images_and_float_maps() -> None:
    img = gradient_image(20, 30)
    assert T.resize_to(img, (40, 60)).dtype == np.uint8
    cam = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    big = T.resize_to(cam, (40, 60), T.BILINEAR)
    assert big.shape == (40, 60) and big.dtype == np.float32
    assert abs(float(big.mean()) - float(cam.mean())) < 0.02
    stacked = T.resize_to(np.stack([cam, 1 - cam], -1), (10, 15), T.BILINEAR)
    assert stacked.shape == (10, 15, 2)


def test_random_flip_mirrors_horizontally() -> None:
    img = gradient_image(4, 6)
    outcomes = [T.random_flip(img, np.random.default_rng(seed)) for seed in range(20)]
    flipped = [out for out in outcomes if not np.array_equal(out, img)]
    assert 0 < len(flipped) < 20
    assert np.array_equal(flipped[0], img[:, ::-1])


def test_color_jitter_is_a_function_of_the_rng() -> None:
    img = gradient_image(32, 32)
    first = T.color_jitter(img, np.random.default_rng(5))
    second = T.color_jitter(img, np.random.default_rng(5))
    other = T.color_jitter(img, np.random.default_rng(6))
    assert first.dtype == np.uint8 and first.shape == img.shape
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, img)
    untouched = T.color_jitter(img, np.random.default_rng(5), 0, 0, 0, 0)
    assert np.array_equal(untouched, img)


def test_random_crop_pad_pads_small_images_with_zeros() -> None:
    img = T.normalize(gradient_image(10, 6)) + 5.0  # all values far from zero
    crop = T.random_crop_pad(img, np.random.default_rng(1), 16)
    assert crop.shape == (16, 16, 3) and crop.dtype == np.float32
    filled = np.abs(crop).sum(-1) > 0
    assert filled.sum() == 60  # the whole 10x6 image is inside, the rest is zero padding
    rows, cols = np.nonzero(filled)
    assert np.array_equal(crop[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], img)


def test_random_crop_pad_takes_a_window_of_large_images() -> None:
    img = T.normalize(gradient_image(50, 70))
    crop = T.random_crop_pad(img, np.random.default_rng(2), 32)
    hits = [
        (top, left)
        for top in range(50 - 31)
        for left in range(70 - 31)
        if np.array_equal(img[top : top + 32, left : left + 32], crop)
    ]
    assert len(hits) == 1


def test_to_chw() -> None:
    img = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    chw = T.to_chw(img)
    assert chw.shape == (3, 2, 4) and chw.flags["C_CONTIGUOUS"]
    assert chw[1, 1, 2] == img[1, 2, 1]


@pytest.fixture()
def tiny_voc(tmp_path: Path) -> tuple[Path, list[str], dict[str, np.ndarray]]:
    names = ["wide", "tall"]
    for name, (height, width) in zip(names, [(40, 64), (64, 30)], strict=True):
        path = voc.image_path(tmp_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient_image(height, width)).save(path, quality=95)
    labels = {"wide": np.eye(20, dtype=np.float32)[7], "tall": np.eye(20, dtype=np.float32)[[2, 14]].sum(0)}
    return tmp_path, names, labels


def test_train_dataset_items_have_fixed_shape_and_labels(tiny_voc) -> None:
    root, names, labels = tiny_voc
    dataset = TrainDataset(root, names, labels, crop=48, resize_long=(20, 40), seed=3)
    image, label = dataset[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert label.dtype == torch.float32 and torch.equal(label, torch.from_numpy(labels["wide"]))
    # The long side is at most 40 < 48, so at least 8 rows and 8 columns are zero padding.
    assert (image.abs().sum(0) == 0).sum() >= 48 * 48 - 40 * 40
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch[0].shape == (2, 3, 48, 48) and batch[1].shape == (2, 20)


def test_train_dataset_is_reproducible_per_seed_and_epoch(tiny_voc) -> None:
    root, names, labels = tiny_voc
    first = TrainDataset(root, names, labels, crop=32, resize_long=(30, 70), seed=11)
    second = TrainDataset(root, names, labels, crop=32, resize_long=(30, 70), seed=11)
    first.set_epoch(2)
    second.set_epoch(2)
    assert torch.equal(first[1][0], second[1][0])
    second.set_epoch(3)
    assert not torch.equal(first[1][0], second[1][0])
    reseeded = TrainDataset(root, names, labels, crop=32, resize_long=(30, 70), seed=12)
    reseeded.set_epoch(2)
    assert not torch.equal(first[1][0], reseeded[1][0])


def test_train_dataset_requires_a_label_for_every_image(tiny_voc) -> None:
    root, names, labels = tiny_voc
    with pytest.raises(UserError, match="tall"):
        TrainDataset(root, names, {"wide": labels["wide"]}, crop=32)


def test_datasets_check_labels_against_the_label_space(tiny_voc) -> None:
    root, names, labels = tiny_voc
    three = custom_label_space(3)
    short = {name: vec[:3] for name, vec in labels.items()}
    assert TrainDataset(root, names, short, crop=32, space=three)[0][1].shape == (3,)
    assert ImageDataset(root, names, short, space=three)[1]["label"].shape == (3,)
    with pytest.raises(UserError, match=r"label of 'wide' has 20 entries, expected 3"):
        TrainDataset(root, names, labels, crop=32, space=three)
    with pytest.raises(UserError, match=r"label of 'wide' has 3 entries, expected 20"):
        ImageDataset(root, names, short)


def test_image_dataset_yields_unaugmented_images(tiny_voc) -> None:
    root, names, labels = tiny_voc
    items = list(ImageDataset(root, names, labels))
    assert [item["name"] for item in items] == names
    assert items[1]["image"].shape == (64, 30, 3) and items[1]["image"].dtype == np.uint8
    assert np.array_equal(items[1]["label"], labels["tall"])
    assert "label" not in ImageDataset(root, names)[0]


def test_an_image_and_its_label_are_resized_flipped_and_cropped_together() -> None:
    """Left half red / class 1, right half blue / class 2: after augmentation every pixel of either colour
    keeps its class, and the padding of a crop larger than the image is 255 and invalid."""
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20, 0] = 255
    image[:, 20:, 2] = 255
    label = np.ones((30, 40), np.uint8)
    label[:, 20:] = 2
    no_jitter = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    flipped = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        crop, crop_label, valid = T.augment_with_label(image, label, rng, 48, (40, 44), no_jitter)
        assert crop.shape == (48, 48, 3) and crop.dtype == np.float32 and crop_label.dtype == np.uint8
        assert np.array_equal(crop_label == 255, ~valid) and (~valid).sum() >= 48 * 48 - 33 * 44
        # Normalised, 255 lies above 1 and 0 below -1; bicubic blends the colours at the border only.
        red = (crop[..., 0] > 1.0) & (crop[..., 2] < -1.0)
        blue = (crop[..., 2] > 1.0) & (crop[..., 0] < -1.0)
        assert not (red & (crop_label != 1)).any() and not (blue & (crop_label != 2)).any()
        assert (red | blue).sum() >= 0.9 * valid.sum()
        columns = np.flatnonzero(valid.any(axis=0))
        flipped += int(crop_label[valid.any(axis=1)][:, columns[0]][0] == 2)  # class 2 on the left
    assert 0 < flipped < 8  # some crops were flipped, some not
