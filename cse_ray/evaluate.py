"""`cse-ray evaluate`: mIoU of prediction files against ground-truth PNGs, every file read once.

The metrics themselves (the one-pass threshold sweep, the results) are `cse_ray.metrics`; the file
formats are `cse_ray.formats`. This module finds and reads the files, runs the sweep on a thread pool or
on Ray tasks, and writes the reports.

Prediction files (`PRED/NAME.<ext>`):
- task cam, format native: `NAME.npz` CAM files (`formats.save_cam_npz`).
- task cam, format seed: the reference's `{class k: H x W}` dict in `NAME.npy`.
- task label, format native: palette PNG `NAME.png` with values 0..num_classes; 255 means "no
  prediction": the pixel counts towards its ground-truth class (a false negative) but no predicted class.
- task label, format seed: `NAME.npy` with `{0: background, k + 1: class k}` scores; the label is the key
  of the largest score (ties: smallest key).

Parallelism: a local thread pool reads the files (numpy, zlib and PNG decoding release the GIL). Ray
tasks over chunks of names are used when `use_ray=True`, or when `use_ray=None`, Ray is already
initialised and the list has more than `RAY_MIN_IMAGES` images (`use_ray=True` starts a local Ray when
none is running). Ray tasks read the files by path, so both directories must be visible to every node.
Either directory may be a `s3://`/`gs://` URI: every file is read through `cse_ray.artifacts`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cse_ray import artifacts
from cse_ray.data.voc import read_list, validate_name
from cse_ray.errors import UserError
from cse_ray.formats import load_cam_npz, load_seed_cams, load_seed_label, read_label_png
from cse_ray.labels import VOC, LabelSpace
from cse_ray.metrics import ConfusionSweep, EvalResult, check_thresholds, threshold_grid

RAY_MIN_IMAGES = 2000
TASKS = ("cam", "label")
FORMATS = ("native", "seed")


def prediction_suffix(task: str, fmt: str) -> str:
    """File extension of one prediction for a task and format."""
    return {("cam", "native"): ".npz", ("cam", "seed"): ".npy",
            ("label", "native"): ".png", ("label", "seed"): ".npy"}[(task, fmt)]


# -------------------------------------------------------------------------------------------- evaluate
def _sweep_chunk(pred_dir: str, gt_dir: str, names: Sequence[str], task: str, fmt: str,
                 thresholds: np.ndarray | None, keep_per_image: bool, labels: LabelSpace) -> ConfusionSweep:
    """Read and add one chunk of images (runs in a thread or a Ray task)."""
    sweep = ConfusionSweep(thresholds, keep_per_image, labels)
    suffix = prediction_suffix(task, fmt)
    for name in names:
        pred_path = artifacts.join(pred_dir, name + suffix)
        gt = read_label_png(artifacts.join(gt_dir, name + ".png"), what="ground truth")
        if task == "cam":
            cams, classes = load_cam_npz(pred_path) if fmt == "native" else load_seed_cams(pred_path)
            sweep.add_cams(cams, classes, gt, name=name, source=pred_path)
        else:
            if fmt == "native":
                label = read_label_png(pred_path, what="prediction")
            else:
                label = load_seed_label(pred_path, labels)
            sweep.add_labels(label, gt, name=name, source=pred_path)
    return sweep


def _chunks(names: Sequence[str], count: int) -> list[list[str]]:
    count = max(1, min(count, len(names)))
    bounds = np.linspace(0, len(names), count + 1).round().astype(int)
    return [list(names[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _missing(directory: str, names: Sequence[str], suffix: str) -> list[str]:
    present = artifacts.list_files(directory)  # one listing: one request on an object store
    return [n for n in names if n + suffix not in present]


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def evaluate(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str], names: Sequence[str],
             task: str = "cam", fmt: str = "native", thresholds: Sequence[float] | np.ndarray | None = None,
             workers: int | None = None, use_ray: bool | None = None, keep_per_image: bool = True,
             labels: LabelSpace = VOC) -> EvalResult:
    """Evaluate `PRED/NAME.*` against `GT/NAME.png` for every name, reading each file once.

    task "cam": sweep `thresholds` (default: `metrics.threshold_grid()`) and report the best; task
    "label": label maps, no threshold. See the module docstring for formats and for when Ray is used.
    """
    if task not in TASKS:
        raise UserError(f"task must be one of {TASKS}, got {task!r}")
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {fmt!r}")
    names = [str(n) for n in names]
    if not names:
        raise UserError("the image list is empty: nothing to evaluate")
    for name in names:
        validate_name(name)
    if task == "cam":
        grid = threshold_grid() if thresholds is None else check_thresholds(thresholds)
    elif thresholds is not None:
        raise UserError("thresholds apply to task 'cam' only; label maps are evaluated as they are")
    else:
        grid = None
    pred_dir, gt_dir = os.fspath(pred_dir), os.fspath(gt_dir)
    for directory, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not artifacts.is_dir(directory):
            raise UserError(f"{directory}: {what} directory does not exist")
    suffix = prediction_suffix(task, fmt)
    for directory, ext, what in ((pred_dir, suffix, "predictions"), (gt_dir, ".png", "ground truths")):
        missing = _missing(directory, names, ext)
        if missing:
            raise UserError(f"{directory}: {len(missing)} of {len(names)} listed images have no {what} "
                            f"(NAME{ext}); first ten: {', '.join(missing[:10])}")

    if use_ray is None:
        use_ray = len(names) > RAY_MIN_IMAGES and _ray_is_initialized()
    job = (task, fmt, grid, keep_per_image, labels)
    sweep = _run_on_ray(pred_dir, gt_dir, names, job) if use_ray else _run_locally(
        pred_dir, gt_dir, names, job, workers)
    return sweep.result(task)


def _merged(parts: list[ConfusionSweep]) -> ConfusionSweep:
    total = parts[0]
    for part in parts[1:]:
        total.merge(part)
    return total


def _run_locally(pred_dir: str, gt_dir: str, names: list[str], job: tuple,
                 workers: int | None) -> ConfusionSweep:
    workers = _default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(names) < 8:
        return _sweep_chunk(pred_dir, gt_dir, names, *job)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cse-ray-eval") as pool:
        return _merged(list(pool.map(lambda chunk: _sweep_chunk(pred_dir, gt_dir, chunk, *job),
                                     _chunks(names, workers * 4))))


def _ray_is_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _run_on_ray(pred_dir: str, gt_dir: str, names: list[str], job: tuple) -> ConfusionSweep:
    """One Ray task per chunk of names (about four per CPU), partial sweeps merged on the driver."""
    import ray

    if not ray.is_initialized():
        ray.init()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_count = min(len(names), max(cpus * 4, math.ceil(len(names) / 500)))
    remote_chunk = ray.remote(num_cpus=1)(_sweep_chunk)
    pred_dir, gt_dir = artifacts.absolute(pred_dir), artifacts.absolute(gt_dir)  # tasks run elsewhere
    pending = [remote_chunk.remote(pred_dir, gt_dir, chunk, *job) for chunk in _chunks(names, chunk_count)]
    try:
        return _merged(ray.get(pending))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise UserError(str(error.cause)) from None
        raise


# --------------------------------------------------------------------------------------------- reports
def report_paths(out_json: str | os.PathLike[str]) -> dict[str, str]:
    """Where `write_reports` puts each report, beside the JSON: STEM.md, STEM.images.parquet, STEM.curve.png.

    Plain string handling, so that `s3://`/`gs://` URIs work as well as local paths.
    """
    out = os.fspath(out_json)
    # A URI's query string (pyarrow's filesystem options) stays at the end.
    location, mark, query = out.partition("?") if artifacts.is_uri(out) else (out, "", "")
    stem = location[: -len(".json")] if location.endswith(".json") else location
    return {"json": out, "markdown": f"{stem}.md{mark}{query}",
            "per_image": f"{stem}.images.parquet{mark}{query}", "plot": f"{stem}.curve.png{mark}{query}"}


def per_image_table(result: EvalResult) -> Any:
    """The per-image statistics as a pyarrow Table (one row per image)."""
    import pyarrow as pa

    schema = pa.schema([
        ("name", pa.string()), ("prediction_file", pa.string()), ("height", pa.int32()),
        ("width", pa.int32()), ("pixels", pa.int64()), ("ignored_pixels", pa.int64()),
        ("accuracy", pa.float64()), ("miou", pa.float64()), ("gt_classes", pa.list_(pa.string())),
        ("predicted_classes", pa.list_(pa.string())),
    ])
    rows = [{"name": r.name, "prediction_file": r.source, "height": r.height, "width": r.width,
             "pixels": r.pixels, "ignored_pixels": r.ignored, "accuracy": r.accuracy, "miou": r.miou,
             "gt_classes": r.gt_classes, "predicted_classes": r.predicted_classes} for r in result.per_image]
    return pa.Table.from_pylist(rows, schema=schema)


def write_tensorboard(result: EvalResult, log_dir: str | os.PathLike[str], step: int = 0,
                      prefix: str = "eval") -> None:
    """Scalars `eval/miou`, `eval/miou_present`, `eval/threshold`, `eval/iou/<class>` at `step`, and the
    curve as `eval/curve_miou` (and `eval/curve_threshold`) with step = threshold index.

    A URI `log_dir` gets the event file uploaded once it is closed (object stores cannot append)."""
    import tempfile
    from pathlib import Path

    from torch.utils.tensorboard import SummaryWriter

    target = os.fspath(log_dir)
    if artifacts.is_uri(target):
        with tempfile.TemporaryDirectory() as local:
            write_tensorboard(result, local, step, prefix)
            for path in Path(local).iterdir():
                artifacts.write_bytes(artifacts.join(target, path.name), path.read_bytes())
        return
    writer = SummaryWriter(log_dir=target)
    try:
        writer.add_scalar(f"{prefix}/miou", result.miou, step)
        writer.add_scalar(f"{prefix}/miou_present", result.miou_present, step)
        if result.threshold is not None:
            writer.add_scalar(f"{prefix}/threshold", result.threshold, step)
        for name, value in result.per_class.items():
            writer.add_scalar(f"{prefix}/iou/{name}", value, step)
        for index, (threshold, miou) in enumerate(result.curve):
            writer.add_scalar(f"{prefix}/curve_miou", miou, index)
            writer.add_scalar(f"{prefix}/curve_threshold", threshold, index)
    finally:
        writer.close()


def write_reports(result: EvalResult, out_json: str | os.PathLike[str],
                  log_dir: str | os.PathLike[str] | None = None, step: int = 0) -> dict[str, str]:
    """Write the JSON, a Markdown table, per-image Parquet and (task cam) the curve PNG, each atomically
    (`cse_ray.artifacts`, local path or URI); TensorBoard scalars too when `log_dir` is given.
    Returns {kind: path written}."""
    from cse_ray.plots import render_line_plot

    paths = report_paths(out_json)
    artifacts.write_json(paths["json"], result.to_json_dict())
    artifacts.write_text(paths["markdown"], result.to_markdown())
    artifacts.write_parquet(paths["per_image"], per_image_table(result))
    written = {k: paths[k] for k in ("json", "markdown", "per_image")}
    if result.curve and result.threshold is not None:
        png = render_line_plot(result.curve, title=f"CAM mIoU against background threshold "
                               f"({result.num_images} images)", x_label="background threshold",
                               y_label="mIoU (%)", highlight=(result.threshold, result.miou),
                               highlight_text=f"best {result.miou:.2f} at {result.threshold:g}")
        artifacts.write_bytes(paths["plot"], png)
        written["plot"] = paths["plot"]
    if log_dir is not None:
        write_tensorboard(result, log_dir, step)
        written["tensorboard"] = os.fspath(log_dir)
    return written


# ------------------------------------------------------------------------------------------------- CLI
def run_evaluate(pred: str, gt: str, list_path: str, task: str, fmt: str, out: str | None,
                 thresholds: tuple[float, float, float] | None, log_dir: str | None = None,
                 workers: int | None = None, use_ray: bool | None = None,
                 labels: LabelSpace = VOC) -> EvalResult:
    """`cse-ray evaluate`: read the list, evaluate, print a short table, write reports when `out` is given.

    `thresholds` is (start, stop, step) of `metrics.threshold_grid`, task cam only.
    """
    names = read_list(list_path)
    if not names:
        raise UserError(f"{list_path}: the image list is empty: nothing to evaluate")
    grid = None
    if thresholds is not None:
        if task != "cam":
            raise UserError("--thresholds applies to --task cam only")
        if len(thresholds) != 3:
            raise UserError(f"thresholds must be (start, stop, step), got {thresholds}")
        grid = threshold_grid(*thresholds)
    result = evaluate(pred, gt, names, task=task, fmt=fmt, thresholds=grid, workers=workers, use_ray=use_ray,
                      labels=labels)
    print(result.summary_table())
    if out is not None:
        for kind, path in write_reports(result, out, log_dir=log_dir).items():
            print(f"{kind}: {path}")
    return result
