"""Tune callbacks of the sweep's driver: a line per finished trial, per-trial TensorBoard scalars, and
the test hook that interrupts a sweep. Tune saves its callbacks with the experiment, and a resumed sweep
uses the saved ones: they hold plain settings only.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

from ray.tune import Callback as TuneCallback

from cse_ray.tune.results import METRIC, TIME_ATTR, params_text


class TrialLines(TuneCallback):
    """One concise line per finished trial."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        epochs = int(result.get(TIME_ATTR, 0) or 0)
        status = "DIVERGED" if result.get("diverged") else (
            "EARLY_STOPPED" if epochs < self.epochs else "TERMINATED")
        best = float(result.get("best_miou", float("nan")))
        print(f"tune: trial {trial.trial_id} {status} after {epochs}/{self.epochs} epochs, best val mIoU "
              f"{best:.2f} ({params_text(trial.config)})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"tune: trial {trial.trial_id} ERROR ({params_text(trial.config)}); details in "
              f"{trial.path}", flush=True)


class TrialScalars(TuneCallback):
    """Per-trial TensorBoard scalars by epoch in `directory/<trial_id>`.

    `directory` is local (`RunLayout.tensorboard("tune")`); with a remote `--out` the driver uploads it
    after the sweep (`RunLayout.sync_tensorboard`).
    """

    KEYS = (METRIC, "best_miou", "loss", "loss_cls", "loss_erase", "lr", "w", "images_per_s")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._writers: dict = {}

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment; writers stay out
        return {"directory": self.directory, "_writers": {}}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if TIME_ATTR not in result:
            return
        writer = self._writers.get(trial.trial_id)
        if writer is None:
            writer = self._writers[trial.trial_id] = SummaryWriter(str(Path(self.directory, trial.trial_id)))
        for key in self.KEYS:
            value = result.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key, value, int(result[TIME_ATTR]))
        writer.flush()

    def _close(self, trial) -> None:
        writer = self._writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial)


class StopAfterTrials(TuneCallback):
    """Test hook: when the environment variable `env` is N, interrupt the sweep after N finished trials
    the way Ctrl+C does (Tune's SIGINT handler saves the experiment, stops the running trials and
    returns). The variable is read at each event, so a resumed sweep without it runs to the end."""

    def __init__(self, env: str) -> None:
        self.env = env
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        limit = int(os.environ.get(self.env, "0") or 0)
        if limit and self.finished == limit:
            os.kill(os.getpid(), signal.SIGINT)
