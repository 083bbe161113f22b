"""Ray Tune sweeps on a real local Ray cluster: a resumed sweep end to end, ASHA early stopping, bad spaces.

Every sweep trains real (tiny) networks: 16 images of 48 px, `resnet38d_tiny`, one Train worker per trial.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from small_runs import SMALL_TRAINING

from cse_ray.config import load_config, thresholds
from cse_ray.errors import UserError
from cse_ray.formats import save_cam_npz, write_label_png
from cse_ray.layout import RunLayout
from cse_ray.models import build_classifier
from cse_ray.train import prepare_stage
from cse_ray.tune import (
    TEST_STOP_ENV,
    SweepInterrupted,
    choose_on_outputs,
    parse_space,
    run_tune,
    saved_statuses,
)

REPO = Path(__file__).resolve().parents[1]
TUNE_SMOKE = REPO / "configs" / "tune-smoke.yaml"

SMALL = SMALL_TRAINING  # tests/small_runs.py


def small_config(*overrides: str):
    return load_config(TUNE_SMOKE, [*SMALL, *overrides])


def reserved_placement_groups() -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"]


def events_logs(out: Path, trial_ids) -> dict[str, str]:
    """Trial id -> its train-cse events.log (a line per epoch start: reruns show up as new lines)."""
    return {t: (out / "trials" / t / "train_cse" / "events.log").read_text() for t in trial_ids}


def test_interrupted_sweep_resumes_and_leaves_a_runnable_best_config(ray_session, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    cfg = small_config()

    # First run: interrupted (as by Ctrl+C) once two trials have finished.
    monkeypatch.setenv(TEST_STOP_ENV, "2")
    with pytest.raises(SweepInterrupted):
        run_tune(cfg, str(out))
    assert not reserved_placement_groups()  # stopped trials left no reserved resources behind
    statuses = saved_statuses(str(out / "tune" / "sweep"))  # what Tune saved for the resume
    finished = sorted(t for t, status in statuses.items() if status == "TERMINATED")
    assert len(finished) >= 2
    assert len(finished) < 4  # the interruption left work to resume
    assert not (out / "trials.parquet").exists() and not (out / "best_config.yaml").exists()
    events_before = events_logs(out, finished)

    # Same command again: resumes; the finished trials are not rerun.
    monkeypatch.delenv(TEST_STOP_ENV)
    summary = run_tune(cfg, str(out))
    assert events_logs(out, finished) == events_before

    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(table) == 4 and len({row["trial_id"] for row in table}) == 4
    for row in table:
        assert row["status"] in ("TERMINATED", "EARLY_STOPPED"), row
        assert row["train_cse.cc_init"] in (0.1, 0.3)
        assert 0.01 <= row["train_cse.lr"] <= 0.1
        assert 1 <= row["epochs_run"] <= 2
        if row["status"] == "TERMINATED":  # a finished trial's best is its train-cse run's own record
            result = json.loads(Path(row["out_dir"], "train_cse", "result.json").read_text())
            assert row["best_val_miou"] == pytest.approx(result["best_miou"])
        assert Path(row["out_dir"], "train_cse", "model.pth").is_file()
    best_row = max(table, key=lambda row: row["best_val_miou"])
    assert summary.best_val_miou == pytest.approx(best_row["best_val_miou"])

    # The post-hoc search recorded a threshold from the sweep range and one of the CRF alphas.
    assert summary.threshold in thresholds(cfg.evaluate)
    assert summary.alpha in (6.0, 10.0)
    assert (out / "posthoc" / "eval_cam.json").is_file()
    assert (out / "tensorboard" / "tune" / summary.best_trial).is_dir()

    # best_config.yaml loads as a train-cse config, with the best values, and would start as it is.
    best = load_config(out / "best_config.yaml")
    assert best.train_cse.cc_init == summary.best_params["train_cse.cc_init"]
    assert best.train_cse.lr == pytest.approx(summary.best_params["train_cse.lr"])
    assert best.infer.threshold == summary.threshold and best.crf.pseudo_alpha == summary.alpha
    assert Path(best.train_cse.classifier) == (out / "train_cam" / "model.pth").resolve()
    assert prepare_stage("train_cse", best, str(tmp_path / "rerun")).classifier == best.train_cse.classifier

    # A finished sweep only says so.
    again = run_tune(cfg, str(out))
    assert again.already_finished and again.best_trial == summary.best_trial


def test_asha_stops_the_clearly_worse_trial_early(ray_session, tmp_path):
    """Two trials run one after the other; the second scores its CAMs at threshold 0 only (every
    positive pixel is foreground), so its val mIoU is far below the first's and ASHA stops it at epoch 1."""
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pth"
    torch.save(build_classifier("resnet38d_tiny").state_dict(), classifier)
    cfg = small_config(
        f"train_cse.classifier={classifier}", "evaluate.threshold_start=0.0",
        "tune.space={evaluate.threshold_stop: {grid: [0.39, 0.0]}}", "tune.num_samples=1",
        "tune.max_concurrent_trials=1", "tune.grace_period=1", "tune.reduction_factor=2",
    )
    summary = run_tune(cfg, str(tmp_path / "sweep"))
    rows = {row["params"]["evaluate.threshold_stop"]: row for row in summary.trials}
    assert rows[0.39]["status"] == "TERMINATED" and rows[0.39]["epochs_run"] == 2
    assert rows[0.0]["status"] == "EARLY_STOPPED" and rows[0.0]["epochs_run"] == 1
    assert rows[0.0]["best_val_miou"] < rows[0.39]["best_val_miou"]
    assert summary.best_trial == rows[0.39]["trial_id"]
    assert not (tmp_path / "sweep" / "train_cam").exists()  # the given classifier was used as is


def test_a_diverging_trial_is_recorded_and_does_not_abort_the_sweep(ray_session, tmp_path):
    """A loss that becomes NaN reports no val mIoU; the sweep records the trial as DIVERGED."""
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pth"
    torch.save(build_classifier("resnet38d_tiny").state_dict(), classifier)
    cfg = small_config(
        f"train_cse.classifier={classifier}", "train_cse.epochs=1", "tune.scheduler=none",
        "tune.space={train_cse.lr: {grid: [1.0e+12]}}", "tune.num_samples=1",
    )
    out = tmp_path / "sweep"
    with pytest.raises(RuntimeError, match="no trial produced a checkpoint"):
        run_tune(cfg, str(out))
    (row,) = pq.read_table(out / "trials.parquet").to_pylist()
    assert row["status"] == "DIVERGED" and row["train_cse.lr"] == 1.0e12
    assert "NaN or infinite" in (out / "trials" / row["trial_id"] / "train_cse" / "failed.json").read_text()


BAD_SPACES = [  # (override, what the error names)
    ("tune.space={train_cse.nope: {choice: [1, 2]}}", "tune.space.train_cse.nope: unknown key 'nope'"),
    ("tune.space={train_cse.lr: {between: [0.1, 1]}}", "tune.space.train_cse.lr: expected exactly one"),
    ("tune.space={train_cse.lr: {grid: [0.1], choice: [0.2]}}", "tune.space.train_cse.lr: expected exactly"),
    ("tune.space={train_cse.lr: {loguniform: [0, 0.1]}}", "tune.space.train_cse.lr: loguniform needs lo > 0"),
    ("tune.space={train_cse.lr: {uniform: [0.1]}}", "tune.space.train_cse.lr: uniform needs two numbers"),
    ("tune.space={train_cse.lr: {choice: [0.01, -1]}}", "tune.space.train_cse.lr: value -1 is refused"),
    ("tune.space={train_cse.init: {uniform: [0, 1]}}", "tune.space.train_cse.init: uniform needs a numeric"),
    ("tune.space={data.synth.seed: {choice: [0, 1]}}", "tune.space.data.synth.seed: cannot be searched"),
    ("tune.space={train_cse: {choice: [1]}}", "tune.space.train_cse: train_cse is a section"),
    ("tune.search_alg=optuna", "tune.space.train_cse.cc_init: grid is not supported with tune.search_alg"),
]


@pytest.mark.parametrize(("override", "message"), BAD_SPACES)
def test_bad_search_spaces_are_refused_before_any_work(override: str, message: str, tmp_path: Path) -> None:
    overrides = [override]
    if override == "tune.search_alg=optuna":
        overrides.append("tune.space={train_cse.cc_init: {grid: [0.1, 0.3]}}")
    with pytest.raises(UserError, match=re.escape(message)):
        run_tune(small_config(*overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # no data generated, no classifier trained, no Ray run


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_search_needs_the_optional_dependency(tmp_path: Path) -> None:
    message = "config key tune.search_alg: optuna is not installed (pip install 'cse-ray[optuna]'"
    with pytest.raises(UserError, match=re.escape(message)):
        run_tune(small_config("tune.search_alg=optuna"), str(tmp_path / "run"))


def test_space_syntax_nested_keys_integers_and_the_default_space() -> None:
    # The command-line form `tune.space.SECTION.KEY=SPEC` nests the key; both forms mean the same.
    nested = parse_space(small_config("tune.space.train_cse.batch_size={grid: [4, 8]}"))
    assert nested["train_cse.batch_size"].values == (4, 8)
    assert nested["train_cse.lr"].spec() == {"loguniform": [0.01, 0.1]}  # from tune-smoke.yaml
    integers = parse_space(small_config("tune.space={train_cse.epochs: {uniform: [1, 3]}}"))
    assert integers["train_cse.epochs"].values == (1, 3)
    assert isinstance(integers["train_cse.epochs"].values[0], int)
    default = parse_space(small_config("tune.space={}"))
    assert set(default) == {"train_cse.cc_init", "train_cse.cc_slope", "train_cse.lr"}


def test_cli_refuses_a_bad_space_with_exit_code_2_and_no_ray(tmp_path: Path) -> None:
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cse_ray.cli", "tune", "--config", str(TUNE_SMOKE),
         "--out", str(tmp_path / "run"), *SMALL, "tune.space={train_cse.lr: {grid: 0.1}}"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert "tune.space.train_cse.lr: grid needs a non-empty list" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(ray_dir.iterdir()) and not (tmp_path / "run").exists()


def test_posthoc_choice_follows_the_pipeline_rules_on_tied_outputs(tmp_path: Path) -> None:
    """Threshold and alpha are chosen on the same outputs as `cse-ray pipeline` chooses them: CAM
    thresholds tie on a plateau (the lowest wins) and two alphas' CRF maps tie (the smallest wins,
    although `crf.alphas` lists the larger first)."""
    from cse_ray.pipeline import evaluate_run

    root, run = tmp_path / "data", RunLayout.at(tmp_path / "run")
    names = ["img_a", "img_b"]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    # One class (index 0, label 1) on the left half. CAM scores: 0.9 on the object, 0.3 on its last
    # column, 0.2 on the first background column, 0.05 elsewhere: every threshold in [0.2, 0.3) is best.
    gt = np.zeros((8, 8), np.uint8)
    gt[:, :4] = 1
    cam = np.full((1, 8, 8), 0.05, np.float32)
    cam[0, :, :4], cam[0, :, 3], cam[0, :, 4] = 0.9, 0.3, 0.2
    good, bad = gt.copy(), np.zeros_like(gt)
    for name in names:
        write_label_png(root / "SegmentationClass" / f"{name}.png", gt)
        save_cam_npz(run.posthoc.cam(name), cam, [0])
        for alpha, label in ((10.0, good), (6.0, good), (24.0, bad)):
            write_label_png(run.posthoc.crf(alpha, name), label)
    cfg = small_config("data.synth.enabled=false", f"data.root={root}", "data.val_list=val",
                       "crf.alphas=[10, 6, 24]")

    choice = choose_on_outputs(cfg, run.posthoc, names)
    pipeline = evaluate_run(cfg, run, str(root), names, val_out=run.posthoc, ordinary=run.posthoc)

    assert choice.threshold == pipeline.cse_cam.threshold
    assert choice.alpha == pipeline.best_alpha == 6.0
    assert choice.crf_miou["10"] == choice.crf_miou["6"] > choice.crf_miou["24"]
    grid = thresholds(cfg.evaluate)
    assert choice.threshold == min(t for t in grid if t >= 0.2)  # the lowest of the tied best
    assert choice.cam_miou == pytest.approx(pipeline.cse_cam.miou)
    assert Path(run.posthoc.eval_json("eval_crf_a6")).is_file()
