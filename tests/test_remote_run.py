"""The smoke pipeline with `--out s3://...` against a real S3-compatible server (moto_server on 127.0.0.1).

The driver is a `python -m cse_ray.cli pipeline` process of its own, as a user runs it: the first run
is killed (SIGKILL to its process group, its local Ray included) once the eraser's inference has
written some CAMs, the same command then finishes the run, and a third finds everything done. The
dataset is local (`data.root`); everything the run writes must be in the bucket.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cse_ray.layout import RunLayout

pytestmark = pytest.mark.slow  # driver processes with their own local Ray

REPO = Path(__file__).resolve().parents[1]
VAL_IMAGES = 8
SMALL = [  # tests/test_pipeline.py's shrink; one image in flight, so the kill lands mid-inference
    "data.synth.train=16", f"data.synth.val={VAL_IMAGES}", "data.synth.size=48",
    "train_cam.crop=48", "train_cam.resize_long=[40,56]", "train_cam.epochs=1",
    "train_cse.crop=48", "train_cse.resize_long=[40,56]", "train_cse.epochs=1",
    "infer.max_in_flight=1",
]
RUN_TIMEOUT_S = 600


def keys(bucket: str, prefix: str, suffix: str = "") -> list[str]:
    """The objects under `prefix` ending with `suffix` (pyarrow's empty folder markers end with '/')."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    found = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return [key for key in found if key.endswith(suffix) and not key.endswith("/")]


def read(bucket: str, key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def leftover_ray_processes(ray_dir: str) -> list[int]:
    """Processes of the Ray instance the killed driver started (their command lines name its temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if ray_dir in cmdline:
            found.append(int(proc.name))
    return found


def test_the_pipeline_on_s3_survives_a_killed_driver(make_bucket, tmp_path: Path) -> None:
    bucket = make_bucket("remote-run").removeprefix("s3://")
    out = f"s3://{bucket}/run"
    data = tmp_path / "data"  # the dataset stays local
    ray_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_dir, PYTHONPATH=str(REPO), AWS_EC2_METADATA_DISABLED="true")
    smoke = str(REPO / "configs" / "smoke.yaml")
    command = [sys.executable, "-m", "cse_ray.cli", "pipeline", "--config", smoke, "--out", out,
               f"data.root={data}", *SMALL]

    # 1. The first run, killed once the eraser's inference has written some CAMs but not all.
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not keys(bucket, "run/cams/", ".npz"):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    time.sleep(1)
    for pid in leftover_ray_processes(ray_dir):  # Ray's node processes die with their driver; if not:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not keys(bucket, "run/report.json")
    cams_at_kill = len(keys(bucket, "run/cams/", ".npz"))
    crf_at_kill = len(keys(bucket, "run/crf/a6/", ".png"))
    assert 1 <= cams_at_kill and crf_at_kill < VAL_IMAGES  # killed mid-inference

    # 2. The same command finishes the run: finished images are skipped, the rest computed once.
    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "train_cam: already finished" in second.stdout
    assert "train_cse: already finished" in second.stdout
    infer_line = next(line for line in second.stdout.splitlines()
                      if line.startswith("infer:") and line.endswith(f"out {out}"))
    done, skipped = map(int, re.search(r"(\d+) done, (\d+) skipped", infer_line).groups())
    assert done + skipped == VAL_IMAGES and done >= 1 and skipped >= cams_at_kill - 1

    # Every output in the bucket, nothing of the run on the local disk.
    report = json.loads(read(bucket, "run/report.json"))
    for key, stem in (("ordinary_cam_miou", "ordinary_cam"), ("cse_cam_miou", "cse_cam")):
        assert report[key] == pytest.approx(json.loads(read(bucket, f"run/eval/{stem}.json"))["miou"],
                                            abs=1e-3), key
    assert report["best_alpha"] in (6.0, 10.0) and report["run_dir"] == out
    best_crf = json.loads(read(bucket, f"run/eval/cse_crf_a{report['best_alpha']:g}.json"))
    assert report["cse_crf_miou"] == pytest.approx(best_crf["miou"], abs=1e-3)
    names = sorted(line for line in (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    assert len(names) == VAL_IMAGES
    assert sorted(keys(bucket, "run/pseudo_labels/")) == [f"run/pseudo_labels/{n}.png" for n in names]
    assert len(keys(bucket, "run/cams/")) == len(keys(bucket, "run/crf/a10/")) == VAL_IMAGES
    with Image.open(io.BytesIO(read(bucket, f"run/pseudo_labels/{names[0]}.png"))) as label, \
            Image.open(data / "JPEGImages" / f"{names[0]}.jpg") as image:
        assert label.mode == "P" and label.size == image.size
    rows = pq.read_table(io.BytesIO(read(bucket, "run/manifest.parquet"))).to_pylist()
    assert sorted(row["name"] for row in rows) == names  # one row per image, none twice
    assert {row["status"] for row in rows} == {"ok"}
    assert {(row["pseudo_source"], row["pseudo_value"]) for row in rows} == {("crf", report["best_alpha"])}
    stored = set(keys(bucket, "run/"))
    assert {"run/config.yaml", "run/train_cam/model.pth", "run/train_cse/model.pth", "run/report.md",
            "run/contact_sheet.png", "run/eval/cse_cam.json", "run/train_cse/classifier.json"} <= stored
    assert any(k.startswith("run/train_cse/ray/train_cse/epoch_0001/") for k in stored)  # Ray Train's
    for name in ("train_cam", "train_cse", "eval"):
        assert keys(bucket, f"run/tensorboard/{name}/"), name
        assert not Path(RunLayout.at(out).tensorboard(name)).exists(), name  # uploaded, local copy gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "first.log"]  # no run folder here

    # 3. Once more: the report is there, nothing runs.
    before = read(bucket, "run/manifest.parquet")
    third = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "pipeline: already finished" in third.stdout, third.stderr[-2000:]
    assert read(bucket, "run/manifest.parquet") == before
    deadline = time.monotonic() + 30
    while leftover_ray_processes(ray_dir) and time.monotonic() < deadline:  # the drivers' Ray stops with them
        time.sleep(1)
    assert not leftover_ray_processes(ray_dir)
    shutil.rmtree(ray_dir, ignore_errors=True)
