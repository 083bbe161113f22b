"""train-seg: the segmentation network on pseudo-labels, its crops, the checks before Ray, and on a real
local Ray Train a run on two workers that loses a worker, resumes and finishes.

The pseudo-labels here are the synthetic set's ground-truth masks (`train_seg.labels_dir`), so the stage
is tested without running inference and the random walk first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from small_runs import SMALL_TRAINING

from cse_ray.cli import main
from cse_ray.config import load_config
from cse_ray.data.prepare import load_split, resolve_data_root
from cse_ray.data.voc import read_list
from cse_ray.errors import UserError
from cse_ray.formats import read_image, read_label_png, write_label_png
from cse_ray.labels import VOC
from cse_ray.models import build_segmenter, load_weights
from cse_ray.segment import label_from_probabilities, predict_probabilities
from cse_ray.train import TEST_FAULT_ENV, train_seg
from cse_ray.train.segmentation import SegmentationDataset
from cse_ray.train.segmentation_plan import SegLabels, has_ground_truth

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
# From scratch (no model.pretrained) on the 16 training images; smoke.yaml's infer_list is val.
SMALL = [*SMALL_TRAINING, "train_seg.init=pretrained", "train_seg.freeze=none", "train_seg.train_list=train"]
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def synthetic_run(tmp_path: Path, *overrides: str) -> tuple[list[str], Path, Path]:
    """(the `cse-ray train-seg` arguments, the run directory, its synthetic root) with the dataset written."""
    out = tmp_path / "run"
    args = ["--config", SMOKE, "--out", str(out), *SMALL, *overrides]
    root = Path(resolve_data_root(load_config(SMOKE, [*SMALL, *overrides]), str(out)))
    return ["train-seg", *args], out, root


def copy_masks(root: Path, folder: Path) -> list[str]:
    """The training images' ground-truth masks as their pseudo-labels; returns the names."""
    names = read_list(root / "ImageSets/Segmentation/train.txt")
    for name in names:
        write_label_png(folder / f"{name}.png", read_label_png(root / "SegmentationClass" / f"{name}.png"))
    return names


def test_the_crop_pads_the_label_with_255_and_draws_from_seed_epoch_and_index(tmp_path: Path) -> None:
    from cse_ray.data.synth import generate

    root = tmp_path / "voc"
    generate(str(root), train=2, val=1, size=32, seed=0)
    name = read_list(root / "ImageSets/Segmentation/train.txt")[0]
    height, width = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg")).shape[:2]
    label = np.zeros((height, width), np.uint8)
    label[:, width // 2:] = 5
    label[:3] = 255
    write_label_png(tmp_path / "labels" / f"{name}.png", label)
    labels = SegLabels("labels_dir", str(tmp_path / "labels"))
    dataset = SegmentationDataset(str(root), [name], labels, VOC, crop=48, resize_long=(32, 32),
                                  jitter=NO_JITTER, seed=0)
    image, crop_label, index = dataset[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and index == 0
    assert crop_label.shape == (48, 48) and crop_label.dtype == torch.uint8
    values = set(np.unique(crop_label.numpy()).tolist())
    assert values == {0, 5, 255}
    assert int((crop_label == 255).sum()) >= 48 * 48 - 32 * 32  # the padding (and the 255 rows)
    assert torch.equal(dataset[0][1], crop_label)  # the same epoch draws the same crop
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        crops.add(dataset[0][1].numpy().tobytes())
    assert len(crops) > 1  # another epoch, another crop

    label[0, 0] = 21  # VOC has 20 classes: 21 is neither a class nor 255
    write_label_png(tmp_path / "labels" / f"{name}.png", label)
    with pytest.raises(UserError, match=rf"labels/{name}\.png: pseudo-label value 21 is not a class of voc"):
        dataset[0]


def test_missing_resized_or_out_of_range_labels_exit_2_naming_the_file(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels"
    args, out, root = synthetic_run(tmp_path, f"train_seg.labels_dir={labels}")
    names = read_list(root / "ImageSets/Segmentation/train.txt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"labels/{names[0]}.png: no pseudo-label (16 of 16 training images lack one)" in err
    assert "Traceback" not in err

    copy_masks(root, labels)
    small = read_label_png(labels / f"{names[3]}.png")[:-2]
    write_label_png(labels / f"{names[3]}.png", small)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"labels/{names[3]}.png: pseudo-label size" in err and "does not match the image size" in err

    bad = read_label_png(root / "SegmentationClass" / f"{names[3]}.png")
    bad[5, 5] = 42
    write_label_png(labels / f"{names[3]}.png", bad)
    assert main(args) == 2
    assert f"labels/{names[3]}.png: pseudo-label value 42 is not a class" in capsys.readouterr().err

    assert main([*args, "train_seg.labels_dir=", "train_seg.labels=rw"]) == 2  # this run's RUN/rw/
    err = capsys.readouterr().err
    assert f"{out}/rw/{names[0]}.png: no pseudo-label" in err and "run cse-ray rw with the same --out" in err
    assert not (out / "train_seg").exists()  # refused before anything was written


def test_initial_weights_of_another_network_or_class_count_exit_2(tmp_path: Path, capsys) -> None:
    args, out, _ = synthetic_run(tmp_path)
    resnet101 = tmp_path / "resnet101_tiny.pth"
    torch.save(build_segmenter("resnet101_tiny").state_dict(), resnet101)
    assert main([*args, f"model.pretrained={resnet101}"]) == 2
    err = capsys.readouterr().err
    assert f"{resnet101}: not weights of train_seg.network=resnet38d_tiny with 20 classes" in err

    coco = tmp_path / "coco_seg.pth"
    torch.save(build_segmenter("resnet38d_tiny", num_classes=80).state_dict(), coco)
    assert main([*args, f"model.pretrained={coco}"]) == 2
    err = capsys.readouterr().err
    assert f"{coco}: entry 'aspp.convs.0.weight' has shape (81, 512, 3, 3) in the file but (21, 512" in err

    assert main([*args, "train_seg.init=eraser"]) == 2
    assert f"train_seg.init: eraser, but {out}/train_cse/model.pth does not exist" in capsys.readouterr().err
    assert main([*args, "train_seg.network=vgg16"]) == 2
    assert "train_seg.network: unknown segmentation network 'vgg16'" in capsys.readouterr().err


def test_validation_without_ground_truth_is_off_and_keep_best_needs_it(tmp_path: Path) -> None:
    _, _, root = synthetic_run(tmp_path)
    cfg = load_config(SMOKE, [*SMALL, "data.synth.enabled=false", f"data.root={root}"])  # masks deletable
    val = load_split(cfg, str(root), "val_list")
    assert has_ground_truth(cfg, val)
    masks = [root / "SegmentationClass" / f"{name}.png" for name in val.names]
    masks[1].unlink()
    with pytest.raises(UserError, match=r"data.val_list: 1 of its 4 validation images have no ground-truth"):
        has_ground_truth(cfg, val)
    for mask in masks:
        mask.unlink(missing_ok=True)
    assert not has_ground_truth(cfg, val)
    local = [*SMALL, "data.synth.enabled=false", f"data.root={root}"]
    best = load_config(SMOKE, [*local, "train_seg.keep=best"])
    with pytest.raises(UserError, match="train_seg.keep: best needs ground-truth masks of data.val_list"):
        has_ground_truth(best, val)


def independent_miou(model, root: Path, names: list[str]) -> float:
    """The mIoU over 21 categories (an absent one counts 0), counted here by hand."""
    confusion = np.zeros((21, 21), np.int64)
    for name in names:
        gt = read_label_png(root / "SegmentationClass" / f"{name}.png").astype(np.int64)
        label = label_from_probabilities(predict_probabilities(model, read_image(root / "JPEGImages" /
                                                                                 f"{name}.jpg"), flip=False))
        known = gt != 255
        confusion += np.bincount(21 * gt[known] + label[known], minlength=21 * 21).reshape(21, 21)
    hits = np.diag(confusion)
    return float(np.mean(hits / (confusion.sum(0) + confusion.sum(1) - hits + 1e-10)) * 100.0)


def test_a_killed_worker_resumes_and_validation_measures_the_kept_model(ray_session, tmp_path, monkeypatch,
                                                                        capsys) -> None:
    labels = tmp_path / "labels"
    overrides = (f"train_seg.labels_dir={labels}", "train_seg.epochs=2", "train_seg.num_workers=2")
    _, out, root = synthetic_run(tmp_path, *overrides)
    copy_masks(root, labels)
    cfg = load_config(SMOKE, [*SMALL, *overrides])
    monkeypatch.setenv(TEST_FAULT_ENV, "2")  # rank 0 exits once at the start of epoch 2
    summary = train_seg(cfg, str(out))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    starts = [line.split()[-2] for line in (out / "train_seg" / "events.log").read_text().splitlines()]
    assert starts == ["1", "2", "2"]  # epoch 2 ran again after the crash, epoch 1 did not
    assert (summary["labels"], summary["labels_folder"]) == ("labels_dir", str(labels))
    assert (summary["network"], summary["num_classes"], summary["best_epoch"]) == ("resnet38d_tiny", 20, 2)
    last = summary["history"][-1]
    assert summary["best_miou"] == last["val_miou"] and summary["best_threshold"] is None
    assert np.isfinite(last["loss"]) and 0.0 <= last["acc"] <= 1.0

    # The two workers validated two images each; their summed counts are the whole list's mIoU.
    model = build_segmenter("resnet38d_tiny")
    load_weights(model, summary["model"])  # strict: every entry, the head included
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (cpus_per_worker 1): the same sums, bit for bit
    try:
        expected = independent_miou(model.eval(), root, read_list(root / "ImageSets/Segmentation/val.txt"))
    finally:
        torch.set_num_threads(threads)
    assert last["val_miou"] == pytest.approx(expected, abs=1e-6)
    assert list((out / "tensorboard" / "train_seg").glob("events.out.tfevents.*"))

    capsys.readouterr()
    events = (out / "train_seg" / "events.log").read_text()
    assert train_seg(cfg, str(out))["best_epoch"] == 2
    assert "train_seg: already finished" in capsys.readouterr().out
    assert (out / "train_seg" / "events.log").read_text() == events

    # Checkpoints of this network stay with it: a resume with another network is refused by name.
    (out / "train_seg" / "result.json").unlink()
    other = load_config(SMOKE, [*SMALL, *overrides, "train_seg.network=resnet101_tiny"])
    with pytest.raises(UserError, match=r"train_seg.network: resnet101_tiny .* differs from the network"):
        train_seg(other, str(out))
