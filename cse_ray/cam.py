"""Multi-scale + flip CAM inference for one image, and turning the maps into labels or seed dicts.

METHOD.md: scales 0.5, 1.0, 1.5, 2.0 (bicubic), each also flipped; per view CAM -> bilinear upsample
to the original size -> ReLU -> zero absent classes -> flip back; sum; each class map divided by its
maximum + 1e-5; keep the present classes. Here an image and its flip share one forward pass and
only the present classes are upsampled (the others would be zeroed anyway); the reference's
one-view-at-a-time computation is kept as ``multiscale_cam_reference_way`` for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cse_ray.data.transforms import BICUBIC, normalize, resize_to, to_chw

DEFAULT_SCALES = (0.5, 1.0, 1.5, 2.0)
CAM_EPS = 1e-5
LABEL_PRESENT = 1e-5  # the reference keeps a class when its label entry exceeds this


def _scaled_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def inference_views(image: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES) -> list[torch.Tensor]:
    """One ``2 x 3 x h x w`` float32 batch per scale: the resized, normalised image and its mirror."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    hw = (image.shape[0], image.shape[1])
    views = []
    for scale in scales:
        size = _scaled_size(hw, scale)
        resized = image if size == hw else resize_to(image, size, BICUBIC)
        chw = torch.from_numpy(to_chw(normalize(resized)))
        views.append(torch.stack([chw, chw.flip(-1)]))
    return views


def present_classes(label: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Indices (int64) of the classes present in a 0/1 image label."""
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return np.flatnonzero(values.reshape(-1) > LABEL_PRESENT).astype(np.int64)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("multi-scale CAM needs the model in eval mode (BatchNorm statistics, dropout off)")


def _normalise_per_class(summed: torch.Tensor) -> torch.Tensor:
    return summed / (summed.amax(dim=(1, 2), keepdim=True) + CAM_EPS)


def multiscale_cam(model: nn.Module, image: np.ndarray, label: Sequence[float] | np.ndarray | torch.Tensor,
                   scales: Sequence[float] = DEFAULT_SCALES, device: torch.device | str = "cpu",
                   amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale + flip CAMs of one uint8 H x W x 3 image: (K x H x W float32 in [0, 1], K classes).

    The model must be in eval mode and on ``device``; ``amp_dtype`` (e.g. torch.bfloat16) runs the
    forward passes under autocast, the accumulation stays float32. ``channels_last`` sends the views
    in NHWC memory format (for a model converted with ``model.to(memory_format=torch.channels_last)``).
    """
    _check_eval(model)
    device = torch.device(device)
    classes = present_classes(label)
    height, width = image.shape[:2]
    if classes.size == 0:
        return np.zeros((0, height, width), np.float32), classes
    class_index = torch.from_numpy(classes).to(device)
    summed = torch.zeros((classes.size, height, width), dtype=torch.float32, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        for batch in inference_views(image, scales):
            with _autocast(device, amp_dtype):
                cam, _ = model(batch.to(device, non_blocking=True, memory_format=memory_format))
            cam = cam.float().index_select(1, class_index)
            cam = F.relu(F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False))
            summed += cam[0] + cam[1].flip(-1)
        normalised = _normalise_per_class(summed)
    return normalised.cpu().numpy(), classes


def multiscale_cam_reference_way(model: nn.Module, image: np.ndarray,
                                 label: Sequence[float] | np.ndarray | torch.Tensor,
                                 scales: Sequence[float] = DEFAULT_SCALES, device: torch.device | str = "cpu",
                                 amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same maps computed as the reference does: one view per forward, every class upsampled,
    each view copied to the host, masked, flipped and summed in numpy."""
    _check_eval(model)
    device = torch.device(device)
    classes = present_classes(label)
    height, width = image.shape[:2]
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    label_mask = (values.reshape(-1, 1, 1) > LABEL_PRESENT).astype(np.float32)
    maps = []
    with torch.inference_mode():
        for batch in inference_views(image, scales):
            for flipped, view in enumerate(batch):
                with _autocast(device, amp_dtype):
                    cam, _ = model(view.unsqueeze(0).to(device))
                cam = F.interpolate(cam.float(), size=(height, width), mode="bilinear", align_corners=False)
                cam = F.relu(cam[0]).cpu().numpy() * label_mask
                maps.append(np.flip(cam, axis=-1) if flipped else cam)
    summed = np.sum(maps, axis=0)
    normalised = summed / (summed.max(axis=(1, 2), keepdims=True) + CAM_EPS)
    return normalised[classes].astype(np.float32), classes


def cams_to_label(cams: np.ndarray, classes: np.ndarray, threshold: float,
                  shape: tuple[int, int]) -> np.ndarray:
    """uint8 H x W label map: argmax over [threshold, class maps]; 0 background, class index + 1."""
    if cams.shape[0] != len(classes) or tuple(cams.shape[1:]) != tuple(shape[:2]):
        raise ValueError(f"cams of shape {cams.shape} do not match {len(classes)} classes and shape {shape}")
    if len(classes) == 0:
        return np.zeros(shape[:2], np.uint8)
    background = np.full((1, *cams.shape[1:]), threshold, dtype=cams.dtype)
    winner = np.concatenate([background, cams], axis=0).argmax(axis=0)
    lookup = np.concatenate([[0], np.asarray(classes, np.int64) + 1]).astype(np.uint8)
    return lookup[winner]


def cams_to_seed_dict(cams: np.ndarray, classes: np.ndarray) -> dict[int, np.ndarray]:
    """The reference's per-image seed dict ``{class_index: H x W float32}``."""
    return {int(c): np.asarray(cams[i], np.float32) for i, c in enumerate(classes)}
