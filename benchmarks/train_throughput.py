"""train-cse throughput: a plain single-process loop vs Ray Train with 1 and N workers, side by side.

All three run the same step function (`cse_ray.train.run_epoch`) on the same synthetic data, so the
difference between the plain loop and Ray with one worker is Ray's overhead, and the ratio of 1 to N
workers is the scaling. Images/s are measured over the training steps of the epochs after the first
(the first pays for process start-up and allocator warm-up).

    python benchmarks/train_throughput.py --workers 2 --epochs 3

On a GPU machine: --backbone resnet38d --crop 384 --batch 8 [--bf16].
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def config(args: argparse.Namespace, root: str, workers: int, classifier: str):
    from cse_ray.config import load_config

    crop = args.crop
    return load_config(None, [
        f"data.root={root}", "data.synth.enabled=true", f"data.synth.train={args.images}", "data.synth.val=4",
        f"data.synth.size={crop}", f"model.backbone={args.backbone}",
        f"train_cse.classifier={classifier}", "train_cse.init=classifier", f"train_cse.epochs={args.epochs}",
        f"train_cse.batch_size={args.batch}", f"train_cse.crop={crop}",
        f"train_cse.resize_long=[{crop},{crop}]", f"train_cse.num_workers={workers}",
        f"train_cse.cpus_per_worker={max(1, args.threads // workers)}",
        f"train_cse.bf16={str(args.bf16).lower()}",
        "train_cse.log_every=1000", "train_cse.val_images=1", "train_cse.use_gpu=auto",
    ])


def plain_loop(cfg, threads: int) -> list[float]:
    """The same per-epoch function without Ray: one process, no DDP."""
    from cse_ray.data.datasets import TrainDataset
    from cse_ray.data.prepare import load_split
    from cse_ray.objective import erase_weight, set_train_mode
    from cse_ray.optim import ERASER_SCRATCH, build_optimizer
    from cse_ray.runtime import local_device
    from cse_ray.train import EpochContext, IndexedDataset, build_networks, run_epoch

    torch.set_num_threads(threads)
    scfg = cfg.train_cse
    device = local_device()
    split = load_split(cfg, cfg.data.root, "train_list")
    model, frozen = build_networks("train_cse", cfg, scfg.classifier, device)
    dataset = TrainDataset(split.root, split.names, split.labels, crop=scfg.crop,
                           resize_long=scfg.resize_long, seed=scfg.seed)
    loader = DataLoader(IndexedDataset(dataset), batch_size=scfg.batch_size, shuffle=True, drop_last=True)
    steps = len(dataset) // scfg.batch_size
    optimizer = build_optimizer(model, scfg.lr, scfg.weight_decay, steps * scfg.epochs,
                                scratch=ERASER_SCRATCH)
    ctx = EpochContext("train_cse", model, frozen, loader, optimizer, device, scfg,
                       cfg.data.labels.num_classes, steps)
    rates = []
    for epoch in range(scfg.epochs):
        dataset.set_epoch(epoch)
        set_train_mode(model)
        stats = run_epoch(ctx, epoch, erase_weight(scfg.cc_init, scfg.cc_slope, epoch))
        rates.append(stats["images_per_s"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet38d_tiny")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over workers)")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    import ray

    from cse_ray.models import build_classifier
    from cse_ray.train import fit_stage

    with tempfile.TemporaryDirectory(prefix="cse-bench-") as tmp:
        torch.manual_seed(0)
        classifier = str(Path(tmp, "classifier.pth"))
        torch.save(build_classifier(args.backbone).state_dict(), classifier)
        root = str(Path(tmp, "data"))
        cfg = config(args, root, 1, classifier)
        from cse_ray.data.prepare import resolve_data_root

        resolve_data_root(cfg, tmp)
        results = {}
        start = time.perf_counter()
        results["plain loop"] = plain_loop(cfg, args.threads)
        print(f"plain loop done in {time.perf_counter() - start:.0f} s", flush=True)
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        # A locally started Ray runs workers at niceness 15 (`ray job submit` uses 0): compare at 0.
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_worker_niceness": "0"}})
        for workers in sorted({1, args.workers}):
            cfg = config(args, root, workers, classifier)
            summary = fit_stage("train_cse", cfg, str(Path(tmp, f"ray{workers}")))
            results[f"Ray Train, {workers} worker(s)"] = [h["images_per_s"] for h in summary["history"]]
        ray.shutdown()

    steady = {name: statistics.mean(rates[1:] or rates) for name, rates in results.items()}
    plain = steady["plain loop"]
    one = steady["Ray Train, 1 worker(s)"]
    print(f"\n{args.backbone}, crop {args.crop}, global batch {args.batch}, {args.threads} CPU threads, "
          f"{args.images} images, {args.epochs} epochs (first excluded)")
    for name, rate in steady.items():
        print(f"  {name:24s} {rate:8.1f} img/s  ({rate / plain:.2f}x the plain loop)")
    print(f"Ray overhead, 1 worker vs the plain loop: {(plain / one - 1) * 100:+.1f} %")
    if args.workers > 1:
        many = steady[f"Ray Train, {args.workers} worker(s)"]
        print(f"scaling 1 -> {args.workers} workers: {many / one:.2f}x "
              f"(efficiency {many / one / args.workers:.2f} per worker)")


if __name__ == "__main__":
    main()
