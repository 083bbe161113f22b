"""`cse-ray tune`: Ray Tune sweeps of the eraser's training, with ASHA early stopping (docs/TUNE.md).

    space.py      `tune.space`: parsing and validation (no Ray), Tune's search-space objects
    sweep.py      `run_tune`, the driver: checks, shared data and classifier, the Tuner, the outputs
    trials.py     one trial (a train-cse run), and every use of Ray's private APIs
    callbacks.py  the driver's Tune callbacks: trial lines, TensorBoard scalars, the test stop hook
    results.py    per-epoch metrics, trial rows, trials.parquet, the summary table, `TuneSummary`
    posthoc.py    the threshold and CRF alpha of the best eraser, by the pipeline's rules

Importing this package does not import Ray: trials.py and callbacks.py (which subclass Ray Tune's
classes) load when a sweep starts.
"""

from cse_ray.tune.posthoc import PosthocChoice, choose_on_outputs, posthoc_search
from cse_ray.tune.results import TuneSummary, summary_table
from cse_ray.tune.space import DEFAULT_SPACE, SpaceEntry, parse_space
from cse_ray.tune.sweep import TEST_STOP_ENV, SweepInterrupted, run_tune, saved_statuses

__all__ = [
    "DEFAULT_SPACE",
    "TEST_STOP_ENV",
    "PosthocChoice",
    "SpaceEntry",
    "SweepInterrupted",
    "TuneSummary",
    "choose_on_outputs",
    "parse_space",
    "posthoc_search",
    "run_tune",
    "saved_statuses",
    "summary_table",
]
