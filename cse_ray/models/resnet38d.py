"""ResNet-38d ("wide ResNet-38 with dilation", output stride 8) as a CAM classifier.

The module and parameter names are those of psa / OC-CSE checkpoints (`conv1a`, `b2`, `b2_1`, ...,
`b7`, `bn7`, `fc8`), so their `.pth` files load with `strict=True`; the exact list is
`shared/spec/resnet38d_state_dict.json`. Width and depth are constructor arguments so that the same
code path also builds the small CPU variants (`VARIANTS` in `cse_ray.models`).

Layout (full model): conv1a 3x3 -> stage 2 (b2.., stride 2) -> stage 3 (stride 2) -> stage 4
(stride 2) -> stage 5 (dilation 2) -> b6, b7 bottlenecks (dilation 4, dropout) -> bn7 + ReLU -> fc8.
Every block is pre-activation (BN -> ReLU -> conv); when a block changes shape, its 1x1 shortcut
`conv_branch1` reads the pre-activated input, and the stride sits on `conv_branch2a` and
`conv_branch1`, as in psa.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cse_ray.models.sample_dropout import SampleDropout2d

FEATURE_STRIDE = 8
HEAD_NAME = "fc8"
# Frozen while training (METHOD.md): the stem and the first stage; plus every BatchNorm layer.
FROZEN_PREFIXES = ("conv1a", "b2")


def _block_names(stage: int, count: int) -> list[str]:
    """psa's naming: the first block of stage N is `bN`, the following ones `bN_1`, `bN_2`, ..."""
    return [f"b{stage}"] + [f"b{stage}_{k}" for k in range(1, count)]


class PreActBlock(nn.Module):
    """Two 3x3 convs, pre-activation; the shortcut is a 1x1 conv when the shape changes."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        pad = kernel // 2
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(
            in_channels, mid_channels, kernel, stride, padding=first_dilation * pad, dilation=first_dilation,
            bias=False,
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(
            mid_channels, out_channels, kernel, padding=dilation * pad, dilation=dilation, bias=False
        )
        self.same_shape = in_channels == out_channels and stride == 1
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(
        self, x: torch.Tensor, return_activated: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block's output; with `return_activated`, also ReLU(bn_branch2a(x)), the pre-activated
        input that AffinityNet taps (psa's `get_x_bn_relu`) without running the BatchNorm twice."""
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return (shortcut + branch, activated) if return_activated else shortcut + branch


class PreActBottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1, widths out/4 and out/2, channel dropout before the last two convs."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, dropout: float = 0.0,
                 kernel: int = 3) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = SampleDropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(
            out_channels // 4, out_channels // 2, kernel, padding=dilation * (kernel // 2), dilation=dilation,
            bias=False,
        )
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = SampleDropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.same_shape = in_channels == out_channels
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(
        self, x: torch.Tensor, return_activated: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return (shortcut + branch, activated) if return_activated else shortcut + branch


class ResNet38d(nn.Module):
    """Backbone + `fc8` CAM head. `forward(images) -> (cam, logits)`.

    cam: `N x C x ceil(H/8) x ceil(W/8)`, before ReLU; logits: `N x C`, the spatial mean of the cam.
    psa applies dropout, then global average pooling, then fc8 to the pooled vector; because fc8 is a
    1x1 conv without bias (a linear map), `mean(fc8(dropout(f))) == fc8(mean(dropout(f)))`, so the
    logits are the same while the cam comes for free. OC-CSE's networks use no dropout before fc8
    (`head_dropout=0`); psa's train_cls uses 0.5.

    widths: channels of (conv1a, stage 2, stage 3, stage 4, stage 5, b6, b7); stage 5's inner width is
    half its output, the bottlenecks' inner widths are a quarter and a half of their output.
    blocks: number of blocks in stages 2..5 (b6 and b7 are always one bottleneck each).
    dropout: Dropout2d rates inside b6 and b7. Every dropout is a `SampleDropout2d`: torch's Dropout2d,
    or per-sample masks inside `sample_dropout(model, keys)` (what training uses, so that a split of
    the batch over workers draws the same masks).
    dilated: the published dilations (stage 5: 2, b6/b7: 4). False sets them all to 1: no parameter
    changes, but a much smaller receptive field, for small images where a dilated network sees the
    whole image from every feature cell (docs/DEMO.md).
    deep_kernel: the kernel of the convs at stride 8 (stage 5's and b6/b7's middle ones; published: 3).
    1 makes them 1x1: the receptive field stops at stage 4's (~45 px undilated), each feature cell
    judges its own small neighbourhood, and the network is cheaper.
    """

    feature_stride = FEATURE_STRIDE

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
        blocks: Sequence[int] = (3, 3, 6, 3),
        dropout: Sequence[float] = (0.2, 0.2),
        head_dropout: float = 0.0,
        dilated: bool = True,
        deep_kernel: int = 3,
    ) -> None:
        super().__init__()
        if len(widths) != 7 or len(blocks) != 4 or len(dropout) != 2:
            raise ValueError("widths needs 7 entries, blocks 4 and dropout 2")
        if deep_kernel not in (1, 3):
            raise ValueError(f"deep_kernel must be 1 or 3, got {deep_kernel}")
        if min(blocks) < 1 or min(widths) < 4 or num_classes < 1:
            raise ValueError("every stage needs at least one block, widths >= 4, num_classes >= 1")
        stem, w2, w3, w4, w5, w6, w7 = (int(w) for w in widths)
        d5, d6 = (2, 4) if dilated else (1, 1)
        self.num_classes = int(num_classes)
        self.conv1a = nn.Conv2d(3, stem, 3, padding=1, bias=False)

        # (stage, input width, output width, inner width, stride of first block, dilation, first dilation)
        stages = [
            (2, stem, w2, w2, 2, 1, 1),
            (3, w2, w3, w3, 2, 1, 1),
            (4, w3, w4, w4, 2, 1, 1),
            (5, w4, w5, w5 // 2, 1, d5, 1),
        ]
        self.block_names: list[str] = []
        for (stage, width_in, width_out, width_mid, stride, dilation, first_dilation), count in zip(
            stages, blocks
        ):
            for index, name in enumerate(_block_names(stage, int(count))):
                first = index == 0
                block = PreActBlock(
                    width_in if first else width_out,
                    width_mid,
                    width_out,
                    stride=stride if first else 1,
                    dilation=dilation,
                    first_dilation=first_dilation if first else dilation,
                    kernel=deep_kernel if stage == 5 else 3,
                )
                self.add_module(name, block)
                self.block_names.append(name)
        self.b6 = PreActBottleneck(w5, w6, dilation=d6, dropout=float(dropout[0]), kernel=deep_kernel)
        self.b7 = PreActBottleneck(w6, w7, dilation=d6, dropout=float(dropout[1]), kernel=deep_kernel)
        self.block_names += ["b6", "b7"]
        self.bn7 = nn.BatchNorm2d(w7)
        self.head_dropout = SampleDropout2d(head_dropout)
        self.fc8 = nn.Conv2d(w7, self.num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        self.feature_channels = w7

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's output (psa's `conv6`): ReLU(bn7(x)), stride 8, `feature_channels` wide."""
        x = self.conv1a(images)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.fc8(self.head_dropout(self.features(images)))
        logits = cam.mean(dim=(2, 3))
        return cam, logits
