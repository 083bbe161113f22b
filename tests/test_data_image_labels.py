"""Image-level label files (psa's cls_labels.npy and the JSON form) and multi-hot vectors per LabelSpace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cse_ray.data import image_labels as L
from cse_ray.errors import UserError
from cse_ray.labels import custom_label_space


def test_labels_json_round_trip(tmp_path: Path) -> None:
    labels = {"x": np.eye(20, dtype=np.float32)[3], "y": np.zeros(20, np.float32)}
    path = L.save_labels(tmp_path / "labels.json", labels)
    assert json.loads(path.read_text())["labels"]["x"] == ["boat"]
    loaded = L.load_labels(path)
    assert set(loaded) == {"x", "y"} and np.array_equal(loaded["x"], labels["x"])


def test_multi_hot_names_the_unknown_class_and_the_dataset() -> None:
    assert np.flatnonzero(L.multi_hot(["dog", "cat", "dog"], "here")).tolist() == [7, 11]
    with pytest.raises(UserError, match=r"^here: unknown class name 'unicorn' \(expected one of the 20 VOC"):
        L.multi_hot(["cat", "unicorn"], "here")
    three = custom_label_space(3)
    assert L.multi_hot(["class2"], "x", three).tolist() == [0.0, 0.0, 1.0]


def test_label_files_follow_the_label_space(tmp_path: Path) -> None:
    three = custom_label_space(3)
    labels = {"a": np.array([1, 0, 1], np.float32), "b": np.array([0, 1, 0], np.float32)}
    for suffix in (".npy", ".json"):
        path = L.save_labels(tmp_path / f"labels{suffix}", labels, three)
        loaded = L.load_labels(path, three)
        assert set(loaded) == {"a", "b"} and all(np.array_equal(loaded[k], labels[k]) for k in labels)
    assert json.loads((tmp_path / "labels.json").read_text())["classes"] == ["class0", "class1", "class2"]
    with pytest.raises(UserError, match=r"label of 'a' has 3 entries, expected 20"):
        L.load_labels(tmp_path / "labels.npy")  # a VOC reader refuses a 3-class file
    with pytest.raises(UserError, match=r"labels\.json, image 'a': unknown class name 'class0'"):
        L.load_labels(tmp_path / "labels.json")


def test_unreadable_label_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothing\.npy: labels file not found"):
        L.load_labels(tmp_path / "nothing.npy")
    np.save(tmp_path / "array.npy", np.zeros(20, np.float32))
    with pytest.raises(UserError, match=r"array\.npy: expected a pickled dict \{name: 20 floats\}"):
        L.load_labels(tmp_path / "array.npy")


def test_cached_labels_compute_only_when_the_cache_misses_a_name(tmp_path: Path) -> None:
    cache = tmp_path / "cls_labels.npy"
    computed: list[str] = []

    def label_of(name: str) -> np.ndarray:
        computed.append(name)
        return np.eye(20, dtype=np.float32)[len(name)]

    first = L.cached_labels(["a", "bb"], label_of, cache)
    assert computed == ["a", "bb"] and set(L.load_labels(cache)) == {"a", "bb"}
    assert np.array_equal(L.cached_labels(["bb"], label_of, cache)["bb"], first["bb"])
    assert computed == ["a", "bb"]  # answered by the cache
    L.cached_labels(["a", "ccc"], label_of, cache)
    assert computed == ["a", "bb", "a", "ccc"] and set(L.load_labels(cache)) == {"a", "bb", "ccc"}

