"""Training on Ray Train: the ordinary classifier (`train_cam`), then the eraser against it (`train_cse`).

The driver validates everything (config, lists, images, checkpoints) before Ray starts, then runs a
`TorchTrainer` whose `train_loop_per_worker` is built from the plain functions below: build the
networks, run an epoch, validate, checkpoint. Rank 0 is the only writer. The run directory:

    OUT/<stage>/model.pth      the kept epoch's weights (`keep`: train_cam the last, train_cse the best;
                               a plain state dict, loads like psa's od_cam.pth)
    OUT/<stage>/result.json    written last: the run is finished (history, kept epoch as best_epoch, mIoU)
    OUT/<stage>/events.log     a line per epoch start (restarts and resumes show as repeats)
    OUT/<stage>/ray/           Ray Train's storage: per-epoch checkpoints, used to resume
    OUT/tensorboard/<stage>/   TensorBoard event files

Running the same command again resumes from the latest checkpoint (Ray Train restores the run with
the same storage path and name), and on a finished run it only says so.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cse_ray import artifacts
from cse_ray.config import Config, TrainCamConfig, from_dict, thresholds, to_dict, with_absolute_paths
from cse_ray.data.prepare import Split, load_split, resolve_data_root
from cse_ray.errors import UserError
from cse_ray.models import check_backbone

STAGES = ("train_cam", "train_cse")
MODEL_FILE = "model.pth"
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
CLASSIFIER_FILE = "classifier.json"
LATEST_FILE = "latest.json"
STATE_FILE = "state.pt"
EVENTS_FILE = "events.log"  # one line per epoch start: shows resumes and restarts at a glance
TEST_FAULT_ENV = "CSE_RAY_TEST_FAIL_AT_EPOCH"
"""Test-only fault hook: `N` makes rank 0 crash once at the start of (1-based) epoch N."""
TEST_NAN_ENV = "CSE_RAY_TEST_NAN_AT_EPOCH"
"""Test-only fault hook: `N` makes the loss NaN from the second step of (1-based) epoch N on."""


# ------------------------------------------------------------------------------------------ driver


def train_cam(cfg: Config, out: str) -> dict:
    """Train the ordinary CAM classifier; returns the run summary (kept epoch, mIoU, paths)."""
    return fit_stage("train_cam", cfg, out)


def train_cse(cfg: Config, out: str) -> dict:
    """Train the eraser against the frozen classifier (`train_cse.classifier` or OUT/train_cam)."""
    return fit_stage("train_cse", cfg, out)


def train_both(cfg: Config, out: str) -> dict:
    """`jobs/train.py`: train-cam then train-cse, or only train-cse when a classifier is given."""
    if not cfg.train_cse.classifier:
        train_cam(cfg, out)
    return train_cse(cfg, out)


def stage_path(out: str, stage: str, *parts: str) -> str:
    return artifacts.join(out, stage, *parts)


def classifier_checkpoint(cfg: Config, out: str) -> str:
    return cfg.train_cse.classifier or stage_path(out, "train_cam", MODEL_FILE)


@dataclass(frozen=True)
class StageInputs:
    """What the workers need, checked by the driver: plain data, cheap to ship."""

    stage: str
    config: dict
    out: str
    train: Split
    val: Split
    classifier: str = ""
    classifier_sha256: str = ""  # checkpoints reference the frozen classifier, never copy it
    fault_epoch: int = 0
    nan_epoch: int = 0
    progress_bar: bool = False  # only when the driver prints to a terminal; logs get plain lines


def prepare_stage(stage: str, cfg: Config, out: str) -> StageInputs:
    """All checks that can fail on bad input, before Ray starts (exit code 2 on any of them)."""
    scfg: TrainCamConfig = getattr(cfg, stage)
    check_backbone(cfg.model.backbone)
    root = resolve_data_root(cfg, out)
    train = load_split(cfg, root, "train_list")
    val = load_split(cfg, root, "val_list", need_masks=True)
    if len(train.names) < scfg.batch_size:
        raise UserError(
            f"config key {stage}.batch_size: {scfg.batch_size} is more than the {len(train.names)} "
            f"images of data.train_list"
        )
    if cfg.model.pretrained and not artifacts.exists(cfg.model.pretrained):
        raise UserError(f"config key model.pretrained: {cfg.model.pretrained} not found")
    classifier = classifier_sha256 = ""
    if stage == "train_cse":
        classifier = classifier_checkpoint(cfg, out)
        if not artifacts.exists(classifier):
            raise UserError(
                f"config key train_cse.classifier: {classifier} not found "
                "(run train-cam first, or give a classifier checkpoint such as psa's od_cam.pth)"
            )
        classifier_sha256 = _check_same_classifier(out, classifier)
    fault = int(os.environ.get(TEST_FAULT_ENV, "0") or 0)
    nan = int(os.environ.get(TEST_NAN_ENV, "0") or 0)
    return StageInputs(stage, to_dict(cfg), out, train, val, classifier, classifier_sha256, fault, nan,
                       progress_bar=sys.stderr.isatty())


def _check_same_classifier(out: str, classifier: str) -> str:
    """A resumed eraser must keep training against the classifier it started with; returns its sha256."""
    record_path = stage_path(out, "train_cse", CLASSIFIER_FILE)
    digest = artifacts.file_sha256(classifier)
    if artifacts.exists(record_path):
        record = artifacts.read_json(record_path)
        if record["sha256"] != digest:
            raise UserError(
                f"config key train_cse.classifier: {classifier} differs from the classifier this run "
                f"started with ({record['path']}, sha256 {record['sha256'][:12]}); use a new --out"
            )
    else:
        artifacts.write_json(record_path, {"path": str(classifier), "sha256": digest})
    return digest


def _storage_path(out: str, stage: str) -> str:
    return artifacts.absolute(stage_path(out, stage, "ray"))


def fit_stage(stage: str, cfg: Config, out: str, callbacks: tuple = (),
              resources_per_worker: dict[str, float] | None = None) -> dict:
    """Run one training stage on Ray Train, or report that it already finished.

    `resources_per_worker` overrides the config's CPU/GPU per worker (Tune trials pass fractions).
    """
    cfg, out = with_absolute_paths(cfg), artifacts.absolute(out)  # Ray workers run in other directories
    result_path = stage_path(out, stage, RESULT_FILE)
    if artifacts.exists(result_path):
        summary = artifacts.read_json(result_path)
        print(f"{stage}: already finished in {out} (kept epoch {summary['best_epoch']}, "
              f"mIoU {summary['best_miou']:.2f}); nothing to do")
        return summary
    inputs = prepare_stage(stage, cfg, out)
    scfg: TrainCamConfig = getattr(cfg, stage)

    import ray.train
    from ray.train.torch import TorchTrainer

    from cse_ray.runtime import ensure_ray, resolve_use_gpu

    ensure_ray()
    if resources_per_worker is None:
        use_gpu = resolve_use_gpu(scfg.use_gpu)
        resources_per_worker = {"CPU": scfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    else:
        use_gpu = resources_per_worker.get("GPU", 0) > 0
    failed_path = stage_path(out, stage, FAILED_FILE)
    if artifacts.exists(failed_path) and not artifacts.is_uri(failed_path):
        Path(failed_path).unlink()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=stage,
            storage_path=_storage_path(out, stage),
            failure_config=ray.train.FailureConfig(max_failures=scfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    print(f"{stage}: {scfg.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, "
          f"{len(inputs.train.names)} training images, {scfg.epochs} epochs")
    trainer.fit()
    if artifacts.exists(failed_path):
        raise RuntimeError(artifacts.read_json(failed_path)["message"])
    summary = artifacts.read_json(result_path)
    print(
        f"{stage}: done. kept epoch {summary['best_epoch']} ({scfg.keep}) with validation CAM mIoU "
        f"{summary['best_miou']:.2f} (threshold {summary['best_threshold']:.2f}); "
        f"model {summary['model']}; checkpoints under {summary['checkpoints']}"
    )
    return summary


# ------------------------------------------------------------------------------------------ workers


class _Indexed(Dataset):
    """Adds the sample index, from which each image's mask-class choice is derived."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image, label, index


def build_networks(stage: str, cfg: Config, classifier_path: str, device: torch.device):
    """The trained network (and, for train_cse, the frozen classifier), initialised and frozen."""
    from cse_ray.models import build_classifier, load_weights
    from cse_ray.objective import freeze_classifier, freeze_eraser_layers

    scfg = getattr(cfg, stage)
    model = build_classifier(cfg.model.backbone, dropout=scfg.dropout)
    if stage == "train_cse" and cfg.train_cse.init == "classifier":
        load_weights(model, classifier_path)
    elif cfg.model.pretrained:
        load_weights(model, cfg.model.pretrained, strict=False)  # fc8 stays freshly initialised
    if scfg.freeze == "reference":
        freeze_eraser_layers(model)
    model.to(device)
    frozen = None
    if stage == "train_cse":
        frozen = build_classifier(cfg.model.backbone, dropout=cfg.train_cam.dropout)
        load_weights(frozen, classifier_path)
        freeze_classifier(frozen).to(device)
    return model, frozen


def mask_scores(indices: torch.Tensor, seed: int, epoch: int, num_classes: int) -> torch.Tensor:
    """Per-sample random scores for the mask-class choice, a function of (seed, epoch, sample index).

    So the choice does not depend on how the batch is split over workers: one worker and two workers
    at the same global batch see the same erasing.
    """
    rows = [np.random.default_rng([seed, epoch, int(i), 7]).random(num_classes) for i in indices]
    return torch.from_numpy(np.stack(rows)).float()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights and the optimiser."""

    epoch: int = 0  # epochs finished
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_miou: float = -1.0
    best_threshold: float = 0.0


def save_state(path: Path, model: torch.nn.Module, optimizer, state: TrainState, meta: dict) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": state.__dict__,
            "rng": {
                "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            },
            "meta": meta,
        },
        path,
    )


def load_state(path: Path, model: torch.nn.Module, optimizer) -> TrainState:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    np.random.set_state(saved["rng"]["numpy"])
    random.setstate(saved["rng"]["python"])
    return TrainState(**saved["state"])


def _write_torch(path: str, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    artifacts.write_bytes(path, buffer.getvalue())


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: plain functions glued by the stage's schedule."""
    import ray.train
    import ray.train.torch

    from cse_ray.objective import erase_weight, set_train_mode
    from cse_ray.optim import CLASSIFIER_SCRATCH, ERASER_SCRATCH, build_optimizer

    inputs: StageInputs = loop_config["inputs"]
    stage, out = inputs.stage, inputs.out
    cfg = from_dict(inputs.config)
    scfg: TrainCamConfig = getattr(cfg, stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, scfg.cpus_per_worker))
    _seed_everything(scfg.seed)  # the same initial weights on every rank

    model, frozen = build_networks(stage, cfg, inputs.classifier, device)
    from cse_ray.data.datasets import TrainDataset

    dataset = TrainDataset(
        inputs.train.root, inputs.train.names, inputs.train.labels, crop=scfg.crop,
        resize_long=scfg.resize_long, seed=scfg.seed,
        jitter_strength=dict(zip(("brightness", "contrast", "saturation", "hue"), scfg.jitter)),
    )
    per_worker = scfg.batch_size // world
    sampler = DistributedSampler(
        _Indexed(dataset), num_replicas=world, rank=rank, shuffle=True, seed=scfg.seed, drop_last=True
    )
    loader = DataLoader(
        _Indexed(dataset), batch_size=per_worker, sampler=sampler, drop_last=True,
        num_workers=scfg.loader_workers, pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(dataset) // scfg.batch_size
    optimizer = build_optimizer(
        model, lr=scfg.lr, weight_decay=scfg.weight_decay, max_step=steps_per_epoch * scfg.epochs,
        mode=scfg.momentum_mode, scratch=CLASSIFIER_SCRATCH if stage == "train_cam" else ERASER_SCRATCH,
    )
    state = TrainState()
    checkpoint = resume_checkpoint(out, stage)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / STATE_FILE, model, optimizer)
    trained = ray.train.torch.prepare_model(model) if world > 1 else model
    writer = _tensorboard(out, stage) if rank == 0 else None
    meta = {"stage": stage, "backbone": cfg.model.backbone, "classifier": inputs.classifier,
            "classifier_sha256": inputs.classifier_sha256, "config": inputs.config}
    if rank == 0 and state.epoch:
        worker_print(f"{stage}: resuming after epoch {state.epoch} of {scfg.epochs}")

    for epoch in range(state.epoch, scfg.epochs):
        if rank == 0:
            artifacts.append_line(stage_path(out, stage, EVENTS_FILE),
                                  f"{time.strftime('%Y-%m-%dT%H:%M:%S')} epoch {epoch + 1} started")
            if inputs.fault_epoch == epoch + 1:
                _test_fault_once(out, stage, epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        weight = 0.0
        if frozen is not None:
            weight = erase_weight(cfg.train_cse.cc_init, cfg.train_cse.cc_slope, epoch)
        set_train_mode(trained)
        stats = run_epoch(
            trained, frozen, loader, optimizer, device, epoch, scfg, cfg, weight, steps_per_epoch,
            show_progress=rank == 0, stage=stage, bar=inputs.progress_bar, nan_epoch=inputs.nan_epoch,
        )
        if stats.get("nonfinite_step", -1) >= 0:
            if rank == 0:
                message = (
                    f"{stage}: the loss became NaN or infinite at step {stats['nonfinite_step']} "
                    f"(epoch {epoch + 1}); stopped, keeping the last good checkpoint (epoch {state.epoch})"
                )
                artifacts.write_json(stage_path(out, stage, FAILED_FILE), {"message": message})
            ray.train.report({"epoch": epoch + 1, "nonfinite": 1.0}, checkpoint=None)
            return
        model.eval()
        val = validate(model, inputs.val, cfg, scfg, device, rank, world)
        state.epoch = epoch + 1
        record = {"epoch": epoch + 1, **stats, "w": weight, "val_miou": val["miou"],
                  "val_threshold": val["threshold"]}
        state.history.append(record)
        is_best = scfg.keep == "last" or val["miou"] > state.best_miou  # "best": the kept epoch
        if is_best:
            state.best_epoch, state.best_miou, state.best_threshold = epoch + 1, val["miou"], val["threshold"]
        metrics = {**record, "best_miou": state.best_miou, "best_epoch": state.best_epoch}
        if rank == 0:
            worker_print(f"{stage}: epoch {epoch + 1}/{scfg.epochs} loss {stats['loss']:.4f} "
                         f"val CAM mIoU {val['miou']:.2f} @ {val['threshold']:.2f} "
                         f"({stats['images_per_s']:.1f} img/s)")
            _log_epoch(writer, record, model, inputs.val, cfg, device)
            if is_best:
                _write_torch(stage_path(out, stage, MODEL_FILE), model.state_dict())
            with tempfile.TemporaryDirectory() as directory:
                save_state(Path(directory) / STATE_FILE, model, optimizer, state, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=_checkpoint_name(epoch + 1))
            artifacts.write_json(stage_path(out, stage, LATEST_FILE), {"epoch": epoch + 1})
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=_checkpoint_name(epoch + 1))

    if rank == 0:
        if writer is not None:
            writer.close()
        summary = {
            "stage": stage, "epochs": scfg.epochs, "best_epoch": state.best_epoch,
            "best_miou": state.best_miou, "best_threshold": state.best_threshold,
            "model": stage_path(out, stage, MODEL_FILE), "checkpoints": _storage_path(out, stage),
            "history": state.history,
        }
        artifacts.write_json(stage_path(out, stage, RESULT_FILE), summary)


def _checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def resume_checkpoint(out: str, stage: str):
    """The newest persisted checkpoint: Ray Train's own, or the one named in OUT/<stage>/latest.json.

    Ray Train registers a checkpoint when its controller next polls the workers (every ~2 s); a worker
    that dies right after `report` can lose that registration although the files are complete. Rank 0
    records each persisted epoch in `latest.json`, so such a checkpoint is still found.
    """
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((_epoch_of(registered.path), registered))
    pointer = stage_path(out, stage, LATEST_FILE)
    if artifacts.exists(pointer):
        epoch = int(artifacts.read_json(pointer)["epoch"])
        path = artifacts.join(_storage_path(out, stage), stage, _checkpoint_name(epoch))
        if artifacts.exists(artifacts.join(path, STATE_FILE)):
            candidates.append((epoch, ray.train.Checkpoint(path)))
    return max(candidates, key=lambda item: item[0])[1] if candidates else None


def worker_print(line: str) -> None:
    """One progress line from a Ray Train worker, shown once on the driver.

    Ray Train 2.60 replaces `print` in its workers with one that both writes to stdout and logs the
    line, and the driver shows each copy; writing to the process's own stdout bypasses the patch.
    """
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def _epoch_of(path: str) -> int:
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return int(name.split("_")[-1]) if name.startswith("epoch_") else 0


def _test_fault_once(out: str, stage: str, epoch: int) -> None:
    marker = stage_path(out, stage, f".test_fault_epoch{epoch + 1}")
    if not artifacts.exists(marker):
        artifacts.write_text(marker, "crashed once\n")
        os._exit(1)


def run_epoch(model, frozen, loader, optimizer, device, epoch: int, scfg: TrainCamConfig, cfg: Config,
              weight: float, steps_per_epoch: int, show_progress: bool, stage: str,
              bar: bool = False, nan_epoch: int = 0) -> dict:
    """One pass over the loader. Losses stay on the device; the host reads them every `log_every` steps.

    `show_progress` (rank 0) reports every `log_every` steps: a progress bar when `bar`, else a line.
    """
    import torch.distributed as dist

    from cse_ray.data.voc import NUM_CLASSES
    from cse_ray.objective import cam_losses, cse_losses

    totals: dict[str, torch.Tensor] = {}
    first_bad = torch.tensor(-1, device=device)
    images_seen = 0
    start = time.perf_counter()
    progress = _progress(steps_per_epoch, f"{stage} epoch {epoch + 1}") if show_progress and bar else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if scfg.bf16 else contextlib.nullcontext()
    for step_in_epoch, (images, labels, indices) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            if frozen is None:
                losses = cam_losses(model, images, labels)
            else:
                scores = mask_scores(indices, scfg.seed, epoch, NUM_CLASSES).to(device)
                losses = cse_losses(model, frozen, images, labels, weight, scores=scores,
                                    normalize=cfg.train_cse.mask_norm)
        if nan_epoch == epoch + 1 and step_in_epoch >= 1:  # test-only fault hook
            losses["total"] = losses["total"] * float("nan")
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        step = epoch * steps_per_epoch + step_in_epoch
        bad = ~torch.isfinite(losses["total"].detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.tensor(step, device=device), first_bad)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float()
        images_seen += images.shape[0]
        if (step_in_epoch + 1) % scfg.log_every == 0 or step_in_epoch + 1 == steps_per_epoch:
            if _any_rank_bad(first_bad, dist):
                break
            if show_progress:
                rate = images_seen * _world(dist) / (time.perf_counter() - start)
                line = (f"{stage} epoch {epoch + 1} step {step_in_epoch + 1}/{steps_per_epoch} "
                        f"loss {float(losses['total'].detach()):.4f} {rate:.1f} img/s")
                if progress is not None:
                    progress.set_description(line)
                else:
                    worker_print(line)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    steps = max(1, step_in_epoch + 1)
    seconds = time.perf_counter() - start
    keys = sorted(totals)
    means = torch.stack([totals[k] for k in keys]) / steps
    if _world(dist) > 1:  # the epoch's means over all workers, not rank 0's share alone
        dist.all_reduce(means)
        means /= _world(dist)
    stats = {("loss" if k == "total" else f"loss_{k}" if k in ("cls", "erase") else k): float(v)
             for k, v in zip(keys, means.tolist())}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["images_per_s"] = images_seen * _world(dist) / seconds
    stats["nonfinite_step"] = _min_bad_step(first_bad, dist)
    return stats


def _world(dist) -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _any_rank_bad(first_bad: torch.Tensor, dist) -> bool:
    flag = (first_bad >= 0).to(torch.int64).reshape(1)
    if _world(dist) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _min_bad_step(first_bad: torch.Tensor, dist) -> int:
    value = torch.where(first_bad >= 0, first_bad, torch.tensor(2**62, device=first_bad.device)).reshape(1)
    if _world(dist) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    step = int(value.item())
    return -1 if step >= 2**62 else step


def _progress(total: int, description: str):
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # pragma: no cover - older Ray
        from tqdm import tqdm
    return tqdm(total=total, desc=description)


def validate(model, val: Split, cfg: Config, scfg: TrainCamConfig, device, rank: int, world: int) -> dict:
    """Multi-scale CAM mIoU with the threshold search, split over the workers and reduced once."""
    import torch.distributed as dist

    from cse_ray.cam import multiscale_cam
    from cse_ray.data.voc import image_path, mask_path
    from cse_ray.formats import read_image, read_label_png
    from cse_ray.metrics import ConfusionSweep

    names = val.names[: scfg.val_images] if scfg.val_images else val.names
    sweep = ConfusionSweep(thresholds(cfg.evaluate), keep_per_image=False)
    sbd = cfg.data.sbd_root or None
    for name in names[rank::world]:
        image = read_image(image_path(val.root, name))
        gt = read_label_png(mask_path(val.root, name, sbd), expected_hw=image.shape[:2])
        cams, classes = multiscale_cam(model, image, val.labels[name], scfg.val_scales, device)
        sweep.add_cams(cams, classes, gt, name=name)
    if world > 1:  # one all-reduce of the counts (gloo reduces CPU tensors, nccl GPU ones)
        counts = torch.from_numpy(sweep.boundary_counts.copy()).to(device)
        dist.all_reduce(counts)
        sweep.boundary_counts = counts.cpu().numpy()
        sweep.num_images = len(names)
    result = sweep.result()
    return {"miou": result.miou, "threshold": result.threshold}


def _tensorboard(out: str, stage: str):
    from torch.utils.tensorboard import SummaryWriter

    directory = artifacts.join(out, "tensorboard", stage)
    if artifacts.is_uri(directory):  # event files are appended to, so they live on local disk
        directory = str(Path(tempfile.gettempdir(), "cse-ray-tensorboard", stage))
        worker_print(f"{stage}: TensorBoard logs in {directory} (--out is remote)")
    return SummaryWriter(directory)


OVERLAY_IMAGES = 4


def _log_epoch(writer, record: dict, model, val: Split, cfg: Config, device) -> None:
    """Scalars every epoch, and CAM overlays of the first few validation images."""
    from cse_ray.cam import multiscale_cam
    from cse_ray.data.voc import image_path
    from cse_ray.formats import read_image
    from cse_ray.plots import cam_overlay

    epoch = record["epoch"]
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{key}", value, epoch)
    for name in val.names[:OVERLAY_IMAGES]:
        image = read_image(image_path(val.root, name))
        cams, _ = multiscale_cam(model, image, val.labels[name], (1.0,), device)
        writer.add_image(f"cam/{name}", cam_overlay(image, cams), epoch, dataformats="HWC")
    writer.flush()
