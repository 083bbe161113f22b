"""The MS-COCO 2014 layout: its 80 categories, reading and checking `instances_*.json`, and the semantic mask
of one image made from its instance annotations.

    ROOT/train2014/NAME.jpg, ROOT/val2014/NAME.jpg
    ROOT/annotations/instances_train2014.json, ROOT/annotations/instances_val2014.json

A semantic mask follows WSSS practice (INTERFACE.md, "COCO 2014 layout"): 0 background, k + 1 for the k-th
category in ascending category id (the classes of `labels.COCO`), 255 on crowd pixels that no non-crowd
instance covers; non-crowd instances are drawn from the largest `area` to the smallest, so a small object
lying on a large one stays visible. Every check that can be made from the JSON alone is made here, before
any work starts, and names the file and the annotation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cse_ray.data.names import validate_name
from cse_ray.errors import UserError
from cse_ray.labels import COCO, IGNORE_INDEX

SPLITS: dict[str, str] = {"train": "train2014", "val": "val2014"}
"""Split name -> image folder (and the `instances_<folder>.json` it is described by)."""

# (category id, name, supercategory) of the 80 categories, as in the official instances files.
CATEGORIES: tuple[tuple[int, str, str], ...] = tuple(
    (cat_id, name, supercategory)
    for supercategory, members in (
        ("person", ((1, "person"),)),
        ("vehicle", ((2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
                     (8, "truck"), (9, "boat"))),
        ("outdoor", ((10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
                     (15, "bench"))),
        ("animal", ((16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
                    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"))),
        ("accessory", ((27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"))),
        ("sports", ((34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
                    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
                    (43, "tennis racket"))),
        ("kitchen", ((44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"),
                     (50, "spoon"), (51, "bowl"))),
        ("food", ((52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
                  (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"))),
        ("furniture", ((62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"),
                       (70, "toilet"))),
        ("electronic", ((72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
                        (77, "cell phone"))),
        ("appliance", ((78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"))),
        ("indoor", ((84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
                    (89, "hair drier"), (90, "toothbrush"))),
    )
    for cat_id, name in members
)
assert tuple(name for _, name, _ in CATEGORIES) == COCO.class_names, "labels.COCO is in category id order"
CATEGORY_IDS: tuple[int, ...] = tuple(cat_id for cat_id, _, _ in CATEGORIES)


def annotation_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{SPLITS[split]}.json"


def image_path(root: str | os.PathLike, split: str, file_name: str) -> Path:
    return Path(root) / SPLITS[split] / file_name


@dataclass(frozen=True)
class Instance:
    """One annotation as a mask worker needs it (plain data: it crosses Ray's object store)."""

    ann_id: int
    class_index: int  # 0..79, the category's rank by id
    iscrowd: bool
    area: float
    segmentation: object  # polygons (list of flat coordinate lists) or an RLE dict


@dataclass(frozen=True)
class CocoImage:
    image_id: int
    name: str  # file name without .jpg: the name in lists, JPEGImages/ and SegmentationClass/
    file_name: str
    width: int
    height: int
    instances: tuple[Instance, ...] = ()


@dataclass
class CocoSplit:
    """One instances file, checked: its images (with their annotations) in name order."""

    split: str
    path: Path
    images: list[CocoImage] = field(default_factory=list)

    @property
    def annotated(self) -> list[CocoImage]:
        return [image for image in self.images if image.instances]

    @property
    def crowd_count(self) -> int:
        return sum(inst.iscrowd for image in self.images for inst in image.instances)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"{path}: annotation file not found (the COCO 2014 layout has "
            "ROOT/annotations/instances_train2014.json and instances_val2014.json)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict)
               or not isinstance(data.get(key), list)]
    if missing:
        raise UserError(f"{path}: not a COCO instances file (no {', '.join(repr(k) for k in missing)} list)")
    return data


def _class_index_of(path: Path, categories: list) -> dict[int, int]:
    """Category id -> class index; the file's categories must be COCO's 80 (their names, by id)."""
    try:
        by_id = {int(cat["id"]): str(cat["name"]) for cat in categories}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: every entry of 'categories' needs an integer 'id' and a 'name'") from None
    names = tuple(by_id[cat_id] for cat_id in sorted(by_id))
    if names != COCO.class_names:
        diff = next((f"category {cat_id} is {by_id[cat_id]!r}, expected {expected!r}"
                     for (cat_id, _), expected in zip(sorted(by_id.items()), COCO.class_names)
                     if by_id[cat_id] != expected), f"{len(names)} categories, expected 80")
        raise UserError(f"{path}: 'categories' are not COCO's 80 categories in id order ({diff})")
    return {cat_id: index for index, cat_id in enumerate(sorted(by_id))}


def _check_segmentation(where: str, segm: object, height: int, width: int) -> object:
    """The segmentation as the mask code takes it: polygon rings of fewer than 3 points (no area, found
    in real COCO files, and which pycocotools would read as a box) are dropped; anything else malformed
    is a UserError."""
    if isinstance(segm, list):
        rings = []
        for ring in segm:
            if not isinstance(ring, list) or len(ring) % 2 or not all(
                isinstance(v, (int, float)) for v in ring
            ):
                raise UserError(f"{where}: a polygon must be a flat list of x, y numbers")
            if len(ring) >= 6:
                rings.append(ring)
        return rings if len(rings) < len(segm) else segm
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise UserError(f"{where}: RLE size {list(segm['size'])} differs from its image's "
                            f"[height, width] [{height}, {width}]")
        counts = segm["counts"]
        if not isinstance(counts, (str, list)):
            raise UserError(f"{where}: RLE counts must be a string or a list of integers")
        return {"size": [height, width], "counts": counts}
    raise UserError(f"{where}: segmentation must be a list of polygons or an RLE dict (counts, size)")


def load_split(root: str | os.PathLike, split: str) -> CocoSplit:
    """Read and check ROOT/annotations/instances_<split>2014.json: COCO keys, unique images with sizes,
    COCO's categories, annotations that name a known image and category with a well-formed segmentation."""
    path = annotation_path(root, split)
    data = _read_json(path)
    class_index = _class_index_of(path, data["categories"])
    records: dict[int, dict] = {}
    for record in data["images"]:
        try:
            image_id, file_name = int(record["id"]), str(record["file_name"])
            width, height = int(record["width"]), int(record["height"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: image record {record!r:.200} needs id, file_name, width and height") \
                from None
        if image_id in records:
            raise UserError(f"{path}: image id {image_id} appears twice in 'images'")
        if not file_name.endswith(".jpg") or width < 1 or height < 1:
            raise UserError(f"{path}: image {image_id} ({file_name}): expected a .jpg with a positive size")
        validate_name(file_name[: -len(".jpg")])
        records[image_id] = {"file_name": file_name, "width": width, "height": height, "instances": []}
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{path}: annotation {ann_id}"
        if not isinstance(ann, dict) or not isinstance(ann_id, int) or not all(
            k in ann for k in ("image_id", "category_id", "segmentation")
        ):
            raise UserError(f"{where}: needs an integer id, image_id, category_id and segmentation")
        record = records.get(ann["image_id"])
        if record is None:
            raise UserError(f"{where} names image {ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in class_index:
            raise UserError(f"{where} names category {ann['category_id']}, which is not in 'categories'")
        segm = _check_segmentation(where, ann["segmentation"], record["height"], record["width"])
        area = ann.get("area")
        if area is not None and (isinstance(area, bool) or not isinstance(area, (int, float))):
            raise UserError(f"{where}: area {area!r} is not a number")
        record["instances"].append(Instance(
            ann_id=ann_id, class_index=class_index[ann["category_id"]],
            iscrowd=bool(ann.get("iscrowd", 0)), area=float(area) if area is not None else -1.0,
            segmentation=segm,
        ))
    images = [
        CocoImage(image_id, rec["file_name"][: -len(".jpg")], rec["file_name"], rec["width"], rec["height"],
                  tuple(rec["instances"]))
        for image_id, rec in records.items()
    ]
    images.sort(key=lambda image: image.name)
    return CocoSplit(split=split, path=path, images=images)


def image_classes(image: CocoImage) -> np.ndarray:
    """The image-level label: float32 multi-hot over the 80 classes, crowd annotations included."""
    vec = np.zeros(COCO.num_classes, np.float32)
    for inst in image.instances:
        vec[inst.class_index] = 1.0
    return vec


def instance_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """bool H x W of one segmentation: polygons, uncompressed or compressed RLE (pycocotools decodes)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def semantic_mask(image: CocoImage) -> np.ndarray:
    """uint8 H x W label map of one image: crowd first as 255, then non-crowd instances by decreasing area
    (ties by annotation id), each drawn over what lies below. An annotation without `area` is ranked by
    its mask's pixel count."""
    height, width = image.height, image.width
    label = np.zeros((height, width), np.uint8)
    drawn = []
    for inst in image.instances:
        try:
            mask = instance_mask(inst.segmentation, height, width)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise UserError(f"annotation {inst.ann_id} of {image.file_name}: segmentation cannot be "
                            f"decoded ({exc})") from None
        if mask.shape != (height, width):
            raise UserError(f"annotation {inst.ann_id} of {image.file_name}: its mask is "
                            f"{mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
        if inst.iscrowd:
            label[mask] = IGNORE_INDEX
        else:
            area = inst.area if inst.area >= 0 else float(mask.sum())
            drawn.append((-area, inst.ann_id, inst.class_index, mask))
    for _, _, class_index, mask in sorted(drawn, key=lambda item: item[:2]):
        label[mask] = class_index + 1
    return label
