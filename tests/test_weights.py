"""Weights: psa/OC-CSE torch checkpoints, MXNet `.params` read without MXNet, and conversion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cse_ray.errors import UserError
from cse_ray.models import build_classifier, convert_weights, load_weights
from cse_ray.models.mxnet_params import V2_MAGIC, read_mxnet_params, write_mxnet_params
from cse_ray.models.weights import mxnet_to_torch_name, torch_to_mxnet_name

REPO = Path(__file__).resolve().parents[1]
SPEC_CANDIDATES = [
    REPO / "shared" / "spec" / "resnet38d_state_dict.json",
    REPO.parent / "shared" / "spec" / "resnet38d_state_dict.json",
    REPO / "tests" / "data" / "resnet38d_state_dict.json",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def spec_entries() -> list[tuple[str, list[int]]]:
    spec = next((path for path in SPEC_CANDIDATES if path.is_file()), None)
    if spec is None:
        pytest.skip("resnet38d_state_dict.json not found")
    return [(entry["name"], entry["shape"]) for entry in json.loads(spec.read_text())]


def random_state(entries, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint as psa writes it: float tensors, int64 scalar `num_batches_tracked` counters."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in entries:
        if name.endswith("num_batches_tracked"):
            count = int(torch.randint(1, 1000, (), generator=generator))
            state[name] = torch.tensor(count, dtype=torch.int64)
        else:
            state[name] = torch.rand(shape, generator=generator)
    return state


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    model = build_classifier("resnet38d_tiny")
    return random_state([(name, list(t.shape)) for name, t in model.state_dict().items()], seed)


def assert_model_holds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for name, value in state.items():
        assert torch.equal(ours[name], value), name


# ------------------------------------------------------------------------------------------ torch files


def test_a_psa_checkpoint_loads_strictly_into_the_full_network(tmp_path):
    state = random_state(spec_entries())
    path = tmp_path / "od_cam.pth"
    torch.save(state, path)
    model = build_classifier("resnet38d")
    report = load_weights(model, path)
    assert report.file_format == "torch" and report.complete
    assert len(report.loaded) == 229
    assert_model_holds(model, state)


def test_dataparallel_prefix_and_wrapping_dict_are_removed(tmp_path):
    state = tiny_state()
    path = tmp_path / "000net_er.pth"
    torch.save({"state_dict": {f"module.{name}": value for name, value in state.items()}, "epoch": 3}, path)
    model = build_classifier("resnet38d_tiny")
    report = load_weights(model, path)
    assert report.complete
    assert_model_holds(model, state)


def test_a_wrong_shape_is_a_user_error_naming_key_file_and_shapes(tmp_path):
    state = tiny_state()
    state["b3.conv_branch2a.weight"] = torch.zeros(7, 16, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as raised:
        load_weights(build_classifier("resnet38d_tiny"), path, strict=False)
    message = str(raised.value)
    assert "b3.conv_branch2a.weight" in message and "bad.pth" in message
    assert "(7, 16, 3, 3)" in message and "(32, 16, 3, 3)" in message


def test_strict_load_names_missing_and_unexpected_entries(tmp_path):
    state = tiny_state()
    del state["b4.conv_branch1.weight"]
    state["aux_head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = build_classifier("resnet38d_tiny")
    with pytest.raises(UserError, match=r"b4\.conv_branch1\.weight.*aux_head\.weight"):
        load_weights(model, path)
    before = model.b4.conv_branch1.weight.detach().clone()
    report = load_weights(model, path, strict=False)
    assert report.missing == ("b4.conv_branch1.weight",) and report.unused == ("aux_head.weight",)
    assert torch.equal(model.b4.conv_branch1.weight, before)
    assert torch.equal(model.b3.conv_branch2a.weight, state["b3.conv_branch2a.weight"])


def test_a_backbone_only_checkpoint_needs_require_head_false(tmp_path):
    state = {k: v for k, v in tiny_state().items() if not k.startswith("fc8.")}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = build_classifier("resnet38d_tiny")
    with pytest.raises(UserError, match="fc8.weight"):
        load_weights(model, path)  # a trained classifier must bring its head
    head = model.fc8.weight.detach().clone()
    report = load_weights(model, path, require_head=False)
    assert report.missing == ("fc8.weight",)
    assert torch.equal(model.fc8.weight, head)


def test_missing_and_unreadable_files_are_user_errors(tmp_path):
    model = build_classifier("resnet38d_tiny")
    with pytest.raises(UserError, match="not found"):
        load_weights(model, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(UserError, match="garbage.pth"):
        load_weights(model, garbage)
    not_a_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(UserError, match="no state dict"):
        load_weights(model, not_a_state)


# ------------------------------------------------------------------------------------------ MXNet files

ARRAYS = {
    "arg:conv_weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "arg:double": np.linspace(-1, 1, 5, dtype=np.float64),
    "arg:half": np.array([[0.5, -2.25], [1e-3, 6e4]], dtype=np.float16),
    "aux:counts": np.array([0, 7, 255], dtype=np.uint8),
    "ints": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
    "small": np.array([-128, 5, 127], dtype=np.int8),
    "longs": np.array([2**40, -3], dtype=np.int64),
    "flags": np.array([True, False, True]),
    "empty_rows": np.zeros((0, 3), dtype=np.float32),
}


@pytest.mark.parametrize("layout", ["legacy", "v1", "v2", "v3"])
def test_mxnet_reader_returns_names_dtypes_and_values_exactly(tmp_path, layout):
    path = tmp_path / f"{layout}.params"
    write_mxnet_params(path, ARRAYS, layout=layout)
    loaded = read_mxnet_params(path)
    assert list(loaded) == list(ARRAYS)
    for name, expected in ARRAYS.items():
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        assert np.array_equal(loaded[name], expected), name


def test_mxnet_layouts_differ_on_disk(tmp_path):
    sizes = {}
    for layout in ("legacy", "v1", "v2"):
        write_mxnet_params(tmp_path / layout, {"w": np.ones((2, 3), np.float32)}, layout=layout)
        sizes[layout] = (tmp_path / layout).stat().st_size
    # legacy: uint32 dims; v1: magic + int32 ndim + int64 dims; v2: v1 + int32 storage type
    assert sizes["v1"] - sizes["legacy"] == 4 + 2 * 4
    assert sizes["v2"] - sizes["v1"] == 4


def test_mxnet_scalars_need_v3_and_unnamed_lists_get_indices(tmp_path):
    with pytest.raises(ValueError, match="v3"):
        write_mxnet_params(tmp_path / "s.params", {"scalar": np.float32(3.0)}, layout="v2")
    write_mxnet_params(tmp_path / "s.params", {"scalar": np.array(3.0, np.float32)}, layout="v3")
    assert read_mxnet_params(tmp_path / "s.params")["scalar"].shape == ()
    # MXNet allows a list without names: [magic, reserved, 1 array, ..., 0 names]
    unnamed = tmp_path / "unnamed.params"
    write_mxnet_params(unnamed, {"x": np.ones(2, np.float32)})
    unnamed.write_bytes(unnamed.read_bytes()[: -(8 + 8 + 1)] + struct.pack("<Q", 0))
    assert list(read_mxnet_params(unnamed)) == ["0"]


def test_sparse_truncated_and_foreign_mxnet_files_are_user_errors(tmp_path):
    sparse = tmp_path / "sparse.params"
    # one V2 NDArray with row_sparse storage (type 1): rejected before its layout matters
    sparse.write_bytes(struct.pack("<QQQIi", 0x112, 0, 1, V2_MAGIC, 1) + bytes(64))
    with pytest.raises(UserError, match="row_sparse"):
        read_mxnet_params(sparse)
    whole = tmp_path / "whole.params"
    write_mxnet_params(whole, {"arg:w": np.ones((4, 4), np.float32)})
    truncated = tmp_path / "truncated.params"
    truncated.write_bytes(whole.read_bytes()[:60])
    with pytest.raises(UserError, match="truncated.params.*ends early"):
        read_mxnet_params(truncated)
    with pytest.raises(UserError, match="not an MXNet"):
        read_mxnet_params(_write(tmp_path / "zeros.params", b"\0" * 32))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_psa_name_mapping_of_ademxapp_names():
    assert mxnet_to_torch_name("arg:conv1a_weight") == "conv1a.weight"
    assert mxnet_to_torch_name("arg:res2a_branch1_weight") == "b2.conv_branch1.weight"
    assert mxnet_to_torch_name("arg:res4b5_branch2b1_weight") == "b4_5.conv_branch2b1.weight"
    assert mxnet_to_torch_name("arg:res7a_branch2b2_weight") == "b7.conv_branch2b2.weight"
    assert mxnet_to_torch_name("arg:bn3b2_branch2a_gamma") == "b3_2.bn_branch2a.weight"
    assert mxnet_to_torch_name("arg:bn6a_branch2b2_beta") == "b6.bn_branch2b2.bias"
    assert mxnet_to_torch_name("aux:bn5b1_branch2b1_moving_mean") == "b5_1.bn_branch2b1.running_mean"
    assert mxnet_to_torch_name("aux:bn7_moving_var") == "bn7.running_var"
    assert mxnet_to_torch_name("bn7_gamma") == "bn7.weight"  # prefixes are optional
    assert mxnet_to_torch_name("arg:linear1000_weight") is None
    assert mxnet_to_torch_name("arg:something_else") is None


def test_every_backbone_name_of_the_checkpoint_round_trips_through_mxnet_names():
    names = [name for name, _ in spec_entries()]
    backbone = [n for n in names if not n.startswith("fc8.") and not n.endswith("num_batches_tracked")]
    assert len(backbone) == len(names) - 1 - sum(n.endswith("num_batches_tracked") for n in names)
    mx_names = [torch_to_mxnet_name(name) for name in backbone]
    assert all(mx_names) and len(set(mx_names)) == len(mx_names)
    assert [mxnet_to_torch_name(mx) for mx in mx_names] == backbone
    assert torch_to_mxnet_name("fc8.weight") is None
    assert torch_to_mxnet_name("b2.bn_branch2a.num_batches_tracked") is None


def _imagenet_style_file(path: Path, state: dict[str, torch.Tensor], layout: str = "v2") -> None:
    """What ademxapp ships: backbone under MXNet names plus the 1000-way classifier."""
    arrays = {torch_to_mxnet_name(n): v.numpy() for n, v in state.items() if torch_to_mxnet_name(n)}
    arrays["arg:linear1000_weight"] = np.zeros((1000, 8), np.float32)
    arrays["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    write_mxnet_params(path, arrays, layout=layout)


def test_imagenet_params_load_into_the_backbone_and_leave_fc8_fresh(tmp_path):
    state = tiny_state(seed=1)
    path = tmp_path / "resnet_38d.params"
    _imagenet_style_file(path, state)
    model = build_classifier("resnet38d_tiny")
    head = model.fc8.weight.detach().clone()
    report = load_weights(model, path)  # strict: every backbone entry must be there
    assert report.file_format == "mxnet"
    assert "fc8.weight" in report.missing
    assert all(n == "fc8.weight" or n.endswith("num_batches_tracked") for n in report.missing)
    assert set(report.unused) == {"arg:linear1000_weight", "arg:linear1000_bias"}
    assert torch.equal(model.fc8.weight, head)
    assert_model_holds(model, {n: v for n, v in state.items() if torch_to_mxnet_name(n)})


def test_an_incomplete_params_file_fails_strict_loading(tmp_path):
    state = tiny_state()
    del state["b5.bn_branch2a.running_var"]
    path = tmp_path / "incomplete.params"
    _imagenet_style_file(path, state)
    with pytest.raises(UserError, match=r"b5\.bn_branch2a\.running_var"):
        load_weights(build_classifier("resnet38d_tiny"), path)


def test_an_unknown_params_entry_is_unused_not_silently_dropped(tmp_path):
    path = tmp_path / "extra.params"
    arrays = {torch_to_mxnet_name(n): v.numpy() for n, v in tiny_state().items() if torch_to_mxnet_name(n)}
    arrays["arg:res9z_branch3_weight"] = np.zeros(3, np.float32)
    write_mxnet_params(path, arrays, layout="v1")
    model = build_classifier("resnet38d_tiny")
    with pytest.raises(UserError, match="res9z_branch3_weight"):
        load_weights(model, path)
    report = load_weights(model, path, strict=False)
    assert report.unused == ("arg:res9z_branch3_weight",)


# ------------------------------------------------------------------------------------------ conversion


def test_convert_params_to_a_plain_state_dict(tmp_path):
    state = tiny_state(seed=2)
    src = tmp_path / "resnet_38d.params"
    _imagenet_style_file(src, state, layout="legacy")
    dst = tmp_path / "out" / "resnet_38d.pth"
    report = convert_weights(src, dst, model_name="resnet38d_tiny")
    assert "fc8.weight" in report.missing and "arg:linear1000_bias" in report.unused
    written = torch.load(dst, weights_only=True)
    assert set(written) == set(report.loaded)
    assert not any(name.startswith("fc8.") for name in written)
    assert [p.name for p in dst.parent.iterdir()] == ["resnet_38d.pth"]  # no temp file left
    model = build_classifier("resnet38d_tiny")
    load_weights(model, dst, require_head=False)
    assert_model_holds(model, written)
    assert "fc8.weight" in str(report) and "linear1000" in str(report)


def test_convert_a_dataparallel_checkpoint_keeps_its_class_count(tmp_path):
    model = build_classifier("resnet38d_tiny", num_classes=5)
    src = tmp_path / "dp.pth"
    torch.save({f"module.{n}": v for n, v in model.state_dict().items()}, src)
    dst = tmp_path / "plain.pth"
    report = convert_weights(src, dst, model_name="resnet38d_tiny")
    assert report.complete
    written = torch.load(dst, weights_only=True)
    assert written["fc8.weight"].shape == (5, 512, 1, 1)
    assert all(not name.startswith("module.") for name in written)


def test_convert_rejects_a_file_of_another_architecture(tmp_path):
    src = tmp_path / "small.pth"
    torch.save(build_classifier("resnet38d_small").state_dict(), src)
    with pytest.raises(UserError, match="conv1a.weight"):
        convert_weights(src, tmp_path / "x.pth", model_name="resnet38d_tiny")
    assert not (tmp_path / "x.pth").exists()

