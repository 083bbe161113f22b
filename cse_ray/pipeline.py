"""`cse-ray pipeline`: the whole chain as one run, each stage skipped when its outputs are complete.

    data (synthetic when asked)
      -> train-cam: the ordinary classifier (unless train_cse.classifier gives one)
      -> train-cse: the eraser against it          [-> the w = 0 control, when pipeline.control]
      -> infer: CAMs of the classifier (and control) on val; the eraser's CAMs + CRF (every alpha) on
         val, which chooses the pseudo-labels' alpha/threshold; the inference list, when it is another,
         with the CRF at that alpha only
      [-> pipeline.rw: confident labels on the affinity training list (from the inference list's own
          CRF maps when it is that list), train-aff, the random walk of val, and of the training list
          when the segmentation network learns from it (train_seg.labels: rw)]
      -> evaluate every model on val -> pseudo-labels of the inference list at the chosen alpha/threshold
      [-> pipeline.seg: train-seg on the pseudo-labels (train_seg.labels: the walk's or pseudo_labels/),
          cse-ray predict on val]
      -> report

Every path is `cse_ray.layout.RunLayout`'s; report.json is written last, so it marks a finished run.
"""

from __future__ import annotations

from pathlib import Path

from cse_ray import artifacts
from cse_ray.config import Config, save_run_config, thresholds, with_absolute_paths, with_overrides
from cse_ray.errors import UserError
from cse_ray.layout import InferLayout, RunLayout

CAMS_ONLY = {"crf.enabled": False, "infer.overlays": 0, "infer.save_seed": False}


def run_pipeline(cfg: Config, out: str) -> dict:
    """Run (or resume) every stage and return report.json's content."""
    from cse_ray.data.prepare import load_split, resolve_data_root
    from cse_ray.infer import run_infer, write_pseudo_labels
    from cse_ray.models import check_backbone
    from cse_ray.report import summary_table
    from cse_ray.train import train_cam, train_cse

    cfg, run = with_absolute_paths(cfg), RunLayout.at(out)  # Ray workers run in other directories
    if artifacts.exists(run.report_json):
        report = artifacts.read_json(run.report_json)
        print(f"pipeline: already finished in {run.root}\n{summary_table(report)}")
        return report
    check_backbone(cfg.model.backbone)
    root = resolve_data_root(cfg, run.root)
    cfg = with_overrides(cfg, {"data.root": root})  # later stages reuse it as is
    val = load_split(cfg, root, "val_list", need_masks=True)
    infer_split = load_split(cfg, root, "infer_list")
    if cfg.pipeline.seg:
        seg_overrides(cfg, run)  # refuses an impossible label source before any training
    save_run_config(cfg, run.root)
    _check_gpus(cfg)

    if not cfg.train_cse.classifier:
        train_cam(cfg, run.root)
    classifier = cfg.train_cse.classifier or run.stage("train_cam").model
    train_cse(cfg, run.root)
    eraser = run.stage("train_cse").model
    if cfg.pipeline.control:
        train_cse(control_config(cfg, classifier), run.control.root)

    cams_only = with_overrides(cfg, CAMS_ONLY)
    run_infer(cams_only, run.ordinary.root, checkpoint=classifier, list_name=cfg.data.val_list,
              write_pseudo=False)
    if cfg.pipeline.control:
        run_infer(cams_only, run.control.root, checkpoint=run.control.stage("train_cse").model,
                  list_name=cfg.data.val_list, write_pseudo=False)
    if set(val.names) - set(infer_split.names):
        # val is another list: its outputs at every alpha choose the pseudo-labels' alpha (or threshold),
        # then the inference list gets the CRF at that alpha only
        val_out = run.val
        run_infer(cfg, val_out.root, checkpoint=eraser, list_name=cfg.data.val_list, write_pseudo=False)
        source, value, chosen_from = pseudo_choice(cfg, run, root, val.names, val_out)
        run_infer(with_confident_alphas(cfg, only_pseudo_source(cfg, source, value)), run.root,
                  checkpoint=eraser, list_name=cfg.data.infer_list, write_pseudo=False)
    else:
        val_out = run.infer
        run_infer(with_confident_alphas(cfg, cfg), run.root, checkpoint=eraser, list_name=cfg.data.infer_list,
                  write_pseudo=False)
        source, value, chosen_from = pseudo_choice(cfg, run, root, val.names, val_out)
    if cfg.pipeline.rw:
        random_walk_stage(cfg, run, eraser, val_out)

    results = evaluate_run(cfg, run, root, val.names, val_out, evaluated=chosen_from)
    written = write_pseudo_labels(run.root, list(infer_split.names), source, value, cfg)
    if written.missing:
        raise RuntimeError(f"pseudo-labels: {written.missing} images have no stored CAM or CRF output")
    if cfg.pipeline.seg:
        results = segmentation_stage(cfg, run, root, val.names, results)
    return finish(cfg, run, root, val.names, results, val_out, source, value, len(infer_split.names))


def _check_gpus(cfg: Config) -> None:
    """`use_gpu: true` of any stage that will run, refused before the first training starts."""
    from cse_ray.runtime import check_use_gpu, ensure_ray

    stages = ("train_cse", "infer") if cfg.train_cse.classifier else ("train_cam", "train_cse", "infer")
    stages += ("train_aff", "rw") if cfg.pipeline.rw else ()
    stages += ("train_seg", "predict") if cfg.pipeline.seg else ()
    if any(getattr(cfg, stage).use_gpu == "true" for stage in stages):
        ensure_ray()
        check_use_gpu({f"{stage}.use_gpu": getattr(cfg, stage).use_gpu for stage in stages})


def random_walk_stage(cfg: Config, run: RunLayout, eraser: str, val_out: InferLayout) -> None:
    """psa's refinement of the eraser's CAMs: confident labels on the affinity training list,
    AffinityNet on Ray Train, then the random walk of the validation images and, when the segmentation
    network learns from them (train_seg.labels: rw), of the training images (the CAMs the confident
    labels came from)."""
    from cse_ray.infer import run_rw, write_confident_labels
    from cse_ray.train import train_aff

    shared = _shares_inference(cfg)
    write_confident_labels(cfg, run.root, checkpoint=eraser, crf_from=run.infer.root if shared else None,
                           progress=False)
    train_aff(cfg, run.root)
    affinity = run.stage("train_aff").model
    walks = [(val_out, cfg.data.val_list)]
    if _seg_learns_from_walk(cfg):
        walks.insert(0, (_training_walk(cfg, run), _affinity_list(cfg)))
    for folder, names in walks:
        summary = run_rw(cfg, folder.root, checkpoint=affinity, list_name=names, progress=False)
        if summary.failed:
            raise RuntimeError(f"rw: {summary.failed} images of {names} failed: {summary.errors}")


def _affinity_list(cfg: Config) -> str:
    """The images AffinityNet learns from, which get confident labels and the training walk."""
    return cfg.rw.train_list or cfg.data.train_list


def _shares_inference(cfg: Config) -> bool:
    """The affinity list is the inference list: its inference also makes the two confident CRF maps."""
    return cfg.pipeline.rw and _affinity_list(cfg) == cfg.data.infer_list


def _seg_learns_from_walk(cfg: Config) -> bool:
    """The segmentation network's labels are the training images' walk (train_seg.labels: rw, no
    train_seg.labels_dir of its own), so the training list must be walked."""
    return cfg.pipeline.seg and not cfg.train_seg.labels_dir and cfg.train_seg.labels == "rw"


def _training_walk(cfg: Config, run: RunLayout) -> InferLayout:
    """The folder whose CAMs the training images' walk refines (and where its label maps go)."""
    return run.infer if _shares_inference(cfg) else run.aff_labels


def with_confident_alphas(cfg: Config, infer_cfg: Config) -> Config:
    """The inference list's settings, plus the CRF at rw.low_alpha and rw.high_alpha when the confident
    labels come from it (one CAM pass over the training images instead of two)."""
    from cse_ray.infer.confident import confident_config

    if not _shares_inference(cfg):
        return infer_cfg
    low, high = confident_config(cfg).crf.alphas  # refuses low >= high
    alphas = infer_cfg.crf.alphas if infer_cfg.crf.enabled else []
    return with_overrides(infer_cfg, {"crf.enabled": True, "crf.alphas": sorted({*alphas, low, high})})


def segmentation_stage(cfg: Config, run: RunLayout, root: str, val_names, results):
    """The segmentation network on the pseudo-labels, then `cse-ray predict` on the validation list
    and its evaluation: `seg_miou` is computed from exactly the PNGs predict writes."""
    from dataclasses import replace

    from cse_ray.infer import run_predict
    from cse_ray.train import train_seg

    seg_cfg = with_overrides(cfg, seg_overrides(cfg, run))
    train_seg(seg_cfg, run.root)
    summary = run_predict(seg_cfg, run.seg.root, checkpoint=run.stage("train_seg").model,
                          names=list(val_names), root=root, progress=False)
    if summary.failed:
        raise RuntimeError(f"predict: {summary.failed} validation images failed: {summary.errors}")
    seg = _evaluate_once(cfg, run, root, val_names, "seg", run.seg.root, "label")
    return replace(results, seg=seg)


def seg_overrides(cfg: Config, run: RunLayout) -> dict:
    """Where the pipeline's segmentation network finds its labels and images (train_seg.labels)."""
    t = cfg.train_seg
    if _seg_learns_from_walk(cfg):
        if not cfg.pipeline.rw:
            raise UserError("config key train_seg.labels: rw, but pipeline.rw is false (no random walk "
                            "runs); turn it on, or use train_seg.labels=pseudo or train_seg.labels_dir")
        return {"train_seg.labels_dir": _training_walk(cfg, run).rw_dir,
                "train_seg.train_list": _affinity_list(cfg)}
    if t.labels_dir:
        return {}
    return {"train_seg.labels_dir": run.infer.pseudo_dir,
            "train_seg.train_list": t.train_list or cfg.data.infer_list}


def control_config(cfg: Config, classifier: str) -> Config:
    """The control: the same eraser training from the same classifier, without the erasing loss."""
    return with_overrides(cfg, {"train_cse.cc_init": 0.0, "train_cse.cc_slope": 0.0,
                                "train_cse.classifier": classifier})


def evaluate_run(cfg: Config, run: RunLayout, root: str, val_names, val_out: InferLayout,
                 ordinary: InferLayout | None = None, evaluated: dict | None = None):
    """Ordinary CAMs, OC-CSE CAMs, OC-CSE + CRF (every alpha) and the control on the validation list.

    Evaluation is one cheap pass over the files, so a rerun recomputes it rather than trusting a
    stale report. `evaluated`: results this run already computed (`pseudo_choice`'s), by file stem.
    """
    from cse_ray.report import PipelineResults

    def once(stem: str, pred_dir: str, task: str):
        if evaluated and stem in evaluated:
            return evaluated[stem]
        return _evaluate_once(cfg, run, root, val_names, stem, pred_dir, task)

    ordinary_cam = once("ordinary_cam", (ordinary or run.ordinary).cams_dir, "cam")
    cse_cam = once("cse_cam", val_out.cams_dir, "cam")
    crf = {alpha: once(f"cse_crf_a{alpha:g}", val_out.crf_dir(alpha), "label")
           for alpha in (cfg.crf.alphas if cfg.crf.enabled else ())}
    control = once("control_cam", run.control.infer.cams_dir, "cam") if cfg.pipeline.control else None
    rw = once("rw", val_out.rw_dir, "label") if cfg.pipeline.rw else None
    return PipelineResults(ordinary_cam, cse_cam, crf, control, rw)


def _evaluate_once(cfg: Config, run: RunLayout, root: str, val_names, stem: str, pred_dir: str, task: str):
    """One evaluation on the validation list, written to RUN/eval/STEM.* and TensorBoard."""
    from cse_ray.evaluate import evaluate, write_reports

    result = evaluate(pred_dir, _gt_dir(cfg, root), list(val_names), task=task,
                      thresholds=thresholds(cfg.evaluate) if task == "cam" else None, labels=cfg.data.labels)
    write_reports(result, run.eval_json(stem), log_dir=str(Path(run.tensorboard("eval"), stem)))
    return result


def pseudo_choice(cfg: Config, run: RunLayout, root: str, val_names,
                  val_out: InferLayout) -> tuple[str, float, dict]:
    """Where pseudo-labels come from: the configured alpha/threshold, else the best one on val (the
    same evaluation and `metrics.best_alpha` rule that report.json shows afterwards). Also returns the
    evaluations it made, by file stem, for `evaluate_run` to reuse."""
    from cse_ray.metrics import best_alpha

    if cfg.crf.pseudo_from == "crf" and cfg.crf.enabled:
        if cfg.crf.pseudo_alpha >= 0:
            return "crf", float(cfg.crf.pseudo_alpha), {}
        crf = {alpha: _evaluate_once(cfg, run, root, val_names, f"cse_crf_a{alpha:g}", val_out.crf_dir(alpha),
                                     "label") for alpha in cfg.crf.alphas}
        chosen = best_alpha({alpha: result.miou for alpha, result in crf.items()})
        return "crf", float(chosen), {f"cse_crf_a{alpha:g}": result for alpha, result in crf.items()}
    if cfg.infer.threshold >= 0:
        return "cam", float(cfg.infer.threshold), {}
    cam = _evaluate_once(cfg, run, root, val_names, "cse_cam", val_out.cams_dir, "cam")
    return "cam", float(cam.threshold), {"cse_cam": cam}


def only_pseudo_source(cfg: Config, source: str, value: float) -> Config:
    """The inference list needs the CRF at the chosen alpha only (none for CAM-threshold labels)."""
    if source == "crf":
        return with_overrides(cfg, {"crf.alphas": [value]})
    return with_overrides(cfg, {"crf.enabled": False})


def finish(cfg: Config, run: RunLayout, root: str, val_names, results, val_out: InferLayout,
           source: str, value: float, num_pseudo: int) -> dict:
    """The contact sheet, report.md and, last, report.json; prints the summary table."""
    from cse_ray.report import report_dict, summary_table, write_contact_sheet, write_report

    best_alpha = results.best_alpha
    control = run.control.infer.root if results.control_cam is not None else None
    columns: dict[str, tuple[str, ...]] = {"ordinary CAM": ("cam", run.ordinary.root)}
    if control:
        columns["control CAM (w = 0)"] = ("cam", control)
    columns["OC-CSE CAM"] = ("cam", val_out.root)
    # Where erasing moved the CAM: against the control when there is one.
    columns["OC-CSE - control" if control else "OC-CSE - ordinary"] = (
        "gain", val_out.root, control or run.ordinary.root)
    if best_alpha is not None:
        columns["OC-CSE + CRF"] = ("label", val_out.crf_dir(best_alpha))
    if results.rw is not None:
        columns["OC-CSE + RW"] = ("label", val_out.rw_dir)
    if results.seg is not None:
        columns["segmentation network"] = ("label", run.seg.root)
    write_contact_sheet(run, root, list(val_names), columns, _gt_dir(cfg, root))
    report = report_dict(results, run.root, num_pseudo, source, value)
    if results.seg is not None:
        report["seg_labels"] = cfg.train_seg.labels_dir or cfg.train_seg.labels
    run.sync_tensorboard("eval", final=True)
    write_report(report, run)
    print(summary_table(report))
    return report


def _gt_dir(cfg: Config, root: str) -> str:
    if cfg.data.sbd_root and not Path(root, "SegmentationClass").is_dir():
        return str(Path(cfg.data.sbd_root, "SegmentationClassAug"))
    gt = Path(root, "SegmentationClass")
    if not gt.is_dir():
        raise UserError(f"config key data.root: {root} has no SegmentationClass folder to evaluate against")
    return str(gt)
