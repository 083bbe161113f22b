"""Evaluation: the one-pass sweep must count exactly what a per-threshold argmax loop counts."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cse_ray.data.voc import CATEGORY_NAMES, IGNORE_INDEX
from cse_ray.errors import UserError
from cse_ray.evaluate import evaluate, report_paths, run_evaluate, write_reports
from cse_ray.formats import load_cam_npz, save_cam_npz, write_label_png
from cse_ray.metrics import ConfusionSweep, sweep_from_arrays, threshold_grid

THRESHOLDS = threshold_grid()


# ------------------------------------------------------------------------- an independent implementation
def reference_confusions(items, thresholds) -> np.ndarray:
    """The reference's way: for each threshold, argmax over a float32 [t, 20 class maps] tensor."""
    confusions = np.zeros((len(thresholds), 21, 21), np.int64)
    for index, threshold in enumerate(thresholds):
        for cams, classes, gt in items:
            dense = np.zeros((21,) + gt.shape, np.float32)
            dense[0] = threshold
            for class_index, class_map in zip(classes, cams):
                dense[class_index + 1] = class_map
            predicted = np.argmax(dense, axis=0)
            valid = gt != IGNORE_INDEX
            confusions[index] += np.bincount(gt[valid].astype(np.int64) * 21 + predicted[valid],
                                             minlength=441).reshape(21, 21)
    return confusions


def reference_iou(confusion: np.ndarray) -> np.ndarray:
    true_positive = np.diag(confusion).astype(np.float64)
    return true_positive / (confusion.sum(axis=1) + confusion.sum(axis=0) - true_positive + 1e-10)


def random_items(seed: int, count: int = 6):
    """Non-square images, 0..4 classes, scores on a 0.01 grid (ties with thresholds and between maps),
    ground truth with ignore pixels."""
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        height, width = int(rng.integers(17, 40)), int(rng.integers(23, 50))
        present = 0 if index == 0 else int(rng.integers(1, 5))
        classes = rng.choice(20, size=present, replace=False)
        cams = (rng.integers(0, 60, (present, height, width)) / 100).astype(np.float32)
        gt = rng.integers(0, 21, (height, width)).astype(np.uint8)
        gt[rng.random((height, width)) < 0.15] = IGNORE_INDEX
        items.append((cams, classes, gt))
    return items


def write_native(tmp_path, items, prefix="img"):
    pred, gt_dir = tmp_path / "pred", tmp_path / "gt"
    names = []
    for index, (cams, classes, gt) in enumerate(items):
        name = f"{prefix}_{index}"
        save_cam_npz(pred / f"{name}.npz", cams, classes)
        write_label_png(gt_dir / f"{name}.png", gt)
        names.append(name)
    return pred, gt_dir, names


# ------------------------------------------------------------------------------------------ the sweep
def test_one_pass_sweep_counts_exactly_what_the_per_threshold_loop_counts():
    items = random_items(seed=1)
    sweep = sweep_from_arrays(items, THRESHOLDS)
    expected = reference_confusions(items, THRESHOLDS)

    confusions = sweep.confusions()
    assert confusions.shape == (30, 21, 22)
    assert np.array_equal(confusions[:, :, :21], expected)
    assert not confusions[:, :, 21].any()  # "no prediction" exists only for label maps

    curve = np.array([reference_iou(c).mean() * 100 for c in expected])
    best = int(np.argmax(curve))
    result = sweep.result()
    assert result.threshold == THRESHOLDS[best]
    assert result.miou == pytest.approx(curve[best], abs=1e-12)
    assert [m for _, m in result.curve] == pytest.approx(curve.tolist(), abs=1e-12)
    assert list(result.per_class.values()) == pytest.approx((reference_iou(expected[best]) * 100).tolist(),
                                                             abs=1e-12)
    assert result.num_images == len(items)


def test_merged_partial_sweeps_equal_one_sweep_and_threshold_ties_go_to_background():
    items = random_items(seed=2)
    whole = sweep_from_arrays(items, THRESHOLDS)
    merged = sweep_from_arrays(items[:2], THRESHOLDS).merge(sweep_from_arrays(items[2:], THRESHOLDS))
    assert np.array_equal(whole.confusions(), merged.confusions())
    assert merged.num_images == len(items)

    # A score equal to the threshold is background (argmax ties go to the background channel).
    gt = np.ones((2, 3), np.uint8)
    single = sweep_from_arrays([(np.full((1, 2, 3), 0.2, np.float32), [0], gt)], [0.19, 0.2, 0.21])
    assert single.confusions()[:, 1, :2].tolist() == [[0, 6], [6, 0], [6, 0]]


# --------------------------------------------------------------------------------------- file formats
def test_native_npz_files_give_the_reference_result(tmp_path):
    items = random_items(seed=3)
    pred, gt_dir, names = write_native(tmp_path, items)
    cams, classes = load_cam_npz(pred / f"{names[1]}.npz")
    assert cams.dtype == np.float32 and classes.tolist() == items[1][1].tolist()
    assert np.array_equal(cams, items[1][0].astype(np.float16).astype(np.float32))

    result = evaluate(pred, gt_dir, names, task="cam", fmt="native", workers=2)
    stored = [(c.astype(np.float16).astype(np.float32), k, g) for c, k, g in items]
    expected = reference_confusions(stored, THRESHOLDS)[result.best_index]
    assert np.array_equal(result.confusion[:, :21], expected)
    assert result.num_images == len(names) == len(result.per_image)
    payload = result.to_json_dict()
    assert list(payload["per_class"]) == list(CATEGORY_NAMES)
    assert [t for t, _ in payload["curve"]] == THRESHOLDS.tolist()
    assert payload["threshold"] in THRESHOLDS.tolist()


def test_seed_cam_dicts_give_the_same_result_as_native(tmp_path):
    items = random_items(seed=4)
    pred, gt_dir, names = write_native(tmp_path, items)
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    for name, (cams, classes, _) in zip(names, items):
        # The reference's dict; float16-rounded so that both formats hold the same numbers.
        np.save(seed_dir / f"{name}.npy", {int(k): m.astype(np.float16).astype(np.float32)
                                           for k, m in zip(classes, cams)})
    native = evaluate(pred, gt_dir, names, fmt="native")
    seed = evaluate(seed_dir, gt_dir, names, fmt="seed")
    assert seed.curve == native.curve and seed.threshold == native.threshold
    assert np.array_equal(seed.confusion, native.confusion)


def test_label_maps_png_and_seed_dicts(tmp_path):
    rng = np.random.default_rng(5)
    gt_dir, png_dir, seed_dir = tmp_path / "gt", tmp_path / "png", tmp_path / "seed"
    seed_dir.mkdir()
    names, labels, gts = [], [], []
    for index in range(4):
        height, width = 21 + index, 30 - index
        gt = rng.integers(0, 21, (height, width)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = IGNORE_INDEX
        keys = np.sort(rng.choice(21, size=4, replace=False))
        scores = rng.random((4, height, width)).astype(np.float32)
        label = keys[np.argmax(scores, axis=0)].astype(np.uint8)
        name = f"lab_{index}"
        np.save(seed_dir / f"{name}.npy", {int(k): s for k, s in zip(keys, scores)})
        write_label_png(gt_dir / f"{name}.png", gt)
        write_label_png(png_dir / f"{name}.png", label)
        names.append(name)
        labels.append(label)
        gts.append(gt)

    from_png = evaluate(png_dir, gt_dir, names, task="label", fmt="native")
    from_seed = evaluate(seed_dir, gt_dir, names, task="label", fmt="seed")
    assert from_png.threshold is None and from_png.curve == []
    assert from_png.per_class == from_seed.per_class
    valid = np.concatenate([g[g != IGNORE_INDEX] for g in gts])
    predicted = np.concatenate([lab[g != IGNORE_INDEX] for lab, g in zip(labels, gts)])
    counts = np.bincount(valid.astype(np.int64) * 21 + predicted, minlength=441).reshape(21, 21)
    expected = reference_iou(counts)
    assert list(from_png.per_class.values()) == pytest.approx((expected * 100).tolist(), abs=1e-12)
    assert from_png.to_json_dict()["threshold"] is None


def test_label_pixels_predicted_255_count_as_no_prediction(tmp_path):
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    label = np.array([[1, 255, 0, 255]], np.uint8)
    sweep = ConfusionSweep(None)
    sweep.add_labels(label, gt)
    result = sweep.result()
    # class 1: TP 1, T 2, P 1 -> 1/2; background likewise; the 255 pixels are false negatives.
    assert result.per_class["aeroplane"] == pytest.approx(50.0)
    assert result.per_class["background"] == pytest.approx(50.0)
    assert result.false_negative["aeroplane"] == pytest.approx(50.0)
    assert result.false_positive["aeroplane"] == pytest.approx(0.0)
    assert result.confusion[1, 21] == 1 and result.confusion[0, 21] == 1


# -------------------------------------------------------------------------------------------- bad input
def test_missing_predictions_are_counted_and_the_first_ten_named(tmp_path):
    items = random_items(seed=6, count=2)
    pred, gt_dir, _ = write_native(tmp_path, items)
    names = [f"img_{i}" for i in range(13)]
    for name in names[2:]:
        write_label_png(gt_dir / f"{name}.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(UserError) as error:
        evaluate(pred, gt_dir, names)
    message = str(error.value)
    assert "11 of 13" in message and "img_2," in message and "img_11" in message and "img_12" not in message


def test_size_mismatch_and_bad_values_name_the_file(tmp_path):
    items = random_items(seed=7, count=2)
    pred, gt_dir, names = write_native(tmp_path, items)
    write_label_png(gt_dir / f"{names[1]}.png", np.zeros((5, 7), np.uint8))
    with pytest.raises(UserError, match=f"{names[1]}.npz: prediction is .* but its ground truth is 7x5"):
        evaluate(pred, gt_dir, names, workers=1)

    bad_gt = items[1][2].copy()
    bad_gt[0, 0] = 40
    write_label_png(gt_dir / f"{names[1]}.png", bad_gt)
    with pytest.raises(UserError, match=r"ground truth has values \[40\]") as error:
        evaluate(pred, gt_dir, names, workers=1)
    assert f"{names[1]}.npz" in str(error.value)

    label_dir = tmp_path / "labels"
    write_label_png(label_dir / f"{names[0]}.png", np.full(items[0][2].shape, 30, np.uint8))
    with pytest.raises(UserError, match=rf"{names[0]}.png: prediction has values \[30\]"):
        evaluate(label_dir, gt_dir, names[:1], task="label")

    (pred / f"{names[0]}.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match=f"{names[0]}.npz: cannot read CAM file"):
        evaluate(pred, gt_dir, names[:1])
    with open(pred / f"{names[0]}.npz", "wb") as handle:  # a plain .npy under the .npz name
        np.save(handle, np.zeros(3))
    with pytest.raises(UserError, match=f"{names[0]}.npz: not an .npz archive"):
        evaluate(pred, gt_dir, names[:1])

    cams, classes, gt = items[1]
    broken = cams.copy()
    broken[-1, 0, 0] = np.nan
    with pytest.raises(UserError, match="image #0: the class maps contain NaN"):
        sweep_from_arrays([(broken, classes, gt)])
    with pytest.raises(UserError, match="class indices must be distinct integers in 0..19"):
        sweep_from_arrays([(cams[:1], [20], gt)])


def test_unsafe_names_empty_lists_and_bad_options_are_refused(tmp_path):
    items = random_items(seed=8, count=1)
    pred, gt_dir, names = write_native(tmp_path, items)
    for unsafe in ("../img_0", "sub/img_0", "a\\b"):
        with pytest.raises(UserError, match="must not contain"):
            evaluate(pred, gt_dir, [unsafe])
    with pytest.raises(UserError, match="empty"):
        evaluate(pred, gt_dir, [])
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        run_evaluate(str(pred), str(gt_dir), str(empty_list), "cam", "native", None, None)
    with pytest.raises(UserError, match="strictly increasing"):
        evaluate(pred, gt_dir, names, thresholds=[0.3, 0.2])
    good_list = tmp_path / "list.txt"
    good_list.write_text("img_0\n")
    with pytest.raises(UserError, match="start <= stop"):
        run_evaluate(str(pred), str(gt_dir), str(good_list), "cam", "native", None, (0.5, 0.2, 0.01))
    with pytest.raises(UserError, match="task"):
        evaluate(pred, gt_dir, names, task="segment")


# ------------------------------------------------------------------------------------------- Ray path
def test_ray_tasks_give_the_local_result(tmp_path, ray_session):
    items = random_items(seed=9, count=10)
    pred, gt_dir, names = write_native(tmp_path, items)
    local = evaluate(pred, gt_dir, names, use_ray=False)
    on_ray = evaluate(pred, gt_dir, names, use_ray=True)
    assert on_ray.curve == local.curve and on_ray.threshold == local.threshold
    assert np.array_equal(on_ray.confusion, local.confusion)
    assert [s.name for s in on_ray.per_image] == [s.name for s in local.per_image]

    write_label_png(gt_dir / f"{names[3]}.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UserError, match=f"{names[3]}.npz: prediction is"):
        evaluate(pred, gt_dir, names, use_ray=True)


# -------------------------------------------------------------------------------------------- reports
def test_per_image_statistics_at_the_best_threshold():
    gt = np.zeros((4, 6), np.uint8)
    gt[1:3, 1:4] = 8  # cat
    gt[0, 0] = IGNORE_INDEX
    cams = np.zeros((1, 4, 6), np.float32)
    cams[0][gt == 8] = 0.9
    cams[0][3, 5] = 0.2  # a weak false positive that thresholds >= 0.2 remove
    sweep = sweep_from_arrays([(cams, [7], gt)], THRESHOLDS, keep_per_image=True)
    result = sweep.result()
    assert result.threshold == 0.2 and result.miou == pytest.approx(200 / 21)
    (stats,) = result.per_image
    assert (stats.pixels, stats.ignored, stats.accuracy) == (23, 1, 100.0)
    assert stats.miou == pytest.approx(100.0)
    assert stats.gt_classes == ["background", "cat"] == stats.predicted_classes


def test_reports_and_cli_function(tmp_path, capsys):
    items = random_items(seed=10, count=4)
    pred, gt_dir, names = write_native(tmp_path, items)
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(names) + "\n")
    out = tmp_path / "report" / "eval.json"
    result = run_evaluate(str(pred), str(gt_dir), str(list_file), "cam", "native", str(out), (0.1, 0.3, 0.05),
                          log_dir=str(tmp_path / "tb"))
    printed = capsys.readouterr().out
    assert f"mIoU {result.miou:.2f}" in printed

    payload = json.loads(out.read_text())
    assert {"miou", "threshold", "per_class", "curve", "num_images", "miou_present", "false_positive",
            "false_negative"} <= set(payload)
    assert [t for t, _ in payload["curve"]] == [0.1, 0.15, 0.2, 0.25, 0.3]
    assert payload["num_images"] == 4 and len(payload["per_class"]) == 21

    paths = report_paths(out)
    table = pq.read_table(paths["per_image"])
    assert table.num_rows == 4 and table.column("name").to_pylist() == names
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG" and image.size == (760, 480)
    assert "| background |" in open(paths["markdown"]).read()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert not [f for f in os.listdir(out.parent) if f.endswith(".tmp")]

    label_out = tmp_path / "label.json"
    labels = ConfusionSweep(None)
    labels.add_labels(items[1][2], items[1][2], name="same")
    written = write_reports(labels.result(), label_out)
    present = [int(v) for v in np.unique(items[1][2]) if v != 255]
    expected = 100.0 * len(present) / 21  # identical maps: IoU 100 where present, 0 for the absent
    assert "plot" not in written and json.loads(label_out.read_text())["miou"] == pytest.approx(expected)


def test_cli_evaluate_sweeps_the_configs_grid(tmp_path, capsys):
    """`cse-ray evaluate --thresholds 0.1 0.395 0.01` and a config with the same keys sweep one grid,
    0.10..0.39: the stop is never exceeded."""
    from cse_ray.cli import main
    from cse_ray.config import load_config, thresholds

    pred, gt_dir, names = write_native(tmp_path, random_items(seed=11, count=2))
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(names) + "\n")
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt_dir), "--list", str(list_file),
                 "--thresholds", "0.1", "0.395", "0.01", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    swept = [t for t, _ in json.loads(out.read_text())["curve"]]
    cfg = load_config(None, ["data.root=/voc", "evaluate.threshold_start=0.1",
                             "evaluate.threshold_stop=0.395", "evaluate.threshold_step=0.01"])
    assert swept == list(thresholds(cfg.evaluate)) == [round(0.1 + 0.01 * i, 2) for i in range(30)]

    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt_dir), "--list", str(list_file),
                 "--thresholds", "0.99", "1.0", "0.015"])
    assert code == 2 and "threshold step 0.015 is larger than stop - start" in capsys.readouterr().err
