"""Image augmentation for CAM training, in numpy + PIL (no torchvision).

Arrays in, arrays out: uint8 HxWx3 RGB until `normalize`, float32 HxWx3 after it. Every random function
takes an explicit `np.random.Generator`, so an item's augmentation is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from cse_ray.labels import IGNORE_INDEX

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32, scaled to [0, 1] then ImageNet mean/std standardised (as psa does)."""
    scaled = np.asarray(img, dtype=np.float32) / 255.0
    return (scaled - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def resize_to(img: np.ndarray, size_hw: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """Resize to exactly (h, w). uint8 images go through PIL directly; float maps channel by channel."""
    height, width = int(size_hw[0]), int(size_hw[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {size_hw}")
    img = np.asarray(img)
    if img.shape[:2] == (height, width):
        return img.copy()
    if img.dtype == np.uint8:
        return np.asarray(Image.fromarray(img).resize((width, height), resample=resample))
    as_float = img.astype(np.float32, copy=False)
    if as_float.ndim == 2:
        return np.asarray(
            Image.fromarray(np.ascontiguousarray(as_float)).resize((width, height), resample=resample)
        )
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(as_float[..., c])).resize((width, height), resample=resample)
        )
        for c in range(as_float.shape[2])
    ]
    return np.stack(channels, axis=-1)


def resize_long_side(img: np.ndarray, long_side: int, resample: int = BICUBIC) -> np.ndarray:
    """Scale so that max(h, w) == long_side, keeping the aspect ratio."""
    height, width = img.shape[:2]
    scale = long_side / max(height, width)
    return resize_to(img, (max(1, round(height * scale)), max(1, round(width * scale))), resample)


def random_resize_long(img: np.ndarray, rng: np.random.Generator, low: int, high: int) -> np.ndarray:
    """Long side drawn uniformly from the integers low..high (inclusive), bicubic."""
    return resize_long_side(img, int(rng.integers(low, high + 1)), BICUBIC)


def random_flip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability p."""
    return np.ascontiguousarray(img[:, ::-1]) if rng.random() < p else img


def _shift_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(hue_factor * 255))) % 256
    return Image.frombytes("HSV", img.size, np.ascontiguousarray(hsv).tobytes()).convert("RGB")


def color_jitter(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.1,
) -> np.ndarray:
    """Brightness/contrast/saturation factors uniform in [1-x, 1+x], hue shift uniform in [-hue, hue]
    (fraction of the colour circle), applied in a random order like torchvision's ColorJitter."""
    factors = {
        "brightness": rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
        "contrast": rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
        "saturation": rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
        "hue": rng.uniform(-hue, hue),
    }
    pil = Image.fromarray(np.asarray(img, np.uint8))
    for op in rng.permutation(["brightness", "contrast", "saturation", "hue"]):
        if op == "brightness" and brightness > 0:
            pil = ImageEnhance.Brightness(pil).enhance(factors["brightness"])
        elif op == "contrast" and contrast > 0:
            pil = ImageEnhance.Contrast(pil).enhance(factors["contrast"])
        elif op == "saturation" and saturation > 0:
            pil = ImageEnhance.Color(pil).enhance(factors["saturation"])
        elif op == "hue" and hue > 0:
            pil = _shift_hue(pil, factors["hue"])
    return np.asarray(pil)


def random_crop_pad(img: np.ndarray, rng: np.random.Generator, crop: int) -> np.ndarray:
    """A crop x crop window; where the image is smaller it is placed at a random offset in a zero canvas.

    Zero padding happens after normalisation (as psa does), so padding equals the mean colour.
    """
    height, width = img.shape[:2]
    channels = img.shape[2] if img.ndim == 3 else None
    shape = (crop, crop, channels) if channels else (crop, crop)
    canvas = np.zeros(shape, dtype=np.float32)

    def offsets(extent: int) -> tuple[int, int, int]:
        span = min(crop, extent)
        if extent > crop:
            return 0, int(rng.integers(0, extent - crop + 1)), span
        return int(rng.integers(0, crop - extent + 1)), 0, span

    canvas_top, img_top, crop_h = offsets(height)
    canvas_left, img_left, crop_w = offsets(width)
    canvas[canvas_top : canvas_top + crop_h, canvas_left : canvas_left + crop_w] = img[
        img_top : img_top + crop_h, img_left : img_left + crop_w
    ]
    return canvas


def augment_with_label(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop: int,
    resize_long: tuple[int, int], jitter: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image and its label map augmented together (AffinityNet's and the segmentation network's crops).

    The long side drawn from `resize_long` (image bicubic, label nearest), a flip of both with
    probability 1/2, colour jitter of the image only, normalisation, then one random crop window for
    both. Returns (float32 crop x crop x 3 image, uint8 crop x crop label, bool crop x crop valid):
    where the crop is padding the image is 0 (the mean colour), the label 255 and `valid` False.
    """
    long_side = int(rng.integers(resize_long[0], resize_long[1] + 1))
    image = resize_long_side(image, long_side, BICUBIC)
    label = resize_long_side(label, long_side, NEAREST)
    if rng.random() < 0.5:
        image, label = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
    image = color_jitter(image, rng, **jitter)
    # One crop for image, label and a validity channel: the padding is 0 in all three.
    stacked = np.concatenate([normalize(image), label[..., None].astype(np.float32),
                              np.ones((*label.shape, 1), np.float32)], axis=2)
    window = random_crop_pad(stacked, rng, crop)
    valid = window[..., 4] > 0.5
    return window[..., :3], np.where(valid, window[..., 3], IGNORE_INDEX).astype(np.uint8), valid


def to_chw(img: np.ndarray) -> np.ndarray:
    """HxWxC -> CxHxW, contiguous (what torch.from_numpy wants)."""
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
