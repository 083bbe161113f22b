"""SampleDropout2d: a sample's channel mask follows its key, wherever in the batch the sample is; without
keys, or in eval mode, it is torch's Dropout2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cse_ray.models import SampleDropout2d, build_affinity_net, build_classifier, sample_dropout
from cse_ray.models.sample_dropout import channel_masks, dropout_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CHANNELS = 64


def _dropout(p: float, keys) -> SampleDropout2d:
    module = SampleDropout2d(p)
    module.sample_keys = keys
    return module


def test_a_samples_mask_is_the_same_at_any_place_in_any_batch():
    x = torch.ones(4, CHANNELS, 3, 3)
    keys = [(7, 0, 11), (7, 0, 12), (7, 0, 13), (7, 0, 14)]
    whole = _dropout(0.5, keys)(x)
    reversed_batch = _dropout(0.5, keys[::-1])(x)
    halves = torch.cat([_dropout(0.5, keys[:2])(x[:2]), _dropout(0.5, keys[2:])(x[2:])])
    assert torch.equal(whole, reversed_batch.flip(0))
    assert torch.equal(whole, halves)
    assert not torch.equal(whole[0], whole[1])  # other samples, other masks
    assert not torch.equal(whole, _dropout(0.5, [(7, 1, 11), (7, 1, 12), (7, 1, 13), (7, 1, 14)])(x))


def test_keyed_masks_do_not_touch_torchs_random_stream():
    x = torch.ones(2, CHANNELS, 2, 2)
    torch.manual_seed(0)
    first = _dropout(0.3, [(1, 0, 0), (1, 0, 1)])(x)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(first, _dropout(0.3, [(1, 0, 0), (1, 0, 1)])(x))
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_whole_channels_are_dropped_and_the_rest_scaled_as_torch_does():
    p, x = 0.3, torch.randn(8, 4096, 2, 3)
    out = _dropout(p, [(5, 2, i) for i in range(8)])(x)
    kept = out.abs().sum(dim=(2, 3)) > 0
    assert torch.allclose(out[kept], x[kept] / (1 - p))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    share = kept.float().mean().item()  # 32768 channels: 1 - p within 5 standard deviations
    assert abs(share - (1 - p)) < 5 * (p * (1 - p) / kept.numel()) ** 0.5
    # the same expected value as torch's: E[out] = x
    masks = channel_masks([(5, 2, i) for i in range(8)], layer=0, channels=4096, p=p)
    assert masks.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert masks.mean().item() == pytest.approx(1.0, abs=0.02)


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(2, CHANNELS, 2, 2)
    module = _dropout(0.5, [(1, 0, 0), (1, 0, 1)]).eval()
    assert torch.equal(module(x), x)
    assert torch.equal(_dropout(0.0, [(1, 0, 0), (1, 0, 1)])(x), x)


def test_without_keys_it_is_torchs_dropout2d():
    x = torch.randn(3, CHANNELS, 2, 2)
    torch.manual_seed(3)
    expected = F.dropout2d(x, 0.4, training=True)
    torch.manual_seed(3)
    assert torch.equal(SampleDropout2d(0.4)(x), expected)


def test_one_key_per_sample_is_required():
    with pytest.raises(ValueError, match="1 sample keys for an input of shape"):
        _dropout(0.5, [(1, 0, 0)])(torch.ones(2, CHANNELS, 2, 2))


def test_the_layers_of_a_sample_draw_different_masks():
    key = [(4242, 0, 9)]
    assert not torch.equal(channel_masks(key, 0, 256, 0.5), channel_masks(key, 1, 256, 0.5))


def test_the_context_numbers_the_networks_layers_and_clears_the_keys():
    torch.manual_seed(0)
    model = build_classifier("resnet38d_tiny", dropout=(0.3, 0.5), head_dropout=0.5).train()
    layers = dropout_layers(model)
    assert [m.p for m in layers] == [0.3, 0.3, 0.5, 0.5, 0.5]  # b6, b7, head
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), sample_dropout(model, [(0, 0, 0), (0, 0, 1)]):
        assert [m.layer for m in layers] == [0, 1, 2, 3, 4]
        first, second = model(images)[0], model(images)[0]
    assert torch.equal(first, second)  # the keys fix every mask
    assert all(m.sample_keys is None for m in layers)
    with torch.no_grad():
        assert not torch.equal(model(images)[0], first)  # torch's stream again
    # no parameters or buffers: the state dict keeps psa's names (AffinityNet's too)
    assert not any("dropout" in name for name in model.state_dict())
    assert len(dropout_layers(build_affinity_net("resnet38d_tiny"))) == 4
