"""`cse-ray predict` on a real local Ray: a trained segmentation network's label PNGs, written once each.

Bad input (an empty or ambiguous folder, a checkpoint of another network or class count) is refused
with exit code 2 before Ray starts; every image gets one palette PNG of its own size, equal to
`label_from_probabilities(predict_probabilities(...))` computed here; a corrupt image is an error row;
a killed actor's images are written exactly once across a rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cse_ray.cli import main
from cse_ray.config import from_dict
from cse_ray.crf import crf_segmentation
from cse_ray.data.synth import generate
from cse_ray.data.voc import image_path, list_path, read_list
from cse_ray.errors import UserError
from cse_ray.formats import read_image
from cse_ray.infer import TEST_KILL_ENV, TEST_KILL_PREDICT_MARKER, Manifest, run_predict
from cse_ray.layout import PredictLayout
from cse_ray.models import build_classifier, build_segmenter
from cse_ray.segment import label_from_probabilities, predict_probabilities

SIZES = {"beach": (37, 53), "cat": (40, 30), "dog": (24, 24), "kite": (45, 33), "sofa": (33, 41),
         "tree": (29, 35)}  # height, width
TINY = ["train_seg.network=resnet38d_tiny"]


def segmenter(num_classes: int = 20) -> nn.Module:
    """A random tiny segmenter whose scores are decisive (the ASPP's DeepLab init gives near-ties)."""
    torch.manual_seed(0)
    model = build_segmenter("resnet38d_tiny", num_classes)
    for conv in model.aspp.convs:
        nn.init.normal_(conv.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Photos of mixed sizes (JPEG and PNG, one grey), the checkpoint, and wrong checkpoints."""
    base = tmp_path_factory.mktemp("predict")
    photos = base / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index, (name, (height, width)) in enumerate(SIZES.items()):
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        picture = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        picture[height // 3: 2 * height // 3, width // 4: width // 2] = (220, 30, 40)
        image = Image.fromarray(picture).convert("L") if name == "dog" else Image.fromarray(picture)
        image.save(photos / (f"{name}.png" if index % 2 else f"{name}.jpg"), quality=95)
    (photos / "notes.txt").write_text("not an image")
    checkpoints = {"seg": base / "seg.pth", "seg3": base / "seg3.pth", "cls": base / "cls.pth"}
    torch.save(segmenter().state_dict(), checkpoints["seg"])
    torch.save(segmenter(3).state_dict(), checkpoints["seg3"])
    torch.save(build_classifier("resnet38d_tiny").state_dict(), checkpoints["cls"])
    return {"photos": photos, "base": base, **{k: str(v) for k, v in checkpoints.items()}}


def make_cfg(**predict) -> object:
    return from_dict({"data": {"root": "unused"}, "train_seg": {"network": "resnet38d_tiny"},
                      "crf": {"iterations": 5},
                      "predict": {"scales": [1.0, 0.5], "max_in_flight": 4, **predict}})


def rows_of(out: Path) -> dict[str, dict]:
    return dict(Manifest(PredictLayout(str(out))).rows)


def expected_label(files: dict, path: Path, scales=(1.0, 0.5)) -> np.ndarray:
    model = segmenter().eval()
    model.load_state_dict(torch.load(files["seg"]))
    return label_from_probabilities(predict_probabilities(model, read_image(path), scales, flip=True))


# ------------------------------------------------------------------------ refused before Ray starts
def test_an_empty_or_ambiguous_folder_is_refused_with_exit_2(files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = str(tmp_path / "o")
    assert main(["predict", "--checkpoint", files["seg"], "--images", str(empty), "--out", out, *TINY]) == 2
    assert f"--images {empty}: no .jpg, .jpeg or .png file" in capsys.readouterr().err

    twins = tmp_path / "twins"
    shutil.copytree(files["photos"], twins)
    shutil.copy(twins / "beach.jpg", twins / "beach.PNG")
    assert main(["predict", "--checkpoint", files["seg"], "--images", str(twins), "--out", out, *TINY]) == 2
    assert "beach.PNG and beach.jpg would both be written to beach.png" in capsys.readouterr().err

    assert main(["predict", "--checkpoint", files["seg"], "--images", str(twins), "--out", str(twins),
                 *TINY]) == 2
    assert "the same folder as --images" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", files["seg"], "--list", "val", "--out", out]) == 2
    assert "--list and --root go together" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_of_another_class_count_or_network_is_refused_naming_it(files, tmp_path, capsys):
    args = ["predict", "--images", str(files["photos"]), "--out", str(tmp_path / "o")]
    assert main([*args, "--checkpoint", files["seg3"], *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {files['seg3']}: cannot be loaded into train_seg.network=resnet38d_tiny" in err
    assert "it segments 3 classes, but data.dataset=voc has 20" in err

    assert main([*args, "--checkpoint", files["cls"], *TINY]) == 2
    assert f"{files['cls']}: cannot be loaded" in (err := capsys.readouterr().err)
    assert "a CAM classifier's (fc8) weights, no ASPP head" in err

    assert main([*args, "--checkpoint", files["seg"]]) == 2  # the default network is the full resnet38d
    err = capsys.readouterr().err
    assert "train_seg.network=resnet38d for 20 classes (entry 'conv1a.weight' has shape" in err
    assert main([*args, "--checkpoint", str(tmp_path / "nope.pth"), *TINY]) == 2
    assert f"--checkpoint {tmp_path / 'nope.pth'}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ on Ray
def test_every_photo_gets_the_prediction_of_its_own_size(files, ray_session, tmp_path, one_torch_thread):
    out = tmp_path / "seg"
    summary = run_predict(make_cfg(), str(out), files["seg"], images=str(files["photos"]), progress=False)
    assert (summary.images, summary.done, summary.skipped, summary.failed) == (6, 6, 0, 0)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{name}.png" for name in sorted(SIZES)]
    rows = rows_of(out)
    assert list(rows) == sorted(SIZES) and {row["status"] for row in rows.values()} == {"ok"}
    labels = set()
    for name, (height, width) in SIZES.items():
        stored = Image.open(out / f"{name}.png")
        assert stored.mode == "P" and stored.size == (width, height)
        label = np.array(stored)
        labels.update(np.unique(label).tolist())
        np.testing.assert_array_equal(label, expected_label(files, Path(rows[name]["image"])))
    assert max(labels) <= 20 and len(labels) > 1

    again = run_predict(make_cfg(), str(out), files["seg"], images=str(files["photos"]), progress=False)
    assert (again.done, again.skipped) == (0, 6)
    with pytest.raises(UserError, match=r"predict_settings.json: .*\(flip, scales differ"):
        run_predict(make_cfg(scales=[1.0], flip=False), str(out), files["seg"], images=str(files["photos"]))


def test_a_killed_actor_and_a_rerun_write_every_image_exactly_once(files, ray_session, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    shutil.copytree(files["photos"], photos)
    corrupt = photos / "tree.png"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    out = tmp_path / "seg"
    cfg = make_cfg(max_restarts=0)  # the actor dies for good: the run stops, a rerun resumes it
    monkeypatch.setenv(TEST_KILL_ENV, "2")
    with pytest.raises(RuntimeError, match=r"every predict actor died; \d+ images were not processed"):
        run_predict(cfg, str(out), files["seg"], images=str(photos), progress=False)
    assert (out / TEST_KILL_PREDICT_MARKER).exists()  # the actor really died, after writing 2 images
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(first) == ["beach.png", "cat.png"]

    monkeypatch.delenv(TEST_KILL_ENV)
    again = run_predict(cfg, str(out), files["seg"], images=str(photos), progress=False)
    assert (again.done, again.skipped, again.failed) == (3, 2, 1) and str(corrupt) in again.errors["tree"]
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(written) == [f"{name}.png" for name in sorted(SIZES) if name != "tree"]
    assert {name: written[name] for name in first} == first  # not rewritten by the rerun
    rows = rows_of(out)
    assert list(rows) == sorted(SIZES)
    assert {name for name, row in rows.items() if row["status"] == "ok"} == set(SIZES) - {"tree"}
    assert "not a readable image" in rows["tree"]["error"] or "truncated" in rows["tree"]["error"]
    assert not [p for p in out.rglob(".*") if p.name != TEST_KILL_PREDICT_MARKER]  # no temp files left


def test_a_restarted_actor_finishes_a_list_of_the_synthetic_set(ray_session, files, tmp_path, monkeypatch):
    root = tmp_path / "voc"
    generate(str(root), train=2, val=5, size=48, seed=0)
    names = read_list(list_path(root, "val"))
    out = tmp_path / "seg_val"
    monkeypatch.setenv(TEST_KILL_ENV, "2")
    assert main(["predict", "--checkpoint", files["seg"], "--list", "val", "--root", str(root),
                 "--out", str(out), *TINY, "predict.scales=[1.0]", "predict.max_restarts=1"]) == 0
    assert (out / TEST_KILL_PREDICT_MARKER).exists()
    rows = rows_of(out)
    assert list(rows) == names and {row["status"] for row in rows.values()} == {"ok"}
    assert len({row["pid"] for row in rows.values()}) == 2  # before and after the restart
    for name in names:
        assert Image.open(out / f"{name}.png").size == Image.open(image_path(root, name)).size


def test_the_dense_crf_refines_the_probabilities(files, ray_session, tmp_path, one_torch_thread):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("beach.jpg", "cat.png"):
        shutil.copy(files["photos"] / name, photos / name)
    out = tmp_path / "seg_crf"
    cfg = make_cfg(crf=True)
    summary = run_predict(cfg, str(out), files["seg"], images=str(photos), progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    rows = rows_of(out)
    assert all(row["crf_s"] > 0 and row["label"] == f"{name}.png" for name, row in rows.items())
    model = segmenter().eval()
    model.load_state_dict(torch.load(files["seg"]))
    differ = 0
    for name, row in rows.items():
        image = read_image(row["image"])
        probs = predict_probabilities(model, image, (1.0, 0.5), flip=True)
        stored = np.array(Image.open(out / f"{name}.png"))
        assert stored.shape == image.shape[:2]
        np.testing.assert_array_equal(stored, crf_segmentation(image, probs.astype(np.float16), cfg.crf))
        differ += int((stored != label_from_probabilities(probs)).sum())
    assert differ > 0  # the CRF changed some pixels
