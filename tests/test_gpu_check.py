"""benchmarks/gpu_check.py --dry-run: the GPU check's code runs end to end on the CPU, tiny sizes.

The dry run declares one GPU to its own local Ray (`ray.init(num_gpus=1)`), so the CAM actors are
placed by the real fractional-GPU scheduling options: four actors at `infer.gpus_per_actor: 0.25` must
all run at once on GPU id 0, one actor at 1.0 alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a local Ray, Ray Train and actors

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_run_measures_every_part(tmp_path: Path) -> None:
    ray_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_dir, PYTHONPATH=str(REPO))
    summary = tmp_path / "gpu_check.json"
    try:
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run",
                               "--json", str(summary)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| part | setting | img/s |" in proc.stdout

    result = json.loads(summary.read_text())
    assert result["dry_run"] is True
    rows = {(row["part"], row["setting"]): row for row in result["rows"]}
    assert list(rows) == [
        ("train-cse step", "fp32"), ("train-cse step", "bf16"), ("train-cse step", "bf16 + channels-last"),
        ("train-cse step on Ray Train, 1 worker", "fp32, gloo"),
        *[("CAM inference, multi-scale + flip", f"{precision}, {n} actor(s)")
          for precision in ("fp32", "bf16") for n in (1, 4)],
        ("dense CRF (alphas 6/10/24)", "2 iterations"),
    ]
    ray_row = rows[("train-cse step on Ray Train, 1 worker", "fp32, gloo")]
    assert ray_row["nccl"] is False and math.isfinite(ray_row["overhead_pct"])
    for precision in ("fp32", "bf16"):
        alone = rows[("CAM inference, multi-scale + flip", f"{precision}, 1 actor(s)")]
        shared = rows[("CAM inference, multi-scale + flip", f"{precision}, 4 actor(s)")]
        assert (alone["num_gpus"], alone["actors"], alone["gpu_ids"]) == (1.0, 1, ["0"])
        assert (shared["num_gpus"], shared["actors"], shared["gpu_ids"]) == (0.25, 4, ["0"])  # one GPU
