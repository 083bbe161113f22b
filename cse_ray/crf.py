"""Dense CRF refinement of multi-scale CAMs (psa's parameters), per image and for all alphas at once.

METHOD.md: background score = (1 - max over classes) ** alpha; [background, class maps] are treated as
probabilities; unary = -log(probs); DenseCRF2D with a Gaussian term (sxy 3, compat 3) and a bilateral
term (sxy 80, srgb 13, compat 10) on the original RGB image; 10 mean-field iterations; argmax.

The probabilities are clipped to [PROB_FLOOR, 1] before the log, as pydensecrf's own
`unary_from_softmax` (which the reference calls) does by default: a class map that is exactly 0
would otherwise give an infinite unary. The stack is not renormalised, as in the reference.

`cse-ray predict` (`predict.crf`) runs the same CRF (`dense_crf`: one place for the pairwise terms) on
the segmentation network's class probabilities, every class at once.

This module imports no torch and no Ray, so a CRF worker process starts quickly; the Ray task that
wraps `crf_alphas_task` lives in `cse_ray.infer.workers`. Where the outputs go is `InferLayout`'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cse_ray.config import CrfConfig
from cse_ray.formats import write_label_png, write_seed_dict
from cse_ray.layout import InferLayout
from cse_ray.runtime import node_id

PROB_FLOOR = 1e-5


def _check_inputs(image: np.ndarray, cams: np.ndarray, classes: Sequence[int]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    if cams.ndim != 3 or cams.shape[0] != len(classes) or cams.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"cams of shape {cams.shape} do not match {len(classes)} classes and image {image.shape[:2]}"
        )


def crf_probabilities(image: np.ndarray, cams: np.ndarray, classes: Sequence[int], alpha: float,
                      params: CrfConfig) -> np.ndarray:
    """The CRF's marginals, float32 (K+1) x H x W: row 0 background, row i+1 the class `classes[i]`."""
    _check_inputs(image, cams, classes)
    height, width = image.shape[:2]
    cams = np.asarray(cams, np.float32)
    if cams.shape[0] == 0:  # nothing present: background everywhere, no need for the CRF
        return np.ones((1, height, width), np.float32)
    background = np.power(1.0 - cams.max(axis=0, keepdims=True), alpha)
    return dense_crf(image, np.concatenate([background, cams], axis=0), params)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfConfig) -> np.ndarray:
    """The CRF's marginals, float32 L x H x W, of the label probabilities `probs` (L x H x W, any float
    type) on the uint8 H x W x 3 image: unary -log(probs), psa's Gaussian and bilateral terms."""
    import pydensecrf.densecrf as dcrf

    labels, height, width = probs.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"probabilities of shape {probs.shape} do not match image {image.shape[:2]}")
    unary = -np.log(np.clip(np.asarray(probs, np.float32), PROB_FLOOR, 1.0)).reshape(labels, -1)
    crf = dcrf.DenseCRF2D(width, height, labels)  # the image copy below: pydensecrf needs a writable array
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.array(image, dtype=np.uint8, order="C"), compat=params.bilateral_compat)
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, np.float32).reshape(labels, height, width)


def crf_segmentation(image: np.ndarray, probs: np.ndarray, params: CrfConfig) -> np.ndarray:
    """uint8 H x W label map of the dense CRF on a segmentation network's class probabilities
    ((C + 1) x H x W, row 0 background): `cse-ray predict` with `predict.crf`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    return dense_crf(image, probs, params).argmax(axis=0).astype(np.uint8)


def probabilities_to_label(probs: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """uint8 H x W: argmax over [background, classes], mapped back to 0 = bg, k + 1 = class k."""
    lookup = np.concatenate([[0], np.asarray(classes, np.int64) + 1]).astype(np.uint8)
    return lookup[probs.argmax(axis=0)]


def crf_refine(image: np.ndarray, cams: np.ndarray, classes: Sequence[int], alpha: float,
               params: CrfConfig) -> np.ndarray:
    """uint8 H x W label map (0 background, k + 1 for class k) of the dense CRF at one alpha."""
    return probabilities_to_label(crf_probabilities(image, cams, classes, alpha, params), classes)


def crf_probs_seed_dict(probs: np.ndarray, classes: Sequence[int]) -> dict[int, np.ndarray]:
    """The reference's CRF `.npy` dict: `{0: background, k + 1: class k}` of float32 H x W marginals."""
    seed = {0: np.asarray(probs[0], np.float32)}
    for row, k in enumerate(classes, start=1):
        seed[int(k) + 1] = np.asarray(probs[row], np.float32)
    return seed


@dataclass
class CrfResult:
    """What one image's CRF task reports back (seconds and the paths it wrote, relative to the layout)."""

    name: str
    crf: list[str] = field(default_factory=list)
    crf_seed: list[str] = field(default_factory=list)
    pseudo_label: str | None = None
    crf_s: float = 0.0
    write_s: float = 0.0
    node: str = "local"


def crf_alphas_task(image: np.ndarray, cams: np.ndarray, classes: Sequence[int], name: str,
                    layout: InferLayout, alphas: Sequence[float], params: CrfConfig,
                    pseudo_alpha: float | None = None, save_seed: bool = False) -> CrfResult:
    """Run the CRF at every alpha on one image and write each label map (and seed dict) atomically.

    One call per image (rather than per alpha) so that the image and CAMs cross the object store
    once. With `pseudo_alpha`, that alpha's label map is also written as the image's pseudo-label.
    """
    result = CrfResult(name=name, node=node_id())
    for alpha in alphas:
        start = time.perf_counter()
        probs = crf_probabilities(image, cams, classes, alpha, params)
        label = probabilities_to_label(probs, classes)
        middle = time.perf_counter()
        rel = layout.crf_rel(alpha, name)
        write_label_png(layout.path(rel), label)
        result.crf.append(rel)
        if save_seed:
            rel_seed = layout.crf_seed_rel(alpha, name)
            write_seed_dict(layout.path(rel_seed), crf_probs_seed_dict(probs, classes))
            result.crf_seed.append(rel_seed)
        if pseudo_alpha is not None and float(alpha) == float(pseudo_alpha):
            result.pseudo_label = layout.pseudo_rel(name)
            write_label_png(layout.path(result.pseudo_label), label)
        result.crf_s += middle - start
        result.write_s += time.perf_counter() - middle
    return result
