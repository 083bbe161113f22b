"""Placement on a real three-node Ray cluster in this process: CAM actors where `cam` is, CRF where `crf` is.

`ray.cluster_utils.Cluster` starts a head and two worker nodes as separate raylets on this machine.
The nodes announce the custom resources of cluster.yaml's node types (`cam` on the GPU type, `crf`
on the CPU type), the head has a CPU of its own and no custom resource, and `run_infer` is asked
for `infer.cam_resources={cam: 0.01}` and `crf.resources={crf: 0.01}`. The manifest records the
node of every CAM and every CRF, which shows where Ray put them. Without those requests the head's
and the other node's CPUs would take work too, so the assertions below can fail.

This module does not use the `ray_session` fixture: a Cluster is a Ray instance of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from PIL import Image
from ray.cluster_utils import Cluster

from cse_ray.config import from_dict
from cse_ray.data.synth import generate
from cse_ray.infer import read_manifest, run_infer
from cse_ray.models import build_classifier

pytestmark = pytest.mark.slow  # ray start processes / a multi-node Cluster

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def cluster(ray_tmpdir: str) -> Iterator[dict[str, str]]:
    """Head (1 CPU), a `cam` node (1 CPU), a `crf` node (1 CPU); yields their node ids by role."""
    if ray.is_initialized():
        ray.shutdown()
    small = {"object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, **small,
    })  # its temp dir is RAY_TMPDIR/ray (set by the ray_tmpdir fixture), where it also notes its address
    try:
        cam_node = cluster.add_node(num_cpus=1, resources={"cam": 10}, **small)
        crf_node = cluster.add_node(num_cpus=1, resources={"crf": 10}, **small)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield {"head": cluster.head_node.node_id, "cam": cam_node.node_id, "crf": crf_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, str]:
    """(VOC root with a few synthetic 48-pixel images, a random tiny checkpoint)."""
    base = tmp_path_factory.mktemp("multinode")
    root = str(base / "voc")
    generate(root, train=NUM_IMAGES, val=1, size=48, seed=3)
    torch.manual_seed(0)
    checkpoint = str(base / "tiny.pth")
    torch.save(build_classifier("resnet38d_tiny").state_dict(), checkpoint)
    return root, checkpoint


def test_the_cluster_has_the_nodes_of_cluster_yaml(cluster: dict[str, str]) -> None:
    alive = {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}
    assert set(alive) == set(cluster.values())
    assert alive[cluster["cam"]].get("cam") == 10 and "crf" not in alive[cluster["cam"]]
    assert alive[cluster["crf"]].get("crf") == 10 and "cam" not in alive[cluster["crf"]]
    assert "cam" not in alive[cluster["head"]] and "crf" not in alive[cluster["head"]]


def test_cam_actors_run_on_the_cam_node_and_crf_tasks_on_the_crf_node(
    cluster: dict[str, str], dataset: tuple[str, str], tmp_path: Path
) -> None:
    root, checkpoint = dataset
    cfg = from_dict({
        "data": {"root": root, "infer_list": "train"},
        "model": {"backbone": "resnet38d_tiny"},
        "infer": {"checkpoint": checkpoint, "scales": [1.0], "num_actors": 1, "cpus_per_actor": 1.0,
                  "max_in_flight": 3, "use_gpu": "false", "cam_resources": {"cam": 0.01}},
        "crf": {"alphas": [6], "pseudo_alpha": 6, "iterations": 3, "resources": {"crf": 0.01}},
    })
    out = tmp_path / "run"
    summary = run_infer(cfg, str(out), progress=False)
    assert (summary.done, summary.failed) == (NUM_IMAGES, 0)

    rows = read_manifest(str(out))
    names = [f"train_{i:06d}" for i in range(NUM_IMAGES)]
    assert sorted(row["name"] for row in rows) == names
    assert {row["status"] for row in rows} == {"ok"}
    assert {row["cam_node"] for row in rows} == {cluster["cam"]}
    assert {row["crf_node"] for row in rows} == {cluster["crf"]}
    for name in names:  # the CRF node wrote into the shared out folder (same machine here)
        with Image.open(out / "pseudo_labels" / f"{name}.png") as label:
            assert label.mode == "P"
