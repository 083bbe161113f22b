"""train-aff on a real local Ray Train: AffinityNet on confident labels, its crops, a crash and the resume.

The confident labels here are the synthetic set's ground-truth masks written where `cse-ray aff-labels`
puts them, so the stage is tested without running inference first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cse_ray.config import load_config
from cse_ray.data.prepare import resolve_data_root
from cse_ray.data.voc import read_list
from cse_ray.errors import UserError
from cse_ray.formats import write_label_png
from cse_ray.layout import InferLayout, RunLayout
from cse_ray.models import build_affinity_net, load_weights
from cse_ray.rw import confident_labels
from cse_ray.train import TEST_FAULT_ENV, train_aff
from cse_ray.train.affinity import AffinityDataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.synth.train=16", "data.synth.val=4", "data.synth.size=48", "train_aff.crop=48",
         "train_aff.resize_long=[40,56]", "train_aff.freeze=none", "train_aff.momentum_mode=fixed",
         "train_aff.lr=0.01", "train_aff.log_every=1"]


def test_the_affinity_crop_keeps_image_and_label_together(tmp_path: Path) -> None:
    """Flip, resize and crop move the label with the image; the padding is 255 and votes for nothing."""
    from cse_ray.data.synth import generate

    root = tmp_path / "voc"
    generate(str(root), train=2, val=1, size=32, seed=0)
    labels = InferLayout(str(tmp_path / "aff"))
    name = read_list(root / "ImageSets/Segmentation/train.txt")[0]
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 5
    label[:4] = 255
    image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg"))
    label = label[: image.shape[0], : image.shape[1]]
    write_label_png(labels.confident(name), label)
    dataset = AffinityDataset(str(root), [name], labels, crop=48, resize_long=(32, 32),
                              jitter={"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}, seed=0)
    images, label8, index = dataset[0]
    assert images.shape == (3, 48, 48) and label8.shape == (6, 6) and index == 0
    # A 32-pixel image in a 48-pixel crop: at least two of the six block rows and columns are padding.
    assert int((label8 == 255).sum()) >= 20
    assert set(np.unique(label8.numpy())) <= {0, 5, 255} and {0, 5} <= set(np.unique(label8.numpy()))
    np.testing.assert_array_equal(confident_labels(np.full((2, 2), 3), np.zeros((2, 2))), np.zeros((2, 2)))


def test_train_aff_without_confident_labels_is_refused(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml", SMALL)
    with pytest.raises(UserError, match=r"aff_labels/confident/.*\.png: no confident label .* aff-labels"):
        train_aff(cfg, str(tmp_path))


def test_a_crashed_worker_resumes_and_the_model_loads_into_affinitynet(ray_session, tmp_path, monkeypatch):
    cfg = load_config(REPO / "configs" / "smoke.yaml", [*SMALL, "train_aff.epochs=2"])
    out = tmp_path / "run"
    root = resolve_data_root(cfg, str(out))
    folder = RunLayout.at(out).aff_labels
    for name in read_list(Path(root, "ImageSets/Segmentation/train.txt")):
        mask = np.array(Image.open(Path(root, "SegmentationClass", f"{name}.png")))
        write_label_png(folder.confident(name), mask)
    monkeypatch.setenv(TEST_FAULT_ENV, "2")  # rank 0 exits once at the start of epoch 2
    summary = train_aff(cfg, str(out))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    starts = [line.split()[-2] for line in (out / "train_aff" / "events.log").read_text().splitlines()]
    assert starts == ["1", "2", "2"]  # epoch 2 ran again after the crash, epoch 1 did not
    last = summary["history"][-1]
    assert summary["best_miou"] == last["val_miou"]  # keep: last; the pair F1 of precision and recall
    precision, recall = last["val_precision"], last["val_recall"]
    f1 = 2 * precision * recall / (precision + recall) if precision else 0.0
    assert last["val_miou"] == pytest.approx(f1)
    weighted = 0.25 * last["loss_bg"] + 0.25 * last["loss_fg"] + 0.5 * last["loss_neg"]
    assert last["loss"] == pytest.approx(weighted, rel=1e-5)
    model = build_affinity_net("resnet38d_tiny")
    load_weights(model, summary["model"])  # strict: every entry, the heads included
    assert (out / "tensorboard" / "train_aff").is_dir()
    assert not (out / "train_aff" / "failed.json").exists()
    assert torch.load(summary["model"])["f9.weight"].shape[0] == model.feature_channels
