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


NO_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def test_missing_credentials_are_refused_before_any_request(bucket, tmp_path, monkeypatch):
    """Without credentials the SDK would send unsigned requests (which this permissive server accepts)."""
    for name in NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    expected = f"--out {bucket}/runs/nokeys: no AWS credentials: set AWS_ACCESS_KEY_ID"
    with pytest.raises(UserError, match=expected):
        artifacts.check_storage(f"{bucket}/runs/nokeys")
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = testing\n"
                                                   "aws_secret_access_key = testing\n")
    artifacts.check_storage(f"{bucket}/runs/nokeys")  # a profile in the shared file is enough


def test_a_query_string_pyarrow_understands_works_and_any_other_is_refused(bucket, s3_server, monkeypatch):
    host = s3_server.removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from the URI alone
    run = RunLayout.at(f"{bucket}/runs/query?endpoint_override={host}&scheme=http")
    artifacts.check_storage(run.root)
    artifacts.write_json(run.eval_json("cse_cam"), {"miou": 1.0})
    from cse_ray.evaluate import report_paths

    assert report_paths(run.eval_json("cse_cam"))["markdown"] == (
        f"{bucket}/runs/query/eval/cse_cam.md?endpoint_override={host}&scheme=http")
    with pytest.raises(UserError, match=r"--out s3://\S+\?colour=blue: its query string is not understood"):
        artifacts.check_storage(f"{bucket}/runs/query?colour=blue")


def test_the_cli_exits_2_naming_bad_storage_before_ray_starts(bucket, tmp_path):
    """A missing bucket, missing credentials, a query string pyarrow does not read: exit 2, no Ray."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_dir), PYTHONPATH=str(repo), AWS_EC2_METADATA_DISABLED="true")
    no_keys = {k: v for k, v in env.items() if k not in NO_CREDENTIALS}
    no_keys["HOME"] = str(tmp_path)
    smoke = str(repo / "configs" / "smoke.yaml")
    cases = [
        ("s3://no-such-bucket/run", env, "the bucket 'no-such-bucket' does not exist"),
        (f"{bucket}/cli-run", no_keys, f"--out {bucket}/cli-run: no AWS credentials"),
        (f"{bucket}/cli-run?region=us-east-1&colour=blue", env, "its query string is not understood"),
    ]
    for out, environment, message in cases:
        for command in ("train-cam", "pipeline"):
            proc = subprocess.run(
                [sys.executable, "-m", "cse_ray.cli", command, "--config", smoke, "--out", out,
                 f"data.root={tmp_path / 'data'}"],
                capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not any(ray_dir.iterdir()) and not (tmp_path / "data").exists()  # nothing started, nothing made


def test_a_run_config_on_s3_loads_as_a_config_file(bucket):
    """`cse-ray <stage> --config s3://.../RUN/config.yaml` repeats a remote run, as a local one does."""
    from pathlib import Path

    from cse_ray.config import load_config, save_run_config

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    cfg = load_config(smoke, ["data.root=/data/voc"])
    saved = save_run_config(cfg, f"{bucket}/runs/config")
    assert saved == f"{bucket}/runs/config/config.yaml"
    assert load_config(saved, ["train_cse.lr=0.5"]) == load_config(smoke, ["data.root=/data/voc",
                                                                            "train_cse.lr=0.5"])
    with pytest.raises(UserError, match=f"config file {bucket}/runs/config/none.yaml: not found"):
        load_config(f"{bucket}/runs/config/none.yaml")


def test_evaluation_reads_predictions_and_writes_reports_on_s3(bucket, tmp_path):
    """`cse-ray evaluate --pred s3://... --out s3://...`: the same result as the local files give."""
    import numpy as np

    from cse_ray.evaluate import evaluate, write_reports
    from cse_ray.formats import save_cam_npz, write_label_png

    rng = np.random.default_rng(0)
    names = [f"img_{i}" for i in range(3)]
    remote = RunLayout.at(f"{bucket}/runs/eval").infer
    for name in names:
        cams = (rng.integers(0, 60, (2, 20, 30)) / 100).astype(np.float32)
        save_cam_npz(tmp_path / "pred" / f"{name}.npz", cams, [3, 7])
        save_cam_npz(remote.cam(name), cams, [3, 7])
        write_label_png(tmp_path / "gt" / f"{name}.png", rng.integers(0, 21, (20, 30)).astype(np.uint8))
    local = evaluate(tmp_path / "pred", tmp_path / "gt", names)
    result = evaluate(remote.cams_dir, tmp_path / "gt", names)
    assert (result.miou, result.threshold) == (local.miou, local.threshold)
    assert [r.source for r in result.per_image] == [remote.cam(n) for n in names]
    with pytest.raises(UserError, match="1 of 4 listed images have no predictions"):
        evaluate(remote.cams_dir, tmp_path / "gt", [*names, "img_9"])
    with pytest.raises(UserError, match="prediction directory does not exist"):
        evaluate(f"{bucket}/runs/eval/nothing", tmp_path / "gt", names)
    written = write_reports(result, f"{bucket}/runs/eval/eval/cse_cam.json", log_dir=f"{bucket}/runs/eval/tb")
    assert artifacts.read_json(written["json"]) == result.to_json_dict()
    assert artifacts.exists(written["plot"]) and len(artifacts.list_files(f"{bucket}/runs/eval/tb")) == 1
