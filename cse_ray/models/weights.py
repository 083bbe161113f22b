"""Loading psa / OC-CSE checkpoints and the ImageNet MXNet weights into a ResNet-38d.

Two kinds of files arrive: torch checkpoints (psa's `od_cam.pth`, OC-CSE's epoch checkpoints: a state
dict, maybe wrapped in `{"state_dict": ...}` or `{"model": ...}`, maybe with DataParallel's `module.`
prefix) and MXNet `.params` (`resnet_38d.params` from ademxapp, the reference's ImageNet start). The
format is recognised from the file's first bytes, not its extension.

Strict loading means: every model entry is in the file and every file entry has a place in the model,
with two tolerated gaps: `num_batches_tracked` counters (absent from old torch and from MXNet files,
and harmless) and, when the file is a backbone-only file, the model's head (`fc8` for the classifier,
`f8_3`/`f8_4`/`f8_5`/`f9` for AffinityNet: the model's `head_names`), which then keeps its fresh
initialisation, as the reference does when it starts from ImageNet. A shape mismatch is always an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cse_ray import artifacts
from cse_ray.artifacts import atomic_open
from cse_ray.errors import UserError
from cse_ray.models.mxnet_params import is_mxnet_params, read_mxnet_params
from cse_ray.models.resnet38d import HEAD_NAME

_BN_MX_TO_TORCH = {
    "gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
}
_BN_TORCH_TO_MX = {value: key for key, value in _BN_MX_TO_TORCH.items()}
_MX_BLOCK = re.compile(r"^(res|bn)(\d+)(a|b\d+)_branch(1|2a|2b1|2b2)_(\w+)$")
_TORCH_BLOCK = re.compile(r"^b(\d+)(?:_(\d+))?\.(conv|bn)_branch(1|2a|2b1|2b2)\.(\w+)$")
_DROPPED_MX_PREFIXES = ("linear1000",)  # ImageNet classifier: no place in the CAM network
_COUNTER = "num_batches_tracked"
_LISTED = 8  # names shown in an error message before "..."


@dataclass(frozen=True)
class LoadReport:
    """What a load or a conversion did: entries taken, model entries missing, file entries unused."""

    source: str
    file_format: str  # "torch" or "mxnet"
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unused: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unused

    def __str__(self) -> str:
        lines = [f"{self.source} ({self.file_format}): {len(self.loaded)} entries loaded"]
        named = [name for name in self.missing if not name.endswith(_COUNTER)]
        counters = len(self.missing) - len(named)
        if named:
            lines.append(f"  not in the file ({len(named)}): {_listing(named)}")
        if counters:
            lines.append(f"  not in the file: {counters} BatchNorm {_COUNTER} counters (harmless)")
        if self.unused:
            lines.append(f"  unused file entries ({len(self.unused)}): {_listing(self.unused)}")
        return "\n".join(lines)


def _listing(names: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (", ..." if len(names) > _LISTED else "")


# ------------------------------------------------------------------------------------------ name mapping


def mxnet_to_torch_name(name: str) -> str | None:
    """psa's renaming of ademxapp's ResNet-38d names; None for entries with no place in the network.

    `arg:res4b2_branch2a_weight` -> `b4_2.conv_branch2a.weight`; `aux:bn5b1_branch2b1_moving_var` ->
    `b5_1.bn_branch2b1.running_var`; `bn7_gamma` -> `bn7.weight`; `linear1000_*` and unknown names -> None.
    """
    name = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("bn7_"):
        leaf = _BN_MX_TO_TORCH.get(name[len("bn7_"):])
        return None if leaf is None else f"bn7.{leaf}"
    match = _MX_BLOCK.match(name)
    if match is None:
        return None
    kind, stage, position, branch, leaf = match.groups()
    block = f"b{stage}" if position == "a" else f"b{stage}_{position[1:]}"
    if kind == "res":
        return f"{block}.conv_branch{branch}.weight" if leaf == "weight" else None
    torch_leaf = _BN_MX_TO_TORCH.get(leaf)
    return None if torch_leaf is None else f"{block}.bn_branch{branch}.{torch_leaf}"


def torch_to_mxnet_name(name: str) -> str | None:
    """The inverse of `mxnet_to_torch_name`, with ademxapp's `arg:`/`aux:` prefixes (for tests/tools).

    None for entries an ImageNet MXNet file does not hold (`fc8.*`, `num_batches_tracked`).
    """
    if name == "conv1a.weight":
        return "arg:conv1a_weight"
    if name.startswith("bn7."):
        leaf = _BN_TORCH_TO_MX.get(name[len("bn7."):])
        return None if leaf is None else _mx_prefix(leaf) + f"bn7_{leaf}"
    match = _TORCH_BLOCK.match(name)
    if match is None:
        return None
    stage, index, kind, branch, leaf = match.groups()
    position = "a" if index is None else f"b{index}"
    if kind == "conv":
        return f"arg:res{stage}{position}_branch{branch}_weight" if leaf == "weight" else None
    mx_leaf = _BN_TORCH_TO_MX.get(leaf)
    return None if mx_leaf is None else _mx_prefix(mx_leaf) + f"bn{stage}{position}_branch{branch}_{mx_leaf}"


def _mx_prefix(leaf: str) -> str:
    return "aux:" if leaf.startswith("moving_") else "arg:"


# ------------------------------------------------------------------------------------------------ reading


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(state dict in the network's names, "torch" | "mxnet", file entries deliberately left out).

    MXNet entries are renamed as psa does; the ImageNet classifier (`linear1000`) is left out, and
    any name the mapping does not know keeps its file name, so it shows up as unused.
    """
    path = str(path)
    if artifacts.is_uri(path):  # a checkpoint on s3:// or gs:// (a remote --out): read a local copy
        if not artifacts.exists(path):
            raise UserError(f"{path}: weights file not found")
        with artifacts.local_copy(path) as local:
            try:
                return read_weights(local)
            except UserError as err:
                raise UserError(str(err).replace(local, path)) from None
    if not Path(path).is_file():
        raise UserError(f"{path}: weights file not found")
    if is_mxnet_params(path):
        state: dict[str, torch.Tensor] = {}
        ignored = []
        for raw_name, array in read_mxnet_params(path).items():
            bare = raw_name.split(":", 1)[1] if raw_name.startswith(("arg:", "aux:")) else raw_name
            if bare.startswith(_DROPPED_MX_PREFIXES):
                ignored.append(raw_name)
                continue
            state[mxnet_to_torch_name(raw_name) or raw_name] = torch.from_numpy(array)
        return state, "mxnet", ignored
    return _read_torch_checkpoint(path), "torch", []


def _read_torch_checkpoint(path: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{path}: not a readable torch checkpoint or MXNet .params file ({first_line})"
        ) from error
    state = loaded
    if isinstance(loaded, dict) and not _is_state_dict(loaded):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                state = loaded[key]
                break
    if not isinstance(state, dict) or not _is_state_dict(state):
        keys = sorted(str(k) for k in loaded)[:_LISTED] if isinstance(loaded, dict) else type(loaded).__name__
        raise UserError(f"{path}: no state dict of tensors found (top level: {keys})")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def _is_state_dict(mapping: dict) -> bool:
    return bool(mapping) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in mapping.items()
    )


# ------------------------------------------------------------------------------------------------ loading


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel / DataParallel wrapper (layer names are its own)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _match(
    model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str
) -> tuple[list[str], list[str], list[str]]:
    """(loaded, missing, unused) names; a shape mismatch is a UserError."""
    for name, value in state.items():
        target = model_state.get(name)
        if target is not None and tuple(target.shape) != tuple(value.shape):
            raise UserError(
                f"{path}: entry '{name}' has shape {tuple(value.shape)} in the file "
                f"but {tuple(target.shape)} in the model"
            )
    loaded = [name for name in model_state if name in state]
    missing = [name for name in model_state if name not in state]
    unused = [name for name in state if name not in model_state]
    return loaded, missing, unused


def load_weights(
    model: nn.Module, path: str | Path, strict: bool = True, require_head: bool | None = None
) -> LoadReport:
    """Load a psa/OC-CSE `.pth` or an MXNet `.params` into `model` (on whatever device it lives).

    strict: every model entry must come from the file and every file entry must be used, except
    `num_batches_tracked` counters and, unless `require_head`, the head (`fc8`, or AffinityNet's
    `head_names`) when the file has none of it. require_head defaults to True for torch checkpoints
    (a trained network must bring its head) and False for MXNet files (ImageNet backbones never have
    one); pass False to start from a converted ImageNet `.pth`. Non-strict loads whatever matches and
    reports the rest (e.g. AffinityNet from a classifier checkpoint: `fc8` unused, the heads fresh).
    """
    path = str(path)
    state, file_format, ignored = read_weights(path)
    target = unwrap(model)
    model_state = target.state_dict()
    loaded, missing, unused = _match(model_state, state, path)
    if strict:
        if require_head is None:
            require_head = file_format == "torch"
        heads = tuple(head + "." for head in getattr(target, "head_names", (HEAD_NAME,)))
        head_in_file = any(name.startswith(heads) for name in state)
        tolerated = [
            name for name in missing
            if name.endswith(_COUNTER) or (not require_head and not head_in_file and name.startswith(heads))
        ]
        required_missing = [name for name in missing if name not in tolerated]
        if required_missing or unused:
            problems = []
            if required_missing:
                problems.append(f"missing {len(required_missing)} entries ({_listing(required_missing)})")
            if unused:
                problems.append(f"{len(unused)} entries the model does not have ({_listing(unused)})")
            raise UserError(
                f"{path}: does not match {type(target).__name__} strictly: {'; '.join(problems)}"
            )
    target.load_state_dict({name: state[name] for name in loaded}, strict=False)
    return LoadReport(path, file_format, tuple(loaded), tuple(missing), tuple(ignored + unused))


def convert_weights(src: str | Path, dst: str | Path, model_name: str = "resnet38d") -> LoadReport:
    """Write `src` (MXNet `.params` or a wrapped/DataParallel checkpoint) as a plain torch state dict.

    Names and shapes are checked against `model_name`; only the entries the model has are written
    (a partial file, such as an ImageNet backbone without `fc8`, is fine: the report lists the gaps).
    """
    from cse_ray.models import build_classifier

    src = str(src)
    state, file_format, ignored = read_weights(src)
    head = state.get(f"{HEAD_NAME}.weight")
    options = {} if head is None else {"num_classes": int(head.shape[0])}
    with torch.device("meta"):  # only names and shapes are needed: no memory, no initialisation cost
        model = build_classifier(model_name, **options)
    loaded, missing, unused = _match(model.state_dict(), state, src)
    plain = {name: state[name].contiguous() for name in loaded}
    with atomic_open(dst, "wb") as handle:
        torch.save(plain, handle)
    return LoadReport(src, file_format, tuple(loaded), tuple(missing), tuple(ignored + unused))
