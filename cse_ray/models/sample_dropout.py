"""Channel dropout whose masks belong to the sample, not to the batch or the worker.

torch's `Dropout2d` draws a batch's masks from the process's random stream, so the mask an image gets
depends on the worker it lands on and on its place in that worker's batch: N Ray Train workers then
take a different step than one process at the same global batch. `SampleDropout2d` draws each
sample's channel mask from a generator of its own, seeded by the sample's key (training sets
(seed, epoch, sample index), `sample_dropout`) and the layer, so however the batch is split every
sample is dropped alike. Without keys, or in eval mode, it is torch's `Dropout2d`. It has no
parameters or buffers, so state dicts keep psa's names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

# A word of the generators' seed that keeps them apart from the other per-sample streams drawn from the
# same (seed, epoch, index) key (augmentation, the mask-class choice).
DROPOUT_STREAM = 0xD0

SampleKeys = Sequence[Sequence[int]]


def channel_masks(keys: SampleKeys, layer: int, channels: int, p: float) -> torch.Tensor:
    """`len(keys) x channels` float32: 0 for a dropped channel, 1 / (1 - p) for a kept one (torch's scale).

    Row i depends only on (keys[i], layer): channel c of sample i is kept when the c-th uniform draw of
    the generator seeded by (*keys[i], DROPOUT_STREAM, layer) is at least p.
    """
    rows = [np.random.default_rng([*(int(k) for k in key), DROPOUT_STREAM, int(layer)])
            .random(channels, dtype=np.float32) for key in keys]
    keep = np.stack(rows) >= p if rows else np.zeros((0, channels), dtype=bool)
    scale = np.float32(0.0) if p >= 1.0 else np.float32(1.0) / np.float32(1.0 - p)
    return torch.from_numpy(keep.astype(np.float32) * scale)


class SampleDropout2d(nn.Dropout2d):
    """`nn.Dropout2d` (zeroes whole channels with probability p, scales the rest by 1 / (1 - p)) whose
    mask of sample i comes from `sample_keys[i]` and `layer` when keys are set (`sample_dropout`)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.sample_keys: SampleKeys | None = None  # one key per sample of the next batches
        self.layer = 0  # this module's place among its network's SampleDropout2d modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.sample_keys is None:
            return super().forward(x)
        if x.dim() < 2 or len(self.sample_keys) != x.shape[0]:
            raise ValueError(f"SampleDropout2d: {len(self.sample_keys)} sample keys for an input of shape "
                             f"{tuple(x.shape)}; set one key per sample (sample_dropout)")
        mask = channel_masks(self.sample_keys, self.layer, x.shape[1], self.p)
        if x.is_cuda:  # a pinned source lets the copy run behind the queued kernels, without a sync
            mask = mask.pin_memory()
        mask = mask.to(x.device, x.dtype, non_blocking=True)
        return x * mask.view(*mask.shape, *([1] * (x.dim() - 2)))


def dropout_layers(model: nn.Module) -> list[SampleDropout2d]:
    """The model's SampleDropout2d modules in definition order (a DDP wrapper adds none)."""
    return [module for module in model.modules() if isinstance(module, SampleDropout2d)]


@contextlib.contextmanager
def sample_dropout(model: nn.Module, keys: SampleKeys | None) -> Iterator[None]:
    """Within the block, the model's dropout draws sample i's masks from `keys[i]` (one sequence of
    non-negative ints per sample of the batch); `None` leaves them to torch's random stream.

    Each SampleDropout2d is numbered by its place in the model (`layer`), so the layers of one sample
    draw different masks; the numbering is the same with or without a DDP wrapper.
    """
    layers = dropout_layers(model)
    for layer, module in enumerate(layers):
        module.sample_keys, module.layer = keys, layer
    try:
        yield
    finally:
        for module in layers:
            module.sample_keys = None
