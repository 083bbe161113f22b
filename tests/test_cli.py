"""`cse-ray` through `main()`, as a user types it: the utility commands, --version, --help, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cse_ray import __version__, formats
from cse_ray.cli import build_parser, main
from cse_ray.data.voc import read_list

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """`cse-ray synth` on a tiny set: the dataset the other commands read."""
    out = tmp_path_factory.mktemp("synth") / "voc"
    code = main(["synth", "--out", str(out), "--train", "6", "--val", "3", "--size", "48", "--seed", "1"])
    assert code == 0
    return out


def test_version_and_help_speak_to_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"cse-ray {__version__}"
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "weakly supervised semantic segmentation" in text and "examples:" in text
    assert "Exit codes" not in text  # the module docstring is for developers


def test_every_option_has_help():
    undocumented = []

    def walk(parser, path):
        for action in parser._actions:  # argparse keeps no public list of a parser's options
            if isinstance(action.choices, dict):  # the subcommands
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not action.help:
                undocumented.append(f"{path}: {action.option_strings or action.dest}")

    walk(build_parser(), "cse-ray")
    assert not undocumented


def test_synth_writes_the_voc_layout_with_the_requested_counts(synthetic: Path):
    lists = synthetic / "ImageSets" / "Segmentation"
    assert len(read_list(lists / "train.txt")) == 6 and len(read_list(lists / "val.txt")) == 3
    name = read_list(lists / "val.txt")[0]
    image = formats.read_image(synthetic / "JPEGImages" / f"{name}.jpg")
    mask = formats.read_label_png(synthetic / "SegmentationClass" / f"{name}.png")
    assert max(image.shape[:2]) == 48 and mask.shape == image.shape[:2]


def test_synth_design_flags_reach_the_set(tmp_path: Path):
    """The design options on the command line are the set's: synth.json records them."""
    out = tmp_path / "voc"
    assert main(["synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "48",
                 "--body-texture", "family", "--partless", "0.5", "--part-place", "end"]) == 0
    options = json.loads((out / "synth.json").read_text())["options"]
    assert (options["body_texture"], options["partless"], options["part_place"]) == ("family", 0.5, "end")


def test_data_lists_writes_the_lists_and_labels(synthetic: Path, tmp_path: Path, capsys):
    assert main(["data", "lists", "--root", str(synthetic), "--out", str(tmp_path / "lists")]) == 0
    printed = capsys.readouterr().out
    for name in ("train", "val", "train_aug"):
        assert (tmp_path / "lists" / f"{name}.txt").is_file() and f"{name}:" in printed
    train = read_list(tmp_path / "lists" / "train.txt")
    assert read_list(tmp_path / "lists" / "train_aug.txt") == train  # no SBD: train_aug is train


def test_data_lists_on_a_missing_root_exits_2_naming_it(tmp_path: Path, capsys):
    assert main(["data", "lists", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_weights_convert_strips_the_dataparallel_prefix(tmp_path: Path, capsys):
    from cse_ray.models import build_classifier

    model = build_classifier("resnet38d_tiny")
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "dp.pth")
    code = main(["weights", "convert", str(tmp_path / "dp.pth"), str(tmp_path / "plain.pth"),
                 "--model", "resnet38d_tiny"])
    assert code == 0, capsys.readouterr().err
    plain = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert sorted(plain) == sorted(model.state_dict())
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


def test_evaluate_labels_against_themselves(synthetic: Path, tmp_path: Path, capsys):
    """Predictions equal to the ground truth: IoU 100 for every category present, 0 for absent ones."""
    gt_dir = synthetic / "SegmentationClass"
    names = read_list(synthetic / "ImageSets" / "Segmentation" / "val.txt")
    present = set()
    for name in names:
        mask = formats.read_label_png(gt_dir / f"{name}.png")
        formats.write_label_png(tmp_path / "pred" / f"{name}.png", mask)
        present |= {int(v) for v in np.unique(mask) if v != 255}
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(gt_dir), "--task", "label",
                 "--list", str(synthetic / "ImageSets" / "Segmentation" / "val.txt"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["num_images"] == 3 and len(report["per_class"]) == 21
    values = list(report["per_class"].values())
    assert [v for k, v in enumerate(values) if k in present] == [100.0] * len(present)
    assert all(v == 0.0 for k, v in enumerate(values) if k not in present)
    assert report["miou"] == pytest.approx(100.0 * len(present) / 21, abs=1e-3)


def test_evaluate_with_a_missing_prediction_exits_2_naming_it(synthetic: Path, tmp_path: Path, capsys):
    (tmp_path / "pred").mkdir()
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(synthetic / "SegmentationClass"),
                 "--list", str(synthetic / "ImageSets" / "Segmentation" / "val.txt"), "--task", "label"])
    err = capsys.readouterr().err
    assert code == 2 and "have no predictions" in err and "Traceback" not in err


def test_a_refused_stage_writes_nothing(tmp_path: Path, capsys):
    out = tmp_path / "run"
    code = main(["train-cam", "--config", str(REPO / "configs" / "smoke.yaml"), "--out", str(out),
                 "data.synth.enabled=false", f"data.root={tmp_path / 'no-such-voc'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-voc" in err and "JPEGImages" in err and "Traceback" not in err
    assert not out.exists()
