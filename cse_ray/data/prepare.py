"""Resolving a config's dataset: where its root is, which images each stage reads, their labels.

Every stage goes through here before it starts Ray, so a missing list or a corrupt image is reported
once, with its file name, and never half-way through a distributed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config
from cse_ray.data import voc
from cse_ray.errors import UserError
from cse_ray.labels import VOC, LabelSpace
from cse_ray.layout import RunLayout

LIST_KEYS = ("train_list", "val_list", "infer_list")


@dataclass(frozen=True)
class Split:
    """The images of one list with their image-level labels (one multi-hot float per class of `space`)."""

    root: str
    names: tuple[str, ...]
    labels: dict[str, np.ndarray]
    space: LabelSpace = VOC

    @property
    def num_classes(self) -> int:
        return self.space.num_classes


def resolve_data_root(cfg: Config, out: str) -> str:
    """`data.root`, or `OUT/data` for a synthetic run; generates the synthetic set when asked (idempotent)."""
    root = cfg.data.root
    if not root:
        if artifacts.is_uri(out):
            raise UserError("config key data.root: required when --out is a URI (the data must be local)")
        root = RunLayout.at(out).data
    if cfg.data.synth.enabled and cfg.data.dataset == "coco":
        _synthetic_coco(root, cfg.data.synth)
    elif cfg.data.synth.enabled:
        from cse_ray.data.synth import generate_from_config

        generate_from_config(root, cfg.data.synth)
    elif not Path(root, "JPEGImages").is_dir():
        raise UserError(f"config key data.root: {root} has no JPEGImages directory (not a VOC root)")
    return root


def _synthetic_coco(root: str, synth) -> None:
    """The synthetic set in the COCO 2014 layout under ROOT/coco2014, converted into ROOT as
    `cse-ray data coco` does (idempotent: both steps reuse what is complete)."""
    from cse_ray.data.coco_convert import convert
    from cse_ray.data.synth.coco import generate_coco

    raw = Path(root, "coco2014")
    generate_coco(raw, train=synth.train, val=synth.val, size=synth.size, seed=synth.seed,
                  part_strength=synth.part_strength, body_strength=synth.body_strength,
                  body_texture=synth.body_texture, partless=synth.partless)
    convert(raw, root, workers=0, progress=False)


def load_split(
    cfg: Config, root: str, key: str, check_images: bool = True, need_masks: bool = False
) -> Split:
    """Read the list named by `data.<key>`, check its images (fast, headers only) and read its labels."""
    if key not in LIST_KEYS:
        raise ValueError(f"unknown list key {key}")
    path = voc.list_path(root, getattr(cfg.data, key))
    if not Path(path).is_file():
        raise UserError(f"config key data.{key}: list file {path} not found")
    names = voc.read_list(path)
    if not names:
        raise UserError(f"config key data.{key}: list file {path} is empty")
    if check_images:
        voc.check_images(root, names)
    if need_masks:
        sbd = cfg.data.sbd_root or None
        missing = [n for n in names if not Path(voc.mask_path(root, n, sbd)).is_file()]
        if missing:
            raise UserError(
                f"config key data.{key}: {len(missing)} images of {path} have no ground-truth mask, "
                f"e.g. {voc.mask_path(root, missing[0], sbd)}"
            )
    space = cfg.data.labels
    cache = Path(root, voc.LABELS_FILE) if not artifacts.is_uri(root) else None
    sbd = cfg.data.sbd_root or None
    labels = voc.read_image_labels(root, names, cache_path=cache, sbd_root=sbd, space=space)
    return Split(root=root, names=tuple(names), labels=labels, space=space)
