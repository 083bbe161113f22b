"""AffinityNet (psa's `resnet38_aff`): which neighbouring stride-8 positions belong to the same region.

The network is the ResNet-38d backbone without the CAM head plus three 1x1 convs without bias, each
followed by ELU, on three depths of the backbone: the pre-activated input of `b5` (`f8_3`, 512 -> 64),
the pre-activated input of `b6` (`f8_4`, 1024 -> 128) and the backbone's output after bn7 + ReLU
(`f8_5`, 4096 -> 256). All three are stride 8 (b5 and b6 are dilated, not strided), so they are
concatenated without resampling (448 channels) and mixed by a 1x1 conv `f9` (448 -> 448) + ELU. The
names are psa's, so its checkpoints load strictly; the small variants keep the names and scale the
widths with the backbone (an eighth of the tapped width, a sixteenth of the output's).

The affinity of two positions is exp(-mean over channels |f_i - f_j|), for the pairs psa forms: each
position of the region [0, h - r + 1) x [r - 1, w - r + 1) with the positions at the offsets
`pair_offsets(r)` (dx^2 + dy^2 < r^2, one direction per pair). Positions in the last r - 1 rows or the
outer r - 1 columns are only ever the second member of a pair, exactly as in psa.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from cse_ray.models.resnet38d import ResNet38d

AFFINITY_HEADS = ("f8_3", "f8_4", "f8_5", "f9")  # trained from scratch (psa's lr x10 / x20 groups)
PAIR_RADIUS = 5
# psa's ResNet-38d for AffinityNet keeps the classifier's channel dropout inside b6 and b7
AFFINITY_DROPOUT = (0.3, 0.5)


class AffinityNet(ResNet38d):
    """ResNet-38d + psa's affinity heads. `forward(images) -> N x C x H/8 x W/8` features (C = 448 for
    the full network); `pair_affinities` turns them into affinities. There is no `fc8`."""

    head_names = AFFINITY_HEADS

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
        blocks: Sequence[int] = (3, 3, 6, 3),
        dropout: Sequence[float] = AFFINITY_DROPOUT,
        dilated: bool = True,
        deep_kernel: int = 3,
    ) -> None:
        super().__init__(1, widths=widths, blocks=blocks, dropout=dropout, dilated=dilated,
                         deep_kernel=deep_kernel)
        del self.fc8, self.head_dropout  # the CAM head has no place in psa's resnet38_aff checkpoints
        tapped_b5, tapped_b6, output = int(widths[3]), int(widths[4]), int(widths[6])
        sizes = (max(1, tapped_b5 // 8), max(1, tapped_b6 // 8), max(1, output // 16))
        self.f8_3 = nn.Conv2d(tapped_b5, sizes[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(tapped_b6, sizes[1], 1, bias=False)
        self.f8_5 = nn.Conv2d(output, sizes[2], 1, bias=False)
        self.f9 = nn.Conv2d(sum(sizes), sum(sizes), 1, bias=False)
        for head in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(head.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)  # psa's gain: affinities start spread out
        self.feature_channels = sum(sizes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.conv1a(images)
        taps = {}
        for name in self.block_names:
            block = getattr(self, name)
            if name in ("b5", "b6"):
                x, taps[name] = block(x, return_activated=True)
            else:
                x = block(x)
        output = F.relu(self.bn7(x))
        mixed = torch.cat(
            [F.elu(self.f8_3(taps["b5"])), F.elu(self.f8_4(taps["b6"])), F.elu(self.f8_5(output))], dim=1
        )
        return F.elu(self.f9(mixed))


@lru_cache(maxsize=8)
def pair_offsets(radius: int = PAIR_RADIUS) -> tuple[tuple[int, int], ...]:
    """(dy, dx) of psa's pairs in psa's order: (0, 1..r-1), then rows 1..r-1 with dx from -(r-1) to
    r-1 where dx^2 + dy^2 < r^2. Radius 5: 34 offsets, so 68 neighbours per position plus itself."""
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx) for dy in range(1, radius) for dx in range(1 - radius, radius)
        if dx * dx + dy * dy < radius * radius
    ]
    return tuple(offsets)


def pair_region(height: int, width: int, radius: int = PAIR_RADIUS) -> tuple[int, int]:
    """(rows, columns) of the positions that start a pair: [0, h - r + 1) x [r - 1, w - r + 1)."""
    return max(0, height - radius + 1), max(0, width - 2 * (radius - 1))


def pair_affinities(features: torch.Tensor, radius: int = PAIR_RADIUS) -> torch.Tensor:
    """Affinities of psa's pairs: `N x D x rows x columns` (D offsets, `pair_region` of the map).

    Entry [n, d, y, x] pairs the position (y, x + r - 1) with (y + dy, x + r - 1 + dx) for the d-th
    offset; `.flatten(2)` gives psa's layout (offset-major, then row-major positions).
    """
    if features.dim() != 4:
        raise ValueError(f"expected N x C x H x W features, got shape {tuple(features.shape)}")
    height, width = features.shape[2:]
    rows, columns = pair_region(height, width, radius)
    left = radius - 1
    source = features[:, :, :rows, left:left + columns]
    maps = []
    for dy, dx in pair_offsets(radius):
        target = features[:, :, dy:dy + rows, left + dx:left + dx + columns]
        maps.append(torch.exp(-(source - target).abs().mean(dim=1)))
    return torch.stack(maps, dim=1)
