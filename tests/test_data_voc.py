"""VOC layout reading/writing on real files: lists, images, masks, image-level labels, list generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cse_ray import formats
from cse_ray.data import voc
from cse_ray.errors import UserError
from cse_ray.labels import PALETTE, custom_label_space


def write_jpeg(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=95)
    return path


def write_xml(path: Path, class_names: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = "".join(
        f"<object><name>{name}</name><part><name>head</name></part></object>" for name in class_names
    )
    path.write_text(f"<annotation><filename>x.jpg</filename>{objects}</annotation>")
    return path


def smooth_image(height: int = 40, width: int = 56) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4 % 256, ys * 6 % 256, (xs + ys) * 2 % 256], -1).astype(np.uint8)


def make_voc(root: Path, train: list[str], val: list[str], classes: dict[str, list[str]]) -> Path:
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{n}\n" for n in train))
    (lists / "val.txt").write_text("".join(f"{n}\n" for n in val))
    for name, names in classes.items():
        write_xml(voc.annotation_path(root, name), names)
    return root


def test_constants_describe_voc() -> None:
    assert len(voc.CLASS_NAMES) == voc.NUM_CLASSES == 20
    assert voc.CLASS_NAMES[0] == "aeroplane" and voc.CLASS_NAMES[-1] == "tvmonitor"
    assert voc.CATEGORY_NAMES[15] == "person"
    assert len(PALETTE) == 768
    assert PALETTE[3:6] == [128, 0, 0]  # aeroplane
    assert PALETTE[15 * 3 : 16 * 3] == [192, 128, 128]  # person
    assert PALETTE[255 * 3 :] == [224, 224, 192]  # ignore


def test_list_path_maps_split_names_and_keeps_paths(tmp_path: Path) -> None:
    assert voc.list_path(tmp_path, "train") == tmp_path / "ImageSets" / "Segmentation" / "train.txt"
    assert voc.list_path(tmp_path, "lists/my.txt") == Path("lists/my.txt")


def test_check_images_names_every_broken_image(tmp_path: Path) -> None:
    good = write_jpeg(tmp_path / "JPEGImages" / "good.jpg", smooth_image(120, 160))
    data = good.read_bytes()
    truncated = tmp_path / "JPEGImages" / "cut.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "JPEGImages" / "junk.jpg"
    corrupt.write_bytes(b"this is not an image at all" * 10)

    with pytest.raises(UserError) as info:
        voc.check_images(tmp_path, ["good", "cut", "junk", "absent"])
    message = str(info.value)
    assert message.startswith("3 of 4 images")
    assert "cut.jpg: JPEG is truncated" in message
    assert "junk.jpg: not a readable image" in message
    assert "absent.jpg: file not found" in message
    assert "good.jpg" not in message
    voc.check_images(tmp_path, ["good"])  # a clean list passes silently


def test_check_images_reports_count_and_first_ten(tmp_path: Path) -> None:
    names = [f"missing_{i:02d}" for i in range(13)]
    with pytest.raises(UserError) as info:
        voc.check_images(tmp_path, names)
    message = str(info.value)
    assert message.startswith("13 of 13 images")
    assert "missing_09.jpg" in message and "missing_10.jpg" not in message
    assert "and 3 more" in message


def test_image_labels_from_xml_and_mask_fallback_with_cache(tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    write_xml(voc.annotation_path(root, "a"), ["cat", "dog", "cat"])
    mask = np.zeros((10, 10), np.uint8)
    mask[:5] = 15
    mask[5:, 5:] = 255
    formats.write_label_png(root / "SegmentationClass" / "b.png", mask)
    cache = tmp_path / "labels" / "cls_labels.npy"

    labels = voc.read_image_labels(root, ["a", "b"], cache_path=cache)
    assert [voc.CLASS_NAMES[k] for k in np.flatnonzero(labels["a"])] == ["cat", "dog"]
    assert [voc.CLASS_NAMES[k] for k in np.flatnonzero(labels["b"])] == ["person"]
    assert labels["a"].dtype == np.float32 and labels["a"].shape == (20,)

    # Once cached, the annotations are no longer needed: the cache answers.
    (root / "Annotations" / "a.xml").unlink()
    again = voc.read_image_labels(root, ["a"], cache_path=cache)
    assert np.array_equal(again["a"], labels["a"])
    stored = np.load(cache, allow_pickle=True).item()  # psa's cls_labels.npy format
    assert set(stored) == {"a", "b"}


def test_unknown_class_in_annotation_names_the_file(tmp_path: Path) -> None:
    write_xml(voc.annotation_path(tmp_path, "odd"), ["cat", "unicorn"])
    with pytest.raises(UserError, match=r"odd\.xml: unknown class name 'unicorn'"):
        voc.read_image_labels(tmp_path, ["odd"])


def test_mask_labels_follow_the_label_space(tmp_path: Path) -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[:2] = 3
    mask[4:] = 255
    formats.write_label_png(tmp_path / "SegmentationClass" / "m.png", mask)
    three = custom_label_space(3)
    assert voc.image_label(tmp_path, "m", space=three).tolist() == [0.0, 0.0, 1.0]
    assert np.flatnonzero(voc.image_label(tmp_path, "m")).tolist() == [2]  # VOC: class 3 is "bird"
    mask[:2] = 4
    formats.write_label_png(tmp_path / "SegmentationClass" / "m.png", mask)
    with pytest.raises(UserError, match=r"m\.png: mask has values \[4\] outside 0..3 and 255"):
        voc.image_label(tmp_path, "m", space=three)


def test_missing_label_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"ghost\.xml.*ghost\.png"):
        voc.read_image_labels(tmp_path, ["ghost"])


@pytest.mark.parametrize("sbd_style", ["lists", "png_folder"])
def test_write_lists_builds_train_aug_from_voc_and_sbd(tmp_path: Path, sbd_style: str) -> None:
    train, val = ["t1", "t2"], ["v1", "v2"]
    sbd_names = ["s1", "t2", "v1", "s2"]  # overlaps with VOC train and val on purpose
    everything = {name: ["cat"] for name in train + val + sbd_names}
    root = make_voc(tmp_path / "VOC2012", train, val, everything)
    sbd = tmp_path / "SBD"
    if sbd_style == "lists":
        sbd.mkdir()
        (sbd / "train.txt").write_text("s1\nt2\n")
        (sbd / "val.txt").write_text("v1\ns2\n")
    else:
        for name in sbd_names:
            formats.write_label_png(sbd / "SegmentationClassAug" / f"{name}.png", np.zeros((4, 4), np.uint8))

    out = voc.write_lists(root, tmp_path / "lists", sbd_root=sbd)
    assert voc.read_list(out["train"]) == train
    assert voc.read_list(out["val"]) == val
    train_aug = voc.read_list(out["train_aug"])
    assert sorted(train_aug) == ["s1", "s2", "t1", "t2"]  # train + SBD - val, no duplicates
    assert train_aug[:2] == train
    labels = voc.load_labels(out["labels"])
    assert set(labels) == {"t1", "t2", "v1", "v2", "s1", "s2"}


def test_write_lists_without_sbd_is_just_voc(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC", ["a"], ["b"], {"a": ["bus"], "b": ["car"]})
    out = voc.write_lists(root, tmp_path / "out")
    assert voc.read_list(out["train_aug"]) == ["a"]
    assert voc.CLASS_NAMES[int(np.flatnonzero(voc.load_labels(out["labels"])["b"])[0])] == "car"
