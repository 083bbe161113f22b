"""One reader and one writer per file format, on real files: RGB images, label PNGs, JPEG encoding, CAM
files and the reference's seed dicts; broken files become errors that name them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from cse_ray import formats
from cse_ray.errors import UserError
from cse_ray.formats import (
    load_cam_npz,
    load_seed_cams,
    load_seed_label,
    save_cam_npz,
    write_seed_dict,
)
from cse_ray.labels import custom_label_space


def write_jpeg(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=95)
    return path


def smooth_image(height: int = 40, width: int = 56) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4 % 256, ys * 6 % 256, (xs + ys) * 2 % 256], -1).astype(np.uint8)


@pytest.fixture()
def broken_images(tmp_path: Path) -> dict[str, Path]:
    good = write_jpeg(tmp_path / "good.jpg", smooth_image(120, 160))
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "junk.jpg"
    corrupt.write_bytes(b"this is not an image at all" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    absent = tmp_path / "absent.jpg"
    return {"good": good, "cut": truncated, "junk": corrupt, "empty": empty, "absent": absent}




def test_truncated_and_corrupt_images_are_user_errors_naming_the_file(broken_images) -> None:
    assert formats.read_image(broken_images["good"]).shape == (120, 160, 3)
    with pytest.raises(UserError, match=r"cut\.jpg.*truncated"):
        formats.read_image(broken_images["cut"])
    with pytest.raises(UserError, match=r"junk\.jpg.*not a readable image"):
        formats.read_image(broken_images["junk"])
    with pytest.raises(UserError, match=r"empty\.jpg: image file is empty"):
        formats.read_image(broken_images["empty"])
    with pytest.raises(UserError, match=r"absent\.jpg.*not found"):
        formats.read_image(broken_images["absent"])


def test_image_problem_finds_what_read_image_would_refuse_from_the_header(broken_images) -> None:
    problems = {name: formats.image_problem(path) for name, path in broken_images.items()}
    assert problems == {
        "good": None,
        "cut": "JPEG is truncated (no end-of-image marker)",
        "junk": "not a readable image (corrupt or unknown format)",
        "empty": "not a readable image (corrupt or unknown format)",
        "absent": "file not found",
    }


def test_read_image_converts_grayscale_and_cmyk_to_rgb(tmp_path: Path) -> None:
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


def test_label_png_round_trip_keeps_indices_and_refuses_bad_maps() -> None:
    label = np.array([[0, 1, 20], [80, 254, 255]], np.int64)
    decoded = np.array(Image.open(io.BytesIO(formats.encode_label_png(label))))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, label)
    with pytest.raises(ValueError, match="0..255"):
        formats.encode_label_png(np.array([[0, 256]]))
    with pytest.raises(ValueError, match="2-D"):
        formats.encode_label_png(np.zeros((2, 2, 1), np.uint8))


def test_encode_jpeg_keeps_full_resolution_chroma() -> None:
    """4:4:4: a two-pixel red line on blue stays red (4:2:0 would average it with its neighbours)."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 2] = 255
    image[:, 15:17] = (255, 0, 0)
    data = formats.encode_jpeg(image, quality=90)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "JPEG" and JpegImagePlugin.get_sampling(decoded) == 0
        pixels = np.array(decoded).astype(int)
    assert pixels[:, 15:17, 0].min() > 200 and pixels[:, 15:17, 2].max() < 60
    assert formats.encode_jpeg(image, quality=90) == data  # no timestamps: same pixels, same bytes


def test_cam_files_round_trip_as_float16_locally_and_through_a_uri(tmp_path: Path) -> None:
    cams = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    for target in (tmp_path / "a.npz", f"file://{tmp_path}/remote/a.npz"):
        save_cam_npz(target, cams, [11, 3])
        loaded, classes = load_cam_npz(target)
        assert loaded.dtype == np.float32 and classes.dtype == np.int64
        assert classes.tolist() == [11, 3]
        assert np.array_equal(loaded, cams.astype(np.float16).astype(np.float32))
    assert (tmp_path / "remote" / "a.npz").is_file()

    save_cam_npz(tmp_path / "none.npz", np.zeros((0, 5, 7), np.float32), [])  # an image with no class
    loaded, classes = load_cam_npz(tmp_path / "none.npz")
    assert loaded.shape == (0, 5, 7) and classes.size == 0


def test_cam_writer_checks_classes_against_the_label_space(tmp_path: Path) -> None:
    cams = np.zeros((1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"class indices must be in 0..19, got \[20\]"):
        save_cam_npz(tmp_path / "a.npz", cams, [20])
    with pytest.raises(ValueError, match=r"class indices must be in 0..2, got \[3\]"):
        save_cam_npz(tmp_path / "a.npz", cams, [3], labels=custom_label_space(3))
    with pytest.raises(ValueError, match="K = len"):
        save_cam_npz(tmp_path / "a.npz", cams, [1, 2])
    assert not (tmp_path / "a.npz").exists()


def test_broken_cam_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.npz: cannot read CAM file"):
        load_cam_npz(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="bad.npz: cannot read CAM file"):
        load_cam_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", maps=np.zeros(3))
    with pytest.raises(UserError, match="other.npz: not a cse-ray CAM file"):
        load_cam_npz(tmp_path / "other.npz")


def test_seed_dicts_are_the_references_pickled_dicts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    maps = {14: rng.random((3, 4)).astype(np.float32), 2: rng.random((3, 4)).astype(np.float32)}
    uri = f"file://{tmp_path}/seed/cam.npy"
    write_seed_dict(uri, maps)
    raw = np.load(tmp_path / "seed" / "cam.npy", allow_pickle=True).item()  # how the reference reads it
    assert sorted(raw) == [2, 14] and np.array_equal(raw[14], maps[14])
    cams, classes = load_seed_cams(uri)
    assert classes.tolist() == [2, 14] and np.array_equal(cams, np.stack([maps[2], maps[14]]))

    scores = {0: np.array([[0.5, 0.1]], np.float32), 1: np.array([[0.5, 0.2]], np.float32),
              3: np.array([[0.1, 0.7]], np.float32)}
    write_seed_dict(tmp_path / "crf.npy", scores)
    assert load_seed_label(tmp_path / "crf.npy").tolist() == [[0, 3]]  # ties: the smallest key
    assert load_seed_label(tmp_path / "crf.npy", custom_label_space(3)).tolist() == [[0, 3]]
    with pytest.raises(UserError, match=r"crf.npy: label seed keys must be in 0..2, got \[0, 1, 3\]"):
        load_seed_label(tmp_path / "crf.npy", custom_label_space(2))


def test_broken_seed_dicts_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.npy: cannot read seed file"):
        load_seed_cams(tmp_path / "missing.npy")
    np.save(tmp_path / "array.npy", np.zeros((2, 2)))
    with pytest.raises(UserError, match="array.npy: seed file must hold a pickled dict"):
        load_seed_cams(tmp_path / "array.npy")
    write_seed_dict(tmp_path / "names.npy", {"2007_000032": np.zeros(20, np.float32)})
    with pytest.raises(UserError, match="names.npy: seed file must hold a pickled dict"):
        load_seed_label(tmp_path / "names.npy")
    write_seed_dict(tmp_path / "sizes.npy", {0: np.zeros((2, 2)), 1: np.zeros((3, 2))})
    with pytest.raises(UserError, match="sizes.npy: seed maps must all be H x W arrays of one size"):
        load_seed_cams(tmp_path / "sizes.npy")
