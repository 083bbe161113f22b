"""The training pieces without Ray: one epoch's steps, the test hooks, the checkpoint state, TensorBoard.

`run_epoch` runs in a plain process here (no process group: the all-reduces are skipped), on a tiny
network and random images, the way benchmarks/train_throughput.py's plain loop uses it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cse_ray.config import load_config
from cse_ray.data.prepare import Split
from cse_ray.layout import RunLayout
from cse_ray.models import build_classifier
from cse_ray.objective import freeze_classifier
from cse_ray.optim import CLASSIFIER_SCRATCH, ERASER_SCRATCH, build_optimizer
from cse_ray.train import (
    TEST_FAULT_ENV,
    TEST_NAN_ENV,
    EpochContext,
    FaultHooks,
    TrainState,
    mask_scores,
    run_epoch,
)
from cse_ray.train.checkpoints import checkpoint_name, epoch_of, load_state, save_state
from cse_ray.train.validate import log_epoch, open_writer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

IMAGES, BATCH, CROP, CLASSES = 8, 2, 32, 20


class RandomImages(Dataset):
    """(image, multi-hot label, index), the shape of the training loader's items."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(IMAGES, 3, CROP, CROP, generator=generator)
        self.labels = torch.zeros(IMAGES, CLASSES)
        for i in range(IMAGES):
            self.labels[i, [i % CLASSES, (3 * i + 1) % CLASSES]] = 1.0

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index


def context(stage: str, faults: FaultHooks = FaultHooks(), overrides: tuple[str, ...] = ()) -> EpochContext:
    cfg = load_config(None, ["data.synth.enabled=true", f"{stage}.batch_size={BATCH}",
                             f"{stage}.log_every=1", *overrides])
    scfg = getattr(cfg, stage)
    torch.manual_seed(0)
    model = build_classifier("resnet38d_tiny")
    frozen = freeze_classifier(build_classifier("resnet38d_tiny")) if stage == "train_cse" else None
    steps = IMAGES // BATCH
    optimizer = build_optimizer(model, scfg.lr, scfg.weight_decay, steps * 2,
                                scratch=CLASSIFIER_SCRATCH if stage == "train_cam" else ERASER_SCRATCH)
    loader = DataLoader(RandomImages(), batch_size=BATCH, shuffle=False, drop_last=True)
    return EpochContext(stage, model, frozen, loader, optimizer, torch.device("cpu"), scfg,
                        cfg.data.labels.num_classes, steps, faults=faults)


def test_an_eraser_epoch_reports_its_mean_losses_and_moves_the_weights():
    ctx = context("train_cse")
    before = ctx.model.fc8.weight.detach().clone()
    stats = run_epoch(ctx, epoch=0, weight=0.3)
    assert {"loss", "loss_cls", "loss_erase", "acc_er", "acc_cl", "mask_mean", "lr"} <= set(stats)
    assert stats["nonfinite_step"] == -1
    assert stats["loss"] == pytest.approx(stats["loss_cls"] + 0.3 * stats["loss_erase"], rel=1e-5)
    assert stats["lr"] == ctx.optimizer.param_groups[0]["lr"] < ctx.scfg.lr  # the poly schedule moved
    assert not torch.equal(before, ctx.model.fc8.weight)


def test_a_channels_last_epoch_takes_the_same_steps():
    plain = context("train_cse")
    nhwc = context("train_cse", overrides=("train_cse.channels_last=true",))
    for model in (nhwc.model, nhwc.frozen):  # what the training setup does with the option
        model.to(memory_format=torch.channels_last)
    torch.manual_seed(1)  # the same dropout masks in both runs
    expected = run_epoch(plain, epoch=0, weight=0.3)
    torch.manual_seed(1)
    got = run_epoch(nhwc, epoch=0, weight=0.3)
    assert nhwc.model.conv1a.weight.is_contiguous(memory_format=torch.channels_last)  # still NHWC
    assert not plain.model.conv1a.weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("loss", "loss_cls", "loss_erase", "mask_mean"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert torch.allclose(nhwc.model.fc8.weight, plain.model.fc8.weight, atol=1e-5)


def test_the_dropout_masks_come_from_the_sample_keys_unless_dropout_rng_is_worker():
    """`sample`: the epoch does not depend on torch's random stream (the masks are functions of (seed,
    epoch, sample index)); `worker`: it does, which is what makes the masks depend on the split."""
    losses = {}
    for rng in ("sample", "worker"):
        for torch_seed in (1, 2):
            ctx = context("train_cse", overrides=(f"train_cse.dropout_rng={rng}",))
            torch.manual_seed(torch_seed)
            losses[rng, torch_seed] = run_epoch(ctx, epoch=0, weight=0.3)["loss"]
    assert losses["sample", 1] == losses["sample", 2]
    assert losses["worker", 1] != losses["worker", 2]


def test_a_nan_loss_stops_the_epoch_at_the_next_check_naming_its_global_step():
    ctx = context("train_cam", FaultHooks(nan_at_epoch=2))
    assert run_epoch(ctx, epoch=0)["nonfinite_step"] == -1
    stats = run_epoch(ctx, epoch=1)  # NaN from the epoch's second step: global step 4 + 1
    assert stats["nonfinite_step"] == IMAGES // BATCH + 1
    assert ctx.optimizer.global_step == IMAGES // BATCH + 2  # log_every=1: stopped right after it


def test_mask_scores_depend_on_the_sample_not_on_the_batch_it_lands_in():
    whole = mask_scores(torch.arange(4), seed=1, epoch=0, num_classes=CLASSES)
    split = torch.cat([mask_scores(torch.tensor([0, 1]), 1, 0, CLASSES),
                       mask_scores(torch.tensor([2, 3]), 1, 0, CLASSES)])
    assert torch.equal(whole, split)
    assert whole.shape == (4, CLASSES)
    assert not torch.equal(whole, mask_scores(torch.arange(4), seed=1, epoch=1, num_classes=CLASSES))
    assert mask_scores(torch.arange(2), 1, 0, 80).shape == (2, 80)  # COCO's class count


def test_the_kept_epoch_is_the_last_or_the_best():
    records = [{"epoch": e, "val_miou": m, "val_threshold": t}
               for e, m, t in ((1, 40.0, 0.2), (2, 50.0, 0.3), (3, 45.0, 0.25))]
    last, best = TrainState(), TrainState()
    assert [last.add_epoch(r, "last") for r in records] == [True, True, True]
    assert [best.add_epoch(r, "best") for r in records] == [True, True, False]
    assert (last.epoch, last.best_epoch, last.best_miou, last.best_threshold) == (3, 3, 45.0, 0.25)
    assert (best.epoch, best.best_epoch, best.best_miou, best.best_threshold) == (3, 2, 50.0, 0.3)
    assert best.history == records


def test_a_saved_state_resumes_weights_optimiser_and_random_streams(tmp_path):
    ctx = context("train_cam")
    run_epoch(ctx, epoch=0)
    state = TrainState()
    state.add_epoch({"epoch": 1, "val_miou": 12.5, "val_threshold": 0.15}, "last")
    save_state(tmp_path / "state.pt", ctx.model, ctx.optimizer, state, {"stage": "train_cam"})
    expected = (torch.rand(3), np.random.rand(), random.random())

    other = context("train_cam")
    restored = load_state(tmp_path / "state.pt", other.model, other.optimizer)
    assert restored == state
    assert other.optimizer.global_step == ctx.optimizer.global_step
    assert all(torch.equal(a, b) for a, b in zip(ctx.model.state_dict().values(),
                                                 other.model.state_dict().values()))
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def test_checkpoint_folders_name_their_epoch():
    assert checkpoint_name(7) == "epoch_0007"
    assert epoch_of(f"s3://bucket/run/train_cam/ray/train_cam/{checkpoint_name(12)}/") == 12
    assert epoch_of("/tmp/ray/checkpoint_2024-01-01") == 0


def test_the_fault_hooks_come_from_the_environment_and_crash_only_once(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_FAULT_ENV, "3")
    monkeypatch.setenv(TEST_NAN_ENV, "")
    assert FaultHooks.from_env() == FaultHooks(fail_at_epoch=3, nan_at_epoch=0)
    stage = RunLayout.at(tmp_path).stage("train_cam")
    FaultHooks(fail_at_epoch=3).crash_once(stage, epoch=1)  # not epoch 3: nothing happens
    stage_marker = tmp_path / "train_cam" / ".test_fault_epoch3"
    stage_marker.parent.mkdir()
    stage_marker.write_text("crashed once\n")
    FaultHooks(fail_at_epoch=3).crash_once(stage, epoch=2)  # already crashed once: carries on
    loss = torch.tensor(1.0)
    assert torch.equal(FaultHooks(nan_at_epoch=2).poison(loss, epoch=1, step_in_epoch=0), loss)
    assert torch.isnan(FaultHooks(nan_at_epoch=2).poison(loss, epoch=1, step_in_epoch=1))


def test_tensorboard_logs_reach_a_remote_out_after_every_epoch(tmp_path):
    """With a remote --out (file:// counts as one) rank 0 writes locally and uploads each epoch."""
    layout = RunLayout.at(f"file://{tmp_path}/remote")
    writer = open_writer(layout, "train_cam")
    no_images = Split(str(tmp_path), (), {})
    log_epoch(writer, layout, "train_cam", {"epoch": 1, "loss": 0.5, "val_miou": 12.0}, None, no_images,
              torch.device("cpu"))
    uploaded = list((tmp_path / "remote" / "tensorboard" / "train_cam").glob("events.out.tfevents.*"))
    assert len(uploaded) == 1
    first = uploaded[0].stat().st_size
    log_epoch(writer, layout, "train_cam", {"epoch": 2, "loss": 0.4, "val_miou": 13.0}, None, no_images,
              torch.device("cpu"))
    assert uploaded[0].stat().st_size > first  # the second epoch's scalars were uploaded too
    writer.close()
