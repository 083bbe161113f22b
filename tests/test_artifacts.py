"""Atomic writes: an output appears whole or not at all, locally and through a URI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cse_ray import artifacts
from cse_ray.formats import write_label_png, write_seed_dict


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    artifacts.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_open(target, "w") as handle:
            handle.write('{"half": ')
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temp file left


def test_formats_round_trip(tmp_path: Path) -> None:
    cams = np.random.default_rng(0).random((2, 5, 7)).astype(np.float16)
    artifacts.write_npz(tmp_path / "a.npz", cams=cams, classes=np.array([3, 11]))
    with np.load(tmp_path / "a.npz") as data:
        assert np.array_equal(data["cams"], cams) and data["classes"].tolist() == [3, 11]
    write_seed_dict(tmp_path / "a.npy", {3: cams[0].astype(np.float32)})
    loaded = np.load(tmp_path / "a.npy", allow_pickle=True).item()
    assert np.array_equal(loaded[3], cams[0].astype(np.float32))
    label = np.array([[0, 1, 255], [20, 3, 4]], np.uint8)
    write_label_png(tmp_path / "l.png", label)
    image = Image.open(tmp_path / "l.png")
    assert image.mode == "P" and np.array_equal(np.array(image), label)
    artifacts.write_parquet(tmp_path / "m.parquet", [{"name": "x", "n": 1}, {"name": "y", "n": 2}])
    assert pq.read_table(tmp_path / "m.parquet").column("name").to_pylist() == ["x", "y"]


def test_uri_paths_go_through_pyarrow_filesystems(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/remote/run"
    target = artifacts.join(uri, "report.json")
    assert target == f"file://{tmp_path}/remote/run/report.json"
    assert not artifacts.exists(target)
    artifacts.write_json(target, {"miou": 50.0})
    assert artifacts.exists(target) and artifacts.read_json(target) == {"miou": 50.0}
    assert (tmp_path / "remote" / "run" / "report.json").is_file()


def test_file_sha256_streams_local_and_uri_files(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 20000  # > one 4 MiB block
    (tmp_path / "w.pth").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert artifacts.file_sha256(tmp_path / "w.pth") == expected
    assert artifacts.file_sha256(f"file://{tmp_path}/w.pth") == expected
