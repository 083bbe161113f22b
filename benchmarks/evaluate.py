"""Benchmark: the one-pass threshold sweep against the reference's per-threshold loop.

    .venv/bin/python benchmarks/evaluate.py --images 500

Writes N images of 375 x 500 (structured CAMs in the native .npz format and VOC palette ground truth
with ignore borders) to a temp dir, then times
- ours: `cse_ray.evaluate.evaluate` over the default 30 thresholds, every file read once (thread pool,
  and once more with a single worker);
- the reference's way: for every threshold, re-read every prediction and ground-truth file, take the
  argmax of [t, class maps] and add a bincount confusion matrix (kept deliberately lean: no dense
  21-channel tensor and no per-class `np.sum` loops, so the ratio is a lower bound).
Both must give identical confusion counts; the script checks it and prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cse_ray.data.voc import IGNORE_INDEX
from cse_ray.evaluate import evaluate
from cse_ray.formats import load_cam_npz, read_label_png, save_cam_npz, write_label_png
from cse_ray.metrics import threshold_grid


def make_image(rng: np.random.Generator, height: int,
               width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ellipse objects of 1-3 classes, a 5-pixel ignore border around each, and CAMs that peak inside
    the objects, spill over their borders and carry smooth noise (so thresholds matter)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gt = np.zeros((height, width), np.uint8)
    classes = np.sort(rng.choice(20, size=int(rng.integers(1, 4)), replace=False))
    cams = np.zeros((classes.size, height, width), np.float32)
    for index, class_index in enumerate(classes):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
            ry, rx = rng.uniform(0.08, 0.3) * height, rng.uniform(0.08, 0.3) * width
            distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            gt[(distance > 1.0) & (distance < 1.0 + 5.0 / min(ry, rx)) & (gt == 0)] = IGNORE_INDEX
            gt[distance <= 1.0] = class_index + 1
            peak = rng.uniform(0.5, 1.0)
            cams[index] = np.maximum(cams[index], peak * np.exp(-1.5 * distance**2))
    noise = rng.normal(0, 1, (classes.size, height // 25 + 1, width // 25 + 1)).astype(np.float32)
    noise = np.repeat(np.repeat(noise, 25, axis=1), 25, axis=2)[:, :height, :width]
    cams = np.clip(cams + 0.08 * noise, 0, None)
    cams /= cams.reshape(classes.size, -1).max(axis=1)[:, None, None] + 1e-5
    return cams, classes, gt


def write_dataset(root: Path, count: int, height: int, width: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    (root / "pred").mkdir(parents=True)
    (root / "gt").mkdir()
    names = [f"img_{i:05d}" for i in range(count)]
    for name in names:
        cams, classes, gt = make_image(rng, height, width)
        save_cam_npz(root / "pred" / f"{name}.npz", cams, classes)
        write_label_png(root / "gt" / f"{name}.png", gt)
    return names


def per_threshold_loop(pred_dir: Path, gt_dir: Path, names: list[str],
                       thresholds: np.ndarray) -> np.ndarray:
    """The reference's way: one full pass over the files for every threshold."""
    confusions = np.zeros((thresholds.size, 21, 21), np.int64)
    for index, threshold in enumerate(thresholds):
        for name in names:
            cams, classes = load_cam_npz(pred_dir / f"{name}.npz")
            gt = read_label_png(gt_dir / f"{name}.png")
            stacked = np.concatenate([np.full((1,) + gt.shape, threshold, np.float32), cams])
            labels = np.concatenate([[0], classes + 1])[np.argmax(stacked, axis=0)]
            valid = gt != IGNORE_INDEX
            confusions[index] += np.bincount(gt[valid].astype(np.int64) * 21 + labels[valid],
                                             minlength=441).reshape(21, 21)
    return confusions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="images to generate (default 500)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--workers", type=int, default=None, help="threads (default: cpus, <= 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be >= 1")

    thresholds = threshold_grid()
    with tempfile.TemporaryDirectory(prefix="cse_ray_eval_bench_") as temp:
        root = Path(temp)
        start = time.perf_counter()
        names = write_dataset(root, args.images, args.height, args.width, args.seed)
        print(f"generated {len(names)} images of {args.height}x{args.width} in "
              f"{time.perf_counter() - start:.1f} s (cpu count {os.cpu_count()})")

        timings = {}
        results = {}
        for label, workers in (("ours (1 worker)", 1), ("ours (thread pool)", args.workers)):
            start = time.perf_counter()
            results[label] = evaluate(root / "pred", root / "gt", names, thresholds=thresholds,
                                      workers=workers, use_ray=False, keep_per_image=True)
            timings[label] = time.perf_counter() - start

        start = time.perf_counter()
        reference = per_threshold_loop(root / "pred", root / "gt", names, thresholds)
        timings["per-threshold loop"] = time.perf_counter() - start

        ours = results["ours (thread pool)"]
        tp = np.diagonal(reference, axis1=1, axis2=2).astype(np.float64)
        union = reference.sum(axis=2) + reference.sum(axis=1) - tp + 1e-10
        reference_curve = (tp / union).mean(axis=1) * 100
        assert np.allclose([m for _, m in ours.curve], reference_curve, rtol=0, atol=1e-9), "curves differ"
        assert results["ours (1 worker)"].curve == ours.curve
        print(f"mIoU {ours.miou:.2f} at threshold {ours.threshold:g} (identical in both methods)")
        baseline = timings["per-threshold loop"]
        for label, seconds in timings.items():
            print(f"{label:>20s}: {seconds:8.2f} s  {len(names) / seconds:8.1f} images/s  "
                  f"speed-up {baseline / seconds:6.1f}x")


if __name__ == "__main__":
    main()
