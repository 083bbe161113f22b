"""VOC layout reading/writing on real files: lists, images, masks, image-level labels, list generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cse_ray import formats
from cse_ray.data import voc
from cse_ray.errors import UserError
from cse_ray.labels import PALETTE


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


def test_read_list_accepts_plain_and_psa_formats(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("2007_000032\n\n2007_000039\n")
    psa = tmp_path / "psa.txt"
    psa.write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
        "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n\n"
    )
    assert voc.read_list(plain) == ["2007_000032", "2007_000039"]
    assert voc.read_list(psa) == ["2007_000032", "2007_000039"]


def test_list_path_maps_split_names_and_keeps_paths(tmp_path: Path) -> None:
    assert voc.list_path(tmp_path, "train") == tmp_path / "ImageSets" / "Segmentation" / "train.txt"
    assert voc.list_path(tmp_path, "lists/my.txt") == Path("lists/my.txt")


@pytest.mark.parametrize("bad_name", ["a/b", "..", "x..y", "a\\b"])
def test_read_list_rejects_names_that_escape_the_dataset(tmp_path: Path, bad_name: str) -> None:
    path = tmp_path / "bad_list.txt"
    path.write_text(f"ok_name\n{bad_name}\n")
    with pytest.raises(UserError, match=r"bad_list\.txt:2") as info:
        voc.read_list(path)
    assert repr(bad_name) in str(info.value) and "must not contain" in str(info.value)


def test_validate_name_rejects_empty_name() -> None:
    with pytest.raises(UserError, match="empty"):
        voc.validate_name("")


def test_read_list_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nowhere\.txt.*not found"):
        voc.read_list(tmp_path / "nowhere.txt")


def test_load_image_converts_grayscale_and_cmyk_to_rgb(tmp_path: Path) -> None:
    rgb = smooth_image()
    for mode in ("L", "CMYK"):
        path = write_jpeg(tmp_path / f"{mode}.jpg", rgb, mode)
        with Image.open(path) as stored:
            assert stored.mode == mode
        loaded = formats.read_image(path)
        assert loaded.dtype == np.uint8 and loaded.shape == (40, 56, 3)
    gray = formats.read_image(tmp_path / "L.jpg")
    assert np.array_equal(gray[..., 0], gray[..., 2])  # grey stays grey after conversion
    cmyk = formats.read_image(tmp_path / "CMYK.jpg").astype(int)
    assert np.abs(cmyk - rgb.astype(int)).mean() < 12  # CMYK decoded back to roughly the same colours


def test_truncated_and_corrupt_images_are_user_errors_naming_the_file(tmp_path: Path) -> None:
    good = write_jpeg(tmp_path / "JPEGImages" / "good.jpg", smooth_image(120, 160))
    data = good.read_bytes()
    truncated = tmp_path / "JPEGImages" / "cut.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "JPEGImages" / "junk.jpg"
    corrupt.write_bytes(b"this is not an image at all" * 10)

    with pytest.raises(UserError, match=r"cut\.jpg.*truncated"):
        formats.read_image(truncated)
    with pytest.raises(UserError, match=r"junk\.jpg.*not a readable image"):
        formats.read_image(corrupt)
    with pytest.raises(UserError, match=r"absent\.jpg.*not found"):
        formats.read_image(tmp_path / "absent.jpg")

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


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    path = formats.write_label_png(tmp_path / "SegmentationClass" / "m.png", np.zeros((30, 40), np.uint8))
    assert formats.read_label_png(path, expected_hw=(30, 40)).shape == (30, 40)
    with pytest.raises(UserError, match=r"m\.png: mask size 40x30 .*does not match the image size 41x30"):
        formats.read_label_png(path, expected_hw=(30, 41))


def test_rgb_mask_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(smooth_image()).save(path)
    with pytest.raises(UserError, match=r"rgb\.png: mask must be a palette"):
        formats.read_label_png(path)


def test_save_label_png_writes_voc_palette_atomically(tmp_path: Path) -> None:
    label = np.zeros((12, 17), np.uint8)
    label[2:6, 3:9] = 15
    label[6, :] = 255
    path = formats.write_label_png(tmp_path / "out" / "x.png", label)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[15 * 3 : 16 * 3] == [192, 128, 128]
        assert np.array_equal(np.array(img), label)
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["x.png"]  # no temp files left behind


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


def test_labels_json_round_trip(tmp_path: Path) -> None:
    labels = {"x": np.eye(20, dtype=np.float32)[3], "y": np.zeros(20, np.float32)}
    path = voc.save_labels(tmp_path / "labels.json", labels)
    assert json.loads(path.read_text())["labels"]["x"] == ["boat"]
    loaded = voc.load_labels(path)
    assert set(loaded) == {"x", "y"} and np.array_equal(loaded["x"], labels["x"])


def test_unknown_class_in_annotation_names_the_file(tmp_path: Path) -> None:
    write_xml(voc.annotation_path(tmp_path, "odd"), ["cat", "unicorn"])
    with pytest.raises(UserError, match=r"odd\.xml: unknown class name 'unicorn'"):
        voc.read_image_labels(tmp_path, ["odd"])


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
