"""Every path under a run directory (`--out`), local or `s3://`/`gs://`: the one owner of the layout.

    RUN/config.yaml                  the resolved config of the command that wrote the run
    RUN/data/                        the synthetic dataset, when the config generates one
    RUN/train_cam/, RUN/train_cse/   one training stage each (StageLayout)
    RUN/cams/, crf/, pseudo_labels/  one inference run (InferLayout); RUN/ordinary/ and RUN/val/ hold more
    RUN/manifest.parquet             one row per inferred image
    RUN/control/                     the pipeline's w = 0 control (a RunLayout of its own)
    RUN/aff_labels/                  CRF maps at psa's two alphas and confident/ labels (train_aff's input)
    RUN/rw/, rw_manifest.parquet     the random walk's label maps beside the CAMs they refine
    RUN/train_seg/                   the segmentation network (a StageLayout: model.pth, checkpoints)
    RUN/seg/                         its predictions on the validation list (PredictLayout)
    RUN/eval/STEM.json|md|...        every evaluation of the pipeline
    RUN/report.json, report.md, contact_sheet.png
    RUN/tensorboard/NAME/            TensorBoard event files (see `RunLayout.tensorboard`)
    RUN/trials.parquet, best_config.yaml, tune_summary.json, trials/ID/, posthoc/   a Tune sweep

Paths are plain strings so that URIs and local paths travel the same way (to Ray workers too). Code
never joins paths under `--out` by hand: it asks a layout.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cse_ray import artifacts


def _join(root: str, *parts: str) -> str:
    return artifacts.join(root, *parts)


def alpha_dir(alpha: float) -> str:
    """Folder name of one CRF alpha's outputs: `a6`, `a10`, `a0.5`."""
    return f"a{float(alpha):g}"


@dataclass(frozen=True)
class InferLayout:
    """The folder one inference run writes. `*_rel` paths are relative to it (what the manifest stores)."""

    root: str

    @staticmethod
    def cam_rel(name: str) -> str:
        return f"cams/{name}.npz"

    @staticmethod
    def cam_seed_rel(name: str) -> str:
        return f"cams_seed/{name}.npy"

    @staticmethod
    def overlay_rel(name: str) -> str:
        return f"overlays/{name}.png"

    @staticmethod
    def crf_rel(alpha: float, name: str) -> str:
        return f"crf/{alpha_dir(alpha)}/{name}.png"

    @staticmethod
    def crf_seed_rel(alpha: float, name: str) -> str:
        return f"crf_seed/{alpha_dir(alpha)}/{name}.npy"

    @staticmethod
    def pseudo_rel(name: str) -> str:
        return f"pseudo_labels/{name}.png"

    @staticmethod
    def confident_rel(name: str) -> str:
        """AffinityNet's confident training label (`cse_ray.rw.confident_labels`)."""
        return f"confident/{name}.png"

    @staticmethod
    def rw_rel(name: str) -> str:
        """The random walk's label map of the image."""
        return f"rw/{name}.png"

    def path(self, rel: str) -> str:
        return _join(self.root, rel)

    def confident(self, name: str) -> str:
        return self.path(self.confident_rel(name))

    def rw(self, name: str) -> str:
        return self.path(self.rw_rel(name))

    @property
    def rw_dir(self) -> str:
        return _join(self.root, "rw")

    @property
    def rw_manifest(self) -> str:
        """One row per image the random walk refined (the same columns' idea as `manifest`)."""
        return _join(self.root, "rw_manifest.parquet")

    @property
    def rw_settings(self) -> str:
        return _join(self.root, "rw_settings.json")

    def cam(self, name: str) -> str:
        return self.path(self.cam_rel(name))

    def crf(self, alpha: float, name: str) -> str:
        return self.path(self.crf_rel(alpha, name))

    def pseudo(self, name: str) -> str:
        return self.path(self.pseudo_rel(name))

    @property
    def cams_dir(self) -> str:
        return _join(self.root, "cams")

    def crf_dir(self, alpha: float) -> str:
        return _join(self.root, "crf", alpha_dir(alpha))

    @property
    def pseudo_dir(self) -> str:
        return _join(self.root, "pseudo_labels")

    @property
    def manifest(self) -> str:
        return _join(self.root, "manifest.parquet")

    @property
    def settings(self) -> str:
        return _join(self.root, "infer_settings.json")

    def eval_json(self, stem: str) -> str:
        """Evaluations that belong to this inference folder (Tune's post-hoc search)."""
        return _join(self.root, f"{stem}.json")


@dataclass(frozen=True)
class PredictLayout:
    """The folder `cse-ray predict --out DIR` writes: `DIR/NAME.png` for every image, and its records."""

    root: str

    @staticmethod
    def label_rel(name: str) -> str:
        return f"{name}.png"

    def label(self, name: str) -> str:
        """The palette PNG of the image's predicted classes, of the image's size."""
        return _join(self.root, self.label_rel(name))

    @property
    def manifest(self) -> str:
        """One row per image (status, error, timings), as inference's manifest."""
        return _join(self.root, "predict_manifest.parquet")

    @property
    def settings(self) -> str:
        """Checkpoint digest and test-time settings; a resumed folder must match them."""
        return _join(self.root, "predict_settings.json")


@dataclass(frozen=True)
class StageLayout:
    """One training stage's folder: RUN/<stage>/."""

    root: str

    @property
    def model(self) -> str:
        """The kept epoch's weights: a plain state dict."""
        return _join(self.root, "model.pth")

    @property
    def result(self) -> str:
        """Written last: the stage finished."""
        return _join(self.root, "result.json")

    @property
    def failed(self) -> str:
        return _join(self.root, "failed.json")

    @property
    def classifier_record(self) -> str:
        """The frozen classifier an eraser trains against (path and sha256)."""
        return _join(self.root, "classifier.json")

    @property
    def network_record(self) -> str:
        """The network a segmentation run started with (name, classes, ASPP rates): a resume must match."""
        return _join(self.root, "network.json")

    @property
    def latest(self) -> str:
        """The newest persisted epoch checkpoint."""
        return _join(self.root, "latest.json")

    @property
    def events(self) -> str:
        """A line per epoch start: resumes and restarts show as repeats."""
        return _join(self.root, "events.log")

    @property
    def storage(self) -> str:
        """Ray Train's storage path: per-epoch checkpoints."""
        return _join(self.root, "ray")

    def marker(self, name: str) -> str:
        """A hidden marker file (test fault hooks)."""
        return _join(self.root, f".{name}")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (`--out`)."""

    root: str

    @classmethod
    def at(cls, out: str | os.PathLike[str]) -> RunLayout:
        """The layout of `out`, made absolute when local (Ray workers run in other directories)."""
        return cls(artifacts.absolute(os.fspath(out)))

    @property
    def is_remote(self) -> bool:
        return artifacts.is_uri(self.root)

    # -- the run as a whole
    @property
    def config(self) -> str:
        return _join(self.root, "config.yaml")

    @property
    def data(self) -> str:
        """Where a synthetic dataset is generated (datasets stay local: never under a URI)."""
        return _join(self.root, "data")

    @property
    def report_json(self) -> str:
        return _join(self.root, "report.json")

    @property
    def report_md(self) -> str:
        return _join(self.root, "report.md")

    @property
    def contact_sheet(self) -> str:
        return _join(self.root, "contact_sheet.png")

    def eval_json(self, stem: str) -> str:
        return _join(self.root, "eval", f"{stem}.json")

    # -- stages
    def stage(self, name: str) -> StageLayout:
        return StageLayout(_join(self.root, name))

    @property
    def infer(self) -> InferLayout:
        """The eraser's CAMs, CRF maps and pseudo-labels on the inference list."""
        return InferLayout(self.root)

    @property
    def ordinary(self) -> InferLayout:
        """The ordinary classifier's CAMs on the validation list."""
        return InferLayout(_join(self.root, "ordinary"))

    @property
    def val(self) -> InferLayout:
        """The eraser's outputs on the validation list, when it is not the inference list."""
        return InferLayout(_join(self.root, "val"))

    @property
    def aff_labels(self) -> InferLayout:
        """The CRF maps at rw.low_alpha and rw.high_alpha on the affinity training list, and the
        confident labels made from them (`confident/NAME.png`)."""
        return InferLayout(_join(self.root, "aff_labels"))

    @property
    def seg(self) -> PredictLayout:
        """The segmentation network's predictions on the validation list (`seg_miou`)."""
        return PredictLayout(_join(self.root, "seg"))

    @property
    def control(self) -> RunLayout:
        """The w = 0 control of the pipeline: its own train_cse/ and its CAMs on the validation list."""
        return RunLayout(_join(self.root, "control"))

    # -- Tune
    @property
    def trials_table(self) -> str:
        return _join(self.root, "trials.parquet")

    @property
    def best_config(self) -> str:
        return _join(self.root, "best_config.yaml")

    @property
    def tune_summary(self) -> str:
        return _join(self.root, "tune_summary.json")

    @property
    def tune_settings(self) -> str:
        return _join(self.root, "tune_settings.json")

    @property
    def tune_storage(self) -> str:
        """Ray Tune's experiment storage."""
        return _join(self.root, "tune")

    def trial(self, trial_id: str) -> RunLayout:
        return RunLayout(_join(self.root, "trials", trial_id))

    @property
    def posthoc(self) -> InferLayout:
        return InferLayout(_join(self.root, "posthoc"))

    # -- TensorBoard
    def tensorboard_target(self, name: str) -> str:
        """Where the event files of `name` (a stage, `eval`, `tune`) end up: RUN/tensorboard/NAME."""
        return _join(self.root, "tensorboard", name)

    def tensorboard(self, name: str) -> str:
        """The local directory a SummaryWriter writes to.

        TensorBoard appends to its event files, which object stores cannot do: with a remote `--out`
        the files are written to a local folder (the same one for the same run and name, so a resumed
        run appends) and `sync_tensorboard` uploads them.
        """
        target = self.tensorboard_target(name)
        if not self.is_remote:
            return target
        digest = hashlib.sha256(target.encode()).hexdigest()[:16]
        return str(Path(tempfile.gettempdir(), "cse-ray-tensorboard", digest, name))

    def sync_tensorboard(self, name: str, final: bool = False) -> int:
        """Upload the local event files of `name` to RUN/tensorboard/NAME (remote runs); returns the count.

        final: the writer is closed for good (the stage finished): the local copy is removed after the
        upload, so a finished remote run leaves nothing on the local disk.
        """
        if not self.is_remote:
            return 0
        local = Path(self.tensorboard(name))
        sent = 0
        for path in sorted(local.rglob("*")) if local.is_dir() else ():
            if path.is_file():
                rel = path.relative_to(local).as_posix()
                artifacts.write_bytes(_join(self.tensorboard_target(name), rel), path.read_bytes())
                sent += 1
        if final:
            import shutil

            shutil.rmtree(local.parent, ignore_errors=True)
        return sent
