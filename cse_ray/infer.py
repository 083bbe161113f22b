"""`cse-ray infer`: multi-scale CAMs on a pool of Ray actors, dense CRF on Ray CPU tasks, pseudo-labels.

Data flow per image: the driver sends (name, image-level label) to the least busy CAM actor; the actor
reads the image, computes the CAMs (an image and its flip in one forward), writes `cams/NAME.npz`
(and the optional seed dict, overlay and CAM pseudo-label) and returns a small record plus a payload
(image and CAMs) that stays in the object store. A CRF task is submitted at the same moment with the
payload's ObjectRef as its argument, so Ray starts it as soon as the CAM is ready, on any free CPU,
while the actors go on with the next images. At most `infer.max_in_flight` images are in flight, so
memory stays flat whatever the list length. The driver never reads an image.

Exactly once and resumable: every output is written atomically by the actor or task that computed
it, so "the file exists" means "the file is complete". An image whose expected files all exist is
skipped on a rerun; a crash loses at most the images in flight. `manifest.parquet` (one row per
image, keyed by name, merged with the previous run's rows) is rewritten atomically every
`manifest_every` completions and at the end. A dead actor is restarted by Ray (`max_restarts`) and
its in-flight images are retried there (`max_task_retries=-1`); a retried image rewrites identical
bytes and still gets one manifest row. A corrupt image becomes a row with status "error".

Pseudo-labels record where they came from (`pseudo_source`, `pseudo_value` in the manifest), so a
rerun with another alpha or threshold rewrites exactly the stale ones from the stored outputs
(`write_pseudo_labels`), without recomputing CAMs. `infer_settings.json` holds what the stored
CAMs and CRF maps depend on (network, checkpoint digest, scales, CRF parameters); resuming into a
folder made with other settings is refused rather than silently mixing two models' outputs.

The CAMs are rounded to float16 once, in the actor; the npz holds exactly these values and the CRF,
the CAM pseudo-labels and the overlays are computed from them, so every stored output can be
recomputed bit for bit from `cams/NAME.npz` and the image. The reference-format seed dicts
(`infer.save_seed`) keep the full float32 maps.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config, CrfConfig, with_absolute_paths
from cse_ray.crf import CrfResult, crf_alphas_task, crf_rel, crf_seed_rel, pseudo_rel
from cse_ray.data.prepare import resolve_data_root
from cse_ray.errors import UserError
from cse_ray.plots import cam_overlay

log = logging.getLogger(__name__)

# Test-only fault hook: with this env var set to N in the driver's environment, a CAM actor calls
# os._exit(1) right after writing the outputs of its N-th image (before returning its result), once
# per run directory (a marker file in `out` stops the restarted actor from dying again). Used by
# tests/test_infer.py to check that a dead actor's images are retried and written exactly once.
TEST_KILL_ENV = "CSE_RAY_TEST_KILL_ACTOR_AFTER"
TEST_KILL_MARKER = ".test_kill_actor.marker"

SETTINGS_FILE = "infer_settings.json"
MANIFEST_FILE = "manifest.parquet"
PSEUDO_CHUNK = 32  # images per pseudo-label rewriting task
STAGES = ("load", "cam", "crf", "write")


# ------------------------------------------------------------------------------------------ layout
def cam_rel(name: str) -> str:
    return f"cams/{name}.npz"


def cam_seed_rel(name: str) -> str:
    return f"cams_seed/{name}.npy"


def overlay_rel(name: str) -> str:
    return f"overlays/{name}.png"


def _list_files(out: str, rel_dir: str) -> set[str]:
    """Names of the finished files in one output folder (temp files start with '.'), in one listing."""
    base = artifacts.join(out, rel_dir)
    if artifacts.is_uri(base):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(base)
        infos = filesystem.get_file_info(fs.FileSelector(inner, allow_not_found=True))
        names = (info.base_name for info in infos if info.type == fs.FileType.File)
    else:
        try:
            names = [entry.name for entry in os.scandir(base) if entry.is_file()]
        except FileNotFoundError:
            return set()
    return {name for name in names if not name.startswith(".")}


class _Listing:
    """Existence of output files, answered from one directory listing per folder."""

    def __init__(self, out: str) -> None:
        self.out = out
        self._folders: dict[str, set[str]] = {}

    def exists(self, rel: str) -> bool:
        folder, _, filename = rel.rpartition("/")
        if folder not in self._folders:
            self._folders[folder] = _list_files(self.out, folder)
        return filename in self._folders[folder]


# ----------------------------------------------------------------------------------------- results
@dataclass
class InferSummary:
    """What `run_infer` did: counts, mean seconds per stage over the images computed in this run."""

    out: str
    images: int
    done: int
    skipped: int
    failed: int
    pseudo_written: int
    mean_seconds: dict[str, float]
    wall_seconds: float
    pseudo_source: str | None
    pseudo_value: float | None
    errors: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        stages = ", ".join(f"{k} {v:.3f}" for k, v in self.mean_seconds.items())
        pseudo = f"{self.pseudo_source}@{self.pseudo_value:g}" if self.pseudo_source else "not written"
        return (
            f"infer: {self.images} images, {self.done} done, {self.skipped} skipped, {self.failed} failures; "
            f"mean s/image: {stages or 'n/a'}; pseudo-labels {pseudo} ({self.pseudo_written} written); "
            f"{self.wall_seconds:.1f} s; out {self.out}"
        )


@dataclass
class PseudoLabelSummary:
    written: int
    missing: list[str] = field(default_factory=list)  # names whose source output does not exist


# ---------------------------------------------------------------------------------------- manifest
def _manifest_schema():
    import pyarrow as pa

    text, number = pa.string(), pa.float64()
    return pa.schema([
        ("name", text), ("status", text), ("error", text), ("classes", pa.list_(text)),
        ("height", pa.int32()), ("width", pa.int32()),
        ("cam", text), ("cam_seed", text), ("crf", pa.list_(text)), ("crf_seed", pa.list_(text)),
        ("overlay", text), ("pseudo_label", text), ("pseudo_source", text), ("pseudo_value", number),
        ("load_s", number), ("cam_s", number), ("crf_s", number), ("write_s", number),
        ("cam_node", text), ("cam_actor", pa.int32()), ("cam_pid", pa.int64()), ("crf_node", text),
    ])


PSEUDO_FIELDS = ("pseudo_label", "pseudo_source", "pseudo_value")


class Manifest:
    """One row per image, keyed by name; rows of earlier runs are kept and replaced, never duplicated."""

    def __init__(self, out: str, order: Sequence[str] = ()) -> None:
        import pyarrow.parquet as pq

        self.path = artifacts.join(out, MANIFEST_FILE)
        self.rows: dict[str, dict] = {}
        if artifacts.exists(self.path):
            table = pq.read_table(io.BytesIO(artifacts.read_bytes(self.path)))
            self.rows = {row["name"]: row for row in table.to_pylist()}
        self.position = {name: i for i, name in enumerate(order)}

    def put(self, row: dict) -> None:
        self.rows[row["name"]] = row

    def write(self) -> None:
        import pyarrow as pa

        schema = _manifest_schema()
        rest = len(self.position)
        ordered = sorted(
            enumerate(self.rows.values()),
            key=lambda item: (self.position.get(item[1]["name"], rest), item[0]),
        )
        rows = [{key: row.get(key) for key in schema.names} for _, row in ordered]
        artifacts.write_parquet(self.path, pa.Table.from_pylist(rows, schema=schema))


def read_manifest(out: str) -> list[dict]:
    """The manifest's rows as dicts (empty when there is none yet)."""
    return list(Manifest(out).rows.values())


# --------------------------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    """Everything validated before Ray starts."""

    out: str
    root: str
    names: list[str]
    labels: dict[str, np.ndarray]
    backbone: str
    state: dict
    settings: dict
    scales: tuple[float, ...]
    alphas: tuple[float, ...]
    crf_enabled: bool
    crf_params: CrfConfig
    save_seed: bool
    overlays: int
    pseudo_source: str | None  # None: pseudo-labels are not written by this run
    pseudo_value: float | None


def _resolve_pseudo(cfg: Config, write_pseudo: bool,
                    alphas: tuple[float, ...]) -> tuple[str | None, float | None]:
    crf = cfg.crf
    if crf.pseudo_from == "crf" and crf.pseudo_alpha != -1 and crf.pseudo_alpha not in alphas:
        raise UserError(
            f"config key crf.pseudo_alpha: {crf.pseudo_alpha:g} is not one of crf.alphas "
            f"({', '.join(f'{a:g}' for a in alphas)})"
        )
    if not write_pseudo:
        return None, None
    if crf.pseudo_from == "crf":
        if not crf.enabled:
            raise UserError(
                "config key crf.pseudo_from: crf, but crf.enabled is false (set crf.pseudo_from=cam)"
            )
        if crf.pseudo_alpha == -1:
            # -1 means "the best alpha found by evaluation", which only the pipeline knows; alone,
            # infer takes the middle alpha (10 for psa's 6/10/24) and says so in its summary.
            middle = sorted(alphas)[len(alphas) // 2]
            log.warning("crf.pseudo_alpha is -1 (best from evaluation); infer alone uses alpha %g", middle)
            return "crf", float(middle)
        return "crf", float(crf.pseudo_alpha)
    threshold = cfg.infer.threshold
    if not 0.0 <= threshold <= 1.0:
        raise UserError(
            f"config key infer.threshold: {threshold:g}; with crf.pseudo_from=cam the pseudo-labels need a "
            f"background threshold in [0, 1] (-1 means 'best from evaluation', which only the pipeline has)"
        )
    return "cam", float(threshold)


def _load_state(backbone: str, checkpoint: str) -> tuple[dict, str]:
    """Build the network and load the checkpoint once in the driver, so that a wrong file or backbone is
    a UserError before any actor starts; the state dict then reaches the actors through the object
    store (no shared file system needed for the checkpoint)."""
    from cse_ray.models import build_classifier, load_weights

    try:
        model = build_classifier(backbone)
    except UserError as err:
        raise UserError(f"config key model.backbone: {err}") from None
    local, tmp = checkpoint, None
    if artifacts.is_uri(checkpoint):
        fd, tmp = tempfile.mkstemp(suffix=Path(checkpoint).suffix or ".pth")
        with os.fdopen(fd, "wb") as handle:
            handle.write(artifacts.read_bytes(checkpoint))
        local = tmp
    try:
        digest = artifacts.file_sha256(local)
        try:
            load_weights(model, local)
        except UserError:
            raise
        except Exception as err:  # torch raises RuntimeError/KeyError/pickle errors for a wrong file
            raise UserError(
                f"config key infer.checkpoint: {checkpoint}: cannot be loaded into model.backbone={backbone} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, digest


def _check_settings(out: str, settings: dict) -> None:
    path = artifacts.join(out, SETTINGS_FILE)
    if not artifacts.exists(path):
        return
    previous = artifacts.read_json(path)
    if previous != settings:
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise UserError(
            f"{path}: the outputs under {out} were made with other settings ({', '.join(differ)} differ); "
            f"resuming would mix two sets of outputs: use a new --out, or delete the old outputs first"
        )


def _prepare(cfg: Config, out: str, checkpoint: str | None, list_name: str | None,
             write_pseudo: bool) -> _Plan:
    from cse_ray.data.voc import list_path, read_list

    checkpoint = checkpoint or cfg.infer.checkpoint
    if not checkpoint:  # the eraser trained into the same run directory, when there is one
        trained = artifacts.join(out, "train_cse", "model.pth")
        if not artifacts.exists(trained):
            raise UserError(
                f"config key infer.checkpoint: empty, and {trained} does not exist; give the CAM "
                "network's checkpoint (.pth), or run train-cse with the same --out first"
            )
        checkpoint = trained
    if not artifacts.exists(checkpoint):
        raise UserError(f"config key infer.checkpoint: {checkpoint}: file not found")
    alphas = tuple(dict.fromkeys(float(a) for a in cfg.crf.alphas))
    if cfg.crf.enabled and any(a <= 0 for a in alphas):
        raise UserError(f"config key crf.alphas: every alpha must be > 0, got {list(cfg.crf.alphas)}")
    if any(s <= 0 for s in cfg.infer.scales):
        raise UserError(f"config key infer.scales: every scale must be > 0, got {list(cfg.infer.scales)}")
    pseudo_source, pseudo_value = _resolve_pseudo(cfg, write_pseudo, alphas)

    root = resolve_data_root(cfg, out)
    names_file = list_path(root, list_name or cfg.data.infer_list)
    names = list(dict.fromkeys(read_list(names_file)))
    if not names:
        raise UserError(f"config key data.infer_list: {names_file}: the list is empty")
    labels = _image_labels(root, names, names_file, cfg.data.sbd_root or None)

    state, digest = _load_state(cfg.model.backbone, checkpoint)
    c = cfg.crf
    settings = {
        "backbone": cfg.model.backbone,
        "checkpoint_sha256": digest,
        "scales": [float(s) for s in cfg.infer.scales],
        "bf16": cfg.infer.bf16,
        "crf": [c.iterations, c.gauss_sxy, c.gauss_compat, c.bilateral_sxy, c.bilateral_srgb,
                c.bilateral_compat],
    }
    _check_settings(out, settings)
    return _Plan(
        out=out, root=root, names=names, labels=labels, backbone=cfg.model.backbone, state=state,
        settings=settings, scales=tuple(cfg.infer.scales), alphas=alphas if cfg.crf.enabled else (),
        crf_enabled=cfg.crf.enabled, crf_params=cfg.crf, save_seed=cfg.infer.save_seed,
        overlays=cfg.infer.overlays, pseudo_source=pseudo_source, pseudo_value=pseudo_value,
    )


def _image_labels(root: str, names: list[str], names_file: Path,
                  sbd_root: str | None) -> dict[str, np.ndarray]:
    """From the `cls_labels.npy` that `cse-ray data lists` wrote beside the list when it covers every
    name (10,582 XML files are then not parsed), else from the annotations or masks."""
    from cse_ray.data.voc import LABELS_FILE, load_labels, read_image_labels

    beside = Path(names_file).parent / LABELS_FILE
    if beside.is_file():
        cached = load_labels(beside)
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
    return read_image_labels(root, names, sbd_root=sbd_root)


def _expected(plan: _Plan, index: int, name: str) -> list[str]:
    """Every output (but the pseudo-label) the image needs to count as complete."""
    paths = [cam_rel(name)]
    if plan.save_seed:
        paths.append(cam_seed_rel(name))
    for alpha in plan.alphas:
        paths.append(crf_rel(alpha, name))
        if plan.save_seed:
            paths.append(crf_seed_rel(alpha, name))
    if index < plan.overlays:
        paths.append(overlay_rel(name))
    return paths


# ------------------------------------------------------------------------------------- CAM actor
def _class_names(classes: np.ndarray) -> list[str]:
    from cse_ray.data.voc import CLASS_NAMES

    return [CLASS_NAMES[int(k)] for k in classes]


class CamWorker:
    """One model replica; processes images one at a time and writes their CAM outputs itself."""

    def __init__(self, backbone: str, state_ref: list, scales: Sequence[float], bf16: bool, use_gpu: bool,
                 cpus: float, out: str, root: str, save_seed: bool, index: int,
                 kill_after: int | None = None) -> None:
        import ray
        import torch

        from cse_ray.models import build_classifier
        from cse_ray.runtime import local_device, node_id

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = local_device() if use_gpu else torch.device("cpu")
        self.model = build_classifier(backbone)
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.eval().to(self.device)
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.scales = tuple(scales)
        self.out, self.root, self.save_seed, self.index = out, root, save_seed, index
        self.node = node_id()
        self.kill_after = kill_after
        self.processed = 0

    def process(self, name: str, label: np.ndarray, overlay: bool, threshold: float | None,
                want_payload: bool) -> tuple[dict, Any]:
        """(manifest row, payload for the CRF task or None). Bad input files give an error row."""
        from cse_ray.cam import cams_to_label, cams_to_seed_dict, multiscale_cam
        from cse_ray.data.voc import image_path
        from cse_ray.formats import read_image, save_cam_npz, write_label_png, write_rgb_png, write_seed_dict

        row: dict = {"name": name, "cam_node": self.node, "cam_actor": self.index, "cam_pid": os.getpid()}
        start = time.perf_counter()
        try:
            image = read_image(image_path(self.root, name))
        except UserError as err:
            row.update(status="error", error=str(err), load_s=time.perf_counter() - start)
            return row, None
        loaded = time.perf_counter()
        cams, classes = multiscale_cam(self.model, image, label, self.scales, self.device, self.amp_dtype)
        stored = cams.astype(np.float16)
        rounded = stored.astype(np.float32)
        computed = time.perf_counter()

        out = self.out
        save_cam_npz(artifacts.join(out, cam_rel(name)), stored, classes)
        row["cam"] = cam_rel(name)
        if self.save_seed:
            seed = cams_to_seed_dict(cams, classes)
            write_seed_dict(artifacts.join(out, cam_seed_rel(name)), seed)
            row["cam_seed"] = cam_seed_rel(name)
        if overlay:
            write_rgb_png(artifacts.join(out, overlay_rel(name)), cam_overlay(image, rounded))
            row["overlay"] = overlay_rel(name)
        if threshold is not None:
            label_map = cams_to_label(rounded, classes, threshold, image.shape[:2])
            write_label_png(artifacts.join(out, pseudo_rel(name)), label_map)
            row.update(pseudo_label=pseudo_rel(name), pseudo_source="cam", pseudo_value=threshold)
        written = time.perf_counter()
        row.update(
            status="ok", error=None, classes=_class_names(classes),
            height=image.shape[0], width=image.shape[1],
            load_s=loaded - start, cam_s=computed - loaded, write_s=written - computed,
        )
        self.processed += 1
        self._test_fault_hook()
        payload = (image, rounded, classes) if want_payload else None
        return row, payload

    def _test_fault_hook(self) -> None:
        """Test only (see TEST_KILL_ENV): die once per run directory after `kill_after` images."""
        if not self.kill_after or self.processed < self.kill_after or artifacts.is_uri(self.out):
            return
        try:
            os.close(os.open(Path(self.out) / TEST_KILL_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def _crf_on_payload(payload: tuple | None, name: str, out: str, alphas: Sequence[float], params: CrfConfig,
                    pseudo_alpha: float | None, save_seed: bool) -> CrfResult | None:
    """The CRF Ray task's body: nothing to do for an image whose CAM step reported an error."""
    if payload is None:
        return None
    image, cams, classes = payload
    return crf_alphas_task(image, cams, classes, name, out, alphas, params, pseudo_alpha, save_seed)


def _scheduling_options(kind: str, cfg: Config, use_gpu: bool) -> dict:
    """The one place that says what CAM actors and CRF / pseudo-label tasks ask Ray for."""
    if kind == "cam":
        options = {"num_cpus": cfg.infer.cpus_per_actor, "max_restarts": cfg.infer.max_restarts,
                   "max_task_retries": -1}  # in-flight images are retried on the restarted actor
        if use_gpu:
            options["num_gpus"] = cfg.infer.gpus_per_actor
        if cfg.infer.cam_resources:
            options["resources"] = dict(cfg.infer.cam_resources)
        return options
    extra = {"resources": dict(cfg.crf.resources)} if cfg.crf.resources else {}
    if kind == "crf":
        return {"num_cpus": cfg.crf.cpus_per_task, "max_retries": 3, **extra}
    if kind == "pseudo":
        return {"num_cpus": 1, "max_retries": 3, **extra}
    raise ValueError(f"unknown kind {kind}")


def _check_resources(cfg: Config, use_gpu: bool) -> None:
    """Refuse a local cluster too small for the actors plus one CRF task (the CRF would wait forever)."""
    import ray

    total = ray.cluster_resources()
    need = cfg.infer.num_actors * cfg.infer.cpus_per_actor + (cfg.crf.cpus_per_task if cfg.crf.enabled else 0)
    gpus = cfg.infer.num_actors * cfg.infer.gpus_per_actor if use_gpu else 0.0
    messages = []
    if need > total.get("CPU", 0) + 1e-9 or gpus > total.get("GPU", 0) + 1e-9:
        messages.append(
            f"config keys infer.num_actors x infer.cpus_per_actor + crf.cpus_per_task = {need:g} CPUs"
            + (f" and {gpus:g} GPUs" if gpus else "")
            + f", but the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
            + " (lower them, or the CRF tasks would never get a CPU)"
        )
    custom = [("infer.cam_resources", cfg.infer.cam_resources)]
    if cfg.crf.enabled:
        custom.append(("crf.resources", cfg.crf.resources))
    for key, wanted in custom:
        for name, amount in wanted.items():
            if amount > total.get(name, 0) + 1e-9:
                messages.append(f"config key {key}.{name}: no node of the Ray cluster offers the resource "
                                f"'{name}' (ray start --resources, or cluster.yaml's node types)")
    if not messages:
        return
    if os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow
        log.warning("%s; waiting for the cluster to grow", "; ".join(messages))
        return
    raise UserError(messages[0])


# ------------------------------------------------------------------------------------- the driver
@dataclass
class _Job:
    index: int
    name: str
    actor: int
    cam_ref: Any
    crf_ref: Any


def _short_error(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:500] if lines else ''}"


def run_infer(cfg: Config, out: str, checkpoint: str | None = None, list_name: str | None = None,
              write_pseudo: bool = True, *, manifest_every: int = 50, progress: bool = True) -> InferSummary:
    """CAMs, CRF label maps and pseudo-labels for every image of the list, resuming what exists.

    checkpoint: the CAM network's weights (default `infer.checkpoint`); list_name: a list name or path
    (default `data.infer_list`); write_pseudo=False leaves pseudo-labels to `write_pseudo_labels`
    (the pipeline calls it with the alpha or threshold chosen by evaluation).
    """
    cfg, out = with_absolute_paths(cfg), artifacts.absolute(out)  # actors run in other directories
    import ray
    from tqdm import tqdm

    from cse_ray.runtime import ensure_ray, resolve_use_gpu

    started = time.perf_counter()
    out = str(out)
    plan = _prepare(cfg, out, checkpoint, list_name, write_pseudo)
    ensure_ray()
    use_gpu = cfg.infer.gpus_per_actor > 0 and resolve_use_gpu(cfg.infer.use_gpu)
    _check_resources(cfg, use_gpu)
    artifacts.write_json(artifacts.join(out, SETTINGS_FILE), plan.settings)

    listing = _Listing(out)
    manifest = Manifest(out, plan.names)
    current_pseudo = (plan.pseudo_source, plan.pseudo_value)
    if plan.pseudo_source:  # rows must never claim settings other than the ones about to be written
        stale = [row for n in plan.names if (row := manifest.rows.get(n)) and row.get("pseudo_source")
                 and (row.get("pseudo_source"), row.get("pseudo_value")) != current_pseudo]
        for row in stale:
            row.update(dict.fromkeys(PSEUDO_FIELDS))
        if stale:
            manifest.write()

    todo, skipped = [], []
    for index, name in enumerate(plan.names):
        complete = all(listing.exists(rel) for rel in _expected(plan, index, name))
        (skipped if complete else todo).append(index)
    for index in skipped:
        manifest.put(_skipped_row(plan, index, manifest.rows.get(plan.names[index])))

    # Wrapped in a list so that Ray hands the actor the reference, not the value: a restarted actor
    # fetches the weights again, and the driver holds `state_ref` until the run ends.
    state_ref = ray.put(plan.state) if todo else None
    plan.state = {}
    kill_after = int(os.environ[TEST_KILL_ENV]) if os.environ.get(TEST_KILL_ENV) else None
    worker = ray.remote(CamWorker)
    actors = [
        worker.options(**_scheduling_options("cam", cfg, use_gpu)).remote(
            plan.backbone, [state_ref], plan.scales, cfg.infer.bf16, use_gpu, cfg.infer.cpus_per_actor, out,
            plan.root, plan.save_seed, index, kill_after,
        )
        for index in range(cfg.infer.num_actors) if todo
    ]
    crf_task = ray.remote(_crf_on_payload).options(**_scheduling_options("crf", cfg, use_gpu))
    crf_pseudo = plan.pseudo_value if plan.pseudo_source == "crf" else None
    cam_threshold = plan.pseudo_value if plan.pseudo_source == "cam" else None

    alive = [True] * len(actors)
    busy = [0] * len(actors)
    pending: dict[Any, _Job] = {}
    queue = iter(todo)
    exhausted = not todo
    done_rows: list[dict] = []
    errors: dict[str, str] = {}
    since_write = 0
    bar = tqdm(total=len(plan.names), initial=len(skipped), unit="img", desc="infer", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    try:
        while True:
            while not exhausted and len(pending) < cfg.infer.max_in_flight and any(alive):
                index = next(queue, None)
                if index is None:
                    exhausted = True
                    break
                name = plan.names[index]
                actor = min((k for k in range(len(actors)) if alive[k]), key=lambda k: busy[k])
                cam_ref, payload_ref = actors[actor].process.options(num_returns=2).remote(
                    name, plan.labels[name], index < plan.overlays, cam_threshold, plan.crf_enabled
                )
                crf_ref = None
                if plan.crf_enabled:
                    crf_ref = crf_task.remote(payload_ref, name, out, plan.alphas, plan.crf_params,
                                              crf_pseudo, plan.save_seed)
                del payload_ref  # only the CRF task holds it: freed as soon as the CRF is done
                busy[actor] += 1
                pending[cam_ref if crf_ref is None else crf_ref] = _Job(index, name, actor, cam_ref, crf_ref)
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                busy[job.actor] -= 1
                row, actor_dead = _collect(job, manifest.rows.get(job.name), plan)
                if actor_dead:
                    alive[job.actor] = False
                manifest.put(row)
                if row["status"] == "ok":
                    done_rows.append(row)
                else:
                    errors[job.name] = row["error"]
                bar.update(1)
                since_write += 1
                if since_write >= manifest_every:
                    manifest.write()
                    since_write = 0
        if not exhausted:
            left = len(todo) - len(done_rows) - len(errors)
            raise RuntimeError(f"every CAM actor died; {left} images were not processed (rerun to resume)")
    finally:
        bar.close()
        manifest.write()
        for actor in actors:
            ray.kill(actor)

    pseudo_written = sum(1 for row in done_rows if row.get("pseudo_label"))
    if plan.pseudo_source:
        redo = [plan.names[i] for i in skipped
                if _pseudo_stale(manifest.rows[plan.names[i]], current_pseudo, listing)]
        if redo:
            result = write_pseudo_labels(out, redo, plan.pseudo_source, plan.pseudo_value, cfg, use_ray=True)
            pseudo_written += result.written
    summary = InferSummary(
        out=out, images=len(plan.names), done=len(done_rows), skipped=len(skipped), failed=len(errors),
        pseudo_written=pseudo_written, mean_seconds=_mean_seconds(done_rows),
        wall_seconds=time.perf_counter() - started, pseudo_source=plan.pseudo_source,
        pseudo_value=plan.pseudo_value, errors=errors,
    )
    print(summary.line())
    return summary


def _collect(job: _Job, previous: dict | None, plan: _Plan) -> tuple[dict, bool]:
    """The manifest row of a finished image, and whether its actor is gone for good."""
    import ray
    from ray.exceptions import ActorDiedError, RayError

    keep = {k: previous.get(k) for k in PSEUDO_FIELDS} if previous and not plan.pseudo_source else {}
    base = {"name": job.name, "classes": _class_names(np.flatnonzero(plan.labels[job.name] > 1e-5)), **keep}
    try:
        row = ray.get(job.cam_ref)
    except RayError as err:
        error = f"CAM actor {job.actor}: {_short_error(err)}"
        return {**base, "status": "error", "error": error}, isinstance(err, ActorDiedError)
    row = {**base, **row}
    if row["status"] != "ok" or job.crf_ref is None:
        return row, False
    try:
        result: CrfResult = ray.get(job.crf_ref)
    except RayError as err:
        row.update(status="error", error=f"CRF: {_short_error(err)}")
        return row, False
    row.update(crf=result.crf, crf_seed=result.crf_seed or None, crf_s=result.crf_s, crf_node=result.node,
               write_s=row["write_s"] + result.write_s)
    if result.pseudo_label:
        row.update(pseudo_label=result.pseudo_label, pseudo_source="crf", pseudo_value=plan.pseudo_value)
    return row, False


def _skipped_row(plan: _Plan, index: int, previous: dict | None) -> dict:
    """A complete image keeps its earlier row (its timings and nodes), with the current output paths."""
    name = plan.names[index]
    row = dict(previous or {})
    row.update(
        name=name, status="ok", error=None, cam=cam_rel(name),
        cam_seed=cam_seed_rel(name) if plan.save_seed else row.get("cam_seed"),
        crf=[crf_rel(a, name) for a in plan.alphas] or row.get("crf"),
        crf_seed=[crf_seed_rel(a, name) for a in plan.alphas] if plan.save_seed and plan.alphas
        else row.get("crf_seed"),
        overlay=overlay_rel(name) if index < plan.overlays else row.get("overlay"),
    )
    row.setdefault("classes", _class_names(np.flatnonzero(plan.labels[name] > 1e-5)))
    return row


def _pseudo_stale(row: dict, current: tuple, listing: _Listing) -> bool:
    claimed = (row.get("pseudo_source"), row.get("pseudo_value"))
    return claimed != current or not listing.exists(pseudo_rel(row["name"]))


def _mean_seconds(rows: list[dict]) -> dict[str, float]:
    means = {}
    for stage in STAGES:
        values = [row[f"{stage}_s"] for row in rows if row.get(f"{stage}_s") is not None]
        if values:
            means[stage] = float(np.mean(values))
    return means


# ---------------------------------------------------------------------------------- pseudo-labels
def load_cams(out: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 K x H x W, int64 K) from `OUT/cams/NAME.npz` (stored as float16)."""
    from cse_ray.formats import load_cam_npz

    return load_cam_npz(artifacts.join(out, cam_rel(name)))


def _pseudo_chunk(out: str, names: Sequence[str], source: str, value: float) -> list[str]:
    """Write the pseudo-labels of some images from the stored outputs; returns the names with no source."""
    from cse_ray.cam import cams_to_label
    from cse_ray.formats import write_label_png

    missing = []
    for name in names:
        target = artifacts.join(out, pseudo_rel(name))
        if source == "crf":
            src = artifacts.join(out, crf_rel(value, name))
            if not artifacts.exists(src):
                missing.append(name)
                continue
            artifacts.write_bytes(target, artifacts.read_bytes(src))  # byte-identical to the CRF map
        else:
            if not artifacts.exists(artifacts.join(out, cam_rel(name))):
                missing.append(name)
                continue
            cams, classes = load_cams(out, name)
            write_label_png(target, cams_to_label(cams, classes, value, cams.shape[1:]))
    return missing


def write_pseudo_labels(out: str, names: Sequence[str], source: str, value: float, cfg: Config,
                        *, use_ray: bool | None = None) -> PseudoLabelSummary:
    """(Re)write `pseudo_labels/NAME.png` from existing outputs: a copy of `crf/a{value}/NAME.png`
    (source "crf") or the stored CAMs at background threshold `value` (source "cam").

    Cheap, so the pipeline can call it after evaluation has picked the best alpha or threshold. The
    manifest's pseudo columns are cleared first and set after the files are written, so a crash in
    between never leaves a row claiming settings its file does not have. Runs as Ray tasks when
    `use_ray` (default: when Ray is already initialised), else in this process.
    """
    out = str(out)
    if source == "crf":
        if float(value) not in {float(a) for a in cfg.crf.alphas}:
            raise UserError(f"pseudo-label alpha {value:g} is not one of crf.alphas "
                            f"({', '.join(f'{a:g}' for a in cfg.crf.alphas)})")
    elif source == "cam":
        if not 0.0 <= value <= 1.0:
            raise UserError(f"pseudo-label background threshold {value:g} is outside [0, 1]")
    else:
        raise UserError(f"pseudo-label source {source!r}: expected 'crf' or 'cam'")
    value = float(value)
    names = list(dict.fromkeys(names))
    manifest = Manifest(out)
    touched = [manifest.rows[n] for n in names if n in manifest.rows]
    if any(row.get("pseudo_source") is not None for row in touched):
        for row in touched:
            row.update(dict.fromkeys(PSEUDO_FIELDS))
        manifest.write()

    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    chunks = [names[i:i + PSEUDO_CHUNK] for i in range(0, len(names), PSEUDO_CHUNK)]
    if use_ray and len(chunks) > 1:
        import ray

        task = ray.remote(_pseudo_chunk).options(**_scheduling_options("pseudo", cfg, False))
        missing = [n for part in ray.get([task.remote(out, c, source, value) for c in chunks]) for n in part]
    else:
        missing = [n for chunk in chunks for n in _pseudo_chunk(out, chunk, source, value)]

    absent = set(missing)
    for row in touched:
        if row["name"] not in absent:
            row.update(pseudo_label=pseudo_rel(row["name"]), pseudo_source=source, pseudo_value=value)
    if touched:
        manifest.write()
    if missing:
        log.warning("pseudo-labels: %d images have no %s output (first: %s)",
                    len(missing), source, missing[0])
    return PseudoLabelSummary(written=len(names) - len(missing), missing=missing)
