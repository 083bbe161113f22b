"""Connecting to Ray and choosing devices, shared by every distributed stage.

Under `ray job submit` (RAY_ADDRESS set) the stage joins that cluster; on a laptop it starts a local
one. Nothing here runs at import time, and torch and Ray are imported only where needed, so that light
workers (the CRF tasks) can ask for their node id without loading either.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def node_id() -> str:
    """The Ray node this process runs on; "local" outside Ray (plain loops, benchmarks).

    Ray is not imported to answer: a process that has not imported it is not connected to a cluster.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_node_id()


def check_resources(
    requests: Iterable[tuple[Mapping[str, float], Callable[[Mapping[str, float]], str]]],
) -> None:
    """Refuse work that the Ray cluster can never schedule: it would wait forever, silently.

    requests: (the resources that must fit at once, e.g. {"CPU": 3.0, "GPU": 1.0}; a function of the
    cluster's totals giving the message, which names the config keys), checked in order. On a fixed
    cluster the first request that does not fit raises a UserError. Under RAY_ADDRESS the cluster may
    autoscale, so the messages are only logged.
    """
    import ray

    total = ray.cluster_resources()
    messages = [message(total) for needs, message in requests
                if any(amount > total.get(name, 0.0) + 1e-9 for name, amount in needs.items())]
    if not messages:
        return
    if os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow
        log.warning("%s; waiting for the cluster to grow", "; ".join(messages))
        return
    from cse_ray.errors import UserError

    raise UserError(messages[0])
