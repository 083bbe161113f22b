"""N workers take the same OC-CSE step as one: two gloo processes under DDP against one process.

Every BatchNorm is frozen (as psa/OC-CSE freeze them) and both runs start from the same weights; the
global batch of 4 images is split 2 + 2. Without dropout, and with dropout whose masks are drawn per
sample (`dropout_rng: sample`, `cse_ray.models.sample_dropout`), the erasing masks, the losses and the
parameters after a few SGD steps must agree to float tolerance; with each worker's own torch stream
(`dropout_rng: worker`) they do not. The mask normalisation does not depend on the split, because the
maximum is taken over the global batch with the reference's gradient (objective.global_batch_max).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cse_ray.models import build_classifier, sample_dropout
from cse_ray.objective import (
    choose_mask_classes,
    cse_losses,
    erase_mask,
    freeze_classifier,
    freeze_eraser_layers,
    set_train_mode,
)

STEPS = 3
BATCH = 4
WORLD = 2
SEED = 4242
DROPOUT = {"off": (0.0, 0.0, 0.0), "sample": (0.3, 0.5, 0.5), "worker": (0.3, 0.5, 0.5)}  # b6, b7, head


def _networks(mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    *rates, head = DROPOUT[mode]
    eraser = build_classifier("resnet38d_tiny", dropout=rates, head_dropout=head)
    classifier = freeze_classifier(build_classifier("resnet38d_tiny", dropout=(0.0, 0.0)))
    return freeze_eraser_layers(eraser), classifier


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    labels = torch.zeros(BATCH, 20)
    labels[torch.arange(BATCH), torch.tensor([3, 7, 11, 15])] = 1.0
    labels[0, 5] = labels[2, 9] = 1.0
    scores = torch.rand(BATCH, 20, generator=generator)
    return images, labels, scores


def _steps(eraser, classifier, images, labels, scores, indices: range, mode: str) -> dict:
    """STEPS plain SGD steps; the masks and losses of every step, the parameters at the end.

    With `sample`, step s draws sample i's dropout masks from the key (SEED, s, i), as training does
    from (seed, epoch, sample index); otherwise from torch's stream.
    """
    optimizer = torch.optim.SGD([p for p in eraser.parameters() if p.requires_grad], lr=0.5)
    masks, losses = [], []
    set_train_mode(eraser)
    for step in range(STEPS):
        keys = [(SEED, step, i) for i in indices] if mode == "sample" else None
        with sample_dropout(eraser, keys):
            cam, _ = eraser(images)
            mask_class, _ = choose_mask_classes(labels, scores=scores)
            masks.append(erase_mask(cam.detach().float(), mask_class, images.shape[-2:]))
            out = cse_losses(eraser, classifier, images, labels, w=1.0, scores=scores)
        losses.append(torch.stack([out["cls"].detach(), out["erase"].detach()]))
        optimizer.zero_grad()
        out["total"].backward()
        optimizer.step()
    network = getattr(eraser, "module", eraser)
    return {"masks": torch.stack(masks), "losses": torch.stack(losses),
            "params": torch.cat([p.detach().flatten() for p in network.parameters()])}


def _worker(rank: int, port: int, result_dir: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        eraser, classifier = _networks(mode)
        ddp = torch.nn.parallel.DistributedDataParallel(eraser)
        if rank:  # what training does: ranks > 0 draw their own torch stream (train.loop.begin_epoch)
            torch.manual_seed(1000 + rank)
        images, labels, scores = _batch()
        share = range(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        part = slice(share.start, share.stop)
        result = _steps(ddp, classifier, images[part], labels[part], scores[part], share, mode)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(mode) -> (one process, [the two workers]), each computed once per module."""
    done: dict[str, tuple[dict, list[dict]]] = {}

    def run(mode: str) -> tuple[dict, list[dict]]:
        if mode not in done:
            directory = tmp_path_factory.mktemp(f"ddp-{mode}")
            mp.spawn(_worker, args=(_free_port(), str(directory), mode), nprocs=WORLD, join=True)
            workers = [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]
            torch.set_num_threads(1)
            eraser, classifier = _networks(mode)
            done[mode] = _steps(eraser, classifier, *_batch(), range(BATCH), mode), workers
        return done[mode]

    return run


@pytest.mark.parametrize("mode", ["off", "sample"])
def test_two_workers_erase_with_the_global_batch_maximum(runs, mode):
    one_process, two_workers = runs(mode)
    split = torch.cat([w["masks"] for w in two_workers], dim=1)  # steps x batch x 1 x H x W
    assert torch.allclose(split, one_process["masks"], atol=1e-6)


def test_the_split_would_matter_with_per_worker_maxima(runs):
    """The check has teeth: in this batch a worker's own maximum is not the global one."""
    single = runs("off")[0]["masks"][0]
    halves = single[: BATCH // 2], single[BATCH // 2:]
    assert min(float(h.amax()) for h in halves) < 1.0 - 1e-3  # normalised by the other half's peak


@pytest.mark.parametrize("mode", ["off", "sample"])
def test_two_workers_take_the_same_steps_as_one(runs, mode):
    one_process, two_workers = runs(mode)
    mean_losses = torch.stack([w["losses"] for w in two_workers]).mean(dim=0)
    assert torch.allclose(mean_losses, one_process["losses"], rtol=1e-5, atol=1e-6)
    for worker in two_workers:  # DDP keeps the replicas identical, and equal to the single process
        assert torch.allclose(worker["params"], one_process["params"], rtol=1e-4, atol=1e-6)
    assert not torch.equal(one_process["params"], _initial_params(mode))  # the steps did move the weights


def test_per_sample_dropout_is_on_and_each_workers_stream_would_change_the_step(runs):
    """The dropout case has teeth: its masks move the step (against no dropout), and drawn from each
    worker's torch stream they make two workers step differently from one."""
    sample, off = runs("sample")[0], runs("off")[0]
    assert (sample["masks"] - off["masks"]).abs().max() > 0.05
    one_process, two_workers = runs("worker")
    split = torch.cat([w["masks"] for w in two_workers], dim=1)
    assert (split - one_process["masks"]).abs().max() > 0.05
    assert not torch.allclose(two_workers[0]["params"], one_process["params"], rtol=1e-4, atol=1e-6)


def _initial_params(mode: str) -> torch.Tensor:
    eraser, _ = _networks(mode)
    return torch.cat([p.detach().flatten() for p in eraser.parameters()])

