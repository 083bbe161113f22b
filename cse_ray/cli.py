"""`cse-ray` command line: parse, load and validate the config, call one stage function.

Exit codes: 0 success, 2 bad arguments/config/input (one message, no traceback), 1 failure during the
run. Every stage import happens inside its command so that `--help` and config errors are instant and
Ray is never started for a run that would be refused.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from cse_ray.errors import UserError

CONFIG_COMMANDS = {
    "train-cam": "train the ordinary CAM classifier on Ray Train",
    "train-cse": "train the eraser against the frozen classifier on Ray Train",
    "train": "train-cam, then train-cse (only train-cse when train_cse.classifier is given)",
    "infer": "multi-scale CAMs on Ray actors, dense CRF on Ray CPU tasks, pseudo-label PNGs",
    "tune": "Ray Tune sweep over train-cse hyperparameters",
    "pipeline": "the whole chain as one run: data, train-cam, train-cse, infer, CRF, evaluate, report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cse-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write the embedded synthetic dataset in the VOC layout")
    synth.add_argument("--out", required=True, help="dataset root to write")
    synth.add_argument("--train", type=int, default=200, help="training images (default 200)")
    synth.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    synth.add_argument("--size", type=int, default=128, help="long side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    synth.add_argument("--part-strength", type=float, default=1.0, help="salience of the part, 0..1")
    synth.add_argument("--body-strength", type=float, default=0.8, help="salience of the body, 0..1")
    synth.add_argument("--body-texture", choices=("class", "family"), default="class",
                       help="family: a colour family shares one body texture (docs/SYNTHETIC.md)")

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    lists = data_sub.add_parser("lists", help="write train, val, train_aug lists and the labels file")
    lists.add_argument("--root", required=True, help="VOC2012 root (JPEGImages, Annotations, ...)")
    lists.add_argument("--sbd", default=None, help="SBD root with SegmentationClassAug (optional)")
    lists.add_argument("--out", required=True, help="directory for the lists")

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
    ev.add_argument("--task", choices=("cam", "label"), default="cam")
    ev.add_argument("--format", choices=("native", "seed"), default="native", dest="fmt")
    ev.add_argument("--out", default=None, help="write the JSON report (and .md/.parquet/.png beside)")
    ev.add_argument("--thresholds", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=None)
    ev.add_argument("--log-dir", default=None, help="also write TensorBoard scalars here")

    weights = sub.add_parser("weights", help="weight files")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")
    convert = weights_sub.add_parser("convert", help="MXNet .params or DataParallel .pth -> state dict")
    convert.add_argument("src")
    convert.add_argument("dst")
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
        from cse_ray.data.synth import generate

        generate(
            args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
            part_strength=args.part_strength, body_strength=args.body_strength,
            body_texture=args.body_texture,
        )
        print(f"synthetic dataset written to {args.out}")
    elif args.command == "data":
        from cse_ray.data.voc import write_lists

        written = write_lists(args.root, args.out, sbd_root=args.sbd)
        for name, path in written.items():
            print(f"{name}: {path}")
    elif args.command == "evaluate":
        from cse_ray.evaluate import run_evaluate

        run_evaluate(
            args.pred, args.gt, args.list_path, task=args.task, fmt=args.fmt, out=args.out,
            thresholds=tuple(args.thresholds) if args.thresholds else None, log_dir=args.log_dir,
        )
    elif args.command == "weights":
        from cse_ray.models.weights import convert_weights

        report = convert_weights(args.src, args.dst, model_name=args.model)
        print(report)
    else:
        _run_stage(args.command, command_config(args), args.out or default_out(args.config))


STAGE_FUNCTIONS = {
    "train-cam": ("cse_ray.train", "train_cam"),
    "train-cse": ("cse_ray.train", "train_cse"),
    "train": ("cse_ray.train", "train_both"),
    "infer": ("cse_ray.infer", "run_infer"),
    "tune": ("cse_ray.tune", "run_tune"),
    "pipeline": ("cse_ray.pipeline", "run_pipeline"),
}
"""Each config command calls one `function(cfg, out)`, imported only when that command runs."""


def _run_stage(command: str, cfg, out: str) -> None:
    import importlib

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
