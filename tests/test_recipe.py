"""configs/voc12.yaml is the paper's recipe: the ordinary classifier is psa's train_cls, the eraser OC-CSE's.

The networks and optimisers are built exactly as the Ray Train workers build them (`train.loop`), on the
tiny variant of the same code (no ImageNet weights here), and checked against METHOD.md's numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cse_ray.config import load_config
from cse_ray.optim import CLASSIFIER_SCRATCH, ERASER_SCRATCH, build_optimizer
from cse_ray.train import build_networks

REPO = Path(__file__).resolve().parents[1]
SMALL_NET = ["model.backbone=resnet38d_tiny", "model.pretrained="]


@pytest.fixture(scope="module")
def voc12():
    return load_config(REPO / "configs" / "voc12.yaml", SMALL_NET)


def _dropouts(model) -> dict[str, float]:
    return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout2d)}


def test_train_cam_is_psas_train_cls(voc12, tmp_path):
    t = voc12.train_cam
    assert (t.lr, t.batch_size, t.epochs, t.crop, t.weight_decay) == (0.1, 16, 15, 448, 5e-4)
    assert t.resize_long == (256, 512) and t.jitter == (0.3, 0.3, 0.3, 0.1)
    model, frozen = build_networks("train_cam", voc12, "", torch.device("cpu"))
    assert frozen is None
    assert _dropouts(model) == {"b6.dropout_2b1": 0.3, "b6.dropout_2b2": 0.3, "b7.dropout_2b1": 0.5,
                                "b7.dropout_2b2": 0.5, "head_dropout": 0.5}
    # fc8 is Xavier-uniform: bounded by sqrt(6 / (fan_in + fan_out))
    fan_out, fan_in = model.fc8.weight.shape[:2]
    assert float(model.fc8.weight.detach().abs().max()) <= (6.0 / (fan_in + fan_out)) ** 0.5
    groups = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, max_step=100,
                             mode=t.momentum_mode, scratch=CLASSIFIER_SCRATCH).param_groups
    by_name = {g["name"]: g for g in groups}
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.2, 1.0, 2.0])  # x1, x2, x10, x20
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0]
    assert [id(p) for p in by_name["scratch_weight"]["params"]] == [id(model.fc8.weight)]
    assert all(g["momentum"] == 5e-4 for g in groups)  # psa's quirk: weight decay passed as momentum


def test_train_cse_is_oc_cses_eraser(voc12, tmp_path):
    t = voc12.train_cse
    assert (t.lr, t.batch_size, t.epochs, t.crop, t.seed) == (0.01, 8, 15, 384, 4242)
    assert (t.cc_init, t.cc_slope, t.resize_long, t.mask_norm) == (0.3, 0.05, (256, 448), "batch")
    classifier = tmp_path / "od_cam.pth"
    torch.save(build_networks("train_cam", voc12, "", torch.device("cpu"))[0].state_dict(), classifier)
    eraser, frozen = build_networks("train_cse", voc12, str(classifier), torch.device("cpu"))
    assert _dropouts(eraser) == {"b6.dropout_2b1": 0.3, "b6.dropout_2b2": 0.3, "b7.dropout_2b1": 0.5,
                                 "b7.dropout_2b2": 0.5, "head_dropout": 0.0}
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    groups = build_optimizer(eraser, lr=t.lr, weight_decay=t.weight_decay, max_step=100,
                             mode=t.momentum_mode, scratch=ERASER_SCRATCH).param_groups
    assert [len(g["params"]) for g in groups][2:] == [0, 0]  # OC-CSE: every conv in the first group
