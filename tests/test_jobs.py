"""`ray job submit` of the whole pipeline to a real two-node Ray cluster with token authentication.

Everything a user does, as separate processes: `ray start --head --block` (the head announces `cam`,
like the GPU nodes of cluster.yaml) and `ray start --address ... --block` (a second node that
announces `crf`, like the CPU nodes), both with `RAY_AUTH_MODE=token`; then
`ray job submit --working-dir <repo> -- python jobs/pipeline.py --config configs/smoke.yaml ...` with
`infer.cam_resources={cam: 0.01}` and `crf.resources={crf: 0.01}`. The job runs in the cluster's
Python (the one that ran `ray start`), from the uploaded copy of the repository.

The run goes to `--out s3://...` on a real S3-compatible server (moto_server, tests/conftest.py): the
nodes get the endpoint and credentials in their environment (AWS_ENDPOINT_URL, ...) as cloud nodes
get them from their role, the dataset is local (`data.root`), and nothing of the run may appear on the
local disk of either node: no stage depends on the nodes sharing a file system.

Isolation from anything else on this machine: every port is a free one picked here, the nodes keep
their files in a temp dir of their own, `HOME` points at a temp dir (nothing is written to `~/.ray`),
the token is passed in `RAY_AUTH_TOKEN`, and the nodes are stopped by signalling the two `ray start`
processes this test started; never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cse_ray.layout import RunLayout

pytestmark = pytest.mark.slow  # ray start processes / a multi-node Cluster

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 240
START_TIMEOUT_S = 90

OVERRIDES = [
    "data.synth.train=16", "data.synth.val=6", "data.synth.size=48",
    "train_cam.crop=48", "train_cam.resize_long=[40,56]", "train_cam.epochs=1",
    "train_cse.crop=48", "train_cse.resize_long=[40,56]", "train_cse.epochs=1",
    "infer.cam_resources={cam: 0.01}", "crf.resources={crf: 0.01}",
]


@dataclass
class LocalCluster:
    dashboard: str  # http://127.0.0.1:PORT, the job API
    env: dict[str, str]  # what every client process needs: token mode, the token, a private HOME
    token: str
    logs: list[Path]
    base: Path  # the nodes' temp dirs, HOME and logs

    def get(self, path: str, token: str | None = None) -> dict:
        request = urllib.request.Request(self.dashboard + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster, as a user would type it (with the token set)."""
        return subprocess.run([RAY, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_line(process: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"{log.name}: no {text!r} (exit code {process.poll()}):\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop its node; its process group gets SIGKILL if that hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of this node only (its own session)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(s3_server: str) -> Iterator[LocalCluster]:
    """Two nodes; their environment (and so every worker's) carries the S3 endpoint and credentials."""
    base = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a limit
    home = base / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc.
    assert env["AWS_ENDPOINT_URL"] == s3_server and env["AWS_EC2_METADATA_DISABLED"] == "true"
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM stops a node at once
    gcs, dashboard, client, head_agent, worker_agent = _free_ports(5)
    # (Ray turns --node-ip-address 127.0.0.1 into this machine's own address; both stay on this machine.)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--object-store-memory", str(100 * 1024 * 1024)]
    head_cmd = [
        RAY, "start", "--head", *common, "--port", str(gcs), "--temp-dir", str(base / "rt"),
        "--num-cpus", "2", "--resources", '{"cam": 10}',
        "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(head_agent),
    ]
    worker_cmd = [
        RAY, "start", "--address", f"127.0.0.1:{gcs}", *common,
        "--num-cpus", "1", "--resources", '{"crf": 10}', "--dashboard-agent-listen-port", str(worker_agent),
    ]
    logs = [base / "head.log", base / "worker.log"]
    processes: list[subprocess.Popen] = []
    try:
        for cmd, log in zip((head_cmd, worker_cmd), logs):
            with open(log, "w") as handle:
                processes.append(subprocess.Popen(cmd, env=env, cwd=base, stdout=handle,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            _wait_for_line(processes[-1], log, "Ray runtime started")
        yield LocalCluster(f"http://127.0.0.1:{dashboard}", env, token, logs, base)
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(base, ignore_errors=True)


def _alive_nodes(cluster: LocalCluster) -> list[dict]:
    reply = cluster.get("/api/v0/nodes?limit=100&detail=1", token=cluster.token)
    return [node for node in reply["data"]["result"]["result"] if node["state"] == "ALIVE"]


def _submit(cluster: LocalCluster, submission_id: str, entrypoint: list[str]) -> str:
    """`ray job submit --no-wait`; returns what the CLI printed."""
    submitted = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
                            "--submission-id", submission_id, "--no-wait", "--", *entrypoint)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return submitted.stdout + submitted.stderr


def _wait_for_job(cluster: LocalCluster, submission_id: str) -> dict:
    """The job's record once it SUCCEEDED; its logs and the nodes' logs in the failure otherwise."""
    status, info = "PENDING", {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
        info = cluster.get(f"/api/jobs/{submission_id}", token=cluster.token)
        status = info["status"]
    if status != "SUCCEEDED":
        logs = cluster.ray("job", "logs", "--address", cluster.dashboard, submission_id)
        nodes_tail = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in cluster.logs)
        pytest.fail(f"job {submission_id} {status}: {info.get('message')}\n--- job logs\n"
                    f"{logs.stdout[-8000:]}{logs.stderr[-2000:]}\n{nodes_tail}")
    return info


def test_the_job_api_wants_the_token(cluster: LocalCluster) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        cluster.get("/api/jobs/")
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        cluster.get("/api/jobs/", token=secrets.token_hex(32))
    assert wrong.value.code in (401, 403)
    assert isinstance(cluster.get("/api/jobs/", token=cluster.token), list)


def _bucket_files(bucket: str, prefix: str) -> list[str]:
    """Object keys under `prefix`, without pyarrow's empty folder markers."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    found = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return [key for key in found if not key.endswith("/")]


def _bucket_read(bucket: str, key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


RUN_FILES = {"report.json", "manifest.parquet", "model.pth", "result.json", "events.log", "classifier.json",
             "infer_settings.json", "contact_sheet.png", "state.pt"}


def test_pipeline_job_runs_cams_on_the_head_and_crf_on_the_second_node_and_writes_only_to_s3(
    cluster: LocalCluster, make_bucket, tmp_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(nodes := _alive_nodes(cluster)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    by_role = {("head" if node["is_head_node"] else "second"): node for node in nodes}
    assert len(nodes) == 2 and set(by_role) == {"head", "second"}
    assert by_role["head"]["resources_total"].get("cam") == 10
    assert by_role["second"]["resources_total"].get("crf") == 10

    bucket = make_bucket("jobs").removeprefix("s3://")
    out = f"s3://{bucket}/run"
    data = tmp_path / "data"  # local to the nodes (both are on this machine, at the same path)
    entrypoint = [sys.executable, "jobs/pipeline.py", "--config", "configs/smoke.yaml", "--out", out,
                  f"data.root={data}", *OVERRIDES]
    upload_notes = _submit(cluster, "pipeline-1", entrypoint)

    info = _wait_for_job(cluster, "pipeline-1")
    assert info["driver_node_id"] == by_role["head"]["node_id"]  # the entrypoint runs on the head

    report = json.loads(_bucket_read(bucket, "run/report.json"))
    evals = {stem: json.loads(_bucket_read(bucket, f"run/eval/{stem}.json"))
             for stem in ("ordinary_cam", "cse_cam", "cse_crf_a6", "cse_crf_a10")}
    for key, stem in (("ordinary_cam_miou", "ordinary_cam"), ("cse_cam_miou", "cse_cam")):
        assert report[key] == pytest.approx(evals[stem]["miou"], abs=1e-3), key
    assert report["best_alpha"] in (6.0, 10.0) and report["run_dir"] == out
    best_crf = evals[f"cse_crf_a{report['best_alpha']:g}"]
    assert report["cse_crf_miou"] == pytest.approx(best_crf["miou"], abs=1e-3)
    assert report["best_threshold"] == evals["cse_cam"]["threshold"]

    rows = pq.read_table(io.BytesIO(_bucket_read(bucket, "run/manifest.parquet"))).to_pylist()
    assert len(rows) == 6 and {row["status"] for row in rows} == {"ok"}
    assert {row["cam_node"] for row in rows} == {by_role["head"]["node_id"]}
    assert {row["crf_node"] for row in rows} == {by_role["second"]["node_id"]}
    assert sorted(_bucket_files(bucket, "run/pseudo_labels/")) == sorted(
        f"run/pseudo_labels/{row['name']}.png" for row in rows)
    stored = set(_bucket_files(bucket, "run/"))
    assert {"run/config.yaml", "run/train_cam/model.pth", "run/train_cse/model.pth",
            "run/train_cse/result.json"} <= stored
    assert any(key.startswith("run/tensorboard/train_cse/") for key in stored)

    # Nothing of the run on the nodes' disks: their temp dirs, HOME, the job's working dir, the test's
    # folder (only the dataset), and no TensorBoard staging left behind.
    local = [path for root in (cluster.base, tmp_path) for path in root.rglob("*")
             if path.name in RUN_FILES or path.name.startswith("events.out.tfevents")]
    assert not local, local
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    for name in ("train_cam", "train_cse", "eval"):
        assert not Path(RunLayout.at(out).tensorboard(name)).exists(), name

    # What the job ran: the uploaded copy of the repository, without the virtualenv or run folders.
    assert "Uploading package" in upload_notes
    packages = [p for p in Path(cluster.logs[0].parent, "rt").glob(
        "session_2*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert len(packages) == 1, packages
    shipped = {p.relative_to(packages[0]).parts[0] for p in packages[0].rglob("*")}
    assert {"cse_ray", "jobs", "configs"} <= shipped
    assert not shipped & {".venv", ".git", "runs", "data"}, shipped
    assert sum(p.stat().st_size for p in packages[0].rglob("*") if p.is_file()) < 20 * 1024 * 1024

    # Resuming is the same command with the same --out: the finished run is reported, nothing redone.
    manifest = _bucket_read(bucket, "run/manifest.parquet")
    _submit(cluster, "pipeline-2", entrypoint)
    _wait_for_job(cluster, "pipeline-2")
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, "pipeline-2")
    assert "already finished" in logs.stdout, logs.stdout[-3000:] + logs.stderr[-2000:]
    assert _bucket_read(bucket, "run/manifest.parquet") == manifest
    assert json.loads(_bucket_read(bucket, "run/report.json")) == report
