"""`cse-ray train-aff`: AffinityNet on Ray Train, from the confident labels of `cse-ray aff-labels`.

The same driver (`stage.fit_stage`), checkpoints, resume, fault hooks, TensorBoard and rank-0 writers
as the CAM stages; what differs lives here: the dataset (an image crop and its confident label crop,
augmented together: long-side resize, flip, colour jitter on the image, crop with 255 padding for the
label, then psa's stride-8 labels), the step (`pair_affinities` -> `pair_labels` -> `affinity_loss`,
psa's bg/4 + fg/4 + neg/2) and the per-epoch validation: how well the affinities say "same region"
on the pairs of the validation images' ground truth (precision, recall and their F1 in percent at
affinity 0.5; one all-reduce). The F1 stands in the stage's `val_miou` / `best_miou` fields, so the
kept-epoch rule and result.json read as for the other stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cse_ray import artifacts
from cse_ray.config import Config, from_dict
from cse_ray.data.datasets import LabelMapCrops
from cse_ray.data.prepare import Split
from cse_ray.errors import UserError
from cse_ray.layout import InferLayout, RunLayout
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

SAME_REGION = 0.5  # an affinity above this says "same region" in the validation counts


def init_checkpoint(cfg: Config, out: str, section: str = "train_aff") -> str:
    """The weights a network with a new head starts from (`train_aff.init`, `train_seg.init`): the
    ImageNet `model.pretrained` (empty: random), or this run's (or the configured) classifier / eraser."""
    run = RunLayout.at(out)
    init = getattr(cfg, section).init
    if init == "pretrained":
        return cfg.model.pretrained
    path = (cfg.train_cse.classifier or run.stage("train_cam").model if init == "classifier"
            else cfg.infer.checkpoint or run.stage("train_cse").model)
    if not artifacts.exists(path):
        raise UserError(f"config key {section}.init: {init}, but {path} does not exist (train it first)")
    return path


def check_confident_labels(out: str, names: Sequence[str]) -> None:
    """Every training image needs its confident label (`cse-ray aff-labels` writes them)."""
    from cse_ray.infer.manifest import Listing

    folder = RunLayout.at(out).aff_labels
    listing = Listing(folder)
    missing = [name for name in names if not listing.exists(folder.confident_rel(name))]
    if missing:
        raise UserError(f"{folder.confident(missing[0])}: no confident label ({len(missing)} of {len(names)} "
                        "training images lack one); run cse-ray aff-labels with the same --out first")


class AffinityDataset(LabelMapCrops):
    """(image 3 x crop x crop, stride-8 confident label, index); item i of epoch e from rng (seed, e, i)."""

    def __init__(self, root: str, names: Sequence[str], labels: InferLayout, crop: int,
                 resize_long: tuple[int, int], jitter: dict[str, float], seed: int) -> None:
        super().__init__(root, names, crop, resize_long, jitter, seed)
        self.labels = labels

    def read_label(self, name: str, hw: tuple[int, int]) -> np.ndarray:
        from cse_ray.formats import read_label_png

        return read_label_png(self.labels.confident(name), expected_hw=hw, what="confident label")

    def target(self, label: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        from cse_ray.affinity_loss import downsample_labels

        # The padding's label is 255 and its pixels vote for nothing in `downsample_labels`.
        return downsample_labels(label, valid=valid)


def affinity_losses(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step's losses: psa's bg/fg/neg on the pairs of the stride-8 labels."""
    from cse_ray.affinity_loss import affinity_loss, pair_labels
    from cse_ray.models import pair_affinities

    affinities = pair_affinities(model(images))
    losses = affinity_loss(affinities.float(), *pair_labels(labels))
    return {"total": losses["total"], "loss_bg": losses["bg"], "loss_fg": losses["fg"],
            "loss_neg": losses["neg"]}


def validate_pairs(model, val: Split, cfg: Config, device, rank: int, world: int) -> dict:
    """Precision / recall / F1 (percent) of "affinity > 0.5" for "same ground-truth region" on val."""
    import torch.distributed as dist

    from cse_ray.affinity_loss import downsample_labels, pair_labels
    from cse_ray.data.transforms import normalize, to_chw
    from cse_ray.data.voc import image_path, mask_path
    from cse_ray.formats import read_image, read_label_png
    from cse_ray.models import pair_affinities
    from cse_ray.rw import pad_to_stride

    scfg = cfg.train_aff
    names = val.names[: scfg.val_images] if scfg.val_images else val.names
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # true positives, predicted, actual
    sbd = cfg.data.sbd_root or None
    with torch.no_grad():
        for name in names[rank::world]:
            image = read_image(image_path(val.root, name))
            gt = read_label_png(mask_path(val.root, name, sbd), expected_hw=image.shape[:2])
            batch = pad_to_stride(torch.from_numpy(to_chw(normalize(image)))[None]).to(device)
            same = pair_affinities(model(batch))[0] > SAME_REGION
            bg, fg, neg = pair_labels(downsample_labels(gt))
            actual = (bg | fg).to(device)
            known = actual | neg.to(device)
            counts += torch.stack([(same & actual).sum(), (same & known).sum(), actual.sum()]).double()
    if world > 1:
        dist.all_reduce(counts)
    hits, predicted, actual = counts.tolist()
    precision = 100.0 * hits / predicted if predicted else 0.0
    recall = 100.0 * hits / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def setup(inputs) -> WorkerRun:
    """AffinityNet (initialised, psa's layers frozen), the data, psa's lr groups, and a resume."""
    from cse_ray.models import AFFINITY_HEADS, build_affinity_net, load_weights
    from cse_ray.objective import freeze_eraser_layers

    cfg = from_dict(inputs.config)
    scfg = cfg.train_aff
    torch.set_num_threads(max(1, scfg.cpus_per_worker))
    seed_everything(scfg.seed)
    model = build_affinity_net(cfg.model.backbone, dropout=scfg.dropout)
    if inputs.classifier:
        load_weights(model, inputs.classifier, strict=False)  # the affinity heads start fresh
    if scfg.freeze == "reference":
        freeze_eraser_layers(model)
    folder = RunLayout.at(inputs.out).aff_labels
    dataset = AffinityDataset(
        inputs.train.root, inputs.train.names, folder, scfg.crop, scfg.resize_long,
        dict(zip(("brightness", "contrast", "saturation", "hue"), scfg.jitter)), scfg.seed)
    meta = {"stage": inputs.stage, "backbone": cfg.model.backbone, "init": inputs.classifier,
            "init_sha256": inputs.classifier_sha256, "config": inputs.config}
    return start_run(inputs, cfg, scfg, model, dataset, AFFINITY_HEADS, meta)


def train_aff_loop_per_worker(loop_config: dict) -> None:
    """Set up, then for each epoch: the affinity loss -> pair validation -> rank 0's writers."""
    from cse_ray.objective import set_train_mode

    run = setup(loop_config["inputs"])
    for epoch in range(run.state.epoch, run.scfg.epochs):
        begin_epoch(run, epoch)
        set_train_mode(run.ctx.model)
        stats = run_epoch(run.ctx, epoch, losses_fn=affinity_losses)
        if stats["nonfinite_step"] >= 0:
            stop_diverged(run, epoch, stats["nonfinite_step"])
            return
        run.model.eval()
        val = validate_pairs(run.model, run.inputs.val, run.cfg, run.ctx.device, run.rank, run.world)
        record = {"epoch": epoch + 1, **stats, "val_precision": val["precision"], "val_recall": val["recall"],
                  "val_miou": val["f1"], "val_threshold": SAME_REGION}
        kept = run.state.add_epoch(record, run.scfg.keep)
        report_epoch(run, record, kept, (
            f"train_aff: epoch {run.state.epoch}/{run.scfg.epochs} loss {record['loss']:.4f} val pairs "
            f"precision {record['val_precision']:.1f} recall {record['val_recall']:.1f} "
            f"({record['images_per_s']:.1f} img/s)"))
    finish(run)
