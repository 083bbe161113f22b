"""Time one OC-CSE training step: ours (losses and counters on the device) vs the reference's way.

The reference's step (as OC-CSE's training code behaves) chooses the mask class with a Python loop over
the batch (a ``nonzero`` per image), selects the mask by boolean indexing, and after each step copies
every image's logits to the host for its accuracy counters and calls ``.item()`` on each loss: several
host synchronisations per image per step. Ours keeps all of that on the device, so the host can queue
the next step while the accelerator works. On a CPU both are bound by the same convolutions, so expect
a ratio near 1 there; the difference is a GPU one.

    python benchmarks/train_step.py --device cpu --steps 3
    python benchmarks/train_step.py --device cuda --steps 20 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from cse_ray.labels import VOC
from cse_ray.models import build_classifier
from cse_ray.objective import cse_losses, freeze_classifier, freeze_eraser_layers, set_train_mode
from cse_ray.optim import ERASER_SCRATCH, build_optimizer

CASES = {
    # name: (variant, batch, crop)
    "tiny": ("resnet38d_tiny", 8, 96),
    "full": ("resnet38d", 2, 128),
}
NUM_CLASSES = VOC.num_classes  # the benchmark measures the VOC heads
ERASE_WEIGHT = 0.3


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OurStep:
    """``cse_losses`` + backward + SGD; running sums of the diagnostics stay on the device."""

    def __init__(self, eraser, classifier, optimizer, device: torch.device, bf16: bool) -> None:
        self.eraser, self.classifier, self.optimizer = eraser, classifier, optimizer
        self.device, self.bf16 = device, bf16
        self.generator = torch.Generator().manual_seed(0)
        self.running: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with _autocast(self.device, self.bf16):
            losses = cse_losses(self.eraser, self.classifier, images, labels, ERASE_WEIGHT, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        for key, value in losses.items():
            self.running[key] = self.running.get(key, 0.0) + value.detach()


class ReferenceWayStep:
    """The same step with the reference's per-image host round trips."""

    def __init__(self, eraser, classifier, optimizer, device: torch.device, bf16: bool) -> None:
        self.eraser, self.classifier, self.optimizer = eraser, classifier, optimizer
        self.device, self.bf16 = device, bf16
        self.right = [0, 0]
        self.wrong = [0, 0]
        self.running_loss = [0.0, 0.0]

    def _split_label(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label_mask = torch.zeros_like(labels)
        label_remain = labels.clone()
        for i in range(labels.shape[0]):
            present = torch.nonzero(labels[i], as_tuple=False)  # host sync per image
            pick = present[torch.randint(0, len(present), (1,))][0]
            label_remain[i, pick] = 0
            label_mask[i, pick] = 1
        return label_mask, label_remain

    def _count(self, logits: torch.Tensor, labels: torch.Tensor, slot: int) -> None:
        for b in range(labels.shape[0]):
            truth = labels[b].detach().cpu().numpy()  # host copy per image
            present = np.nonzero(truth)[0]
            predicted = logits[b].detach().float().cpu().numpy().argsort()[-len(present):][::-1]
            for c in present:
                if c in predicted:
                    self.right[slot] += 1
                else:
                    self.wrong[slot] += 1

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        label_mask, label_remain = self._split_label(labels)
        with _autocast(self.device, self.bf16):
            cam_er, logits_er = self.eraser(images)
            mask = cam_er.float()[label_mask == 1, :, :].unsqueeze(1)  # boolean indexing: host sync
            mask = F.relu(F.interpolate(mask, images.shape[2:], mode="bilinear", align_corners=False))
            mask = mask / (mask.max() + 1e-5)
            _, logits_cl = self.classifier(images * (1 - mask))
            loss_all = F.binary_cross_entropy_with_logits(logits_er.float(), labels)
            loss_select = ERASE_WEIGHT * F.binary_cross_entropy_with_logits(logits_cl.float(), label_remain)
        self.optimizer.zero_grad()
        (loss_all + loss_select).backward()
        self.optimizer.step()
        self._count(logits_er, labels, 0)
        self._count(logits_cl, label_remain, 1)
        self.running_loss[0] += loss_all.item()
        self.running_loss[1] += loss_select.item()


def _batch(batch: int, crop: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, crop, crop, generator=gen)
    labels = (torch.rand(batch, NUM_CLASSES, generator=gen) < 0.15).float()
    labels[torch.arange(batch), torch.randint(0, NUM_CLASSES, (batch,), generator=gen)] = 1.0
    return images.to(device), labels.to(device)


def _time(step, batches, warmup: int, device: torch.device) -> float:
    for images, labels in batches[:warmup]:
        step(images, labels)
    _sync(device)
    start = time.perf_counter()
    for images, labels in batches[warmup:]:
        step(images, labels)
    _sync(device)
    return time.perf_counter() - start


def run_case(name: str, device: torch.device, steps: int, warmup: int, bf16: bool) -> dict[str, float]:
    variant, batch, crop = CASES[name]
    torch.manual_seed(0)
    classifier = freeze_classifier(build_classifier(variant).to(device))
    eraser = set_train_mode(freeze_eraser_layers(build_classifier(variant, dropout=(0.3, 0.5)).to(device)))
    eraser_twin = copy.deepcopy(eraser)
    batches = [_batch(batch, crop, seed, device) for seed in range(warmup + steps)]
    kwargs = {"lr": 0.01, "weight_decay": 5e-4, "max_step": 10_000, "scratch": ERASER_SCRATCH}
    ours = OurStep(eraser, classifier, build_optimizer(eraser, **kwargs), device, bf16)
    reference_optimizer = build_optimizer(eraser_twin, **kwargs)
    reference = ReferenceWayStep(eraser_twin, classifier, reference_optimizer, device, bf16)
    # Two rounds in A-B-B-A order, so drifting load on a shared machine hits both sides alike.
    seconds_reference = _time(reference, batches, warmup, device)
    seconds_ours = _time(ours, batches, warmup, device)
    seconds_ours += _time(ours, batches, 0, device)
    seconds_reference += _time(reference, batches, 0, device)
    images = batch * steps + batch * len(batches)  # round one skips the warm-up batches
    return {
        "ours_img_s": images / seconds_ours,
        "reference_img_s": images / seconds_reference,
        "speedup": seconds_reference / seconds_ours,
        "batch": batch,
        "crop": crop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} steps={args.steps} warmup={args.warmup} bf16={args.bf16} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':<6} {'variant':<16} {'batch':>5} {'crop':>5} {'ours img/s':>11} {'ref-way img/s':>14} "
          f"{'ratio':>6}")
    for name in args.cases:
        result = run_case(name, device, args.steps, args.warmup, args.bf16)
        print(f"{name:<6} {CASES[name][0]:<16} {result['batch']:>5} {result['crop']:>5} "
              f"{result['ours_img_s']:>11.2f} {result['reference_img_s']:>14.2f} {result['speedup']:>6.2f}")


if __name__ == "__main__":
    main()
