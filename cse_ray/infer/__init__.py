"""`cse-ray infer`: multi-scale CAMs on a pool of Ray actors, dense CRF on Ray CPU tasks, pseudo-labels.

    plan.py       what is checked before Ray starts (checkpoint, list, labels, settings) -> a Plan
    workers.py    the CAM actor and the CRF task (what runs on Ray workers), what they ask Ray for
    scheduler.py  `run_infer`: the driver loop (least busy actor, bounded in flight, retries, manifest)
    manifest.py   `manifest.parquet` (one row per image) and which outputs are finished
    pseudo.py     `write_pseudo_labels` from stored outputs, `load_cams`
    pool.py       `run_on_actors`: a pool of actors fed one item at a time (least busy, bounded in flight)
    confident.py  `write_confident_labels`: CRF maps at psa's two alphas -> AffinityNet's confident labels
    walk.py       `run_rw` (`cse-ray rw`): psa's random walk on Ray actors from the stored CAMs
    predict.py    `run_predict` (`cse-ray predict`): the segmentation network on Ray actors, label PNGs

Every output is written atomically by the actor or task that computed it, so "the file exists" means
"the file is complete": a rerun skips what exists, a crash loses at most the images in flight, and
every image has exactly one manifest row. Where each file goes is `cse_ray.layout.InferLayout`'s.
"""

from cse_ray.infer.confident import ConfidentSummary, write_confident_labels
from cse_ray.infer.manifest import LabelMapSummary, Manifest, read_manifest
from cse_ray.infer.predict import TEST_KILL_PREDICT_MARKER, run_predict
from cse_ray.infer.pseudo import PseudoLabelSummary, load_cams, write_pseudo_labels
from cse_ray.infer.scheduler import InferSummary, run_infer
from cse_ray.infer.walk import TEST_KILL_RW_MARKER, run_rw
from cse_ray.infer.workers import TEST_KILL_ENV, TEST_KILL_MARKER

__all__ = [
    "TEST_KILL_ENV",
    "TEST_KILL_MARKER",
    "TEST_KILL_PREDICT_MARKER",
    "TEST_KILL_RW_MARKER",
    "ConfidentSummary",
    "InferSummary",
    "LabelMapSummary",
    "Manifest",
    "PseudoLabelSummary",
    "load_cams",
    "read_manifest",
    "run_infer",
    "run_predict",
    "run_rw",
    "write_confident_labels",
    "write_pseudo_labels",
]
