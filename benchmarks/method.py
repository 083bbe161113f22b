"""Benchmark: OC-CSE's effect over several training seeds, next to its w = 0 control.

    .venv/bin/python benchmarks/method.py --config configs/demo.yaml --out runs/method --seeds 0 1 2

For every seed s (the training seeds `train_cam.seed` and `train_cse.seed`; the synthetic dataset is
the same for all seeds unless `--vary-data`, which also sets `data.synth.seed = s`):

1. `run_pipeline` of the config into OUT/seed{s}: ordinary classifier, eraser, CAMs, CRF, report;
2. the control: the same eraser training with `train_cse.cc_init=0 train_cse.cc_slope=0` from the
   same classifier: the eraser starts from it and trains the same epochs with the same schedule, only
   without the erasing loss. A gain the control also shows comes from the extra training, not from
   erasing. With `pipeline.control: true` (the demo's config) the pipeline of step 1 trains and
   evaluates it already (OUT/seed{s}/control); otherwise it runs as its own pipeline in
   OUT/seed{s}_control with `train_cse.classifier=OUT/seed{s}/train_cam/model.pth` (CRF off).

Prints one row per seed (ordinary CAM, OC-CSE CAM, OC-CSE + CRF, control CAM, the two gains) and the
mean and standard deviation over the seeds, and writes them to OUT/method.json. Every run resumes:
rerunning the command skips finished pipelines and reports the wall times they took when they ran
(OUT/<run>.seconds.json). Thresholds are chosen on the validation split's ground truth by the
method's own threshold search, identically for all three models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from cse_ray.config import load_config, with_overrides

COLUMNS = ("ordinary", "cse", "cse_crf", "control", "gain", "gain_over_control")


def timed_pipeline(cfg, run_dir: Path) -> tuple[dict, float]:
    """run_pipeline and its wall time. A run that was already finished keeps the time it took when it
    ran (OUT/<run>.seconds.json), so rerunning the benchmark to extend it does not report ~0 s."""
    from cse_ray import artifacts
    from cse_ray.pipeline import run_pipeline

    timing = run_dir.with_name(run_dir.name + ".seconds.json")
    finished = (run_dir / "report.json").exists()
    start = time.perf_counter()
    report = run_pipeline(cfg, str(run_dir))
    seconds = time.perf_counter() - start
    if finished and timing.exists():
        return report, json.loads(timing.read_text())["seconds"]
    if not finished:
        artifacts.write_json(str(timing), {"seconds": round(seconds, 1)})
    return report, seconds


def seed_runs(config: str, out: Path, seed: int, vary_data: bool, overrides: list[str]) -> dict:
    """The pipeline and its control for one seed; returns the row of numbers (percent)."""
    cfg = load_config(config, overrides)
    data_seed = seed if vary_data else cfg.data.synth.seed
    shared_data = out / (f"data_seed{data_seed}" if cfg.data.synth.enabled else "")
    values = {"train_cam.seed": seed, "train_cse.seed": seed, "data.synth.seed": data_seed}
    if cfg.data.synth.enabled and not cfg.data.root:
        values["data.root"] = str(shared_data)  # one dataset folder shared by the runs that use it
    cfg = with_overrides(cfg, values)
    main_dir = out / f"seed{seed}"
    report, main_seconds = timed_pipeline(cfg, main_dir)
    if report.get("control_cam_miou") is not None:  # pipeline.control: the pipeline trained it already
        control, control_seconds = {"cse_cam_miou": report["control_cam_miou"],
                                    "best_threshold": report["control_threshold"]}, None
    else:
        control_cfg = with_overrides(cfg, {
            "train_cse.cc_init": 0.0, "train_cse.cc_slope": 0.0,
            "train_cse.classifier": str(main_dir / "train_cam" / "model.pth"),
            "crf.enabled": False, "infer.overlays": 0,
        })
        control, control_seconds = timed_pipeline(control_cfg, out / f"seed{seed}_control")
        if abs(control["ordinary_cam_miou"] - report["ordinary_cam_miou"]) > 1e-6:
            raise RuntimeError(f"seed {seed}: the control's classifier is not the pipeline's "
                               f"({control['ordinary_cam_miou']} vs {report['ordinary_cam_miou']})")
    return {
        "seed": seed, "data_seed": data_seed,
        "ordinary": report["ordinary_cam_miou"], "cse": report["cse_cam_miou"],
        "cse_crf": report["cse_crf_miou"], "control": control["cse_cam_miou"],
        "gain": report["cse_cam_miou"] - report["ordinary_cam_miou"],
        "gain_over_control": report["cse_cam_miou"] - control["cse_cam_miou"],
        "ordinary_threshold": report["ordinary_threshold"], "cse_threshold": report["best_threshold"],
        "control_threshold": control["best_threshold"],
        "seconds": round(main_seconds, 1),
        "control_seconds": None if control_seconds is None else round(control_seconds, 1),
    }


def summarise(rows: list[dict]) -> dict:
    """Mean and (sample) standard deviation of every column over the seeds."""
    summary = {}
    for column in COLUMNS:
        values = [row[column] for row in rows if row[column] is not None]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[column] = {"mean": statistics.fmean(values), "std": spread}
    return summary


def table(rows: list[dict], summary: dict) -> str:
    header = ("seed", "ordinary", "OC-CSE", "OC-CSE+CRF", "control w=0", "gain", "gain vs control")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["seed"])] + [
            "-" if row[c] is None else (f"{row[c]:+.2f}" if c.startswith("gain") else f"{row[c]:.2f}")
            for c in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean ± std"] + [
        f"{summary[c]['mean']:+.2f} ± {summary[c]['std']:.2f}" if c.startswith("gain")
        else f"{summary[c]['mean']:.2f} ± {summary[c]['std']:.2f}" if c in summary else "-"
        for c in COLUMNS
    ]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--vary-data", action="store_true",
                        help="also use data.synth.seed = seed (a new synthetic dataset per seed)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    rows = []
    for seed in args.seeds:
        rows.append(seed_runs(args.config, out, seed, args.vary_data, args.overrides))
        print(f"seed {seed}: {json.dumps(rows[-1])}", flush=True)
    summary = summarise(rows)
    from cse_ray import artifacts

    artifacts.write_json(str(out / "method.json"), {
        "config": args.config, "overrides": args.overrides, "vary_data": args.vary_data,
        "rows": rows, "summary": summary,
    })
    print(table(rows, summary))


if __name__ == "__main__":
    main()
