"""The segmentation networks: output shape and stride, DeepLab-v2's ResNet-101 names, weight loading."""

from __future__ import annotations

import pytest
import torch

from cse_ray.errors import UserError
from cse_ray.models import SEG_VARIANTS, build_classifier, build_segmenter, count_parameters, load_weights

CPU_VARIANTS = [name for name in SEG_VARIANTS if name.endswith(("tiny", "undilated", "local"))]


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_scores_have_one_channel_per_class_and_background_at_stride_8(name: str) -> None:
    model = build_segmenter(name, num_classes=80).eval()
    with torch.no_grad():
        scores = model(torch.randn(2, 3, 65, 97))
    assert scores.shape == (2, 81, 9, 13)  # ceil(65 / 8), ceil(97 / 8)


def test_resnet101_has_torchvisions_names_shapes_and_dilations() -> None:
    model = build_segmenter("resnet101", num_classes=20)
    state = model.state_dict()
    backbone = {k: v for k, v in model.named_parameters() if not k.startswith("aspp.")}
    # torchvision's resnet101 has 44,549,160 parameters, 2,049,000 of them in its fc layer.
    assert sum(p.numel() for p in backbone.values()) == 44_549_160 - 2_049_000
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer3.22.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    assert "layer3.23.conv1.weight" not in state
    # output stride 8: layer3 / layer4 dilate instead of striding, their first block at the previous rate
    assert model.layer3[0].conv2.stride == (1, 1) and model.layer3[0].conv2.dilation == (1, 1)
    assert model.layer3[1].conv2.dilation == (2, 2)
    assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)
    assert [conv.dilation for conv in model.aspp.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert state["aspp.convs.0.weight"].shape == (21, 2048, 3, 3)


def test_an_imagenet_resnet101_state_dict_loads_into_the_backbone(tmp_path) -> None:
    """A torchvision-style file (backbone + fc) fills every backbone entry; the ASPP head stays fresh."""
    donor = build_segmenter("resnet101_tiny", num_classes=20)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in donor.state_dict().items() if not k.startswith("aspp.")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(state, tmp_path / "imagenet.pth")
    model = build_segmenter("resnet101_tiny", num_classes=20)
    head_before = model.aspp.convs[0].weight.clone()
    report = load_weights(model, tmp_path / "imagenet.pth", strict=False)
    assert set(report.unused) >= {"fc.weight", "fc.bias"}
    assert all(name.startswith("aspp.") for name in report.missing)
    assert torch.equal(model.layer2[0].conv2.weight, state["layer2.0.conv2.weight"])
    assert torch.equal(model.aspp.convs[0].weight, head_before)


def test_a_classifier_checkpoint_gives_the_resnet38d_backbone(tmp_path) -> None:
    classifier = build_classifier("resnet38d_tiny", num_classes=20)
    torch.save(classifier.state_dict(), tmp_path / "cls.pth")
    model = build_segmenter("resnet38d_tiny", num_classes=20)
    report = load_weights(model, tmp_path / "cls.pth", strict=False)
    assert report.unused == ("fc8.weight",)
    assert torch.equal(model.b7.conv_branch2b2.weight, classifier.b7.conv_branch2b2.weight)
    assert sorted({name.split(".")[0] for name in report.missing}) == ["aspp"]


def test_a_trained_segmenter_reloads_strictly_and_another_class_count_is_refused(tmp_path) -> None:
    model = build_segmenter("resnet38d_tiny", num_classes=20)
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    load_weights(build_segmenter("resnet38d_tiny", num_classes=20), tmp_path / "seg.pth")
    with pytest.raises(UserError, match="seg.pth"):
        load_weights(build_segmenter("resnet38d_tiny", num_classes=80), tmp_path / "seg.pth")


def test_unknown_networks_and_rates_are_refused_by_name() -> None:
    with pytest.raises(UserError, match="train_seg.network: unknown segmentation network 'vgg16'"):
        build_segmenter("vgg16")
    with pytest.raises(UserError, match="ASPP rates"):
        build_segmenter("resnet38d_tiny", rates=(0, 6))
    assert count_parameters(build_segmenter("resnet38d_tiny", rates=(1, 2))) < count_parameters(
        build_segmenter("resnet38d_tiny"))


def test_dropout_goes_into_resnet38ds_b6_and_b7_and_resnet101_refuses_it() -> None:
    model = build_segmenter("resnet38d_tiny", dropout=(0.3, 0.5))
    assert (model.b6.dropout_2b1.p, model.b7.dropout_2b2.p) == (0.3, 0.5)
    assert build_segmenter("resnet38d_tiny").b6.dropout_2b1.p == 0.0
    with pytest.raises(UserError, match="resnet101_tiny.*b6 and b7"):
        build_segmenter("resnet101_tiny", dropout=(0.3, 0.0))
    with pytest.raises(UserError, match=r"dropout must be two rates in \[0, 1\)"):
        build_segmenter("resnet38d_tiny", dropout=(1.0, 0.0))
