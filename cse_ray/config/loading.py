"""Loading a config: YAML plus dotted overrides, coerced and validated completely before any work.

A typo in `train_cse.lr=-1` ends the command with exit code 2 and a message naming the key, before
Ray starts. The same checks run for configs rebuilt from dicts (Tune trials, checkpoints).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cse_ray import artifacts
from cse_ray.config.schema import Config, EvalConfig
from cse_ray.errors import UserError
from cse_ray.metrics import threshold_grid

# ------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults when path is None), apply `key=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = str(path) if artifacts.is_uri(path) else Path(path)  # RUN/config.yaml of a remote run
        if not artifacts.exists(path) or artifacts.is_dir(path):
            raise UserError(f"config file {path}: not found")
        try:
            raw = yaml.safe_load(artifacts.read_bytes(path).decode("utf-8")) or {}
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


PATH_KEYS = ("data.root", "data.sbd_root", "model.pretrained", "train_cse.classifier", "infer.checkpoint",
             "rw.checkpoint", "train_seg.labels_dir")
LIST_KEYS = ("data.train_list", "data.val_list", "data.infer_list", "rw.train_list", "rw.list",
             "train_seg.train_list")


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


def save_run_config(cfg: Config, out: str) -> str:
    """Check that `out` can be written, then save the resolved config (paths made absolute) there.

    Every command that writes a run calls this once its input is validated and before any work, so
    a run directory explains itself and `cse-ray <stage> --config RUN_DIR/config.yaml` repeats it.
    Returns RUN_DIR/config.yaml.
    """
    from cse_ray.layout import RunLayout

    artifacts.check_storage(out)
    path = RunLayout.at(out).config
    artifacts.write_text(path, dump_yaml(with_absolute_paths(cfg)))
    return path


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
        value = _coerce(value, hint, dotted, may_be_empty=fields[key].default == ())
        _check_range(value, fields[key].metadata, dotted)
        values[key] = value
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, may_be_empty: bool = False) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            if not value and not may_be_empty:
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
    if cfg.train_aff.crop % 8:
        raise UserError(f"config key train_aff.crop: {cfg.train_aff.crop} is not a multiple of 8 "
                        "(AffinityNet's stride; psa: 448)")
    if min(cfg.train_seg.aspp_rates, default=0) < 1:
        raise UserError(f"config key train_seg.aspp_rates: need one or more dilations >= 1, got "
                        f"{list(cfg.train_seg.aspp_rates)}")
    if not cfg.predict.scales or min(cfg.predict.scales) <= 0:
        raise UserError(f"config key predict.scales: need one or more scales > 0, "
                        f"got {list(cfg.predict.scales)}")
    for stage in ("train_cam", "train_cse", "train_aff", "train_seg"):
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
        if not t.head_dropout < 1.0:
            raise UserError(f"config key {stage}.head_dropout: {t.head_dropout} is outside [0, 1)")
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
