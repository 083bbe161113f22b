"""Dev-split diagnostics for the synthetic demo: where each CAM lies on the parts and bodies, what the
erasing mask covers, and whether the classifier still recognises an object without its part.

    # the three networks of a finished pipeline run (ordinary, OC-CSE eraser, the w = 0 control)
    .venv/bin/python benchmarks/demo_dev.py run runs/demo
    # where the eraser's CAM rose against the control's and the ordinary one's (the contact sheet's
    # difference column, averaged by region over the run's validation images)
    .venv/bin/python benchmarks/demo_dev.py gain runs/demo
    # or train them here, in one process (no Ray), on a design of the synthetic set
    .venv/bin/python benchmarks/demo_dev.py train --design '{"body_texture": "family"}' \\
        --cam-epochs 12 --cse w=1,ep=3 w=0,ep=3 --sheet /tmp/dev_sheet.png

The dev split is never the demo's validation split: it is `render_sample(dev_seed=1, "val", i)` with
the run's design options, rendered in memory with its part map (`part_masks`) and once more with the
parts painted as body (`hide_parts`), JPEG-encoded like the files. So settings can be chosen on it
without looking at the validation ground truth that the demo reports. Per network, one JSON line:

  miou, t        CAM mIoU (scale 1.0 + flip, or --scales; thresholds 0.05..0.95) and its threshold,
                 on the dev split
  part, body     mean max-normalised CAM of the present class on its part pixels / on the rest of the
                 object; far: on the half of the body farthest from the part; bodycov: share of body
                 pixels above 0.5
  rec            share of present classes with p > 0.5; rec_hidden on the same scenes with the parts
                 painted as body; rec_zeroed with the part pixels set to the mean colour (what erasing
                 the part alone leaves)
  mask_part, mask_body, mask_bg
                 the erasing mask (the network's CAM of the class, ReLU, / its image maximum) on part,
                 body and background pixels
  p_before, p_after_erase
                 the ordinary classifier's mean probability of the class on the image, and after
                 erasing it with that mask (the erasing loss pushes it to 0)

`train` mirrors the stages' recipe (TrainDataset crops and jitter, psa's optimiser groups with real
momentum, poly decay, batch 8; the eraser from the classifier with frozen BatchNorms and stem against
the frozen classifier) but not Ray Train's data order; models go to --work, reused when present.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cse_ray.cam import multiscale_cam
from cse_ray.data.datasets import TrainDataset
from cse_ray.data.synth import generate, make_options, render_sample
from cse_ray.data.transforms import normalize, to_chw
from cse_ray.data.voc import list_path, read_image_labels, read_list
from cse_ray.formats import encode_jpeg
from cse_ray.metrics import ConfusionSweep, threshold_grid
from cse_ray.models import build_classifier, load_weights
from cse_ray.objective import cam_losses, cse_losses, freeze_classifier, freeze_eraser_layers, set_train_mode
from cse_ray.optim import CLASSIFIER_SCRATCH, ERASER_SCRATCH, build_optimizer
from cse_ray.train.epoch import mask_scores

THRESHOLDS = threshold_grid(0.05, 0.95)
JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.0}


def dev_split(design: dict, count: int = 200, seed: int = 1, size: int = 128) -> list[dict]:
    """Rendered dev scenes: image and hidden-part image (JPEG round trip), ground truth, part map, label."""
    shown = make_options(**design, part_masks=True)
    hidden = make_options(**design, part_masks=True, hide_parts=True)

    def jpeg(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(encode_jpeg(image, shown.jpeg_quality))).convert("RGB"))

    scenes = []
    for index in range(count):
        sample = render_sample(seed, "val", index, size, shown)
        label = np.zeros(20, np.float32)
        label[[obj.class_index for obj in sample.objects]] = 1.0
        scenes.append({"image": jpeg(sample.image), "hidden": jpeg(render_sample(seed, "val", index, size,
                                                                                   hidden).image),
                       "gt": sample.label, "parts": sample.parts, "label": label})
    return scenes


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(to_chw(normalize(image)))[None]


def _load(path: str, backbone: str) -> torch.nn.Module:
    model = build_classifier(backbone, num_classes=20)
    load_weights(model, path)
    return model.eval()


def _mean(values: list) -> float:
    return round(float(np.mean(values)), 3) if values else float("nan")


def _far_half(part: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The body pixels farther from the part's centre than the body's median distance."""
    ys, xs = np.nonzero(part)
    yy, xx = np.indices(part.shape)
    dist = np.hypot(yy - ys.mean(), xx - xs.mean())
    return dist > np.median(dist[body])


@torch.no_grad()
def measure(model_path: str, scenes: list[dict], classifier_path: str, backbone: str,
            scales: tuple[float, ...] = (1.0,)) -> dict:
    """The JSON line of the module docstring for one network, against the ordinary classifier."""
    model, classifier = _load(model_path, backbone), _load(classifier_path, backbone)
    sweep = ConfusionSweep(THRESHOLDS, keep_per_image=False)
    stats: dict[str, list] = {key: [] for key in (
        "part", "body", "far", "bodycov", "rec", "rec_hidden", "rec_zeroed", "mask_part", "mask_body",
        "mask_bg", "p_before", "p_after_erase")}
    for scene in scenes:
        gt, parts = scene["gt"], scene["parts"]
        cams, classes = multiscale_cam(model, scene["image"], scene["label"], scales)
        sweep.add_cams(cams, classes, gt)
        x = _tensor(scene["image"])
        zeroed = x * torch.from_numpy(parts == 0).float()
        probs = [torch.sigmoid(model(view)[1][0]) for view in (x, _tensor(scene["hidden"]), zeroed)]
        raw = F.relu(F.interpolate(model(x)[0], size=gt.shape, mode="bilinear", align_corners=False))[0]
        masks = []
        for k, c in enumerate(classes):
            part, body = parts == c + 1, (gt == c + 1) & (parts != c + 1)
            mask = raw[c] / (raw[c].max() + 1e-5)
            masks.append(mask)
            if part.any():
                stats["part"].append(cams[k][part].mean())
                stats["mask_part"].append(float(mask[torch.from_numpy(part)].mean()))
            if body.any():
                stats["body"].append(cams[k][body].mean())
                stats["bodycov"].append((cams[k][body] > 0.5).mean())
                if part.any():
                    stats["far"].append(cams[k][body & _far_half(part, body)].mean())
                stats["mask_body"].append(float(mask[torch.from_numpy(body)].mean()))
            stats["mask_bg"].append(float(mask[torch.from_numpy(gt == 0)].mean()))
            for key, p in zip(("rec", "rec_hidden", "rec_zeroed"), probs):
                stats[key].append(float(p[c] > 0.5))
        if masks:
            before = torch.sigmoid(classifier(x)[1][0])
            after = torch.sigmoid(classifier(x * (1 - torch.stack(masks)[:, None]))[1])
            for k, c in enumerate(classes):
                stats["p_before"].append(float(before[c]))
                stats["p_after_erase"].append(float(after[k, c]))
    result = sweep.result()
    return {"miou": round(result.miou, 2), "t": result.threshold, **{k: _mean(v) for k, v in stats.items()}}


def _run_synth(root: Path) -> tuple[dict, dict]:
    """A finished run's `data.synth` section and, of it, the design options (what render_sample takes)."""
    import yaml

    synth = yaml.safe_load((root / "config.yaml").read_text())["data"]["synth"]
    return synth, {k: v for k, v in synth.items() if k not in ("enabled", "train", "val", "size", "seed")}


def cam_gain_by_region(root: Path) -> dict[str, dict]:
    """Mean (OC-CSE CAM - baseline CAM) of each present class on its part, the near and far halves of its
    body, an 8-pixel ring of background around the objects, and the rest of the background: what the
    contact sheet's difference column shows, averaged over the run's validation images. It describes a
    finished run (the scenes re-rendered for their part maps); nothing is chosen on it."""
    from cse_ray.data.synth.render import grow
    from cse_ray.infer import load_cams

    synth, design = _run_synth(root)
    options = make_options(**design, part_masks=True)
    folders = {"eraser": root / "val", "control": root / "control", "ordinary": root / "ordinary"}
    names = read_list(list_path(root / "data", "val"))
    sums: dict[str, dict[str, list]] = {"control": {}, "ordinary": {}}
    for index, name in enumerate(names):
        sample = render_sample(synth["seed"], "val", index, synth["size"], options)
        cams = {key: load_cams(str(folder), name) for key, folder in folders.items()}
        objects = (sample.label > 0) & (sample.label < 255)
        ring = grow(objects | (sample.label == 255), 8) & ~objects & (sample.label != 255)
        for k, c in enumerate(cams["eraser"][1]):
            part, whole = sample.parts == c + 1, sample.label == c + 1
            if not part.any():
                continue
            far = _far_half(part, whole)
            regions = {"part": part, "near": whole & ~part & ~far, "far": whole & ~part & far, "ring": ring,
                       "background": (sample.label == 0) & ~ring}
            for baseline, table in sums.items():
                gain = cams["eraser"][0][k] - cams[baseline][0][k]
                for region, mask in regions.items():
                    if mask.any():
                        table.setdefault(region, []).append(float(gain[mask].mean()))
    return {baseline: {region: _mean(v) for region, v in table.items()} for baseline, table in sums.items()}


def _batches(dataset: TrainDataset, seed: int, epoch: int, batch: int = 8):
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    for start in range(0, len(dataset) - batch + 1, batch):
        items = [dataset[i] for i in order[start:start + batch]]
        indices = torch.tensor(order[start:start + batch])
        yield torch.stack([image for image, _ in items]), torch.stack([label for _, label in items]), indices


def train(dataset: TrainDataset, backbone: str, epochs: int, lr: float, seed: int, out: Path,
          classifier: str | None = None, weight: tuple[float, float] = (1.0, 0.0),
          normalize_mask: str = "batch", head_lr: str = "x10", log=print) -> None:
    """The ordinary classifier (classifier=None) or an eraser against it; out.epN after every epoch."""
    torch.manual_seed(seed)
    dropout = (0.2, 0.2) if classifier is None else (0.3, 0.5)
    model = build_classifier(backbone, num_classes=20, dropout=dropout)
    frozen = None
    if classifier is not None:
        load_weights(model, classifier)
        freeze_eraser_layers(model)
        frozen = freeze_classifier(_load(classifier, backbone))
    steps = len(dataset) // 8
    scratch = CLASSIFIER_SCRATCH if frozen is None and head_lr == "x10" else ERASER_SCRATCH
    optimizer = build_optimizer(model, lr=lr, weight_decay=5e-4, max_step=steps * epochs, mode="fixed",
                                scratch=scratch)
    for epoch in range(epochs):
        start, totals = time.perf_counter(), {}
        w = weight[0] + weight[1] * epoch
        set_train_mode(model)
        for images, labels, indices in _batches(dataset, seed, epoch):
            if frozen is None:
                losses = cam_losses(model, images, labels)
            else:
                losses = cse_losses(model, frozen, images, labels, w, normalize=normalize_mask,
                                    scores=mask_scores(indices, seed, epoch, 20))
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
        torch.save(model.state_dict(), f"{out}.ep{epoch + 1}")
        means = " ".join(f"{k} {v / steps:.3f}" for k, v in totals.items())
        weighted = "" if frozen is None else f" w {w:g}"
        log(f"{out.name} epoch {epoch + 1}{weighted} {means} ({time.perf_counter() - start:.0f} s)")
    torch.save(model.state_dict(), out)


def _key(values: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(values.items())).replace(" ", "").replace("/", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dev-images", type=int, default=200)
    parser.add_argument("--backbone", default="resnet38d_tiny_undilated")
    parser.add_argument("--scales", default="1.0", help="comma-separated CAM scales (+ flips) of the "
                        "miou column; the other columns are measured at scale 1")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure a finished pipeline run's networks")
    run.add_argument("run_dir")
    run.add_argument("--design", default=None, help="JSON design options (default: the run's data.synth)")
    gain = sub.add_parser("gain", help="where a finished run's OC-CSE CAM differs from the control's and "
                          "the ordinary one's, by region, on the run's own validation images (its stored "
                          "CAMs, at the run's infer.scales: --scales does not apply)")
    gain.add_argument("run_dir")
    tr = sub.add_parser("train", help="train a classifier and erasers here, then measure them")
    tr.add_argument("--design", default='{"body_texture": "family"}')
    tr.add_argument("--work", default="/tmp/demo_dev")
    tr.add_argument("--train-images", type=int, default=1500)
    tr.add_argument("--size", type=int, default=128, help="image size (long side) of train and dev scenes")
    tr.add_argument("--crop", type=int, default=None, help="training crop (default: --size); the dev "
                    "scenes are measured whole")
    tr.add_argument("--cam-epochs", type=int, default=12)
    tr.add_argument("--cam-lr", type=float, default=0.1)
    tr.add_argument("--cam-head-lr", choices=("x10", "x1"), default="x10", help="as train_cam.head_lr")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--cse", nargs="*", default=[], help="erasers: w=W,slope=S,ep=E,lr=LR,norm=batch|image")
    tr.add_argument("--sheet", default=None, help="PNG: 8 dev scenes, the ordinary and every eraser's "
                    "CAM, and where the first eraser's CAM rose (red) or fell (blue) against the last "
                    "eraser's (or the ordinary one's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scales = tuple(float(s) for s in args.scales.split(","))

    if args.command == "gain":
        if scales != (1.0,):
            parser.error("gain reads the run's stored CAMs (computed at its infer.scales); drop --scales")
        for baseline, line in cam_gain_by_region(Path(args.run_dir)).items():
            print(f"OC-CSE - {baseline}", json.dumps(line), flush=True)
        return
    if args.command == "run":
        root = Path(args.run_dir)
        synth, run_design = _run_synth(root)
        design = json.loads(args.design) if args.design else run_design
        scenes = dev_split(design, args.dev_images, size=synth["size"])  # at the run's image size
        classifier = str(root / "train_cam" / "model.pth")
        for name, path in (("ordinary", classifier), ("eraser", root / "train_cse" / "model.pth"),
                           ("control", root / "control" / "train_cse" / "model.pth")):
            if Path(path).is_file():
                line = json.dumps(measure(str(path), scenes, classifier, args.backbone, scales))
                print(name, line, flush=True)
        return

    design = json.loads(args.design)
    work = Path(args.work)
    sized = "" if args.size == 128 else f"_px{args.size}"
    data = work / f"data_{_key(design)}_n{args.train_images}{sized}"
    generate(data, train=args.train_images, val=1, size=args.size, seed=0, **design)
    names = read_list(list_path(data, "train"))
    crop = args.crop or args.size
    dataset = TrainDataset(str(data), names, read_image_labels(str(data), names), crop=crop,
                           resize_long=(args.size * 7 // 8, args.size * 9 // 8), seed=args.seed,
                           jitter_strength=JITTER)
    scenes = dev_split(design, args.dev_images, size=args.size)
    stem = f"{_key(design)}_n{args.train_images}{sized}_e{args.cam_epochs}_lr{args.cam_lr}_s{args.seed}"
    stem += "_head1x" if args.cam_head_lr == "x1" else ""
    stem += "" if crop == args.size else f"_crop{crop}"
    stem += "" if args.backbone == "resnet38d_tiny_undilated" else f"_{args.backbone}"
    classifier = work / f"cam_{stem}.pth"
    if not classifier.is_file():
        train(dataset, args.backbone, args.cam_epochs, args.cam_lr, args.seed, classifier,
              head_lr=args.cam_head_lr)
    ordinary = measure(str(classifier), scenes, str(classifier), args.backbone, scales)
    print("ordinary", json.dumps(ordinary), flush=True)
    networks = {"ordinary": str(classifier)}
    for spec in args.cse:
        given = dict(item.split("=") for item in spec.split(","))
        epochs, lr = int(given.get("ep", 3)), float(given.get("lr", 0.01))
        weight = (float(given.get("w", 1.0)), float(given.get("slope", 0.0)))
        eraser = work / f"cse_{stem}_{_key(given)}.pth"
        if not eraser.is_file():
            train(dataset, args.backbone, epochs, lr, args.seed, eraser, str(classifier), weight,
                  given.get("norm", "batch"))
        for epoch in range(1, epochs + 1):
            line = json.dumps(measure(f"{eraser}.ep{epoch}", scenes, str(classifier), args.backbone, scales))
            print(f"eraser {spec} epoch {epoch}", line, flush=True)
        networks[spec] = str(eraser)
    if args.sheet:
        write_sheet(args.sheet, scenes[:8], networks, args.backbone)


def write_sheet(path: str, scenes: list[dict], networks: dict[str, str], backbone: str) -> None:
    """image | each network's CAM (scale 1, strongest present class) | first eraser - baseline."""
    from cse_ray.formats import write_rgb_png
    from cse_ray.plots import cam_gain_overlay, cam_overlay, contact_sheet

    models = {name: _load(file, backbone) for name, file in networks.items()}
    names = list(models)
    baseline = names[-1] if len(names) > 2 else names[0]  # the control when given, else the ordinary
    rows = []
    for scene in scenes:
        cams = {name: multiscale_cam(model, scene["image"], scene["label"], (1.0,))[0]
                for name, model in models.items()}
        row = [scene["image"], *(cam_overlay(scene["image"], cams[name]) for name in names)]
        if len(names) > 1:
            row.append(cam_gain_overlay(scene["image"], cams[names[1]], cams[baseline]))
        rows.append(row)
    gain = [f"{names[1]} - {baseline}"] if len(names) > 1 else []
    write_rgb_png(path, contact_sheet(rows, ["image", *names, *gain], cell=160))


if __name__ == "__main__":
    main()
