"""Segmentation networks trained on pseudo-labels: DeepLab's ASPP head on ResNet-38d or ResNet-101.

Both networks return per-pixel class scores at output stride 8, `N x (C + 1) x ceil(H/8) x ceil(W/8)`
(index 0 = background, k = class k, as in the label PNGs); the training step and predict upsample them.

- `SegResNet38d`: psa's ResNet-38d backbone (the same module names as the classifier, so ImageNet
  `.params`, psa/OC-CSE classifiers and this project's classifier or eraser load into it) with DeepLab-v2's
  ASPP head: four 3x3 convs at dilations 6/12/18/24 on the 4096-channel features, summed.
- `SegResNet101`: DeepLab-v2 (ResNet-101, layer3/layer4 dilated 2/4 instead of strided, ASPP 6/12/18/24).
  The backbone has torchvision's module names (`conv1`, `bn1`, `layer1.0.conv1`, ..., stride on the 3x3
  conv), so torchvision's ImageNet `resnet101` state dict loads into it (its `fc` is left unused).
  It is written out here rather than imported because torchvision has no CPU wheel matched to every
  torch build (a mismatched one fails at import).

The head's weights start as DeepLab's: normal(0, 0.01), biases 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cse_ray.models.resnet38d import ResNet38d

SEG_HEAD = "aspp"  # trained from scratch: psa's x10 / x20 learning-rate groups
ASPP_RATES = (6, 12, 18, 24)  # DeepLab-v2


class ASPP(nn.Module):
    """DeepLab-v2's atrous spatial pyramid pooling: parallel dilated 3x3 convs, their outputs summed."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        if not rates or min(int(rate) for rate in rates) < 1:
            raise ValueError(f"ASPP rates must be positive integers, got {tuple(rates)}")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=int(rate), dilation=int(rate), bias=True)
            for rate in rates
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(features) for conv in self.convs]).sum(dim=0)


class SegResNet38d(ResNet38d):
    """ResNet-38d + ASPP. `forward(images) -> N x (num_classes + 1) x H/8 x W/8` scores; no `fc8`."""

    head_names = (SEG_HEAD,)

    def __init__(self, num_classes: int, rates: Sequence[int] = ASPP_RATES,
                 widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
                 blocks: Sequence[int] = (3, 3, 6, 3), dropout: Sequence[float] = (0.0, 0.0),
                 dilated: bool = True, deep_kernel: int = 3) -> None:
        super().__init__(1, widths=widths, blocks=blocks, dropout=dropout, dilated=dilated,
                         deep_kernel=deep_kernel)
        del self.fc8, self.head_dropout  # the classifier's head has no place here
        self.num_classes = int(num_classes)
        self.aspp = ASPP(self.feature_channels, self.num_classes + 1, rates)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.aspp(self.features(images))


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (1x1 -> 3x3 with the stride -> 1x1, x4 expansion)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class SegResNet101(nn.Module):
    """DeepLab-v2: ResNet-101 at output stride 8 + ASPP. `forward(images) -> N x (C + 1) x H/8 x W/8`.

    widths: the planes of layer1..4 (torchvision: 64, 128, 256, 512; outputs are 4x); blocks per layer
    (ResNet-101: 3, 4, 23, 3). layer3 and layer4 keep stride 1 and dilate by 2 and 4, their first block
    at the previous dilation, as torchvision's `replace_stride_with_dilation=[False, True, True]`.
    """

    head_names = (SEG_HEAD,)

    def __init__(self, num_classes: int, rates: Sequence[int] = ASPP_RATES, stem: int = 64,
                 widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (3, 4, 23, 3)) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4 or min(blocks) < 1:
            raise ValueError("widths and blocks need 4 entries each, every layer at least one block")
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels, dilation = stem, 1
        for index, (planes, count, stride, dilate) in enumerate(
            zip(widths, blocks, (1, 2, 1, 1), (False, False, True, True)), start=1
        ):
            previous = dilation
            if dilate:
                dilation *= 2
            downsample = None
            if stride != 1 or channels != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            layers = [Bottleneck(channels, planes, stride, previous, downsample)]
            channels = planes * Bottleneck.expansion
            layers += [Bottleneck(channels, planes, dilation=dilation) for _ in range(1, int(count))]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.feature_channels = channels
        self.aspp = ASPP(channels, self.num_classes + 1, rates)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.features(images))
