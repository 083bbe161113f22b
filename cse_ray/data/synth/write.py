"""Writing the synthetic set in the PASCAL VOC 2012 layout, resumably.

`synth.partial.json` is written first and `synth.json` (the parameters) last, and a sample's annotation
XML is its last file: so a complete folder is recognised and reused, an interrupted one resumes where it
stopped, and a folder this generator did not write is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import asdict, fields
from pathlib import Path

from cse_ray import artifacts
from cse_ray.config import SynthConfig
from cse_ray.data import voc
from cse_ray.data.synth.options import SynthOptions, make_options
from cse_ray.data.synth.render import SPLITS, SynthObject, SynthSample, render_sample
from cse_ray.errors import UserError
from cse_ray.formats import encode_jpeg, encode_label_png
from cse_ray.labels import VOC

PARAMS_FILE = "synth.json"
PARTIAL_FILE = "synth.partial.json"
FORMAT_VERSION = 1
_GENERATED = ("JPEGImages", "SegmentationClass", "SegmentationPart", "Annotations", "ImageSets")


def sample_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def annotation_xml(name: str, width: int, height: int, objects: list[SynthObject]) -> str:
    """VOC-style annotation; no timestamps, so the bytes depend only on the scene."""
    root = ET.Element("annotation")

    def child(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
        node = ET.SubElement(parent, tag)
        if text is not None:
            node.text = str(text)
        return node

    child(root, "folder", "VOC2012")
    child(root, "filename", f"{name}.jpg")
    child(child(root, "source"), "database", "cse-ray synthetic")
    size = child(root, "size")
    child(size, "width", width)
    child(size, "height", height)
    child(size, "depth", 3)
    child(root, "segmented", 1)
    for obj in objects:
        node = child(root, "object")
        child(node, "name", VOC.class_names[obj.class_index])
        child(node, "pose", "Unspecified")
        child(node, "truncated", int(obj.truncated))
        child(node, "difficult", 0)
        box = child(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.bbox):
            child(box, tag, value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _write_file(path: Path, data: bytes) -> None:
    """Atomic (temp file + rename) but without fsync: thousands of small files per run, and a file is
    either complete or absent after a crash, which is all resuming needs."""
    artifacts.write_bytes(path, data, fsync=False)


def _write_sample(root: Path, name: str, sample: SynthSample, opts: SynthOptions) -> None:
    height, width = sample.label.shape
    _write_file(voc.image_path(root, name), encode_jpeg(sample.image, opts.jpeg_quality))
    _write_file(root / "SegmentationClass" / f"{name}.png", encode_label_png(sample.label))
    if opts.part_masks:
        _write_file(root / "SegmentationPart" / f"{name}.png", encode_label_png(sample.parts))
    # The annotation is written last: its presence marks the sample complete when resuming.
    xml = annotation_xml(name, width, height, sample.objects)
    _write_file(voc.annotation_path(root, name), xml.encode("utf-8"))


def _params(train: int, val: int, size: int, seed: int, options: SynthOptions) -> dict:
    """What synth.json records: exactly what determines the files (through a JSON round trip, so that
    it compares equal to what a later run reads back)."""
    record = {
        "generator": "cse-ray synth",
        "format_version": FORMAT_VERSION,
        "train": train,
        "val": val,
        "size": size,
        "seed": seed,
        "options": asdict(options),
        "classes": list(VOC.class_names),
    }
    return json.loads(json.dumps(record, sort_keys=True))


# Options added after sets were written, with what their absence means: a set written before an option
# existed was made with its neutral value, so it still counts as the same set.
OPTIONS_ADDED_LATER = {"partless": 0.0, "part_place": "inside"}


def read_params(path: Path) -> dict | None:
    """A synth.json (or its partial twin) as `_params` would build it today; None when unreadable."""
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(params, dict) and isinstance(params.get("options"), dict):
        params["options"] = {**OPTIONS_ADDED_LATER, **params["options"]}
    return params


def _write_json(path: Path, params: dict) -> None:
    artifacts.write_text(path, json.dumps(params, indent=1, sort_keys=True) + "\n")


def _prepare_folder(root: Path, params: dict, overwrite: bool) -> bool | None:
    """None when `root` already holds this set; else make it ready and say whether to resume."""
    done = read_params(root / PARAMS_FILE)
    if done == params:
        return None
    partial = read_params(root / PARTIAL_FILE)
    resuming = partial == params and done is None
    if root.exists() and not resuming and any(root.iterdir()):
        if done is None and partial is None:  # never delete what this generator did not write
            raise UserError(f"{root}: folder already holds other files; choose a new or empty --out")
        if not overwrite:
            raise UserError(
                f"{root}: folder already holds a synthetic set with other parameters; "
                "choose another --out or pass overwrite"
            )
        for sub in _GENERATED:
            shutil.rmtree(root / sub, ignore_errors=True)
        for stale in (PARAMS_FILE, PARTIAL_FILE):
            (root / stale).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / PARTIAL_FILE, params)
    return resuming


_DEFAULTS = SynthConfig()


def check_arguments(train: int, val: int, size: int, seed: int) -> None:
    """The counts, size and seed of a synthetic set (either layout), refused with the flag named."""
    if not 0 <= int(train) <= 1_000_000 or not 0 <= int(val) <= 1_000_000 or train + val == 0:
        raise UserError(f"synth --train {train} --val {val}: need non-negative counts, not both zero")
    if int(seed) < 0:
        raise UserError(f"synth --seed {seed}: must be >= 0")
    if not 32 <= int(size) <= 2048:
        raise UserError(f"synth --size {size}: must lie in 32..2048")


def generate(
    out: str | os.PathLike,
    train: int = _DEFAULTS.train,
    val: int = _DEFAULTS.val,
    size: int = _DEFAULTS.size,
    seed: int = _DEFAULTS.seed,
    overwrite: bool = False,
    **design_options: object,
) -> dict:
    """Write the synthetic set in the VOC 2012 layout under `out` and return its parameters.

    Defaults are `config.SynthConfig`'s; `design_options` are SynthOptions fields. A complete folder made
    with the same parameters is left untouched (`"reused": True`). An interrupted run with the same
    parameters resumes. A folder holding anything else is refused unless `overwrite`.
    """
    check_arguments(train, val, size, seed)
    options = make_options(**design_options)
    root = Path(out)
    params = _params(int(train), int(val), int(size), int(seed), options)
    resuming = _prepare_folder(root, params, overwrite)
    if resuming is None:
        return {**params, "out": str(root), "reused": True, "written": 0}

    written = 0
    names: dict[str, list[str]] = {}
    for split, count in zip(SPLITS, (int(train), int(val))):
        names[split] = [sample_name(split, index) for index in range(count)]
        for index, name in enumerate(names[split]):
            if resuming and voc.annotation_path(root, name).is_file():
                continue
            _write_sample(root, name, render_sample(seed, split, index, size, options), options)
            written += 1
    for split in SPLITS:
        voc.write_list(voc.list_path(root, split), names[split])
    voc.write_list(voc.list_path(root, "trainval"), names["train"] + names["val"])
    _write_json(root / PARAMS_FILE, params)
    (root / PARTIAL_FILE).unlink(missing_ok=True)
    return {**params, "out": str(root), "reused": False, "written": written}


def generate_from_config(out: str | os.PathLike, config: SynthConfig, overwrite: bool = False) -> dict:
    """The set `data.synth` describes (every field but `enabled`), written under `out`."""
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "enabled"}
    return generate(out, overwrite=overwrite, **values)
