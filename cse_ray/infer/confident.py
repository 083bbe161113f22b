"""AffinityNet's confident labels: the eraser's CRF maps at psa's two alphas, combined once per image.

`write_confident_labels(cfg, out)` runs `run_infer` on the affinity training list (`rw.train_list`,
else `data.train_list`) with `crf.alphas = [rw.low_alpha, rw.high_alpha]` into RUN/aff_labels/ (its
own inference folder: manifest, resume and fault tolerance as for any inference run), then writes
`aff_labels/confident/NAME.png` from the two CRF maps with `cse_ray.rw.confident_labels`: the
low-alpha CRF's foreground, the high-alpha CRF's background, 255 elsewhere. Each PNG is written
atomically and reused when present. `crf_from`: an inference folder that already holds both CRF maps of
every listed image (the pipeline's, when the affinity list is its inference list): no second inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from cse_ray.config import Config, with_absolute_paths, with_overrides
from cse_ray.errors import UserError
from cse_ray.infer.manifest import Listing
from cse_ray.layout import InferLayout, RunLayout


@dataclass
class ConfidentSummary:
    out: str
    images: int
    written: int
    skipped: int
    missing: list[str]  # images without both CRF maps (their inference failed: see the manifest)

    def line(self) -> str:
        return (f"confident labels: {self.images} images, {self.written} written, "
                f"{self.skipped} already there, "
                f"{len(self.missing)} without CRF maps; under {self.out}")


def confident_config(cfg: Config) -> Config:
    """The inference settings of the two CRFs: only their maps are needed (no overlays, no seeds)."""
    low, high = cfg.rw.low_alpha, cfg.rw.high_alpha
    if low >= high:
        raise UserError(f"config keys rw.low_alpha ({low:g}) and rw.high_alpha ({high:g}): the low alpha "
                        "must be the smaller (its foreground is the confident one)")
    return with_overrides(cfg, {"crf.enabled": True, "crf.alphas": [low, high], "crf.pseudo_alpha": -1.0,
                                "crf.pseudo_from": "crf", "infer.overlays": 0, "infer.save_seed": False})


def write_confident_labels(cfg: Config, out: str, checkpoint: str | None = None,
                           list_name: str | None = None, *, crf_from: str | None = None,
                           progress: bool = True) -> ConfidentSummary:
    """CRF maps at the two alphas on the affinity training list, then one confident PNG per image.

    checkpoint: the CAM network (default `infer.checkpoint`, else the eraser trained into `out`).
    crf_from: an inference folder with the maps at both alphas already (then nothing is inferred).
    """
    from cse_ray.data.prepare import resolve_data_root
    from cse_ray.data.voc import list_path, read_list
    from cse_ray.infer.scheduler import run_infer

    cfg = with_absolute_paths(cfg)
    run = RunLayout.at(out)
    folder = run.aff_labels
    crf_cfg = confident_config(cfg)
    root = resolve_data_root(cfg, run.root)  # a synthetic set lives under the run, not under aff_labels/
    names_list = list_name or cfg.rw.train_list or cfg.data.train_list
    names = list(dict.fromkeys(read_list(list_path(root, names_list))))
    if crf_from is None:
        crf_cfg = with_overrides(crf_cfg, {"data.root": root})
        checkpoint = checkpoint or cfg.infer.checkpoint or run.stage("train_cse").model
        run_infer(crf_cfg, folder.root, checkpoint=checkpoint, list_name=names_list, write_pseudo=False,
                  progress=progress)
    crf_folder = InferLayout(crf_from) if crf_from else folder
    result = combine_confident(crf_folder, folder, names, cfg.rw.low_alpha, cfg.rw.high_alpha)
    print(result.line())
    return result


def combine_confident(crf_folder: InferLayout, dest: InferLayout, names: list[str], low: float,
                      high: float) -> ConfidentSummary:
    """dest/confident/NAME.png from crf_folder's maps at the two alphas, for each name that lacks one."""
    from cse_ray.formats import read_label_png, write_label_png
    from cse_ray.rw import confident_labels

    crf_listing, dest_listing = Listing(crf_folder), Listing(dest)
    written, skipped, missing = 0, 0, []
    for name in names:
        if dest_listing.exists(dest.confident_rel(name)):
            skipped += 1
            continue
        if not (crf_listing.exists(crf_folder.crf_rel(low, name))
                and crf_listing.exists(crf_folder.crf_rel(high, name))):
            missing.append(name)
            continue
        low_map = read_label_png(crf_folder.crf(low, name), what="CRF label map")
        high_map = read_label_png(crf_folder.crf(high, name), what="CRF label map")
        if low_map.shape != high_map.shape:
            raise UserError(f"{crf_folder.crf(high, name)}: CRF label map of {high_map.shape[1]}x"
                            f"{high_map.shape[0]} (WxH), but {crf_folder.crf(low, name)} is "
                            f"{low_map.shape[1]}x{low_map.shape[0]}")
        write_label_png(dest.confident(name), confident_labels(low_map, high_map))
        written += 1
    return ConfidentSummary(dest.root, len(names), written, skipped, missing)
