"""`cse-ray tune`'s driver: Ray Tune sweeps of the eraser's training (train-cse), with ASHA early stopping.

    run_tune: check the space (space.py) -> data and the ordinary classifier, once -> the sweep (each
    trial a train-cse run, trials.py; driver callbacks, callbacks.py) -> trials.parquet (results.py)
    -> threshold and alpha of the best eraser (posthoc.py) -> best_config.yaml, tune_summary.json

- The data set and the ordinary classifier are made once, before the sweep; every trial gets explicit
  `data.root` and `train_cse.classifier`, so no trial regenerates data or retrains the classifier.
- `tune.cpus_per_trial` / `tune.gpus_per_trial` go to each trial's Train workers. With
  `tune.max_concurrent_trials: 0` the number of trials in flight is computed from the cluster's CPUs
  and GPUs, so no Train run waits for resources.

Outputs under `--out` (a local path or a URI; every path from `cse_ray.layout.RunLayout`):

    trials.parquet        one row per trial: id, searched values, best val mIoU, epochs, status, out dir
    best_config.yaml      the full config with the best values, `infer.threshold`, `crf.pseudo_alpha`
                          and `train_cse.classifier`; runs as is with `cse-ray train-cse --config`
    tune_summary.json     the best trial, its checkpoint, the post-hoc numbers
    tune_settings.json    the config the sweep started with (a resume must use the same)
    trials/<id>/          each trial's train-cse run (model.pth, result.json, events.log, Train storage)
    posthoc/              CAMs and CRF maps of the best eraser on the validation list, eval_*.json reports
    tune/sweep/           Ray Tune's experiment storage (resume state, per-trial results, TensorBoard)
    tensorboard/tune/     per-trial scalars (val_miou, loss, ...) by epoch

Running the same command again resumes an interrupted sweep (`Tuner.restore`); trials that finished
are not rerun, errored ones are retried. On a finished sweep it only says so.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from cse_ray import artifacts
from cse_ray.config import Config, dump_yaml, save_run_config, to_dict, with_absolute_paths, with_overrides
from cse_ray.errors import RunFailed, UserError
from cse_ray.layout import RunLayout
from cse_ray.tune.results import METRIC, TIME_ATTR, TuneSummary, summary_table, trial_rows, trials_table
from cse_ray.tune.space import SpaceEntry, domain, parse_space

EXPERIMENT_NAME = "sweep"  # Tune keeps the experiment in RunLayout.tune_storage / EXPERIMENT_NAME
TEST_STOP_ENV = "CSE_RAY_TEST_STOP_TUNE_AFTER"
"""Test-only hook: `N` makes the driver interrupt the sweep (as Ctrl+C would) once N trials have finished."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial finished (Ctrl+C); the same command resumes it."""


def run_tune(cfg: Config, out: str) -> TuneSummary:
    """Sweep `tune.space` over train-cse runs, then search the threshold and alpha of the best one."""
    cfg = with_absolute_paths(cfg)  # trials run in other directories
    layout = RunLayout.at(out)
    space = parse_space(cfg)  # every check on the sweep's own keys happens before Ray starts
    _check_sweep_settings(cfg)
    _check_same_sweep(cfg, layout)
    if all(artifacts.exists(p) for p in (layout.trials_table, layout.best_config, layout.tune_summary)):
        finished = TuneSummary.read(layout.tune_summary)
        print(f"tune: already finished in {layout.root} (best trial {finished.best_trial}, val mIoU "
              f"{finished.best_val_miou:.2f}); nothing to do. Best config: {finished.best_config}")
        return finished

    from cse_ray.data.prepare import resolve_data_root
    from cse_ray.runtime import ensure_ray
    from cse_ray.train import train_cam
    from cse_ray.tune.posthoc import posthoc_search
    from cse_ray.tune.trials import remove_orphaned_placement_groups

    shared = with_overrides(cfg, {"data.root": resolve_data_root(cfg, layout.root)})
    classifier = cfg.train_cse.classifier
    if classifier and not artifacts.exists(classifier):
        raise UserError(f"config key train_cse.classifier: {classifier} not found")
    save_run_config(cfg, layout.root)
    ensure_ray()
    _check_resources(cfg)
    remove_orphaned_placement_groups()
    if not classifier:
        own = layout.stage("train_cam")
        if not artifacts.exists(own.result):
            print("tune: training the ordinary classifier once, for every trial")
        train_cam(shared, layout.root)
        classifier = own.model
    shared = with_overrides(shared, {"train_cse.classifier": classifier})
    artifacts.write_json(layout.tune_settings, {"config": to_dict(cfg)})

    try:
        results, statuses = _run_sweep(shared, space, layout)
    finally:
        layout.sync_tensorboard("tune", final=True)
    remove_orphaned_placement_groups()
    rows = trial_rows(results, statuses, space, layout.root, cfg.train_cse.epochs)
    incomplete = [r for r in rows if r["status"] == "INCOMPLETE"]
    if incomplete:
        print(f"tune: interrupted with {len(rows) - len(incomplete)} trials finished; rerun the same "
              f"command to resume (finished trials are not rerun)", file=sys.stderr)
        raise SweepInterrupted(f"{len(incomplete)} trials did not finish")
    artifacts.write_parquet(layout.trials_table, trials_table(rows, space))

    ranked = [r for r in rows if r["status"] != "ERROR" and r["best_val_miou"] is not None
              and artifacts.exists(r["checkpoint"])]
    if not ranked:
        print(summary_table(rows, space, None))
        raise RunFailed(f"tune: no trial produced a checkpoint; see {layout.trials_table}")
    best = max(ranked, key=lambda r: r["best_val_miou"])  # ties: the first trial
    best_cfg = with_overrides(shared, best["params"])
    print(f"tune: best trial {best['trial_id']} (val mIoU {best['best_val_miou']:.2f}); post-hoc search "
          f"of the CAM threshold and CRF alpha on data.val_list")
    posthoc = posthoc_search(best_cfg, best["checkpoint"], layout.posthoc)

    final_values: dict[str, Any] = {"infer.threshold": posthoc.threshold}
    if posthoc.alpha is not None:
        final_values["crf.pseudo_alpha"] = posthoc.alpha
    summary = TuneSummary(
        out=layout.root, trials=rows, best_trial=best["trial_id"], best_params=best["params"],
        best_val_miou=best["best_val_miou"], best_checkpoint=best["checkpoint"],
        threshold=posthoc.threshold, cam_miou=posthoc.cam_miou, alpha=posthoc.alpha,
        crf_miou=posthoc.crf_miou, best_config=layout.best_config,
    )
    artifacts.write_json(layout.tune_summary, summary.to_json())
    header = (f"# cse-ray tune: best of {len(rows)} trials ({best['trial_id']}, val CAM mIoU "
              f"{best['best_val_miou']:.2f}); post-hoc threshold {posthoc.threshold:g}"
              + (f", CRF alpha {posthoc.alpha:g}" if posthoc.alpha is not None else "") + "\n")
    artifacts.write_text(layout.best_config, header + dump_yaml(with_overrides(best_cfg, final_values)))
    print(summary_table(rows, space, best["trial_id"]))
    print(f"tune: best config {layout.best_config} (run it with: cse-ray train-cse --config "
          f"{layout.best_config} --out NEW_RUN)")
    return summary


def _check_sweep_settings(cfg: Config) -> None:
    t = cfg.tune
    if t.scheduler == "asha" and t.grace_period > cfg.train_cse.epochs:
        raise UserError(f"config key tune.grace_period: {t.grace_period} is more than train_cse.epochs="
                        f"{cfg.train_cse.epochs} (ASHA would never stop a trial)")
    if t.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UserError("config key tune.search_alg: optuna is not installed "
                        "(pip install 'cse-ray[optuna]', or use tune.search_alg: random)")


def _check_same_sweep(cfg: Config, layout: RunLayout) -> None:
    """Resuming with another config would mix two sweeps in one experiment: refuse it."""
    path = layout.tune_settings
    if not artifacts.exists(path):
        return
    previous = _flat(artifacts.read_json(path)["config"])
    current = _flat(to_dict(cfg))
    differ = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if differ:
        raise UserError(f"{path}: this --out holds a sweep started with another config "
                        f"({', '.join(differ[:6])} differ); use a new --out, or rerun with the same config")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "space":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_resources(cfg: Config) -> None:
    """A trial that can never get its resources would wait forever: refuse it on a fixed local cluster."""
    from cse_ray.runtime import check_resources

    def request(key: str, resource: str):
        wanted = getattr(cfg.tune, key)
        return ({resource: wanted}, lambda total: f"config key tune.{key}: {wanted:g}, but the Ray cluster "
                                                  f"has {total.get(resource, 0):g} {resource}s")

    check_resources([request("cpus_per_trial", "CPU"), request("gpus_per_trial", "GPU")])


def _max_concurrent(cfg: Config) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs and GPUs hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    limits = [int(total.get("CPU", 0) / cfg.tune.cpus_per_trial + 1e-9)]
    if cfg.tune.gpus_per_trial > 0:
        limits.append(int(total.get("GPU", 0) / cfg.tune.gpus_per_trial + 1e-9))
    return max(1, min(limits))


def _run_sweep(shared: Config, space: dict[str, SpaceEntry], layout: RunLayout):
    """Start the sweep, or resume the one in the experiment storage; (results, saved statuses)."""
    from ray import tune

    from cse_ray.tune.callbacks import StopAfterTrials, TrialLines, TrialScalars
    from cse_ray.tune.trials import trial_trainable

    t = shared.tune
    experiment = artifacts.join(layout.tune_storage, EXPERIMENT_NAME)  # where Tune puts it (Ray's layout)
    trainable = trial_trainable(shared, layout.root)
    if tune.Tuner.can_restore(experiment):
        print(f"tune: resuming the sweep in {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
        return tuner.fit(), saved_statuses(experiment)

    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # stop_last_trials=False: a trial that reaches max_t ends on its own (its Train run shuts down
        # cleanly) instead of being stopped by the scheduler at its last report.
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=shared.train_cse.epochs,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor,
                                  stop_last_trials=False)
    concurrency = _max_concurrent(shared)
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=t.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        # Its own limit: Tune's max_concurrent_trials applies to Searchers only, not to this generator.
        search_alg = BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)
    print(f"tune: {t.num_samples} sample(s) of {len(space)} key(s), up to {concurrency} trial(s) at once, "
          f"{t.cpus_per_trial:g} CPU / {t.gpus_per_trial:g} GPU each, scheduler {t.scheduler}, "
          f"search {t.search_alg}")
    callbacks = [TrialLines(shared.train_cse.epochs), TrialScalars(layout.tensorboard("tune")),
                 StopAfterTrials(TEST_STOP_ENV)]
    tuner = tune.Tuner(
        trainable,
        param_space={key: domain(entry) for key, entry in space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, search_alg=search_alg,
            num_samples=t.num_samples,
            max_concurrent_trials=None if t.search_alg == "random" else concurrency,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME, storage_path=layout.tune_storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train already retries workers
            callbacks=callbacks,
        ),
    )
    return tuner.fit(), saved_statuses(experiment)


def saved_statuses(experiment: str) -> dict[str, str]:
    """Trial id -> Tune's status as saved in the experiment state (what a restore would resume from).

    Read from storage, not from the returned results: after an interruption Tune saves the state with
    the running trials RUNNING, then stops them, which marks them TERMINATED in memory only.
    """
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(experiment).trials}


def _trial_name(trial) -> str:
    return trial.trial_id
