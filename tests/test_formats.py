"""File formats: each writer's output reads back through its one reader, locally and through a URI, and
broken files become errors that name them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cse_ray.errors import UserError
from cse_ray.formats import (
    load_cam_npz,
    load_seed_cams,
    load_seed_label,
    save_cam_npz,
    write_seed_dict,
)
from cse_ray.labels import custom_label_space


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
