"""`cse-ray synth --layout coco`: the synthetic scenes written as a real COCO 2014 folder, read back here
with pycocotools' own API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO as CocoApi

from cse_ray.cli import main
from cse_ray.data import coco
from cse_ray.data.synth import make_options, render_sample
from cse_ray.data.synth.coco import generate_coco, mask_polygons, uncompressed_rle
from cse_ray.data.synth.render import grow
from cse_ray.labels import VOC

TRAIN, VAL, SIZE, SEED = 20, 12, 48, 3


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth-coco") / "coco"
    assert main(["synth", "--layout", "coco", "--out", str(root), "--train", str(TRAIN), "--val", str(VAL),
                 "--size", str(SIZE), "--seed", str(SEED)]) == 0
    return root


def _api(root: Path, split: str) -> CocoApi:
    return CocoApi(str(coco.annotation_path(root, split)))


def test_the_folder_is_the_coco_2014_layout(synth_root: Path) -> None:
    for split, folder in coco.SPLITS.items():
        data = json.loads(coco.annotation_path(synth_root, split).read_text())
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        count = TRAIN if split == "train" else VAL
        names = sorted(record["file_name"] for record in data["images"])
        assert len(names) == count
        assert names[0] == f"COCO_{folder}_{1 if split == 'train' else 2:012d}.jpg"
        for record in data["images"]:
            path = synth_root / folder / record["file_name"]
            with Image.open(path) as img:
                assert img.size == (record["width"], record["height"]) and img.format == "JPEG"
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
    ids = {json.loads(coco.annotation_path(synth_root, split).read_text())["images"][0]["id"]
           for split in coco.SPLITS}
    assert len(ids) == 2  # image ids are unique over both files


def test_categories_are_cocos_80_with_their_gapped_ids(synth_root: Path) -> None:
    cats = json.loads(coco.annotation_path(synth_root, "train").read_text())["categories"]
    assert len(cats) == 80 and max(c["id"] for c in cats) == 90
    assert sorted(c["id"] for c in cats) != list(range(1, 81))
    by_name = {c["name"]: c["id"] for c in cats}
    assert by_name["airplane"] == 5 and by_name["dining table"] == 67 and by_name["tv"] == 72
    assert by_name["toothbrush"] == 90 and by_name["person"] == 1
    assert all(c["supercategory"] for c in cats)


def test_annotations_mix_polygons_rle_crowd_and_unannotated_images(synth_root: Path) -> None:
    kinds: set[str] = set()
    unannotated = 0
    mapped = {"airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
              "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
              "train", "tv"}
    for split in coco.SPLITS:
        api = _api(synth_root, split)
        names = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
        for image_id in api.getImgIds():
            anns = api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=None))
            unannotated += not anns
            for ann in anns:
                segm = ann["segmentation"]
                kind = "polygon" if isinstance(segm, list) else type(segm["counts"]).__name__
                kinds.add(("crowd " if ann["iscrowd"] else "") + kind)
                assert names[ann["category_id"]] in mapped
                rle = api.annToRLE(ann)  # area and bbox are those of the stored segmentation
                assert ann["area"] == float(mask_utils.area(rle))
                assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
    # polygons for most objects, compressed RLE for some, crowd regions as uncompressed RLE
    assert kinds == {"polygon", "str", "crowd list"}
    assert unannotated == len(range(3, TRAIN, 8)) + len(range(3, VAL, 8))


def test_annotations_are_the_rendered_objects(synth_root: Path) -> None:
    """Same seed, same scenes as the VOC layout: each annotation's mask is its object's visible pixels."""
    api = _api(synth_root, "train")
    names = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
    voc_name = {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa", "tv": "tvmonitor",
                "dining table": "diningtable", "potted plant": "pottedplant"}
    options = make_options(ignore_width=0)
    exact = loose = crowd = 0
    for index in range(TRAIN):
        sample = render_sample(SEED, "train", index, SIZE, options)
        image_id = 2 * index + 1
        record = api.loadImgs(image_id)[0]
        assert (record["height"], record["width"]) == sample.label.shape
        for ann in api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=None)):
            name = names[ann["category_id"]]
            visible = sample.label == VOC.class_names.index(voc_name.get(name, name)) + 1
            mask = api.annToMask(ann).astype(bool)
            if ann["iscrowd"]:  # a crowd region reaches 2 pixels beyond its object
                assert np.array_equal(mask, grow(visible, 2))
                crowd += 1
            elif np.array_equal(mask, visible):
                exact += 1
            else:  # a loose outline, one pixel outside the object
                assert isinstance(ann["segmentation"], list) and np.array_equal(mask, grow(visible, 1))
                loose += 1
    assert exact > TRAIN // 2 and loose > 0 and crowd > 0


def test_images_are_the_voc_layout_images(synth_root: Path, tmp_path: Path) -> None:
    from cse_ray.data.synth import generate

    generate(tmp_path / "voc", train=4, val=1, size=SIZE, seed=SEED)
    for index in range(4):
        coco_jpeg = synth_root / "train2014" / f"COCO_train2014_{2 * index + 1:012d}.jpg"
        voc_jpeg = tmp_path / "voc" / "JPEGImages" / f"train_{index:06d}.jpg"
        assert coco_jpeg.read_bytes() == voc_jpeg.read_bytes()


def test_same_parameters_same_bytes_and_a_complete_folder_is_reused(synth_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    first = generate_coco(again, train=TRAIN, val=VAL, size=SIZE, seed=SEED)
    assert not first["reused"] and first["images"] == TRAIN + VAL and first["crowd"] > 0
    for split, folder in coco.SPLITS.items():
        expected = coco.annotation_path(synth_root, split).read_bytes()
        assert coco.annotation_path(again, split).read_bytes() == expected
        for path in sorted((synth_root / folder).iterdir()):
            assert (again / folder / path.name).read_bytes() == path.read_bytes()
    stamp = coco.annotation_path(again, "train").stat().st_mtime_ns
    second = generate_coco(again, train=TRAIN, val=VAL, size=SIZE, seed=SEED)
    assert second["reused"] and coco.annotation_path(again, "train").stat().st_mtime_ns == stamp
    other = generate_coco(tmp_path / "other", train=TRAIN, val=VAL, size=SIZE, seed=SEED + 1)
    assert coco.annotation_path(tmp_path / "other", "train").read_bytes() != \
        coco.annotation_path(again, "train").read_bytes()
    assert other["images"] == TRAIN + VAL


def test_folders_it_did_not_write_are_refused(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["synth", "--layout", "coco", "--out", str(foreign), "--train", "2", "--val", "1"]) == 2
    assert "already holds other files" in capsys.readouterr().err and (foreign / "notes.txt").exists()
    voc = tmp_path / "voc"
    assert main(["synth", "--out", str(voc), "--train", "2", "--val", "1", "--size", "32"]) == 0
    assert main(["synth", "--layout", "coco", "--out", str(voc), "--train", "2", "--val", "1"]) == 2
    assert "VOC-layout synthetic set" in capsys.readouterr().err
    done = tmp_path / "done"
    generate_coco(done, train=2, val=1, size=32)
    assert main(["synth", "--layout", "coco", "--out", str(done), "--train", "3", "--val", "1"]) == 2
    assert "other parameters" in capsys.readouterr().err


def test_polygons_trace_pixels_exactly_and_holes_fall_back_to_rle() -> None:
    rng = np.random.default_rng(0)
    traced = 0
    for _ in range(50):  # unions of random rectangles: often touching only at corners
        mask = np.zeros((17, 19), bool)
        for _ in range(4):
            y, x = rng.integers(0, 15, 2)
            mask[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = True
        polygons = mask_polygons(mask)
        if polygons is not None:
            decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 17, 19)))
            assert np.array_equal(decoded.astype(bool), mask)
            traced += 1
    assert traced >= 30
    corners = np.zeros((4, 4), bool)
    corners[0, 0] = corners[1, 1] = True  # two pixels touching at a corner: two polygons
    assert mask_polygons(corners) == [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
                                      [1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]]
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert mask_polygons(ring) is None
    rle = uncompressed_rle(ring)
    assert rle["counts"][:2] == [0, 12]  # starts with the (empty) run of zeros, column-major
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, 5, 5)).astype(bool), ring)
