"""Dense CRF at COCO scale: images/s per core on 640x480 images, and Ray's scaling over the cores.

What `cse-ray infer` does per image of COCO: the CRF at every alpha (psa's parameters, `cse_ray.crf`,
`crf_alphas_task`, label PNGs written) over the image's present classes. The 81 categories only set the
label indices: the CRF runs over background + the classes present, which is 2.9 on average in COCO
(`--classes`). Images are synthetic scenes rendered at 640x480 (`cse_ray.data.synth`), CAMs are the
objects' blurred masks (plus blurred blobs for the classes beyond the rendered objects).

Printed side by side from one run, in interleaved rounds (the best of `--repeats` counts):
  - a plain loop in this process, Ray tasks 1 at a time, and N at once (N = --workers, default every
    core): images/s, the CPU share they really got (below 1 when other processes compete for the
    cores), and images per CPU-second (the rate of a core that is all theirs)
  - Ray's overhead against the loop, and N-at-once against 1-at-a-time: the wall-time speed-up and the
    ratio of images per CPU-second (below 1 when tasks slow each other down, e.g. memory bandwidth)
and, from those, the COCO val estimate: 40,137 images x the alphas on 16 and `--cluster-cpus` CPUs.

    .venv/bin/python benchmarks/crf_scale.py --images 8 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

COCO_VAL_IMAGES = 40_137


def make_inputs(count: int, classes: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, CAMs, class indices) per image: 640x480 scenes, `classes` CAM maps in [0, 1] each."""
    from cse_ray.data.synth import make_options, render_sample

    options = make_options(aspect_range=(4 / 3, 4 / 3), ignore_width=0)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        sample = render_sample(seed, "val", index, 640, options)
        height, width = sample.label.shape
        blobs = [(sample.label == obj.class_index + 1) for obj in sample.objects][:classes]
        ys, xs = np.mgrid[0:height, 0:width]
        while len(blobs) < classes:  # more classes than rendered objects: elliptic blobs
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(40, 160, 2)
            blobs.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0)
        cams = []
        for blob in blobs:
            soft = Image.fromarray(blob.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(40))
            cam = np.asarray(soft, np.float32)
            cams.append(cam / (cam.max() + 1e-5))
        class_ids = np.sort(rng.choice(80, size=classes, replace=False)).astype(np.int64)
        items.append((sample.image, np.stack(cams), class_ids))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per round (default 8)")
    parser.add_argument("--classes", type=int, default=3, help="present classes per image (COCO: 2.9 mean)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[6.0, 10.0, 24.0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N tasks at once")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best counts")
    parser.add_argument("--cluster-cpus", type=int, default=64, help="CPUs of the cluster estimate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rb", dir="/tmp"))

    import ray

    from cse_ray.config import CrfConfig
    from cse_ray.crf import crf_alphas_task

    params = CrfConfig(alphas=tuple(args.alphas))
    alphas = tuple(args.alphas)
    items = make_inputs(args.images, args.classes, args.seed)
    names = [f"img{i:04d}" for i in range(len(items))]
    height, width = items[0][0].shape[:2]
    print(f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"dense CRF: {len(items)} images of {width}x{height}, {args.classes} present classes "
          f"(+ background), alphas {alphas}, {params.iterations} iterations, label PNGs written")

    with tempfile.TemporaryDirectory(prefix="crf-scale-") as tmp:
        out = Path(tmp)
        crf_alphas_task(*items[0], names[0], str(out / "warm"), alphas, params)  # imports, first call

        def loop() -> float:
            cpu = time.thread_time()
            for name, (image, cams, classes) in zip(names, items):
                crf_alphas_task(image, cams, classes, name, str(out / "loop"), alphas, params)
            return time.thread_time() - cpu

        # A local Ray runs its workers at niceness 15 unless told otherwise; the loop runs at 0.
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_worker_niceness": "0"}})
        try:
            refs = [ray.put(item) for item in items]  # in `infer` the CAMs are already in the object store

            @ray.remote
            def crf_task(item, name: str, target: str) -> float:
                cpu = time.process_time()
                crf_alphas_task(*item, name, target, alphas, params)
                return time.process_time() - cpu

            def on_ray(at_once: int) -> float:
                task = crf_task.options(num_cpus=args.workers / at_once)  # at most `at_once` run together
                return sum(ray.get([task.remote(ref, name, str(out / f"ray{at_once}"))
                                    for ref, name in zip(refs, names)]))

            ray.get([crf_task.options(num_cpus=1).remote(refs[i % len(refs)], "warm", str(out / "warm"))
                     for i in range(args.workers)])
            variants = {(0, "plain loop, 1 core"): loop, (1, "Ray, 1 task at a time"): lambda: on_ray(1)}
            if args.workers > 1:
                variants[(args.workers, f"Ray, {args.workers} tasks at once")] = lambda: on_ray(args.workers)
            rounds: dict[tuple, list[tuple[float, float]]] = {key: [] for key in variants}
            for _ in range(args.repeats):  # interleaved, so that outside load hits every variant alike
                for key, run in variants.items():
                    start = time.perf_counter()
                    cpu = run()
                    rounds[key].append((time.perf_counter() - start, cpu))
        finally:
            ray.shutdown()

    count = len(items)
    best = {key: min(values) for key, values in rounds.items()}  # the round with the shortest wall time
    per_cpu_s = {}
    print("  variant                   images/s   CPU share   images per CPU-second")
    for (at_once, label), (wall, cpu) in best.items():
        per_cpu_s[at_once] = count / cpu
        print(f"  {label:24s} {count / wall:9.3f} {cpu / (max(at_once, 1) * wall):11.2f} "
              f"{count / cpu:15.3f}  ({cpu / count / len(alphas):.2f} CPU-s per alpha)")
    (_, (loop_wall, _)), (_, (one_wall, _)) = list(best.items())[:2]
    print(f"  Ray overhead vs the loop, 1 task: {100 * (one_wall / loop_wall - 1):+.1f} % wall time")
    efficiency = 1.0
    if args.workers > 1:
        many_wall = best[(args.workers, f"Ray, {args.workers} tasks at once")][0]
        speedup = one_wall / many_wall
        efficiency = per_cpu_s[args.workers] / per_cpu_s[1]
        print(f"  {args.workers} at once vs 1 at a time: speed-up {speedup:.2f}x wall "
              f"({speedup / args.workers:.2f} per core); images per CPU-second {efficiency:.2f}x "
              f"(per core, when each task has its core)")
    rate = per_cpu_s[0] * efficiency  # images/s of one dedicated core among many
    for cpus in sorted({16, args.cluster_cpus}):
        total = COCO_VAL_IMAGES / (rate * cpus)
        print(f"  COCO val estimate, {COCO_VAL_IMAGES:,} images x {len(alphas)} alphas on {cpus} CPUs: "
              f"{total / 3600:.2f} h")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
