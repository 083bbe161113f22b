"""SGD with psa's four parameter groups and poly learning-rate decay, faithful to the reference or fixed.

The reference (psa's PolyOptimizer, reused by OC-CSE) hands its weight decay to ``torch.optim.SGD``'s
third positional argument, which is ``momentum``: the effective momentum is the weight decay (5e-4)
and weight decay comes only from the groups' own setting. ``mode="faithful"`` reproduces that;
``mode="fixed"`` uses momentum 0.9, which is what the code meant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cse_ray.models import param_groups, unwrap

OPTIMIZER_MODES = ("faithful", "fixed")
HEAD_LR_MODES = ("x10", "x1")  # the new head at psa's x10 / x20, or with the backbone
FIXED_MOMENTUM = 0.9
POLY_POWER = 0.9
GROUP_LR_MULTIPLIERS = (1.0, 2.0, 10.0, 20.0)
"""pretrained weights, pretrained biases, scratch weights, scratch biases."""
GROUP_NAMES = ("pretrained_weight", "pretrained_bias", "scratch_weight", "scratch_bias")

CLASSIFIER_SCRATCH = ("fc8",)
"""psa's train_cls: fc8 is new, so it learns 10x faster than the ImageNet backbone."""
ERASER_SCRATCH: tuple[str, ...] = ()
"""OC-CSE's eraser: no scratch layer, every conv (fc8 included) is in the first group."""


def poly_factor(step: int, max_step: int, power: float = POLY_POWER) -> float:
    """(1 - step / max_step) ** power; the reference stops updating the lr once step reaches max_step."""
    step = min(step, max_step - 1)
    return (1.0 - step / max_step) ** power


class PolySGD(torch.optim.SGD):
    """SGD whose group lrs are ``initial_lr * (1 - step/max_step) ** power``, set before each step.

    ``global_step`` counts the steps taken and travels with ``state_dict`` so a resumed run continues
    the schedule where it stopped.
    """

    def __init__(self, params: list[dict[str, Any]], lr: float, max_step: int, momentum: float,
                 power: float = POLY_POWER) -> None:
        if max_step < 1:
            raise ValueError(f"max_step must be at least 1, got {max_step}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.global_step = 0
        self.max_step = int(max_step)
        self.power = float(power)

    def current_lrs(self) -> list[float]:
        """The lrs the next ``step`` will use."""
        factor = poly_factor(self.global_step, self.max_step, self.power)
        return [group["initial_lr"] * factor for group in self.param_groups]

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        if self.global_step < self.max_step:
            for group, lr in zip(self.param_groups, self.current_lrs(), strict=True):
                group["lr"] = lr
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["poly"] = {"global_step": self.global_step, "max_step": self.max_step, "power": self.power}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        poly = state_dict.pop("poly", None)
        super().load_state_dict(state_dict)
        if poly is not None:
            self.global_step = int(poly["global_step"])
            self.max_step = int(poly["max_step"])
            self.power = float(poly["power"])


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, max_step: int, mode: str = "faithful",
                    scratch: tuple[str, ...] = CLASSIFIER_SCRATCH, power: float = POLY_POWER,
                    head_lr: str = "x10") -> PolySGD:
    """The reference's optimiser: groups with lr x1/x2/x10/x20, weight decay on the weight groups only.

    ``scratch``: ``CLASSIFIER_SCRATCH`` (fc8) for the ordinary classifier, ``ERASER_SCRATCH`` (none)
    for the OC-CSE eraser. ``mode``: ``"faithful"`` (momentum = weight_decay, psa's quirk) or
    ``"fixed"`` (momentum 0.9). ``head_lr``: ``"x10"`` (psa) puts the scratch layers in the x10/x20
    groups; ``"x1"`` leaves them with the backbone (a network trained from scratch has no pretrained
    layers for a faster head to catch up with). Groups are always four, possibly empty, so indices keep
    their meaning.
    """
    if mode not in OPTIMIZER_MODES:
        raise ValueError(f"optimizer mode must be one of {OPTIMIZER_MODES}, got {mode!r}")
    if head_lr not in HEAD_LR_MODES:
        raise ValueError(f"head_lr must be one of {HEAD_LR_MODES}, got {head_lr!r}")
    if head_lr == "x1":
        scratch = ()
    momentum = float(weight_decay) if mode == "faithful" else FIXED_MOMENTUM
    params = param_groups(unwrap(model), scratch)
    groups = []
    for name, group_params, multiplier in zip(GROUP_NAMES, params, GROUP_LR_MULTIPLIERS, strict=True):
        is_bias = name.endswith("bias")
        groups.append({
            "params": group_params,
            "name": name,
            "lr": lr * multiplier,
            "initial_lr": lr * multiplier,
            "weight_decay": 0.0 if is_bias else float(weight_decay),
        })
    return PolySGD(groups, lr=lr, max_step=max_step, momentum=momentum, power=power)
