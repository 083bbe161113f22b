"""Shared fixtures: a real local Ray cluster with its own short temp dir, and small synthetic datasets."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items) -> None:
    """Every test that starts Ray is slow: `pytest -m "not slow"` (make test-fast) runs the rest."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_tmpdir() -> Iterator[str]:
    """A short RAY_TMPDIR (Ray's socket paths must stay under 107 characters)."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.environ["RAY_TMPDIR"] = path
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_session(ray_tmpdir: str) -> Iterator[None]:
    """`ray.init(num_cpus=2)`: a real local cluster for one test module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmpdir, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone `moto_server`) on 127.0.0.1, a free port.

    Sets the standard AWS variables for this process and its children (Ray workers inherit them), so
    `s3://` paths reach it through pyarrow and boto3; yields the endpoint URL.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "AWS_EC2_METADATA_DISABLED")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    yield endpoint
    process.terminate()
    process.wait(timeout=10)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def make_bucket(s3_server: str):
    """`make_bucket(name)` creates a bucket on the test S3 server and returns `s3://name`."""
    import boto3

    def make(name: str) -> str:
        boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small CPU tests run faster and steadier on one thread (the machine has two cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
