"""train-seg's checks before Ray starts: which pseudo-labels it learns from, that every training image
has a sound one, that the initial weights fit the network, and that a resumed run keeps its network.

Every label PNG is read once here (they are small: ~2 ms each, on a thread pool), so a missing label,
a label of another size than its image or a value that is not a class stops the command with exit
code 2 naming the file, instead of failing a worker an hour into the run. The workers check each label
again as they read it (the same functions), which costs nothing next to the augmentation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config
from cse_ray.data import voc
from cse_ray.data.prepare import Split
from cse_ray.errors import UserError
from cse_ray.formats import image_hw, read_label_png
from cse_ray.labels import IGNORE_INDEX, LabelSpace
from cse_ray.layout import InferLayout, PredictLayout, RunLayout, StageLayout

WHAT = "pseudo-label"
MAX_SCAN_THREADS = 16


@dataclass(frozen=True)
class SegLabels:
    """Where the label PNGs are: this run's random walk (`rw`: RUN/rw/), its pseudo-labels (`pseudo`:
    RUN/pseudo_labels/, CRF or CAM threshold as `crf.pseudo_from` made them) or `train_seg.labels_dir`
    (`labels_dir`: FOLDER/NAME.png)."""

    kind: str
    root: str  # the run directory (rw, pseudo) or the labels folder

    def path(self, name: str) -> str:
        if self.kind == "rw":
            return InferLayout(self.root).rw(name)
        if self.kind == "pseudo":
            return InferLayout(self.root).pseudo(name)
        return PredictLayout(self.root).label(name)

    @property
    def folder(self) -> str:
        if self.kind == "rw":
            return InferLayout(self.root).rw_dir
        if self.kind == "pseudo":
            return InferLayout(self.root).pseudo_dir
        return self.root

    def missing_hint(self) -> str:
        other = "or set train_seg.labels / train_seg.labels_dir"
        if self.kind == "rw":
            return f"run cse-ray rw with the same --out first, {other}"
        if self.kind == "pseudo":
            return f"run cse-ray infer with the same --out first, {other}"
        return "config key train_seg.labels_dir names the folder"


@dataclass(frozen=True)
class SegInputs:
    """What train-seg's workers need besides the stage's common inputs."""

    labels: SegLabels
    validate: bool  # data.val_list has ground truth: the per-epoch mIoU


def seg_labels(cfg: Config, out: str) -> SegLabels:
    """`train_seg.labels_dir` when given, else this run's folder that `train_seg.labels` names."""
    scfg = cfg.train_seg
    if scfg.labels_dir:
        return SegLabels("labels_dir", scfg.labels_dir)
    return SegLabels(scfg.labels, RunLayout.at(out).root)


def check_label_values(label: np.ndarray, space: LabelSpace, path: str) -> None:
    """A label map holds 0 (background), 1..num_classes or 255 (ignore); anything else is a UserError."""
    counts = np.bincount(np.asarray(label, np.uint8).reshape(-1), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v > space.num_classes and v != IGNORE_INDEX]
    if bad:
        raise UserError(f"{path}: {WHAT} value {bad[0]} is not a class of {space.dataset} "
                        f"(0..{space.num_classes}, {IGNORE_INDEX} = ignore; found {bad[:10]})")


def read_seg_label(labels: SegLabels, name: str, image_hw_: tuple[int, int], space: LabelSpace) -> np.ndarray:
    """The label map of `name`, checked: the image's size, values within the classes."""
    path = labels.path(name)
    label = read_label_png(path, expected_hw=image_hw_, what=WHAT)
    check_label_values(label, space, path)
    return label


def check_labels(labels: SegLabels, root: str, names: Sequence[str], space: LabelSpace) -> float:
    """Every training image has a label of its size with values within the classes; returns seconds."""
    present = artifacts.list_files(labels.folder)
    missing = [name for name in names if labels.path(name).rsplit("/", 1)[-1] not in present]
    if missing:
        raise UserError(f"{labels.path(missing[0])}: no {WHAT} ({len(missing)} of {len(names)} training "
                        f"images lack one); {labels.missing_hint()}")
    start = time.perf_counter()

    def check(name: str) -> None:
        read_seg_label(labels, name, image_hw(voc.image_path(root, name)), space)

    threads = min(MAX_SCAN_THREADS, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(check, names):  # in list order: the first bad file is the one reported
            pass
    return time.perf_counter() - start


def has_ground_truth(cfg: Config, val: Split) -> bool:
    """Whether the validated images of data.val_list have masks (all: yes; none: no validation)."""
    scfg = cfg.train_seg
    names = val.names[: scfg.val_images] if scfg.val_images else val.names
    sbd = cfg.data.sbd_root or None
    missing = [name for name in names if not Path(voc.mask_path(val.root, name, sbd)).is_file()]
    if not missing:
        return True
    example = voc.mask_path(val.root, missing[0], sbd)
    if len(missing) < len(names):
        raise UserError(f"config key data.val_list: {len(missing)} of its {len(names)} validation images "
                        f"have no ground-truth mask, e.g. {example}")
    if scfg.keep == "best":
        raise UserError(f"config key train_seg.keep: best needs ground-truth masks of data.val_list, which "
                        f"has none (e.g. {example}); use keep=last or a list with masks")
    print(f"train_seg: data.val_list has no ground-truth masks (e.g. {example}): no per-epoch validation")
    return False


def check_init_weights(path: str, cfg: Config) -> None:
    """The initial weights must be the network's: every backbone entry present, every shared entry of
    the same shape (a head of another class count is refused); entries it lacks, such as fc8, are unused."""
    import torch

    from cse_ray.models import build_segmenter
    from cse_ray.models.weights import read_weights

    scfg = cfg.train_seg
    num_classes = cfg.data.labels.num_classes
    described = f"train_seg.network={scfg.network} with {num_classes} classes"
    with torch.device("meta"):  # names and shapes only
        model = build_segmenter(scfg.network, num_classes, scfg.aspp_rates)
    state, _, _ = read_weights(path)
    heads = tuple(f"{head}." for head in model.head_names)
    expected = model.state_dict()
    missing = [name for name in expected if name not in state and not name.startswith(heads)
               and not name.endswith("num_batches_tracked")]
    if missing:  # another architecture
        raise UserError(f"{path}: not weights of {described}: {len(missing)} of its backbone entries are "
                        f"missing (first: {', '.join(missing[:3])}); config key train_seg.init: {scfg.init}")
    for name, target in expected.items():  # another width, or a head of another class count
        value = state.get(name)
        if value is not None and tuple(value.shape) != tuple(target.shape):
            raise UserError(f"{path}: entry '{name}' has shape {tuple(value.shape)} in the file but "
                            f"{tuple(target.shape)} in {described} (config key train_seg.init: {scfg.init})")


def network_record(cfg: Config) -> dict:
    scfg = cfg.train_seg
    return {"network": scfg.network, "num_classes": cfg.data.labels.num_classes,
            "aspp_rates": list(scfg.aspp_rates)}


def check_same_network(stage: StageLayout, cfg: Config) -> None:
    """A resumed run keeps the network its checkpoints hold (RUN/train_seg/network.json)."""
    record = network_record(cfg)
    if artifacts.exists(stage.network_record) and artifacts.exists(stage.latest):
        started = artifacts.read_json(stage.network_record)
        if started != record:
            raise UserError(
                f"config key train_seg.network: {record['network']} ({record['num_classes']} classes, ASPP "
                f"{record['aspp_rates']}) differs from the network whose checkpoints {stage.root} holds "
                f"({started['network']}, {started['num_classes']} classes, ASPP {started['aspp_rates']}); "
                "use a new --out, or the same settings to resume")


def prepare_seg(cfg: Config, out: str, train: Split, val: Split, init: str) -> SegInputs:
    """All of train-seg's own checks (exit code 2 on any), the slow label scan last; then the network
    record. `init`: the initial weights (`affinity.init_checkpoint`), empty for none."""
    stage = RunLayout.at(out).stage("train_seg")
    check_same_network(stage, cfg)
    if init:
        check_init_weights(init, cfg)
    validate = has_ground_truth(cfg, val)
    labels = seg_labels(cfg, out)
    seconds = check_labels(labels, train.root, train.names, cfg.data.labels)
    print(f"train_seg: learning from the {labels.kind} labels in {labels.folder} "
          f"({len(train.names)} checked in {seconds:.1f} s)")
    artifacts.write_json(stage.network_record, network_record(cfg))
    return SegInputs(labels, validate)
