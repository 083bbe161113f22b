"""The segmentation network's loss and its multi-scale + flip prediction of one image.

Training (METHOD.md "Segmentation network on pseudo-labels"): the stride-8 scores are upsampled
bilinearly to the crop and scored by cross-entropy with 255 ignored. Prediction: for every scale the
image is resized (bicubic), it and its mirror go through the network in one batch, the scores are
upsampled to the image's size, turned into class probabilities (softmax) and the mirror's flipped
back; the probabilities of all views are averaged. `label_from_probabilities` takes the argmax;
`cse-ray predict`, the pipeline's `seg_miou` and train-seg's per-epoch validation all call
`predict_probabilities`, so the three agree on what the network predicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cse_ray.data.transforms import BICUBIC, normalize, resize_to, to_chw
from cse_ray.labels import IGNORE_INDEX


def upsample(scores: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Stride-8 scores -> `size_hw`, bilinear (align_corners=False)."""
    return F.interpolate(scores, size=size_hw, mode="bilinear", align_corners=False)


def segmentation_losses(model: nn.Module, images: torch.Tensor,
                        labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step's losses: cross-entropy of the upsampled scores, pixels labelled 255 ignored.

    labels: N x H x W int64 (0 background, k + 1 class k, 255 ignore). `acc` is the pixel accuracy on
    the labelled pixels (for the logs).
    """
    scores = upsample(model(images).float(), tuple(labels.shape[-2:]))
    labels = labels.long()
    loss = F.cross_entropy(scores, labels, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        known = labels != IGNORE_INDEX
        correct = (scores.argmax(dim=1) == labels) & known
        acc = correct.sum().float() / known.sum().clamp(min=1).float()
    return {"ce": loss, "total": loss, "acc": acc}


def predict_probabilities(model: nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,),
                          flip: bool = True, device: torch.device | str = "cpu",
                          amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> np.ndarray:
    """Class probabilities float32 (C + 1) x H x W of a uint8 H x W x 3 image, averaged over the views.

    The model must be in eval mode. Each scale is one forward pass (the image and, with `flip`, its
    mirror as a batch of two).
    """
    if model.training:
        raise ValueError("prediction needs the model in eval mode (BatchNorm statistics, dropout off)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    device = torch.device(device)
    hw = (int(image.shape[0]), int(image.shape[1]))
    total: torch.Tensor | None = None
    views = 0
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with torch.no_grad():
        for scale in scales:
            size = (max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale)))
            resized = image if size == hw else resize_to(image, size, BICUBIC)
            chw = torch.from_numpy(to_chw(normalize(resized)))
            batch = (torch.stack([chw, chw.flip(-1)]) if flip else chw[None]).to(device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast:
                scores = model(batch)
            probs = torch.softmax(upsample(scores.float(), hw), dim=1)
            if flip:
                probs = torch.stack([probs[0], probs[1].flip(-1)])
            summed = probs.sum(dim=0)
            total = summed if total is None else total + summed
            views += probs.shape[0]
    assert total is not None, "no scales given"
    return (total / views).cpu().numpy().astype(np.float32)


def label_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """uint8 H x W: the most probable class (0 background, k + 1 class k)."""
    return probs.argmax(axis=0).astype(np.uint8)
