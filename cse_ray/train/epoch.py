"""One training epoch on one worker: the step loop, the NaN/inf check across workers, the progress line.

Losses stay on the device: the host reads them only every `log_every` steps, which is also where the
workers agree (one small all-reduce) on whether any of them saw a non-finite loss, so they all stop
at the same step and none waits for the others in a collective.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from cse_ray.config import TrainCamConfig
from cse_ray.train.faults import FaultHooks

_NO_STEP = 2**62


@dataclass
class EpochContext:
    """What `run_epoch` works with, the same every epoch."""

    stage: str  # "train_cam" or "train_cse"
    model: torch.nn.Module  # the trained network (DDP-wrapped with several workers)
    frozen: torch.nn.Module | None  # train_cse's frozen classifier; None for train_cam
    loader: DataLoader  # yields (images, labels, sample indices)
    optimizer: torch.optim.Optimizer
    device: torch.device
    scfg: TrainCamConfig  # the stage's section (TrainCseConfig for train_cse)
    num_classes: int
    steps_per_epoch: int
    show_progress: bool = False  # rank 0 reports every `log_every` steps
    bar: bool = False  # a progress bar instead of lines (the driver prints to a terminal)
    faults: FaultHooks = FaultHooks()


def mask_scores(indices: torch.Tensor, seed: int, epoch: int, num_classes: int) -> torch.Tensor:
    """Per-sample random scores for the mask-class choice, a function of (seed, epoch, sample index).

    So the choice does not depend on how the batch is split over workers: one worker and two workers
    at the same global batch see the same erasing.
    """
    rows = [np.random.default_rng([seed, epoch, int(i), 7]).random(num_classes) for i in indices]
    return torch.from_numpy(np.stack(rows)).float()


def dropout_keys(indices: torch.Tensor, seed: int, epoch: int) -> list[tuple[int, int, int]]:
    """Each sample's dropout key, (seed, epoch, sample index) (`cse_ray.models.sample_dropout`): with
    `dropout_rng: sample` a sample's masks are the same on whichever worker and batch place it lands."""
    return [(int(seed), int(epoch), int(i)) for i in indices]


def run_epoch(ctx: EpochContext, epoch: int, weight: float = 0.0, losses_fn=None) -> dict:
    """One pass over the loader; returns the epoch's mean losses over all workers, lr, images/s and
    `nonfinite_step` (the first global step whose loss was NaN or infinite on any worker, else -1).

    `weight`: the erasing loss's weight this epoch (train_cse). `losses_fn(model, images, labels)`:
    another stage's named losses with a "total" (train_aff's `affinity_losses`).
    """
    from cse_ray.models import sample_dropout
    from cse_ray.objective import cam_losses, cse_losses

    scfg, device = ctx.scfg, ctx.device
    totals: dict[str, torch.Tensor] = {}
    first_bad = torch.tensor(-1, device=device)
    images_seen = 0
    step_in_epoch = -1
    start = time.perf_counter()
    title = f"{ctx.stage} epoch {epoch + 1}"
    progress = progress_bar(ctx.steps_per_epoch, title) if ctx.show_progress and ctx.bar else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if scfg.bf16 else contextlib.nullcontext()
    memory_format = torch.channels_last if scfg.channels_last else torch.contiguous_format
    for step_in_epoch, (images, labels, indices) in enumerate(ctx.loader):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        keys = dropout_keys(indices, scfg.seed, epoch) if scfg.dropout_rng == "sample" else None
        with autocast, sample_dropout(ctx.model, keys):
            if losses_fn is not None:
                losses = losses_fn(ctx.model, images, labels)
            elif ctx.frozen is None:
                losses = cam_losses(ctx.model, images, labels)
            else:
                scores = mask_scores(indices, scfg.seed, epoch, ctx.num_classes).to(device)
                losses = cse_losses(ctx.model, ctx.frozen, images, labels, weight, scores=scores,
                                    normalize=scfg.mask_norm)
        losses["total"] = ctx.faults.poison(losses["total"], epoch, step_in_epoch)
        ctx.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        ctx.optimizer.step()
        step = epoch * ctx.steps_per_epoch + step_in_epoch
        bad = ~torch.isfinite(losses["total"].detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.tensor(step, device=device), first_bad)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float()
        images_seen += images.shape[0]
        if (step_in_epoch + 1) % scfg.log_every == 0 or step_in_epoch + 1 == ctx.steps_per_epoch:
            if any_rank_bad(first_bad):
                break
            if ctx.show_progress:
                rate = images_seen * world_size() / (time.perf_counter() - start)
                line = (f"{title} step {step_in_epoch + 1}/{ctx.steps_per_epoch} "
                        f"loss {float(losses['total'].detach()):.4f} {rate:.1f} img/s")
                if progress is not None:
                    progress.set_description(line)
                else:
                    worker_print(line)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return _epoch_stats(ctx, totals, max(1, step_in_epoch + 1), images_seen, time.perf_counter() - start,
                        first_bad)


def _epoch_stats(ctx: EpochContext, totals: dict, steps: int, images_seen: int, seconds: float,
                 first_bad: torch.Tensor) -> dict:
    """The epoch's means over all workers, not rank 0's share alone (one all-reduce)."""
    import torch.distributed as dist

    keys = sorted(totals)
    means = torch.stack([totals[k] for k in keys]) / steps
    if world_size() > 1:
        dist.all_reduce(means)
        means /= world_size()
    stats = {("loss" if k == "total" else f"loss_{k}" if k in ("cls", "erase") else k): float(v)
             for k, v in zip(keys, means.tolist())}
    stats["lr"] = ctx.optimizer.param_groups[0]["lr"]
    stats["images_per_s"] = images_seen * world_size() / seconds
    stats["nonfinite_step"] = min_bad_step(first_bad)
    return stats


# -- agreeing on a non-finite loss across workers


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank_bad(first_bad: torch.Tensor) -> bool:
    """Whether any worker has seen a non-finite loss (`first_bad` >= 0) so far."""
    import torch.distributed as dist

    flag = (first_bad >= 0).to(torch.int64).reshape(1)
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def min_bad_step(first_bad: torch.Tensor) -> int:
    """The first non-finite step over all workers, or -1."""
    import torch.distributed as dist

    value = torch.where(first_bad >= 0, first_bad, torch.tensor(_NO_STEP, device=first_bad.device)).reshape(1)
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    step = int(value.item())
    return -1 if step >= _NO_STEP else step


# -- what the driver shows


def progress_bar(total: int, description: str):
    """A bar the driver draws once for the worker (Ray's tqdm), or plain tqdm outside Ray."""
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # pragma: no cover - older Ray
        from tqdm import tqdm
    return tqdm(total=total, desc=description)


def worker_print(line: str) -> None:
    """One progress line from a Ray Train worker, shown once on the driver.

    Ray Train 2.60 replaces `print` in its workers with one that both writes to stdout and logs the
    line, and the driver shows each copy; writing to the process's own stdout bypasses the patch.
    """
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)
