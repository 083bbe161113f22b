"""Distributed inference on a real local Ray: CAM actors, CRF tasks, resuming, faults, pseudo-labels.

One Ray session serves the whole module; the validation tests come first because they check that a
bad config is refused before Ray starts.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import ray
import torch
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from cse_ray.cam import cams_to_label
from cse_ray.config import from_dict
from cse_ray.data.synth import generate
from cse_ray.data.voc import image_label, image_path, save_labels
from cse_ray.errors import UserError
from cse_ray.infer import (
    TEST_KILL_ENV,
    TEST_KILL_MARKER,
    load_cams,
    read_manifest,
    run_infer,
    write_pseudo_labels,
)
from cse_ray.labels import VOC
from cse_ray.models import build_classifier

NAMES = [f"train_{i:06d}" for i in range(8)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, str]:
    """(VOC root with 8 train + 2 val synthetic 64-pixel images, a fixed random tiny checkpoint)."""
    base = tmp_path_factory.mktemp("infer")
    root = str(base / "voc")
    generate(root, train=8, val=2, size=64, seed=0)
    torch.manual_seed(0)
    checkpoint = str(base / "tiny.pth")
    torch.save(build_classifier("resnet38d_tiny").state_dict(), checkpoint)
    return root, checkpoint


def make_cfg(root: str, checkpoint: str, infer: dict | None = None, crf: dict | None = None):
    return from_dict({
        "data": {"root": root, "infer_list": "train"},
        "model": {"backbone": "resnet38d_tiny"},
        "infer": {"checkpoint": checkpoint, "scales": [1.0, 0.5], "num_actors": 1, "cpus_per_actor": 1.0,
                  "max_in_flight": 4, "save_seed": True, "overlays": 2, **(infer or {})},
        "crf": {"alphas": [6, 10], "pseudo_alpha": 6, "iterations": 10, **(crf or {})},
    })


def output_files(out: str | Path) -> dict[str, Path]:
    """Every per-image output under `out`, by path relative to it."""
    out = Path(out)
    return {
        str(p.relative_to(out)): p for p in sorted(out.rglob("*"))
        if p.is_file() and p.parent != out and not str(p.relative_to(out)).startswith("data/")
    }


def assert_same_outputs(a: str | Path, b: str | Path) -> None:
    files_a, files_b = output_files(a), output_files(b)
    assert sorted(files_a) == sorted(files_b)
    for rel, path in files_a.items():
        other = files_b[rel]
        if rel.endswith(".npz"):
            with np.load(path) as x, np.load(other) as y:
                assert sorted(x.files) == sorted(y.files) == ["cams", "classes"]
                np.testing.assert_array_equal(x["cams"], y["cams"])
                np.testing.assert_array_equal(x["classes"], y["classes"])
        elif rel.endswith(".npy"):
            x, y = np.load(path, allow_pickle=True).item(), np.load(other, allow_pickle=True).item()
            assert sorted(x) == sorted(y)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
        else:
            assert path.read_bytes() == other.read_bytes(), rel


def assert_one_ok_row_per_image(out: str | Path, names=NAMES) -> list[dict]:
    rows = read_manifest(str(out))
    assert [r["name"] for r in rows] == list(names)
    assert all(r["status"] == "ok" and r["error"] is None for r in rows), [r["error"] for r in rows]
    return rows


# ------------------------------------------------------------------------ refused before Ray starts
def test_missing_or_empty_checkpoint_is_refused_before_ray_starts(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(UserError, match=r"infer.checkpoint: .*nope.pth: file not found"):
        run_infer(make_cfg(root, str(tmp_path / "nope.pth")), str(tmp_path / "out"))
    with pytest.raises(UserError, match="infer.checkpoint: empty"):
        run_infer(make_cfg(root, ""), str(tmp_path / "out"))
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_bad_pseudo_label_settings_are_refused_before_ray_starts(dataset, tmp_path):
    root, checkpoint = dataset
    with pytest.raises(UserError, match=r"crf.pseudo_alpha: 24 is not one of crf.alphas \(6, 10\)"):
        run_infer(make_cfg(root, checkpoint, crf={"pseudo_alpha": 24}), str(tmp_path))
    with pytest.raises(UserError, match="infer.threshold"):
        run_infer(make_cfg(root, checkpoint, crf={"pseudo_from": "cam"}), str(tmp_path))
    with pytest.raises(UserError, match="crf.enabled is false"):
        run_infer(make_cfg(root, checkpoint, crf={"enabled": False}), str(tmp_path))
    assert not ray.is_initialized()


def test_a_checkpoint_for_another_network_is_refused_before_ray_starts(dataset, tmp_path):
    root, checkpoint = dataset
    cfg = from_dict({**_raw(make_cfg(root, checkpoint)), "model": {"backbone": "resnet38d_small"}})
    with pytest.raises(UserError, match="tiny.pth"):
        run_infer(cfg, str(tmp_path))
    with pytest.raises(UserError, match="nolist.txt"):
        run_infer(make_cfg(root, checkpoint), str(tmp_path), list_name=str(tmp_path / "nolist.txt"))
    assert not ray.is_initialized()


def _raw(cfg) -> dict:
    from cse_ray.config import to_dict

    return to_dict(cfg)


# ----------------------------------------------------------------------------------- on real Ray
@pytest.fixture(scope="module")
def baseline(ray_session, dataset, tmp_path_factory):
    """One run with one actor: CAMs, seed dicts, two CRF alphas, pseudo-labels from alpha 6, 2 overlays."""
    root, checkpoint = dataset
    out = tmp_path_factory.mktemp("baseline")
    summary = run_infer(make_cfg(root, checkpoint), str(out), progress=False)
    return out, summary


def test_one_run_writes_every_output_and_a_manifest_row_per_image(baseline, dataset):
    out, summary = baseline
    assert (summary.images, summary.done, summary.skipped, summary.failed) == (8, 8, 0, 0)
    assert summary.pseudo_written == 8 and (summary.pseudo_source, summary.pseudo_value) == ("crf", 6.0)
    rows = assert_one_ok_row_per_image(out)
    assert summary.mean_seconds == pytest.approx(
        {s: np.mean([row[f"{s}_s"] for row in rows]) for s in ("load", "cam", "crf", "write")})
    files = output_files(out)
    for index, row in enumerate(rows):
        name = row["name"]
        expected = {f"cams/{name}.npz", f"cams_seed/{name}.npy", f"crf/a6/{name}.png", f"crf/a10/{name}.png",
                    f"crf_seed/a6/{name}.npy", f"crf_seed/a10/{name}.npy", f"pseudo_labels/{name}.png"}
        if index < 2:
            expected.add(f"overlays/{name}.png")
        assert {rel for rel in files if f"/{name}." in rel} == expected
        assert row["crf"] == [f"crf/a6/{name}.png", f"crf/a10/{name}.png"]
        assert (row["pseudo_label"], row["pseudo_source"], row["pseudo_value"]) == (
            f"pseudo_labels/{name}.png", "crf", 6.0)
        assert row["cam_node"] == row["crf_node"] == ray.get_runtime_context().get_node_id()
        # Each stage was timed, and an image's stages fit in the run's wall time.
        assert all(row[f"{s}_s"] > 0 for s in ("load", "cam", "crf", "write"))
        assert sum(row[f"{s}_s"] for s in ("load", "cam", "crf", "write")) < summary.wall_seconds
        image = Image.open(image_path(dataset[0], name))
        assert (row["width"], row["height"]) == image.size
        cams, classes = load_cams(str(out), name)
        assert row["classes"] == [VOC.class_names[k] for k in classes] and len(classes) >= 1
        assert cams.shape == (len(classes), image.size[1], image.size[0])
        assert cams.dtype == np.float32 and 0.5 < cams.max() <= 1.0 and cams.min() >= 0
        seed = np.load(files[f"cams_seed/{name}.npy"], allow_pickle=True).item()
        assert sorted(seed) == sorted(classes.tolist())
        assert files[f"pseudo_labels/{name}.png"].read_bytes() == files[f"crf/a6/{name}.png"].read_bytes()
    overlay = Image.open(files[f"overlays/{NAMES[0]}.png"])
    assert overlay.mode == "RGB" and overlay.size == (rows[0]["width"], rows[0]["height"])
    assert not [p for p in Path(out).rglob(".*")]  # no temp files left behind


def test_crf_maps_equal_pydensecrf_called_directly_on_the_stored_cams(baseline, dataset):
    out, _ = baseline
    for name in NAMES[:3]:
        cams, classes = load_cams(str(out), name)
        image = np.array(Image.open(image_path(dataset[0], name)).convert("RGB"))
        height, width = image.shape[:2]
        probs = np.concatenate([np.power(1 - cams.max(0, keepdims=True), 10.0), cams])
        crf = dcrf.DenseCRF2D(width, height, probs.shape[0])
        crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(image), compat=10)
        q = np.array(crf.inference(10)).reshape(probs.shape)
        expected = np.concatenate([[0], classes + 1])[q.argmax(0)]
        np.testing.assert_array_equal(np.array(Image.open(Path(out) / f"crf/a10/{name}.png")), expected)


def test_one_and_two_actors_give_identical_outputs(baseline, dataset, tmp_path):
    root, checkpoint = dataset
    cfg = make_cfg(root, checkpoint, infer={"num_actors": 2, "cpus_per_actor": 0.5})
    summary = run_infer(cfg, str(tmp_path), progress=False)
    assert (summary.done, summary.failed) == (8, 0)
    assert_same_outputs(baseline[0], tmp_path)
    rows = assert_one_ok_row_per_image(tmp_path)
    assert {row["cam_actor"] for row in rows} == {0, 1}


def test_a_rerun_computes_only_what_is_missing(baseline, dataset, tmp_path):
    root, checkpoint = dataset
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)  # copy2: modification times are kept
    (out / f"cams/{NAMES[0]}.npz").unlink()
    (out / f"cams/{NAMES[1]}.npz").unlink()
    (out / f"crf/a10/{NAMES[2]}.png").unlink()
    (out / f"pseudo_labels/{NAMES[3]}.png").unlink()
    redone = set(NAMES[:3])
    before = {rel: p.stat().st_mtime_ns for rel, p in output_files(out).items()
              if not any(f"/{n}." in rel for n in redone)}

    summary = run_infer(make_cfg(root, checkpoint), str(out), progress=False)

    assert (summary.done, summary.skipped, summary.failed) == (3, 5, 0)
    assert summary.pseudo_written == 4  # three recomputed images and the one deleted pseudo-label
    after = output_files(out)
    assert len(before) > 20 and all(after[rel].stat().st_mtime_ns == mtime for rel, mtime in before.items())
    assert f"pseudo_labels/{NAMES[3]}.png" in after
    assert_same_outputs(baseline[0], out)
    rows = assert_one_ok_row_per_image(out)
    old = {row["name"]: row for row in read_manifest(str(baseline[0]))}
    for row in rows[3:]:  # skipped images keep their earlier row
        assert row["cam_pid"] == old[row["name"]]["cam_pid"] and row["cam_s"] == old[row["name"]]["cam_s"]

    again = run_infer(make_cfg(root, checkpoint), str(out), progress=False)
    assert (again.done, again.skipped, again.pseudo_written) == (0, 8, 0)


def test_a_killed_actor_is_restarted_and_every_image_written_once(baseline, dataset, tmp_path, monkeypatch):
    root, checkpoint = dataset
    monkeypatch.setenv(TEST_KILL_ENV, "3")
    summary = run_infer(make_cfg(root, checkpoint, infer={"max_restarts": 1}), str(tmp_path), progress=False)
    assert (tmp_path / TEST_KILL_MARKER).exists()  # the actor really died once
    assert (summary.done, summary.failed) == (8, 0)
    rows = assert_one_ok_row_per_image(tmp_path)
    assert len({row["cam_pid"] for row in rows}) == 2  # the first process, then its restarted replacement
    assert_same_outputs(baseline[0], tmp_path)
    assert not [p for p in tmp_path.rglob(".*") if p.name != TEST_KILL_MARKER]


def test_a_corrupt_jpeg_becomes_an_error_row_and_the_run_goes_on(dataset, ray_session, tmp_path):
    root, checkpoint = dataset
    copy = tmp_path / "voc"
    shutil.copytree(root, copy)
    jpeg = image_path(copy, NAMES[4])
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    # Image-level labels come from the cls_labels.npy beside the list when it covers the list.
    labels = {name: image_label(copy, name) for name in NAMES}
    extra = int(np.flatnonzero(labels[NAMES[0]] == 0)[0])
    labels[NAMES[0]][extra] = 1.0
    save_labels(copy / "ImageSets/Segmentation/cls_labels.npy", labels)
    out = tmp_path / "out"  # pseudo-labels from the CAMs here, written by the actors themselves
    crf = {"alphas": [6], "pseudo_from": "cam"}
    summary = run_infer(make_cfg(str(copy), checkpoint, infer={"threshold": 0.25}, crf=crf), str(out),
                        progress=False)
    assert (summary.done, summary.failed) == (7, 1)
    assert str(jpeg) in summary.errors[NAMES[4]]
    rows = {row["name"]: row for row in read_manifest(str(out))}
    assert sorted(rows) == NAMES
    assert rows[NAMES[4]]["status"] == "error" and str(jpeg) in rows[NAMES[4]]["error"]
    assert rows[NAMES[4]]["cam"] is None and rows[NAMES[4]]["classes"]
    for name in NAMES[:4] + NAMES[5:]:
        assert rows[name]["status"] == "ok"
        assert (out / f"crf/a6/{name}.png").is_file()
        cams, classes = load_cams(str(out), name)
        pseudo = np.array(Image.open(out / f"pseudo_labels/{name}.png"))
        np.testing.assert_array_equal(pseudo, cams_to_label(cams, classes, 0.25, cams.shape[1:]))
        assert (rows[name]["pseudo_source"], rows[name]["pseudo_value"]) == ("cam", 0.25)
    assert not (out / f"cams/{NAMES[4]}.npz").exists()
    assert VOC.class_names[extra] in rows[NAMES[0]]["classes"]
    assert extra in load_cams(str(out), NAMES[0])[1]


def test_pseudo_labels_follow_the_chosen_source_without_recomputing(baseline, dataset, tmp_path):
    root, checkpoint = dataset
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    cfg = make_cfg(root, checkpoint)

    result = write_pseudo_labels(str(out), NAMES, "cam", 0.2, cfg, use_ray=False)
    assert (result.written, result.missing) == (8, [])
    for name in NAMES:
        cams, classes = load_cams(str(out), name)
        expected = cams_to_label(cams, classes, 0.2, cams.shape[1:])
        np.testing.assert_array_equal(np.array(Image.open(out / f"pseudo_labels/{name}.png")), expected)
    rows = assert_one_ok_row_per_image(out)
    assert {(row["pseudo_source"], row["pseudo_value"]) for row in rows} == {("cam", 0.2)}

    # The same settings through run_infer: nothing to redo. Another alpha: every pseudo-label redone.
    cam_cfg = make_cfg(root, checkpoint, infer={"threshold": 0.2}, crf={"pseudo_from": "cam"})
    same = run_infer(cam_cfg, str(out), progress=False)
    assert (same.skipped, same.pseudo_written) == (8, 0)
    other = run_infer(make_cfg(root, checkpoint, crf={"pseudo_alpha": 10}), str(out), progress=False)
    assert (other.skipped, other.pseudo_written) == (8, 8)
    for name in NAMES:
        assert (out / f"pseudo_labels/{name}.png").read_bytes() == (out / f"crf/a10/{name}.png").read_bytes()
    with pytest.raises(UserError, match="not one of crf.alphas"):
        write_pseudo_labels(str(out), NAMES, "crf", 24, cfg)
    missing = write_pseudo_labels(str(out), NAMES[:2] + ["nobody"], "crf", 6, cfg, use_ray=False)
    assert (missing.written, missing.missing) == (2, ["nobody"])


def test_resuming_with_another_checkpoint_is_refused(baseline, dataset, tmp_path):
    root, _ = dataset
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(build_classifier("resnet38d_tiny").state_dict(), other)
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    with pytest.raises(UserError, match="checkpoint_sha256"):
        run_infer(make_cfg(root, str(other)), str(out), progress=False)


def test_manifest_reads_back_as_parquet(baseline):
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO((baseline[0] / "manifest.parquet").read_bytes()))
    assert table.num_rows == 8
    assert {"name", "status", "error", "classes", "cam", "crf", "pseudo_label", "cam_node", "crf_node",
            "load_s", "cam_s", "crf_s", "write_s"} <= set(table.column_names)


def test_fractional_gpus_put_four_cam_actors_on_one_gpu(dataset):
    from cse_ray.infer.workers import scheduling_options

    root, checkpoint = dataset
    cfg = make_cfg(root, checkpoint, infer={"gpus_per_actor": 0.25, "num_actors": 4})
    options = scheduling_options("cam", cfg, use_gpu=True)
    assert options["num_gpus"] == 0.25 and cfg.infer.num_actors * options["num_gpus"] == 1.0
    assert "num_gpus" not in scheduling_options("cam", cfg, use_gpu=False)  # CPU actors ask for none
    # benchmarks/gpu_check.py places four such actors on one GPU (tests/test_gpu_check.py, its dry run).


def test_use_gpu_true_on_a_cluster_without_gpus_is_refused_naming_the_key(ray_session, dataset, tmp_path):
    root, checkpoint = dataset
    for gpus in (1.0, 0.0):  # whatever GPU share the actors would take
        cfg = make_cfg(root, checkpoint, infer={"use_gpu": "true", "gpus_per_actor": gpus})
        with pytest.raises(UserError, match="config key infer.use_gpu: true, but the Ray cluster has no GPU"):
            run_infer(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "cams").exists()


def test_a_cluster_too_small_for_actors_and_crf_is_refused(ray_session, dataset, tmp_path):
    root, checkpoint = dataset
    cfg = make_cfg(root, checkpoint, infer={"num_actors": 2, "cpus_per_actor": 1.0})
    with pytest.raises(UserError, match="= 3 CPUs, but the Ray cluster has 2 CPUs"):
        run_infer(cfg, str(tmp_path), progress=False)
    cfg = make_cfg(root, checkpoint, infer={"cam_resources": {"cam": 0.01}})
    with pytest.raises(UserError, match="infer.cam_resources.cam: no node of the Ray cluster offers"):
        run_infer(cfg, str(tmp_path), progress=False)
