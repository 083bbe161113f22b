"""`cse-ray predict`: a trained segmentation network segments images on a pool of Ray actors.

Each `SegWorker` actor holds one network replica (on a GPU, or a fraction of one, when the cluster has
them): per image it reads the file, computes the multi-scale + flip class probabilities with
`cse_ray.segment.predict_probabilities` (the one prediction code path, shared with train-seg's
validation and the pipeline's seg_miou) and writes `DIR/NAME.png`, the argmax as a palette PNG of the
image's size, itself and atomically. With `predict.crf` the probabilities (float16) go through the
object store to a Ray CPU task that runs the dense CRF (`cse_ray.crf.crf_segmentation`) and writes the
PNG. As in `cse-ray rw`: the driver keeps one row per image in `predict_manifest.parquet`, a rerun skips
the images whose PNG exists, a killed actor is restarted by Ray and its in-flight images are retried
there, an unreadable image is an error row and the rest goes on.

Checked before Ray starts (exit code 2): the images (a folder of JPEG/PNG files with distinct names, or
a list and a VOC root holding every listed image), the checkpoint (train_seg.network with the dataset's
class count) and that a resumed folder was made with the same checkpoint and test-time settings
(`predict_settings.json`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from cse_ray import artifacts
from cse_ray.config import Config, CrfConfig
from cse_ray.errors import UserError, short_error
from cse_ray.infer.manifest import LabelMapSummary, Manifest
from cse_ray.infer.plan import check_settings
from cse_ray.infer.pool import actors_lost, run_on_actors
from cse_ray.infer.workers import TEST_KILL_ENV, scheduling_options
from cse_ray.layout import PredictLayout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what `--images DIR` picks up (any case)
# Test-only (see cse_ray.infer.workers.TEST_KILL_ENV): a predict actor dies once per folder after N images.
TEST_KILL_PREDICT_MARKER = ".test_kill_predict_actor.marker"


def predict_manifest_schema():
    import pyarrow as pa

    text, number = pa.string(), pa.float64()
    return pa.schema([
        ("name", text), ("status", text), ("error", text), ("image", text), ("label", text),
        ("height", pa.int32()), ("width", pa.int32()), ("load_s", number), ("predict_s", number),
        ("crf_s", number), ("write_s", number), ("node", text), ("actor", pa.int32()), ("pid", pa.int64()),
        ("crf_node", text),
    ])


def find_images(folder: str) -> list[tuple[str, str]]:
    """(NAME, path) of every JPEG/PNG directly in `folder`, sorted; NAME is the file's stem."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--images {folder}: not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise UserError(f"--images {folder}: no .jpg, .jpeg or .png file in the folder")
    seen: dict[str, Path] = {}
    for file in files:
        if file.stem in seen:
            raise UserError(f"--images {folder}: {seen[file.stem].name} and {file.name} would both be "
                            f"written to {file.stem}.png (rename one)")
        seen[file.stem] = file
    return [(name, str(file.resolve())) for name, file in seen.items()]


def listed_images(root: str, names: Sequence[str], what: str) -> list[tuple[str, str]]:
    """(NAME, ROOT/JPEGImages/NAME.jpg) of the listed names; a missing image is refused here."""
    from cse_ray.data.voc import image_path

    names = list(dict.fromkeys(names))
    if not names:
        raise UserError(f"{what}: the list is empty")
    if not Path(root, "JPEGImages").is_dir():
        raise UserError(f"--root {root}: has no JPEGImages folder (not a VOC-layout root)")
    jobs = [(name, str(Path(image_path(root, name)).resolve())) for name in names]
    missing = [path for _, path in jobs if not Path(path).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: image of {what} not found ({len(missing)} of {len(jobs)} listed "
                        "images are missing)")
    return jobs


def load_segmenter_state(cfg: Config, checkpoint: str) -> tuple[dict, str]:
    """(state dict, sha256): the checkpoint loaded into train_seg.network for the dataset's classes, so a
    checkpoint of another network or class count is refused before any actor starts."""
    from cse_ray.models import build_segmenter, load_weights, read_weights

    network, labels = cfg.train_seg.network, cfg.data.labels
    if not artifacts.exists(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: file not found")
    model = build_segmenter(network, labels.num_classes, cfg.train_seg.aspp_rates)
    with artifacts.local_copy(checkpoint) as local:
        digest = artifacts.file_sha256(local)
        try:
            load_weights(model, local)
        except Exception as err:  # another network, class count, or not a checkpoint at all
            detail = str(err).replace(f"{local}: ", "").splitlines()[0][:300] or type(err).__name__
            try:
                state = read_weights(local)[0]
            except UserError:
                state = {}
            heads = state.get("aspp.convs.0.weight")
            if heads is not None and heads.shape[0] - 1 != labels.num_classes:
                given = (f"data.class_names gives {labels.num_classes}" if cfg.data.class_names
                         else f"data.dataset={cfg.data.dataset} has {labels.num_classes}")
                detail = f"it segments {heads.shape[0] - 1} classes, but {given}"
            elif state and heads is None:
                kind = "a CAM classifier's (fc8)" if "fc8.weight" in state else "not a segmentation network's"
                detail = f"{kind} weights, no ASPP head; {detail}"
            raise UserError(f"--checkpoint {checkpoint}: cannot be loaded into train_seg.network={network} "
                            f"for {labels.num_classes} classes ({detail}); give the training run's "
                            "config (--config RUN/config.yaml) or set train_seg.network") from None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, digest


class SegWorker:
    """One segmentation network replica: class probabilities of one image at a time."""

    def __init__(self, cfg: Config, state_ref: list, use_gpu: bool, out: str, index: int,
                 kill_after: int | None) -> None:
        import ray
        import torch

        from cse_ray.models import build_segmenter
        from cse_ray.runtime import local_device, node_id

        p = cfg.predict
        if not use_gpu:
            torch.set_num_threads(max(1, int(p.cpus_per_actor)))
        self.device = local_device() if use_gpu else torch.device("cpu")
        seg = cfg.train_seg
        self.model = build_segmenter(seg.network, cfg.data.labels.num_classes, seg.aspp_rates)
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.eval().to(self.device)
        if p.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = torch.bfloat16 if p.bf16 else None
        self.scales, self.flip, self.channels_last, self.crf = tuple(p.scales), p.flip, p.channels_last, p.crf
        self.layout, self.index, self.node = PredictLayout(out), index, node_id()
        self.kill_after, self.processed = kill_after, 0

    def process(self, name: str, path: str) -> tuple[dict, tuple | None]:
        """(manifest row, (image, float16 probabilities) for the CRF task or None); the PNG is written
        here unless the CRF writes it. An unreadable image gives an error row."""
        import numpy as np

        from cse_ray.formats import read_image, write_label_png
        from cse_ray.segment import label_from_probabilities, predict_probabilities

        row: dict = {"name": name, "image": path, "node": self.node, "actor": self.index, "pid": os.getpid()}
        start = time.perf_counter()
        try:
            image = read_image(path)
        except UserError as err:
            row.update(status="error", error=str(err), load_s=time.perf_counter() - start)
            return row, None
        loaded = time.perf_counter()
        probs = predict_probabilities(self.model, image, self.scales, self.flip, self.device, self.amp_dtype,
                                      self.channels_last)
        predicted = time.perf_counter()
        payload = None
        if self.crf:
            payload = (image, probs.astype(np.float16))
        else:
            write_label_png(self.layout.label(name), label_from_probabilities(probs))
            row["label"] = self.layout.label_rel(name)
        row.update(status="ok", error=None, height=image.shape[0], width=image.shape[1],
                   load_s=loaded - start, predict_s=predicted - loaded,
                   write_s=time.perf_counter() - predicted)
        self.processed += 1
        self._test_fault_hook()
        return row, payload

    def _test_fault_hook(self) -> None:
        """Test only (see TEST_KILL_ENV): die once per output folder after `kill_after` images."""
        if not self.kill_after or self.processed < self.kill_after or artifacts.is_uri(self.layout.root):
            return
        try:
            marker = Path(self.layout.root, TEST_KILL_PREDICT_MARKER)
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def crf_and_write(payload: tuple | None, label_path: str, params: CrfConfig) -> dict:
    """The CRF Ray task's body: the CRF's label map of one image written to `label_path`."""
    from cse_ray.crf import crf_segmentation
    from cse_ray.formats import write_label_png
    from cse_ray.runtime import node_id

    if payload is None:  # the actor reported an error row
        return {}
    image, probs = payload
    start = time.perf_counter()
    label = crf_segmentation(image, probs, params)
    middle = time.perf_counter()
    write_label_png(label_path, label)
    return {"crf_s": middle - start, "crf_write_s": time.perf_counter() - middle, "crf_node": node_id()}


def run_predict(cfg: Config, out: str, checkpoint: str, *, images: str | None = None,
                list_file: str | None = None, root: str | None = None, names: Sequence[str] | None = None,
                progress: bool = True) -> LabelMapSummary:
    """Segment every image of the folder `images`, or of the list (`list_file`, or `names`) under the
    VOC root `root`, into `out/NAME.png`, resuming what exists. Network and classes come from
    `cfg.train_seg` and `cfg.data`, the test-time settings from `cfg.predict`."""
    from cse_ray.data.voc import list_path, read_list

    started = time.perf_counter()
    out = artifacts.absolute(out)
    layout = PredictLayout(out)
    if images is not None:
        if artifacts.absolute(images) == out:
            raise UserError(f"--out {out}: the same folder as --images (the label PNGs would overwrite "
                            "PNG images); give another --out")
        jobs = find_images(images)
    elif root is not None and (list_file is not None or names is not None):
        root = artifacts.absolute(root)
        if names is None:
            listed = list_path(root, list_file)
            names, what = read_list(listed), f"--list {listed}"
        else:
            what = f"the list of {len(names)} names"
        jobs = listed_images(root, names, what)
    else:
        raise UserError("predict: give --images DIR, or --list FILE with --root DIR")
    state, digest = load_segmenter_state(cfg, artifacts.absolute(checkpoint))
    p, c = cfg.predict, cfg.crf
    settings = {"network": cfg.train_seg.network, "classes": cfg.data.labels.num_classes,
                "checkpoint_sha256": digest, "scales": [float(s) for s in p.scales], "flip": p.flip,
                "bf16": p.bf16, "crf": [c.iterations, c.gauss_sxy, c.gauss_compat, c.bilateral_sxy,
                                        c.bilateral_srgb, c.bilateral_compat] if p.crf else False}
    check_settings(layout, settings, layout.settings)

    import ray
    from tqdm import tqdm

    from cse_ray.runtime import check_resources, ensure_ray, resolve_use_gpu

    ensure_ray()
    use_gpu = p.gpus_per_actor > 0 and resolve_use_gpu(p.use_gpu, "predict.use_gpu")
    gpus = p.num_actors * p.gpus_per_actor if use_gpu else 0.0
    cpus = p.num_actors * p.cpus_per_actor + (c.cpus_per_task if p.crf else 0.0)
    check_resources([({"CPU": cpus, "GPU": gpus}, lambda total: (
        "config keys predict.num_actors x predict.cpus_per_actor" + (" + crf.cpus_per_task" if p.crf else "")
        + f" = {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        + f", but the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"))])
    artifacts.write_json(layout.settings, settings)

    order = [name for name, _ in jobs]
    manifest = Manifest(layout, order, path=layout.manifest, schema=predict_manifest_schema())
    finished = artifacts.list_files(layout.root)
    todo = [(name, path) for name, path in jobs if layout.label_rel(name) not in finished]
    skipped = len(jobs) - len(todo)
    for name, path in jobs:
        if layout.label_rel(name) in finished:
            manifest.put({**(manifest.rows.get(name) or {}), "name": name, "status": "ok", "error": None,
                          "image": path, "label": layout.label_rel(name)})
    options = {"num_cpus": p.cpus_per_actor, "max_restarts": p.max_restarts, "max_task_retries": -1,
               **({"num_gpus": p.gpus_per_actor} if use_gpu else {})}
    kill_after = int(os.environ[TEST_KILL_ENV]) if os.environ.get(TEST_KILL_ENV) else None
    state_ref = ray.put(state) if todo else None  # in a list: a restarted actor fetches it again
    actor_class = ray.remote(SegWorker).options(**options)
    actors = [actor_class.remote(cfg, [state_ref], use_gpu, out, index, kill_after)
              for index in range(p.num_actors) if todo]
    crf_task = ray.remote(crf_and_write).options(**scheduling_options("crf", cfg, use_gpu))
    rows: dict = {}  # name -> the actor's row reference (the CRF task's comes back in `collect`)
    done, errors = 0, {}
    last_write = time.monotonic()
    bar = tqdm(total=len(jobs), initial=skipped, unit="img", desc="predict", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)

    def submit(actor, job: tuple[str, str]):
        row_ref, payload_ref = actor.process.options(num_returns=2).remote(*job)
        rows[job[0]] = row_ref
        return crf_task.remote(payload_ref, layout.label(job[0]), c) if p.crf else row_ref

    def collect(job: tuple[str, str], actor: int, ref) -> bool:
        nonlocal done, last_write
        from ray.exceptions import ActorDiedError, RayError

        name, dead = job[0], False
        try:
            row = ray.get(rows.pop(name))
        except RayError as err:
            row = {"name": name, "image": job[1], "status": "error",
                   "error": f"predict actor {actor}: {short_error(err)}"}
            dead = isinstance(err, ActorDiedError)
        if p.crf and row["status"] == "ok":
            try:
                crf = ray.get(ref)
                row.update(label=layout.label_rel(name), crf_s=crf["crf_s"], crf_node=crf["crf_node"],
                           write_s=row["write_s"] + crf["crf_write_s"])
            except RayError as err:
                row.update(status="error", error=f"CRF: {short_error(err)}")
        manifest.put(row)
        if row["status"] == "ok":
            done += 1
        else:
            errors[name] = row["error"]
        bar.update(1)
        if time.monotonic() - last_write > 30 or (done + len(errors)) % 200 == 0:
            manifest.write()
            last_write = time.monotonic()
        return dead

    try:
        left = run_on_actors(actors, todo, submit, collect, p.max_in_flight)
        if left:
            raise actors_lost("predict", left)
    finally:
        bar.close()
        manifest.write()
        for actor in actors:
            ray.kill(actor)
    summary = LabelMapSummary("predict", out, out, len(jobs), done, skipped, len(errors),
                              time.perf_counter() - started, errors)
    print(summary.line())
    return summary
