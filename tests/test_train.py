"""Training on a real local Ray cluster: train-cam then train-cse, resume, a worker fault, 1 vs 2 workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from PIL import Image
from small_runs import SMALL_TRAINING

from cse_ray.cli import main
from cse_ray.config import load_config, with_overrides
from cse_ray.data.voc import read_list
from cse_ray.models import build_classifier, load_weights
from cse_ray.train import TEST_FAULT_ENV, TEST_NAN_ENV, train_cam, train_cse
from cse_ray.train.checkpoints import STATE_FILE, checkpoint_name

REPO = Path(__file__).resolve().parents[1]

SMALL = SMALL_TRAINING  # tests/small_runs.py


def small_config(*overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [*SMALL, *overrides])


def test_train_cam_then_cse_on_two_workers(ray_session, tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    cfg = small_config("train_cam.num_workers=2", "train_cse.num_workers=2")
    cam = train_cam(cfg, out)
    cse = train_cse(cfg, out)
    for stage, summary in (("train_cam", cam), ("train_cse", cse)):
        assert [h["epoch"] for h in summary["history"]] == [1, 2]
        kept = summary["history"][summary["best_epoch"] - 1]
        assert (summary["best_miou"], summary["best_threshold"]) == (kept["val_miou"], kept["val_threshold"])
        model = build_classifier("resnet38d_tiny")
        report = load_weights(model, summary["model"])  # strict: every entry present
        assert report.complete
        # model.pth holds the kept epoch's weights, the same as that epoch's checkpoint.
        checkpoint = Path(summary["checkpoints"], stage, checkpoint_name(summary["best_epoch"]), STATE_FILE)
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert saved["state"]["epoch"] == summary["best_epoch"]
        assert all(torch.equal(value, saved["model"][key]) for key, value in model.state_dict().items())
        epochs = sorted(p.name for p in (tmp_path / "run" / stage / "ray" / stage).glob("epoch_*"))
        assert epochs == [checkpoint_name(1), checkpoint_name(2)]  # CheckpointConfig keeps the newest two
        assert list((tmp_path / "run" / "tensorboard" / stage).glob("events.out.tfevents.*"))
    assert cse["history"][1]["w"] == pytest.approx(0.3 + 0.05)  # w = cc_init + cc_slope * epoch
    assert cam["best_epoch"] == 2  # train_cam keeps its last epoch (psa's train_cls)
    scores = [h["val_miou"] for h in cse["history"]]
    assert cse["best_epoch"] == scores.index(max(scores)) + 1  # train_cse keeps its best (OC-CSE)
    classifier_record = json.loads((tmp_path / "run" / "train_cse" / "classifier.json").read_text())
    assert classifier_record["path"].endswith("train_cam/model.pth")

    # Run again: finished stages only say so.
    events = (tmp_path / "run" / "train_cse" / "events.log").read_text()
    assert train_cse(cfg, out)["best_epoch"] == cse["best_epoch"]
    assert (tmp_path / "run" / "train_cse" / "events.log").read_text() == events


def test_a_worker_that_dies_is_restarted_from_the_last_checkpoint(ray_session, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(TEST_FAULT_ENV, "2")  # rank 0 exits once at the start of epoch 2
    out = tmp_path / "run"
    summary = train_cam(small_config("train_cam.epochs=3"), str(out))
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    starts = [line.split()[-2] for line in (out / "train_cam" / "events.log").read_text().splitlines()]
    assert starts == ["1", "2", "2", "3"]  # epoch 2 ran again after the crash, epoch 1 did not


def test_one_and_two_workers_see_the_same_first_step(ray_session, tmp_path: Path) -> None:
    """Dropout on (0.3 / 0.5): with `dropout_rng: sample` each sample's masks follow it to its worker."""
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pth"
    torch.save(build_classifier("resnet38d_tiny").state_dict(), classifier)
    losses = []
    for workers in (1, 2):
        cfg = small_config(
            f"train_cse.num_workers={workers}", "train_cse.batch_size=16", "train_cse.epochs=1",
            "train_cse.dropout=[0.3,0.5]", "train_cse.dropout_rng=sample",
            f"train_cse.classifier={classifier}", "train_cse.freeze=reference",
        )
        summary = train_cse(cfg, str(tmp_path / f"w{workers}"))
        losses.append(summary["history"][0])  # 16 images, batch 16: the epoch is one step
    for key in ("loss", "loss_cls", "loss_erase", "mask_mean"):  # the mask shows the dropout masks
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-4, abs=1e-6), key


def test_use_gpu_true_on_a_cluster_without_gpus_stops_before_training(ray_session, tmp_path: Path) -> None:
    from cse_ray.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError, match="config key train_cam.use_gpu: true, but the Ray cluster has no GPU"):
        train_cam(small_config("train_cam.use_gpu=true"), str(out))
    assert not (out / "train_cam").exists()  # no epoch started, nothing written for the stage


def test_bad_inputs_stop_before_ray_starts(tmp_path: Path) -> None:
    """Exit code 2 with the cause named, and no Ray session was created (its temp dir stays empty)."""
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir)}
    env.pop("RAY_ADDRESS", None)
    cases = [
        (["train-cse", "train_cse.classifier=/nonexistent/od_cam.pth"],
         "train_cse.classifier: /nonexistent/od_cam.pth not found"),
        (["train-cam", "train_cam.batch_size=32"], "train_cam.batch_size: 32 is more than the 16 images"),
        (["train-cam", "model.backbone=resnet99"], "unknown model 'resnet99'"),
    ]
    for (command, *overrides), message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "cse_ray.cli", command, "--config", str(REPO / "configs" / "smoke.yaml"),
             "--out", str(tmp_path / "run"), *SMALL, *overrides],
            capture_output=True, text=True, env=env, cwd=REPO,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not any(ray_dir.iterdir())


def test_an_image_without_any_class_stops_train_cse_naming_it(tmp_path: Path) -> None:
    from cse_ray.data.prepare import resolve_data_root
    from cse_ray.errors import UserError
    from cse_ray.train import prepare_stage

    cfg = load_config(REPO / "configs" / "smoke.yaml", SMALL)
    root = Path(resolve_data_root(cfg, str(tmp_path)))
    name = read_list(root / "ImageSets" / "Segmentation" / "train.txt")[3]
    annotation = root / "Annotations" / f"{name}.xml"  # where the image-level labels are read from
    tree = ElementTree.parse(annotation)
    for obj in tree.getroot().findall("object"):
        tree.getroot().remove(obj)
    tree.write(annotation)
    mask = root / "SegmentationClass" / f"{name}.png"
    Image.fromarray(np.zeros_like(np.array(Image.open(mask)))).save(mask)  # background only
    (root / "cls_labels.npy").unlink(missing_ok=True)  # no stale label cache
    with pytest.raises(UserError, match=rf"data.train_list: 1 of 16 images have no foreground class "
                                        rf"\(first: {name}\)"):
        prepare_stage("train_cse", with_overrides(cfg, {"data.root": str(root)}), str(tmp_path))


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        ray_session, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(TEST_NAN_ENV, "2")  # the loss turns NaN at the second step of epoch 2
    out = tmp_path / "run"
    code = main(["train-cam", "--config", str(REPO / "configs" / "smoke.yaml"), "--out", str(out), *SMALL,
                 "train_cam.epochs=3"])
    error = capsys.readouterr().err
    assert code == 1  # a failed run, not bad input (2); the message says why, no traceback
    assert re.search(r"cse-ray train-cam: failed: train_cam: the loss became NaN or infinite at step 3 "
                     r"\(epoch 2\).*last good checkpoint \(epoch 1\); rerun with a lower "
                     r"train_cam\.lr", error)
    assert "Traceback" not in error
    assert json.loads((out / "train_cam" / "latest.json").read_text()) == {"epoch": 1}
    assert not (out / "train_cam" / "result.json").exists()
    model = build_classifier("resnet38d_tiny")
    load_weights(model, out / "train_cam" / "model.pth")  # epoch 1's weights, finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
