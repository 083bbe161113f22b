"""Throughput of the two halves of `cse-ray infer`.

1. Dense CRF (all alphas of one image per call, label maps written): a plain loop, then Ray tasks with
   1 and N concurrent CPU workers. Prints images/s, Ray's overhead against the loop (goal <= 5 %) and
   the scaling efficiency per core (rate_N / (N * rate_1), goal >= 0.9).
2. Multi-scale + flip CAM inference: an image and its flip in one forward (`cam.multiscale_cam`)
   against one view per forward (`cam.multiscale_cam_reference_way`, the reference's way) on the same
   network and images, one torch thread (what a 1-CPU actor gets).

Each figure is the best of `--repeats` timings (the machine may be shared).

    .venv/bin/python benchmarks/infer_crf.py --workers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def make_images(root: Path, count: int, size: int) -> list[str]:
    from cse_ray.data.synth import generate

    generate(str(root), train=count, val=1, size=size, seed=0)
    return [f"train_{i:06d}" for i in range(count)]


def crf_inputs(root: Path, names: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, CAMs, classes): CAM-like maps made by blurring each present class's ground-truth mask."""
    from cse_ray.formats import read_image, read_label_png

    items = []
    for name in names:
        image = read_image(root / "JPEGImages" / f"{name}.jpg")
        mask = read_label_png(root / "SegmentationClass" / f"{name}.png")
        classes = np.array([v - 1 for v in np.unique(mask) if 1 <= v <= 20], np.int64)
        radius = max(image.shape[:2]) / 12
        maps = []
        for k in classes:
            blob = Image.fromarray(((mask == k + 1) * 255).astype(np.uint8))
            blob = np.asarray(blob.filter(ImageFilter.GaussianBlur(radius)), np.float32)
            maps.append(blob / (blob.max() + 1e-5))
        cams = np.stack(maps) if maps else np.zeros((0, *image.shape[:2]), np.float32)
        items.append((image, cams, classes))
    return items


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_crf(args: argparse.Namespace, root: Path, out: Path) -> None:
    import ray

    from cse_ray.config import CrfConfig
    from cse_ray.crf import crf_alphas_task
    from cse_ray.layout import InferLayout

    params = CrfConfig()
    alphas = tuple(args.alphas)
    names = make_images(root, args.crf_images, args.crf_size)
    items = crf_inputs(root, names)
    pixels = statistics.mean(image.shape[0] * image.shape[1] for image, _, _ in items)
    print(f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"CRF: {len(items)} images, mean {pixels:.0f} pixels, alphas {alphas}, "
          f"{params.iterations} iterations")

    def plain_loop() -> None:
        for name, (image, cams, classes) in zip(names, items):
            crf_alphas_task(image, cams, classes, name, InferLayout(str(out / "loop")), alphas, params)

    crf_alphas_task(*items[0], names[0], InferLayout(str(out / "loop")), alphas, params)  # warm-up (imports)
    # A locally started Ray runs its workers at niceness 15 (`ray job submit` uses 0); on a shared
    # machine that alone would slow them against the loop, which runs at 0. Compare like with like.
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_worker_niceness": "0"}})
    try:
        refs = [ray.put(item) for item in items]  # in infer the payload is already in the object store

        @ray.remote
        def crf_task(item, name, target):
            image, cams, classes = item
            cpu = time.process_time()
            crf_alphas_task(image, cams, classes, name, InferLayout(target), alphas, params)
            return time.process_time() - cpu

        def on_ray(workers: int) -> None:
            task = crf_task.options(num_cpus=args.workers / workers)  # at most `workers` at once
            start = time.perf_counter()
            cpu = sum(ray.get([task.remote(ref, name, str(out / f"ray{workers}"))
                               for ref, name in zip(refs, names)]))
            # The share of `workers` cores the tasks really got: below 1 when other processes compete.
            shares[workers].append(cpu / (workers * (time.perf_counter() - start)))

        warm = crf_task.options(num_cpus=1)
        ray.get([warm.remote(refs[i % len(refs)], "warm", str(out / "warm"))
                 for i in range(2 * args.workers)])
        # Interleaved rounds, so that load from other processes hits every variant alike.
        shares: dict[int, list[float]] = {w: [] for w in {1, args.workers}}
        variants = {"loop": plain_loop}
        variants.update({f"ray{w}": (lambda w=w: on_ray(w)) for w in sorted({1, args.workers})})
        times: dict[str, list[float]] = {key: [] for key in variants}
        for _ in range(args.repeats):
            for key, run in variants.items():
                times[key].append(best_of(1, run))
    finally:
        ray.shutdown()
    rates = {key: len(items) / min(values) for key, values in times.items()}
    for key, values in times.items():
        label = "plain loop" if key == "loop" else f"Ray, {key[3:]} worker(s)"
        share = "" if key == "loop" else f"; CPU share of its cores {max(shares[int(key[3:])]):.2f}"
        print(f"  {label:20s}: {rates[key]:7.2f} images/s (best of {args.repeats}; "
              f"rounds {', '.join(f'{v:.2f}' for v in values)} s{share})")
    rate_loop = rates["loop"]
    rates = {int(key[3:]): value for key, value in rates.items() if key != "loop"}
    overhead = rate_loop / rates[1] - 1
    print(f"  Ray overhead vs loop (1 worker): {100 * overhead:+.1f} %  (goal <= 5 %)")
    if args.workers > 1:
        efficiency = rates[args.workers] / (args.workers * rates[1])
        print(f"  scaling efficiency, {args.workers} workers: {efficiency:.2f} per core  (goal >= 0.9)")
        got = max(shares[args.workers]) / max(shares[1])
        print(f"  the same per CPU second the workers really got (shared machine): {efficiency / got:.2f}")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


def bench_cam(args: argparse.Namespace, root: Path) -> None:
    import torch

    from cse_ray.cam import multiscale_cam, multiscale_cam_reference_way
    from cse_ray.data.voc import image_label
    from cse_ray.formats import read_image
    from cse_ray.models import build_classifier

    torch.set_num_threads(args.threads)
    names = make_images(root, args.cam_images, args.cam_size)
    images = [read_image(root / "JPEGImages" / f"{n}.jpg") for n in names]
    labels = [image_label(root, n) for n in names]
    scales = tuple(args.scales)
    print(f"CAM: {len(images)} images of long side {args.cam_size}, scales {scales}, "
          f"{args.threads} thread(s)")
    for backbone in args.backbones:
        torch.manual_seed(0)
        model = build_classifier(backbone).eval()

        def run(fn, model=model) -> None:
            for image, label in zip(images, labels):
                fn(model, image, label, scales, "cpu")

        for fn in (multiscale_cam, multiscale_cam_reference_way):  # warm-up and agreement check
            a, ca = multiscale_cam(model, images[0], labels[0], scales, "cpu")
            b, cb = fn(model, images[0], labels[0], scales, "cpu")
            assert np.array_equal(ca, cb) and np.allclose(a, b, atol=1e-4), "the two ways disagree"
        times: dict[str, list[float]] = {"batched": [], "one_view": []}
        for _ in range(args.repeats):  # interleaved, so that outside load hits both alike
            times["batched"].append(best_of(1, lambda: run(multiscale_cam)))
            times["one_view"].append(best_of(1, lambda: run(multiscale_cam_reference_way)))
        batched, one_view = (len(images) / min(times[key]) for key in ("batched", "one_view"))
        print(f"  {backbone:16s}: image+flip per forward {batched:7.2f} images/s, one view per forward "
              f"{one_view:7.2f} images/s, ratio {batched / one_view:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="N CRF workers")
    parser.add_argument("--crf-images", type=int, default=16)
    parser.add_argument("--crf-size", type=int, default=320, help="long side of the CRF images")
    parser.add_argument("--alphas", type=float, nargs="+", default=[6.0, 10.0, 24.0])
    parser.add_argument("--cam-images", type=int, default=8)
    parser.add_argument("--cam-size", type=int, default=128)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--backbones", nargs="+", default=["resnet38d_tiny", "resnet38d_small"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the CAM part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", choices=("crf", "cam"), default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        tmp = Path(tmp)
        if args.skip != "crf":
            bench_crf(args, tmp / "crf_data", tmp / "crf_out")
        if args.skip != "cam":
            bench_cam(args, tmp / "cam_data")


if __name__ == "__main__":
    main()
