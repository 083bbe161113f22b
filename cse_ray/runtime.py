"""Connecting to Ray and choosing devices, shared by every distributed stage.

Under `ray job submit` (RAY_ADDRESS set) the stage joins that cluster; on a laptop it starts a local
one. Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one, unless already connected."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (started when ray[default] is installed) serves the State API that Ray Train's
        # placement-group cleaner polls; without it that actor prints a warning every few seconds.
        ray.init(num_cpus=num_cpus, include_dashboard=None, log_to_driver=True)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(setting: str) -> bool:
    """`auto` uses GPUs when the cluster has any; `true` insists (and fails clearly without)."""
    if setting == "false":
        return False
    has = cluster_has_gpus()
    if setting == "true" and not has:
        from cse_ray.errors import UserError

        raise UserError("config key use_gpu: true, but the Ray cluster has no GPU resources")
    return has


def local_device() -> torch.device:
    """The device of the current process: its first visible GPU, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (plain loops, benchmarks)
        return "local"
