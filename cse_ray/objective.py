"""The training objectives of the two stages as plain functions, separate from any training loop.

Everything here stays on the tensors' device: no ``.item()``, ``.cpu()`` or data-dependent Python
branching in the per-step path, so a step never waits on the accelerator (the reference synchronises
per sample for its accuracy counters and its mask-class choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cse_ray.models import frozen_layer_names, unwrap

MASK_NORMALIZATIONS = ("batch", "image")
"""How the erasing mask is scaled to [0, 1]: by the maximum over the batch (the reference) or per image."""

MASK_EPS = 1e-5


def choose_mask_classes(labels: Tensor, generator: torch.Generator | None = None,
                        scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pick one present class per image uniformly at random; return it and the label without it.

    Vectorised: i.i.d. uniform scores on the present classes, argmax. The scores are drawn on the
    generator's device (a CPU generator gives the same choice whatever device the labels live on), or
    given as ``scores`` (N x C in [0, 1)) when the caller derives them per sample, as training does so
    that the choice does not depend on how a batch is split over workers.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be N x C, got shape {tuple(labels.shape)}")
    present = labels > 0.5
    has_class = present.any(dim=1)
    if labels.device.type == "cpu":
        if not bool(has_class.all()):
            empty = torch.nonzero(~has_class).flatten().tolist()
            raise ValueError(f"images at batch positions {empty} have no class: cannot choose a mask class")
    else:
        # No host sync on accelerators: the check is asserted on the device.
        torch._assert_async(has_class.all(), "an image in the batch has no class: cannot choose a mask class")
    if scores is None:
        if generator is None:
            raise ValueError("choose_mask_classes needs a generator or precomputed scores")
        scores = torch.rand(labels.shape, generator=generator, device=generator.device)
    scores = scores.to(labels.device).masked_fill(~present, -1.0)
    mask_class = scores.argmax(dim=1)
    label_remain = labels.clone()
    label_remain.scatter_(1, mask_class.unsqueeze(1), 0.0)
    return mask_class, label_remain


def erase_mask(cam_er: Tensor, mask_class: Tensor, image_hw: tuple[int, int] | torch.Size,
               normalize: str = "batch") -> Tensor:
    """The mask-class CAM at image size, ReLU, scaled by (max + 1e-5): N x 1 x H x W.

    ``normalize="batch"`` takes the maximum over the whole batch as the reference does, so an image
    whose CAM is weak is erased weakly; under DDP that is the global batch of all workers
    (`global_batch_max`), so N workers erase exactly as one. ``"image"`` scales each image by its own
    maximum, which no split can change. Selecting the channel before upsampling is the same as after
    (bilinear interpolation is per channel) and cheaper.
    """
    if normalize not in MASK_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {MASK_NORMALIZATIONS}, got {normalize!r}")
    n, _, h, w = cam_er.shape
    index = mask_class.view(n, 1, 1, 1).expand(n, 1, h, w)
    selected = cam_er.gather(1, index)
    mask = F.relu(F.interpolate(selected, size=tuple(image_hw), mode="bilinear", align_corners=False))
    if normalize == "batch":
        peak = global_batch_max(mask.amax())
    else:
        peak = mask.amax(dim=(1, 2, 3), keepdim=True)
    return mask / (peak + MASK_EPS)


class _GlobalMax(torch.autograd.Function):
    """The maximum of one scalar per worker, with the gradient of a maximum over the gathered batch.

    Forward: an all-reduce MAX. Backward: the reference (DataParallel) computes every image's loss
    from one batch-wide maximum, so d(total loss)/d(max) collects a term from every image and flows
    to the image that holds the maximum. Here each worker's loss only sees its own images, so the
    gradients with respect to the maximum are summed over workers (an all-reduce SUM) and handed to
    the worker(s) holding it; DDP's gradient averaging then gives the single-process step exactly.
    """

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        import torch.distributed as dist

        peak = local.detach().clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        holds = (local.detach() == peak).to(local.dtype)
        holders = holds.clone()
        dist.all_reduce(holders)  # ties between workers share the gradient, as amax shares it
        ctx.save_for_backward(holds / holders)
        return peak

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        (share,) = ctx.saved_tensors
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total * share


def global_batch_max(local_max: Tensor) -> Tensor:
    """The maximum over every worker's batch (this process's maximum when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_max
    return _GlobalMax.apply(local_max)


def topk_recall(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's accuracy counters, on device: (right, total) over the present labels.

    For an image with k present classes, a present class counts as right when it is among the k
    highest logits. Images with no present class contribute nothing.
    """
    present = labels > 0.5
    num_present = present.sum(dim=1, keepdim=True)
    # rank[n, c] = how many logits of image n are strictly greater than logit c
    rank = (logits.unsqueeze(1) > logits.unsqueeze(2)).sum(dim=2)
    right = (present & (rank < num_present)).sum()
    return right, present.sum()


def _ratio(right: Tensor, total: Tensor) -> Tensor:
    return (right.float() / total.clamp_min(1).float()).detach()


def cse_losses(eraser: nn.Module, classifier: nn.Module, images: Tensor, labels: Tensor, w: float,
               generator: torch.Generator | None = None, normalize: str = "batch",
               scores: Tensor | None = None) -> dict[str, Tensor]:
    """One OC-CSE step's losses: the eraser's classification loss plus w times the erasing loss.

    The classifier must be frozen (``freeze_classifier``); gradients still flow through it into the
    erased image, the mask, and so into the eraser. Keys: ``cls``, ``erase``, ``total`` (for
    backward) and detached diagnostics ``acc_er``, ``acc_cl`` (top-k recall as in the reference, on
    ``logits_er`` vs the label and ``logits_cl`` vs ``label_remain``) and ``mask_mean``.
    """
    labels = labels.to(dtype=torch.float32)
    mask_class, label_remain = choose_mask_classes(labels, generator, scores)
    cam_er, logits_er = eraser(images)
    mask = erase_mask(cam_er.float(), mask_class, images.shape[-2:], normalize)
    erased = images * (1.0 - mask)
    _, logits_cl = classifier(erased)
    cls = F.binary_cross_entropy_with_logits(logits_er.float(), labels)
    erase = F.binary_cross_entropy_with_logits(logits_cl.float(), label_remain)
    return {
        "cls": cls,
        "erase": erase,
        "total": cls + w * erase,
        "acc_er": _ratio(*topk_recall(logits_er.detach(), labels)),
        "acc_cl": _ratio(*topk_recall(logits_cl.detach(), label_remain)),
        "mask_mean": mask.detach().mean(),
    }


def cam_losses(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The ordinary classifier's loss (psa train_cls): multi-label BCE on the pooled logits."""
    labels = labels.to(dtype=torch.float32)
    _, logits = model(images)
    cls = F.binary_cross_entropy_with_logits(logits.float(), labels)
    return {"cls": cls, "total": cls, "acc": _ratio(*topk_recall(logits.detach(), labels))}


def erase_weight(cc_init: float, cc_slope: float, epoch: int) -> float:
    """The weight of the erasing loss, growing linearly with the (0-based) epoch."""
    return float(cc_init) + float(cc_slope) * float(epoch)


def freeze_classifier(model: nn.Module) -> nn.Module:
    """The frozen ordinary classifier of OC-CSE: eval mode (BN statistics, dropout off), no grads."""
    model.eval()
    model.requires_grad_(False)
    return model


def _is_frozen_batchnorm(module: nn.Module) -> bool:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def freeze_eraser_layers(model: nn.Module) -> nn.Module:
    """Freeze conv1a, b2, b2_1, b2_2 and every BatchNorm (affine and running statistics, eval mode).

    Used for the eraser and also for the ordinary classifier's own training (psa's train_cls and
    OC-CSE freeze the same layers). Call ``set_train_mode`` instead of ``model.train()`` afterwards,
    and freeze before wrapping in DistributedDataParallel (it records which parameters need grads).
    """
    network = unwrap(model)
    for name in frozen_layer_names(network):
        network.get_submodule(name).requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
            module.eval()
    return model


def set_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()`` that keeps frozen BatchNorms in eval mode, so their running stats never move.

    A BatchNorm counts as frozen when none of its affine parameters requires grad (what
    ``freeze_eraser_layers`` leaves), so the rule has a single source of truth.
    """
    model.train()
    for module in model.modules():
        if _is_frozen_batchnorm(module):
            module.eval()
    return model
