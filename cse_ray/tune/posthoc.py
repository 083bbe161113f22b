"""After the sweep: the CAM background threshold and CRF alpha of the best eraser, without retraining.

The best trial's eraser gets CAMs and CRF maps on `data.val_list` (inference + CRF, once), and the
threshold and alpha are chosen by the pipeline's rules, so `best_config.yaml` agrees with what
`cse-ray pipeline` would pick on the same outputs:

- threshold: the best point of the CAM threshold sweep (`evaluate.*`), ties going to the lowest;
- alpha: `cse_ray.metrics.best_alpha`, the highest CRF mIoU, ties going to the smallest alpha.

Both are chosen against the ground truth (as the reference does for its threshold): a known optimistic
bias, reported as such in the eval reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cse_ray.config import Config, thresholds
from cse_ray.layout import InferLayout
from cse_ray.metrics import best_alpha


@dataclass(frozen=True)
class PosthocChoice:
    """The chosen threshold and alpha (None without CRF), with the numbers they were chosen on."""

    threshold: float
    cam_miou: float
    alpha: float | None
    crf_miou: dict[str, float] = field(default_factory=dict)  # alpha (as text, `6`, `0.5`) -> mIoU


def posthoc_search(cfg: Config, checkpoint: str, layout: InferLayout) -> PosthocChoice:
    """CAMs and CRF maps of one eraser on `data.val_list` into `layout`, and the choice they give."""
    from cse_ray.data.voc import list_path, read_list
    from cse_ray.infer import run_infer

    summary = run_infer(cfg, layout.root, checkpoint=checkpoint, list_name=cfg.data.val_list,
                        write_pseudo=False)
    if summary.failed:
        name, error = next(iter(summary.errors.items()))
        raise RuntimeError(f"post-hoc inference failed on {summary.failed} images (first: {name}: {error})")
    names = read_list(list_path(cfg.data.root, cfg.data.val_list))
    return choose_on_outputs(cfg, layout, names)


def choose_on_outputs(cfg: Config, layout: InferLayout, names: Sequence[str]) -> PosthocChoice:
    """Evaluate the CAMs and every alpha's CRF maps in `layout` against the ground truth, write the
    reports beside them (`eval_cam.json`, `eval_crf_a<alpha>.json`) and choose threshold and alpha."""
    from cse_ray.data.voc import mask_path
    from cse_ray.evaluate import write_reports
    from cse_ray.formats import read_label_png
    from cse_ray.infer import load_cams
    from cse_ray.metrics import ConfusionSweep

    root, sbd = cfg.data.root, cfg.data.sbd_root or None
    alphas = tuple(dict.fromkeys(float(a) for a in cfg.crf.alphas)) if cfg.crf.enabled else ()
    cam_sweep = ConfusionSweep(thresholds(cfg.evaluate), labels=cfg.data.labels)
    crf_sweeps = {alpha: ConfusionSweep(None, labels=cfg.data.labels) for alpha in alphas}
    for name in names:
        gt = read_label_png(mask_path(root, name, sbd))
        cams, classes = load_cams(layout.root, name)
        cam_sweep.add_cams(cams, classes, gt, name=name)
        for alpha, sweep in crf_sweeps.items():
            sweep.add_labels(read_label_png(layout.crf(alpha, name), what="CRF label map"), gt, name=name)
    cam = cam_sweep.result("cam")  # its threshold: the best of the sweep, ties going to the lowest
    write_reports(cam, layout.eval_json("eval_cam"))
    miou_by_alpha = {}
    for alpha, sweep in crf_sweeps.items():
        result = sweep.result("label")
        write_reports(result, layout.eval_json(f"eval_crf_a{alpha:g}"))
        miou_by_alpha[alpha] = result.miou
    choice = PosthocChoice(threshold=float(cam.threshold), cam_miou=cam.miou, alpha=best_alpha(miou_by_alpha),
                           crf_miou={f"{alpha:g}": miou for alpha, miou in miou_by_alpha.items()})
    crf_text = ", ".join(f"alpha {k}: {v:.2f}" for k, v in choice.crf_miou.items())
    print(f"tune: post-hoc on {len(names)} images: CAM mIoU {cam.miou:.2f} at threshold {cam.threshold:g}"
          + (f"; CRF {crf_text}" if crf_text else ""))
    return choice
