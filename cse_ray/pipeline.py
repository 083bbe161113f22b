"""`cse-ray pipeline`: the whole chain as one run, each stage skipped when its outputs are complete.

    data (synthetic when asked) -> train-cam -> train-cse -> infer (ordinary CAMs on val;
    OC-CSE CAMs + CRF on the inference list and val) -> evaluate -> pseudo-labels -> report

The run directory:

    OUT/train_cam/, OUT/train_cse/     the two networks (see cse_ray.train)
    OUT/ordinary/cams/                 the ordinary classifier's CAMs on the validation list
    OUT/cams/, OUT/crf/a{alpha}/       the eraser's CAMs and CRF label maps
    OUT/pseudo_labels/NAME.png         from the CRF at the best alpha (or the CAM at the best threshold)
    OUT/manifest.parquet               one row per inferred image
    OUT/eval/*.json|md|png|parquet     every evaluation, with curves
    OUT/report.json, OUT/report.md     the summary (report.json is written last: the run is finished)
    OUT/contact_sheet.png, OUT/tensorboard/
"""

from __future__ import annotations

from pathlib import Path

from cse_ray import artifacts
from cse_ray.config import Config, thresholds, with_absolute_paths, with_overrides
from cse_ray.errors import UserError

EVAL_DIR = "eval"
ORDINARY_DIR = "ordinary"
VAL_DIR = "val"


def run_pipeline(cfg: Config, out: str) -> dict:
    """Run (or resume) every stage and return report.json's content."""
    cfg, out = with_absolute_paths(cfg), artifacts.absolute(out)  # Ray workers run in other directories
    from cse_ray.data.prepare import load_split, resolve_data_root
    from cse_ray.infer import run_infer, write_pseudo_labels
    from cse_ray.layout import RunLayout
    from cse_ray.models import check_backbone
    from cse_ray.report import REPORT_FILE, summary_table
    from cse_ray.train import classifier_checkpoint, train_cam, train_cse

    report_path = artifacts.join(out, REPORT_FILE)
    if artifacts.exists(report_path):
        report = artifacts.read_json(report_path)
        print(f"pipeline: already finished in {out}\n{summary_table(report)}")
        return report
    check_backbone(cfg.model.backbone)
    root = resolve_data_root(cfg, out)
    cfg = with_overrides(cfg, {"data.root": root})  # later stages reuse it as is
    val = load_split(cfg, root, "val_list", need_masks=True)
    infer_split = load_split(cfg, root, "infer_list")

    if not cfg.train_cse.classifier:
        train_cam(cfg, out)
    train_cse(cfg, out)
    classifier = classifier_checkpoint(cfg, out)
    eraser = RunLayout.at(out).stage("train_cse").model

    # The ordinary classifier's CAMs on val (no CRF), in a folder of their own.
    ordinary_out = artifacts.join(out, ORDINARY_DIR)
    ordinary_cfg = with_overrides(cfg, {"crf.enabled": False, "infer.overlays": 0, "infer.save_seed": False})
    run_infer(ordinary_cfg, ordinary_out, checkpoint=classifier, list_name=cfg.data.val_list,
              write_pseudo=False)
    # The eraser's CAMs and CRF on the inference list, and on val when that is another list.
    run_infer(cfg, out, checkpoint=eraser, list_name=cfg.data.infer_list, write_pseudo=False)
    val_out = out
    if set(val.names) - set(infer_split.names):
        val_out = artifacts.join(out, VAL_DIR)
        run_infer(cfg, val_out, checkpoint=eraser, list_name=cfg.data.val_list, write_pseudo=False)

    results = evaluate_run(cfg, out, root, val.names, ordinary_out, val_out)
    source, value = _pseudo_choice(cfg, results)
    written = write_pseudo_labels(out, list(infer_split.names), source, value, cfg)
    if written.missing:
        raise RuntimeError(f"pseudo-labels: {written.missing} images have no stored CAM or CRF output")
    return finish(cfg, out, root, val.names, results, ordinary_out, val_out, source, value,
                  len(infer_split.names))


def evaluate_run(cfg: Config, out: str, root: str, val_names, ordinary_out: str, val_out: str):
    """Ordinary CAMs, OC-CSE CAMs and OC-CSE + CRF (every alpha) on the validation list."""
    from cse_ray.crf import alpha_dir
    from cse_ray.report import PipelineResults

    gt_dir = _gt_dir(cfg, root)
    grid = thresholds(cfg.evaluate)
    log_dir = _tensorboard_dir(out)
    ordinary = _evaluate_once(out, "ordinary_cam", artifacts.join(ordinary_out, "cams"), gt_dir, val_names,
                              "cam", grid, log_dir)
    cse = _evaluate_once(out, "cse_cam", artifacts.join(val_out, "cams"), gt_dir, val_names, "cam", grid,
                         log_dir)
    crf = {}
    if cfg.crf.enabled:
        for alpha in cfg.crf.alphas:
            crf_dir = artifacts.join(val_out, "crf", alpha_dir(alpha))
            crf[alpha] = _evaluate_once(out, f"cse_crf_a{alpha:g}", crf_dir, gt_dir, val_names, "label", None,
                                        log_dir)
    return PipelineResults(ordinary, cse, crf, 0, "", 0.0)


def _evaluate_once(out: str, stem: str, pred_dir: str, gt_dir: str, names, task: str, grid, log_dir: str):
    """Evaluate and write the reports. Cheap (one pass over the files), so a rerun recomputes it."""
    from cse_ray.evaluate import evaluate, write_reports

    result = evaluate(pred_dir, gt_dir, list(names), task=task, thresholds=grid)
    write_reports(result, artifacts.join(out, EVAL_DIR, f"{stem}.json"),
                  log_dir=str(Path(log_dir, stem)) if log_dir else None)
    return result


def _pseudo_choice(cfg: Config, results) -> tuple[str, float]:
    """Where pseudo-labels come from: the configured alpha/threshold, else the best one on val."""
    if cfg.crf.pseudo_from == "crf" and cfg.crf.enabled:
        alpha = cfg.crf.pseudo_alpha if cfg.crf.pseudo_alpha >= 0 else results.best_alpha
        return "crf", float(alpha)
    threshold = cfg.infer.threshold if cfg.infer.threshold >= 0 else results.cse_cam.threshold
    return "cam", float(threshold)


def finish(cfg: Config, out: str, root: str, val_names, results, ordinary_out: str, val_out: str,
           source: str, value: float, num_pseudo: int) -> dict:
    from dataclasses import replace

    from cse_ray.crf import alpha_dir
    from cse_ray.report import report_dict, summary_table, write_contact_sheet, write_report

    results = replace(results, num_pseudo_labels=num_pseudo, pseudo_source=source, pseudo_value=value)
    best_alpha = results.best_alpha
    crf_dir = artifacts.join(val_out, "crf", alpha_dir(best_alpha)) if best_alpha is not None else None
    write_contact_sheet(out, root, list(val_names), ordinary_out, val_out, crf_dir, _gt_dir(cfg, root))
    report = report_dict(results, out)
    write_report(report, out)
    print(summary_table(report))
    return report


def _gt_dir(cfg: Config, root: str) -> str:
    if cfg.data.sbd_root and not Path(root, "SegmentationClass").is_dir():
        return str(Path(cfg.data.sbd_root, "SegmentationClassAug"))
    gt = Path(root, "SegmentationClass")
    if not gt.is_dir():
        raise UserError(f"config key data.root: {root} has no SegmentationClass folder to evaluate against")
    return str(gt)


def _tensorboard_dir(out: str) -> str | None:
    return None if artifacts.is_uri(out) else str(Path(out, "tensorboard", "eval"))
