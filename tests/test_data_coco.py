"""`cse-ray data coco`: a real COCO 2014 folder (the synthetic one) turned into the VOC layout, checked
against pycocotools' own API, resumed, and refused with a named culprit when the input is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO as CocoApi

from cse_ray.cli import main
from cse_ray.data import coco
from cse_ray.data.coco_convert import convert
from cse_ray.data.image_labels import load_labels
from cse_ray.data.names import read_list
from cse_ray.data.synth.coco import generate_coco
from cse_ray.formats import encode_jpeg, read_label_png
from cse_ray.labels import COCO, IGNORE_INDEX

TRAIN, VAL, SIZE, SEED = 20, 12, 48, 3


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco") / "coco"
    generate_coco(root, train=TRAIN, val=VAL, size=SIZE, seed=SEED)
    return root


@pytest.fixture(scope="module")
def converted(coco_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "dataset"
    assert main(["data", "coco", "--root", str(coco_root), "--out", str(out), "--workers", "0"]) == 0
    return out


def expected_mask(api: CocoApi, image_id: int) -> np.ndarray:
    """The convention, computed independently with pycocotools: crowd pixels 255, then non-crowd
    instances from the largest area to the smallest (ties by id), category = rank of its id + 1."""
    record = api.loadImgs(image_id)[0]
    rank = {cat_id: k for k, cat_id in enumerate(sorted(api.getCatIds()))}
    label = np.zeros((record["height"], record["width"]), np.uint8)
    anns = api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=None))
    for ann in anns:
        if ann["iscrowd"]:
            label[api.annToMask(ann) > 0] = IGNORE_INDEX
    for ann in sorted((a for a in anns if not a["iscrowd"]), key=lambda a: (-a["area"], a["id"])):
        label[api.annToMask(ann) > 0] = rank[ann["category_id"]] + 1
    return label


def _overlaps(api: CocoApi, image_id: int) -> tuple[int, int]:
    """Pixels shared by two non-crowd annotations, and by a crowd and a non-crowd one."""
    anns = api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=None))
    plain = [api.annToMask(a) > 0 for a in anns if not a["iscrowd"]]
    crowd = [api.annToMask(a) > 0 for a in anns if a["iscrowd"]]
    between = sum(int((a & b).sum()) for i, a in enumerate(plain) for b in plain[i + 1:])
    return between, sum(int((c & p).sum()) for c in crowd for p in plain)


def test_masks_follow_the_convention(coco_root: Path, converted: Path) -> None:
    crowd_pixels = instance_overlap = crowd_overlap = 0
    for split in coco.SPLITS:
        api = CocoApi(str(coco.annotation_path(coco_root, split)))
        for image_id in api.getImgIds():
            name = api.loadImgs(image_id)[0]["file_name"][:-4]
            png = converted / "SegmentationClass" / f"{name}.png"
            if not api.getAnnIds(imgIds=image_id, iscrowd=None):
                assert not png.exists()
                continue
            mask = read_label_png(png)
            assert np.array_equal(mask, expected_mask(api, image_id)), name
            crowd_pixels += int((mask == IGNORE_INDEX).sum())
            between, under_crowd = _overlaps(api, image_id)
            instance_overlap += between
            crowd_overlap += under_crowd
            link = converted / "JPEGImages" / f"{name}.jpg"
            assert link.is_symlink() and link.resolve() == (coco_root / coco.SPLITS[split] / f"{name}.jpg")
    # the set exercises every rule: crowd pixels, instances over one another (area order), over crowd
    assert crowd_pixels > 0 and instance_overlap > 0 and crowd_overlap > 0


def test_lists_leave_out_unannotated_images_and_labels_include_crowd(coco_root: Path,
                                                                     converted: Path) -> None:
    labels = load_labels(converted / "cls_labels.npy", COCO)
    crowd_only = 0
    for split in coco.SPLITS:
        api = CocoApi(str(coco.annotation_path(coco_root, split)))
        rank = {cat_id: k for k, cat_id in enumerate(sorted(api.getCatIds()))}
        annotated = sorted(api.loadImgs(i)[0]["file_name"][:-4] for i in api.getImgIds()
                           if api.getAnnIds(imgIds=i, iscrowd=None))
        listed = read_list(converted / "ImageSets" / "Segmentation" / f"{split}.txt")
        assert listed == annotated and len(listed) < len(api.getImgIds())
        for image_id in api.getImgIds():
            name = api.loadImgs(image_id)[0]["file_name"][:-4]
            anns = api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=None))
            if not anns:
                assert name not in labels
                continue
            expected = np.zeros(80, np.float32)
            expected[[rank[a["category_id"]] for a in anns]] = 1.0
            assert np.array_equal(labels[name], expected), name
            plain = {a["category_id"] for a in anns if not a["iscrowd"]}
            crowd_only += any(a["iscrowd"] and a["category_id"] not in plain for a in anns)
    assert set(labels) == {n for s in coco.SPLITS for n in read_list(converted / "ImageSets" / "Segmentation"
                                                                       / f"{s}.txt")}
    assert crowd_only > 0  # a category present only as a crowd region is still in the image's label


def test_summary_counts_what_was_left_out(coco_root: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "d")
    assert main(["data", "coco", "--root", str(coco_root), "--out", out, "--workers", "0"]) == 0
    out = capsys.readouterr().out
    train_left, val_left = len(range(3, TRAIN, 8)), len(range(3, VAL, 8))
    assert f"train: {TRAIN} images, {TRAIN - train_left} listed, {train_left} without annotations left out" \
        in out
    assert f"val: {VAL} images, {VAL - val_left} listed, {val_left} without annotations left out" in out


def test_a_rerun_is_a_no_op_and_a_missing_mask_is_remade(coco_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    args = ["data", "coco", "--root", str(coco_root), "--out", str(out), "--workers", "0"]
    assert main(args) == 0
    capsys.readouterr()
    masks = sorted((out / "SegmentationClass").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in masks}
    assert main(args) == 0
    assert "masks: 0 written" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in masks} == stamps
    masks[0].unlink()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "masks: 1 written" in text and masks[0].is_file()


def test_the_stages_read_it_as_a_coco_dataset(converted: Path) -> None:
    from cse_ray.config import load_config
    from cse_ray.data.prepare import load_split

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke-coco.yaml",
                      [f"data.root={converted}"])
    split = load_split(cfg, str(converted), "val_list", need_masks=True)
    assert split.space is COCO and split.num_classes == 80
    assert all(vec.shape == (80,) and vec.sum() >= 1 for vec in split.labels.values())


def _one_image_root(tmp_path: Path, annotations: list[dict]) -> Path:
    """A COCO root with one 8x6 val image and one (unannotated) train image."""
    root = tmp_path / "tiny"
    for split in coco.SPLITS:
        name = f"COCO_{coco.SPLITS[split]}_{1 if split == 'val' else 2:012d}.jpg"
        path = coco.image_path(root, split, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(np.zeros((6, 8, 3), np.uint8)))
        data = {"images": [{"id": 1 if split == "val" else 2, "file_name": name, "width": 8, "height": 6}],
                "annotations": annotations if split == "val" else [],
                "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in coco.CATEGORIES]}
        coco.annotation_path(root, split).parent.mkdir(parents=True, exist_ok=True)
        coco.annotation_path(root, split).write_text(json.dumps(data))
    return root


def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_small_objects_stay_on_top_and_instances_cover_crowd(tmp_path: Path) -> None:
    crowd = {"counts": [6 * 5, 6 * 3], "size": [6, 8]}  # columns 5..7
    root = _one_image_root(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 90, "segmentation": _box(1, 1, 3, 3), "area": 4,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": _box(0, 0, 7, 5), "area": 35,
         "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 5, "segmentation": crowd, "area": 18, "iscrowd": 1},
    ])
    summaries = convert(root, tmp_path / "out", workers=0, progress=False)
    assert summaries["train"].unannotated == 1 and summaries["val"].crowd == 1
    mask = read_label_png(tmp_path / "out" / "SegmentationClass" / "COCO_val2014_000000000001.png")
    expected = np.zeros((6, 8), np.uint8)
    expected[:, 5:] = IGNORE_INDEX  # crowd ...
    expected[0:5, 0:7] = 1          # ... under the large person (id 1 -> index 1)
    expected[1:3, 1:3] = 80         # the small toothbrush (id 90 -> the 80th category) drawn last
    assert np.array_equal(mask, expected)
    labels = load_labels(tmp_path / "out" / "cls_labels.npy", COCO)
    assert np.flatnonzero(labels["COCO_val2014_000000000001"]).tolist() == [0, 4, 79]  # crowd airplane too


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def broken(coco_root: Path, tmp_path: Path) -> Path:
    """A private copy of the COCO root to break."""
    return Path(shutil.copytree(coco_root, tmp_path / "broken"))


def _edit_json(root: Path, split: str, edit) -> Path:
    path = coco.annotation_path(root, split)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _fails(root: Path, tmp_path: Path, capsys, *expected: str) -> None:
    code = main(["data", "coco", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out" / "ImageSets").exists()  # nothing usable written


def test_a_missing_annotation_file_is_named(broken: Path, tmp_path: Path, capsys) -> None:
    path = coco.annotation_path(broken, "val")
    path.unlink()
    _fails(broken, tmp_path, capsys, str(path), "annotation file not found")


def test_a_json_that_is_not_coco_is_named(broken: Path, tmp_path: Path, capsys) -> None:
    path = _edit_json(broken, "train", lambda data: data.pop("categories"))
    _fails(broken, tmp_path, capsys, str(path), "not a COCO instances file", "'categories'")
    path.write_text("{not json")
    _fails(broken, tmp_path, capsys, str(path), "not a readable JSON file")


def test_an_annotation_naming_a_missing_image_is_named(broken: Path, tmp_path: Path, capsys) -> None:
    def edit(data: dict) -> None:
        data["annotations"][0]["image_id"] = 999_999

    path = _edit_json(broken, "val", edit)
    ann_id = json.loads(path.read_text())["annotations"][0]["id"]
    _fails(broken, tmp_path, capsys, str(path), f"annotation {ann_id} names image 999999")


def test_an_annotation_naming_an_unknown_category_is_named(broken: Path, tmp_path: Path, capsys) -> None:
    def edit(data: dict) -> None:
        data["annotations"][1]["category_id"] = 12  # one of COCO's gaps

    path = _edit_json(broken, "train", edit)
    ann_id = json.loads(path.read_text())["annotations"][1]["id"]
    _fails(broken, tmp_path, capsys, str(path), f"annotation {ann_id} names category 12")


def test_an_image_whose_size_differs_from_its_record_is_named(broken: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(coco.annotation_path(broken, "train").read_text())
    image = data["images"][0]
    path = broken / "train2014" / image["file_name"]
    Image.new("RGB", (image["width"] + 3, image["height"])).save(path, format="JPEG")
    _fails(broken, tmp_path, capsys, str(path), f"size {image['width'] + 3}x{image['height']} differs",
           f"({image['width']}x{image['height']}, image id {image['id']})")


def test_a_missing_image_is_named(broken: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(coco.annotation_path(broken, "val").read_text())
    path = broken / "val2014" / data["images"][0]["file_name"]
    path.unlink()
    _fails(broken, tmp_path, capsys, str(path), "file not found")


def test_categories_other_than_cocos_are_refused(broken: Path, tmp_path: Path, capsys) -> None:
    def edit(data: dict) -> None:
        data["categories"][2]["name"] = "automobile"

    path = _edit_json(broken, "val", edit)
    _fails(broken, tmp_path, capsys, str(path), "category 3 is 'automobile', expected 'car'")


def test_ray_tasks_write_the_same_files(coco_root: Path, converted: Path, tmp_path: Path,
                                        ray_session) -> None:
    out = tmp_path / "ray"
    summaries = convert(coco_root, out, workers=2, chunk_size=3, progress=False)
    assert sum(s.written for s in summaries.values()) == sum(s.listed for s in summaries.values())
    for path in sorted((converted / "SegmentationClass").iterdir()):
        assert (out / "SegmentationClass" / path.name).read_bytes() == path.read_bytes()
    for name in ("ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt"):
        assert (out / name).read_text() == (converted / name).read_text()
