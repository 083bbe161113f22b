"""Benchmark: the random walk with a sparse transition (ours) against psa's dense matrix powers.

    .venv/bin/python benchmarks/random_walk.py --sizes 500x375,1000x750

For each image size (width x height) the script builds one image's CAMs and AffinityNet affinities,
then runs `cse_ray.rw.random_walk` (T kept sparse, applied 2^logt = 256 times) and
`cse_ray.rw.psa_dense_random_walk` (psa: dense N x N T squared 8 times) on the same inputs and prints,
side by side: seconds per image, peak memory per image, their ratios, the fraction of pixels whose
labels agree and the largest difference of the refined stride-8 maps.

Inputs (`--source`): `scene` (default) draws 1-3 elliptic objects, CAMs peaking inside them and
stride-8 features that are one random vector per region plus noise, so the affinities are high inside
a region and low across its border, as a trained AffinityNet's are; `net` takes the affinities of an
untrained `resnet38d_tiny` AffinityNet on a random image (nearly uniform affinities: a harder case for
agreement, since the walk then flattens the maps towards ties).

Peak memory on the CPU is the growth of the process's resident set during the call (the kernel's
high-water mark, reset before each call through /proc/self/clear_refs); on a GPU it is
torch.cuda.max_memory_allocated. One torch thread by default (`--threads`): the development machine
is shared, and the walk runs one image per core on Ray workers. A dense run whose matrices would
exceed `--dense-limit-gb` is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from cse_ray.models import FEATURE_STRIDE, build_affinity_net, pair_affinities
from cse_ray.rw import BETA, LOGT, pad_to_stride, padded_size, psa_dense_random_walk, random_walk


def scene(
    width: int, height: int, seed: int, channels: int = 16
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(K x H x W CAMs in [0, 1], K classes, features 1 x C x h x w) of one synthetic image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    count = int(rng.integers(1, 4))
    classes = np.sort(rng.choice(20, size=count, replace=False))
    regions = np.zeros((height, width), np.int64)
    cams = np.zeros((count, height, width), np.float32)
    for index in range(count):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        regions[distance <= 1.0] = index + 1
        # a CAM covers the most discriminative part and spills a little: the walk spreads it
        cams[index] = np.exp(-3.0 * distance**2) + 0.05 * rng.random((height, width), np.float32)
    cams /= cams.reshape(count, -1).max(axis=1)[:, None, None] + 1e-5
    padded_h, padded_w = padded_size(height, width)
    grid = np.zeros((padded_h, padded_w), np.int64)
    grid[:height, :width] = regions
    centres = grid[FEATURE_STRIDE // 2::FEATURE_STRIDE, FEATURE_STRIDE // 2::FEATURE_STRIDE]
    embedding = rng.normal(0.0, 1.0, (count + 1, channels)).astype(np.float32)
    features = embedding[centres].transpose(2, 0, 1)
    features = features + 0.1 * rng.normal(0.0, 1.0, features.shape).astype(np.float32)
    return cams, classes, torch.from_numpy(features).unsqueeze(0)


def net_features(width: int, height: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model = build_affinity_net("resnet38d_tiny").eval()
    with torch.inference_mode():
        return model(pad_to_stride(torch.randn(1, 3, height, width)))


def _rss_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def measure(function, device: torch.device, repeats: int):
    """(best seconds, peak extra bytes, result) of `function()` run `repeats` times."""
    best, peak, result = float("inf"), 0, None
    for _ in range(repeats):
        result = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            before = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        grown = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                 else _rss_kib("VmHWM") * 1024) - before
        peak = max(peak, grown)
    return best, peak, result


def run_size(width: int, height: int, args: argparse.Namespace, device: torch.device) -> dict:
    if args.source == "scene":
        cams, classes, features = scene(width, height, args.seed)
    else:
        rng = np.random.default_rng(args.seed)
        classes = np.sort(rng.choice(20, size=2, replace=False))
        cams = rng.random((2, height, width), np.float32)
        features = net_features(width, height, args.seed)
    affinities = pair_affinities(features.to(device))[0]
    grid = features.shape[2] * features.shape[3]
    row = {"size": f"{width}x{height}", "grid": grid}
    ours_s, ours_mem, ours = measure(
        lambda: random_walk(cams, classes, affinities, args.beta, args.logt), device, args.repeats
    )
    row.update(ours_s=ours_s, ours_mem=ours_mem)
    dense_bytes = 3 * grid * grid * 4  # A ** beta, T and one square alive at once
    if dense_bytes > args.dense_limit_gb * 2**30:
        row.update(dense_s=None, note=f"dense skipped: needs ~{dense_bytes / 2**30:.1f} GB")
        return row
    dense_s, dense_mem, dense = measure(
        lambda: psa_dense_random_walk(cams, classes, affinities, args.beta, args.logt), device, 1
    )
    row.update(
        dense_s=dense_s, dense_mem=dense_mem,
        agree=float((ours.label == dense.label).mean()),
        max_diff=float((ours.refined - dense.refined).abs().max()),
        scale=float(dense.refined.abs().max()),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500x375,1000x750", help="comma-separated WIDTHxHEIGHT")
    parser.add_argument("--source", choices=("scene", "net"), default="scene")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (best taken); dense runs once")
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--logt", type=int, default=LOGT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-limit-gb", type=float, default=16.0, help="skip larger dense runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} torch thread(s), source {args.source}, "
          f"beta {args.beta:g}, logt {args.logt} ({2 ** args.logt} steps)")
    print("| image | grid N | ours s | psa dense s | speed-up | ours peak MB | dense peak MB | memory ratio "
          "| labels equal | max refined diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        width, height = (int(part) for part in size.lower().split("x"))
        row = run_size(width, height, args, device)
        ours = f"| {row['size']} | {row['grid']} | {row['ours_s']:.3f} |"
        if row["dense_s"] is None:
            print(f"{ours} - | - | {row['ours_mem'] / 2**20:.1f} | - | - | - | - | ({row['note']})")
            continue
        print(
            f"{ours} {row['dense_s']:.2f} | {row['dense_s'] / row['ours_s']:.0f}x "
            f"| {row['ours_mem'] / 2**20:.1f} | {row['dense_mem'] / 2**20:.0f} "
            f"| {row['dense_mem'] / max(row['ours_mem'], 1):.0f}x | {100 * row['agree']:.3f} % "
            f"| {row['max_diff']:.1e} (of {row['scale']:.2f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
