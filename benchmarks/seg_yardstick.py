"""Benchmark: the segmentation network on pseudo-labels against the same network on ground truth.

    .venv/bin/python benchmarks/seg_yardstick.py --run runs/demo --out runs/yardstick

WSSS papers measure their final network against the same network trained with full supervision on
the same images (OC-CSE's DeepLab-v2 reaches ~0.89 of it on VOC val). This script takes a finished
pipeline run that trained the segmentation network (`pipeline.seg: true`), reads its resolved config
(RUN/config.yaml) and report, and:

1. trains the same `train_seg` settings (network, initialisation, epochs, seed, augmentation) on the
   ground-truth masks (`SegmentationClass/`) of the same training images, into OUT/train_seg;
2. predicts the run's validation list with the same `predict` settings, into OUT/seg
   (`cse-ray predict`'s code path, as the pipeline's `seg_miou`);
3. evaluates both prediction folders on the validation list and prints
   `seg_miou`, `fully_supervised_miou` and their ratio; writes OUT/yardstick.json.

Everything resumes: a rerun skips the finished training and prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cse_ray import artifacts
from cse_ray.config import load_config, with_overrides
from cse_ray.layout import RunLayout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished pipeline run with pipeline.seg: true")
    parser.add_argument("--out", required=True,
                        help="where the fully supervised network and its predictions go")
    args = parser.parse_args(argv)

    from cse_ray.data.voc import list_path, read_list
    from cse_ray.evaluate import evaluate
    from cse_ray.infer import run_predict
    from cse_ray.pipeline import seg_overrides
    from cse_ray.train import train_seg

    run, out = RunLayout.at(Path(args.run).resolve()), RunLayout.at(Path(args.out).resolve())
    report = artifacts.read_json(run.report_json)
    if report.get("seg_miou") is None:
        raise SystemExit(f"{run.report_json}: no seg_miou (run the pipeline with pipeline.seg=true first)")
    cfg = load_config(run.config)
    root = cfg.data.root
    weak = with_overrides(cfg, seg_overrides(cfg, run))  # the pipeline's own train list and labels
    train_list = weak.train_seg.train_list
    gt_dir = str(Path(root, "SegmentationClass"))
    full = with_overrides(cfg, {
        "train_seg.labels_dir": gt_dir, "train_seg.train_list": train_list,
        # train_seg.init classifier / eraser: the run's own networks, as for the weakly supervised one
        "train_cse.classifier": cfg.train_cse.classifier or run.stage("train_cam").model,
        "infer.checkpoint": cfg.infer.checkpoint or run.stage("train_cse").model,
    })
    train_seg(full, out.root)
    val_names = read_list(list_path(root, cfg.data.val_list))
    run_predict(full, out.seg.root, checkpoint=out.stage("train_seg").model, names=val_names, root=root,
                progress=False)
    supervised = evaluate(out.seg.root, gt_dir, val_names, task="label", labels=cfg.data.labels)
    weakly = evaluate(run.seg.root, gt_dir, val_names, task="label", labels=cfg.data.labels)
    result = {
        "seg_miou": round(weakly.miou, 3),
        "report_seg_miou": report["seg_miou"],
        "fully_supervised_miou": round(supervised.miou, 3),
        "ratio": round(weakly.miou / supervised.miou, 4),
        "train_images": len(read_list(list_path(root, train_list))),
        "val_images": len(val_names),
        "network": cfg.train_seg.network,
        "labels": report.get("seg_labels"),
        "run": run.root,
    }
    artifacts.write_json(str(Path(out.root, "yardstick.json")), result)
    print(f"segmentation network ({cfg.train_seg.network}, {result['train_images']} training images, "
          f"{result['val_images']} validation images)")
    print(f"  on pseudo-labels ({result['labels']}): {result['seg_miou']:.2f} mIoU "
          f"(report: {result['report_seg_miou']:.2f})")
    print(f"  on ground truth:  {result['fully_supervised_miou']:.2f} mIoU")
    print(f"  ratio: {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
