"""Config: YAML + dotted overrides, validated before any work (exit code 2 naming the key)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cse_ray.config import from_dict, load_config, thresholds, to_dict, with_overrides
from cse_ray.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg  # round trip through plain dicts (checkpoints, Tune)


def test_defaults_are_the_papers() -> None:
    cfg = load_config(None, ["data.root=/voc"])
    assert (cfg.train_cse.lr, cfg.train_cse.batch_size, cfg.train_cse.epochs) == (0.01, 8, 15)
    assert (cfg.train_cse.cc_init, cfg.train_cse.cc_slope, cfg.train_cse.seed) == (0.3, 0.05, 4242)
    assert (cfg.train_cam.lr, cfg.train_cam.batch_size, cfg.train_cam.crop) == (0.1, 16, 448)
    assert cfg.train_cse.momentum_mode == "faithful" and cfg.train_cse.mask_norm == "batch"
    assert cfg.crf.alphas == (6.0, 10.0, 24.0)
    assert thresholds(cfg.evaluate)[:3] == (0.1, 0.11, 0.12) and len(thresholds(cfg.evaluate)) == 30


def test_dotted_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["train_cse.lr=0.2", "crf.alphas=[4, 32]",
                                                      "train_cam.use_gpu=false", "infer.scales=1.0"])
    assert cfg.train_cse.lr == 0.2 and cfg.crf.alphas == (4.0, 32.0)
    assert cfg.train_cam.use_gpu == "false" and cfg.infer.scales == (1.0,)
    assert with_overrides(cfg, {"train_cse.cc_init": 0.5}).train_cse.cc_init == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train_cse.lr=-0.1", "train_cse.lr: -0.1 is outside"),
        ("train_cse.lrr=0.1", "train_cse.lrr: unknown key"),
        ("crf.alpha=3", "crf.alpha: unknown key"),
        ("infer.threshold=1.5", "infer.threshold: 1.5 is outside"),
        ("train_cam.crop=8", "train_cam.crop: 8 is outside"),
        ("train_cam.num_workers=0", "train_cam.num_workers: 0 is outside"),
        ("train_cam.epochs=two", "train_cam.epochs: expected an integer"),
        ("train_cam.bf16=maybe", "train_cam.bf16: expected true or false"),
        ("train_cse.mask_norm=pixel", "train_cse.mask_norm: 'pixel' is not one of"),
        ("train_cse.batch_size=7", "train_cse.batch_size: 7 is not divisible"),
        ("evaluate.threshold_stop=0.05", "evaluate.threshold_stop"),
        ("model=3", "model: expected a section"),
        ("nokey", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    overrides = ["train_cse.num_workers=2"] if "divisible" in message else []
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(REPO / "configs" / "smoke.yaml", [*overrides, override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train_cse: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text("train_cse: {lr: 0.1}\n")
    with pytest.raises(UserError, match="data.root"):
        load_config(no_data)


def test_cli_refuses_a_bad_config_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    for command in ("train-cam", "train-cse", "infer", "tune", "pipeline"):
        proc = subprocess.run(
            [sys.executable, "-m", "cse_ray.cli", command, "--config", str(REPO / "configs" / "smoke.yaml"),
             "--out", str(tmp_path / "run"), "train_cse.lr=-1"],
            capture_output=True, text=True, cwd=REPO,
        )
        assert proc.returncode == 2, proc.stderr
        assert "train_cse.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def test_the_threshold_grid_is_evaluations_grid() -> None:
    """config.thresholds is metrics.threshold_grid: a stop off the grid is never exceeded."""
    from cse_ray.metrics import threshold_grid

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["evaluate.threshold_stop=0.395"])
    grid = thresholds(cfg.evaluate)
    assert grid == tuple(threshold_grid(0.1, 0.395, 0.01).tolist())
    assert (len(grid), grid[0], grid[-1]) == (30, 0.1, 0.39)


def test_a_grid_that_evaluation_refuses_exits_2_naming_the_step(tmp_path: Path) -> None:
    """start 0.99, stop 1.0, step 0.015: the grid would hold only 0.99. Refused at load, before any work."""
    overrides = ["evaluate.threshold_start=0.99", "evaluate.threshold_stop=1.0",
                 "evaluate.threshold_step=0.015"]
    with pytest.raises(UserError, match=r"config key evaluate\.threshold_step: threshold step 0\.015 is "):
        load_config(REPO / "configs" / "smoke.yaml", overrides)
    proc = subprocess.run(
        [sys.executable, "-m", "cse_ray.cli", "train-cam", "--config", str(REPO / "configs" / "smoke.yaml"),
         "--out", str(tmp_path / "run"), *overrides],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert "config key evaluate.threshold_step" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_config_reference_lists_every_key() -> None:
    import dataclasses

    from cse_ray.config import Config

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    reference = (REPO / "docs" / "CONFIG.md").read_text()
    missing = [key for key in keys(Config) if f"| `{key}` |" not in reference]
    assert not missing, f"docs/CONFIG.md lacks {missing}"


def test_infer_format_seed_is_shorthand_for_save_seed() -> None:
    from cse_ray.cli import build_parser, command_config

    args = build_parser().parse_args(
        ["infer", "--config", str(REPO / "configs" / "smoke.yaml"), "--format", "seed", "crf.enabled=false"])
    cfg = command_config(args)
    assert cfg.infer.save_seed and not cfg.crf.enabled
    plain = build_parser().parse_args(["infer", "--config", str(REPO / "configs" / "smoke.yaml")])
    assert not command_config(plain).infer.save_seed


def test_relative_paths_become_absolute_on_the_driver(tmp_path: Path, monkeypatch) -> None:
    """Ray workers run in other directories, so commands resolve local paths before Ray starts."""
    from cse_ray import artifacts
    from cse_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        "data.root=voc", "data.train_list=lists/train.txt", "data.val_list=val",
        "train_cse.classifier=s3://bucket/cam.pth", "infer.checkpoint=eraser.pth",
    ])
    resolved = with_absolute_paths(cfg)
    assert resolved.data.root == str(tmp_path / "voc")
    assert resolved.data.train_list == str(tmp_path / "lists" / "train.txt")
    assert resolved.data.val_list == "val"  # a list name, not a path
    assert resolved.train_cse.classifier == "s3://bucket/cam.pth"  # URIs stay as they are
    assert resolved.infer.checkpoint == str(tmp_path / "eraser.pth")
    assert resolved.model.pretrained == ""  # empty means "none", not the current directory
    assert with_absolute_paths(resolved) == resolved
    assert artifacts.absolute("runs/demo") == str(tmp_path / "runs" / "demo")
