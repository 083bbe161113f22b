"""Resolving a config's dataset before any stage starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cse_ray.config import from_dict
from cse_ray.data.prepare import load_split, resolve_data_root
from cse_ray.data.voc import read_list
from cse_ray.errors import UserError


def test_data_root_defaults_to_a_synthetic_set_under_out(tmp_path, monkeypatch):
    cfg = from_dict({"data": {"synth": {"enabled": True, "train": 2, "val": 1, "size": 32}}})
    root = resolve_data_root(cfg, str(tmp_path))
    assert root == str(tmp_path / "data")
    assert read_list(Path(root) / "ImageSets/Segmentation/train.txt") == ["train_000000", "train_000001"]
    assert resolve_data_root(cfg, str(tmp_path)) == root  # reused, not regenerated
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root(cfg, ".") == root  # absolute, as Ray workers need it
    with pytest.raises(UserError, match="data.root"):
        resolve_data_root(from_dict({"data": {"root": str(tmp_path / "none")}}), str(tmp_path))


def test_load_split_reads_names_and_labels_and_names_a_missing_list(tmp_path):
    cfg = from_dict({"data": {"synth": {"enabled": True, "train": 3, "val": 2, "size": 32}}})
    root = resolve_data_root(cfg, str(tmp_path))
    split = load_split(cfg, root, "val_list", need_masks=True)
    assert split.names == ("val_000000", "val_000001")
    assert split.num_classes == cfg.data.labels.num_classes == 20
    assert all(split.labels[n].shape == (20,) and split.labels[n].sum() >= 1 for n in split.names)
    bad = from_dict({"data": {"synth": {"enabled": True, "train": 3, "val": 2, "size": 32},
                              "val_list": "nolist"}})
    with pytest.raises(UserError, match="data.val_list: list file .*nolist.txt not found"):
        load_split(bad, root, "val_list")
