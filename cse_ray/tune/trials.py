"""One trial of the sweep, and every use of Ray's private or internal APIs (written for Ray 2.60).

Under Ray Train V2 (Ray 2.60's default) a `Tuner` no longer takes a `TorchTrainer`, so each trial is a
Tune *function* trainable that acts as a small driver: it builds its config and calls
`cse_ray.train.fit_stage("train_cse", ...)`, an ordinary `TorchTrainer` run into `OUT/trials/<id>/`.
A Train callback (`EpochReport`) forwards every epoch's metrics from the workers to Tune, where ASHA
reads `val_miou`. So a trial is exactly a `cse-ray train-cse` run: same code, checkpoints and resume.

Ray Train requests its own resources for its workers; the trial that drives it only waits, so it
reserves a little memory and no CPU (Ray's guide leaves it 1 CPU, which on a 2-core machine would halve
the trials running at once), and `tune.cpus_per_trial` / `tune.gpus_per_trial` go to the workers.

The private APIs, each kept to one function or class here:
- `ray.train.v2._internal...ControllerCallback` (`_controller_start_hook`): the Train controller's
  handle as soon as it starts, so a stopped trial can abort it (`_TrainControl`).
- the controller actor's `abort()` (`_TrainControl.abort`): stops the workers and frees their group.
- `PlacementGroup(PlacementGroupID.from_hex(...))` (`remove_orphaned_placement_groups`).
- `ray.tune.trainable.function_trainable.wrap_function` (`trial_trainable`): a function trainable
  whose `cleanup` we can extend.
"""

from __future__ import annotations

import math
import threading

from ray.tune.integration.ray_train import TuneReportCallback

from cse_ray import artifacts
from cse_ray.config import Config, dump_yaml, from_dict, to_dict, with_overrides
from cse_ray.layout import RunLayout
from cse_ray.tune.results import METRIC, epoch_metrics

TRIAL_DRIVER_MEMORY = 128 * 1024 * 1024  # what a trial's own process reserves (bytes); it only waits


def worker_resources(cfg: Config) -> dict[str, float]:
    """Each Train worker's share of the trial's resources (`tune.cpus_per_trial` / `gpus_per_trial`)."""
    workers = cfg.train_cse.num_workers
    resources = {"CPU": cfg.tune.cpus_per_trial / workers}
    if cfg.tune.gpus_per_trial > 0:
        resources["GPU"] = cfg.tune.gpus_per_trial / workers
    return resources


def trial_config(shared: Config, params: dict) -> Config:
    """One trial's config: the shared config, the sampled values, and the trial's resources."""
    cfg = with_overrides(shared, params)
    per_worker = worker_resources(cfg)
    return with_overrides(cfg, {
        "train_cse.use_gpu": "true" if per_worker.get("GPU", 0) > 0 else "false",
        "train_cse.cpus_per_worker": max(1, math.ceil(per_worker["CPU"] - 1e-9)),
    })


def run_trial(params: dict, *, shared: dict, out: str) -> None:
    """The body of one trial: a train-cse run in OUT/trials/<trial_id>, its epochs reported to Tune."""
    import ray.tune

    from cse_ray.train import fit_stage

    cfg = trial_config(from_dict(shared), params)
    trial = RunLayout.at(out).trial(ray.tune.get_context().get_trial_id())
    stage = trial.stage("train_cse")
    artifacts.write_text(trial.config, dump_yaml(cfg))
    if artifacts.exists(stage.result):  # finished before the sweep was interrupted: tell Tune again
        for metrics in epoch_metrics(artifacts.read_json(stage.result)["history"]):
            ray.tune.report(metrics)
        return
    try:
        fit_stage("train_cse", cfg, trial.root, callbacks=_TrainControl.callbacks(),
                  resources_per_worker=worker_resources(cfg))
    except Exception:
        if _TrainControl.stopping.is_set():
            return  # Tune stopped this trial (ASHA, or the sweep was interrupted): not a failure
        if artifacts.exists(stage.failed):
            return  # the loss diverged: the trial ends with the epochs it had (status DIVERGED)
        raise


class EpochReport(TuneReportCallback):
    """Ray Train -> Tune, always with `val_miou`: an epoch whose loss diverged reports none, and Tune
    would abort the whole sweep on a result without the metric it optimises. It also hands the Train
    controller's handle to the trial (see `_TrainControl`)."""

    def __init__(self, handles) -> None:
        super().__init__()
        self._handles = handles
        self._sent = False

    def after_report(self, run_context, metrics, checkpoint):
        if not self._sent:
            self._sent = _send_controller(self._handles)
        filled = [{**m, METRIC: m.get(METRIC, 0.0), "diverged": float("nonfinite" in m)} for m in metrics]
        super().after_report(run_context, filled, checkpoint)


def _send_controller(handles) -> bool:
    """Runs in the Train controller: put its own actor handle where the trial can find it."""
    import ray

    handles.put(ray.get_runtime_context().current_actor)
    return True


class _TrainControl:
    """Lets a stopped trial end its Train run cleanly.

    When Tune stops a trial (ASHA, or Ctrl+C), it ends the trial's process; the Train controller that the
    trial started would die with it, and its workers' placement group would stay reserved until Ray's
    detached cleaner notices (which polls the state API, served by the Ray dashboard). So the controller
    sends its handle to the trial through a small queue, and the trial's `cleanup` calls
    `controller.abort()` (the controller actor's own method in Ray 2.60, not a public API): workers
    stopped, placement group removed, before the process goes. A trial stopped while its workers are
    still starting cannot abort in time: see `remove_orphaned_placement_groups`.
    """

    stopping = threading.Event()  # one trial per process: class-level state is the trial's
    queue = None

    @classmethod
    def callbacks(cls) -> tuple:
        """The Train callbacks of this trial's run: metrics to Tune, the controller's handle to us."""
        from ray.util.queue import Queue

        cls.queue = Queue(actor_options={"num_cpus": 0})
        callbacks: list = [EpochReport(cls.queue)]
        start_hook = _controller_start_hook(cls.queue)
        if start_hook is not None:
            callbacks.append(start_hook)
        return tuple(callbacks)

    @classmethod
    def abort(cls) -> None:
        import ray
        from ray.util.queue import Empty

        cls.stopping.set()
        if cls.queue is None:
            return
        controller = None
        try:
            while True:
                controller = cls.queue.get(block=False)
        except Empty:
            pass
        except Exception:  # the queue's actor is gone: nothing to reach
            return
        if controller is None:
            return
        try:
            ray.get(controller.abort.remote(), timeout=60)
        except Exception:  # abort ends the controller's process, so the call itself "fails"
            pass


def _controller_start_hook(handles):
    """A Train controller callback that sends the handle as soon as the controller starts (before the
    first epoch ends). `ControllerCallback` is Ray Train V2's internal callback interface (Ray 2.60);
    without it (another Ray version) the handle comes with the first epoch's report instead."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:  # pragma: no cover - other Ray versions
        return None

    class SendHandleOnStart(ControllerCallback):
        def __init__(self, queue) -> None:
            self.queue = queue

        def after_controller_start(self, train_run_context) -> None:
            _send_controller(self.queue)

    return SendHandleOnStart(handles)


def remove_orphaned_placement_groups() -> int:
    """Remove this job's placement groups while none of its stages runs (before and after the sweep).

    A trial stopped while its Train workers are still starting cannot abort in time (the controller is
    busy creating them, and Tune kills a stopping trial after a few seconds); the controller then dies
    holding a reserved placement group. Ray Train's own cleaner (Ray 2.60) would release it, but only
    through the state API, which needs the Ray dashboard. A placement group's id ends with the id of the
    job that made it, so only this driver's are touched. Ray has no public way to get a group from the
    table's hex ids, hence `PlacementGroup(PlacementGroupID.from_hex(...))`.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, info in placement_group_table().items():
        if info.get("state") != "REMOVED" and pg_id.endswith(job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed += 1
    if removed:
        print(f"tune: released {removed} placement group(s) left by stopped trials")
    return removed


def trial_trainable(shared: Config, out: str):
    """The Tune trainable: `run_trial` as a function trainable whose `cleanup` aborts its Train run.

    `tune.with_resources` on a plain function gives no hook that runs when Tune stops the trial;
    `wrap_function` (internal in Ray 2.60) returns the class Tune would build, which we subclass.
    """
    import functools

    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    body = functools.partial(run_trial, shared=to_dict(shared), out=RunLayout.at(out).root)
    base = wrap_function(body)

    class SweepTrial(base):
        def cleanup(self):
            _TrainControl.abort()
            super().cleanup()

    return tune.with_resources(SweepTrial, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
