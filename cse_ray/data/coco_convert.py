"""`cse-ray data coco`: the COCO 2014 layout turned into a VOC-layout dataset that every stage reads as is.

    DIR/JPEGImages/NAME.jpg                     symlinks to ROOT/train2014/NAME.jpg, ROOT/val2014/NAME.jpg
    DIR/SegmentationClass/NAME.png              semantic masks (`coco.semantic_mask`), palette PNGs
    DIR/ImageSets/Segmentation/{train,val}.txt  the images with at least one annotation
    DIR/cls_labels.npy                          80-dim image-level labels of every listed image

Masks are computed on Ray tasks, a chunk of images per task. A task gets the images' annotations and
returns PNG bytes, and only this process touches files: so the tasks may run on any node of a cluster,
whether or not the nodes share a file system. Resumable: every file is written atomically, a mask that
exists is done, and the lists and the labels file (what makes DIR usable) are written last.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cse_ray import artifacts
from cse_ray.data import coco, voc
from cse_ray.data.image_labels import LABELS_FILE, save_labels
from cse_ray.data.names import write_list
from cse_ray.errors import UserError
from cse_ray.formats import encode_label_png, image_problem
from cse_ray.labels import COCO

DEFAULT_CHUNK = 32


@dataclass
class SplitSummary:
    """What the conversion found and did for one split (printed by the command)."""

    split: str
    images: int = 0
    listed: int = 0
    unannotated: int = 0
    crowd: int = 0
    written: int = 0
    reused: int = 0

    def line(self) -> str:
        return (f"{self.split}: {self.images:,} images, {self.listed:,} listed, {self.unannotated:,} without "
                f"annotations left out, {self.crowd:,} crowd annotations; masks: {self.written:,} written, "
                f"{self.reused:,} already there")


def mask_path(out: str | os.PathLike, name: str) -> Path:
    return Path(out) / "SegmentationClass" / f"{name}.png"


def mask_chunk(images: list[coco.CocoImage]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(name, PNG bytes) of each image's semantic mask, and the problems of those that have none.

    Pure computation on plain data, so that it runs anywhere (a Ray task, or in-process)."""
    done, problems = [], []
    for image in images:
        try:
            done.append((image.name, encode_label_png(coco.semantic_mask(image))))
        except UserError as err:
            problems.append(str(err))
    return done, problems


def _size_problem(path: Path, image: coco.CocoImage, json_path: Path) -> str | None:
    from PIL import Image

    problem = image_problem(path)
    if problem is None:
        with Image.open(path) as img:
            width, height = img.size
        if (width, height) != (image.width, image.height):
            problem = (f"size {width}x{height} differs from its record in {json_path} "
                       f"({image.width}x{image.height}, image id {image.image_id})")
    return None if problem is None else f"{path}: {problem}"


def check_image_files(root: Path, split: coco.CocoSplit, images: list[coco.CocoImage]) -> None:
    """Every image exists, is a complete JPEG, and has the width and height of its record (headers only,
    on threads: file access, not computation). All problems are reported at once, the first 10 named."""
    paths = [coco.image_path(root, split.split, image.file_name) for image in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(lambda item: _size_problem(*item, split.path), zip(paths, images))
                    if p is not None]
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise UserError(f"{len(problems)} of {len(images)} images of {split.path.name} have problems:\n"
                        f"  {shown}{more}")


def link_image(out: Path, name: str, target: Path) -> None:
    """DIR/JPEGImages/NAME.jpg -> the COCO image (replaced atomically when it points elsewhere; a real file
    put there by the user is left alone)."""
    link = voc.image_path(out, name)
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
    elif link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _chunks(images: list[coco.CocoImage], size: int) -> Iterator[list[coco.CocoImage]]:
    for start in range(0, len(images), size):
        yield images[start:start + size]


def run_chunks(
    chunks: Iterable[list[coco.CocoImage]],
    on_result: Callable[[list[tuple[str, bytes]], list[str]], None],
    workers: int | None,
) -> None:
    """`mask_chunk` over the chunks: in this process when `workers` is 0, else on Ray tasks of 1 CPU,
    at most `workers` at once (None: as many as the cluster has CPUs), results handled as they come."""
    if workers == 0:
        for chunk in chunks:
            on_result(*mask_chunk(chunk))
        return
    import ray

    from cse_ray.runtime import ensure_ray

    ensure_ray(num_cpus=workers)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=2)(mask_chunk)
    pending: list = []
    chunks = iter(chunks)
    try:
        while True:
            while len(pending) < 2 * workers:  # bounded: the driver never holds more than this
                chunk = next(chunks, None)
                if chunk is None:
                    break
                pending.append(task.remote(chunk))
            if not pending:
                return
            ready, pending = ray.wait(pending, num_returns=1)
            on_result(*ray.get(ready[0]))
    finally:
        for ref in pending:  # only after an error: the rest is not wanted
            ray.cancel(ref)


def convert(
    root: str | os.PathLike,
    out: str | os.PathLike,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> dict[str, SplitSummary]:
    """Write the VOC-layout dataset of the COCO 2014 root `root` under `out`; see the module docstring."""
    from tqdm import tqdm

    root, out = Path(root).absolute(), Path(out)
    if not root.is_dir():
        raise UserError(f"{root}: COCO root folder not found")
    if workers is not None and workers < 0:
        raise UserError(f"data coco --workers {workers}: must be >= 0 (0 = in this process)")
    if chunk_size < 1:
        raise UserError(f"data coco --chunk {chunk_size}: must be >= 1")
    splits = [coco.load_split(root, split) for split in coco.SPLITS]  # every JSON checked before any work
    seen: dict[str, str] = {}
    for split in splits:
        for image in split.images:
            if seen.setdefault(image.name, split.split) != split.split:
                raise UserError(
                    f"{split.path}: image {image.file_name} is also in the {seen[image.name]} split"
                )

    summaries: dict[str, SplitSummary] = {}
    labels: dict[str, np.ndarray] = {}
    for split in splits:
        annotated = split.annotated
        summary = summaries[split.split] = SplitSummary(
            split.split, images=len(split.images), listed=len(annotated),
            unannotated=len(split.images) - len(annotated), crowd=split.crowd_count,
        )
        todo = [image for image in annotated if not _has_mask(out, image.name)]
        summary.reused = len(annotated) - len(todo)
        check_image_files(root, split, todo)  # images with a mask were checked when it was written
        for image in annotated:
            link_image(out, image.name, coco.image_path(root, split.split, image.file_name))
            labels[image.name] = coco.image_classes(image)
        bar = tqdm(total=len(todo), unit="img", desc=f"masks {split.split}", disable=not progress or not todo)

        def write(done: list[tuple[str, bytes]], problems: list[str], summary=summary, bar=bar,
                  path=split.path) -> None:
            if problems:
                raise UserError(f"{path}: " + "\n  ".join(problems[:10]))
            for name, png in done:
                artifacts.write_bytes(mask_path(out, name), png, fsync=False)
            summary.written += len(done)
            bar.update(len(done))

        try:
            run_chunks(_chunks(todo, chunk_size), write, workers if todo else 0)
        finally:
            bar.close()

    # Last, atomically: the lists and the labels are what make DIR a dataset.
    for split in splits:
        write_list(voc.list_path(out, split.split), [image.name for image in split.annotated])
    save_labels(out / LABELS_FILE, labels, COCO)
    return summaries


def _has_mask(out: Path, name: str) -> bool:
    """A mask counts as done when it exists and is not empty (files are renamed into place complete, but
    without fsync a power cut can leave a zero-length file)."""
    try:
        return os.path.getsize(mask_path(out, name)) > 0
    except OSError:
        return False
