"""`tune.space`: which config keys a sweep varies and how, checked before Ray starts.

Each searched key is a dotted config key with one spec: `{grid: [...]}`, `{choice: [...]}`,
`{uniform: [lo, hi]}` or `{loguniform: [lo, hi]}`. Every value (both bounds of a range) is validated
like the config itself, so a bad value ends the command with exit code 2 before any work. Only
`domain()` needs Ray Tune, and imports it when called.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from cse_ray.config import Config, with_overrides
from cse_ray.errors import UserError

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform")
DEFAULT_SPACE: dict[str, dict] = {
    # Around METHOD.md's defaults (w = 0.3 + 0.05 * epoch, lr 0.01).
    "train_cse.cc_init": {"uniform": [0.1, 0.6]},
    "train_cse.cc_slope": {"uniform": [0.0, 0.1]},
    "train_cse.lr": {"loguniform": [0.003, 0.03]},
}
# Keys a trial cannot meaningfully vary, and why.
FIXED_KEYS = {
    "tune": "the sweep's own settings",
    "data": "the data set is prepared once, before the sweep, and shared by every trial",
    "train_cam": "the ordinary classifier is trained once, before the sweep",
    "model.backbone": "every trial must use the backbone of the shared classifier",
    "train_cse.classifier": "the classifier is shared by every trial (set it outside tune.space)",
    "infer": "trials do not run inference; the best threshold is searched after the sweep",
    "crf": "trials do not run the CRF; the best alpha is searched after the sweep",
}


@dataclass(frozen=True)
class SpaceEntry:
    """One searched key: `kind` is one of SPEC_KINDS, `values` the list (grid/choice) or [lo, hi]."""

    key: str
    kind: str
    values: tuple

    def spec(self) -> dict:
        return {self.kind: list(self.values)}


def parse_space(cfg: Config) -> dict[str, SpaceEntry]:
    """Validate `tune.space` (or the default space when it is empty) without starting Ray.

    Accepts flat dotted keys (`train_cse.lr: {loguniform: [0.01, 0.1]}`) and nested sections, which is
    what the command line override `tune.space.train_cse.lr='{choice: [0.01, 0.05]}'` produces.
    """
    raw = cfg.tune.space or DEFAULT_SPACE
    flat: dict[str, Any] = {}
    _flatten_space(raw, "", flat)
    if not flat:
        raise UserError("config key tune.space: no key to search")
    entries = {}
    for key, spec in flat.items():
        entries[key] = _parse_entry(cfg, key, spec)
    if cfg.tune.search_alg == "optuna":
        for entry in entries.values():
            if entry.kind == "grid":
                raise UserError(f"config key tune.space.{entry.key}: grid is not supported with "
                                "tune.search_alg: optuna (use choice)")
            if entry.kind == "choice" and not all(_is_scalar(v) for v in entry.values):
                raise UserError(f"config key tune.space.{entry.key}: with tune.search_alg: optuna the "
                                "choices must be single values (numbers, strings, booleans)")
    return entries


def domain(entry: SpaceEntry):
    """The Ray Tune search-space object of one entry (integers sample integers)."""
    from ray import tune

    if entry.kind == "grid":
        return tune.grid_search(list(entry.values))
    if entry.kind == "choice":
        return tune.choice(list(entry.values))
    lo, hi = entry.values
    if isinstance(lo, int):
        return tune.randint(lo, hi + 1) if entry.kind == "uniform" else tune.lograndint(lo, hi + 1)
    return tune.uniform(lo, hi) if entry.kind == "uniform" else tune.loguniform(lo, hi)


def _flatten_space(node: Any, prefix: str, flat: dict) -> None:
    """Dotted key -> spec; a mapping under a config *section* is a nested part of the space."""
    if not isinstance(node, dict):
        where = f".{prefix.rstrip('.')}" if prefix else ""
        raise UserError(f"config key tune.space{where}: expected a mapping of dotted config keys to specs "
                        f"such as {{choice: [0.1, 0.3]}}, got {node!r}")
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        is_spec = isinstance(value, dict) and any(kind in value for kind in SPEC_KINDS)
        if isinstance(value, dict) and not is_spec and _is_section(dotted):
            _flatten_space(value, dotted + ".", flat)
        else:
            flat[dotted] = value


def _is_section(key: str) -> bool:
    node: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return False
        node = hints[part]
    return dataclasses.is_dataclass(node)


def _parse_entry(cfg: Config, key: str, spec: Any) -> SpaceEntry:
    name = f"tune.space.{key}"
    field_type = _leaf_type(key, name)
    for fixed, why in FIXED_KEYS.items():
        if key == fixed or key.startswith(fixed + "."):
            raise UserError(f"config key {name}: cannot be searched ({why})")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise UserError(f"config key {name}: expected exactly one of {{grid: [...]}}, {{choice: [...]}}, "
                        f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UserError(f"config key {name}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        for value in values:
            _check_value(cfg, key, value, name)
        return SpaceEntry(key, kind, tuple(values))
    if field_type not in (int, float):
        raise UserError(f"config key {name}: {kind} needs a numeric key; use choice or grid for {key}")
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise UserError(f"config key {name}: {kind} needs two numbers [lo, hi], got {values!r}")
    lo, hi = values
    if field_type is int and not all(float(v).is_integer() for v in values):
        raise UserError(f"config key {name}: {key} is an integer; {kind} needs integer bounds, "
                        f"got {values!r}")
    if not lo < hi:
        raise UserError(f"config key {name}: {kind} needs lo < hi, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise UserError(f"config key {name}: loguniform needs lo > 0, got {values!r}")
    for bound in (lo, hi):
        _check_value(cfg, key, field_type(bound), name)
    return SpaceEntry(key, kind, (field_type(lo), field_type(hi)))


def _leaf_type(key: str, name: str) -> type:
    """The annotated type of a dotted config key; UserError when it is not a key or is a section."""
    node: Any = Config
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            raise UserError(f"config key {name}: {key} is not a config key")
        hints = typing.get_type_hints(node)
        if part not in hints:
            known = ", ".join(hints)
            raise UserError(f"config key {name}: unknown key {part!r} (known here: {known})")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise UserError(f"config key {name}: {key} is a section, not a single key")
    return node


def _check_value(cfg: Config, key: str, value: Any, name: str) -> None:
    try:
        with_overrides(cfg, {key: value})
    except UserError as err:
        raise UserError(f"config key {name}: value {value!r} is refused ({err})") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
