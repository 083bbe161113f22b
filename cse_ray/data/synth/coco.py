"""The synthetic set in the MS-COCO 2014 layout (`cse-ray synth --layout coco`), with real COCO JSON.

    OUT/train2014/COCO_train2014_%012d.jpg, OUT/val2014/COCO_val2014_%012d.jpg
    OUT/annotations/instances_train2014.json, OUT/annotations/instances_val2014.json

The scenes are the VOC-layout set's (`render_sample`, same seed, same pixels); each VOC class is drawn as
the COCO category of the same meaning, under its real id (ids run 1..90 with gaps, all 80 categories are
listed). So that the COCO reader meets every case of real files, the annotations mix the formats COCO
uses: most objects are polygons (the pixel outline of the visible object, for some of them one pixel
outside it, as hand-drawn outlines overshoot), some are compressed RLE, a few are crowd regions (iscrowd
1, uncompressed RLE as in COCO's own crowd annotations, reaching 2 pixels beyond the object), and every
eighth image (index 3, 11, 19, ...) has no annotations at all. An object whose visible part has a hole
(another object inside it) is stored as RLE, since COCO polygons cannot describe holes. Everything is a
pure function of the parameters: the same parameters give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cse_ray import artifacts
from cse_ray.config import SynthConfig
from cse_ray.data import coco
from cse_ray.data.synth.options import SynthOptions, make_options
from cse_ray.data.synth.render import SPLITS, SynthSample, grow, render_sample
from cse_ray.data.synth.write import FORMAT_VERSION, PARAMS_FILE, PARTIAL_FILE, check_arguments, read_params
from cse_ray.errors import UserError
from cse_ray.formats import encode_jpeg
from cse_ray.labels import VOC

VOC_TO_COCO: dict[str, str] = {
    **{name: name for name in VOC.class_names},
    "aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv",
    "diningtable": "dining table", "pottedplant": "potted plant",
}
"""Each synthetic class look -> the COCO category it is annotated as."""
COCO_ID_OF_CLASS: tuple[int, ...] = tuple(
    {name: cat_id for cat_id, name, _ in coco.CATEGORIES}[VOC_TO_COCO[name]] for name in VOC.class_names
)
UNANNOTATED_EVERY, UNANNOTATED_AT = 8, 3
CROWD_SHARE, RLE_SHARE = 0.10, 0.20  # of the objects of annotated images; the rest are polygons
LOOSE_SHARE = 0.30  # of the polygons: outlined one pixel outside the object, as hand-drawn outlines are
CROWD_MARGIN = 2  # a crowd region reaches this many pixels beyond its object
_OWN_FOLDERS = ("annotations", *coco.SPLITS.values())
_DEFAULTS = SynthConfig()


def file_name(split: str, index: int) -> str:
    return f"COCO_{coco.SPLITS[split]}_{image_id(split, index):012d}.jpg"


def image_id(split: str, index: int) -> int:
    """Train images have odd ids, val images even ones: unique over both files, whatever the counts."""
    return 2 * index + 1 + SPLITS.index(split)


# --------------------------------------------------------------------------------- masks -> segmentations
def _boundary_loops(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed loops of pixel-corner vertices (x, y) around the mask's 4-connected pieces: outer boundaries
    run clockwise on screen (positive shoelace area with y pointing down), holes the other way."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    out_edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Each side of a mask pixel that faces a background pixel is one edge, oriented with the pixel on its
    # right: top (bg above) left to right, right side downwards, bottom right to left, left side upwards.
    for neighbour, start, end in (
        (padded[:-2, 1:-1], (0, 0), (1, 0)),
        (padded[1:-1, 2:], (1, 0), (1, 1)),
        (padded[2:, 1:-1], (1, 1), (0, 1)),
        (padded[1:-1, :-2], (0, 1), (0, 0)),
    ):
        rows, cols = np.nonzero(inside & ~neighbour)
        for y, x in zip(rows.tolist(), cols.tolist()):
            out_edges.setdefault((x + start[0], y + start[1]), []).append((x + end[0], y + end[1]))
    loops = []
    for first in list(out_edges):
        while out_edges.get(first):
            loop, here, nxt = [first], first, out_edges[first].pop()
            while nxt != first:
                step = (nxt[0] - here[0], nxt[1] - here[1])
                here, options = nxt, out_edges[nxt]
                if len(options) == 1:
                    nxt = options.pop()
                else:  # two pieces touch at a corner: turn right, which keeps each piece its own loop
                    right = (here[0] - step[1], here[1] + step[0])
                    nxt = right if right in options else options[0]
                    options.remove(nxt)
                loop.append(here)
            loops.append(loop)
    return loops


def _corners(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The loop without its collinear vertices."""
    count = len(loop)
    kept = []
    for i, (x, y) in enumerate(loop):
        px, py = loop[i - 1]
        nx, ny = loop[(i + 1) % count]
        if (x - px, y - py) != (nx - x, ny - y):
            kept.append((x, y))
    return kept


def _signed_area(loop: list[tuple[int, int]]) -> float:
    xs = np.array([p[0] for p in loop], np.float64)
    ys = np.array([p[1] for p in loop], np.float64)
    return float(np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys)) / 2.0


def mask_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """COCO polygons (flat x, y lists) whose rasterisation by pycocotools is exactly `mask`, or None when no
    polygon list can be (a hole)."""
    from pycocotools import mask as mask_utils

    loops = [_corners(loop) for loop in _boundary_loops(np.asarray(mask, bool))]
    if any(_signed_area(loop) < 0 for loop in loops):
        return None
    polygons = [[float(v) for point in loop for v in point] for loop in loops]
    height, width = mask.shape
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return polygons if np.array_equal(mask_utils.decode(rle).astype(bool), mask) else None


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = np.asarray(mask, bool).flatten(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _area_and_bbox(mask: np.ndarray) -> tuple[float, list[float]]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


# ------------------------------------------------------------------------------------------ annotations
def annotations_of(sample: SynthSample, split: str, index: int, seed: int) -> list[dict]:
    """The COCO annotations of one rendered scene (none for every eighth image).

    Loose outlines and crowd margins make annotations overlap where objects touch, as in real COCO files,
    so that the draw order of the masks (by area, crowd under instances) matters."""
    if index % UNANNOTATED_EVERY == UNANNOTATED_AT:
        return []
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index), 2014])
    anns = []
    for k, obj in enumerate(sample.objects):
        mask = sample.label == obj.class_index + 1  # rendered without an ignore band: the visible object
        draw, loose = rng.random(2)
        crowd = draw < CROWD_SHARE
        if crowd:
            mask = grow(mask, CROWD_MARGIN)
        elif draw >= CROWD_SHARE + RLE_SHARE and loose < LOOSE_SHARE:
            mask = grow(mask, 1)
        segmentation = None if crowd or draw < CROWD_SHARE + RLE_SHARE else mask_polygons(mask)
        if segmentation is None:
            segmentation = uncompressed_rle(mask) if crowd else compressed_rle(mask)
        area, bbox = _area_and_bbox(mask)
        anns.append({
            "id": image_id(split, index) * 10 + k + 1, "image_id": image_id(split, index),
            "category_id": COCO_ID_OF_CLASS[obj.class_index], "segmentation": segmentation,
            "area": area, "bbox": bbox, "iscrowd": int(crowd),
        })
    return anns


def instances_json(split: str, images: list[dict], annotations: list[dict]) -> dict:
    return {
        "info": {"description": f"cse-ray synthetic set, COCO 2014 layout ({coco.SPLITS[split]})",
                 "version": "1.0", "year": 2014, "contributor": "cse-ray synth",
                 "date_created": "2014-01-01"},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": sup, "id": cat_id, "name": name}
                       for cat_id, name, sup in coco.CATEGORIES],
    }


# ---------------------------------------------------------------------------------------------- writing
def _params(train: int, val: int, size: int, seed: int, options: SynthOptions) -> dict:
    record = {"generator": "cse-ray synth", "layout": "coco", "format_version": FORMAT_VERSION,
              "train": train, "val": val, "size": size, "seed": seed, "options": asdict(options)}
    return json.loads(json.dumps(record, sort_keys=True))


def _prepare_folder(root: Path, params: dict, overwrite: bool) -> bool:
    """False when `root` already holds this set; else empty what an earlier run of this generator left
    (never anything else) and say True."""
    done = read_params(root / PARAMS_FILE)
    if done == params:
        return False
    partial = read_params(root / PARTIAL_FILE)
    if root.exists() and any(root.iterdir()):
        if done is None and partial is None:
            raise UserError(f"{root}: folder already holds other files; choose a new or empty --out")
        earlier = done or partial or {}
        if earlier.get("layout") != "coco":
            raise UserError(f"{root}: folder holds a VOC-layout synthetic set; choose another --out")
        if done is not None and not overwrite:
            raise UserError(f"{root}: folder already holds a synthetic set with other parameters; "
                            "choose another --out or pass overwrite")
        for sub in _OWN_FOLDERS:
            shutil.rmtree(root / sub, ignore_errors=True)
        (root / PARAMS_FILE).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(root / PARTIAL_FILE, json.dumps(params, indent=1, sort_keys=True) + "\n")
    return True


def generate_coco(
    out: str | os.PathLike,
    train: int = _DEFAULTS.train,
    val: int = _DEFAULTS.val,
    size: int = _DEFAULTS.size,
    seed: int = _DEFAULTS.seed,
    overwrite: bool = False,
    **design_options: object,
) -> dict:
    """Write the synthetic set in the COCO 2014 layout under `out`; return its parameters and counts.

    Defaults are `config.SynthConfig`'s, `design_options` SynthOptions fields (ignore_width is 0: COCO
    masks have no ignore band). A complete folder with the same parameters is reused as it is; an
    interrupted one is written again.
    """
    check_arguments(train, val, size, seed)
    if design_options.get("ignore_width", 0) != 0:
        raise UserError("synth --layout coco: ignore_width must be 0 (COCO masks have no ignore band)")
    options = make_options(**{**design_options, "ignore_width": 0})
    root = Path(out)
    params = _params(int(train), int(val), int(size), int(seed), options)
    counts = {"out": str(root), "images": 0, "annotations": 0, "crowd": 0, "unannotated": 0}
    if not _prepare_folder(root, params, overwrite):
        return {**params, **counts, "reused": True}
    for split, count in zip(SPLITS, (int(train), int(val))):
        images, annotations = [], []
        for index in range(count):
            sample = render_sample(seed, split, index, size, options)
            height, width = sample.label.shape
            name = file_name(split, index)
            jpeg = encode_jpeg(sample.image, options.jpeg_quality)
            artifacts.write_bytes(coco.image_path(root, split, name), jpeg, fsync=False)
            images.append({"id": image_id(split, index), "file_name": name, "width": width, "height": height,
                           "license": 1})
            anns = annotations_of(sample, split, index, seed)
            annotations.extend(anns)
            counts["unannotated"] += not anns
            counts["crowd"] += sum(ann["iscrowd"] for ann in anns)
        counts["images"] += len(images)
        counts["annotations"] += len(annotations)
        instances = json.dumps(instances_json(split, images, annotations))
        artifacts.write_text(coco.annotation_path(root, split), instances)
    artifacts.write_text(root / PARAMS_FILE, json.dumps(params, indent=1, sort_keys=True) + "\n")
    (root / PARTIAL_FILE).unlink(missing_ok=True)
    return {**params, **counts, "reused": False}
