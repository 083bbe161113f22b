"""`cse-ray rw` and `cse-ray aff-labels` on a real local Ray: the walk's label maps, written once each.

Bad input is refused before Ray starts (exit code 2); a corrupt image is an error row; a killed
actor's images are retried and every image gets one row and one file; the confident labels equal
`confident_labels` of the two stored CRF maps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cse_ray.cli import main
from cse_ray.config import from_dict
from cse_ray.data.synth import generate
from cse_ray.data.voc import image_label, image_path
from cse_ray.errors import UserError
from cse_ray.formats import read_image, save_cam_npz
from cse_ray.infer import TEST_KILL_ENV, TEST_KILL_RW_MARKER, Manifest, run_rw, write_confident_labels
from cse_ray.labels import VOC
from cse_ray.layout import InferLayout
from cse_ray.models import build_affinity_net, build_classifier, pair_affinities
from cse_ray.rw import confident_labels, pad_to_stride, random_walk

NAMES = [f"train_{i:06d}" for i in range(6)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A 6-image synthetic set, a random tiny AffinityNet, a tiny classifier and random CAMs per image."""
    base = tmp_path_factory.mktemp("rw")
    root = base / "voc"
    generate(str(root), train=6, val=2, size=48, seed=0)
    torch.manual_seed(0)
    affinity = base / "aff.pth"
    torch.save(build_affinity_net("resnet38d_tiny").state_dict(), affinity)
    classifier = base / "cls.pth"
    torch.save(build_classifier("resnet38d_tiny").state_dict(), classifier)
    cams_dir = base / "cams_run"
    rng = np.random.default_rng(0)
    for name in NAMES:
        height, width = read_image(image_path(root, name)).shape[:2]
        classes = np.flatnonzero(image_label(root, name) > 0)
        cams = rng.random((len(classes), height, width), dtype=np.float32).astype(np.float16)
        save_cam_npz(InferLayout(str(cams_dir)).cam(name), cams, classes, VOC)
    return {"root": str(root), "affinity": str(affinity), "classifier": str(classifier), "cams": cams_dir}


def make_cfg(dataset: dict, **rw) -> object:
    return from_dict({
        "data": {"root": dataset["root"], "infer_list": "train", "train_list": "train"},
        "model": {"backbone": "resnet38d_tiny"},
        "infer": {"checkpoint": dataset["classifier"], "scales": [1.0], "num_actors": 1, "max_in_flight": 4},
        "crf": {"iterations": 3},
        "rw": {"checkpoint": dataset["affinity"], "num_actors": 1, "logt": 4, **rw},
    })


def with_cams(dataset: dict, out: Path) -> Path:
    shutil.copytree(dataset["cams"], out)
    return out


# ------------------------------------------------------------------------ refused before Ray starts
def test_a_checkpoint_of_another_shape_is_refused_with_exit_2(dataset, tmp_path, capsys):
    out = with_cams(dataset, tmp_path / "run")
    with pytest.raises(UserError, match=r"rw.checkpoint: .*cls.pth: cannot be loaded into AffinityNet"):
        run_rw(make_cfg(dataset, checkpoint=dataset["classifier"]), str(out))
    with pytest.raises(UserError, match=r"rw.checkpoint: .*nope.pth: file not found"):
        run_rw(make_cfg(dataset, checkpoint=str(tmp_path / "nope.pth")), str(out))
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {dataset['root']}, infer_list: train}}\n"
                      f"model: {{backbone: resnet38d_small}}\nrw: {{checkpoint: {dataset['affinity']}}}\n")
    assert main(["rw", "--config", str(config), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "aff.pth: cannot be loaded into AffinityNet on model.backbone=resnet38d_small" in error
    assert not (out / "rw").exists()


def test_a_missing_cam_file_is_refused_naming_it(dataset, tmp_path):
    out = with_cams(dataset, tmp_path / "run")
    (out / "cams" / f"{NAMES[2]}.npz").unlink()
    with pytest.raises(UserError, match=rf"cams/{NAMES[2]}.npz: no CAM file for image {NAMES[2]}"):
        run_rw(make_cfg(dataset), str(out))


def test_confident_alphas_must_be_ordered(dataset, tmp_path):
    with pytest.raises(UserError, match="rw.low_alpha .* must be the smaller"):
        write_confident_labels(make_cfg(dataset, low_alpha=32, high_alpha=4), str(tmp_path))


# ------------------------------------------------------------------------ on Ray
def test_every_image_gets_the_walk_of_its_stored_cams(dataset, ray_session, tmp_path):
    out = with_cams(dataset, tmp_path / "run")
    summary = run_rw(make_cfg(dataset), str(out), progress=False)
    assert (summary.images, summary.done, summary.skipped, summary.failed) == (6, 6, 0, 0)
    rows = list(Manifest(InferLayout(str(out)), path=str(out / "rw_manifest.parquet")).rows.values())
    assert [row["name"] for row in rows] == NAMES and {row["status"] for row in rows} == {"ok"}

    # The stored map is the walk computed here, directly, on the same inputs.
    from cse_ray.data.transforms import normalize, to_chw
    from cse_ray.formats import load_cam_npz

    model = build_affinity_net("resnet38d_tiny")
    model.load_state_dict(torch.load(dataset["affinity"]))
    model.eval()
    for name in NAMES[:2]:
        image = read_image(image_path(dataset["root"], name))
        cams, classes = load_cam_npz(out / "cams" / f"{name}.npz")
        with torch.no_grad():
            batch = pad_to_stride(torch.from_numpy(to_chw(normalize(image)))[None])
            affinities = pair_affinities(model(batch))
        expected = random_walk(cams, classes, affinities, beta=8, logt=4, bg_power=16).label
        stored = Image.open(out / "rw" / f"{name}.png")
        assert stored.mode == "P"
        np.testing.assert_array_equal(np.array(stored), expected)

    again = run_rw(make_cfg(dataset), str(out), progress=False)
    assert (again.done, again.skipped) == (0, 6)
    with pytest.raises(UserError, match=r"rw_settings.json: .*\(logt differ"):
        run_rw(make_cfg(dataset, logt=3), str(out), progress=False)


def test_rw_scale_walks_the_resized_image_and_writes_labels_of_the_image_size(dataset, ray_session, tmp_path):
    out = with_cams(dataset, tmp_path / "run")
    summary = run_rw(make_cfg(dataset, scale=2.0), str(out), list_name="train", progress=False)
    assert (summary.done, summary.failed) == (6, 0)
    assert json.loads((out / "rw_settings.json").read_text())["scale"] == 2.0

    from cse_ray.data.transforms import normalize, to_chw
    from cse_ray.formats import load_cam_npz
    from cse_ray.rw import label_at_size, rescale_for_walk

    model = build_affinity_net("resnet38d_tiny")
    model.load_state_dict(torch.load(dataset["affinity"]))
    model.eval()
    name = NAMES[0]
    image = read_image(image_path(dataset["root"], name))
    cams, classes = load_cam_npz(out / "cams" / f"{name}.npz")
    batch, maps = rescale_for_walk(torch.from_numpy(to_chw(normalize(image)))[None], cams, 2.0)
    with torch.no_grad():
        affinities = pair_affinities(model(pad_to_stride(batch)))
    expected = label_at_size(random_walk(maps, classes, affinities, beta=8, logt=4, bg_power=16).label,
                             *image.shape[:2])
    stored = np.array(Image.open(out / "rw" / f"{name}.png"))
    assert stored.shape == image.shape[:2]
    np.testing.assert_array_equal(stored, expected)


def test_cams_of_another_size_stop_the_walk_with_exit_2_after_the_others(
        dataset, ray_session, tmp_path):
    out = with_cams(dataset, tmp_path / "run")
    layout = InferLayout(str(out))
    cams, classes = np.ones((1, 8, 9), np.float16), np.array([0])
    save_cam_npz(layout.cam(NAMES[2]), cams, classes, VOC)
    with pytest.raises(UserError, match=rf"{NAMES[2]}.npz: CAMs of 9x8 \(WxH\) for an image of"):
        run_rw(make_cfg(dataset), str(out), progress=False)  # a UserError: exit code 2 from the CLI
    assert sorted(p.stem for p in (out / "rw").glob("*.png")) == [n for n in NAMES if n != NAMES[2]]


def test_a_killed_actor_and_a_corrupt_image_leave_one_row_and_one_file_per_image(
    dataset, ray_session, tmp_path, monkeypatch
):
    root = tmp_path / "voc"
    shutil.copytree(dataset["root"], root)
    jpeg = image_path(root, NAMES[4])
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    out = with_cams(dataset, tmp_path / "run")
    cfg = make_cfg({**dataset, "root": str(root)}, max_restarts=1)
    monkeypatch.setenv(TEST_KILL_ENV, "2")
    summary = run_rw(cfg, str(out), progress=False)
    assert (out / TEST_KILL_RW_MARKER).exists()  # the actor really died once
    assert (summary.done, summary.failed) == (5, 1) and str(jpeg) in summary.errors[NAMES[4]]
    rows = {row["name"]: row for row in Manifest(InferLayout(str(out)), path=str(out / "rw_manifest.parquet"))
            .rows.values()}
    assert sorted(rows) == NAMES
    assert len({rows[name]["pid"] for name in NAMES if name != NAMES[4]}) == 2  # before and after the kill
    assert sorted(p.name for p in (out / "rw").iterdir()) == [f"{n}.png" for n in NAMES if n != NAMES[4]]
    assert not [p for p in out.rglob(".*") if p.name != TEST_KILL_RW_MARKER]

    # A rerun retries only the failed image (still corrupt): one row per image, nothing rewritten.
    monkeypatch.delenv(TEST_KILL_ENV)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "rw").iterdir()}
    again = run_rw(cfg, str(out), progress=False)
    assert (again.done, again.skipped, again.failed) == (0, 5, 1)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "rw").iterdir()} == before


def test_confident_labels_combine_the_two_stored_crf_maps(dataset, ray_session, tmp_path):
    cfg = make_cfg(dataset)
    summary = write_confident_labels(cfg, str(tmp_path), progress=False)
    assert (summary.images, summary.written, summary.skipped, summary.missing) == (6, 6, 0, [])
    folder = tmp_path / "aff_labels"
    for name in NAMES:
        low = np.array(Image.open(folder / "crf" / "a4" / f"{name}.png"))
        high = np.array(Image.open(folder / "crf" / "a32" / f"{name}.png"))
        np.testing.assert_array_equal(np.array(Image.open(folder / "confident" / f"{name}.png")),
                                      confident_labels(low, high))
    again = write_confident_labels(cfg, str(tmp_path), progress=False)
    assert (again.written, again.skipped) == (0, 6)

    # A high-alpha CRF map of another size than its low-alpha twin: exit 2 naming it.
    wrong = folder / "crf" / "a32" / f"{NAMES[1]}.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(wrong)
    (folder / "confident" / f"{NAMES[1]}.png").unlink()
    with pytest.raises(UserError, match=rf"{wrong}: CRF label map of 7x5 \(WxH\), but .*a4/{NAMES[1]}"):
        write_confident_labels(cfg, str(tmp_path), progress=False)
