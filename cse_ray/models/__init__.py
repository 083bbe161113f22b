"""The CAM classifiers, AffinityNet and the segmentation networks, and their weights.

`build_classifier(name)` gives a module whose `forward(images)` returns `(cam, logits)`;
`build_affinity_net(name)` one whose `forward(images)` returns the stride-8 affinity features;
`build_segmenter(name, num_classes)` one whose `forward(images)` returns stride-8 class scores.
`load_weights` fills either from a psa/OC-CSE `.pth` or an MXNet `.params`. The variants differ only in
width, depth and dilation; all have output stride 8 and the same module names, so every tool works on
all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from cse_ray.errors import UserError
from cse_ray.models.affinity import (
    AFFINITY_DROPOUT,
    AFFINITY_HEADS,
    PAIR_RADIUS,
    AffinityNet,
    pair_affinities,
    pair_offsets,
    pair_region,
)
from cse_ray.models.resnet38d import FEATURE_STRIDE, FROZEN_PREFIXES, HEAD_NAME, ResNet38d
from cse_ray.models.sample_dropout import SampleDropout2d, sample_dropout
from cse_ray.models.segmentation import ASPP_RATES, SEG_HEAD, SegResNet38d, SegResNet101
from cse_ray.models.weights import LoadReport, convert_weights, load_weights, read_weights, unwrap

__all__ = [
    "AFFINITY_HEADS",
    "ASPP_RATES",
    "SEG_HEAD",
    "SEG_VARIANTS",
    "AffinityNet",
    "FEATURE_STRIDE",
    "PAIR_RADIUS",
    "VARIANTS",
    "LoadReport",
    "ResNet38d",
    "SampleDropout2d",
    "build_affinity_net",
    "build_classifier",
    "build_segmenter",
    "convert_weights",
    "check_backbone",
    "check_segmenter",
    "count_parameters",
    "frozen_layer_names",
    "load_weights",
    "pair_affinities",
    "pair_offsets",
    "pair_region",
    "param_groups",
    "read_weights",
    "sample_dropout",
    "unwrap",
]

VARIANTS: dict[str, dict[str, Any]] = {
    # The published network: 105,152,832 parameters, names of shared/spec/resnet38d_state_dict.json.
    "resnet38d": {"widths": (64, 128, 256, 512, 1024, 2048, 4096), "blocks": (3, 3, 6, 3)},
    # A quarter of the width, full depth: ~6.6 M parameters, for CPU runs that should still learn well.
    "resnet38d_small": {"widths": (16, 32, 64, 128, 256, 512, 1024), "blocks": (3, 3, 6, 3)},
    # An eighth of the width, one block per stage: ~0.95 M parameters, for tests and smoke runs.
    "resnet38d_tiny": {"widths": (8, 16, 32, 64, 128, 256, 512), "blocks": (1, 1, 1, 1)},
    # The tiny network without dilation: the same weights, a receptive field of ~110 px instead of ~220,
    # so that at 128 px a feature cell does not see the whole image (the synthetic demo, docs/DEMO.md).
    "resnet38d_tiny_undilated": {
        "widths": (8, 16, 32, 64, 128, 256, 512), "blocks": (1, 1, 1, 1), "dilated": False,
    },
    # The undilated tiny network with 1x1 convs at stride 8: a ~45 px receptive field, each cell judging
    # its own neighbourhood, and a third cheaper (docs/DEMO.md section 7 measures it on the demo's data).
    "resnet38d_tiny_local": {
        "widths": (8, 16, 32, 64, 128, 256, 512), "blocks": (1, 1, 1, 1), "dilated": False, "deep_kernel": 1,
    },
}
_OPTIONS = ("widths", "blocks", "head_dropout", "dilated", "deep_kernel")
VOC_CLASSES = 20  # the published checkpoints' fc8 (INTERFACE.md: build_classifier(name, num_classes=20))


def build_classifier(
    name: str, num_classes: int = VOC_CLASSES, dropout: Sequence[float] = (0.2, 0.2), **options: Any
) -> nn.Module:
    """A CAM classifier: `forward(images) -> (cam N x C x H/8 x W/8 before ReLU, logits N x C)`.

    num_classes: the 20 VOC classes unless told otherwise. dropout: Dropout2d rates in b6 and b7 (METHOD.md:
    0.2/0.2 for OC-CSE's classifier, 0.3/0.5 for its eraser and psa). options: `head_dropout`
    (before fc8; psa's train_cls uses 0.5, OC-CSE none) or `widths`/`blocks` overriding the variant.
    """
    if name not in VARIANTS:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(VARIANTS)}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise UserError(f"model '{name}': unknown options {unknown}; known: {', '.join(_OPTIONS)}")
    rates = tuple(float(rate) for rate in dropout)
    head_rate = float(options.get("head_dropout", 0.0))
    if len(rates) != 2 or not all(0.0 <= rate < 1.0 for rate in (*rates, head_rate)):
        raise UserError(f"model '{name}': dropout must be two rates in [0, 1) (b6, b7), got {dropout}")
    kwargs = {**VARIANTS[name], **options}
    try:
        return ResNet38d(int(num_classes), dropout=rates, **kwargs)
    except ValueError as error:
        raise UserError(f"model '{name}': {error}") from error


_AFFINITY_OPTIONS = ("widths", "blocks", "dropout", "dilated", "deep_kernel")


def build_affinity_net(name: str, **options: Any) -> nn.Module:
    """AffinityNet on the backbone `name` (a key of VARIANTS): `forward(images) -> N x C x H/8 x W/8`.

    `resnet38d` has the names and shapes of psa's `resnet38_aff` checkpoints (448 feature channels);
    the smaller variants scale the head widths with the backbone (resnet38d_small 112, tiny 56).
    options: `dropout` (b6 and b7; psa 0.3/0.5), or `widths`/`blocks`/`dilated` overriding the variant.
    """
    if name not in VARIANTS:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(VARIANTS)}")
    unknown = sorted(set(options) - set(_AFFINITY_OPTIONS))
    if unknown:
        raise UserError(f"model '{name}': unknown options {unknown}; known: {', '.join(_AFFINITY_OPTIONS)}")
    rates = tuple(float(rate) for rate in options.pop("dropout", AFFINITY_DROPOUT))
    if len(rates) != 2 or not all(0.0 <= rate < 1.0 for rate in rates):
        raise UserError(f"model '{name}': dropout must be two rates in [0, 1) (b6, b7), got {rates}")
    try:
        return AffinityNet(dropout=rates, **{**VARIANTS[name], **options})
    except ValueError as error:
        raise UserError(f"model '{name}': {error}") from error


# Segmentation networks: every classifier backbone with DeepLab's ASPP head, and DeepLab-v2's ResNet-101.
SEG_VARIANTS: dict[str, dict[str, Any]] = {
    **{name: {"family": "resnet38d", **variant} for name, variant in VARIANTS.items()},
    # DeepLab-v2: the names and shapes of torchvision's resnet101 (its 42.5 M backbone parameters).
    "resnet101": {"family": "resnet101", "stem": 64, "widths": (64, 128, 256, 512), "blocks": (3, 4, 23, 3)},
    # An eighth of the width, one block per layer: for tests on CPU.
    "resnet101_tiny": {"family": "resnet101", "stem": 8, "widths": (8, 16, 32, 64), "blocks": (1, 1, 1, 1)},
}


def build_segmenter(
    name: str, num_classes: int = VOC_CLASSES, rates: Sequence[int] = ASPP_RATES,
    dropout: Sequence[float] = (0.0, 0.0),
) -> nn.Module:
    """A segmentation network: `forward(images) -> N x (num_classes + 1) x H/8 x W/8` scores.

    name: a classifier backbone (`resnet38d`, its CPU variants: ResNet-38d + ASPP) or `resnet101`
    (DeepLab-v2; `resnet101_tiny` for CPU). num_classes: foreground classes (20 for VOC), the
    background is channel 0. rates: the ASPP dilations (DeepLab-v2: 6, 12, 18, 24). dropout: Dropout2d
    rates in ResNet-38d's b6 and b7 (ResNet-101 has no place for them: only zeros).
    """
    check_segmenter(name)
    options = dict(SEG_VARIANTS[name])
    family = options.pop("family")
    rates_b67 = tuple(float(rate) for rate in dropout)
    if len(rates_b67) != 2 or not all(0.0 <= rate < 1.0 for rate in rates_b67):
        raise UserError(f"model '{name}': dropout must be two rates in [0, 1) (b6, b7), got {dropout}")
    try:
        if family == "resnet101":
            if any(rates_b67):
                raise UserError(f"model '{name}': dropout {rates_b67} applies to ResNet-38d's b6 and b7 only")
            return SegResNet101(int(num_classes), rates=tuple(rates), **options)
        return SegResNet38d(int(num_classes), rates=tuple(rates), dropout=rates_b67, **options)
    except ValueError as error:
        raise UserError(f"model '{name}': {error}") from error


def check_segmenter(name: str, key: str = "train_seg.network") -> str:
    """Refuse an unknown segmentation network before any work starts."""
    if name not in SEG_VARIANTS:
        raise UserError(f"config key {key}: unknown segmentation network '{name}'; known: "
                        f"{', '.join(SEG_VARIANTS)}")
    return name


def check_backbone(name: str) -> str:
    """Refuse an unknown `model.backbone` before any work starts."""
    if name not in VARIANTS:
        known = ", ".join(VARIANTS)
        raise UserError(f"config key model.backbone: unknown model '{name}'; known models: {known}")
    return name


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def frozen_layer_names(model: nn.Module) -> list[str]:
    """Modules kept fixed while training (METHOD.md): conv1a, b2, b2_1, b2_2 and every BatchNorm.

    Top-level stem/stage-2 modules are listed once; BatchNorms inside them are not repeated.
    """
    names = []
    for name, module in model.named_modules():
        top = name.split(".", 1)[0]
        in_frozen_stage = any(top == prefix or top.startswith(prefix + "_") for prefix in FROZEN_PREFIXES)
        if name == top and in_frozen_stage:
            names.append(name)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not in_frozen_stage:
            names.append(name)
    return names


def param_groups(
    model: nn.Module, scratch: Sequence[str] = (HEAD_NAME,)
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained weights, pretrained biases, scratch weights, scratch biases), trainable ones only.

    A parameter is scratch when its top-level module is in `scratch` (psa: fc8; AffinityNet:
    AFFINITY_HEADS; OC-CSE: none, pass `scratch=()`); parameters with requires_grad False (frozen
    layers) are left out, as in psa.
    """
    groups: tuple[list[nn.Parameter], ...] = ([], [], [], [])
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_scratch = name.split(".", 1)[0] in scratch
        is_bias = name.rsplit(".", 1)[-1] == "bias"
        groups[2 * int(is_scratch) + int(is_bias)].append(parameter)
    return groups  # type: ignore[return-value]

