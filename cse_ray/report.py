"""The pipeline's final report: report.json (INTERFACE.md), report.md, the printed table, a contact sheet.

Pure functions of what earlier stages stored; writing goes through `cse_ray.artifacts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cse_ray import artifacts
from cse_ray.metrics import EvalResult, best_alpha

REPORT_FILE = "report.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
CONTACT_SHEET_IMAGES = 12


@dataclass(frozen=True)
class PipelineResults:
    ordinary_cam: EvalResult
    cse_cam: EvalResult
    cse_crf: dict[float, EvalResult]  # alpha -> label evaluation
    num_pseudo_labels: int
    pseudo_source: str
    pseudo_value: float

    @property
    def best_alpha(self) -> float | None:
        return best_alpha({alpha: result.miou for alpha, result in self.cse_crf.items()})


def report_dict(results: PipelineResults, out: str) -> dict:
    """INTERFACE.md's report keys (percent), then details: per-alpha CRF, thresholds, file locations."""
    best_alpha = results.best_alpha
    return {
        "ordinary_cam_miou": round(results.ordinary_cam.miou, 3),
        "cse_cam_miou": round(results.cse_cam.miou, 3),
        "cse_crf_miou": round(results.cse_crf[best_alpha].miou, 3) if best_alpha is not None else None,
        "best_threshold": results.cse_cam.threshold,
        "best_alpha": best_alpha,
        "ordinary_threshold": results.ordinary_cam.threshold,
        "gain": round(results.cse_cam.miou - results.ordinary_cam.miou, 3),
        "crf_miou_by_alpha": {f"{a:g}": round(r.miou, 3) for a, r in sorted(results.cse_crf.items())},
        "num_val_images": results.cse_cam.num_images,
        "num_pseudo_labels": results.num_pseudo_labels,
        "pseudo_labels": {"source": results.pseudo_source, "value": results.pseudo_value},
        "note": "thresholds and alpha are chosen on the validation split's ground truth, as in the reference",
        "run_dir": str(out),
    }


def summary_table(report: dict) -> str:
    """The table printed at the end of a pipeline run."""
    crf = report["cse_crf_miou"]
    rows = [
        ("ordinary classifier, CAM", f"{report['ordinary_cam_miou']:.2f}",
         f"t={report['ordinary_threshold']:.2f}"),
        ("OC-CSE eraser, CAM", f"{report['cse_cam_miou']:.2f}", f"t={report['best_threshold']:.2f}"),
        ("OC-CSE + dense CRF", "-" if crf is None else f"{crf:.2f}",
         "-" if report["best_alpha"] is None else f"alpha={report['best_alpha']:g}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  mIoU (%)  chosen on val", f"{'-' * width}  --------  -------------"]
    lines += [f"{name:{width}}  {miou:>8}  {choice}" for name, miou, choice in rows]
    lines.append(f"OC-CSE gain over the ordinary classifier: {report['gain']:+.2f} points "
                 f"({report['num_val_images']} validation images)")
    lines.append(f"run directory: {report['run_dir']}")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    lines = ["# cse-ray pipeline report", "", "```", summary_table(report), "```", "",
             "| CRF alpha | mIoU (%) |", "|---|---|"]
    lines += [f"| {alpha} | {miou:.2f} |" for alpha, miou in report["crf_miou_by_alpha"].items()]
    lines += ["", f"Note: {report['note']}.", "",
              "Per-stage details: `eval/*.md`, curves `eval/*.curve.png`, contact sheet "
              f"`{CONTACT_SHEET_FILE}`, TensorBoard logs under `tensorboard/`.", ""]
    return "\n".join(lines)


def write_report(report: dict, out: str) -> None:
    """report.md first, report.json last: report.json marks a finished pipeline."""
    artifacts.write_text(artifacts.join(out, "report.md"), report_markdown(report))
    artifacts.write_json(artifacts.join(out, REPORT_FILE), report)


def write_contact_sheet(out: str, root: str, names: Sequence[str], ordinary_dir: str, cse_dir: str,
                        crf_dir: str | None, gt_dir: str) -> str:
    """image | ground truth | ordinary CAM | OC-CSE CAM | CRF label, one row per validation image."""
    from cse_ray.data.voc import image_path
    from cse_ray.formats import read_image, read_label_png, write_rgb_png
    from cse_ray.infer import load_cams
    from cse_ray.labels import PALETTE
    from cse_ray.plots import cam_overlay, contact_sheet, label_colours

    rows = []
    for name in names[:CONTACT_SHEET_IMAGES]:
        image = read_image(image_path(root, name))
        gt = read_label_png(artifacts.join(gt_dir, f"{name}.png"))
        row = [image, label_colours(gt, PALETTE)]
        for directory in (ordinary_dir, cse_dir):
            cams, _ = load_cams(directory, name)
            row.append(cam_overlay(image, cams))
        if crf_dir is not None:
            row.append(label_colours(read_label_png(artifacts.join(crf_dir, f"{name}.png")), PALETTE))
        else:
            row.append(np.zeros_like(image))
        rows.append(row)
    sheet = contact_sheet(rows, ["image", "ground truth", "ordinary CAM", "OC-CSE CAM", "OC-CSE + CRF"])
    return write_rgb_png(artifacts.join(out, CONTACT_SHEET_FILE), sheet)
