"""What a sweep reports and leaves: per-epoch metrics, one row per trial, trials.parquet, the table.

No Ray needed: rows are built from the results Tune returns (duck-typed: `metrics`, `config`, `path`,
`error`, `metrics_dataframe`) and the trials' own files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cse_ray import artifacts
from cse_ray.layout import RunLayout

METRIC = "val_miou"  # validation CAM mIoU (percent) after each epoch, reported by the Train workers
TIME_ATTR = "epoch"  # our own epoch counter: it survives trial restarts, unlike training_iteration
_TABLE_FIELDS = ("best_val_miou", "best_epoch", "epochs_run", "status", "error", "out_dir")


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

    @classmethod
    def read(cls, path: str) -> TuneSummary:
        """A finished sweep's summary, from its tune_summary.json."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in artifacts.read_json(path).items() if k in names}
        return cls(**{**data, "already_finished": True})


def epoch_metrics(history: list[dict]) -> list[dict]:
    """The per-epoch metrics as the Train loop reports them (with the running best), from result.json."""
    best, best_epoch, metrics = -1.0, 0, []
    for record in history:
        if record[METRIC] > best:
            best, best_epoch = record[METRIC], record["epoch"]
        metrics.append({**record, "best_miou": best, "best_epoch": best_epoch})
    return metrics


def trial_rows(results, statuses: dict[str, str], keys, out: str, epochs: int) -> list[dict]:
    """One dict per trial, from Tune's results, the statuses Tune saved, and the trial's own files.

    `keys` are the searched config keys; `epochs` is `train_cse.epochs` (fewer run: EARLY_STOPPED).
    """
    layout = RunLayout.at(out)
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        trial = layout.trial(trial_id)
        stage = trial.stage("train_cse")
        epochs_run = int(metrics.get(TIME_ATTR, 0) or 0)
        saved = statuses.get(trial_id, "PENDING")
        if result.error is not None or saved == "ERROR":
            status = "ERROR"
        elif saved != "TERMINATED":  # still pending or running when the sweep was interrupted
            status = "INCOMPLETE"
        elif artifacts.exists(stage.failed):
            status = "DIVERGED"
        elif epochs_run < epochs:
            status = "EARLY_STOPPED"
        else:
            status = "TERMINATED"
        rows.append({
            "trial_id": trial_id,
            "params": {key: (result.config or {}).get(key) for key in keys},
            "best_val_miou": best_reported(result),
            "best_epoch": int(metrics.get("best_epoch", 0) or 0),
            "epochs_run": epochs_run,
            "status": status,
            "error": last_error_line(result.error),
            "out_dir": trial.root,
            "checkpoint": stage.model,
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def best_reported(result) -> float | None:
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


def last_error_line(error: Any) -> str | None:
    """The last non-blank line of a trial's error (at most 500 characters), or None without an error.

    The last line on purpose (unlike `errors.short_error`'s first): Tune wraps a trial's exception in
    a traceback text whose last line is the exception that ended the trial.
    """
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def trials_table(rows: list[dict], keys):
    """trials.parquet's table: trial_id, one column per searched key, then `_TABLE_FIELDS`.

    A searched value that is a list or mapping (a `choice` of crops, say) is stored as its text.
    """
    import pyarrow as pa

    records = []
    for row in rows:
        record: dict[str, Any] = {"trial_id": row["trial_id"]}
        for key in keys:
            value = row["params"].get(key)
            record[key] = str(value) if isinstance(value, (list, tuple, dict)) else value
        record.update({name: row[name] for name in _TABLE_FIELDS})
        records.append(record)
    return pa.Table.from_pylist(records)


def summary_table(rows: list[dict], keys, best_trial: str | None) -> str:
    """The sweep as a plain-text table, the best trial marked with '*'."""
    keys = list(keys)
    header = ["", "trial", *keys, "val mIoU", "epochs", "status"]
    lines = [header]
    for row in rows:
        miou = "-" if row["best_val_miou"] is None else f"{row['best_val_miou']:.2f}"
        params = [fmt(row["params"].get(k)) for k in keys]
        lines.append(["*" if row["trial_id"] == best_trial else "", row["trial_id"], *params, miou,
                      str(row["epochs_run"]), row["status"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def params_text(params: dict) -> str:
    """`key=value, ...` of one trial's sampled values (floats to 4 significant digits)."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
