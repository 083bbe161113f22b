"""The whole chain as one run on a real local Ray: what `cse-ray pipeline --out RUN_DIR` leaves, and a rerun.

configs/smoke.yaml, shrunk further (16 training and 6 validation images of 48 pixels, one epoch per
stage), runs data -> train-cam -> train-cse -> infer + CRF -> evaluate -> pseudo-labels -> report.
The checks follow INTERFACE.md's promise for the run directory; the numbers themselves mean little
on so small a run, so they are checked for consistency with the evaluation files, not for size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from cse_ray.config import from_dict, load_config, thresholds, with_overrides
from cse_ray.data.voc import CATEGORY_NAMES, read_list
from cse_ray.labels import PALETTE
from cse_ray.pipeline import run_pipeline
from cse_ray.rw import confident_labels

REPO = Path(__file__).resolve().parents[1]

SMALL = [
    "data.synth.train=16", "data.synth.val=6", "data.synth.size=48",
    "train_cam.crop=48", "train_cam.resize_long=[40,56]", "train_cam.epochs=1",
    "train_cse.crop=48", "train_cse.resize_long=[40,56]", "train_cse.epochs=1",
]
REPORT_KEYS = ("ordinary_cam_miou", "cse_cam_miou", "cse_crf_miou", "best_threshold", "best_alpha")


def test_pipeline_writes_the_run_directory_and_a_rerun_does_nothing(
    ray_session, tmp_path: Path, capsys
) -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml", [*SMALL, "pipeline.control=true"])
    out = tmp_path / "run"
    report = run_pipeline(cfg, str(out))

    # The run records the config it ran with, paths resolved (the synthetic set under the run).
    saved = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved == with_overrides(cfg, {"data.root": str(out / "data")})

    # report.json: INTERFACE.md's keys, in percent, the same as what run_pipeline returned.
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    for key in ("ordinary_cam_miou", "cse_cam_miou", "cse_crf_miou", "control_cam_miou"):
        assert isinstance(report[key], float), key
    assert report["best_threshold"] in thresholds(cfg.evaluate)
    assert report["best_alpha"] in cfg.crf.alphas

    # The evaluation files behind the report.
    evals = {}
    crf_stems = [f"cse_crf_a{alpha:g}" for alpha in cfg.crf.alphas]
    for stem in ("ordinary_cam", "cse_cam", "control_cam", *crf_stems):
        evals[stem] = json.loads((out / "eval" / f"{stem}.json").read_text())
        assert sorted(evals[stem]["per_class"]) == sorted(CATEGORY_NAMES), stem
        assert evals[stem]["num_images"] == 6, stem
    assert report["ordinary_cam_miou"] == pytest.approx(evals["ordinary_cam"]["miou"], abs=1e-3)
    assert report["cse_cam_miou"] == pytest.approx(evals["cse_cam"]["miou"], abs=1e-3)
    assert report["control_cam_miou"] == pytest.approx(evals["control_cam"]["miou"], abs=1e-3)
    assert report["gain_over_control"] == pytest.approx(report["cse_cam_miou"] - report["control_cam_miou"],
                                                        abs=2e-3)
    # The control trained from the same classifier without the erasing loss.
    control = json.loads((out / "control" / "train_cse" / "result.json").read_text())
    assert [epoch["w"] for epoch in control["history"]] == [0.0]
    assert json.loads((out / "control" / "train_cse" / "classifier.json").read_text())["path"] == str(
        out / "train_cam" / "model.pth")
    assert report["best_threshold"] == evals["cse_cam"]["threshold"]
    assert report["cse_crf_miou"] == pytest.approx(
        evals[f"cse_crf_a{report['best_alpha']:g}"]["miou"], abs=1e-3)
    assert report["cse_crf_miou"] == pytest.approx(
        max(evals[f"cse_crf_a{alpha:g}"]["miou"] for alpha in cfg.crf.alphas), abs=1e-3)
    assert len(evals["cse_cam"]["curve"]) == len(thresholds(cfg.evaluate))

    # A palette PNG for every image of the inference list, the size of its image.
    data = out / "data"
    names = read_list(data / "ImageSets" / "Segmentation" / f"{cfg.data.infer_list}.txt")
    assert len(names) == 6
    assert sorted(p.stem for p in (out / "pseudo_labels").glob("*.png")) == sorted(names)
    for name in names:
        with Image.open(out / "pseudo_labels" / f"{name}.png") as label, \
                Image.open(data / "JPEGImages" / f"{name}.jpg") as image:
            assert label.mode == "P" and label.size == image.size
            assert label.getpalette()[:63] == PALETTE[:63]
            assert set(np.unique(np.asarray(label)).tolist()) <= set(range(21))

    # One manifest row per inferred image, pointing at its pseudo-label.
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(row["name"] for row in rows) == sorted(names)
    assert {row["status"] for row in rows} == {"ok"}
    assert all(row["pseudo_label"] == f"pseudo_labels/{row['name']}.png" for row in rows)
    assert {(row["pseudo_source"], row["pseudo_value"]) for row in rows} == {("crf", report["best_alpha"])}

    # The contact sheet: image, ground truth, ordinary / control / OC-CSE CAMs, where OC-CSE's CAM rose
    # or fell against the control's, CRF; a row per val image.
    with Image.open(out / "contact_sheet.png") as sheet:
        cell, pad, header = 128, 4, 18
        assert sheet.size == (7 * (cell + pad) + pad, header + 6 * (cell + pad) + pad)

    # The same command again: the report is there, so nothing runs and nothing is rewritten.
    watched = [out / "report.json", out / "manifest.parquet", out / "train_cam" / "events.log",
               out / "train_cse" / "events.log", out / "pseudo_labels" / f"{names[0]}.png"]
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in watched}
    capsys.readouterr()
    assert run_pipeline(cfg, str(out)) == report
    assert "already finished" in capsys.readouterr().out
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in watched} == before
    leftovers = [Path(folder, name) for folder, _, files in os.walk(out) for name in files
                 if name.startswith(".") and "ray" not in Path(folder).relative_to(out).parts]
    assert not leftovers  # no temp files of the atomic writes (Ray Train's own folders aside)


def test_the_chain_runs_on_coco_with_81_categories(ray_session, tmp_path: Path) -> None:
    """configs/smoke-coco.yaml: the synthetic set in the COCO layout, converted as `cse-ray data coco`
    does, through train-cam -> train-cse -> infer -> CRF -> evaluate with COCO's 80 classes."""
    from cse_ray.labels import COCO

    cfg = load_config(REPO / "configs" / "smoke-coco.yaml", [
        "data.synth.train=16", "data.synth.val=7", "data.synth.size=48",
        "train_cam.crop=48", "train_cam.resize_long=[40,56]", "train_cam.epochs=1",
        "train_cse.crop=48", "train_cse.resize_long=[40,56]", "train_cse.epochs=1"])
    out = tmp_path / "run"
    report = run_pipeline(cfg, str(out))

    assert json.loads((out / "data" / "coco2014" / "annotations" / "instances_val2014.json").read_text())[
        "categories"][-1]["id"] == 90  # real COCO ids, with gaps
    val = read_list(out / "data" / "ImageSets" / "Segmentation" / "val.txt")
    assert len(val) == 6  # 7 images, one without annotations left out
    for stem in ("ordinary_cam", "cse_cam", *(f"cse_crf_a{alpha:g}" for alpha in cfg.crf.alphas)):
        evaluation = json.loads((out / "eval" / f"{stem}.json").read_text())
        assert list(evaluation["per_class"]) == list(COCO.category_names), stem
        assert len(evaluation["per_class"]) == 81 and evaluation["num_images"] == 6
    assert report["cse_cam_miou"] == pytest.approx(
        json.loads((out / "eval" / "cse_cam.json").read_text())["miou"], abs=1e-3)
    model = torch.load(out / "train_cse" / "model.pth", weights_only=True)
    assert model["fc8.weight"].shape[0] == 80
    for name in val:
        label = np.asarray(Image.open(out / "pseudo_labels" / f"{name}.png"))
        assert label.max() <= 80


def test_the_chain_runs_on_a_dataset_with_its_own_three_classes(ray_session, tmp_path: Path) -> None:
    """Any class count: the synthetic set's 20 classes folded into 3 (k -> k % 3), its masks and
    labels file rewritten, and `data.class_names` naming the three."""
    from cse_ray.data.image_labels import save_labels
    from cse_ray.data.synth import generate
    from cse_ray.formats import read_label_png, write_label_png
    from cse_ray.labels import custom_label_space

    root = tmp_path / "three"
    generate(root, train=16, val=6, size=48, seed=0)
    space = custom_label_space(3)
    labels = {}
    for path in sorted((root / "SegmentationClass").glob("*.png")):
        mask = read_label_png(path)
        folded = np.where((mask > 0) & (mask < 255), (mask.astype(int) - 1) % 3 + 1, mask).astype(np.uint8)
        write_label_png(path, folded)
        labels[path.stem] = np.isin(np.arange(1, 4), folded).astype(np.float32)
    save_labels(root / "cls_labels.npy", labels, space)

    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        *SMALL, "data.synth.enabled=false", f"data.root={root}", "crf.alphas=[6]",
        f"data.class_names={list(space.class_names)}"])
    report = run_pipeline(cfg, str(tmp_path / "run"))

    evaluation = json.loads((tmp_path / "run" / "eval" / "cse_cam.json").read_text())
    assert list(evaluation["per_class"]) == ["background", "class0", "class1", "class2"]
    assert report["cse_cam_miou"] == pytest.approx(evaluation["miou"], abs=1e-3)
    model = torch.load(tmp_path / "run" / "train_cam" / "model.pth", weights_only=True)
    assert model["fc8.weight"].shape[0] == 3
    for path in (tmp_path / "run" / "pseudo_labels").glob("*.png"):
        assert np.asarray(Image.open(path)).max() <= 3


def test_use_gpu_true_of_a_later_stage_stops_the_chain_before_training(ray_session, tmp_path: Path) -> None:
    """infer.use_gpu: true on a cluster without GPUs is refused before train-cam starts, not after it."""
    from cse_ray.errors import UserError

    cfg = load_config(REPO / "configs" / "smoke.yaml", [*SMALL, "infer.use_gpu=true"])
    out = tmp_path / "run"
    with pytest.raises(UserError, match="config key infer.use_gpu: true, but the Ray cluster has no GPU"):
        run_pipeline(cfg, str(out))
    assert not (out / "train_cam").exists()


def test_a_training_inference_list_gets_the_crf_at_the_alpha_chosen_on_val_and_trains_the_segmenter(
    ray_session, tmp_path: Path
) -> None:
    """configs/demo.yaml's shape: pseudo-labels for the training images, the alpha chosen on val; with
    the random walk on, the same inference pass makes AffinityNet's confident labels."""
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        *SMALL, "data.infer_list=train", "crf.alphas=[4,12]", "pipeline.seg=true", "train_seg.labels=pseudo",
        "train_seg.crop=48", "train_seg.resize_long=[40,56]", "predict.scales=[1.0]",
        "pipeline.rw=true", "train_aff.crop=48", "train_aff.resize_long=[40,56]", "train_aff.epochs=1",
        "train_aff.init=eraser", "rw.logt=6"])
    out = tmp_path / "run"
    report = run_pipeline(cfg, str(out))

    # val got every alpha (the choice and the report's table); the training list the chosen one and
    # psa's two (rw.low_alpha 4, rw.high_alpha 32) for the confident labels.
    alpha = report["best_alpha"]
    assert sorted(path.name for path in (out / "val" / "crf").iterdir()) == ["a12", "a4"]
    assert {path.name for path in (out / "crf").iterdir()} == {f"a{alpha:g}", "a4", "a32"}
    train = read_list(out / "data" / "ImageSets" / "Segmentation" / "train.txt")
    assert sorted(path.stem for path in (out / "pseudo_labels").glob("*.png")) == sorted(train)
    assert report["pseudo_labels"] == {"source": "crf", "value": alpha}
    for name in train[:3]:  # each pseudo-label is the chosen CRF map of its image
        assert (out / "pseudo_labels" / f"{name}.png").read_bytes() == \
            (out / "crf" / f"a{alpha:g}" / f"{name}.png").read_bytes()

    # Confident labels from those maps, no second inference of the training images; the walk refines
    # val only (the segmentation network learns from the CRF's pseudo-labels, not from a walk).
    for name in train:
        low, high = (np.array(Image.open(out / "crf" / a / f"{name}.png")) for a in ("a4", "a32"))
        np.testing.assert_array_equal(np.array(Image.open(out / "aff_labels" / "confident" / f"{name}.png")),
                                      confident_labels(low, high))
    assert sorted(path.name for path in (out / "aff_labels").iterdir()) == ["confident"]
    assert not (out / "rw").exists()
    val = read_list(out / "data" / "ImageSets" / "Segmentation" / "val.txt")
    assert sorted(path.stem for path in (out / "val" / "rw").glob("*.png")) == sorted(val)
    assert report["rw_miou"] == pytest.approx(json.loads((out / "eval" / "rw.json").read_text())["miou"],
                                              abs=1e-3)

    # The segmentation network learned from them, and seg_miou is its prediction on val.
    seg = json.loads((out / "train_seg" / "result.json").read_text())
    assert seg["labels_folder"] == str(out / "pseudo_labels")
    assert report["seg_labels"] == "pseudo"
    assert report["seg_miou"] == pytest.approx(json.loads((out / "eval" / "seg.json").read_text())["miou"],
                                               abs=1e-3)
