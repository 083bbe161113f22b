"""`cse-ray tune`: Ray Tune sweeps of the eraser's training (train-cse), with ASHA early stopping.

Why it is built this way:

- Under Ray Train V2 (the default in Ray 2.60) a `Tuner` no longer takes a `TorchTrainer`. Each trial is a
  Tune *function* trainable that acts as a small driver: it builds its config and calls
  `cse_ray.train.fit_stage("train_cse", ...)`, which runs an ordinary `TorchTrainer` into
  `OUT/trials/<trial_id>/`. A Train callback (`TuneReportCallback`, from `ray.tune.integration.ray_train`)
  forwards every epoch's metrics from the Train workers to Tune, where ASHA reads `val_miou`.
  So a trial is exactly a `cse-ray train-cse` run: same code, same checkpoints, same resume. When Tune
  stops a trial (ASHA, Ctrl+C), the trial aborts its Train run first, so that the workers' placement
  group is released at once (see `_TrainControl`).
- Ray Train requests its own resources for its workers; the Tune trial that drives it only waits. The
  trial therefore reserves a little memory and no CPU (Ray's guide leaves it 1 CPU by default, which on
  a 2-core machine would halve the number of trials running at once), and `tune.cpus_per_trial` /
  `tune.gpus_per_trial` go to the Train workers. With `tune.max_concurrent_trials: 0` the number of
  trials in flight is computed from the cluster's CPUs and GPUs, so no Train run waits for resources.
- The data set and the ordinary classifier are made once, before the sweep; every trial gets explicit
  `data.root` and `train_cse.classifier`, so no trial regenerates data or retrains the classifier.
- After the sweep, the best trial's eraser gets a cheap post-hoc search of what needs no retraining:
  the CAM background threshold and the CRF alpha (inference + CRF on the validation list, once).

Outputs under `--out` (a local path or a URI):

    trials.parquet        one row per trial: id, searched values, best val mIoU, epochs, status, out dir
    best_config.yaml      the full config with the best values, `infer.threshold`, `crf.pseudo_alpha`
                          and `train_cse.classifier`; runs as is with `cse-ray train-cse --config`
    tune_summary.json     the best trial, its checkpoint, the post-hoc numbers
    trials/<id>/          each trial's train-cse run (model.pth, result.json, events.log, Train storage)
    posthoc/              CAMs and CRF maps of the best eraser on the validation list, eval_*.json reports
    tune/sweep/           Ray Tune's experiment storage (resume state, per-trial results, TensorBoard)
    tensorboard/tune/     per-trial scalars (val_miou, loss, ...) by epoch

Running the same command again resumes an interrupted sweep (`Tuner.restore`); trials that finished
are not rerun, errored ones are retried. On a finished sweep it only says so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import math
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback as TuneCallback
from ray.tune.integration.ray_train import TuneReportCallback

from cse_ray import artifacts
from cse_ray.config import (
    Config,
    dump_yaml,
    from_dict,
    thresholds,
    to_dict,
    with_absolute_paths,
    with_overrides,
)
from cse_ray.errors import UserError

TRIALS_FILE = "trials.parquet"
BEST_CONFIG_FILE = "best_config.yaml"
SUMMARY_FILE = "tune_summary.json"
SETTINGS_FILE = "tune_settings.json"
EXPERIMENT_NAME = "sweep"
METRIC = "val_miou"  # validation CAM mIoU (percent) after each epoch, reported by the Train workers
TIME_ATTR = "epoch"  # our own epoch counter: it survives trial restarts, unlike training_iteration
TRIAL_DRIVER_MEMORY = 128 * 1024 * 1024  # what a trial's own process reserves (bytes); it only waits
TEST_STOP_ENV = "CSE_RAY_TEST_STOP_TUNE_AFTER"
"""Test-only hook: `N` makes the driver interrupt the sweep (as Ctrl+C would) once N trials have finished."""

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform")
DEFAULT_SPACE: dict[str, dict] = {
    # Around METHOD.md's defaults (w = 0.3 + 0.05 * epoch, lr 0.01).
    "train_cse.cc_init": {"uniform": [0.1, 0.6]},
    "train_cse.cc_slope": {"uniform": [0.0, 0.1]},
    "train_cse.lr": {"loguniform": [0.003, 0.03]},
}
# Keys a trial cannot meaningfully vary, and why.
_FIXED_KEYS = {
    "tune": "the sweep's own settings",
    "data": "the data set is prepared once, before the sweep, and shared by every trial",
    "train_cam": "the ordinary classifier is trained once, before the sweep",
    "model.backbone": "every trial must use the backbone of the shared classifier",
    "train_cse.classifier": "the classifier is shared by every trial (set it outside tune.space)",
    "infer": "trials do not run inference; the best threshold is searched after the sweep",
    "crf": "trials do not run the CRF; the best alpha is searched after the sweep",
}


# ------------------------------------------------------------------------------------ search space


@dataclass(frozen=True)
class SpaceEntry:
    """One searched key: `kind` is one of SPEC_KINDS, `values` the list (grid/choice) or [lo, hi]."""

    key: str
    kind: str
    values: tuple

    def spec(self) -> dict:
        return {self.kind: list(self.values)}


def parse_space(cfg: Config) -> dict[str, SpaceEntry]:
    """Validate `tune.space` (or the default space when it is empty) without starting Ray.

    Accepts flat dotted keys (`train_cse.lr: {loguniform: [0.01, 0.1]}`) and nested sections, which is
    what the command line override `tune.space.train_cse.lr='{choice: [0.01, 0.05]}'` produces.
    """
    raw = cfg.tune.space or DEFAULT_SPACE
    flat: dict[str, Any] = {}
    _flatten_space(raw, "", flat)
    if not flat:
        raise UserError("config key tune.space: no key to search")
    entries = {}
    for key, spec in flat.items():
        entries[key] = _parse_entry(cfg, key, spec)
    if cfg.tune.search_alg == "optuna":
        for entry in entries.values():
            if entry.kind == "grid":
                raise UserError(f"config key tune.space.{entry.key}: grid is not supported with "
                                "tune.search_alg: optuna (use choice)")
            if entry.kind == "choice" and not all(_is_scalar(v) for v in entry.values):
                raise UserError(f"config key tune.space.{entry.key}: with tune.search_alg: optuna the "
                                "choices must be single values (numbers, strings, booleans)")
    return entries


def _flatten_space(node: Any, prefix: str, flat: dict) -> None:
    """Dotted key -> spec; a mapping under a config *section* is a nested part of the space."""
    if not isinstance(node, dict):
        where = f".{prefix.rstrip('.')}" if prefix else ""
        raise UserError(f"config key tune.space{where}: expected a mapping of dotted config keys to specs "
                        f"such as {{choice: [0.1, 0.3]}}, got {node!r}")
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        is_spec = isinstance(value, dict) and any(kind in value for kind in SPEC_KINDS)
        if isinstance(value, dict) and not is_spec and _is_section(dotted):
            _flatten_space(value, dotted + ".", flat)
        else:
            flat[dotted] = value


def _is_section(key: str) -> bool:
    import typing

    node: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return False
        node = hints[part]
    return dataclasses.is_dataclass(node)


def _parse_entry(cfg: Config, key: str, spec: Any) -> SpaceEntry:
    name = f"tune.space.{key}"
    field_type = _leaf_type(key, name)
    for fixed, why in _FIXED_KEYS.items():
        if key == fixed or key.startswith(fixed + "."):
            raise UserError(f"config key {name}: cannot be searched ({why})")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise UserError(f"config key {name}: expected exactly one of {{grid: [...]}}, {{choice: [...]}}, "
                        f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UserError(f"config key {name}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        for value in values:
            _check_value(cfg, key, value, name)
        return SpaceEntry(key, kind, tuple(values))
    if field_type not in (int, float):
        raise UserError(f"config key {name}: {kind} needs a numeric key; use choice or grid for {key}")
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise UserError(f"config key {name}: {kind} needs two numbers [lo, hi], got {values!r}")
    lo, hi = values
    if field_type is int and not all(float(v).is_integer() for v in values):
        raise UserError(f"config key {name}: {key} is an integer; {kind} needs integer bounds, "
                        f"got {values!r}")
    if not lo < hi:
        raise UserError(f"config key {name}: {kind} needs lo < hi, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise UserError(f"config key {name}: loguniform needs lo > 0, got {values!r}")
    for bound in (lo, hi):
        _check_value(cfg, key, field_type(bound), name)
    return SpaceEntry(key, kind, (field_type(lo), field_type(hi)))


def _leaf_type(key: str, name: str) -> type:
    """The annotated type of a dotted config key; UserError when it is not a key or is a section."""
    import typing

    node: Any = Config
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            raise UserError(f"config key {name}: {key} is not a config key")
        hints = typing.get_type_hints(node)
        if part not in hints:
            known = ", ".join(hints)
            raise UserError(f"config key {name}: unknown key {part!r} (known here: {known})")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise UserError(f"config key {name}: {key} is a section, not a single key")
    return node


def _check_value(cfg: Config, key: str, value: Any, name: str) -> None:
    try:
        with_overrides(cfg, {key: value})
    except UserError as err:
        raise UserError(f"config key {name}: value {value!r} is refused ({err})") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _domain(entry: SpaceEntry):
    """The Ray Tune search-space object of one entry (integers sample integers)."""
    from ray import tune

    if entry.kind == "grid":
        return tune.grid_search(list(entry.values))
    if entry.kind == "choice":
        return tune.choice(list(entry.values))
    lo, hi = entry.values
    if isinstance(lo, int):
        return tune.randint(lo, hi + 1) if entry.kind == "uniform" else tune.lograndint(lo, hi + 1)
    return tune.uniform(lo, hi) if entry.kind == "uniform" else tune.loguniform(lo, hi)


# ------------------------------------------------------------------------------------------ results


@dataclass
class TuneSummary:
    """What `run_tune` found: one dict per trial, the best one, and the post-hoc threshold and alpha."""

    out: str
    trials: list[dict]
    best_trial: str
    best_params: dict
    best_val_miou: float
    best_checkpoint: str
    threshold: float | None
    cam_miou: float | None
    alpha: float | None
    crf_miou: dict[str, float] = field(default_factory=dict)  # alpha (as text) -> mIoU
    best_config: str = ""
    already_finished: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def trial_dir(out: str, trial_id: str) -> str:
    return artifacts.join(out, "trials", trial_id)


def _storage_path(out: str) -> str:
    return artifacts.join(artifacts.absolute(out), "tune")


# -------------------------------------------------------------------------------------- the driver


def run_tune(cfg: Config, out: str) -> TuneSummary:
    """Sweep `tune.space` over train-cse runs, then search the threshold and alpha of the best one."""
    cfg, out = with_absolute_paths(cfg), artifacts.absolute(out)  # trials run in other directories
    space = parse_space(cfg)  # every check on the sweep's own keys happens before Ray starts
    _check_sweep_settings(cfg, space)
    _check_same_sweep(cfg, out)
    finished = _finished_summary(out)
    if finished is not None:
        print(f"tune: already finished in {out} (best trial {finished.best_trial}, val mIoU "
              f"{finished.best_val_miou:.2f}); nothing to do. Best config: {finished.best_config}")
        return finished

    from cse_ray.data.prepare import resolve_data_root
    from cse_ray.runtime import ensure_ray
    from cse_ray.train import MODEL_FILE, RESULT_FILE, stage_path, train_cam

    root = resolve_data_root(cfg, out)
    shared = with_overrides(cfg, {"data.root": root})
    classifier = cfg.train_cse.classifier
    if classifier and not artifacts.exists(classifier):
        raise UserError(f"config key train_cse.classifier: {classifier} not found")
    ensure_ray()
    _check_resources(cfg)
    remove_orphaned_placement_groups()
    if not classifier:
        if not artifacts.exists(stage_path(out, "train_cam", RESULT_FILE)):
            print("tune: training the ordinary classifier once, for every trial")
        train_cam(shared, out)
        classifier = stage_path(out, "train_cam", MODEL_FILE)
    shared = with_overrides(shared, {"train_cse.classifier": classifier})
    artifacts.write_json(artifacts.join(out, SETTINGS_FILE), {"config": to_dict(cfg)})

    results, statuses = _run_sweep(shared, space, out)
    remove_orphaned_placement_groups()
    rows = _trial_rows(results, statuses, space, out, cfg.train_cse.epochs)
    incomplete = [r for r in rows if r["status"] == "INCOMPLETE"]
    if incomplete:
        print(f"tune: interrupted with {len(rows) - len(incomplete)} trials finished; rerun the same "
              f"command to resume (finished trials are not rerun)", file=sys.stderr)
        raise SweepInterrupted(f"{len(incomplete)} trials did not finish")
    artifacts.write_parquet(artifacts.join(out, TRIALS_FILE), _parquet_rows(rows, space))

    ranked = [r for r in rows if r["status"] != "ERROR" and r["best_val_miou"] is not None
              and artifacts.exists(r["checkpoint"])]
    if not ranked:
        print(summary_table(rows, space, None))
        raise RuntimeError(f"tune: no trial produced a checkpoint; see {artifacts.join(out, TRIALS_FILE)}")
    best = max(ranked, key=lambda r: r["best_val_miou"])  # ties: the first trial
    best_cfg = with_overrides(shared, best["params"])
    print(f"tune: best trial {best['trial_id']} (val mIoU {best['best_val_miou']:.2f}); post-hoc search "
          f"of the CAM threshold and CRF alpha on data.val_list")
    posthoc = posthoc_search(best_cfg, best["checkpoint"], artifacts.join(out, "posthoc"))

    final_values: dict[str, Any] = {"infer.threshold": posthoc["threshold"]}
    if posthoc["alpha"] is not None:
        final_values["crf.pseudo_alpha"] = posthoc["alpha"]
    best_config_path = artifacts.join(out, BEST_CONFIG_FILE)
    summary = TuneSummary(
        out=out, trials=rows, best_trial=best["trial_id"], best_params=best["params"],
        best_val_miou=best["best_val_miou"], best_checkpoint=best["checkpoint"],
        threshold=posthoc["threshold"], cam_miou=posthoc["cam_miou"], alpha=posthoc["alpha"],
        crf_miou=posthoc["crf_miou"], best_config=best_config_path,
    )
    artifacts.write_json(artifacts.join(out, SUMMARY_FILE), summary.to_json())
    header = (f"# cse-ray tune: best of {len(rows)} trials ({best['trial_id']}, val CAM mIoU "
              f"{best['best_val_miou']:.2f}); post-hoc threshold {posthoc['threshold']:g}"
              + (f", CRF alpha {posthoc['alpha']:g}" if posthoc["alpha"] is not None else "") + "\n")
    artifacts.write_text(best_config_path, header + dump_yaml(with_overrides(best_cfg, final_values)))
    print(summary_table(rows, space, best["trial_id"]))
    print(f"tune: best config {best_config_path} (run it with: cse-ray train-cse --config "
          f"{best_config_path} --out NEW_RUN)")
    return summary


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial finished (Ctrl+C); the same command resumes it."""


def _check_sweep_settings(cfg: Config, space: dict[str, SpaceEntry]) -> None:
    t = cfg.tune
    if t.scheduler == "asha" and t.grace_period > cfg.train_cse.epochs:
        raise UserError(f"config key tune.grace_period: {t.grace_period} is more than train_cse.epochs="
                        f"{cfg.train_cse.epochs} (ASHA would never stop a trial)")
    if t.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UserError("config key tune.search_alg: optuna is not installed "
                        "(pip install 'cse-ray[optuna]', or use tune.search_alg: random)")


def _finished_summary(out: str) -> TuneSummary | None:
    paths = [artifacts.join(out, name) for name in (TRIALS_FILE, BEST_CONFIG_FILE, SUMMARY_FILE)]
    if not all(artifacts.exists(p) for p in paths):
        return None
    names = {f.name for f in dataclasses.fields(TuneSummary)}
    data = {k: v for k, v in artifacts.read_json(paths[2]).items() if k in names}
    return TuneSummary(**{**data, "already_finished": True})


def _check_same_sweep(cfg: Config, out: str) -> None:
    """Resuming with another config would mix two sweeps in one experiment: refuse it."""
    path = artifacts.join(out, SETTINGS_FILE)
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
    import ray

    total = ray.cluster_resources()
    if os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow
        return
    for key, resource in (("cpus_per_trial", "CPU"), ("gpus_per_trial", "GPU")):
        wanted, have = getattr(cfg.tune, key), total.get(resource, 0)
        if wanted > have + 1e-9:
            raise UserError(f"config key tune.{key}: {wanted:g}, but the Ray cluster has {have:g} "
                            f"{resource}s")


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


def _run_sweep(shared: Config, space: dict[str, SpaceEntry], out: str):
    from ray import tune

    t = shared.tune
    storage = _storage_path(out)
    experiment = artifacts.join(storage, EXPERIMENT_NAME)
    trainable = trial_trainable(shared, out)
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
    tuner = tune.Tuner(
        trainable,
        param_space={key: _domain(entry) for key, entry in space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, search_alg=search_alg,
            num_samples=t.num_samples,
            max_concurrent_trials=None if t.search_alg == "random" else concurrency,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME, storage_path=storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train already retries workers
            callbacks=[TrialLines(shared.train_cse.epochs), TrialScalars(out), StopAfterTrials()],
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


# --------------------------------------------------------------------------------------- one trial


def run_trial(params: dict, *, shared: dict, out: str) -> None:
    """The body of one trial: a train-cse run in OUT/trials/<trial_id>, its epochs reported to Tune."""
    import ray.tune

    from cse_ray.train import FAILED_FILE, RESULT_FILE, fit_stage, stage_path

    cfg = trial_config(from_dict(shared), params)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_out = trial_dir(out, trial_id)
    artifacts.write_text(artifacts.join(trial_out, "config.yaml"), dump_yaml(cfg))
    result_path = stage_path(trial_out, "train_cse", RESULT_FILE)
    if artifacts.exists(result_path):  # finished before the sweep was interrupted: tell Tune again
        summary = artifacts.read_json(result_path)
        for metrics in epoch_metrics(summary["history"]):
            ray.tune.report(metrics)
        return
    try:
        fit_stage("train_cse", cfg, trial_out, callbacks=_TrainControl.callbacks(),
                  resources_per_worker=worker_resources(cfg))
    except Exception:
        if _TrainControl.stopping.is_set():
            return  # Tune stopped this trial (ASHA, or the sweep was interrupted): not a failure
        if artifacts.exists(stage_path(trial_out, "train_cse", FAILED_FILE)):
            return  # the loss diverged: the trial ends with the epochs it had (status DIVERGED)
        raise


def epoch_metrics(history: list[dict]) -> list[dict]:
    """The per-epoch metrics as the Train loop reports them (with the running best), from result.json."""
    best, best_epoch, metrics = -1.0, 0, []
    for record in history:
        if record[METRIC] > best:
            best, best_epoch = record[METRIC], record["epoch"]
        metrics.append({**record, "best_miou": best, "best_epoch": best_epoch})
    return metrics


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
    detached cleaner notices (which needs the state API, absent without the dashboard). So the controller
    sends its handle to the trial through a small queue, and the trial's `cleanup` calls
    `controller.abort()`: workers stopped, placement group removed, before the process goes. (A trial
    stopped while its workers are still starting cannot abort in time: see
    `remove_orphaned_placement_groups`.)
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
    first epoch ends). It uses Ray Train's internal callback interface; without it (another Ray version)
    the handle comes with the first report instead."""
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
    holding a reserved placement group. Ray Train's own cleaner would release it, but only through the
    state API, which needs the Ray dashboard (not started by `cse_ray.runtime.ensure_ray`). A placement
    group's id ends with the id of the job that made it, so only this driver's are touched.
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
    """The Tune trainable: `run_trial` as a function trainable whose `cleanup` aborts its Train run."""
    import functools

    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(functools.partial(run_trial, shared=to_dict(shared), out=artifacts.absolute(out)))

    class SweepTrial(base):
        def cleanup(self):
            _TrainControl.abort()
            super().cleanup()

    return tune.with_resources(SweepTrial, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})


# ------------------------------------------------------------------------------ driver callbacks


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
              f"{best:.2f} ({_params_text(trial.config)})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"tune: trial {trial.trial_id} ERROR ({_params_text(trial.config)}); details in "
              f"{trial.path}", flush=True)


class TrialScalars(TuneCallback):
    """Per-trial TensorBoard scalars by epoch in OUT/tensorboard/tune/<trial_id>, beside the stages' logs."""

    KEYS = (METRIC, "best_miou", "loss", "loss_cls", "loss_erase", "lr", "w", "images_per_s")

    def __init__(self, out: str) -> None:
        directory = artifacts.join(artifacts.absolute(out), "tensorboard", "tune")
        if artifacts.is_uri(directory):  # event files are appended to: they live on local disk
            directory = str(Path(tempfile.gettempdir(), "cse-ray-tensorboard", "tune"))
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
    """Test hook (`CSE_RAY_TEST_STOP_TUNE_AFTER=N`): after N finished trials, interrupt the sweep the way
    Ctrl+C does (Tune's SIGINT handler saves the experiment, stops the running trials and returns).
    The variable is read at each event, so a resumed sweep without it runs to the end."""

    def __init__(self) -> None:
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        limit = int(os.environ.get(TEST_STOP_ENV, "0") or 0)
        if limit and self.finished == limit:
            os.kill(os.getpid(), signal.SIGINT)


# ----------------------------------------------------------------------------------- trial table


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_rows(results, statuses: dict[str, str], space: dict[str, SpaceEntry], out: str,
                epochs: int) -> list[dict]:
    """One dict per trial, from Tune's results and saved statuses, and the trial's own files."""
    from cse_ray.train import FAILED_FILE, MODEL_FILE, stage_path

    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        trial_out = trial_dir(out, trial_id)
        epochs_run = int(metrics.get(TIME_ATTR, 0) or 0)
        saved = statuses.get(trial_id, "PENDING")
        if result.error is not None or saved == "ERROR":
            status = "ERROR"
        elif saved != "TERMINATED":  # still pending or running when the sweep was interrupted
            status = "INCOMPLETE"
        elif artifacts.exists(stage_path(trial_out, "train_cse", FAILED_FILE)):
            status = "DIVERGED"
        elif epochs_run < epochs:
            status = "EARLY_STOPPED"
        else:
            status = "TERMINATED"
        best = _best_reported(result)
        rows.append({
            "trial_id": trial_id,
            "params": {key: (result.config or {}).get(key) for key in space},
            "best_val_miou": best,
            "best_epoch": int(metrics.get("best_epoch", 0) or 0),
            "epochs_run": epochs_run,
            "status": status,
            "error": _first_line(result.error),
            "out_dir": trial_out,
            "checkpoint": stage_path(trial_out, "train_cse", MODEL_FILE),
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _best_reported(result) -> float | None:
    """The best val mIoU a trial reported over all its epochs (the last result may lack it: divergence)."""
    frame = result.metrics_dataframe
    values = []
    if frame is not None and "best_miou" in frame.columns:
        values = [float(v) for v in frame["best_miou"].tolist() if v == v]  # drop NaN
    last = (result.metrics or {}).get("best_miou")
    if last is not None:
        values.append(float(last))
    values = [v for v in values if v >= 0]
    return max(values) if values else None


def _first_line(error: Any) -> str | None:
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def _parquet_rows(rows: list[dict], space: dict[str, SpaceEntry]):
    import pyarrow as pa

    columns: dict[str, list] = {"trial_id": []}
    for key in space:
        columns[key] = []
    for name in ("best_val_miou", "best_epoch", "epochs_run", "status", "error", "out_dir"):
        columns[name] = []
    for row in rows:
        columns["trial_id"].append(row["trial_id"])
        for key in space:
            value = row["params"].get(key)
            columns[key].append(str(value) if isinstance(value, (list, tuple, dict)) else value)
        for name in ("best_val_miou", "best_epoch", "epochs_run", "status", "error", "out_dir"):
            columns[name].append(row[name])
    return pa.table(columns)


def summary_table(rows: list[dict], space: dict[str, SpaceEntry], best_trial: str | None) -> str:
    """The sweep as a plain-text table, the best trial marked with '*'."""
    keys = list(space)
    header = ["", "trial", *keys, "val mIoU", "epochs", "status"]
    lines = [header]
    for row in rows:
        miou = "-" if row["best_val_miou"] is None else f"{row['best_val_miou']:.2f}"
        params = [_fmt(row["params"].get(k)) for k in keys]
        lines.append(["*" if row["trial_id"] == best_trial else "", row["trial_id"], *params, miou,
                      str(row["epochs_run"]), row["status"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# ------------------------------------------------------------------------------ post-hoc search


def posthoc_search(cfg: Config, checkpoint: str, out: str) -> dict:
    """CAMs and CRF maps of one eraser on `data.val_list`; the best background threshold and CRF alpha.

    Both are chosen against the ground truth (as the reference does for its threshold): a known optimistic
    bias, reported as such in the eval reports.
    """
    from cse_ray.crf import crf_rel
    from cse_ray.data.voc import list_path, mask_path, read_list
    from cse_ray.evaluate import write_reports
    from cse_ray.formats import read_label_png
    from cse_ray.infer import load_cams, run_infer
    from cse_ray.metrics import ConfusionSweep

    summary = run_infer(cfg, out, checkpoint=checkpoint, list_name=cfg.data.val_list, write_pseudo=False)
    if summary.failed:
        name, error = next(iter(summary.errors.items()))
        raise RuntimeError(f"post-hoc inference failed on {summary.failed} images (first: {name}: {error})")
    root, sbd = cfg.data.root, cfg.data.sbd_root or None
    names = read_list(list_path(root, cfg.data.val_list))
    alphas = tuple(dict.fromkeys(float(a) for a in cfg.crf.alphas)) if cfg.crf.enabled else ()
    cam_sweep = ConfusionSweep(thresholds(cfg.evaluate))
    crf_sweeps = {alpha: ConfusionSweep(None) for alpha in alphas}
    for name in names:
        gt = read_label_png(mask_path(root, name, sbd))
        cams, classes = load_cams(out, name)
        cam_sweep.add_cams(cams, classes, gt, name=name)
        for alpha, sweep in crf_sweeps.items():
            sweep.add_labels(_read_png(artifacts.join(out, crf_rel(alpha, name))), gt, name=name)
    cam = cam_sweep.result("cam")
    write_reports(cam, artifacts.join(out, "eval_cam.json"))
    crf_miou = {}
    for alpha, sweep in crf_sweeps.items():
        result = sweep.result("label")
        write_reports(result, artifacts.join(out, f"eval_crf_a{alpha:g}.json"))
        crf_miou[f"{alpha:g}"] = result.miou
    best_alpha = max(alphas, key=lambda a: crf_miou[f"{a:g}"]) if alphas else None  # ties: the first
    crf_text = ", ".join(f"alpha {k}: {v:.2f}" for k, v in crf_miou.items())
    print(f"tune: post-hoc on {len(names)} images: CAM mIoU {cam.miou:.2f} at threshold {cam.threshold:g}"
          + (f"; CRF {crf_text}" if crf_text else ""))
    return {"threshold": float(cam.threshold), "cam_miou": cam.miou, "alpha": best_alpha,
            "crf_miou": crf_miou}


def _read_png(path: str):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(artifacts.read_bytes(path))) as image:
        return np.array(image)
