"""What an inference folder records about itself: `manifest.parquet` and which outputs are finished.

The manifest holds one row per image, keyed by name: rows of earlier runs are kept and replaced,
never duplicated, and the file is rewritten atomically, so a crash leaves the previous version.
Every output is written atomically too, so "the file exists" means "the file is complete": a
directory listing is enough to know what a rerun can skip.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from cse_ray import artifacts
from cse_ray.layout import InferLayout, PredictLayout

PSEUDO_FIELDS = ("pseudo_label", "pseudo_source", "pseudo_value")


def manifest_schema():
    """The manifest's columns (paths are relative to the inference folder, times in seconds)."""
    import pyarrow as pa

    text, number = pa.string(), pa.float64()
    return pa.schema([
        ("name", text), ("status", text), ("error", text), ("classes", pa.list_(text)),
        ("height", pa.int32()), ("width", pa.int32()),
        ("cam", text), ("cam_seed", text), ("crf", pa.list_(text)), ("crf_seed", pa.list_(text)),
        ("overlay", text), ("pseudo_label", text), ("pseudo_source", text), ("pseudo_value", number),
        ("load_s", number), ("cam_s", number), ("crf_s", number), ("write_s", number),
        ("cam_node", text), ("cam_actor", pa.int32()), ("cam_pid", pa.int64()), ("crf_node", text),
    ])


class Manifest:
    """One row per image, keyed by name; rows of earlier runs are kept and replaced, never duplicated.

    order: the list's names; rows are written in that order, rows of other names after them.
    path, schema: another table of the same kind (the random walk's `rw_manifest.parquet`, predict's
    `predict_manifest.parquet`).
    """

    def __init__(self, layout: InferLayout | PredictLayout, order: Sequence[str] = (),
                 path: str | None = None, schema=None) -> None:
        import pyarrow.parquet as pq

        self.path = path or layout.manifest
        self.schema = schema
        self.rows: dict[str, dict] = {}
        if artifacts.exists(self.path):
            table = pq.read_table(io.BytesIO(artifacts.read_bytes(self.path)))
            self.rows = {row["name"]: row for row in table.to_pylist()}
        self.position = {name: i for i, name in enumerate(order)}

    def put(self, row: dict) -> None:
        self.rows[row["name"]] = row

    def write(self) -> None:
        import pyarrow as pa

        schema = self.schema or manifest_schema()
        rest = len(self.position)
        ordered = sorted(
            enumerate(self.rows.values()),
            key=lambda item: (self.position.get(item[1]["name"], rest), item[0]),
        )
        rows = [{key: row.get(key) for key in schema.names} for _, row in ordered]
        artifacts.write_parquet(self.path, pa.Table.from_pylist(rows, schema=schema))


def read_manifest(out: str) -> list[dict]:
    """The manifest's rows of the inference folder `out` as dicts (empty when there is none yet)."""
    return list(Manifest(InferLayout(str(out))).rows.values())


class Listing:
    """Existence of finished output files, answered from one directory listing per folder (object stores
    make one request per listing, not one per file)."""

    def __init__(self, layout: InferLayout) -> None:
        self.layout = layout
        self._folders: dict[str, set[str]] = {}

    def exists(self, rel: str) -> bool:
        folder, _, filename = rel.rpartition("/")
        if folder not in self._folders:
            self._folders[folder] = artifacts.list_files(self.layout.path(folder))
        return filename in self._folders[folder]


@dataclass
class LabelMapSummary:
    """What a stage that writes one label map per image on Ray actors did (the random walk, predict)."""

    stage: str
    out: str
    labels: str  # the folder of the label maps
    images: int
    done: int
    skipped: int
    failed: int
    wall_seconds: float
    errors: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.stage}: {self.images} images, {self.done} done, {self.skipped} skipped, "
                f"{self.failed} failures; {self.wall_seconds:.1f} s; label maps under {self.labels}")
