"""The CSE objective: mask-class choice, erasing mask, losses, and what one training step may change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cse_ray.models import build_classifier
from cse_ray.objective import (
    cam_losses,
    choose_mask_classes,
    cse_losses,
    erase_mask,
    erase_weight,
    freeze_classifier,
    freeze_eraser_layers,
    set_train_mode,
    topk_recall,
)
from cse_ray.optim import ERASER_SCRATCH, build_optimizer

NUM_CLASSES = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_labels(n: int, seed: int, density: float = 0.2) -> torch.Tensor:
    """Multi-hot labels with at least one class per image."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, NUM_CLASSES, generator=gen) < density).float()
    labels[torch.arange(n), torch.randint(0, NUM_CLASSES, (n,), generator=gen)] = 1.0
    return labels


def _is_frozen_name(name: str) -> bool:
    top = name.split(".", 1)[0]
    return top == "conv1a" or top == "b2" or top.startswith("b2_") or ".bn" in name or top == "bn7"


# ---------------------------------------------------------------- mask-class choice

def test_mask_class_is_always_a_present_class_and_only_it_is_removed():
    gen = torch.Generator().manual_seed(1)
    for trial in range(50):
        labels = random_labels(32, seed=trial)
        mask_class, label_remain = choose_mask_classes(labels, gen)
        assert mask_class.dtype == torch.int64 and mask_class.shape == (32,)
        assert torch.all(labels[torch.arange(32), mask_class] == 1.0)
        removed = labels - label_remain
        assert torch.all(removed.sum(dim=1) == 1.0)
        assert torch.equal(removed.argmax(dim=1), mask_class)
        assert torch.all(label_remain >= 0)


def test_mask_class_choice_is_reproducible_for_a_seed():
    labels = random_labels(64, seed=3, density=0.5)
    first, _ = choose_mask_classes(labels, torch.Generator().manual_seed(42))
    again, _ = choose_mask_classes(labels, torch.Generator().manual_seed(42))
    other, _ = choose_mask_classes(labels, torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_mask_class_is_uniform_among_present_classes():
    labels = torch.zeros(4000, NUM_CLASSES)
    labels[:, [2, 5, 11, 19]] = 1.0
    mask_class, _ = choose_mask_classes(labels, torch.Generator().manual_seed(0))
    counts = torch.bincount(mask_class, minlength=NUM_CLASSES)
    assert counts.sum() == 4000 and counts[[2, 5, 11, 19]].sum() == 4000
    assert torch.all((counts[[2, 5, 11, 19]] > 850) & (counts[[2, 5, 11, 19]] < 1150)), counts


def test_single_class_image_gets_an_all_zero_remaining_label():
    labels = torch.zeros(3, NUM_CLASSES)
    labels[0, 7] = 1.0
    labels[1, [1, 4]] = 1.0
    labels[2, 19] = 1.0
    mask_class, label_remain = choose_mask_classes(labels, torch.Generator().manual_seed(0))
    assert mask_class[0] == 7 and mask_class[2] == 19
    assert label_remain[0].sum() == 0 and label_remain[2].sum() == 0
    assert label_remain[1].sum() == 1


def test_image_without_class_is_rejected():
    labels = random_labels(4, seed=0)
    labels[2] = 0.0
    with pytest.raises(ValueError, match=r"\[2\]"):
        choose_mask_classes(labels, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- erasing mask

def test_erase_mask_takes_the_mask_class_upsampled_and_rectified():
    cam = torch.randn(3, NUM_CLASSES, 5, 7, generator=torch.Generator().manual_seed(0))
    mask_class = torch.tensor([4, 0, 19])
    mask = erase_mask(cam, mask_class, (40, 56), normalize="image")
    assert mask.shape == (3, 1, 40, 56)
    full = F.relu(F.interpolate(cam, size=(40, 56), mode="bilinear", align_corners=False))
    expected = full[torch.arange(3), mask_class].unsqueeze(1)
    expected = expected / (expected.amax(dim=(1, 2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(mask, expected)


def test_erase_mask_batch_normalisation_uses_the_batch_maximum():
    cam = torch.rand(3, NUM_CLASSES, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    cam[1] *= 10.0  # one image with a much stronger CAM
    mask_class = torch.tensor([0, 0, 0])
    batch = erase_mask(cam, mask_class, (32, 32), normalize="batch")
    per_image = erase_mask(cam, mask_class, (32, 32), normalize="image")
    peaks_batch = batch.amax(dim=(1, 2, 3))
    peaks_image = per_image.amax(dim=(1, 2, 3))
    assert abs(float(batch.max()) - 1.0) < 1e-4
    assert float(peaks_batch[0]) < 0.5 and float(peaks_batch[2]) < 0.5
    torch.testing.assert_close(peaks_image, torch.ones(3), atol=1e-4, rtol=0)
    assert float(batch.min()) >= 0.0 and float(per_image.min()) >= 0.0


def test_erase_mask_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="normalize"):
        erase_mask(torch.zeros(1, NUM_CLASSES, 2, 2), torch.tensor([0]), (16, 16), normalize="global")


def test_erase_weight_grows_linearly_with_epoch():
    assert erase_weight(0.3, 0.05, 0) == pytest.approx(0.3)
    assert erase_weight(0.3, 0.05, 14) == pytest.approx(1.0)


def test_topk_recall_counts_present_classes_among_the_top_k_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    right, total = topk_recall(logits, labels)
    assert int(right) == 2 and int(total) == 3


# ---------------------------------------------------------------- losses and one step

@pytest.fixture
def networks():
    torch.manual_seed(0)
    eraser = build_classifier("resnet38d_tiny", dropout=(0.3, 0.5))
    classifier = build_classifier("resnet38d_tiny")
    freeze_classifier(classifier)
    freeze_eraser_layers(eraser)
    set_train_mode(eraser)
    return eraser, classifier


def test_set_train_mode_keeps_frozen_batchnorms_in_eval(networks):
    eraser, _ = networks
    assert eraser.training and eraser.b6.dropout_2b1.training
    batchnorms = [m for m in eraser.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    eraser.train()  # a plain train() flips them back, which is why set_train_mode exists
    assert all(m.training for m in batchnorms)


def test_cse_losses_combine_classification_and_weighted_erasing_loss(networks):
    eraser, classifier = networks
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = random_labels(4, seed=1)
    generator = torch.Generator().manual_seed(5)
    losses = cse_losses(eraser, classifier, images, labels, w=0.45, generator=generator)
    assert set(losses) >= {"cls", "erase", "total", "acc_er", "acc_cl", "mask_mean"}
    torch.testing.assert_close(losses["total"], losses["cls"] + 0.45 * losses["erase"])
    assert losses["total"].requires_grad and not losses["acc_er"].requires_grad
    assert 0.0 <= float(losses["mask_mean"]) <= 1.0 and 0.0 <= float(losses["acc_er"]) <= 1.0


def test_erasing_loss_reaches_the_eraser_through_the_frozen_classifier(networks):
    eraser, classifier = networks
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    losses = cse_losses(eraser, classifier, images, random_labels(4, seed=2), w=1.0,
                        generator=torch.Generator().manual_seed(0))
    trainable = [p for p in eraser.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses["erase"], trainable, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert grads[-1] is not None and float(grads[-1].abs().sum()) > 0  # fc8 of the eraser


def test_one_cse_step_changes_only_the_erasers_trainable_parameters(networks):
    eraser, classifier = networks
    eraser_before = {k: v.clone() for k, v in eraser.state_dict().items()}
    classifier_before = {k: v.clone() for k, v in classifier.state_dict().items()}
    optimizer = build_optimizer(eraser, lr=0.05, weight_decay=5e-4, max_step=10, mode="fixed",
                                scratch=ERASER_SCRATCH)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    losses = cse_losses(eraser, classifier, images, random_labels(4, seed=3), w=0.3,
                        generator=torch.Generator().manual_seed(0))
    optimizer.zero_grad()
    losses["total"].backward()
    optimizer.step()

    trainable = {name for name, p in eraser.named_parameters() if p.requires_grad}
    assert "fc8.weight" in trainable and "b3.conv_branch2a.weight" in trainable
    assert not any(_is_frozen_name(name) for name in trainable)
    after = eraser.state_dict()
    for name, before in eraser_before.items():
        if name in trainable:
            assert not torch.equal(after[name], before), f"{name} did not move"
        else:  # conv1a, b2*, BatchNorm affine and running statistics
            assert torch.equal(after[name], before), f"frozen {name} moved"
    for name, before in classifier_before.items():
        assert torch.equal(classifier.state_dict()[name], before), f"classifier {name} moved"
    assert all(p.grad is None for p in classifier.parameters())


def test_cam_losses_train_the_ordinary_classifier():
    torch.manual_seed(0)
    # no dropout, frozen BatchNorms: the training forward equals the eval forward
    model = set_train_mode(freeze_eraser_layers(build_classifier("resnet38d_tiny", dropout=(0.0, 0.0))))
    images = torch.randn(2, 3, 32, 32)
    labels = random_labels(2, seed=4)
    losses = cam_losses(model, images, labels)
    with torch.no_grad():
        _, logits = model(images)
    torch.testing.assert_close(losses["cls"], F.binary_cross_entropy_with_logits(logits, labels))
    torch.testing.assert_close(losses["total"], losses["cls"])
    losses["total"].backward()
    assert model.fc8.weight.grad is not None and model.conv1a.weight.grad is None


def test_freezing_sees_through_a_data_parallel_wrapper():
    wrapped = torch.nn.DataParallel(build_classifier("resnet38d_tiny"))
    freeze_eraser_layers(wrapped)
    network = wrapped.module
    assert not network.conv1a.weight.requires_grad and not network.b2.conv_branch1.weight.requires_grad
    assert network.b3.conv_branch2a.weight.requires_grad and network.fc8.weight.requires_grad
