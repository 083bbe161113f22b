"""The CAM classifiers: the published ResNet-38d layout, the small variants, and the training helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cse_ray.errors import UserError
from cse_ray.models import (
    VARIANTS,
    build_classifier,
    count_parameters,
    frozen_layer_names,
    param_groups,
)

REPO = Path(__file__).resolve().parents[1]
SPEC_CANDIDATES = [
    REPO / "shared" / "spec" / "resnet38d_state_dict.json",
    REPO.parent / "shared" / "spec" / "resnet38d_state_dict.json",
    REPO / "tests" / "data" / "resnet38d_state_dict.json",
]
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("resnet38d").eval()


def spec_entries() -> list[tuple[str, list[int]]]:
    """(name, shape) of every entry of psa's checkpoint, from the spec beside the project."""
    spec = next((path for path in SPEC_CANDIDATES if path.is_file()), None)
    if spec is None:
        pytest.skip("resnet38d_state_dict.json not found")
    return [(entry["name"], entry["shape"]) for entry in json.loads(spec.read_text())]


def test_full_model_has_exactly_the_checkpoint_names_and_shapes(full_model):
    spec = spec_entries()
    ours = [(name, list(tensor.shape)) for name, tensor in full_model.state_dict().items()]
    assert ours == spec
    assert len(ours) == 229
    spec_parameters = sum(math.prod(shape) for name, shape in spec if not name.endswith(BUFFER_SUFFIXES))
    assert count_parameters(full_model) == spec_parameters == 105_152_832


def test_full_model_cam_has_stride_8_and_logits_are_its_mean(full_model):
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        cam, logits = full_model(images)
        features = full_model.features(images)
        psa_order_logits = full_model.fc8(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
    assert cam.shape == (1, 20, 12, 16)
    assert logits.shape == (1, 20)
    assert torch.allclose(logits, cam.mean(dim=(2, 3)))
    # psa pools first and applies fc8 after; fc8 is linear without bias, so the order does not matter
    assert torch.allclose(logits, psa_order_logits, atol=1e-5)
    assert full_model.feature_stride == 8


def test_tiny_forward_backward_on_a_non_square_batch():
    torch.manual_seed(0)
    model = build_classifier("resnet38d_tiny", num_classes=5).train()
    images = torch.randn(2, 3, 72, 104, requires_grad=True)
    cam, logits = model(images)
    assert cam.shape == (2, 5, 9, 13)
    assert logits.shape == (2, 5)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    # sizes that are not multiples of 8: each stride-2 conv rounds up
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70))[0].shape == (1, 5, 7, 9)


@pytest.mark.parametrize("name", ["resnet38d_small", "resnet38d_tiny", "resnet38d_tiny_undilated",
                                  "resnet38d_tiny_local"])
def test_every_variant_keeps_output_stride_8_and_psa_names(name):
    model = build_classifier(name).eval()
    with torch.no_grad():
        cam, logits = model(torch.randn(1, 3, 40, 64))
    assert cam.shape == (1, 20, 5, 8) and logits.shape == (1, 20)
    names = set(model.state_dict())
    assert {"conv1a.weight", "b2.conv_branch1.weight", "b5.conv_branch1.weight", "b6.conv_branch2b2.weight",
            "b7.conv_branch1.weight", "bn7.running_var", "fc8.weight"} <= names
    # same-shape blocks have no shortcut conv, exactly like the full network
    assert "b2_1.conv_branch1.weight" not in model.state_dict()
    assert model.feature_stride == 8


def test_undilated_tiny_has_the_same_weights_and_a_smaller_receptive_field():
    torch.manual_seed(0)
    dilated = build_classifier("resnet38d_tiny").eval()
    undilated = build_classifier("resnet38d_tiny_undilated").eval()
    undilated.load_state_dict(dilated.state_dict())  # strict: the same names and shapes
    images = torch.randn(1, 3, 128, 128)
    moved = images.clone()
    moved[:, :, 72:, 72:] += 5.0  # change only pixels >= 68 px from the top-left feature cell
    with torch.no_grad():
        far_cell = (slice(None), slice(None), 0, 0)
        # dilated: the receptive field spans ~220 px (+-110), undilated ~110 px (+-55)
        assert not torch.equal(dilated(images)[0][far_cell], dilated(moved)[0][far_cell])
        assert torch.equal(undilated(images)[0][far_cell], undilated(moved)[0][far_cell])
        assert not torch.equal(undilated(images)[0], undilated(moved)[0])


def test_local_tiny_has_1x1_convs_at_stride_8_and_a_45_px_receptive_field():
    torch.manual_seed(0)
    local = build_classifier("resnet38d_tiny_local").eval()
    undilated = build_classifier("resnet38d_tiny_undilated")
    assert set(local.state_dict()) == set(undilated.state_dict())  # psa's names; deep convs 1x1
    for name in ("b5.conv_branch2a", "b5.conv_branch2b1", "b6.conv_branch2b1", "b7.conv_branch2b1"):
        assert local.get_submodule(name).kernel_size == (1, 1)
    assert local.b4.conv_branch2b1.kernel_size == (3, 3)
    images = torch.randn(1, 3, 128, 128, requires_grad=True)
    local(images)[0][0, :, 8, 8].sum().backward()  # the cell whose centre is pixel (64, 64)
    rows, cols = images.grad.abs().sum(dim=(0, 1)).nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (42, 86, 42, 86)  # 45 px: 64 - 22 .. 64 + 22


def test_variants_are_smaller_than_the_full_network():
    counts = {}
    for name in VARIANTS:
        with torch.device("meta"):
            counts[name] = count_parameters(build_classifier(name))
    assert counts["resnet38d_tiny"] < counts["resnet38d_small"] < counts["resnet38d"] / 10


def test_dropout_rates_and_head_dropout_are_set_from_arguments():
    model = build_classifier("resnet38d_tiny", dropout=(0.3, 0.5), head_dropout=0.5)
    assert (model.b6.dropout_2b1.p, model.b6.dropout_2b2.p) == (0.3, 0.3)
    assert (model.b7.dropout_2b1.p, model.b7.dropout_2b2.p) == (0.5, 0.5)
    assert model.head_dropout.p == 0.5
    model.eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images)[0], model(images)[0])  # eval: dropout off, deterministic


def test_unknown_model_or_option_is_a_user_error_naming_the_choices():
    with pytest.raises(UserError, match="resnet38d_tiny") as raised:
        build_classifier("resnet50")
    assert "resnet50" in str(raised.value)
    with pytest.raises(UserError, match="widht"):
        build_classifier("resnet38d_tiny", widht=3)
    with pytest.raises(UserError, match="dropout"):
        build_classifier("resnet38d_tiny", dropout=(0.2, 1.5))


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = build_classifier("resnet38d_tiny").eval()
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        reference, _ = model(images)
        model = model.to(memory_format=torch.channels_last)
        cam, _ = model(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(cam, reference, atol=1e-5)


def test_frozen_layers_are_the_stem_stage_2_and_every_batchnorm():
    model = build_classifier("resnet38d_tiny")
    frozen = frozen_layer_names(model)
    assert frozen[:4] == ["conv1a", "b2", "b3.bn_branch2a", "b3.bn_branch2b1"]
    assert "bn7" in frozen and "b7.bn_branch2b2" in frozen
    assert "b2.bn_branch2a" not in frozen  # covered by b2
    assert not any(name.startswith("b3.conv") or name == "fc8" for name in frozen)


def test_param_groups_split_pretrained_and_scratch_and_skip_frozen_layers():
    model = build_classifier("resnet38d_tiny")
    modules = dict(model.named_modules())
    for name in frozen_layer_names(model):
        modules[name].requires_grad_(False)
    weights, biases, scratch_weights, scratch_biases = param_groups(model)
    assert [p is model.fc8.weight for p in scratch_weights] == [True]
    assert biases == [] and scratch_biases == []  # every conv is bias-free, BatchNorms are frozen
    assert any(p is model.b3.conv_branch2a.weight for p in weights)
    assert not any(p is model.conv1a.weight or p is model.b2.conv_branch1.weight for p in weights)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in weights + scratch_weights) == trainable
    # OC-CSE's eraser has no scratch layer: fc8 joins the first group
    oc_cse = param_groups(model, scratch=())
    assert any(p is model.fc8.weight for p in oc_cse[0]) and oc_cse[2] == []
