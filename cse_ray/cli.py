"""The `cse-ray` command: parse, load and validate the config, call one stage function.

Exit codes: 0 success, 2 bad arguments/config/input (one message, no traceback), 1 failure during the
run. Every stage import happens inside its command so that `--help` and config errors are instant and
Ray is never started for a run that would be refused.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from cse_ray import __version__
from cse_ray.errors import RunFailed, UserError

DESCRIPTION = """\
OC-CSE (class-specific adversarial erasing) for weakly supervised semantic segmentation on Ray:
train the CAM classifier and the eraser on Ray Train, infer multi-scale CAMs and dense-CRF
pseudo-labels on Ray actors and tasks, evaluate, and sweep hyperparameters with Ray Tune.
Every stage writes under --out and resumes when run again."""

EPILOG = """\
examples:
  cse-ray pipeline --config configs/demo.yaml --out runs/demo
  cse-ray train-cse --config configs/voc12.yaml train_cse.lr=0.02 train_cse.num_workers=8
  cse-ray predict --checkpoint runs/demo/train_seg/model.pth --config runs/demo/config.yaml \\
      --images ~/photos --out runs/demo/photos
  cse-ray evaluate --pred runs/demo/cams --gt runs/demo/data/SegmentationClass \\
      --list runs/demo/data/ImageSets/Segmentation/val.txt --task cam
docs: README.md, docs/CONFIG.md (every config key), docs/ARCHITECTURE.md"""

CONFIG_COMMANDS = {
    "train-cam": "train the ordinary CAM classifier on Ray Train",
    "train-cse": "train the eraser against the frozen classifier on Ray Train",
    "train": "train-cam, then train-cse (only train-cse when train_cse.classifier is given)",
    "infer": "multi-scale CAMs on Ray actors, dense CRF on Ray CPU tasks, pseudo-label PNGs",
    "aff-labels": "CRF maps at rw.low_alpha and rw.high_alpha on the affinity training list, combined "
                  "into AffinityNet's confident label PNGs (RUN/aff_labels/confident/)",
    "train-aff": "train AffinityNet on the confident labels of aff-labels on Ray Train",
    "rw": "random walk with AffinityNet's affinities on Ray actors: the stored CAMs of the inference "
          "list refined into label PNGs (RUN/rw/)",
    "train-seg": "train the segmentation network (ResNet-38d or ResNet-101 + ASPP) on Ray Train on "
                 "pseudo-labels: the random walk's (train_seg.labels=rw: RUN/rw/), inference's "
                 "(train_seg.labels=pseudo: RUN/pseudo_labels/) or a folder's (train_seg.labels_dir)",
    "tune": "Ray Tune sweep over train-cse hyperparameters",
    "pipeline": "the whole chain as one run: data, train-cam, train-cse, infer, CRF, evaluate, report",
}


def build_parser() -> argparse.ArgumentParser:
    from cse_ray.config import SynthConfig
    from cse_ray.config.schema import SYNTH_BODY_TEXTURES, SYNTH_PART_PLACES
    from cse_ray.data.coco_convert import DEFAULT_CHUNK
    from cse_ray.labels import LABEL_SPACES

    parser = argparse.ArgumentParser(prog="cse-ray", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cse-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = SynthConfig()  # the one owner of the synthetic set's defaults
    synth = sub.add_parser("synth", help="write the embedded synthetic dataset (VOC or COCO 2014 layout)")
    synth.add_argument("--out", required=True, help="dataset root to write")
    synth.add_argument("--layout", choices=("voc", "coco"), default="voc",
                       help="voc: PASCAL VOC 2012 folders (default); coco: train2014/, val2014/ and "
                            "annotations/instances_*2014.json (then `cse-ray data coco`)")
    synth.add_argument("--train", type=int, default=d.train, help=f"training images (default {d.train})")
    synth.add_argument("--val", type=int, default=d.val, help=f"validation images (default {d.val})")
    synth.add_argument("--size", type=int, default=d.size, help=f"long side in pixels (default {d.size})")
    synth.add_argument("--seed", type=int, default=d.seed, help=f"same seed, same bytes (default {d.seed})")
    synth.add_argument("--part-strength", type=float, default=d.part_strength,
                       help=f"salience of the part, 0..1 (default {d.part_strength:g})")
    synth.add_argument("--body-strength", type=float, default=d.body_strength,
                       help=f"salience of the body, 0..1 (default {d.body_strength:g})")
    synth.add_argument("--body-texture", choices=SYNTH_BODY_TEXTURES, default=d.body_texture,
                       help="family: a colour family shares one body texture (docs/SYNTHETIC.md)")
    synth.add_argument("--partless", type=float, default=d.partless,
                       help=f"share of training objects without their part, 0..1 (default {d.partless:g})")
    synth.add_argument("--part-place", choices=SYNTH_PART_PLACES, default=d.part_place,
                       help="end: the part at one end of the body, like a head (docs/SYNTHETIC.md)")

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    lists = data_sub.add_parser("lists", help="write train, val, train_aug lists and the labels file")
    lists.add_argument("--root", required=True, help="VOC2012 root (JPEGImages, Annotations, ...)")
    lists.add_argument("--sbd", default=None, help="SBD root with SegmentationClassAug (optional)")
    lists.add_argument("--out", required=True, help="directory for the lists")
    coco = data_sub.add_parser(
        "coco", help="VOC-layout dataset (masks, lists, labels file) from COCO 2014 instance annotations",
        description="Write DIR/JPEGImages (links to the COCO images), DIR/SegmentationClass (semantic "
                    "masks), DIR/ImageSets/Segmentation/{train,val}.txt and DIR/cls_labels.npy from "
                    "COCO/annotations/instances_{train,val}2014.json; then data.dataset=coco "
                    "data.root=DIR runs every stage. Resumes when run again.")
    coco.add_argument("--root", required=True, help="COCO 2014 root (train2014/, val2014/, annotations/)")
    coco.add_argument("--out", required=True, help="dataset directory to write (data.root of the runs)")
    coco.add_argument("--workers", type=int, default=None,
                      help="Ray tasks at once (default: every CPU of the cluster, or of this machine); "
                           "0 = compute in this process, without Ray")
    coco.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                      help=f"images per Ray task (default {DEFAULT_CHUNK})")

    for name, text in CONFIG_COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", required=True, help="YAML config (see configs/)")
        cmd.add_argument("--out", default=None, help="run directory or s3:// URI (default runs/<config>)")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
        if name == "infer":
            cmd.add_argument("--format", choices=("native", "seed"), default="native", dest="fmt",
                             help="seed: also write the reference's .npy dicts (= infer.save_seed=true)")

    ev = sub.add_parser("evaluate", help="mIoU with background-threshold search")
    ev.add_argument("--pred", required=True, help="directory of predictions")
    ev.add_argument("--gt", required=True, help="directory of ground-truth PNGs")
    ev.add_argument("--list", required=True, dest="list_path", help="image list")
    ev.add_argument("--task", choices=("cam", "label"), default="cam",
                    help="cam: CAM files with a background-threshold search; label: label PNGs (default cam)")
    ev.add_argument("--format", choices=("native", "seed"), default="native", dest="fmt",
                    help="native: cse-ray's .npz/.png; seed: the reference's .npy dicts (default native)")
    ev.add_argument("--out", default=None, help="write the JSON report (and .md/.parquet/.png beside)")
    ev.add_argument("--thresholds", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=None,
                    help="background thresholds to sweep, stop included (default: evaluate.threshold_* "
                         "of the config defaults, 0.10 0.39 0.01)")
    ev.add_argument("--dataset", choices=tuple(LABEL_SPACES), default="voc",
                    help="which classes the label indices mean: voc (21 categories) or coco (81)")
    ev.add_argument("--log-dir", default=None, help="also write TensorBoard scalars here")

    predict = sub.add_parser(
        "predict", help="segment images with a trained segmentation network on Ray actors: DIR/NAME.png",
        description="Segment images with a trained segmentation network (multi-scale + flip, optional "
                    "dense CRF) on Ray actors: OUT/NAME.png palette PNGs, each of its image's size, and "
                    "OUT/predict_manifest.parquet (one row per image). Resumes when run again.",
        epilog="examples:\n"
               "  cse-ray predict --checkpoint runs/demo/train_seg/model.pth \\\n"
               "      --config runs/demo/config.yaml --images ~/photos --out runs/demo/photos\n"
               "  cse-ray predict --checkpoint model.pth --list val --root data/VOC2012 --out seg_val \\\n"
               "      train_seg.network=resnet101 predict.scales=[1.0] predict.crf=true",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("--checkpoint", required=True, metavar="FILE",
                         help="the segmentation network's weights (RUN/train_seg/model.pth), of "
                              "train_seg.network for the config's classes")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", default=None, metavar="DIR",
                        help="a folder: every .jpg, .jpeg and .png in it")
    source.add_argument("--list", default=None, metavar="FILE", dest="list_path",
                        help="an image list (a file, or a list name such as val) under --root")
    predict.add_argument("--root", default=None, metavar="DIR",
                         help="VOC-layout root of --list (ROOT/JPEGImages/NAME.jpg)")
    predict.add_argument("--out", required=True, metavar="DIR",
                         help="folder (or s3:// URI) for NAME.png and the manifest")
    predict.add_argument("--config", default=None, metavar="FILE",
                         help="YAML config, e.g. the training run's RUN/config.yaml (default: the defaults; "
                              "the network is train_seg.network, the classes data.dataset)")
    predict.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (predict.*)")

    weights = sub.add_parser("weights", help="weight files")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")
    convert = weights_sub.add_parser("convert", help="MXNet .params or DataParallel .pth -> state dict")
    convert.add_argument("src", help="MXNet .params or a (DataParallel) .pth checkpoint")
    convert.add_argument("dst", help="plain torch state dict to write (.pth)")
    convert.add_argument("--model", default="resnet38d", help="network the file is for")
    return parser


def default_out(config_path: str) -> str:
    return str(Path("runs") / Path(config_path).stem)


def command_config(args: argparse.Namespace):
    """The validated config of a config command: the YAML, its overrides, and flag shorthands."""
    from cse_ray.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "fmt", "native") == "seed":
        overrides.append("infer.save_seed=true")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> None:
    """Dispatch one parsed command. Raises UserError for bad input."""
    if args.command == "synth":
        if args.layout == "coco":
            from cse_ray.data.synth.coco import generate_coco as generate
        else:
            from cse_ray.data.synth import generate

        generate(
            args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
            part_strength=args.part_strength, body_strength=args.body_strength,
            body_texture=args.body_texture, partless=args.partless, part_place=args.part_place,
        )
        print(f"synthetic dataset ({args.layout} layout) written to {args.out}")
    elif args.command == "data" and args.data_command == "coco":
        from cse_ray.data.coco_convert import convert

        for summary in convert(args.root, args.out, workers=args.workers, chunk_size=args.chunk).values():
            print(summary.line())
        print(f"dataset written to {args.out} (data.dataset: coco, data.root: {args.out})")
    elif args.command == "data":
        from cse_ray.data.voc import write_lists

        written = write_lists(args.root, args.out, sbd_root=args.sbd)
        for name, path in written.items():
            print(f"{name}: {path}")
    elif args.command == "evaluate":
        from cse_ray.evaluate import run_evaluate
        from cse_ray.labels import label_space

        run_evaluate(
            args.pred, args.gt, args.list_path, task=args.task, fmt=args.fmt, out=args.out,
            thresholds=tuple(args.thresholds) if args.thresholds else None, log_dir=args.log_dir,
            labels=label_space(args.dataset),
        )
    elif args.command == "predict":
        _predict(args)
    elif args.command == "weights":
        from cse_ray.models.weights import convert_weights

        report = convert_weights(args.src, args.dst, model_name=args.model)
        print(report)
    else:
        _run_stage(args.command, command_config(args), args.out or default_out(args.config))


def _predict(args: argparse.Namespace) -> None:
    from cse_ray import artifacts
    from cse_ray.config import load_config

    if (args.list_path is None) != (args.root is None):
        raise UserError("--list and --root go together (ROOT/JPEGImages/NAME.jpg for each listed NAME)")
    # Predict reads no dataset of the config: the data.root placeholder only satisfies its validation.
    placeholder = [] if args.config else [f"data.root={args.root or args.images}"]
    cfg = load_config(args.config, [*placeholder, *args.overrides])
    artifacts.check_storage(args.out)
    from cse_ray.infer.predict import run_predict

    run_predict(cfg, args.out, args.checkpoint, images=args.images, list_file=args.list_path, root=args.root)


STAGE_FUNCTIONS = {
    "train-cam": ("cse_ray.train", "train_cam"),
    "train-cse": ("cse_ray.train", "train_cse"),
    "train": ("cse_ray.train", "train_both"),
    "infer": ("cse_ray.infer", "run_infer"),
    "aff-labels": ("cse_ray.infer", "write_confident_labels"),
    "train-aff": ("cse_ray.train", "train_aff"),
    "rw": ("cse_ray.infer", "run_rw"),
    "train-seg": ("cse_ray.train", "train_seg"),
    "tune": ("cse_ray.tune", "run_tune"),
    "pipeline": ("cse_ray.pipeline", "run_pipeline"),
}
"""Each config command calls one `function(cfg, out)`, imported only when that command runs."""


def _run_stage(command: str, cfg, out: str) -> None:
    import importlib

    from cse_ray import artifacts

    artifacts.check_storage(out)  # a remote --out that cannot be written: exit 2 before anything runs
    module, function = STAGE_FUNCTIONS[command]
    getattr(importlib.import_module(module), function)(cfg, out)  # each resolves relative paths itself


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        run(args)
    except UserError as err:
        print(f"cse-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"cse-ray {args.command}: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # a failure during the run: keep the traceback for the bug report
        traceback.print_exc()
        return 1
    return 0


def job_main(command: str) -> None:
    """Entry for `jobs/<stage>.py`: the same arguments as `cse-ray <command>`."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
