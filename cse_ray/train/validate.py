"""The per-epoch validation (multi-scale CAM mIoU with the threshold search) and the TensorBoard log.

Validation is split over the workers by image and reduced once: each worker fills the confusion counts
of its share, one all-reduce adds them up, and every worker computes the same mIoU (so all of them
agree on the kept epoch). TensorBoard is rank 0's: scalars every epoch and CAM overlays of the first
few validation images, written to `RunLayout.tensorboard(stage)` and uploaded after each epoch when
`--out` is remote.
"""

from __future__ import annotations

import math

import torch

from cse_ray.config import Config, TrainCamConfig, thresholds
from cse_ray.data.prepare import Split
from cse_ray.layout import RunLayout
from cse_ray.train.epoch import worker_print

OVERLAY_IMAGES = 4


def validate(model, val: Split, cfg: Config, scfg: TrainCamConfig, device, rank: int, world: int) -> dict:
    """Multi-scale CAM mIoU and its best background threshold on the validation list (or its first
    `val_images`): {"miou", "threshold"}, the same on every worker."""
    import torch.distributed as dist

    from cse_ray.cam import multiscale_cam
    from cse_ray.data.voc import image_path, mask_path
    from cse_ray.formats import read_image, read_label_png
    from cse_ray.metrics import ConfusionSweep

    names = val.names[: scfg.val_images] if scfg.val_images else val.names
    sweep = ConfusionSweep(thresholds(cfg.evaluate), keep_per_image=False, labels=cfg.data.labels)
    sbd = cfg.data.sbd_root or None
    for name in names[rank::world]:
        image = read_image(image_path(val.root, name))
        gt = read_label_png(mask_path(val.root, name, sbd), expected_hw=image.shape[:2])
        cams, classes = multiscale_cam(model, image, val.labels[name], scfg.val_scales, device,
                                       channels_last=scfg.channels_last)
        sweep.add_cams(cams, classes, gt, name=name)
    if world > 1:  # one all-reduce of the counts (gloo reduces CPU tensors, nccl GPU ones)
        counts = torch.from_numpy(sweep.boundary_counts.copy()).to(device)
        dist.all_reduce(counts)
        sweep.boundary_counts = counts.cpu().numpy()
        sweep.num_images = len(names)
    result = sweep.result()
    return {"miou": result.miou, "threshold": result.threshold}


def open_writer(layout: RunLayout, stage: str):
    """Rank 0's SummaryWriter for the stage (a resumed run appends to the same directory)."""
    from torch.utils.tensorboard import SummaryWriter

    directory = layout.tensorboard(stage)
    if layout.is_remote:
        worker_print(f"{stage}: TensorBoard logs in {directory}, uploaded to "
                     f"{layout.tensorboard_target(stage)} after each epoch")
    return SummaryWriter(directory)


def log_epoch(writer, layout: RunLayout, stage: str, record: dict, model, val: Split, device) -> None:
    """Scalars every epoch and CAM overlays of the first few validation images, then the upload."""
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
    layout.sync_tensorboard(stage)
