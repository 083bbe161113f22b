"""AffinityNet: psa's resnet38_aff names and shapes, where the heads tap the backbone, its weights, and
the affinities of psa's pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cse_ray.errors import UserError
from cse_ray.models import (
    AFFINITY_HEADS,
    build_affinity_net,
    build_classifier,
    count_parameters,
    frozen_layer_names,
    load_weights,
    pair_affinities,
    pair_offsets,
    pair_region,
    param_groups,
)
from cse_ray.models.mxnet_params import write_mxnet_params
from cse_ray.models.weights import torch_to_mxnet_name

REPO = Path(__file__).resolve().parents[1]
SPEC_CANDIDATES = [
    REPO / "shared" / "spec" / "resnet38_aff_state_dict.json",
    REPO.parent / "shared" / "spec" / "resnet38_aff_state_dict.json",
    REPO / "tests" / "data" / "resnet38_aff_state_dict.json",
]
COUNTER = "num_batches_tracked"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def spec_entries() -> list[tuple[str, list[int]]]:
    spec = next((path for path in SPEC_CANDIDATES if path.is_file()), None)
    if spec is None:
        pytest.skip("resnet38_aff_state_dict.json not found")
    return [(entry["name"], entry["shape"]) for entry in json.loads(spec.read_text())]


def random_state(entries, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.tensor(7) if name.endswith(COUNTER) else torch.rand(shape, generator=generator)
        for name, shape in entries
    }


def shapes(model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_affinity_net("resnet38d").eval()


# ------------------------------------------------------------------------------------------ the network


def test_full_network_has_exactly_psas_names_and_shapes_and_no_fc8(full_model):
    assert shapes(full_model) == spec_entries()
    assert not hasattr(full_model, "fc8")
    buffers = ("running_mean", "running_var", COUNTER)
    parameters = sum(math.prod(shape) for name, shape in spec_entries() if not name.endswith(buffers))
    assert count_parameters(full_model) == parameters
    assert full_model.feature_channels == 448


def test_a_psa_resnet38_aff_checkpoint_loads_strictly(full_model, tmp_path):
    state = random_state(spec_entries())
    path = tmp_path / "resnet38_aff.pth"
    torch.save({f"module.{name}": value for name, value in state.items()}, path)  # DataParallel names
    report = load_weights(full_model, path)  # strict
    assert report.complete and len(report.loaded) == 232
    ours = full_model.state_dict()
    assert all(torch.equal(ours[name], value) for name, value in state.items())
    with torch.no_grad():
        features = full_model(torch.randn(1, 3, 48, 64))
    assert features.shape == (1, 448, 6, 8)


def test_a_checkpoint_without_one_head_fails_strict_loading(tmp_path):
    model = build_affinity_net("resnet38d_tiny")
    state = {name: value for name, value in model.state_dict().items() if not name.startswith("f9.")}
    torch.save(state, tmp_path / "no_f9.pth")
    with pytest.raises(UserError, match=r"missing 1 entries \(f9\.weight\)"):
        load_weights(model, tmp_path / "no_f9.pth")


def _tapped_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """psa's wiring written out: the pre-activated inputs of b5 and b6 and the output after bn7 + ReLU,
    each through its 1x1 head and ELU, concatenated, through f9 and ELU."""
    x = model.conv1a(images)
    taps = {}
    for name in model.block_names:
        block = getattr(model, name)
        if name in ("b5", "b6"):
            taps[name] = F.relu(block.bn_branch2a(x))
        x = block(x)
    top = F.relu(model.bn7(x))
    heads = [F.elu(model.f8_3(taps["b5"])), F.elu(model.f8_4(taps["b6"])), F.elu(model.f8_5(top))]
    return F.elu(model.f9(torch.cat(heads, dim=1)))


@pytest.mark.parametrize("name,channels", [("resnet38d_small", 112), ("resnet38d_tiny", 56),
                                           ("resnet38d_tiny_undilated", 56), ("resnet38d_tiny_local", 56)])
def test_variants_tap_b5_b6_and_the_output_with_scaled_heads(name, channels):
    torch.manual_seed(0)
    model = build_affinity_net(name).eval()
    images = torch.randn(2, 3, 72, 104)
    with torch.no_grad():
        features = model(images)
        expected = _tapped_features(model, images)
    assert features.shape == (2, channels, 9, 13)
    assert torch.allclose(features, expected, atol=1e-6)
    assert model.f8_3.in_channels == model.b5.bn_branch2a.num_features
    assert model.f8_4.in_channels == model.b6.bn_branch2a.num_features
    assert model.f8_5.in_channels == model.bn7.num_features
    assert all(getattr(model, head).bias is None for head in AFFINITY_HEADS)


def test_training_mode_backpropagates_into_heads_and_backbone():
    torch.manual_seed(0)
    model = build_affinity_net("resnet38d_tiny").train()
    features = model(torch.randn(2, 3, 64, 64))
    pair_affinities(features).mean().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    assert (model.b6.dropout_2b1.p, model.b7.dropout_2b1.p) == (0.3, 0.5)  # psa's dropout by default


def test_heads_start_with_psas_initialisation():
    torch.manual_seed(0)
    model = build_affinity_net("resnet38d")
    for head in ("f8_3", "f8_4", "f8_5"):  # kaiming normal: std sqrt(2 / fan_in)
        weight = getattr(model, head).weight
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / weight.shape[1]), rel=0.05)
    bound = 4.0 * math.sqrt(6.0 / (448 + 448))  # xavier uniform with gain 4
    assert model.f9.weight.abs().max().item() <= bound
    assert model.f9.weight.abs().max().item() > 0.95 * bound


def test_frozen_layers_and_scratch_groups_follow_psa():
    model = build_affinity_net("resnet38d_tiny")
    assert frozen_layer_names(model)[:2] == ["conv1a", "b2"]
    modules = dict(model.named_modules())
    for name in frozen_layer_names(model):
        modules[name].requires_grad_(False)
    weights, biases, scratch, scratch_biases = param_groups(model, scratch=AFFINITY_HEADS)
    assert [id(p) for p in scratch] == [id(getattr(model, head).weight) for head in AFFINITY_HEADS]
    assert biases == [] and scratch_biases == []
    assert any(p is model.b3.conv_branch2a.weight for p in weights)


def test_unknown_model_option_or_dropout_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet50'; known models: resnet38d"):
        build_affinity_net("resnet50")
    with pytest.raises(UserError, match=r"unknown options \['head_dropout'\]"):
        build_affinity_net("resnet38d_tiny", head_dropout=0.5)
    with pytest.raises(UserError, match="dropout must be two rates"):
        build_affinity_net("resnet38d_tiny", dropout=(0.3, 1.0))


# ------------------------------------------------------------------------------------------ weights


def test_the_backbone_starts_from_a_classifier_checkpoint_without_fc8(tmp_path):
    torch.manual_seed(1)
    classifier = build_classifier("resnet38d_tiny")
    torch.save(classifier.state_dict(), tmp_path / "eraser.pth")
    model = build_affinity_net("resnet38d_tiny")
    heads = {head: getattr(model, head).weight.detach().clone() for head in AFFINITY_HEADS}
    with pytest.raises(UserError, match="fc8.weight"):
        load_weights(model, tmp_path / "eraser.pth")  # strict: fc8 has no place in AffinityNet
    report = load_weights(model, tmp_path / "eraser.pth", strict=False)
    assert report.unused == ("fc8.weight",)
    assert sorted(report.missing) == sorted(f"{head}.weight" for head in AFFINITY_HEADS)
    ours = model.state_dict()
    assert all(torch.equal(ours[n], v) for n, v in classifier.state_dict().items() if n != "fc8.weight")
    assert all(torch.equal(getattr(model, head).weight, heads[head]) for head in AFFINITY_HEADS)


def test_the_backbone_starts_from_imagenet_mxnet_params_strictly(tmp_path):
    backbone = random_state(shapes(build_classifier("resnet38d_tiny")), seed=3)
    arrays = {torch_to_mxnet_name(n): v.numpy() for n, v in backbone.items() if torch_to_mxnet_name(n)}
    arrays["arg:linear1000_weight"] = np.zeros((1000, 8), np.float32)
    write_mxnet_params(tmp_path / "resnet_38d.params", arrays)
    model = build_affinity_net("resnet38d_tiny")
    report = load_weights(model, tmp_path / "resnet_38d.params")  # strict: only heads and counters missing
    assert {n for n in report.missing if not n.endswith(COUNTER)} == {f"{h}.weight" for h in AFFINITY_HEADS}
    ours = model.state_dict()
    assert all(torch.equal(ours[n], v) for n, v in backbone.items() if torch_to_mxnet_name(n))


def test_the_classifier_keeps_its_fc8_rule_beside_affinity_heads(tmp_path):
    """A classifier's torch checkpoint still has to bring fc8; AffinityNet's heads do not excuse it."""
    classifier = build_classifier("resnet38d_tiny")
    state = {n: v for n, v in classifier.state_dict().items() if n != "fc8.weight"}
    torch.save(state, tmp_path / "headless.pth")
    with pytest.raises(UserError, match="fc8.weight"):
        load_weights(classifier, tmp_path / "headless.pth")
    assert "fc8.weight" in load_weights(classifier, tmp_path / "headless.pth", require_head=False).missing


# ------------------------------------------------------------------------------------------ affinities


def test_psas_34_pair_offsets_within_radius_5():
    offsets = pair_offsets(5)
    assert len(offsets) == 34 and len(set(offsets)) == 34
    assert offsets[:5] == ((0, 1), (0, 2), (0, 3), (0, 4), (1, -4))
    assert all(dx * dx + dy * dy < 25 and (dy > 0 or dx > 0) for dy, dx in offsets)
    # one direction of each pair: no offset's opposite is in the set
    assert not {(-dy, -dx) for dy, dx in offsets} & set(offsets)
    assert pair_region(56, 56) == (52, 48) and pair_region(4, 20) == (0, 12)


def test_pair_affinities_follow_psas_index_layout():
    torch.manual_seed(0)
    features = torch.randn(2, 5, 9, 13)
    affinities = pair_affinities(features)
    rows, columns = pair_region(9, 13)
    assert affinities.shape == (2, 34, rows, columns)
    # psa's flat layout: offset-major; the k-th source is row-major over [0, rows) x [4, 4 + columns)
    flat = affinities.flatten(2)
    for d, (dy, dx) in enumerate(pair_offsets(5)):
        for k in (0, 7, rows * columns - 1):
            y, x = divmod(k, columns)
            first, second = features[:, :, y, x + 4], features[:, :, y + dy, x + 4 + dx]
            expected = torch.exp(-(first - second).abs().mean(dim=1))
            assert torch.allclose(flat[:, d, k], expected)


def test_identical_features_have_affinity_one_and_distant_ones_near_zero():
    same = torch.ones(1, 4, 8, 12)
    assert torch.equal(pair_affinities(same), torch.ones(1, 34, 4, 4))
    halves = torch.zeros(1, 4, 8, 12)
    halves[..., 6:] = 20.0  # columns 0-5 one region, 6-11 another
    right = pair_affinities(halves)[0, pair_offsets(5).index((0, 1))]  # sources at columns 4..7
    assert torch.equal(right[:, 0], torch.ones(4))  # 4 -> 5: same region
    assert torch.allclose(right[:, 1], torch.full((4,), math.exp(-20.0)))  # 5 -> 6: across the border
    assert torch.equal(right[:, 2], torch.ones(4))  # 6 -> 7
