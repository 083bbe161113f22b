"""Everything `run_infer` checks before Ray starts, gathered in a `Plan`.

A wrong checkpoint, list, alpha or threshold is a UserError here, in the driver, rather than an
actor failure minutes later. The checkpoint is loaded into the network once in the driver, so its
state dict reaches the actors through the object store (no shared file system needed for it).

`infer_settings.json` holds what the stored CAMs and CRF maps depend on (network, checkpoint
digest, scales, CRF parameters); resuming into a folder made with other settings is refused rather
than silently mixing two models' outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config, CrfConfig
from cse_ray.data.prepare import resolve_data_root
from cse_ray.errors import UserError
from cse_ray.labels import LabelSpace
from cse_ray.layout import InferLayout, RunLayout

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything validated before Ray starts."""

    layout: InferLayout
    root: str
    names: list[str]
    labels: dict[str, np.ndarray]
    label_space: LabelSpace
    backbone: str
    state: dict
    settings: dict
    scales: tuple[float, ...]
    alphas: tuple[float, ...]
    crf_enabled: bool
    crf_params: CrfConfig
    save_seed: bool
    overlays: int
    pseudo_source: str | None  # None: pseudo-labels are not written by this run
    pseudo_value: float | None

    def expected(self, index: int, name: str) -> list[str]:
        """Every output (but the pseudo-label) the image needs to count as complete, relative paths."""
        layout = self.layout
        paths = [layout.cam_rel(name)]
        if self.save_seed:
            paths.append(layout.cam_seed_rel(name))
        for alpha in self.alphas:
            paths.append(layout.crf_rel(alpha, name))
            if self.save_seed:
                paths.append(layout.crf_seed_rel(alpha, name))
        if index < self.overlays:
            paths.append(layout.overlay_rel(name))
        return paths

    def class_names(self, name: str) -> list[str]:
        """The names of the classes present in the image-level label of `name`."""
        return [self.label_space.class_names[int(k)] for k in np.flatnonzero(self.labels[name] > 1e-5)]


def resolve_pseudo(cfg: Config, write_pseudo: bool,
                   alphas: tuple[float, ...]) -> tuple[str | None, float | None]:
    """(source, value) of the pseudo-labels this run writes: ("crf", alpha), ("cam", threshold) or none."""
    crf = cfg.crf
    if crf.pseudo_from == "crf" and crf.pseudo_alpha != -1 and crf.pseudo_alpha not in alphas:
        raise UserError(
            f"config key crf.pseudo_alpha: {crf.pseudo_alpha:g} is not one of crf.alphas "
            f"({', '.join(f'{a:g}' for a in alphas)})"
        )
    if not write_pseudo:
        return None, None
    if crf.pseudo_from == "crf":
        if not crf.enabled:
            raise UserError(
                "config key crf.pseudo_from: crf, but crf.enabled is false (set crf.pseudo_from=cam)"
            )
        if crf.pseudo_alpha == -1:
            # -1 means "the best alpha found by evaluation", which only the pipeline knows; alone,
            # infer takes the middle alpha (10 for psa's 6/10/24) and says so in its summary.
            middle = sorted(alphas)[len(alphas) // 2]
            log.warning("crf.pseudo_alpha is -1 (best from evaluation); infer alone uses alpha %g", middle)
            return "crf", float(middle)
        return "crf", float(crf.pseudo_alpha)
    threshold = cfg.infer.threshold
    if not 0.0 <= threshold <= 1.0:
        raise UserError(
            f"config key infer.threshold: {threshold:g}; with crf.pseudo_from=cam the pseudo-labels need a "
            f"background threshold in [0, 1] (-1 means 'best from evaluation', which only the pipeline has)"
        )
    return "cam", float(threshold)


def load_state(backbone: str, checkpoint: str, labels: LabelSpace) -> tuple[dict, str]:
    """(state dict on the CPU, sha256 of the file): the checkpoint loaded into a fresh network, so that
    a wrong file or backbone is a UserError before any actor starts."""
    from cse_ray.models import build_classifier, load_weights

    try:
        model = build_classifier(backbone, num_classes=labels.num_classes)
    except UserError as err:
        raise UserError(f"config key model.backbone: {err}") from None
    with artifacts.local_copy(checkpoint) as local:  # a remote checkpoint is read once
        digest = artifacts.file_sha256(local)
        try:
            load_weights(model, local)
        except UserError:
            raise
        except Exception as err:  # torch raises RuntimeError/KeyError/pickle errors for a wrong file
            raise UserError(
                f"config key infer.checkpoint: {checkpoint}: cannot be loaded into model.backbone={backbone} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, digest


def check_settings(layout: InferLayout, settings: dict, path: str | None = None) -> None:
    """Refuse to resume into a folder whose stored outputs were made with other settings (recorded in
    `path`, by default `infer_settings.json`)."""
    path = path or layout.settings
    if not artifacts.exists(path):
        return
    previous = artifacts.read_json(path)
    if previous != settings:
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise UserError(
            f"{path}: the outputs under {layout.root} were made with other settings "
            f"({', '.join(differ)} differ); resuming would mix two sets of outputs: use a new --out, or "
            "delete the old outputs first"
        )


def _checkpoint(cfg: Config, layout: InferLayout, checkpoint: str | None) -> str:
    """The CAM network's weights: the argument, `infer.checkpoint`, else the eraser trained into `out`."""
    checkpoint = checkpoint or cfg.infer.checkpoint
    if not checkpoint:  # the eraser trained into the same run directory, when there is one
        trained = RunLayout(layout.root).stage("train_cse").model
        if not artifacts.exists(trained):
            raise UserError(
                f"config key infer.checkpoint: empty, and {trained} does not exist; give the CAM "
                "network's checkpoint (.pth), or run train-cse with the same --out first"
            )
        checkpoint = trained
    if not artifacts.exists(checkpoint):
        raise UserError(f"config key infer.checkpoint: {checkpoint}: file not found")
    return checkpoint


def prepare(cfg: Config, layout: InferLayout, checkpoint: str | None, list_name: str | None,
            write_pseudo: bool) -> Plan:
    """Validate the config, the list, its labels and the checkpoint; the plan of one inference run."""
    from cse_ray.data.voc import list_path, read_list

    checkpoint = _checkpoint(cfg, layout, checkpoint)
    alphas = tuple(dict.fromkeys(float(a) for a in cfg.crf.alphas))
    if cfg.crf.enabled and any(a <= 0 for a in alphas):
        raise UserError(f"config key crf.alphas: every alpha must be > 0, got {list(cfg.crf.alphas)}")
    if any(s <= 0 for s in cfg.infer.scales):
        raise UserError(f"config key infer.scales: every scale must be > 0, got {list(cfg.infer.scales)}")
    pseudo_source, pseudo_value = resolve_pseudo(cfg, write_pseudo, alphas)

    root = resolve_data_root(cfg, layout.root)
    names_file = list_path(root, list_name or cfg.data.infer_list)
    names = list(dict.fromkeys(read_list(names_file)))
    if not names:
        raise UserError(f"config key data.infer_list: {names_file}: the list is empty")
    labels = image_labels(root, names, names_file, cfg.data.sbd_root or None, cfg.data.labels)

    state, digest = load_state(cfg.model.backbone, checkpoint, cfg.data.labels)
    c = cfg.crf
    settings = {
        "backbone": cfg.model.backbone,
        "checkpoint_sha256": digest,
        "scales": [float(s) for s in cfg.infer.scales],
        "bf16": cfg.infer.bf16,
        **({"channels_last": True} if cfg.infer.channels_last else {}),  # older folders lack the key
        "crf": [c.iterations, c.gauss_sxy, c.gauss_compat, c.bilateral_sxy, c.bilateral_srgb,
                c.bilateral_compat],
    }
    check_settings(layout, settings)
    return Plan(
        layout=layout, root=root, names=names, labels=labels, label_space=cfg.data.labels,
        backbone=cfg.model.backbone, state=state, settings=settings, scales=tuple(cfg.infer.scales),
        alphas=alphas if cfg.crf.enabled else (), crf_enabled=cfg.crf.enabled, crf_params=cfg.crf,
        save_seed=cfg.infer.save_seed, overlays=cfg.infer.overlays, pseudo_source=pseudo_source,
        pseudo_value=pseudo_value,
    )


def image_labels(root: str, names: list[str], names_file: Path, sbd_root: str | None,
                 space: LabelSpace) -> dict[str, np.ndarray]:
    """From the `cls_labels.npy` that `cse-ray data lists` wrote beside the list when it covers every
    name (10,582 XML files are then not parsed), else the dataset root's labels file (which `cse-ray
    data coco` writes: COCO has no XML), else the annotations or masks."""
    from cse_ray.data.voc import LABELS_FILE, load_labels, read_image_labels

    beside = Path(names_file).parent / LABELS_FILE
    if beside.is_file():
        cached = load_labels(beside, space)
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
    return read_image_labels(root, names, cache_path=Path(root, LABELS_FILE), sbd_root=sbd_root, space=space)
