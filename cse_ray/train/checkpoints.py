"""What an epoch checkpoint holds, and how a restarted worker group finds the newest one.

A checkpoint is a folder with one file, `state.pt`: the trained network, the optimiser, the
`TrainState` (epochs done, history, the kept epoch) and the random states, so a resumed run continues
as if it had not stopped. Checkpoints reference the frozen classifier (path and sha256), never copy it.
Ray Train stores them under RUN/<stage>/ray/<stage>/epoch_NNNN and keeps the newest two.
"""

from __future__ import annotations

import io
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cse_ray import artifacts
from cse_ray.layout import StageLayout

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights and the optimiser."""

    epoch: int = 0  # epochs finished
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_miou: float | None = -1.0
    best_threshold: float | None = 0.0

    def add_epoch(self, record: dict, keep: str) -> bool:
        """Record a finished epoch; True when it becomes the kept one (`keep`: "last" or "best").

        A record without validation (`val_miou` None: train_seg on a list without ground truth) can
        only be kept as the last one; one without a threshold (`val_threshold` absent) keeps None.
        """
        self.epoch = record["epoch"]
        self.history.append(record)
        miou = record["val_miou"]
        kept = keep == "last" or (miou is not None and (self.best_miou is None or miou > self.best_miou))
        if kept:
            self.best_epoch, self.best_miou, self.best_threshold = (
                record["epoch"], miou, record.get("val_threshold"))
        return kept


def save_state(path: Path, model: torch.nn.Module, optimizer, state: TrainState, meta: dict) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": state.__dict__,
            "rng": {
                "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            },
            "meta": meta,
        },
        path,
    )


def load_state(path: Path, model: torch.nn.Module, optimizer) -> TrainState:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    np.random.set_state(saved["rng"]["numpy"])
    random.setstate(saved["rng"]["python"])
    return TrainState(**saved["state"])


def write_torch(path: str, obj: Any) -> None:
    """`torch.save` to a local path or a URI (written whole, atomically)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    artifacts.write_bytes(path, buffer.getvalue())


def checkpoint_name(epoch: int) -> str:
    """The folder of (1-based) `epoch`'s checkpoint in Ray Train's storage."""
    return f"epoch_{epoch:04d}"


def epoch_of(path: str) -> int:
    """The epoch a checkpoint folder holds (0 when the name is not `checkpoint_name`'s)."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return int(name.split("_")[-1]) if name.startswith("epoch_") else 0


def report_checkpoint(stage: StageLayout, metrics: dict, model, optimizer, state: TrainState,
                      meta: dict) -> None:
    """Rank 0: persist the epoch's checkpoint through Ray Train, then point `latest.json` at it."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        save_state(Path(directory) / STATE_FILE, model, optimizer, state, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=checkpoint_name(state.epoch))
    artifacts.write_json(stage.latest, {"epoch": state.epoch})


def report_without_checkpoint(metrics: dict, epoch: int) -> None:
    """Ranks other than 0: every worker reports every epoch, only rank 0 with a checkpoint."""
    import ray.train

    ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_name(epoch))


def resume_checkpoint(stage: StageLayout, name: str):
    """The newest persisted checkpoint: Ray Train's own, or the one named in RUN/<stage>/latest.json.

    Ray Train registers a checkpoint when its controller next polls the workers (every ~2 s); a worker
    that dies right after `report` can lose that registration although the files are complete. Rank 0
    records each persisted epoch in `latest.json`, so such a checkpoint is still found.
    """
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((epoch_of(registered.path), registered))
    if artifacts.exists(stage.latest):
        epoch = int(artifacts.read_json(stage.latest)["epoch"])
        path = artifacts.join(stage.storage, name, checkpoint_name(epoch))
        if artifacts.exists(artifacts.join(path, STATE_FILE)):
            candidates.append((epoch, ray.train.Checkpoint(path)))
    return max(candidates, key=lambda item: item[0])[1] if candidates else None


def load_checkpoint(checkpoint, model: torch.nn.Module, optimizer) -> TrainState:
    """Restore the weights, optimiser and random states of a Ray checkpoint; returns its TrainState."""
    with checkpoint.as_directory() as directory:
        return load_state(Path(directory) / STATE_FILE, model, optimizer)
