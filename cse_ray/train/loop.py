"""Ray Train's per-worker function, in the paper's order: set up, then for each epoch train, validate,
and (rank 0 only) write: model.pth, the checkpoint, latest.json, TensorBoard; result.json at the end.

Every worker runs every step; rank 0 is the only writer. A worker group restarted after a failure
resumes from the newest checkpoint (`checkpoints.resume_checkpoint`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cse_ray import artifacts
from cse_ray.config import Config, TrainCamConfig, from_dict
from cse_ray.layout import RunLayout, StageLayout
from cse_ray.train.checkpoints import (
    TrainState,
    load_checkpoint,
    report_checkpoint,
    report_without_checkpoint,
    resume_checkpoint,
    write_torch,
)
from cse_ray.train.epoch import EpochContext, run_epoch, worker_print
from cse_ray.train.validate import log_epoch, open_writer, validate

if TYPE_CHECKING:
    from cse_ray.train.stage import StageInputs


def train_loop_per_worker(loop_config: dict) -> None:
    """Set up, then for each epoch: run_epoch -> validate -> rank 0's writers; result.json at the end."""
    from cse_ray.objective import erase_weight, set_train_mode

    run = setup(loop_config["inputs"])
    scfg = run.scfg
    for epoch in range(run.state.epoch, scfg.epochs):
        begin_epoch(run, epoch)
        weight = erase_weight(scfg.cc_init, scfg.cc_slope, epoch) if run.ctx.frozen is not None else 0.0
        set_train_mode(run.ctx.model)
        stats = run_epoch(run.ctx, epoch, weight)
        if stats["nonfinite_step"] >= 0:
            stop_diverged(run, epoch, stats["nonfinite_step"])
            return
        run.model.eval()
        val = validate(run.model, run.inputs.val, run.cfg, scfg, run.ctx.device, run.rank, run.world)
        record = {"epoch": epoch + 1, **stats, "w": weight, "val_miou": val["miou"],
                  "val_threshold": val["threshold"]}
        kept = run.state.add_epoch(record, scfg.keep)
        end_epoch(run, record, kept)
    finish(run)


# ------------------------------------------------------------------------------------------ setup


@dataclass
class WorkerRun:
    """One worker's view of the stage: everything the epochs share."""

    inputs: StageInputs
    cfg: Config
    scfg: TrainCamConfig
    layout: RunLayout
    paths: StageLayout
    rank: int
    world: int
    model: torch.nn.Module  # the trained network itself (ctx.model may be its DDP wrapper)
    ctx: EpochContext
    dataset: Dataset
    sampler: DistributedSampler
    state: TrainState
    meta: dict = field(default_factory=dict)  # stored in every checkpoint
    writer: object = None  # rank 0's TensorBoard writer

    @property
    def stage(self) -> str:
        return self.inputs.stage


class IndexedDataset(Dataset):
    """Adds the sample index, from which each image's mask-class choice and dropout masks are derived."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image, label, index


def build_networks(stage: str, cfg: Config, classifier_path: str, device: torch.device):
    """The trained network (and, for train_cse, the frozen classifier), initialised and frozen."""
    from cse_ray.models import build_classifier, load_weights
    from cse_ray.objective import freeze_classifier, freeze_eraser_layers

    scfg = getattr(cfg, stage)
    num_classes = cfg.data.labels.num_classes
    model = build_classifier(cfg.model.backbone, num_classes=num_classes, dropout=scfg.dropout,
                             head_dropout=scfg.head_dropout)
    if stage == "train_cse" and cfg.train_cse.init == "classifier":
        load_weights(model, classifier_path)
    elif cfg.model.pretrained:
        load_weights(model, cfg.model.pretrained, strict=False)  # fc8 stays freshly initialised
    if scfg.freeze == "reference":
        freeze_eraser_layers(model)
    model.to(device)
    frozen = None
    if stage == "train_cse":
        frozen = build_classifier(cfg.model.backbone, num_classes=num_classes, dropout=cfg.train_cam.dropout)
        load_weights(frozen, classifier_path)
        freeze_classifier(frozen).to(device)
    return model, frozen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(inputs: StageInputs) -> WorkerRun:
    """Networks and data of train_cam / train_cse; `start_run` adds the optimiser, DDP and a resume."""
    import ray.train.torch

    from cse_ray.data.datasets import TrainDataset
    from cse_ray.optim import CLASSIFIER_SCRATCH, ERASER_SCRATCH

    stage = inputs.stage
    cfg = from_dict(inputs.config)
    scfg: TrainCamConfig = getattr(cfg, stage)
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, scfg.cpus_per_worker))
    seed_everything(scfg.seed)  # the same initial weights on every rank

    model, frozen = build_networks(stage, cfg, inputs.classifier, device)
    if scfg.channels_last:  # NHWC weights; run_epoch sends the batches in the same format
        model.to(memory_format=torch.channels_last)
        if frozen is not None:
            frozen.to(memory_format=torch.channels_last)
    dataset = TrainDataset(
        inputs.train.root, inputs.train.names, inputs.train.labels, crop=scfg.crop,
        resize_long=scfg.resize_long, seed=scfg.seed, space=cfg.data.labels,
        jitter_strength=dict(zip(("brightness", "contrast", "saturation", "hue"), scfg.jitter)),
    )
    meta = {"stage": stage, "backbone": cfg.model.backbone, "classifier": inputs.classifier,
            "classifier_sha256": inputs.classifier_sha256, "config": inputs.config}
    scratch = CLASSIFIER_SCRATCH if stage == "train_cam" else ERASER_SCRATCH
    return start_run(inputs, cfg, scfg, model, IndexedDataset(dataset), scratch, meta, frozen=frozen)


def start_run(inputs: StageInputs, cfg: Config, scfg: TrainCamConfig, model: torch.nn.Module,
              dataset: Dataset, scratch: tuple[str, ...], meta: dict,
              frozen: torch.nn.Module | None = None) -> WorkerRun:
    """The rest of a worker's setup once its network (initialised, frozen) and dataset exist: the
    device, the sharded loader, psa's lr groups (`scratch`: the new layers), a resume from the newest
    checkpoint, DDP, and rank 0's TensorBoard writer. The dataset yields (image, label, index);
    `frozen` is train_cse's fixed classifier, already on the device."""
    import ray.train
    import ray.train.torch

    from cse_ray.optim import build_optimizer

    stage = inputs.stage
    layout = RunLayout.at(inputs.out)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model.to(device)
    if scfg.channels_last:  # NHWC weights; run_epoch sends the batches in the same format
        model.to(memory_format=torch.channels_last)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=scfg.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=scfg.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=scfg.loader_workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(dataset) // scfg.batch_size
    optimizer = build_optimizer(model, lr=scfg.lr, weight_decay=scfg.weight_decay,
                                max_step=steps_per_epoch * scfg.epochs, mode=scfg.momentum_mode,
                                scratch=scratch, head_lr=scfg.head_lr)
    paths = layout.stage(stage)
    state = TrainState()
    checkpoint = resume_checkpoint(paths, stage)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
    trained = ray.train.torch.prepare_model(model) if world > 1 else model
    ctx = EpochContext(stage, trained, frozen, loader, optimizer, device, scfg, cfg.data.labels.num_classes,
                       steps_per_epoch, show_progress=rank == 0, bar=inputs.progress_bar,
                       faults=inputs.faults)
    writer = open_writer(layout, stage) if rank == 0 else None
    if rank == 0 and state.epoch:
        worker_print(f"{stage}: resuming after epoch {state.epoch} of {scfg.epochs}")
    return WorkerRun(inputs, cfg, scfg, layout, paths, rank, world, model, ctx, dataset, sampler, state,
                     meta, writer)


# ------------------------------------------------------------------------------------------ epochs


def begin_epoch(run: WorkerRun, epoch: int) -> None:
    """events.log's line (rank 0), the test fault hook, the epoch's shuffle and augmentation, and the
    torch random stream (the dropout masks' with `dropout_rng: worker`)."""
    if run.rank == 0:
        artifacts.append_line(run.paths.events,
                              f"{time.strftime('%Y-%m-%dT%H:%M:%S')} epoch {epoch + 1} started")
        run.inputs.faults.crash_once(run.paths, epoch)
    else:
        # Every rank was seeded alike (identical initial weights), so without this all workers would
        # draw the same dropout masks from torch's stream (`dropout_rng: worker`; with `sample` each
        # sample's masks come from its own key instead). Rank 0 keeps the stream a single worker has
        # (and its checkpoint restores); the others draw their own, from (seed, rank, epoch), the same
        # after a resume.
        torch.manual_seed(int(np.random.SeedSequence([run.scfg.seed, run.rank, epoch]).generate_state(1)[0]))
    run.dataset.set_epoch(epoch)
    run.sampler.set_epoch(epoch)


def stop_diverged(run: WorkerRun, epoch: int, step: int) -> None:
    """A NaN or infinite loss: rank 0 writes failed.json (the driver raises it); no checkpoint."""
    import ray.train

    if run.rank == 0:
        message = (
            f"{run.stage}: the loss became NaN or infinite at step {step} (epoch {epoch + 1}); "
            f"stopped, keeping the last good checkpoint (epoch {run.state.epoch}); rerun with a lower "
            f"{run.stage}.lr to resume from it"
        )
        artifacts.write_json(run.paths.failed, {"message": message})
    ray.train.report({"epoch": epoch + 1, "nonfinite": 1.0}, checkpoint=None)


def end_epoch(run: WorkerRun, record: dict, kept: bool) -> None:
    """Report the epoch to Ray Train on every rank; rank 0 also writes the epoch's files."""
    state = run.state
    metrics = {**record, "best_miou": state.best_miou, "best_epoch": state.best_epoch}
    if run.rank != 0:
        report_without_checkpoint(metrics, state.epoch)
        return
    worker_print(f"{run.stage}: epoch {state.epoch}/{run.scfg.epochs} loss {record['loss']:.4f} "
                 f"val CAM mIoU {record['val_miou']:.2f} @ {record['val_threshold']:.2f} "
                 f"({record['images_per_s']:.1f} img/s)")
    log_epoch(run.writer, run.layout, run.stage, record, run.model, run.inputs.val, run.ctx.device)
    if kept:
        write_torch(run.paths.model, run.model.state_dict())
    report_checkpoint(run.paths, metrics, run.model, run.ctx.optimizer, state, run.meta)


def report_epoch(run: WorkerRun, record: dict, kept: bool, line: str) -> None:
    """Every rank reports the epoch; rank 0 prints `line`, logs the record's scalars to TensorBoard,
    writes model.pth (when the epoch is kept) and the checkpoint (the stages without CAM overlays)."""
    state = run.state
    metrics = {**record, "best_miou": state.best_miou, "best_epoch": state.best_epoch}
    if run.rank != 0:
        report_without_checkpoint(metrics, state.epoch)
        return
    worker_print(line)
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and np.isfinite(value):
            run.writer.add_scalar(key, value, record["epoch"])
    run.writer.flush()
    run.layout.sync_tensorboard(run.stage)
    if kept:
        write_torch(run.paths.model, run.model.state_dict())
    report_checkpoint(run.paths, metrics, run.model, run.ctx.optimizer, state, run.meta)


def finish(run: WorkerRun, extra: dict | None = None) -> None:
    """Rank 0 writes result.json last: its presence means the stage finished. `extra`: the stage's own
    keys (train_seg: the network and the labels it learnt from)."""
    if run.rank != 0:
        return
    run.writer.close()
    run.layout.sync_tensorboard(run.stage, final=True)
    state = run.state
    summary = {
        "stage": run.stage, "epochs": run.scfg.epochs, "best_epoch": state.best_epoch,
        "best_miou": state.best_miou, "best_threshold": state.best_threshold,
        "model": run.paths.model, "checkpoints": run.paths.storage, **(extra or {}), "history": state.history,
    }
    artifacts.write_json(run.paths.result, summary)
