"""The reference's SGD: four lr groups, poly decay, the momentum quirk, and checkpoint round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from cse_ray.models import build_classifier
from cse_ray.objective import freeze_eraser_layers
from cse_ray.optim import CLASSIFIER_SCRATCH, ERASER_SCRATCH, build_optimizer, poly_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture
def model():
    torch.manual_seed(0)
    return freeze_eraser_layers(build_classifier("resnet38d_tiny", dropout=(0.0, 0.0)))


def _train_steps(model, optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.randn(2, 3, 16, 16, generator=gen)
        _, logits = model(images)
        optimizer.zero_grad()
        logits.square().mean().backward()
        optimizer.step()


def _group(optimizer, name):
    return next(g for g in optimizer.param_groups if g["name"] == name)


def test_groups_have_lr_multipliers_and_weight_decay_on_weights_only(model):
    optimizer = build_optimizer(model, lr=0.1, weight_decay=5e-4, max_step=10, scratch=CLASSIFIER_SCRATCH)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    expected = {"pretrained_weight": (0.1, 5e-4), "pretrained_bias": (0.2, 0.0),
                "scratch_weight": (1.0, 5e-4), "scratch_bias": (2.0, 0.0)}
    for name, (lr, weight_decay) in expected.items():
        assert by_name[name]["lr"] == pytest.approx(lr)
        assert by_name[name]["weight_decay"] == weight_decay
    assert [p is model.fc8.weight for p in by_name["scratch_weight"]["params"]] == [True]


def test_eraser_puts_every_conv_in_the_first_group_and_skips_frozen_parameters(model):
    optimizer = build_optimizer(model, lr=0.01, weight_decay=5e-4, max_step=10, scratch=ERASER_SCRATCH)
    first = _group(optimizer, "pretrained_weight")["params"]
    assert any(p is model.fc8.weight for p in first)
    assert not _group(optimizer, "scratch_weight")["params"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert id(model.conv1a.weight) not in in_optimizer and id(model.bn7.weight) not in in_optimizer


def test_head_lr_x1_trains_fc8_at_the_backbone_rate(model):
    """`train_*.head_lr: x1`: for a network trained from scratch, fc8 joins the 1x / 2x groups."""
    optimizer = build_optimizer(model, lr=0.1, weight_decay=5e-4, max_step=10, scratch=CLASSIFIER_SCRATCH,
                                head_lr="x1")
    assert any(p is model.fc8.weight for p in _group(optimizer, "pretrained_weight")["params"])
    assert _group(optimizer, "pretrained_weight")["lr"] == pytest.approx(0.1)
    assert not _group(optimizer, "scratch_weight")["params"]
    assert not _group(optimizer, "scratch_bias")["params"]
    with pytest.raises(ValueError, match="head_lr"):
        build_optimizer(model, lr=0.1, weight_decay=5e-4, max_step=10, head_lr="x5")


def test_faithful_mode_has_the_reference_momentum_and_fixed_mode_the_intended_one(model):
    faithful = build_optimizer(model, lr=0.01, weight_decay=5e-4, max_step=10, mode="faithful")
    fixed = build_optimizer(model, lr=0.01, weight_decay=5e-4, max_step=10, mode="fixed")
    assert all(g["momentum"] == 5e-4 for g in faithful.param_groups)
    assert all(g["momentum"] == 0.9 for g in fixed.param_groups)
    with pytest.raises(ValueError, match="mode"):
        build_optimizer(model, lr=0.01, weight_decay=5e-4, max_step=10, mode="adam")


def test_group_lrs_follow_the_poly_schedule_and_hold_after_max_step(model):
    optimizer = build_optimizer(model, lr=0.1, weight_decay=5e-4, max_step=5, scratch=CLASSIFIER_SCRATCH)
    for step in range(7):
        _train_steps(model, optimizer, 1, seed=step)
        used = min(step, 4)  # the lr set before step `step`, frozen once max_step is reached
        factor = (1 - used / 5) ** 0.9
        for group, multiplier in zip(optimizer.param_groups, (1, 2, 10, 20), strict=True):
            assert group["lr"] == pytest.approx(0.1 * multiplier * factor), (step, group["name"])
    assert optimizer.global_step == 7
    assert poly_factor(0, 5) == 1.0 and poly_factor(4, 5) == pytest.approx(0.2 ** 0.9)


def test_state_dict_round_trip_resumes_schedule_and_momentum(model, tmp_path):
    twin = copy.deepcopy(model)
    optimizer = build_optimizer(model, lr=0.05, weight_decay=5e-4, max_step=20, mode="fixed")
    _train_steps(model, optimizer, 3, seed=1)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin.load_state_dict(checkpoint["model"])
    resumed = build_optimizer(twin, lr=0.05, weight_decay=5e-4, max_step=20, mode="fixed")
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.global_step == 3 and resumed.max_step == 20
    assert resumed.current_lrs() == pytest.approx(optimizer.current_lrs())

    _train_steps(model, optimizer, 2, seed=9)
    _train_steps(twin, resumed, 2, seed=9)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_wrapped_model_keeps_fc8_as_scratch(model):
    optimizer = build_optimizer(torch.nn.DataParallel(model), lr=0.1, weight_decay=5e-4, max_step=10)
    assert [p is model.fc8.weight for p in _group(optimizer, "scratch_weight")["params"]] == [True]
