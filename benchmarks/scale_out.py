"""Exact scale-out: one train-cse epoch on N workers erases as on one worker at the same global batch.

The erasing mask is divided by the maximum over the global batch (`cse_ray.objective.global_batch_max`),
and the dropout masks are drawn per sample (`train_cse.dropout_rng=sample`, the default;
`cse_ray.models.sample_dropout`), so the mean erasing mask (`mask_mean` in the epoch history of
result.json) of N workers must match one worker's. With per-worker maxima it came out 1.31x larger on 4
workers; with each worker's own dropout stream (`--dropout-rng worker`) pairs of runs scatter by
-8 % to +22 %.

    python benchmarks/scale_out.py --out runs/scale_out

What it runs, each step a `cse-ray` command against one Ray cluster (RAY_ADDRESS):
1. `ray start --head --num-cpus=N` with a temp dir of its own (unless RAY_ADDRESS is set already);
2. `cse-ray train-cam` with configs/demo_128.yaml's data (128 px scenes) at 240 training images,
   5 epochs (the classifier);
3. `cse-ray train-cse` one epoch, global batch 8, against that classifier, with the eraser's dropout
   (0.3 / 0.5) drawn as `--dropout-rng` says (default `sample`, as in the configs): 1 worker, then N
   workers with one CPU each, into OUT/<tag><rng>-workers1 and -workersN;
4. prints mask_mean of both, their ratio, and whether it is within the tolerance (5 %);
5. with `--dropout-draws K` (only with `--dropout-rng worker`): the 1-worker epoch again K times in this
   process (the same step function, data order, augmentation and mask classes), draw 0 with the
   training's own random stream and the others with other dropout masks: the spread that dropout alone
   gives mask_mean, against which an N-worker figure drawn from each worker's stream is read.
The cluster it started is stopped through its own `ray start --block` process (never `ray stop`, which
stops every Ray instance on the machine). Reruns skip the stages that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_head(num_cpus: int, env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    """`ray start --head --block` in a session of its own; returns (process, address, temp dir)."""
    base = Path(tempfile.mkdtemp(prefix="rso", dir="/tmp"))  # short: Ray's socket paths have a limit
    gcs, dashboard, agent, client = free_ports(4)
    log = base / "head.log"
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--num-cpus", str(num_cpus), "--num-gpus", "0", "--temp-dir", str(base / "rt"),
               "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard),
               "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
               "--disable-usage-stats"]
    print("$", " ".join(command), flush=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return process, f"127.0.0.1:{gcs}", base


def stop_head(process: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop its node; its own process group gets SIGKILL if that hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of this node only (its own session)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def cse_ray(args: list[str], env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "cse_ray.cli", *args]
    print("$ RAY_ADDRESS=" + env["RAY_ADDRESS"], " ".join(command), flush=True)
    subprocess.run(command, env=env, cwd=REPO, check=True)


def dropout_draws(config: str, overrides: list[str], draws: int) -> list[float]:
    """mask_mean of one 1-worker train-cse epoch per dropout draw, in a plain loop (no Ray)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from cse_ray.config import load_config
    from cse_ray.data.datasets import TrainDataset
    from cse_ray.data.prepare import load_split
    from cse_ray.objective import erase_weight, set_train_mode
    from cse_ray.optim import ERASER_SCRATCH, build_optimizer
    from cse_ray.train import EpochContext, IndexedDataset, build_networks, run_epoch
    from cse_ray.train.loop import seed_everything

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    scfg, cpu = cfg.train_cse, torch.device("cpu")
    split = load_split(cfg, cfg.data.root, "train_list")
    means = []
    for draw in range(draws):
        seed_everything(scfg.seed)  # what every Ray Train worker does first: the same initial weights
        model, frozen = build_networks("train_cse", cfg, scfg.classifier, cpu)
        dataset = TrainDataset(split.root, split.names, split.labels, crop=scfg.crop,
                               resize_long=scfg.resize_long, seed=scfg.seed,
                               jitter_strength=dict(zip(("brightness", "contrast", "saturation", "hue"),
                                                        scfg.jitter)))
        sampler = DistributedSampler(IndexedDataset(dataset), num_replicas=1, rank=0, shuffle=True,
                                     seed=scfg.seed, drop_last=True)
        loader = DataLoader(IndexedDataset(dataset), batch_size=scfg.batch_size, sampler=sampler,
                            drop_last=True)
        steps = len(dataset) // scfg.batch_size
        optimizer = build_optimizer(model, lr=scfg.lr, weight_decay=scfg.weight_decay,
                                    max_step=steps * scfg.epochs, mode=scfg.momentum_mode,
                                    scratch=ERASER_SCRATCH)
        ctx = EpochContext("train_cse", model, frozen, loader, optimizer, cpu, scfg,
                           cfg.data.labels.num_classes, steps)
        dataset.set_epoch(0)
        sampler.set_epoch(0)
        if draw:
            torch.manual_seed(10_000 + draw)  # other dropout masks; nothing else draws from this stream
        set_train_mode(model)
        means.append(run_epoch(ctx, 0, erase_weight(scfg.cc_init, scfg.cc_slope, 0))["mask_mean"])
        print(f"dropout draw {draw}: mask_mean {means[-1]:.5f}", flush=True)
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_128.yaml"))
    parser.add_argument("--out", default=str(REPO / "runs" / "scale_out"))
    parser.add_argument("--train", type=int, default=240, help="training images (data.synth.train)")
    parser.add_argument("--val", type=int, default=20, help="validation images (data.synth.val)")
    parser.add_argument("--cam-epochs", type=int, default=5, help="epochs of the classifier")
    parser.add_argument("--workers", type=int, default=4, help="the N of N workers against 1")
    parser.add_argument("--batch", type=int, default=8, help="global batch of train-cse")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="more train-cse overrides, e.g. train_cse.dropout=[0,0] (runs go to OUT/<tag>)")
    parser.add_argument("--tag", default="", help="name of this comparison's run folders (with overrides)")
    parser.add_argument("--dropout-rng", choices=("sample", "worker"), default="sample",
                        help="train_cse.dropout_rng of both runs: per-sample masks or each worker's stream")
    parser.add_argument("--dropout-draws", type=int, default=0,
                        help="also run the 1-worker epoch this many times with other dropout masks "
                             "(with --dropout-rng worker)")
    args = parser.parse_args()
    if args.dropout_draws and args.dropout_rng != "worker":
        parser.error("--dropout-draws reseeds torch's stream, which only --dropout-rng worker draws from")

    out = Path(args.out).resolve()
    data = [f"data.root={out / 'data'}", f"data.synth.train={args.train}", f"data.synth.val={args.val}"]
    env = {k: v for k, v in os.environ.items()}
    env.setdefault("PYTHONPATH", str(REPO))
    head = None
    if not env.get("RAY_ADDRESS"):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        head, address, base = start_head(args.workers, env)
        env.update(RAY_ADDRESS=address, RAY_TMPDIR=str(base))
    started = time.perf_counter()
    try:
        cse_ray(["train-cam", "--config", args.config, "--out", str(out), *data,
                 f"train_cam.epochs={args.cam_epochs}"], env)
        means = {}
        cse = [*data, f"train_cse.classifier={out / 'train_cam' / 'model.pth'}", "train_cse.epochs=1",
               f"train_cse.batch_size={args.batch}", "train_cse.cpus_per_worker=1", "train_cse.val_images=8",
               f"train_cse.dropout_rng={args.dropout_rng}", *args.overrides]
        for workers in (1, args.workers):
            run = out / f"{args.tag}{args.dropout_rng}-workers{workers}"
            cse_ray(["train-cse", "--config", args.config, "--out", str(run), *cse,
                     f"train_cse.num_workers={workers}"], env)
            epoch = json.loads((run / "train_cse" / "result.json").read_text())["history"][0]
            means[workers] = epoch
    finally:
        if head is not None:
            stop_head(head)
            shutil.rmtree(base, ignore_errors=True)
    one, many = means[1], means[args.workers]
    ratio = many["mask_mean"] / one["mask_mean"]
    print(f"\nglobal batch {args.batch}, {args.train} training images, one epoch of train-cse, "
          f"train_cse.dropout_rng={args.dropout_rng} {' '.join(args.overrides)} "
          f"({time.perf_counter() - started:.0f} s in all)")
    print("| workers | mask_mean | loss | loss_erase | img/s |\n|---:|---:|---:|---:|---:|")
    for workers, epoch in means.items():
        print(f"| {workers} | {epoch['mask_mean']:.5f} | {epoch['loss']:.4f} | {epoch['loss_erase']:.4f} | "
              f"{epoch['images_per_s']:.1f} |")
    within = abs(ratio - 1.0) <= args.tolerance
    print(f"mask_mean ratio {args.workers} workers / 1 worker: {ratio:.4f} "
          f"({'within' if within else 'NOT within'} {args.tolerance:.0%})")
    if args.dropout_draws:
        import statistics

        draws = dropout_draws(args.config, [*cse, "train_cse.num_workers=1"], args.dropout_draws)
        mean, spread = statistics.mean(draws), statistics.stdev(draws)
        print(f"1 worker, {len(draws)} dropout draws: mask_mean {mean:.5f} +- {spread:.5f} "
              f"({spread / mean:.1%}); draw 0 (the training's own stream) {draws[0]:.5f} against Ray's "
              f"{one['mask_mean']:.5f}; {args.workers} workers against the mean of the draws: "
              f"{many['mask_mean'] / mean:.4f} ({(many['mask_mean'] - mean) / spread:+.2f} standard "
              "deviations)")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
