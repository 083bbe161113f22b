"""Test-only fault hooks: environment variables the tests set to exercise recovery paths for real.

Nothing in an ordinary run sets them. The driver reads them (tests set them with `monkeypatch.setenv`,
which Ray workers do not inherit) and ships them to the workers inside `StageInputs`.

    CSE_RAY_TEST_FAIL_AT_EPOCH=N   rank 0 crashes (`os._exit`) once, at the start of 1-based epoch N:
                                   Ray Train restarts the worker group from the last checkpoint
    CSE_RAY_TEST_NAN_AT_EPOCH=N    the loss becomes NaN from the second step of 1-based epoch N on:
                                   the run stops and keeps its last good checkpoint
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cse_ray import artifacts
from cse_ray.layout import StageLayout

TEST_FAULT_ENV = "CSE_RAY_TEST_FAIL_AT_EPOCH"
TEST_NAN_ENV = "CSE_RAY_TEST_NAN_AT_EPOCH"


@dataclass(frozen=True)
class FaultHooks:
    """The test hooks of one run (0 = off)."""

    fail_at_epoch: int = 0
    nan_at_epoch: int = 0

    @classmethod
    def from_env(cls) -> FaultHooks:
        return cls(int(os.environ.get(TEST_FAULT_ENV, "0") or 0), int(os.environ.get(TEST_NAN_ENV, "0") or 0))

    def crash_once(self, stage: StageLayout, epoch: int) -> None:
        """Exit the process at the start of (0-based) `epoch` if asked, once per run (a marker remembers)."""
        if self.fail_at_epoch != epoch + 1:
            return
        marker = stage.marker(f"test_fault_epoch{epoch + 1}")
        if not artifacts.exists(marker):
            artifacts.write_text(marker, "crashed once\n")
            os._exit(1)

    def poison(self, loss: torch.Tensor, epoch: int, step_in_epoch: int) -> torch.Tensor:
        """The loss, made NaN from the second step of the asked epoch on."""
        if self.nan_at_epoch == epoch + 1 and step_in_epoch >= 1:
            return loss * float("nan")
        return loss
