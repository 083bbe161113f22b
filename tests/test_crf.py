"""Dense CRF on CAMs: the psa recipe, checked against pydensecrf called directly, and the per-image task;
the same CRF on a segmentation network's class probabilities (`cse-ray predict` with `predict.crf`)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from cse_ray.config import CrfConfig
from cse_ray.crf import (
    crf_alphas_task,
    crf_probabilities,
    crf_probs_seed_dict,
    crf_refine,
    crf_segmentation,
    probabilities_to_label,
)
from cse_ray.labels import PALETTE
from cse_ray.layout import InferLayout

PSA = CrfConfig()  # METHOD.md: gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, 10 iterations


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 48 x 64 image with a bright disc and a dark square, and blurry, shifted CAMs for two classes."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[:48, :64]
    image = np.full((48, 64, 3), 120, np.float32)
    disc = (ys - 20) ** 2 + (xs - 18) ** 2 < 12**2
    square = (abs(ys - 28) < 10) & (abs(xs - 46) < 10)
    image[disc] = (230, 200, 40)
    image[square] = (30, 40, 160)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    cam_disc = np.exp(-((ys - 23) ** 2 + (xs - 21) ** 2) / (2 * 9.0**2))
    cam_square = np.exp(-((ys - 25) ** 2 + (xs - 43) ** 2) / (2 * 8.0**2))
    cams = np.stack([cam_disc, cam_square]).astype(np.float32)
    cams /= cams.max(axis=(1, 2), keepdims=True)
    return image, cams, np.array([7, 14], np.int64)  # cat, person


def direct_pydensecrf(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, alpha: float) -> np.ndarray:
    """The reference's recipe, spelled out with pydensecrf's own helpers (independent of cse_ray.crf)."""
    height, width = image.shape[:2]
    bg = np.power(1 - np.max(cams, 0, keepdims=True), alpha)
    probs = np.concatenate((bg, cams), axis=0)
    crf = dcrf.DenseCRF2D(width, height, probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(image), compat=10)
    q = np.array(crf.inference(10)).reshape(probs.shape)
    return np.concatenate([[0], classes + 1])[q.argmax(axis=0)].astype(np.uint8)


@pytest.mark.parametrize("alpha", [6.0, 10.0, 24.0])
def test_crf_refine_equals_pydensecrf_with_the_psa_parameters(scene, alpha):
    image, cams, classes = scene
    expected = direct_pydensecrf(image, cams, classes, alpha)
    got = crf_refine(image, cams, classes, alpha, PSA)
    assert got.dtype == np.uint8 and got.shape == image.shape[:2]
    np.testing.assert_array_equal(got, expected)
    # The pairwise terms must have moved some pixels, or the comparison above would not test them.
    bg = np.power(1 - cams.max(axis=0, keepdims=True), alpha)
    unary_only = probabilities_to_label(np.concatenate([bg, cams]), classes)
    assert (unary_only != got).sum() > 10
    assert set(np.unique(got)) <= {0, 8, 15}


def test_crf_segmentation_runs_the_psa_crf_on_every_class_probability(scene):
    image, cams, _ = scene
    # A network's softmax over background + 20 classes: the two objects' classes and a uniform rest.
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 0.5, (21,) + image.shape[:2]).astype(np.float32)
    scores[0] += 2.0 * (1 - cams.max(axis=0))
    scores[8] += 3.0 * cams[0]
    scores[15] += 3.0 * cams[1]
    probs = np.exp(scores) / np.exp(scores).sum(axis=0, keepdims=True)
    crf = dcrf.DenseCRF2D(image.shape[1], image.shape[0], 21)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(image), compat=10)
    expected = np.array(crf.inference(10)).reshape(probs.shape).argmax(axis=0)

    got = crf_segmentation(image, probs, PSA)
    assert got.dtype == np.uint8 and got.shape == image.shape[:2]
    np.testing.assert_array_equal(got, expected)
    assert (got != probs.argmax(axis=0)).sum() > 10  # the pairwise terms cleaned up the noisy argmax


def test_higher_alpha_means_less_background(scene):
    image, cams, classes = scene
    background = [crf_probabilities(image, cams, classes, a, PSA)[0].mean() for a in (1.0, 6.0, 24.0)]
    assert background[0] > background[1] > background[2]


def test_parameters_come_from_the_config(scene):
    image, cams, classes = scene
    psa = crf_probabilities(image, cams, classes, 6.0, PSA)
    for changed in (CrfConfig(bilateral_compat=3.0), CrfConfig(gauss_sxy=9.0), CrfConfig(iterations=1)):
        assert np.abs(crf_probabilities(image, cams, classes, 6.0, changed) - psa).max() > 1e-3


def test_an_image_without_classes_is_all_background(scene):
    image = scene[0]
    label = crf_refine(image, np.zeros((0, *image.shape[:2]), np.float32), np.zeros(0, np.int64), 6.0, PSA)
    assert label.shape == image.shape[:2] and not label.any()


def test_mismatched_shapes_are_refused(scene):
    image, cams, classes = scene
    with pytest.raises(ValueError, match="do not match"):
        crf_refine(image, cams[:, :-1], classes, 6.0, PSA)
    with pytest.raises(ValueError, match="do not match"):
        crf_refine(image, cams, classes[:1], 6.0, PSA)


def test_seed_dict_uses_the_reference_keys(scene):
    image, cams, classes = scene
    probs = crf_probabilities(image, cams, classes, 10.0, PSA)
    seed = crf_probs_seed_dict(probs, classes)
    assert sorted(seed) == [0, 8, 15]
    assert all(v.dtype == np.float32 and v.shape == image.shape[:2] for v in seed.values())
    np.testing.assert_allclose(sum(seed.values()), 1.0, atol=1e-4)  # mean-field marginals


def test_crf_alphas_task_writes_every_alpha_and_the_pseudo_label(scene, tmp_path):
    image, cams, classes = scene
    start = time.perf_counter()
    result = crf_alphas_task(image, cams, classes, "img", InferLayout(str(tmp_path)), (6.0, 24.0), PSA,
                             pseudo_alpha=24.0, save_seed=True)
    elapsed = time.perf_counter() - start
    assert result.crf == ["crf/a6/img.png", "crf/a24/img.png"]
    assert result.crf_seed == ["crf_seed/a6/img.npy", "crf_seed/a24/img.npy"]
    assert result.pseudo_label == "pseudo_labels/img.png"
    assert result.node == "local"  # not in a Ray worker
    # The two timings split the call: each part measured, together no longer than the call itself.
    assert result.crf_s > 0 and result.write_s > 0 and result.crf_s + result.write_s <= elapsed
    for alpha, rel in zip((6.0, 24.0), result.crf):
        png = Image.open(tmp_path / rel)
        assert png.mode == "P" and png.getpalette()[:12] == PALETTE[:12]
        np.testing.assert_array_equal(np.array(png), crf_refine(image, cams, classes, alpha, PSA))
    seed = np.load(tmp_path / "crf_seed/a24/img.npy", allow_pickle=True).item()
    assert sorted(seed) == [0, 8, 15]
    assert (tmp_path / "pseudo_labels/img.png").read_bytes() == (tmp_path / "crf/a24/img.png").read_bytes()
    leftovers = [p for p in Path(tmp_path).rglob(".*")]
    assert not leftovers  # atomic writes leave no temp files behind
    assert io.BytesIO((tmp_path / "crf/a6/img.png").read_bytes()).read(8) == b"\x89PNG\r\n\x1a\n"


def test_importing_the_crf_loads_neither_torch_nor_ray():
    """CRF workers start fast: the module (and what it imports) leaves torch and Ray unloaded."""
    code = "import sys, cse_ray.crf; print('torch' in sys.modules, 'ray' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["False", "False"]
