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


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may add, or None when no autoscaler said.

    Ray Train 2.60 asks the same private API before it places its workers; it is read here through
    one function, so that a Ray upgrade that moves it costs one line.
    """
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # the API moved, or the GCS has no cluster config
        return None


def resolve_use_gpu(setting: str, key: str = "use_gpu") -> bool:
    """`auto` uses GPUs when the cluster has any; `true` insists (and fails clearly without).

    key: the config key the setting came from, named in the error (e.g. `train_cse.use_gpu`). A
    cluster with no GPU yet passes when its autoscaler may add GPU nodes (the cluster config says so),
    or, under RAY_ADDRESS with an autoscaler that does not say, with a warning; a fixed cluster, the
    local one included, is refused.
    """
    if setting == "false":
        return False
    has = cluster_has_gpus()
    if setting != "true" or has:
        return has
    most = autoscaler_max_resources()
    if most and most.get("GPU", 0) > 0:
        return True
    if most is None and os.environ.get("RAY_ADDRESS"):
        log.warning("config key %s: true, but the Ray cluster has no GPU yet; waiting for the autoscaler "
                    "to add GPU nodes", key)
        return True
    from cse_ray.errors import UserError

    raise UserError(f"config key {key}: true, but the Ray cluster has no GPU resources "
                    "(set it to auto or false, or add GPU nodes)")


def check_use_gpu(settings: Mapping[str, str]) -> None:
    """Every `use_gpu: true` of a chain of stages checked at once, before the first one starts:
    settings maps config keys (`infer.use_gpu`) to their values."""
    for key, setting in settings.items():
        resolve_use_gpu(setting, key)


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
