"""What runs on Ray workers during inference, and what each kind of worker asks Ray for.

A `CamWorker` actor holds one model replica: it reads an image, computes the multi-scale CAMs (an
image and its flip in one forward), writes the CAM outputs itself and returns a small manifest row
plus a payload (image and CAMs) that stays in the object store for the image's CRF task. The CRF
task (`crf_on_payload`) runs on any free CPU and writes the CRF maps itself.

The CAMs are rounded to float16 once, in the actor; the npz holds exactly these values and the CRF,
the CAM pseudo-labels and the overlays are computed from them, so every stored output can be
recomputed bit for bit from `cams/NAME.npz` and the image. The reference-format seed dicts
(`infer.save_seed`) keep the full float32 maps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cse_ray import artifacts
from cse_ray.config import Config, CrfConfig
from cse_ray.crf import CrfResult, crf_alphas_task
from cse_ray.errors import UserError
from cse_ray.labels import LabelSpace
from cse_ray.layout import InferLayout
from cse_ray.plots import cam_overlay

# Test-only fault hook: with this env var set to N in the driver's environment, a CAM actor calls
# os._exit(1) right after writing the outputs of its N-th image (before returning its result), once
# per run directory (a marker file in the inference folder stops the restarted actor from dying
# again). Used by tests/test_infer.py to check that a dead actor's images are retried and written
# exactly once.
TEST_KILL_ENV = "CSE_RAY_TEST_KILL_ACTOR_AFTER"
TEST_KILL_MARKER = ".test_kill_actor.marker"


class CamWorker:
    """One model replica; processes images one at a time and writes their CAM outputs itself."""

    def __init__(self, backbone: str, labels: LabelSpace, state_ref: list, scales: Sequence[float],
                 bf16: bool, use_gpu: bool, cpus: float, layout: InferLayout, root: str, save_seed: bool,
                 index: int, kill_after: int | None = None, channels_last: bool = False) -> None:
        import ray
        import torch

        from cse_ray.models import build_classifier
        from cse_ray.runtime import local_device, node_id

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = local_device() if use_gpu else torch.device("cpu")
        self.model = build_classifier(backbone, num_classes=labels.num_classes)
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.eval().to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.labels = labels
        self.scales = tuple(scales)
        self.layout, self.root, self.save_seed, self.index = layout, root, save_seed, index
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
        cams, classes = multiscale_cam(self.model, image, label, self.scales, self.device, self.amp_dtype,
                                       self.channels_last)
        stored = cams.astype(np.float16)
        rounded = stored.astype(np.float32)
        computed = time.perf_counter()

        layout = self.layout
        save_cam_npz(layout.cam(name), stored, classes, self.labels)
        row["cam"] = layout.cam_rel(name)
        if self.save_seed:
            seed = cams_to_seed_dict(cams, classes)
            write_seed_dict(layout.path(layout.cam_seed_rel(name)), seed)
            row["cam_seed"] = layout.cam_seed_rel(name)
        if overlay:
            write_rgb_png(layout.path(layout.overlay_rel(name)), cam_overlay(image, rounded))
            row["overlay"] = layout.overlay_rel(name)
        if threshold is not None:
            label_map = cams_to_label(rounded, classes, threshold, image.shape[:2])
            write_label_png(layout.pseudo(name), label_map)
            row.update(pseudo_label=layout.pseudo_rel(name), pseudo_source="cam", pseudo_value=threshold)
        written = time.perf_counter()
        row.update(
            status="ok", error=None, classes=[self.labels.class_names[int(k)] for k in classes],
            height=image.shape[0], width=image.shape[1],
            load_s=loaded - start, cam_s=computed - loaded, write_s=written - computed,
        )
        self.processed += 1
        self._test_fault_hook()
        payload = (image, rounded, classes) if want_payload else None
        return row, payload

    def _test_fault_hook(self) -> None:
        """Test only (see TEST_KILL_ENV): die once per run directory after `kill_after` images."""
        root = self.layout.root
        if not self.kill_after or self.processed < self.kill_after or artifacts.is_uri(root):
            return
        try:
            os.close(os.open(Path(self.layout.path(TEST_KILL_MARKER)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def crf_on_payload(payload: tuple | None, name: str, layout: InferLayout, alphas: Sequence[float],
                   params: CrfConfig, pseudo_alpha: float | None, save_seed: bool) -> CrfResult | None:
    """The CRF Ray task's body: nothing to do for an image whose CAM step reported an error."""
    if payload is None:
        return None
    image, cams, classes = payload
    return crf_alphas_task(image, cams, classes, name, layout, alphas, params, pseudo_alpha, save_seed)


def scheduling_options(kind: str, cfg: Config, use_gpu: bool) -> dict:
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


def check_cluster(cfg: Config, use_gpu: bool) -> None:
    """Refuse a fixed cluster too small for the actors plus one CRF task (the CRF would wait forever), or
    without the custom resources the workers ask for."""
    from cse_ray.runtime import check_resources

    cpus = cfg.infer.num_actors * cfg.infer.cpus_per_actor + (cfg.crf.cpus_per_task if cfg.crf.enabled else 0)
    gpus = cfg.infer.num_actors * cfg.infer.gpus_per_actor if use_gpu else 0.0

    def too_small(total) -> str:
        return (f"config keys infer.num_actors x infer.cpus_per_actor + crf.cpus_per_task = {cpus:g} CPUs"
                + (f" and {gpus:g} GPUs" if gpus else "")
                + f", but the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
                + " (lower them, or the CRF tasks would never get a CPU)")

    requests = [({"CPU": cpus, "GPU": gpus}, too_small)]
    custom = [("infer.cam_resources", cfg.infer.cam_resources)]
    if cfg.crf.enabled:
        custom.append(("crf.resources", cfg.crf.resources))
    for key, wanted in custom:
        for name, amount in wanted.items():
            message = (f"config key {key}.{name}: no node of the Ray cluster offers the resource '{name}' "
                       "(ray start --resources, or cluster.yaml's node types)")
            requests.append(({name: amount}, lambda _total, message=message: message))
    check_resources(requests)
