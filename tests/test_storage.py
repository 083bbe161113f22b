"""Run files on `s3://` through a real S3-compatible server (moto_server on 127.0.0.1), not a mock."""

from __future__ import annotations

import json

import pytest
import torch

from cse_ray import artifacts
from cse_ray.errors import UserError
from cse_ray.layout import RunLayout
from cse_ray.models import build_classifier, load_weights


@pytest.fixture(scope="module")
def bucket(make_bucket) -> str:
    return make_bucket("storage-test")


def test_atomic_writes_and_reads_on_s3(bucket):
    run = RunLayout.at(f"{bucket}/runs/a")
    assert run.is_remote and run.report_json == f"{bucket}/runs/a/report.json"
    assert not artifacts.exists(run.report_json)
    artifacts.write_json(run.report_json, {"miou": 50.0})
    assert artifacts.exists(run.report_json) and artifacts.read_json(run.report_json) == {"miou": 50.0}
    artifacts.append_line(run.stage("train_cam").events, "epoch 1 started")
    artifacts.append_line(run.stage("train_cam").events, "epoch 2 started")
    assert artifacts.read_bytes(run.stage("train_cam").events).decode().splitlines() == [
        "epoch 1 started", "epoch 2 started"]


def test_a_query_string_stays_at_the_end_of_joined_paths(bucket, s3_server):
    host = s3_server.removeprefix("http://")
    base = f"{bucket}/runs/q?endpoint_override={host}&scheme=http"
    path = artifacts.join(base, "train_cse", "result.json")
    assert path == f"{bucket}/runs/q/train_cse/result.json?endpoint_override={host}&scheme=http"
    artifacts.write_json(path, {"ok": True})
    assert artifacts.read_json(f"{bucket}/runs/q/train_cse/result.json") == {"ok": True}


def test_weights_load_from_s3(bucket, tmp_path):
    model = build_classifier("resnet38d_tiny")
    local = tmp_path / "model.pth"
    torch.save(model.state_dict(), local)
    remote = f"{bucket}/runs/w/train_cam/model.pth"
    artifacts.write_bytes(remote, local.read_bytes())
    other = build_classifier("resnet38d_tiny")
    load_weights(other, remote)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(UserError, match=f"{bucket}/runs/w/missing.pth: weights file not found"):
        load_weights(other, f"{bucket}/runs/w/missing.pth")


def test_a_missing_bucket_is_refused_naming_it(s3_server):
    with pytest.raises(UserError, match="the bucket 'no-such-bucket' does not exist"):
        artifacts.check_storage("s3://no-such-bucket/runs/x")
    artifacts.check_storage("/tmp/any/local/folder")  # local folders are made on demand


def test_tensorboard_files_are_uploaded_for_a_remote_run(bucket):
    import uuid

    from torch.utils.tensorboard import SummaryWriter

    run = RunLayout.at(f"{bucket}/runs/tb-{uuid.uuid4().hex}")  # a new run: its local event folder is new
    writer = SummaryWriter(run.tensorboard("train_cam"))
    writer.add_scalar("loss", 1.0, 1)
    writer.close()
    assert run.sync_tensorboard("train_cam") == 1
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(run.tensorboard_target("train_cam"))
    files = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
    assert [f.base_name.startswith("events.out.tfevents") for f in files] == [True]
    assert json.dumps(RunLayout.at("/tmp/x").tensorboard("train_cam")) == '"/tmp/x/tensorboard/train_cam"'
