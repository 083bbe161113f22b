"""The pipeline's final report: report.json (INTERFACE.md), report.md, the printed table, a contact sheet.

Pure functions of what earlier stages stored; writing goes through `cse_ray.artifacts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cse_ray import artifacts
from cse_ray.layout import RunLayout
from cse_ray.metrics import EvalResult, best_alpha

CONTACT_SHEET_IMAGES = 12


@dataclass(frozen=True)
class PipelineResults:
    """The pipeline's evaluations on the validation list."""

    ordinary_cam: EvalResult
    cse_cam: EvalResult
    cse_crf: dict[float, EvalResult]  # alpha -> label evaluation
    control_cam: EvalResult | None = None  # the w = 0 control, when the config asks for it
    rw: EvalResult | None = None  # the random walk's label maps, when pipeline.rw
    seg: EvalResult | None = None  # the segmentation network's predictions, when pipeline.seg

    @property
    def best_alpha(self) -> float | None:
        return best_alpha({alpha: result.miou for alpha, result in self.cse_crf.items()})


def report_dict(results: PipelineResults, out: str, num_pseudo: int, source: str, value: float) -> dict:
    """INTERFACE.md's report keys (percent), then details: per-alpha CRF, thresholds, file locations."""
    best = results.best_alpha
    report = {
        "ordinary_cam_miou": round(results.ordinary_cam.miou, 3),
        "cse_cam_miou": round(results.cse_cam.miou, 3),
        "cse_crf_miou": round(results.cse_crf[best].miou, 3) if best is not None else None,
        "best_threshold": results.cse_cam.threshold,
        "best_alpha": best,
    }
    if results.control_cam is not None:
        report["control_cam_miou"] = round(results.control_cam.miou, 3)
        report["control_threshold"] = results.control_cam.threshold
        report["gain_over_control"] = round(results.cse_cam.miou - results.control_cam.miou, 3)
    if results.rw is not None:
        report["rw_miou"] = round(results.rw.miou, 3)
    if results.seg is not None:
        report["seg_miou"] = round(results.seg.miou, 3)
        report["seg_per_class"] = {name: round(iou, 3) for name, iou in results.seg.per_class.items()}
    report.update({
        "ordinary_threshold": results.ordinary_cam.threshold,
        "gain": round(results.cse_cam.miou - results.ordinary_cam.miou, 3),
        "crf_miou_by_alpha": {f"{a:g}": round(r.miou, 3) for a, r in sorted(results.cse_crf.items())},
        "num_val_images": results.cse_cam.num_images,
        "num_pseudo_labels": num_pseudo,
        "pseudo_labels": {"source": source, "value": value},
        "note": "thresholds and alpha are chosen on the validation split's ground truth, as in the reference",
        "run_dir": str(out),
    })
    return report


def summary_table(report: dict) -> str:
    """The table printed at the end of a pipeline run."""
    crf = report["cse_crf_miou"]
    rows = [("ordinary classifier, CAM", f"{report['ordinary_cam_miou']:.2f}",
             f"t={report['ordinary_threshold']:.2f}")]
    if report.get("control_cam_miou") is not None:
        rows.append(("control (w = 0), CAM", f"{report['control_cam_miou']:.2f}",
                     f"t={report['control_threshold']:.2f}"))
    rows += [
        ("OC-CSE eraser, CAM", f"{report['cse_cam_miou']:.2f}", f"t={report['best_threshold']:.2f}"),
        ("OC-CSE + dense CRF", "-" if crf is None else f"{crf:.2f}",
         "-" if report["best_alpha"] is None else f"alpha={report['best_alpha']:g}"),
    ]
    if report.get("rw_miou") is not None:
        rows.append(("OC-CSE + random walk", f"{report['rw_miou']:.2f}", "-"))
    if report.get("seg_miou") is not None:
        rows.append(("segmentation network", f"{report['seg_miou']:.2f}", f"labels: {report['seg_labels']}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  mIoU (%)  chosen on val", f"{'-' * width}  --------  -------------"]
    lines += [f"{name:{width}}  {miou:>8}  {choice}" for name, miou, choice in rows]
    gains = f"OC-CSE gain over the ordinary classifier: {report['gain']:+.2f} points"
    if report.get("gain_over_control") is not None:
        gains += f", over the control: {report['gain_over_control']:+.2f}"
    lines.append(f"{gains} ({report['num_val_images']} validation images)")
    lines.append(f"run directory: {report['run_dir']}")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    lines = ["# cse-ray pipeline report", "", "```", summary_table(report), "```", "",
             "| CRF alpha | mIoU (%) |", "|---|---|"]
    lines += [f"| {alpha} | {miou:.2f} |" for alpha, miou in report["crf_miou_by_alpha"].items()]
    if report.get("seg_per_class"):
        lines += ["", "Segmentation network, IoU per class on the validation list:", "",
                  "| class | IoU (%) |", "|---|---|"]
        lines += [f"| {name} | {iou:.2f} |" for name, iou in report["seg_per_class"].items()]
    lines += ["", f"Note: {report['note']}.", "",
              "Per-stage details: `eval/*.md`, curves `eval/*.curve.png`, the contact sheet "
              "`contact_sheet.png`, TensorBoard logs under `tensorboard/`.", ""]
    return "\n".join(lines)


def write_report(report: dict, run: RunLayout) -> None:
    """report.md first, report.json last: report.json marks a finished pipeline."""
    artifacts.write_text(run.report_md, report_markdown(report))
    artifacts.write_json(run.report_json, report)


def write_contact_sheet(run: RunLayout, root: str, names: Sequence[str], columns: dict[str, tuple[str, ...]],
                        gt_dir: str) -> str:
    """image | ground truth | one column per model, one row per validation image.

    `columns`: title -> ("cam", inference folder) for a CAM overlay, ("label", folder of label PNGs), or
    ("gain", folder, baseline folder) for where the first CAM rose (red) or fell (blue) against the second.
    """
    from cse_ray.data.voc import image_path
    from cse_ray.formats import read_image, read_label_png, write_rgb_png
    from cse_ray.infer import load_cams
    from cse_ray.labels import PALETTE
    from cse_ray.plots import cam_gain_overlay, cam_overlay, contact_sheet, label_colours

    cam_folders = {folder for kind, *folders in columns.values() if kind != "label" for folder in folders}
    rows = []
    for name in names[:CONTACT_SHEET_IMAGES]:
        image = read_image(image_path(root, name))
        row = [image, label_colours(read_label_png(artifacts.join(gt_dir, f"{name}.png")), PALETTE)]
        cams = {folder: load_cams(folder, name)[0] for folder in cam_folders}  # each read once
        for kind, folder, *baseline in columns.values():
            if kind == "cam":
                row.append(cam_overlay(image, cams[folder]))
            elif kind == "gain":
                row.append(cam_gain_overlay(image, cams[folder], cams[baseline[0]]))
            else:
                row.append(label_colours(read_label_png(artifacts.join(folder, f"{name}.png")), PALETTE))
        rows.append(row)
    sheet = contact_sheet(rows, ["image", "ground truth", *columns])
    return write_rgb_png(run.contact_sheet, sheet)
