"""The driver of a training stage: check every input before Ray starts, then run a `TorchTrainer`.

`train_cam` trains the ordinary classifier, `train_cse` the eraser against it, `train_both` one after
the other; `train_aff` AffinityNet, `train_seg` the segmentation network on pseudo-labels. Running the
same command again resumes from the latest checkpoint (Ray Train restores the run with the same storage
path and name), and on a finished run it only says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from cse_ray import artifacts
from cse_ray.config import (
    Config,
    TrainCamConfig,
    save_run_config,
    to_dict,
    with_absolute_paths,
    with_overrides,
)
from cse_ray.data.prepare import Split, load_split, resolve_data_root
from cse_ray.errors import RunFailed, UserError
from cse_ray.layout import RunLayout, StageLayout
from cse_ray.models import check_backbone, check_segmenter
from cse_ray.train.affinity import check_confident_labels, init_checkpoint, train_aff_loop_per_worker
from cse_ray.train.faults import FaultHooks
from cse_ray.train.loop import train_loop_per_worker
from cse_ray.train.segmentation import train_seg_loop_per_worker
from cse_ray.train.segmentation_plan import SegInputs, prepare_seg

LOOPS = {"train_aff": train_aff_loop_per_worker, "train_seg": train_seg_loop_per_worker}
"""The per-worker function of each stage that is not a CAM stage (those run `train_loop_per_worker`)."""
METRICS = {"train_aff": "validation pair F1 (affinity)", "train_seg": "validation mIoU"}


def train_cam(cfg: Config, out: str) -> dict:
    """Train the ordinary CAM classifier; returns the run summary (kept epoch, mIoU, paths)."""
    return fit_stage("train_cam", cfg, out)


def train_cse(cfg: Config, out: str) -> dict:
    """Train the eraser against the frozen classifier (`train_cse.classifier` or OUT/train_cam)."""
    return fit_stage("train_cse", cfg, out)


def train_aff(cfg: Config, out: str) -> dict:
    """Train AffinityNet on the confident labels of `cse-ray aff-labels` (RUN/aff_labels/confident)."""
    return fit_stage("train_aff", cfg, out)


def train_seg(cfg: Config, out: str) -> dict:
    """Train the segmentation network on pseudo-labels (`train_seg.labels`: RUN/rw/ or RUN/pseudo_labels/,
    or `train_seg.labels_dir`); result.json says which labels it learnt from."""
    return fit_stage("train_seg", cfg, out)


def train_both(cfg: Config, out: str) -> dict:
    """`jobs/train.py`: train-cam then train-cse, or only train-cse when a classifier is given."""
    if not cfg.train_cse.classifier:
        train_cam(cfg, out)
    return train_cse(cfg, out)


def classifier_checkpoint(cfg: Config, out: str) -> str:
    """The frozen classifier of train_cse: `train_cse.classifier`, else this run's train_cam model."""
    return cfg.train_cse.classifier or RunLayout.at(out).stage("train_cam").model


@dataclass(frozen=True)
class StageInputs:
    """What the workers need, checked by the driver: plain data, cheap to ship."""

    stage: str
    config: dict
    out: str  # absolute (or a URI)
    train: Split
    val: Split
    classifier: str = ""
    classifier_sha256: str = ""  # checkpoints reference the frozen classifier, never copy it
    faults: FaultHooks = FaultHooks()  # test-only (cse_ray.train.faults)
    progress_bar: bool = False  # only when the driver prints to a terminal; logs get plain lines
    seg: SegInputs | None = None  # train_seg's labels and whether it validates


def prepare_stage(stage: str, cfg: Config, out: str) -> StageInputs:
    """All checks that can fail on bad input, before Ray starts (exit code 2 on any of them)."""
    if stage == "train_aff" and cfg.rw.train_list:  # the images that have confident labels
        cfg = with_overrides(cfg, {"data.train_list": cfg.rw.train_list})
    if stage == "train_seg":  # the images that have pseudo-labels
        cfg = with_overrides(cfg, {"data.train_list": cfg.train_seg.train_list or cfg.data.infer_list})
        check_segmenter(cfg.train_seg.network)
    scfg: TrainCamConfig = getattr(cfg, stage)
    check_backbone(cfg.model.backbone)
    root = resolve_data_root(cfg, out)
    train = load_split(cfg, root, "train_list")
    val = load_split(cfg, root, "val_list", need_masks=stage != "train_seg")  # train_seg: when it has them
    if len(train.names) < scfg.batch_size:
        raise UserError(
            f"config key {stage}.batch_size: {scfg.batch_size} is more than the {len(train.names)} "
            f"images of data.train_list"
        )
    if cfg.model.pretrained and not artifacts.exists(cfg.model.pretrained):
        raise UserError(f"config key model.pretrained: {cfg.model.pretrained} not found")
    classifier = classifier_sha256 = ""
    if stage == "train_cse":
        check_every_image_has_a_class(train)
        classifier = classifier_checkpoint(cfg, out)
        if not artifacts.exists(classifier):
            raise UserError(
                f"config key train_cse.classifier: {classifier} not found "
                "(run train-cam first, or give a classifier checkpoint such as psa's od_cam.pth)"
            )
        classifier_sha256 = check_same_classifier(RunLayout.at(out).stage("train_cse"), classifier)
    if stage == "train_aff":  # `classifier` holds the weights AffinityNet starts from
        check_confident_labels(out, train.names)
        classifier = init_checkpoint(cfg, out)
        classifier_sha256 = artifacts.file_sha256(classifier) if classifier else ""
    seg = None
    if stage == "train_seg":  # `classifier` holds the weights the backbone starts from
        classifier = init_checkpoint(cfg, out, "train_seg")
        seg = prepare_seg(cfg, out, train, val, classifier)
        classifier_sha256 = artifacts.file_sha256(classifier) if classifier else ""
    return StageInputs(stage, to_dict(cfg), out, train, val, classifier, classifier_sha256,
                       FaultHooks.from_env(), progress_bar=sys.stderr.isatty(), seg=seg)


def check_every_image_has_a_class(train: Split) -> None:
    """The eraser erases one present class per image: an image without any cannot be trained on."""
    empty = [name for name in train.names if not train.labels[name].any()]
    if empty:
        raise UserError(f"config key data.train_list: {len(empty)} of {len(train.names)} images have no "
                        f"foreground class (first: {empty[0]}); train-cse erases one present class per "
                        "image: leave them out of the list")


def check_same_classifier(stage: StageLayout, classifier: str) -> str:
    """A resumed eraser must keep training against the classifier it started with; returns its sha256.

    The first run records the classifier (path and sha256) in RUN/train_cse/classifier.json.
    """
    digest = artifacts.file_sha256(classifier)
    if artifacts.exists(stage.classifier_record):
        record = artifacts.read_json(stage.classifier_record)
        if record["sha256"] != digest:
            raise UserError(
                f"config key train_cse.classifier: {classifier} differs from the classifier this run "
                f"started with ({record['path']}, sha256 {record['sha256'][:12]}); use a new --out"
            )
    else:
        artifacts.write_json(stage.classifier_record, {"path": str(classifier), "sha256": digest})
    return digest


def fit_stage(stage: str, cfg: Config, out: str, callbacks: tuple = (),
              resources_per_worker: dict[str, float] | None = None) -> dict:
    """Run one training stage on Ray Train, or report that it already finished.

    `resources_per_worker` overrides the config's CPU/GPU per worker (Tune trials pass fractions).
    """
    cfg = with_absolute_paths(cfg)  # Ray workers run in other directories
    layout = RunLayout.at(out)
    out, paths = layout.root, layout.stage(stage)
    artifacts.check_storage(out)  # before the classifier record or anything else is read or written
    if artifacts.exists(paths.result):
        summary = artifacts.read_json(paths.result)
        print(f"{stage}: already finished in {out} (kept epoch {summary['best_epoch']}, "
              f"mIoU {_number(summary['best_miou'])}); nothing to do")
        return summary
    inputs = prepare_stage(stage, cfg, out)
    save_run_config(cfg, out)
    scfg: TrainCamConfig = getattr(cfg, stage)

    import ray.train
    from ray.train.torch import TorchTrainer

    from cse_ray.runtime import ensure_ray, resolve_use_gpu

    ensure_ray()
    if resources_per_worker is None:
        use_gpu = resolve_use_gpu(scfg.use_gpu, f"{stage}.use_gpu")
        resources_per_worker = {"CPU": scfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    else:
        use_gpu = resources_per_worker.get("GPU", 0) > 0
    artifacts.remove(paths.failed)  # a diverged earlier attempt; this one starts from its last checkpoint
    trainer = TorchTrainer(
        LOOPS.get(stage, train_loop_per_worker),
        train_loop_config={"inputs": inputs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=stage,
            storage_path=paths.storage,
            failure_config=ray.train.FailureConfig(max_failures=scfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    print(f"{stage}: {scfg.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, "
          f"{len(inputs.train.names)} training images, {scfg.epochs} epochs")
    trainer.fit()
    if artifacts.exists(paths.failed):
        raise RunFailed(artifacts.read_json(paths.failed)["message"])
    summary = artifacts.read_json(paths.result)
    threshold = summary["best_threshold"]
    print(
        f"{stage}: done. kept epoch {summary['best_epoch']} ({scfg.keep}) with "
        f"{METRICS.get(stage, 'validation CAM mIoU')} {_number(summary['best_miou'])}"
        f"{'' if threshold is None else f' (threshold {threshold:.2f})'}; "
        f"model {summary['model']}; checkpoints under {summary['checkpoints']}"
    )
    return summary


def _number(value: float | None) -> str:
    """A metric of result.json for a line: None (train_seg without ground truth) is "none"."""
    return "none" if value is None else f"{value:.2f}"
