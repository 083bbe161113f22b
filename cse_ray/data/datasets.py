"""Torch datasets over a VOC-layout root: augmented crops for training, plain images for inference."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cse_ray.data import transforms
from cse_ray.data.voc import image_path, validate_name
from cse_ray.errors import UserError
from cse_ray.formats import read_image
from cse_ray.labels import VOC, LabelSpace


def _checked_labels(
    names: Sequence[str], labels: dict[str, np.ndarray], num_classes: int
) -> dict[str, np.ndarray]:
    missing = [name for name in names if name not in labels]
    if missing:
        shown = ", ".join(missing[:5])
        raise UserError(
            f"{len(missing)} images have no image-level label (first: {shown}); regenerate the labels file"
        )
    checked = {}
    for name in names:
        vec = np.asarray(labels[name], np.float32).reshape(-1)
        if vec.shape != (num_classes,):
            raise UserError(f"label of {name!r} has {vec.size} entries, expected {num_classes}")
        checked[name] = vec
    return checked


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation rng of item `index` in `epoch`: the same draws on any number of workers."""
    return np.random.default_rng([seed, epoch, int(index)])


class TrainDataset(Dataset):
    """Augmented training crops: random long-side resize, flip, colour jitter, normalise, crop with zero pad.

    Item i in epoch e draws from an rng seeded by (seed, epoch, i), so a run is reproducible regardless of
    worker count or order. Call `set_epoch(e)` before each epoch (DataLoader workers get a fresh copy of the
    dataset each epoch unless `persistent_workers=True`, in which case set the epoch before creating them).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        names: Sequence[str],
        labels: dict[str, np.ndarray],
        crop: int,
        resize_long: tuple[int, int] | None = (256, 448),
        flip: bool = True,
        jitter: bool = True,
        seed: int = 0,
        jitter_strength: dict[str, float] | None = None,
        space: LabelSpace = VOC,
    ) -> None:
        self.root = root
        self.names = [validate_name(name) for name in names]
        self.labels = _checked_labels(self.names, labels, space.num_classes)
        if crop <= 0:
            raise UserError(f"crop must be positive, got {crop}")
        if resize_long is not None and not 0 < resize_long[0] <= resize_long[1]:
            raise UserError(f"resize_long must be (low, high) with 0 < low <= high, got {resize_long}")
        self.crop = int(crop)
        self.resize_long = resize_long
        self.flip = flip
        self.jitter = jitter
        self.jitter_strength = dict(jitter_strength or {})
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.names)

    def rng_for(self, index: int) -> np.random.Generator:
        return sample_rng(self.seed, self.epoch, index)

    def augment(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 HxWx3 -> float32 3 x crop x crop, the METHOD.md order of operations."""
        if self.resize_long is not None:
            img = transforms.random_resize_long(img, rng, *self.resize_long)
        if self.flip:
            img = transforms.random_flip(img, rng)
        if self.jitter:
            img = transforms.color_jitter(img, rng, **self.jitter_strength)
        img = transforms.random_crop_pad(transforms.normalize(img), rng, self.crop)
        return transforms.to_chw(img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.names[index]
        img = read_image(image_path(self.root, name))
        chw = self.augment(img, self.rng_for(index))
        return torch.from_numpy(chw), torch.from_numpy(self.labels[name].copy())


class LabelMapCrops(Dataset):
    """(image 3 x crop x crop, target, index): an image and its label map augmented together.

    Long-side resize, flip, colour jitter of the image, one crop with label padding 255
    (`transforms.augment_with_label`); item i of epoch e draws from the rng (seed, e, i), as in
    `TrainDataset`. Subclasses say where the label map comes from (`read_label`) and what the network
    learns from the cropped one (`target`); AffinityNet's stride-8 labels and the segmentation
    network's full-size ones are two such.
    """

    def __init__(self, root: str | os.PathLike, names: Sequence[str], crop: int,
                 resize_long: tuple[int, int], jitter: dict[str, float], seed: int) -> None:
        self.root, self.names = root, list(names)
        self.crop, self.resize_long, self.jitter, self.seed = crop, resize_long, jitter, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.names)

    def read_label(self, name: str, hw: tuple[int, int]) -> np.ndarray:
        """The uint8 H x W label map of image `name` (of size `hw`)."""
        raise NotImplementedError

    def target(self, label: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """What the network learns from the cropped label (`valid`: the crop's pixels inside the image)."""
        return torch.from_numpy(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        name = self.names[index]
        rng = sample_rng(self.seed, self.epoch, index)
        image = read_image(image_path(self.root, name))
        label = self.read_label(name, image.shape[:2])
        image, label, valid = transforms.augment_with_label(image, label, rng, self.crop, self.resize_long,
                                                            self.jitter)
        return torch.from_numpy(transforms.to_chw(image)), self.target(label, valid), index


class ImageDataset(Dataset):
    """Un-augmented images for inference and validation: dicts {"name", "image" uint8 HxWx3, "label"}.

    `labels=None` is allowed for unlabelled inference; the "label" entry is then absent.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        names: Sequence[str],
        labels: dict[str, np.ndarray] | None = None,
        space: LabelSpace = VOC,
    ) -> None:
        self.root = root
        self.names = [validate_name(name) for name in names]
        self.labels = _checked_labels(self.names, labels, space.num_classes) if labels is not None else None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.names):
            raise IndexError(index)
        name = self.names[index]
        item = {"name": name, "image": read_image(image_path(self.root, name))}
        if self.labels is not None:
            item["label"] = self.labels[name].copy()
        return item

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self.names)):
            yield self[index]
