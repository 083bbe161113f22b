"""`run_infer`: the driver loop that feeds CAM actors and CRF tasks and records every image once.

Per image the driver sends (name, image-level label) to the least busy live CAM actor and, at the
same moment, submits the image's CRF task with the actor's payload ObjectRef as its argument, so Ray
starts the CRF as soon as the CAM is ready, on any free CPU, while the actors go on with the next
images. At most `infer.max_in_flight` images are in flight, so memory stays flat whatever the list
length. The driver never reads an image.

Exactly once and resumable: an image whose expected files all exist is skipped on a rerun; a crash
loses at most the images in flight. The manifest is rewritten every `manifest_every` completions and
at the end. A dead actor is restarted by Ray (`max_restarts`) and its in-flight images are retried
there (`max_task_retries=-1`); a retried image rewrites identical bytes and still gets one manifest
row. A corrupt image becomes a row with status "error".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config, save_run_config, with_absolute_paths
from cse_ray.crf import CrfResult
from cse_ray.errors import short_error
from cse_ray.infer.manifest import PSEUDO_FIELDS, Listing, Manifest
from cse_ray.infer.plan import Plan, prepare
from cse_ray.infer.pool import actors_lost
from cse_ray.infer.pseudo import write_pseudo_labels
from cse_ray.infer.workers import TEST_KILL_ENV, CamWorker, check_cluster, crf_on_payload, scheduling_options
from cse_ray.layout import RunLayout

STAGES = ("load", "cam", "crf", "write")


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
class _Job:
    index: int
    name: str
    actor: int
    cam_ref: Any
    crf_ref: Any


def run_infer(cfg: Config, out: str, checkpoint: str | None = None, list_name: str | None = None,
              write_pseudo: bool = True, *, manifest_every: int = 50, progress: bool = True) -> InferSummary:
    """CAMs, CRF label maps and pseudo-labels for every image of the list, resuming what exists.

    checkpoint: the CAM network's weights (default `infer.checkpoint`); list_name: a list name or path
    (default `data.infer_list`); write_pseudo=False leaves pseudo-labels to `write_pseudo_labels`
    (the pipeline calls it with the alpha or threshold chosen by evaluation).
    """
    cfg = with_absolute_paths(cfg)
    layout = RunLayout.at(out).infer  # absolute: actors run in other directories
    import ray
    from tqdm import tqdm

    from cse_ray.runtime import ensure_ray, resolve_use_gpu

    started = time.perf_counter()
    plan = prepare(cfg, layout, checkpoint, list_name, write_pseudo)
    save_run_config(cfg, layout.root)
    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.infer.use_gpu, "infer.use_gpu") and cfg.infer.gpus_per_actor > 0
    check_cluster(cfg, use_gpu)
    artifacts.write_json(layout.settings, plan.settings)

    listing = Listing(layout)
    manifest = Manifest(layout, plan.names)
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
        complete = all(listing.exists(rel) for rel in plan.expected(index, name))
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
        worker.options(**scheduling_options("cam", cfg, use_gpu)).remote(
            plan.backbone, plan.label_space, [state_ref], plan.scales, cfg.infer.bf16, use_gpu,
            cfg.infer.cpus_per_actor, layout, plan.root, plan.save_seed, index, kill_after,
            cfg.infer.channels_last,
        )
        for index in range(cfg.infer.num_actors) if todo
    ]
    crf_task = ray.remote(crf_on_payload).options(**scheduling_options("crf", cfg, use_gpu))
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
                    crf_ref = crf_task.remote(payload_ref, name, layout, plan.alphas, plan.crf_params,
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
            raise actors_lost("CAM", left)
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
            result = write_pseudo_labels(layout.root, redo, plan.pseudo_source, plan.pseudo_value, cfg,
                                         use_ray=True)
            pseudo_written += result.written
    summary = InferSummary(
        out=layout.root, images=len(plan.names), done=len(done_rows), skipped=len(skipped),
        failed=len(errors), pseudo_written=pseudo_written, mean_seconds=_mean_seconds(done_rows),
        wall_seconds=time.perf_counter() - started, pseudo_source=plan.pseudo_source,
        pseudo_value=plan.pseudo_value, errors=errors,
    )
    print(summary.line())
    return summary


def _collect(job: _Job, previous: dict | None, plan: Plan) -> tuple[dict, bool]:
    """The manifest row of a finished image, and whether its actor is gone for good."""
    import ray
    from ray.exceptions import ActorDiedError, RayError

    keep = {k: previous.get(k) for k in PSEUDO_FIELDS} if previous and not plan.pseudo_source else {}
    base = {"name": job.name, "classes": plan.class_names(job.name), **keep}
    try:
        row = ray.get(job.cam_ref)
    except RayError as err:
        error = f"CAM actor {job.actor}: {short_error(err)}"
        return {**base, "status": "error", "error": error}, isinstance(err, ActorDiedError)
    row = {**base, **row}
    if row["status"] != "ok" or job.crf_ref is None:
        return row, False
    try:
        result: CrfResult = ray.get(job.crf_ref)
    except RayError as err:
        row.update(status="error", error=f"CRF: {short_error(err)}")
        return row, False
    row.update(crf=result.crf, crf_seed=result.crf_seed or None, crf_s=result.crf_s, crf_node=result.node,
               write_s=row["write_s"] + result.write_s)
    if result.pseudo_label:
        row.update(pseudo_label=result.pseudo_label, pseudo_source="crf", pseudo_value=plan.pseudo_value)
    return row, False


def _skipped_row(plan: Plan, index: int, previous: dict | None) -> dict:
    """A complete image keeps its earlier row (its timings and nodes), with the current output paths."""
    name, layout = plan.names[index], plan.layout
    row = dict(previous or {})
    row.update(
        name=name, status="ok", error=None, cam=layout.cam_rel(name),
        cam_seed=layout.cam_seed_rel(name) if plan.save_seed else row.get("cam_seed"),
        crf=[layout.crf_rel(a, name) for a in plan.alphas] or row.get("crf"),
        crf_seed=[layout.crf_seed_rel(a, name) for a in plan.alphas] if plan.save_seed and plan.alphas
        else row.get("crf_seed"),
        overlay=layout.overlay_rel(name) if index < plan.overlays else row.get("overlay"),
    )
    if "classes" not in row:
        row["classes"] = plan.class_names(name)
    return row


def _pseudo_stale(row: dict, current: tuple, listing: Listing) -> bool:
    claimed = (row.get("pseudo_source"), row.get("pseudo_value"))
    return claimed != current or not listing.exists(listing.layout.pseudo_rel(row["name"]))


def _mean_seconds(rows: list[dict]) -> dict[str, float]:
    means = {}
    for stage in STAGES:
        values = [row[f"{stage}_s"] for row in rows if row.get(f"{stage}_s") is not None]
        if values:
            means[stage] = float(np.mean(values))
    return means
