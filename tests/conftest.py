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


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small CPU tests run faster and steadier on one thread (the machine has two cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
