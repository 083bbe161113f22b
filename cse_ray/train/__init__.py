"""Training on Ray Train: the ordinary classifier (`train_cam`), then the eraser against it (`train_cse`);
AffinityNet (`train_aff`) and the segmentation network on pseudo-labels (`train_seg`).

    stage.py        the driver: checks every input before Ray starts, runs the TorchTrainer
    loop.py         the per-worker function: setup -> run_epoch -> validate -> rank 0's writers
    epoch.py        one epoch's steps, the NaN/inf agreement across workers, progress lines
    validate.py     the per-epoch CAM mIoU (one all-reduce) and the TensorBoard log
    affinity.py     train_aff: AffinityNet's dataset, step and per-epoch pair validation
    segmentation.py train_seg: the image + pseudo-label dataset, the step, the per-epoch mIoU
    segmentation_plan.py  train_seg's checks before Ray: the labels (every PNG), the init weights
    checkpoints.py  what a checkpoint holds, and finding the newest one on a restart
    faults.py       test-only fault hooks (a crashing worker, a NaN loss)

What a stage writes (every path comes from `cse_ray.layout.StageLayout`):

    RUN/<stage>/model.pth      the kept epoch's weights (`keep`: train_cam the last, train_cse the best;
                               a plain state dict, loads like psa's od_cam.pth)
    RUN/<stage>/result.json    written last: the run is finished (history, kept epoch as best_epoch, mIoU;
                               train_seg adds its network and the labels it learnt from)
    RUN/<stage>/events.log     a line per epoch start (restarts and resumes show as repeats)
    RUN/<stage>/latest.json    the newest persisted checkpoint's epoch
    RUN/<stage>/ray/           Ray Train's storage: per-epoch checkpoints, used to resume
    RUN/train_cse/classifier.json   the frozen classifier the eraser trains against (path, sha256)
    RUN/train_seg/network.json      the network a segmentation run's checkpoints hold (a resume must match)
    RUN/tensorboard/<stage>/   TensorBoard event files
"""

from __future__ import annotations

from cse_ray.train.checkpoints import TrainState, resume_checkpoint
from cse_ray.train.epoch import EpochContext, dropout_keys, mask_scores, run_epoch, worker_print
from cse_ray.train.faults import TEST_FAULT_ENV, TEST_NAN_ENV, FaultHooks
from cse_ray.train.loop import IndexedDataset, build_networks, train_loop_per_worker
from cse_ray.train.stage import (
    StageInputs,
    classifier_checkpoint,
    fit_stage,
    prepare_stage,
    train_aff,
    train_both,
    train_cam,
    train_cse,
    train_seg,
)
from cse_ray.train.validate import validate

__all__ = [
    "TEST_FAULT_ENV", "TEST_NAN_ENV",
    "EpochContext", "FaultHooks", "IndexedDataset", "StageInputs", "TrainState",
    "build_networks", "classifier_checkpoint", "dropout_keys", "fit_stage", "mask_scores", "prepare_stage",
    "resume_checkpoint", "run_epoch", "train_aff", "train_both", "train_cam", "train_cse", "train_seg",
    "train_loop_per_worker", "validate", "worker_print",
]
