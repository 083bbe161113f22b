"""`ray job submit --working-dir . -- python jobs/train_seg.py ...`: as `cse-ray train-seg`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir's cse_ray

from cse_ray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("train-seg")
