"""Typed run configuration: one frozen dataclass per stage, loaded from YAML plus dotted overrides.

A config is validated completely (unknown keys, types, ranges) before any work starts, so a typo in
`train_cse.lr=-1` ends the command with exit code 2 and a message naming the key, before Ray starts.
Defaults are the paper's settings (METHOD.md); `configs/*.yaml` only list what differs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cse_ray import artifacts
from cse_ray.errors import UserError
from cse_ray.labels import LABEL_SPACES, LabelSpace, label_space
from cse_ray.metrics import threshold_grid

# ---------------------------------------------------------------------------------------------- stages


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class SynthConfig:
    """The embedded synthetic dataset (`cse-ray synth`); generated into `data.root` when enabled."""

    enabled: bool = False
    train: int = field(default=200, metadata=_range(1))
    val: int = field(default=50, metadata=_range(1))
    size: int = field(default=128, metadata=_range(32))
    seed: int = field(default=0, metadata=_range(0))
    part_strength: float = field(default=1.0, metadata=_range(0.0, 1.0))
    body_strength: float = field(default=0.8, metadata=_range(0.0, 1.0))
    body_texture: str = field(default="class", metadata=_choices("class", "family"))


@dataclass(frozen=True)
class DataConfig:
    """Where the VOC-layout dataset is and which lists each stage reads."""

    dataset: str = field(default="voc", metadata=_choices(*LABEL_SPACES))  # what the class indices mean
    root: str = ""  # VOC root; empty with synth.enabled -> RUN_DIR/data
    sbd_root: str = ""  # optional SBD (SegmentationClassAug) root
    train_list: str = "train"  # a name under ImageSets/Segmentation, or a path
    val_list: str = "val"  # per-epoch validation and the final CAM evaluation
    infer_list: str = "train"  # images that get pseudo-labels
    synth: SynthConfig = field(default_factory=SynthConfig)

    @property
    def labels(self) -> LabelSpace:
        """The dataset's classes: every stage takes the class count and names from here."""
        return label_space(self.dataset)


@dataclass(frozen=True)
class ModelConfig:
    """The network shared by both stages (METHOD.md: same architecture for OC and eraser)."""

    backbone: str = "resnet38d"  # or resnet38d_small / resnet38d_tiny / resnet38d_tiny_undilated for CPU
    pretrained: str = ""  # ImageNet weights (.params or .pth); empty = random init


@dataclass(frozen=True)
class TrainCamConfig:
    """The ordinary classifier (psa's train_cls recipe)."""

    epochs: int = field(default=15, metadata=_range(1))
    batch_size: int = field(default=16, metadata=_range(1))  # global: per-worker batch x workers
    lr: float = field(default=0.1, metadata=_range(0.0))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0))
    momentum_mode: str = field(default="faithful", metadata=_choices("faithful", "fixed"))
    crop: int = field(default=448, metadata=_range(16))
    resize_long: tuple[int, int] = (256, 448)
    jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, saturation, hue
    dropout: tuple[float, float] = (0.2, 0.2)  # b6, b7
    # "reference": conv1a, b2* and every BatchNorm frozen (psa/OC-CSE, needs pretrained weights);
    # "none": everything trains (for networks trained from scratch, e.g. on the synthetic set).
    freeze: str = field(default="reference", metadata=_choices("reference", "none"))
    num_workers: int = field(default=1, metadata=_range(1))  # Ray Train workers
    cpus_per_worker: int = field(default=1, metadata=_range(1))
    use_gpu: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    bf16: bool = False
    loader_workers: int = field(default=0, metadata=_range(0))
    seed: int = field(default=4242, metadata=_range(0))
    log_every: int = field(default=20, metadata=_range(1))
    max_failures: int = field(default=2, metadata=_range(0))
    val_scales: tuple[float, ...] = (1.0,)  # CAM scales for the per-epoch validation
    val_images: int = field(default=0, metadata=_range(0))  # 0 = the whole validation list
    # Which epoch's weights become model.pth: psa's train_cls keeps the last, OC-CSE the best by val mIoU.
    keep: str = field(default="last", metadata=_choices("last", "best"))


@dataclass(frozen=True)
class TrainCseConfig(TrainCamConfig):
    """The eraser against the frozen ordinary classifier (METHOD.md defaults)."""

    lr: float = field(default=0.01, metadata=_range(0.0))
    batch_size: int = field(default=8, metadata=_range(1))
    crop: int = field(default=384, metadata=_range(16))
    dropout: tuple[float, float] = (0.3, 0.5)
    cc_init: float = field(default=0.3, metadata=_range(0.0))
    cc_slope: float = field(default=0.05, metadata=_range(0.0))
    mask_norm: str = field(default="batch", metadata=_choices("batch", "image"))
    init: str = field(default="pretrained", metadata=_choices("pretrained", "classifier"))
    keep: str = field(default="best", metadata=_choices("last", "best"))
    classifier: str = ""  # frozen classifier checkpoint; empty = this run's train_cam result


@dataclass(frozen=True)
class InferConfig:
    """Multi-scale CAM inference on a pool of Ray actors."""

    checkpoint: str = ""  # empty = OUT/train_cse/model.pth (the eraser trained with the same --out)
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    num_actors: int = field(default=1, metadata=_range(1))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_actor: float = field(default=1.0, metadata=_range(0.0))  # used when the cluster has GPUs
    max_in_flight: int = field(default=8, metadata=_range(1))
    bf16: bool = False
    threshold: float = field(default=-1.0, metadata=_range(-1.0, 1.0))  # -1 = best threshold from eval
    save_seed: bool = False  # also write the reference's .npy dicts
    overlays: int = field(default=0, metadata=_range(0))  # CAM overlay PNGs for the first N images
    max_restarts: int = field(default=2, metadata=_range(0))
    use_gpu: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    # Extra Ray resources each CAM actor asks for, e.g. {cam: 0.01} to keep them on the GPU nodes
    # of cluster.yaml (docs/CLUSTER.md); empty on one machine.
    cam_resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF refinement (psa parameters) as Ray CPU tasks."""

    enabled: bool = True
    alphas: tuple[float, ...] = (6.0, 10.0, 24.0)
    pseudo_from: str = field(default="crf", metadata=_choices("crf", "cam"))
    pseudo_alpha: float = field(default=-1.0, metadata=_range(-1.0))  # -1 = best alpha from eval
    iterations: int = field(default=10, metadata=_range(1))
    gauss_sxy: float = field(default=3.0, metadata=_range(0.0, lo_open=True))
    gauss_compat: float = field(default=3.0, metadata=_range(0.0))
    bilateral_sxy: float = field(default=80.0, metadata=_range(0.0, lo_open=True))
    bilateral_srgb: float = field(default=13.0, metadata=_range(0.0, lo_open=True))
    bilateral_compat: float = field(default=10.0, metadata=_range(0.0))
    cpus_per_task: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    # Extra Ray resources each CRF (and pseudo-label) task asks for, e.g. {crf: 0.01} for the CPU
    # nodes of cluster.yaml; empty on one machine.
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvalConfig:
    """Background-threshold search for CAM mIoU (the reference sweeps 0.10..0.39)."""

    threshold_start: float = field(default=0.10, metadata=_range(0.0, 1.0))
    threshold_stop: float = field(default=0.39, metadata=_range(0.0, 1.0))
    threshold_step: float = field(default=0.01, metadata=_range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over train_cse keys (any config key can be searched)."""

    num_samples: int = field(default=4, metadata=_range(1))
    max_concurrent_trials: int = field(default=0, metadata=_range(0))  # 0 = as resources allow
    cpus_per_trial: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_trial: float = field(default=0.0, metadata=_range(0.0))
    scheduler: str = field(default="asha", metadata=_choices("asha", "none"))
    grace_period: int = field(default=1, metadata=_range(1))
    reduction_factor: float = field(default=2.0, metadata=_range(1.0, lo_open=True))
    search_alg: str = field(default="random", metadata=_choices("random", "optuna"))
    seed: int = field(default=0, metadata=_range(0))
    space: dict = field(default_factory=dict)  # dotted key -> {grid|choice|uniform|loguniform: ...}


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_cam: TrainCamConfig = field(default_factory=TrainCamConfig)
    train_cse: TrainCseConfig = field(default_factory=TrainCseConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# ------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults when path is None), apply `key=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path}: not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path}: the top level must be a mapping of stages")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. train_cse.lr=0.01")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value)
    return from_dict(raw)


def is_list_name(value: str | Path) -> bool:
    """A bare list name such as `train` (a file under ImageSets/Segmentation), not a path."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_\-]+", value) is not None


PATH_KEYS = ("data.root", "data.sbd_root", "model.pretrained", "train_cse.classifier", "infer.checkpoint")
LIST_KEYS = ("data.train_list", "data.val_list", "data.infer_list")


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its local file paths made absolute against the current directory.

    Commands call this on the driver, because Ray workers and actors run in other working directories:
    a relative `data.root` would name nothing there. List keys count as paths unless they are bare
    list names (`train`, `val`); URIs are left as they are.
    """
    values = {}
    for key in (*PATH_KEYS, *LIST_KEYS):
        value = get_dotted(cfg, key)
        if key in LIST_KEYS and is_list_name(value):
            continue
        absolute = artifacts.absolute(value)
        if absolute != value:
            values[key] = absolute
    return with_overrides(cfg, values) if values else cfg


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from plain nested dicts (YAML, Tune trials, checkpoints)."""
    return validate(_build(Config, raw, ""))


def to_dict(cfg: Any) -> dict:
    """Plain nested dicts and lists, suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted keys replaced (used by Tune trials), validated again."""
    raw = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(raw, key, value)
    return from_dict(raw)


def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config key {name}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(
            f"config key {prefix}{unknown[0]}: unknown key (known in {name}: {', '.join(fields)})"
        )
    values = {}
    for key, value in raw.items():
        dotted = prefix + key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, dotted + ".")
            continue
        value = _coerce(value, hint, dotted)
        _check_range(value, fields[key].metadata, dotted)
        values[key] = value
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            if not value:
                raise UserError(f"config key {key}: must not be empty")
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise UserError(f"config key {key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type for {key}")  # pragma: no cover - programming error
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key {key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config key {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, bool):
            return str(value).lower()  # use_gpu: true
        if isinstance(value, (str, int, float)):
            return str(value)
        raise UserError(f"config key {key}: expected a string, got {value!r}")
    if hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # pragma: no cover


def _check_range(value: Any, metadata: Any, key: str) -> None:
    if "choices" in metadata and value not in metadata["choices"]:
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(metadata['choices'])}")
    if "range" not in metadata:
        return
    lo, hi, lo_open = metadata["range"]
    for v in value if isinstance(value, tuple) else (value,):
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and v > hi
        if too_low or too_high:
            low = "-inf" if lo is None else lo
            high = "inf" if hi is None else hi
            bracket = "(" if lo_open else "["
            raise UserError(f"config key {key}: {v!r} is outside {bracket}{low}, {high}]")


# ----------------------------------------------------------------------------- cross-field checks


def validate(cfg: Config) -> Config:
    """Checks that involve more than one key (run by `from_dict`, so by every loader)."""
    for stage in ("train_cam", "train_cse"):
        t = getattr(cfg, stage)
        if t.batch_size % t.num_workers:
            raise UserError(
                f"config key {stage}.batch_size: {t.batch_size} is not divisible by "
                f"{stage}.num_workers={t.num_workers} (the batch is global)"
            )
        low, high = t.resize_long
        if not 16 <= low <= high:
            raise UserError(f"config key {stage}.resize_long: need 16 <= low <= high, got {t.resize_long}")
        if not all(0.0 <= j <= 1.0 for j in t.jitter) or t.jitter[3] > 0.5:
            raise UserError(f"config key {stage}.jitter: need values in [0, 1], hue <= 0.5; got {t.jitter}")
        for p in t.dropout:
            if not 0.0 <= p < 1.0:
                raise UserError(f"config key {stage}.dropout: {p} is outside [0, 1)")
    extra_resources = (("infer.cam_resources", cfg.infer.cam_resources), ("crf.resources", cfg.crf.resources))
    for key, mapping in extra_resources:
        for name, amount in mapping.items():
            if name in ("CPU", "GPU", "memory") or not isinstance(amount, (int, float)) or amount <= 0:
                raise UserError(
                    f"config key {key}.{name}: expected a custom resource name with a positive amount "
                    f"(CPU/GPU have their own keys), got {amount!r}"
                )
    e = cfg.evaluate
    if e.threshold_stop < e.threshold_start:
        raise UserError("config key evaluate.threshold_stop: must be >= evaluate.threshold_start")
    try:  # what evaluation would refuse is refused here, before any work
        thresholds(e)
    except UserError as err:  # start and stop are checked above and by their ranges: the step is left
        raise UserError(f"config key evaluate.threshold_step: {err}") from None
    if not cfg.data.root and not cfg.data.synth.enabled:
        raise UserError("config key data.root: empty, and data.synth.enabled is false (no dataset)")
    return cfg


def thresholds(cfg: EvalConfig) -> tuple[float, ...]:
    """The background thresholds to sweep: `metrics.threshold_grid` of the evaluate keys."""
    return tuple(threshold_grid(cfg.threshold_start, cfg.threshold_stop, cfg.threshold_step).tolist())
