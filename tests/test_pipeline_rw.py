"""The pipeline with `pipeline.rw=true pipeline.seg=true` on a real local Ray: confident labels,
train-aff on Ray Train, the random walk of the training and validation lists, the segmentation network
trained on the walk's labels, `cse-ray predict` on the validation list, and `rw_miou` / `seg_miou` in
the report, each equal to its evaluation file; the CLI's predict writes the same PNGs.

The numbers mean little on so small a run; the checks are that every stage left its outputs and that
the report agrees with the files behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cse_ray.cli import main
from cse_ray.config import load_config
from cse_ray.data.voc import read_list
from cse_ray.pipeline import run_pipeline
from cse_ray.rw import confident_labels

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.synth.train=16", "data.synth.val=6", "data.synth.size=48",
    "train_cam.crop=48", "train_cam.resize_long=[40,56]", "train_cam.epochs=1",
    "train_cse.crop=48", "train_cse.resize_long=[40,56]", "train_cse.epochs=1",
]
RW = ["pipeline.rw=true", "train_aff.crop=48", "train_aff.resize_long=[40,56]", "train_aff.epochs=1",
      "train_aff.freeze=none", "train_aff.init=eraser", "train_aff.momentum_mode=fixed", "train_aff.lr=0.01",
      "rw.logt=6"]
SEG = ["pipeline.seg=true", "train_seg.labels=rw", "train_seg.crop=48", "train_seg.resize_long=[40,56]",
       "predict.scales=[1.0,1.5]"]


def test_pipeline_with_the_random_walk_and_the_segmentation_network(ray_session, tmp_path: Path,
                                                                    capsys) -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml", [*SMALL, *RW, *SEG])
    out = tmp_path / "run"
    report = run_pipeline(cfg, str(out))

    evaluation = json.loads((out / "eval" / "rw.json").read_text())
    assert evaluation["num_images"] == 6
    assert report["rw_miou"] == pytest.approx(evaluation["miou"], abs=1e-3)
    assert json.loads((out / "report.json").read_text())["rw_miou"] == report["rw_miou"]
    assert "OC-CSE + random walk" in (out / "report.md").read_text()

    # Confident labels for every training image, from the two CRFs at psa's alphas.
    train = read_list(out / "data/ImageSets/Segmentation/train.txt")
    aff = out / "aff_labels"
    for name in train:
        low = np.array(Image.open(aff / "crf" / "a4" / f"{name}.png"))
        high = np.array(Image.open(aff / "crf" / "a32" / f"{name}.png"))
        np.testing.assert_array_equal(np.array(Image.open(aff / "confident" / f"{name}.png")),
                                      confident_labels(low, high))
    # AffinityNet trained one epoch and validated on the ground-truth pairs.
    result = json.loads((out / "train_aff" / "result.json").read_text())
    assert [epoch["epoch"] for epoch in result["history"]] == [1]
    assert {"val_precision", "val_recall", "loss_bg", "loss_fg", "loss_neg"} <= set(result["history"][0])
    state = torch.load(out / "train_aff" / "model.pth")
    assert "f9.weight" in state and "fc8.weight" not in state
    # One palette label map per validation image, the size of its image.
    for name in read_list(out / "data/ImageSets/Segmentation/val.txt"):
        rw = Image.open(out / "rw" / f"{name}.png")
        assert rw.mode == "P"
        assert rw.size == Image.open(out / "data" / "JPEGImages" / f"{name}.jpg").size
    # The segmentation network learned from the walk's maps of the training images ...
    for name in train:
        assert (aff / "rw" / f"{name}.png").exists()
    seg_result = json.loads((out / "train_seg" / "result.json").read_text())
    assert seg_result["labels_folder"] == str(aff / "rw") and len(seg_result["history"]) == 1
    # ... and seg_miou is the evaluation of exactly what predict wrote for the validation list.
    seg_eval = json.loads((out / "eval" / "seg.json").read_text())
    assert report["seg_miou"] == pytest.approx(seg_eval["miou"], abs=1e-3) and report["seg_labels"] == "rw"
    assert set(report["seg_per_class"]) == set(seg_eval["per_class"])
    assert "segmentation network" in (out / "report.md").read_text()
    val = read_list(out / "data/ImageSets/Segmentation/val.txt")
    again = tmp_path / "predicted"
    argv = ["predict", "--config", str(out / "config.yaml"), "--checkpoint",
            str(out / "train_seg" / "model.pth"), "--list", "val", "--root", str(out / "data"),
            "--out", str(again)]
    assert main(argv) == 0, capsys.readouterr().err
    for name in val:
        np.testing.assert_array_equal(np.array(Image.open(again / f"{name}.png")),
                                      np.array(Image.open(out / "seg" / f"{name}.png")))
    # image, ground truth, ordinary CAM, OC-CSE CAM, OC-CSE - ordinary, OC-CSE + CRF, OC-CSE + RW,
    # segmentation network: 128-pixel cells, 4 apart
    assert Image.open(out / "contact_sheet.png").width == 8 * (128 + 4) + 4
