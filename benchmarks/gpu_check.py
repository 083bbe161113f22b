"""The GPU check: every GPU code path of cse-ray measured in one prepared run (under 8 minutes on one GPU).

    python benchmarks/gpu_check.py              # a machine with one CUDA GPU
    python benchmarks/gpu_check.py --dry-run    # the same code on the CPU, tiny sizes, in seconds

It prints one table:
1. the train-cse step (eraser forward, erasing, frozen-classifier forward, backward, SGD; the
   training loop's own `run_epoch`) with ResNet-38d at crop 384, batch 8: img/s in fp32, bf16 autocast
   and bf16 + channels-last, and the peak GPU memory of each;
2. the same step under Ray Train with 1 worker (NCCL process group) against the plain loop: Ray's
   overhead in percent;
3. multi-scale (0.5, 1, 1.5, 2) + flip CAM inference of 500x375 images on Ray actors: fp32 and bf16,
   1 actor holding the GPU against 4 actors sharing it (`infer.gpus_per_actor: 0.25`, the scheduling
   options of `cse_ray.infer.workers`), and the GPU ids each actor was given;
4. dense CRF (psa's parameters, alphas 6/10/24) in images per CPU-second, i.e. per core.

The dry run declares one GPU to Ray that does not exist (`ray.init(num_gpus=1)`), so the fractional
scheduling of the CAM actors runs as on a GPU machine while the tensors stay on the CPU; Ray Train uses
gloo there. `--json PATH` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    backbone: str
    crop: int
    batch: int
    steps: int  # per epoch
    epochs: int  # the first is warm-up
    cam_images: int  # per configuration, split over the actors
    cam_hw: tuple[int, int]
    scales: tuple[float, ...]
    crf_images: int
    crf_iterations: int


FULL = Sizes("resnet38d", 384, 8, 12, 3, 48, (375, 500), (0.5, 1.0, 1.5, 2.0), 6, 10)
DRY = Sizes("resnet38d_tiny", 32, 2, 2, 2, 4, (36, 48), (1.0, 1.5), 2, 2)
NUM_CLASSES = 20


class RandomBatch(Dataset):
    """(image, multi-hot label with two classes, index): the training loader's items, made up."""

    def __init__(self, count: int, crop: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, crop, crop, generator=generator)
        self.labels = torch.zeros(count, NUM_CLASSES)
        for i in range(count):
            self.labels[i, [i % NUM_CLASSES, (7 * i + 3) % NUM_CLASSES]] = 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index


def stage_config(sizes: Sizes, classifier: str, bf16: bool = False, channels_last: bool = False):
    from cse_ray.config import load_config

    return load_config(None, [
        "data.synth.enabled=true", f"model.backbone={sizes.backbone}", f"train_cse.classifier={classifier}",
        "train_cse.init=classifier", "train_cse.freeze=reference", f"train_cse.batch_size={sizes.batch}",
        f"train_cse.crop={sizes.crop}", f"train_cse.epochs={sizes.epochs}", "train_cse.log_every=1000",
        f"train_cse.bf16={str(bf16).lower()}", f"train_cse.channels_last={str(channels_last).lower()}",
    ])


def train_epochs(config: dict, classifier: str, sizes: Sizes, device: torch.device) -> dict:
    """The training stage's own setup and `run_epoch` on made-up batches; img/s after the first epoch."""
    from cse_ray.config import from_dict
    from cse_ray.objective import erase_weight, set_train_mode
    from cse_ray.optim import ERASER_SCRATCH, build_optimizer
    from cse_ray.train import EpochContext, build_networks, run_epoch

    cfg = from_dict(config)
    scfg = cfg.train_cse
    torch.manual_seed(0)
    model, frozen = build_networks("train_cse", cfg, classifier, device)
    if scfg.channels_last:
        model.to(memory_format=torch.channels_last)
        frozen.to(memory_format=torch.channels_last)
    loader = DataLoader(RandomBatch(sizes.steps * sizes.batch, sizes.crop), batch_size=sizes.batch,
                        shuffle=False, drop_last=True, pin_memory=device.type == "cuda")
    optimizer = build_optimizer(model, scfg.lr, scfg.weight_decay, sizes.steps * sizes.epochs,
                                scratch=ERASER_SCRATCH)
    ctx = EpochContext("train_cse", model, frozen, loader, optimizer, device, scfg, NUM_CLASSES, sizes.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for epoch in range(sizes.epochs):
        set_train_mode(model)
        rates.append(run_epoch(ctx, epoch, erase_weight(scfg.cc_init, scfg.cc_slope, epoch))["images_per_s"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"img_s": statistics.mean(rates[1:] or rates), "peak_gib": peak}


def ray_train_worker(config: dict) -> None:
    """Ray Train's per-worker function: the same epochs inside a worker with a process group."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    result = train_epochs(config["config"], config["classifier"], Sizes(**config["sizes"]),
                          ray.train.torch.get_device())
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    # Ray Train 2.60 keeps only checkpointed reports in its Result: the numbers go to a file.
    Path(config["result"]).write_text(json.dumps({**result, "nccl": nccl, "world": dist.get_world_size()}))
    ray.train.report({"img_s": result["img_s"]})


def ray_train(config: dict, classifier: str, sizes: Sizes, cuda: bool, storage: str) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    Path(storage).mkdir(parents=True, exist_ok=True)
    result = Path(storage, "result.json")
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config={"config": config, "classifier": classifier, "sizes": asdict(sizes),
                           "result": str(result)},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=cuda, resources_per_worker={"CPU": 1, **({"GPU": 1} if cuda else {})}),
        run_config=ray.train.RunConfig(name="gpu_check", storage_path=storage),
    )
    trainer.fit()
    return json.loads(result.read_text())


class CamBench:
    """A CAM actor as `cse-ray infer` places it, timing `multiscale_cam` on made-up images."""

    def __init__(self, backbone: str, state_ref: list) -> None:
        import ray

        from cse_ray.models import build_classifier

        torch.set_num_threads(1)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model = build_classifier(backbone, num_classes=NUM_CLASSES)
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.eval().to(self.device)
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]

    def run(self, count: int, hw: tuple[int, int], scales: tuple[float, ...], bf16: bool) -> dict:
        from cse_ray.cam import multiscale_cam

        rng = np.random.default_rng(os.getpid())
        label = np.zeros(NUM_CLASSES, np.float32)
        label[[3, 11]] = 1.0
        amp = torch.bfloat16 if bf16 else None
        for _ in range(count):
            image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
            multiscale_cam(self.model, image, label, scales, self.device, amp)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"gpu_ids": self.gpu_ids, "pid": os.getpid()}


def cam_actors(state_ref, sizes: Sizes, actors: int) -> dict[str, dict]:
    """img/s of `actors` CAM actors at once, each asking Ray for 1 / actors of the GPU, fp32 and bf16."""
    import ray

    from cse_ray.config import load_config
    from cse_ray.infer.workers import scheduling_options

    cfg = load_config(None, ["data.synth.enabled=true", f"infer.gpus_per_actor={1 / actors:g}",
                             f"infer.num_actors={actors}", f"infer.cpus_per_actor={1 / actors:g}"])
    options = scheduling_options("cam", cfg, use_gpu=True)
    pool = [ray.remote(CamBench).options(**options).remote(sizes.backbone, [state_ref])
            for _ in range(actors)]
    share = sizes.cam_images // actors
    results = {}
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        ray.get([actor.run.remote(1, sizes.cam_hw, sizes.scales, bf16) for actor in pool])  # warm-up
        start = time.perf_counter()
        seen = ray.get([actor.run.remote(share, sizes.cam_hw, sizes.scales, bf16) for actor in pool])
        seconds = time.perf_counter() - start
        results[precision] = {"img_s": share * actors / seconds, "num_gpus": options["num_gpus"],
                              "gpu_ids": sorted({i for s in seen for i in s["gpu_ids"]}),
                              "actors": len({s["pid"] for s in seen})}
    for actor in pool:
        ray.kill(actor)
    return results


def crf_per_core(sizes: Sizes) -> dict:
    """Dense CRF of every alpha of an image, in images per CPU-second of this process (one core)."""
    from cse_ray.config import CrfConfig
    from cse_ray.crf import crf_refine

    params = CrfConfig(iterations=sizes.crf_iterations)
    rng = np.random.default_rng(0)
    height, width = sizes.cam_hw
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    cams = np.stack([np.exp(-((yy - 0.3) ** 2 + (xx - 0.3) ** 2) * 20),
                     np.exp(-((yy - 0.6) ** 2 + (xx - 0.7) ** 2) * 10)]).astype(np.float32)
    start = time.process_time()
    for _ in range(sizes.crf_images):
        for alpha in params.alphas:
            crf_refine(image, cams, [3, 11], alpha, params)
    return {"img_s_per_core": sizes.crf_images / (time.process_time() - start)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny network and sizes, 1-2 steps")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    sizes = DRY if args.dry_run else FULL
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to run the same code on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows: list[dict] = []

    def row(part: str, setting: str, **values) -> None:
        rows.append({"part": part, "setting": setting, **values})
        print(f"[{time.perf_counter() - started:6.1f} s] {part} / {setting}: {values}", flush=True)

    import ray

    from cse_ray.config import to_dict
    from cse_ray.models import build_classifier

    with tempfile.TemporaryDirectory(prefix="cse-gpu-check-") as tmp:
        torch.manual_seed(0)
        network = build_classifier(sizes.backbone, num_classes=NUM_CLASSES)
        classifier = str(Path(tmp, "classifier.pth"))
        torch.save(network.state_dict(), classifier)

        # 1. the train-cse step, plain loop
        variants = {"fp32": (False, False), "bf16": (True, False), "bf16 + channels-last": (True, True)}
        plain = {}
        for name, (bf16, channels_last) in variants.items():
            config = to_dict(stage_config(sizes, classifier, bf16, channels_last))
            plain[name] = train_epochs(config, classifier, sizes, device)
            row("train-cse step", name, **plain[name])
            if cuda:
                torch.cuda.empty_cache()

        # 2. Ray Train, 1 worker, against the plain loop (fp32)
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        ray.init(num_cpus=max(2, os.cpu_count() or 2) if cuda else 2, num_gpus=1, include_dashboard=False,
                 log_to_driver=False)
        print(f"[{time.perf_counter() - started:6.1f} s] Ray started", flush=True)
        try:
            config = to_dict(stage_config(sizes, classifier))
            metrics = ray_train(config, classifier, sizes, cuda, str(Path(tmp, "ray")))
            overhead = (plain["fp32"]["img_s"] / metrics["img_s"] - 1) * 100
            row("train-cse step on Ray Train, 1 worker", "fp32, nccl" if cuda else "fp32, gloo",
                img_s=metrics["img_s"], peak_gib=metrics["peak_gib"], nccl=bool(metrics["nccl"]),
                overhead_pct=overhead)

            # 3. CAM inference on actors
            state_ref = ray.put({k: v.cpu() for k, v in network.state_dict().items()})
            cams = {actors: cam_actors(state_ref, sizes, actors) for actors in (1, 4)}
            for precision in ("fp32", "bf16"):
                for actors in (1, 4):
                    row("CAM inference, multi-scale + flip", f"{precision}, {actors} actor(s)",
                        **cams[actors][precision])
        finally:
            ray.shutdown()

    # 4. dense CRF
    row("dense CRF (alphas 6/10/24)", f"{sizes.crf_iterations} iterations", **crf_per_core(sizes))

    print(f"\n{'DRY RUN (CPU, tiny sizes): code paths only, not figures' if args.dry_run else 'GPU check'}: "
          f"{sizes.backbone}, crop {sizes.crop}, batch {sizes.batch}; CAMs of {sizes.cam_hw[1]}x"
          f"{sizes.cam_hw[0]} images at scales {'/'.join(f'{s:g}' for s in sizes.scales)} + flip; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"dry_run": args.dry_run, "sizes": asdict(sizes), "rows": rows},
                                              indent=2))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| part | setting | img/s | peak GPU memory | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        rate = r.get("img_s", r.get("img_s_per_core"))
        peak = r.get("peak_gib", float("nan"))
        notes = []
        if "overhead_pct" in r:
            notes.append(f"Ray overhead vs the plain loop {r['overhead_pct']:+.1f} %, nccl {r['nccl']}")
        if "gpu_ids" in r:
            notes.append(f"{r['actors']} actors x {r['num_gpus']:g} GPU, GPU ids {r['gpu_ids']}")
        if "img_s_per_core" in r:
            notes.append("images per CPU-second (per core)")
        lines.append(f"| {r['part']} | {r['setting']} | {rate:.2f} | "
                     f"{'-' if peak != peak else f'{peak:.2f} GiB'} | {'; '.join(notes)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
