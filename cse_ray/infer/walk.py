"""`cse-ray rw`: psa's random walk on a pool of Ray actors, from the CAMs an inference run stored.

Each `RwWorker` actor holds one AffinityNet replica (on a GPU when the cluster has them): per image it
reads the image and its stored CAMs (`cams/NAME.npz`), pads the image to a multiple of 8, computes the
pair affinities and the sparse walk (`cse_ray.rw.random_walk`) and writes `rw/NAME.png` itself,
atomically, in the inference folder the CAMs came from. The driver records one row per image in
`rw_manifest.parquet`, exactly as `run_infer` does: a rerun skips the images whose PNG exists, a
killed actor is restarted by Ray and its in-flight images are retried there, a corrupt image becomes
an error row and the rest goes on.

Checked before Ray starts (exit code 2): the AffinityNet checkpoint (present, of the configured
backbone's shape), the list, a CAM file for every listed image, and that a resumed folder was made
with the same checkpoint and walk settings (`rw_settings.json`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cse_ray import artifacts
from cse_ray.config import Config, with_absolute_paths
from cse_ray.errors import UserError, short_error
from cse_ray.infer.manifest import LabelMapSummary, Listing, Manifest
from cse_ray.infer.plan import check_settings
from cse_ray.infer.pool import actors_lost, run_on_actors
from cse_ray.infer.workers import TEST_KILL_ENV
from cse_ray.layout import InferLayout, RunLayout

# Test-only (see cse_ray.infer.workers.TEST_KILL_ENV): the RW actor dies once per folder after N images.
TEST_KILL_RW_MARKER = ".test_kill_rw_actor.marker"


def rw_manifest_schema():
    import pyarrow as pa

    text, number = pa.string(), pa.float64()
    return pa.schema([
        ("name", text), ("status", text), ("error", text), ("rw", text), ("classes", pa.list_(pa.int32())),
        ("height", pa.int32()), ("width", pa.int32()), ("load_s", number), ("walk_s", number),
        ("write_s", number), ("node", text), ("actor", pa.int32()), ("pid", pa.int64()),
    ])


class RwWorker:
    """One AffinityNet replica; refines one image at a time and writes its label map itself."""

    def __init__(self, backbone: str, state_ref: list, use_gpu: bool, cpus: float, layout: InferLayout,
                 root: str, walk: tuple[float, int, float, float], index: int,
                 kill_after: int | None) -> None:
        import ray
        import torch

        from cse_ray.models import build_affinity_net
        from cse_ray.runtime import local_device, node_id

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = local_device() if use_gpu else torch.device("cpu")
        self.model = build_affinity_net(backbone)
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.eval().to(self.device)
        self.layout, self.root, self.walk, self.index = layout, root, walk, index
        self.node, self.kill_after, self.processed = node_id(), kill_after, 0

    def process(self, name: str) -> dict:
        """The manifest row of one image; a corrupt image or CAM file gives an error row."""
        import torch

        from cse_ray.data.transforms import normalize, to_chw
        from cse_ray.data.voc import image_path
        from cse_ray.formats import load_cam_npz, read_image, write_label_png
        from cse_ray.models import pair_affinities
        from cse_ray.rw import label_at_size, pad_to_stride, random_walk, rescale_for_walk

        row: dict = {"name": name, "node": self.node, "actor": self.index, "pid": os.getpid()}
        start = time.perf_counter()
        try:
            image = read_image(image_path(self.root, name))
            cams, classes = load_cam_npz(self.layout.cam(name))
        except UserError as err:
            row.update(status="error", error=str(err), load_s=time.perf_counter() - start)
            return row
        if cams.shape[1:] != image.shape[:2]:  # CAMs of another image or run: the run stops (exit 2)
            row.update(status="error", refused=True, load_s=time.perf_counter() - start,
                       error=f"{self.layout.cam(name)}: CAMs of {cams.shape[2]}x{cams.shape[1]} (WxH) for "
                             f"an image of {image.shape[1]}x{image.shape[0]} (rerun cse-ray infer for it)")
            return row
        loaded = time.perf_counter()
        beta, logt, bg_exponent, scale = self.walk
        batch = torch.from_numpy(to_chw(normalize(image)))[None]
        maps = cams
        if scale != 1.0:
            batch, maps = rescale_for_walk(batch, cams, scale)
        with torch.no_grad():
            affinities = pair_affinities(self.model(pad_to_stride(batch).to(self.device)))
            label = random_walk(maps, classes, affinities, beta=beta, logt=logt, bg_power=bg_exponent).label
        label = label_at_size(label, *image.shape[:2])
        walked = time.perf_counter()
        write_label_png(self.layout.rw(name), label)
        row.update(status="ok", error=None, rw=self.layout.rw_rel(name), classes=[int(k) for k in classes],
                   height=image.shape[0], width=image.shape[1], load_s=loaded - start,
                   walk_s=walked - loaded, write_s=time.perf_counter() - walked)
        self.processed += 1
        if self.kill_after and self.processed >= self.kill_after and not artifacts.is_uri(self.layout.root):
            try:
                marker = Path(self.layout.path(TEST_KILL_RW_MARKER))
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return row
            os._exit(1)
        return row


def affinity_checkpoint(cfg: Config, out: str, checkpoint: str | None = None) -> str:
    """The AffinityNet weights: the argument, `rw.checkpoint`, else train-aff's model under `out`."""
    checkpoint = checkpoint or cfg.rw.checkpoint or RunLayout.at(out).stage("train_aff").model
    if not artifacts.exists(checkpoint):
        raise UserError(f"config key rw.checkpoint: {checkpoint}: file not found (run train-aff with the "
                        "same --out first, or give AffinityNet's checkpoint)")
    return checkpoint


def load_affinity_state(backbone: str, checkpoint: str) -> tuple[dict, str]:
    """(state dict, sha256): the checkpoint loaded into AffinityNet, so a wrong file is refused here."""
    from cse_ray.models import build_affinity_net, load_weights

    model = build_affinity_net(backbone)
    with artifacts.local_copy(checkpoint) as local:
        digest = artifacts.file_sha256(local)
        try:
            load_weights(model, local)
        except Exception as err:  # a classifier's or another backbone's checkpoint
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise UserError(f"config key rw.checkpoint: {checkpoint}: cannot be loaded into AffinityNet "
                            f"on model.backbone={backbone} ({first})") from None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, digest


def run_rw(cfg: Config, out: str, checkpoint: str | None = None, list_name: str | None = None,
           *, progress: bool = True) -> LabelMapSummary:
    """Random-walk label maps for every image of the list (`rw.list`, else `data.infer_list`) from the
    CAMs stored in the inference folder `out`, resuming what exists."""
    from cse_ray.data.prepare import resolve_data_root
    from cse_ray.data.voc import list_path, read_list

    cfg = with_absolute_paths(cfg)
    layout = RunLayout.at(out).infer
    started = time.perf_counter()
    checkpoint = affinity_checkpoint(cfg, layout.root, checkpoint)
    root = resolve_data_root(cfg, layout.root)
    names_file = list_path(root, list_name or cfg.rw.list or cfg.data.infer_list)
    names = list(dict.fromkeys(read_list(names_file)))
    if not names:
        raise UserError(f"config key rw.list: {names_file}: the list is empty")
    listing = Listing(layout)
    for name in names:
        if not listing.exists(layout.cam_rel(name)):
            raise UserError(f"{layout.cam(name)}: no CAM file for image {name} of {names_file} "
                            "(run cse-ray infer on this list with the same --out first)")
    state, digest = load_affinity_state(cfg.model.backbone, checkpoint)
    r = cfg.rw
    settings = {"backbone": cfg.model.backbone, "checkpoint_sha256": digest, "beta": r.beta, "logt": r.logt,
                "bg_exponent": r.bg_exponent, **({"scale": r.scale} if r.scale != 1.0 else {})}
    check_settings(layout, settings, layout.rw_settings)

    import ray
    from tqdm import tqdm

    from cse_ray.runtime import check_resources, ensure_ray, resolve_use_gpu

    ensure_ray()
    use_gpu = r.gpus_per_actor > 0 and resolve_use_gpu(r.use_gpu)
    gpus = r.num_actors * r.gpus_per_actor if use_gpu else 0.0
    cpus = r.num_actors * r.cpus_per_actor
    check_resources([({"CPU": cpus, "GPU": gpus}, lambda total: (
        f"config keys rw.num_actors x rw.cpus_per_actor = {cpus:g} CPUs"
        + (f" and {gpus:g} GPUs" if gpus else "")
        + f", but the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"))])
    artifacts.write_json(layout.rw_settings, settings)

    manifest = Manifest(layout, names, path=layout.rw_manifest, schema=rw_manifest_schema())
    todo = [name for name in names if not listing.exists(layout.rw_rel(name))]
    skipped = len(names) - len(todo)
    for name in names:
        if name not in todo:
            manifest.put({**(manifest.rows.get(name) or {}), "name": name, "status": "ok", "error": None,
                          "rw": layout.rw_rel(name)})
    options = {"num_cpus": r.cpus_per_actor, "max_restarts": r.max_restarts, "max_task_retries": -1,
               **({"num_gpus": r.gpus_per_actor} if use_gpu else {})}
    kill_after = int(os.environ[TEST_KILL_ENV]) if os.environ.get(TEST_KILL_ENV) else None
    state_ref = ray.put(state) if todo else None  # in a list: a restarted actor fetches it again
    actors = [ray.remote(RwWorker).options(**options).remote(
        cfg.model.backbone, [state_ref], use_gpu, r.cpus_per_actor, layout, root,
        (r.beta, r.logt, r.bg_exponent, r.scale), index, kill_after) for index in range(r.num_actors) if todo]
    done, errors, refused = 0, {}, []
    bar = tqdm(total=len(names), initial=skipped, unit="img", desc="rw", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)

    def collect(name: str, actor: int, ref) -> bool:
        nonlocal done
        from ray.exceptions import ActorDiedError, RayError

        dead = False
        try:
            row = ray.get(ref)
        except RayError as err:
            row = {"name": name, "status": "error", "error": f"RW actor {actor}: {short_error(err)}"}
            dead = isinstance(err, ActorDiedError)
        manifest.put(row)
        if row["status"] == "ok":
            done += 1
        else:
            errors[name] = row["error"]
            if row.get("refused"):
                refused.append(row["error"])
        bar.update(1)
        if (done + len(errors)) % 50 == 0:
            manifest.write()
        return dead

    try:
        left = run_on_actors(actors, todo, lambda actor, name: actor.process.remote(name), collect,
                             r.max_in_flight)
        if left:
            raise actors_lost("RW", left)
    finally:
        bar.close()
        manifest.write()
        for actor in actors:
            ray.kill(actor)
    summary = LabelMapSummary("rw", layout.root, layout.rw_dir, len(names), done, skipped, len(errors),
                              time.perf_counter() - started, errors)
    print(summary.line())
    if refused:
        more = f" (and {len(refused) - 1} more images)" if len(refused) > 1 else ""
        raise UserError(refused[0] + more)
    return summary
