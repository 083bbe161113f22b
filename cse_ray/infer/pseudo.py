"""Pseudo-labels from stored outputs, and reading the stored CAMs back.

Pseudo-labels record where they came from (`pseudo_source`, `pseudo_value` in the manifest), so a
rerun with another alpha or threshold rewrites exactly the stale ones from the stored outputs,
without recomputing CAMs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config
from cse_ray.errors import UserError
from cse_ray.infer.manifest import PSEUDO_FIELDS, Manifest
from cse_ray.infer.workers import scheduling_options
from cse_ray.layout import InferLayout

log = logging.getLogger(__name__)

PSEUDO_CHUNK = 32  # images per pseudo-label rewriting task


@dataclass
class PseudoLabelSummary:
    written: int
    missing: list[str] = field(default_factory=list)  # names whose source output does not exist


def load_cams(out: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 K x H x W, int64 K) from the inference folder `out`'s `cams/NAME.npz` (stored as float16)."""
    from cse_ray.formats import load_cam_npz

    return load_cam_npz(InferLayout(str(out)).cam(name))


def _pseudo_chunk(layout: InferLayout, names: Sequence[str], source: str, value: float) -> list[str]:
    """Write the pseudo-labels of some images from the stored outputs; returns the names with no source."""
    from cse_ray.cam import cams_to_label
    from cse_ray.formats import write_label_png

    missing = []
    for name in names:
        target = layout.pseudo(name)
        if source == "crf":
            src = layout.crf(value, name)
            if not artifacts.exists(src):
                missing.append(name)
                continue
            artifacts.write_bytes(target, artifacts.read_bytes(src))  # byte-identical to the CRF map
        else:
            if not artifacts.exists(layout.cam(name)):
                missing.append(name)
                continue
            cams, classes = load_cams(layout.root, name)
            write_label_png(target, cams_to_label(cams, classes, value, cams.shape[1:]))
    return missing


def write_pseudo_labels(out: str, names: Sequence[str], source: str, value: float, cfg: Config,
                        *, use_ray: bool | None = None) -> PseudoLabelSummary:
    """(Re)write `pseudo_labels/NAME.png` from existing outputs: a copy of `crf/a{value}/NAME.png`
    (source "crf") or the stored CAMs at background threshold `value` (source "cam").

    Cheap, so the pipeline can call it after evaluation has picked the best alpha or threshold. The
    manifest's pseudo columns are cleared first and set after the files are written, so a crash in
    between never leaves a row claiming settings its file does not have. Runs as Ray tasks when
    `use_ray` (default: when Ray is already initialised), else in this process.
    """
    layout = InferLayout(str(out))
    if source == "crf":
        if float(value) not in {float(a) for a in cfg.crf.alphas}:
            raise UserError(f"pseudo-label alpha {value:g} is not one of crf.alphas "
                            f"({', '.join(f'{a:g}' for a in cfg.crf.alphas)})")
    elif source == "cam":
        if not 0.0 <= value <= 1.0:
            raise UserError(f"pseudo-label background threshold {value:g} is outside [0, 1]")
    else:
        raise UserError(f"pseudo-label source {source!r}: expected 'crf' or 'cam'")
    value = float(value)
    names = list(dict.fromkeys(names))
    manifest = Manifest(layout)
    touched = [manifest.rows[n] for n in names if n in manifest.rows]
    if any(row.get("pseudo_source") is not None for row in touched):
        for row in touched:
            row.update(dict.fromkeys(PSEUDO_FIELDS))
        manifest.write()

    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    chunks = [names[i:i + PSEUDO_CHUNK] for i in range(0, len(names), PSEUDO_CHUNK)]
    if use_ray and len(chunks) > 1:
        import ray

        task = ray.remote(_pseudo_chunk).options(**scheduling_options("pseudo", cfg, False))
        missing = [n for part in ray.get([task.remote(layout, c, source, value) for c in chunks])
                   for n in part]
    else:
        missing = [n for chunk in chunks for n in _pseudo_chunk(layout, chunk, source, value)]

    absent = set(missing)
    for row in touched:
        if row["name"] not in absent:
            row.update(pseudo_label=layout.pseudo_rel(row["name"]), pseudo_source=source, pseudo_value=value)
    if touched:
        manifest.write()
    if missing:
        log.warning("pseudo-labels: %d images have no %s output (first: %s)",
                    len(missing), source, missing[0])
    return PseudoLabelSummary(written=len(names) - len(missing), missing=missing)
