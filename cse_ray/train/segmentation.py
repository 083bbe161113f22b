"""`cse-ray train-seg`: the segmentation network on pseudo-labels, on Ray Train.

The same driver (`stage.fit_stage`), checkpoints, resume, fault hooks, TensorBoard and rank-0 writers
as the other stages; the checks before Ray live in `segmentation_plan`. What differs lives here:

- the dataset: an image and its pseudo-label augmented together (`transforms.augment_with_label`:
  long-side resize from `resize_long`, flip, colour jitter of the image, one crop with label padding
  255), item i of epoch e drawn from the rng (seed, e, i) like the other stages;
- the step: `segment.segmentation_losses` (cross-entropy on the upsampled scores, 255 ignored);
- the per-epoch validation: the mIoU of the network's labels on `data.val_list` against ground truth,
  predicted by `segment.predict_probabilities` (the code path of `cse-ray predict` and the pipeline's
  `seg_miou`) at `train_seg.val_scales` without the flip: it only ranks epochs, and the flip would
  double its cost. Each worker counts its share of the images; one all-reduce adds the counts, so
  every worker agrees on the kept epoch. Without ground truth there is no validation (val_miou null).

The optimiser is psa's/DeepLab's: the ASPP head (`SEG_HEAD`) at x10 (weights) / x20 (biases), the
backbone at x1 / x2, poly decay; `freeze: reference` freezes every BatchNorm (and ResNet-38d's conv1a
and b2*), as for the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cse_ray.config import Config, from_dict
from cse_ray.data.datasets import LabelMapCrops
from cse_ray.data.prepare import Split
from cse_ray.labels import LabelSpace
from cse_ray.train.epoch import run_epoch
from cse_ray.train.loop import (
    WorkerRun,
    begin_epoch,
    finish,
    report_epoch,
    seed_everything,
    start_run,
    stop_diverged,
)
from cse_ray.train.segmentation_plan import SegInputs, SegLabels, read_seg_label


class SegmentationDataset(LabelMapCrops):
    """(image 3 x crop x crop, label crop x crop uint8 with 255 = ignore or padding, index)."""

    def __init__(self, root: str, names: Sequence[str], labels: SegLabels, space: LabelSpace, crop: int,
                 resize_long: tuple[int, int], jitter: dict[str, float], seed: int) -> None:
        super().__init__(root, names, crop, resize_long, jitter, seed)
        self.labels, self.space = labels, space

    def read_label(self, name: str, hw: tuple[int, int]) -> np.ndarray:
        return read_seg_label(self.labels, name, hw, self.space)


def validate_segmentation(model, val: Split, cfg: Config, device, rank: int, world: int) -> float:
    """mIoU (percent) of the network's labels on the validation list (or its first `val_images`)."""
    import torch.distributed as dist

    from cse_ray.data.voc import image_path, mask_path
    from cse_ray.formats import read_image, read_label_png
    from cse_ray.metrics import ConfusionSweep
    from cse_ray.segment import label_from_probabilities, predict_probabilities

    scfg = cfg.train_seg
    names = val.names[: scfg.val_images] if scfg.val_images else val.names
    sweep = ConfusionSweep(None, keep_per_image=False, labels=cfg.data.labels)
    sbd = cfg.data.sbd_root or None
    amp = torch.bfloat16 if scfg.bf16 else None
    for name in names[rank::world]:
        image = read_image(image_path(val.root, name))
        gt = read_label_png(mask_path(val.root, name, sbd), expected_hw=image.shape[:2])
        probs = predict_probabilities(model, image, scfg.val_scales, flip=False, device=device, amp_dtype=amp,
                                      channels_last=scfg.channels_last)
        sweep.add_labels(label_from_probabilities(probs), gt, name=name)
    if world > 1:  # one all-reduce of the counts (gloo reduces CPU tensors, nccl GPU ones)
        counts = torch.from_numpy(sweep.boundary_counts.copy()).to(device)
        dist.all_reduce(counts)
        sweep.boundary_counts = counts.cpu().numpy()
        sweep.num_images = len(names)
    return sweep.result().miou


def setup(inputs) -> WorkerRun:
    """The network (initialised, frozen as configured), the data, DeepLab's lr groups, and a resume."""
    from cse_ray.models import SEG_HEAD, build_segmenter, load_weights
    from cse_ray.objective import freeze_eraser_layers

    cfg = from_dict(inputs.config)
    scfg = cfg.train_seg
    seg: SegInputs = inputs.seg
    torch.set_num_threads(max(1, scfg.cpus_per_worker))
    seed_everything(scfg.seed)  # the same initial head on every rank
    model = build_segmenter(scfg.network, cfg.data.labels.num_classes, scfg.aspp_rates, dropout=scfg.dropout)
    if inputs.classifier:
        load_weights(model, inputs.classifier, strict=False)  # the head starts fresh; fc8 is unused
    if scfg.freeze == "reference":
        freeze_eraser_layers(model)
    dataset = SegmentationDataset(
        inputs.train.root, inputs.train.names, seg.labels, cfg.data.labels, scfg.crop, scfg.resize_long,
        dict(zip(("brightness", "contrast", "saturation", "hue"), scfg.jitter)), scfg.seed)
    meta = {"stage": inputs.stage, "network": scfg.network, "num_classes": cfg.data.labels.num_classes,
            "init": inputs.classifier, "init_sha256": inputs.classifier_sha256, "config": inputs.config}
    return start_run(inputs, cfg, scfg, model, dataset, (SEG_HEAD,), meta)


def train_seg_loop_per_worker(loop_config: dict) -> None:
    """Set up, then for each epoch: cross-entropy steps -> validation mIoU -> rank 0's writers."""
    from cse_ray.objective import set_train_mode
    from cse_ray.segment import segmentation_losses

    run = setup(loop_config["inputs"])
    seg: SegInputs = run.inputs.seg
    for epoch in range(run.state.epoch, run.scfg.epochs):
        begin_epoch(run, epoch)
        set_train_mode(run.ctx.model)
        stats = run_epoch(run.ctx, epoch, losses_fn=segmentation_losses)
        if stats["nonfinite_step"] >= 0:
            stop_diverged(run, epoch, stats["nonfinite_step"])
            return
        run.model.eval()
        miou = (validate_segmentation(run.model, run.inputs.val, run.cfg, run.ctx.device, run.rank, run.world)
                if seg.validate else None)
        record = {"epoch": epoch + 1, **stats, "val_miou": miou}
        kept = run.state.add_epoch(record, run.scfg.keep)
        shown = "none (no ground truth)" if miou is None else f"{miou:.2f}"
        report_epoch(run, record, kept, (
            f"train_seg: epoch {run.state.epoch}/{run.scfg.epochs} loss {record['loss']:.4f} pixel accuracy "
            f"{100 * record['acc']:.1f}% val mIoU {shown} ({record['images_per_s']:.1f} img/s)"))
    finish(run, extra={"network": run.scfg.network, "num_classes": run.cfg.data.labels.num_classes,
                       "labels": seg.labels.kind, "labels_folder": seg.labels.folder,
                       "init": run.inputs.classifier})
