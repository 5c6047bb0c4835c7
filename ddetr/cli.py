"""The `ddetr` command line. Thin: it parses, builds a config and calls the library.

ddetr demo                                   the main job: synthetic data, Ray training, results folder
ddetr train --preset tiny [--config FILE] --data DIR [--engine ray|local] [section.field=value ...]
ddetr config [--preset P] [--config FILE] [section.field=value ...]   the resolved config as YAML, every key
ddetr config --reference                     every key, its default and meaning (docs/config.md)
ddetr eval --checkpoint PATH --data DIR [--plots OUT]   COCO metrics and the per-class table
ddetr predict --checkpoint PATH --out DIR INPUT...       files, folders, quoted globs, s3:// prefixes: a batch at a time
ddetr predict --checkpoint PATH --out DIR --batch INPUT...   batch inference with a Ray Data actor pool
ddetr predict --checkpoint PATH --out DIR --shards DIR   the same over shards (a split folder, or a dataset's val)
ddetr data synth --out DIR [--images N]
ddetr data convert --images DIR --annotations FILE.json --out DIR [--strict]     a COCO split
ddetr data convert --format yolo|voc --source DIR --out DIR [--names FILE|a,b] [--split S]   OUT/<split>/ each
ddetr data check DIR                         a split's boxes per class, image sizes, boxes per image, box sizes
ddetr export --format hf CHECKPOINT DIR      a Hugging Face DeformableDetrForObjectDetection folder
ddetr export --format onnx CHECKPOINT OUT.onnx [--top-k 100]   ONNX, dynamic batch and size, optional top-k
ddetr op build                               prebuild the compiled op (cluster setup commands)
ddetr serve --checkpoint PATH [--port 8000]  online detection on Ray Serve: POST /detect, GET /healthz
ddetr submit train|eval|predict|tune|run ... | --list | --follow JOB | --stop JOB    Ray Jobs on a cluster
ddetr tune --data DIR --space tune/spaces/default.yaml [--max-concurrent N]          a Ray Tune sweep

A checkpoint PATH (or CHECKPOINT) is a checkpoint folder, an official .pth, a Hugging Face folder, or a run folder
(train.storage_path/train.name): its best checkpoint by val/AP; RUN_DIR/latest names its newest. --data (and
--shards) name a split folder (DIR/shards/val) or a dataset folder (train/ and val/, or shards/train and shards/val).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ddetr.config import PRESETS, ConfigError, build_config, data_said, data_split

log = logging.getLogger("ddetr")
CHECKPOINT_HELP = (
    "a ddetr checkpoint folder, an official .pth, a Hugging Face folder, or a run folder (its best checkpoint; "
    "RUN_DIR/latest: its newest)"
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong, not the program: one line, exit status 2."""
    from ddetr.data.coco_eval import MissingPycocotoolsError
    from ddetr.data.shards import DataError
    from ddetr.data.validate import BadRecordError
    from ddetr.train.checkpoints import CorruptCheckpointError

    return (
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        BadRecordError,
        DataError,
        CorruptCheckpointError,
        MissingPycocotoolsError,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ddetr.train import train

    cfg = build_config(args.preset, args.data, args.overrides, args.config or "")
    metrics = train(cfg, engine=args.engine, resume=args.resume)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2, sort_keys=True))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from ddetr.config_text import config_yaml, reference_markdown

    if args.reference:
        print(reference_markdown(), end="")
        return 0
    # Unnamed unless the user names it: a saved file then starts a new run each time, as the command line would.
    cfg = build_config(args.preset, args.data, args.overrides, args.config or "", name_run=False)
    print(config_yaml(cfg), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ddetr.data.coco_eval import CocoEvaluator
    from ddetr.data.loader import build_dataloader
    from ddetr.data.transforms import TransformConfig
    from ddetr.inference import Detector
    from ddetr.train.engine import predict_batches

    val = data_split(args.data, "val")
    detector = Detector.from_checkpoint(args.checkpoint, device=args.device)
    log.info("%s", data_said(args.data, "", val))
    transforms = TransformConfig().scaled(detector.cfg.data.scale)
    loader = build_dataloader(val, transforms, train=False, batch_size=args.batch_size)
    predictions = predict_batches(detector.model, detector.postprocess, loader, device=detector.device)
    evaluator = CocoEvaluator.from_shards(val)
    metrics = evaluator.evaluate(predictions)
    print(json.dumps(metrics, indent=2))  # stdout stays JSON for scripts; the table is for the reader, on stderr
    if evaluator.last is not None:
        print(f"\nper class ({val}):\n{evaluator.last.table()}", end="", file=sys.stderr)
        if args.plots:
            from ddetr.train.results import write_evaluation

            written = write_evaluation(evaluator.last, evaluator.coco_gt, args.plots, val, draw=args.draw)
            drawn = f", images/ ({len(written) - 3} drawn)" if args.draw > 0 else ""
            print(f"\nin {args.plots}: per_class.md, pr_curves.png, confusion_matrix.png{drawn}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.shards and args.images:
        raise ConfigError("ddetr predict: give images or a shard folder with --shards, not both")
    if args.shards or args.batch:
        from ddetr.batch_inference import predict_image_files, predict_shards

        options = {"batch_size": args.batch_size, "max_actors": args.actors, "draw": args.draw,
                   "threshold": args.threshold}  # fmt: skip
        if args.shards:
            summary = predict_shards(args.checkpoint, args.shards, args.out, **options)
        else:
            summary = predict_image_files(args.checkpoint, _images_given(args.images), args.out, **options)
        print(f"{summary['images']} images, {summary['detections']} detections in {summary['file']} "
              f"({summary['images_per_s']} images/s)")  # fmt: skip
        return 0
    from ddetr.image_sources import list_images
    from ddetr.inference import Detector, predict_images

    images = list_images(_images_given(args.images))
    if not images:
        raise ConfigError(f"ddetr predict: no image file in {' '.join(args.images)}")
    detector = Detector.from_checkpoint(args.checkpoint, device=args.device)
    summary = predict_images(detector, images, args.out, batch_size=args.batch_size, threshold=args.threshold)
    skipped = len(summary["skipped"])
    print(
        f"{summary['images']} images: detections in {summary['file']}, drawings in {args.out}"
        + (f" ({skipped} unreadable file{'s' * (skipped > 1)} skipped)" if skipped else "")
    )
    return 0 if summary["images"] else 1


def _images_given(images: list[str]) -> list[str]:
    if not images:
        raise ConfigError(
            "ddetr predict: give image files, or a shard folder with --shards (images may be files, folders, quoted "
            "globs or s3:// prefixes)"
        )
    return images


def cmd_demo(args: argparse.Namespace) -> int:
    from ddetr.demo import DEMO_EPOCHS, run_demo

    run_demo(Path(args.out), epochs=args.epochs or DEMO_EPOCHS, overrides=args.overrides)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ddetr.data.synthetic import make_synthetic_coco

    n_val = args.val if args.val is not None else max(1, args.images // 5)
    paths = make_synthetic_coco(args.out, args.images, n_val, seed=args.seed)
    print(
        f"synthetic COCO: {args.images} train + {n_val} val images; shards in {paths.train_shards}, {paths.val_shards}"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.format == "coco":
        from ddetr.data.convert import convert_coco

        if not args.images or not args.annotations or args.source:
            raise ConfigError("ddetr data convert: a COCO split takes --images DIR and --annotations FILE.json "
                              "(a YOLO or VOC folder: --format yolo|voc --source DIR)")  # fmt: skip
        print(convert_coco(args.images, args.annotations, args.out, strict=args.strict, shard_size=args.shard_size,
                           workers=args.workers))  # fmt: skip
        return 0
    if not args.source or args.images or args.annotations:
        raise ConfigError(f"ddetr data convert --format {args.format} takes --source DIR, the dataset folder "
                          "(not --images/--annotations)")  # fmt: skip
    if args.format == "yolo":
        from ddetr.data.yolo import convert_yolo as convert
    else:
        from ddetr.data.voc import convert_voc as convert
    splits = [s for arg in args.split for s in arg.split(",") if s] or None
    summaries = convert(args.source, args.out, names=args.names, splits=splits, strict=args.strict,
                        shard_size=args.shard_size)  # fmt: skip
    print("\n".join(map(str, summaries.values())))  # each names its split folder
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ddetr.data.check import check

    print(check(args.dir))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from ddetr.jobs import run

    return run(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from ddetr.sweep.driver import run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from ddetr.train.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)  # a run folder: its best checkpoint
    if args.format == "onnx":
        from ddetr.deploy.onnx import export_onnx

        path = export_onnx(checkpoint, args.out, top_k=args.top_k)
        print(f"exported {checkpoint} as ONNX: {path}" + (f" (top {args.top_k} detections)" if args.top_k else ""))
        return 0
    from ddetr import io
    from ddetr.inference import PREPROCESSOR_FILE, hf_preprocessor_config
    from ddetr.models.weights import export_hf, read_weights

    folder = export_hf(checkpoint, args.out)
    run = read_weights(checkpoint).run_config  # the image size it was trained at, for the image processor
    scale = run.data.scale if run is not None else 1.0
    io.atomic_write(io.join(str(folder), PREPROCESSOR_FILE), json.dumps(hf_preprocessor_config(scale), indent=2))
    print(f"exported {checkpoint} as a Hugging Face model folder: {folder}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ddetr.deploy.serve import ServeSettings, run

    names = ("checkpoint", "host", "port", "max_batch_size", "batch_wait_s", "min_replicas", "max_replicas",
             "cpus_per_replica", "use_gpu", "threshold", "max_image_bytes", "max_request_pixels",
             "max_inflight_pixels", "request_timeout_s", "start_timeout_s", "name")  # fmt: skip
    run(ServeSettings(**{k: getattr(args, k) for k in names if getattr(args, k) is not None}))  # else its defaults
    return 0


def cmd_op_build(args: argparse.Namespace) -> int:
    from ddetr.ops.build import build_extension

    print(f"built {build_extension(verbose=args.verbose)}")
    return 0


CONFIG_EPILOG = (
    "Every config key, its default and meaning: docs/config.md (or `ddetr config --reference`). The config these "
    "arguments resolve to: `ddetr config` with the same --preset/--config/--data and overrides; `ddetr train` writes "
    "it to config.yaml in the run folder."
)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--preset, --config, --data and the overrides: the inputs of `build_config`, in the order it applies them."""
    presets = ", ".join(PRESETS)
    p.add_argument("--preset", help=f"one of: {presets} (default: the config file's, else deformable_detr)")
    p.add_argument(
        "--config",
        help="a YAML (or JSON) config file: preset: and the keys that differ (`ddetr config` prints a full one), or a "
        "full JSON config such as a sweep's best_config.json",
    )
    p.add_argument("--data", help="a dataset folder: train/ and val/ shards (or DIR/shards/...); a split folder: "
                   "trained on without validation")  # fmt: skip
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value, after the file: train.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddetr", description="Deformable DETR on Ray")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="also Ray's own progress and reports")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"nargs": "*", "default": [], "help": "config overrides, e.g. train.epochs=2 model.num_queries=100"}

    p = sub.add_parser("train", help="train a model", epilog=CONFIG_EPILOG)
    add_config_arguments(p)
    p.add_argument("--engine", default="ray", choices=["ray", "local"], help="Ray Train, or this process alone")
    p.add_argument("--resume", help="checkpoint folder to start from (a run folder: its latest checkpoint)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "config", help="print the resolved config as YAML, every key (--config reads it back)", epilog=CONFIG_EPILOG
    )
    add_config_arguments(p)
    p.add_argument("--reference", action="store_true", help="print the reference of every key instead (docs/config.md)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="COCO metrics of a checkpoint on a validation split")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="a split folder (DIR/shards/val), or a dataset folder: its val split")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--plots", help="a folder (path or URI) for the per-class table, PR curves, confusion matrix and "
                   "drawn images")  # fmt: skip
    p.add_argument("--draw", type=int, default=8, help="with --plots: validation images drawn (default 8)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images: detections.json and drawn PNGs")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score drawn")
    p.add_argument("--device", default=None, help="in this process only; actors use a GPU each when there are any")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch", action="store_true", help="batch inference over the images with a Ray Data actor pool")
    p.add_argument("--shards", "--data", dest="shards", default=None,
                   help="batch inference over shards: a split folder, or a dataset folder (its val split)")  # fmt: skip
    p.add_argument("--actors", type=int, default=None, help="--batch, --shards: largest actor pool (default: GPUs, "
                   "else CPUs)")  # fmt: skip
    p.add_argument("--draw", type=int, default=8, help="--batch, --shards: images drawn (in this process: all)")
    p.add_argument("images", nargs="*", help="image files, folders (searched recursively), quoted globs "
                   "('a/**/*.jpg'), s3:// prefixes")  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the main job: synthetic COCO, Ray training, results folder")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--epochs", type=int, default=0, help="training epochs of 800 images (0: the demo's schedule)")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate a synthetic COCO dataset and its shards")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=1000, help="training images")
    p.add_argument("--val", type=int, default=None, help="validation images (default: a fifth of --images)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    p = data.add_parser("convert", help="convert a COCO, YOLO or Pascal VOC detection dataset into Parquet shards")
    p.add_argument("--format", default="coco", choices=["coco", "yolo", "voc"], help="the dataset's format")
    p.add_argument("--images", help="coco: image folder (path or URI)")
    p.add_argument("--annotations", help="coco: instances json (path or URI)")
    p.add_argument("--source", help="yolo: the folder of images/ and labels/; voc: of Annotations/ and JPEGImages/")
    p.add_argument("--names", help="yolo/voc: class names: classes.txt, a .names file, a data YAML, or a,b,c "
                   "(default: yolo: found in --source; voc: the sorted object names)")  # fmt: skip
    p.add_argument("--split", action="append", default=[], help="yolo/voc: a split to convert (repeat, or a,b; "
                   "default: every one there, but VOC's trainval beside train and val)")  # fmt: skip
    p.add_argument("--out", required=True, help="coco: the split folder; yolo/voc: a folder per split (path or URI)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.add_argument("--workers", type=int, default=1, help="coco: processes writing shards (same shards, any number)")
    p.set_defaults(func=cmd_convert)
    p = data.add_parser("check", help="a split's boxes per class, image sizes, boxes per image and box sizes")
    p.add_argument("dir", help="a split folder (dataset.json), or a folder of splits: each of them")
    p.set_defaults(func=cmd_check)

    from ddetr.jobs import add_arguments as add_submit_arguments
    from ddetr.sweep.options import add_arguments as add_tune_arguments

    p = add_submit_arguments(
        sub.add_parser("submit", help="Ray Jobs: train/eval/predict/tune/run, --list/--follow/--stop")
    )
    p.set_defaults(func=cmd_submit)

    p = add_tune_arguments(sub.add_parser("tune", help="a Ray Tune sweep of trainings (ASHA on val/AP)"))
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("export", help="write a checkpoint in another format")
    p.add_argument(
        "--format",
        required=True,
        choices=["hf", "onnx"],
        help="hf: a Hugging Face DeformableDetr folder; onnx: an ONNX file (any batch and image size)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="onnx: also output the top-k detections (scores, labels, boxes in pixels of orig_sizes)",
    )
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("out", help="the folder (hf) or the .onnx file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="online detection on Ray Serve (RAY_ADDRESS, else a local Ray)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--host", help="where the HTTP proxy listens (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--max-batch-size", type=int, help="images per forward pass (default 8)")
    p.add_argument("--batch-wait-s", type=float, help="longest wait for a batch to fill (default 0.01)")
    p.add_argument("--min-replicas", type=int, help="default 1")
    p.add_argument("--max-replicas", type=int, help="autoscaling on ongoing requests up to this many (default 2)")
    p.add_argument("--cpus-per-replica", type=float, help="default 1 (and a GPU, where there are)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_true", default=None, help="a GPU per replica")
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false", help="CPUs only (default: GPUs if the cluster has)")
    p.add_argument("--threshold", type=float, help="default lowest score returned, ?threshold= (default 0.5)")
    p.add_argument("--max-image-bytes", type=int, help="larger images are refused with 413 (default 8 MiB)")
    p.add_argument("--max-request-pixels", type=int, help="of all images of a request, from their headers; 413 beyond "
                   "(default 100 M)")  # fmt: skip
    p.add_argument("--max-inflight-pixels", type=int, help="of the requests a replica holds; 503 beyond "
                   "(default 400 M)")  # fmt: skip
    p.add_argument("--request-timeout-s", type=float, help="a request not answered within it is cut (default 30)")
    p.add_argument("--start-timeout-s", type=float, help="give up when the replicas do not start within it "
                   "(default 300)")  # fmt: skip
    p.add_argument("--name", help="the Serve application's name (default ddetr)")
    p.set_defaults(func=cmd_serve)

    op = sub.add_parser("op", help="the compiled deformable attention op").add_subparsers(
        dest="op_command", required=True
    )
    p = op.add_parser("build", help="build (or find in the cache) the C++/CUDA extension")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_op_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.verbose:
        os.environ["DDETR_VERBOSE"] = "1"
    try:
        return args.func(args)
    except user_errors() as err:
        if args.debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The message of an error on one line (a missing file's message is its name, made a sentence)."""
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in str(err.args[0]):
        return f"no such file or folder: {err.filename}"
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
