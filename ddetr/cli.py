"""The `ddetr` command line. Thin: it parses, builds a config and calls the library.

ddetr demo                                   the main job: synthetic data, Ray training, results folder
ddetr train --preset tiny --data DIR [--engine ray|local] [section.field=value ...]
ddetr eval --checkpoint PATH --data DIR
ddetr predict --checkpoint PATH IMAGE... --out DIR
ddetr predict --checkpoint PATH --shards DIR --out DIR   batch inference with a Ray Data actor pool
ddetr data synth --out DIR [--images N]
ddetr data convert --images DIR --annotations FILE.json --out DIR [--strict]
ddetr op build                               prebuild the compiled op (cluster setup commands)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ddetr.config import PRESETS, Config, apply_overrides, get_preset


def split_dirs(data: str) -> tuple[str, str]:
    """(train, val) shard folders under `data`: DIR/{train,val}, or DIR/shards/{train,val} (`ddetr data synth`)."""
    root = Path(data)
    if (root / "shards").is_dir():
        root = root / "shards"
    if "://" in data:
        return f"{data.rstrip('/')}/train", f"{data.rstrip('/')}/val"
    train, val = root / "train", root / "val"
    return (str(train) if train.exists() else "", str(val) if val.exists() else "")


def load_config_file(path: str) -> Config:
    """A config saved as JSON (`Config.to_json()`, e.g. a sweep's best configuration)."""
    try:
        return Config.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot read config file {path}: {e}") from e


def build_config(preset: str, data: str | None, overrides: list[str], config_file: str | None = None) -> Config:
    """A preset (or a config file), its data folders and their number of classes, then the user's overrides."""
    cfg = load_config_file(config_file) if config_file else get_preset(preset)
    defaults = []
    if data:
        train, val = split_dirs(data)
        if not train and not val:
            raise SystemExit(f"error: no shard folders train/ or val/ under {data} (make them with `ddetr data`)")
        defaults += [f"data.train={train}", f"data.val={val}"]
        from ddetr.data.shards import read_metadata

        defaults.append(f"model.num_classes={read_metadata(train or val).num_classes}")
    return apply_overrides(cfg, defaults + overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from ddetr.train import train

    cfg = build_config(args.preset, args.data, args.overrides, args.config)
    metrics = train(cfg, engine=args.engine, resume=args.resume)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2, sort_keys=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ddetr.data.coco_eval import CocoEvaluator
    from ddetr.data.loader import build_dataloader
    from ddetr.inference import Detector
    from ddetr.train.engine import predict_batches
    from ddetr.train.local import transform_config

    detector = Detector.from_checkpoint(args.checkpoint, device=args.device)
    _, val = split_dirs(args.data)
    if not val:
        raise SystemExit(f"error: no validation shards (val/) under {args.data}")
    loader = build_dataloader(val, transform_config(detector.cfg), train=False, batch_size=args.batch_size)
    predictions = predict_batches(detector.model, detector.postprocess, loader, device=detector.device)
    metrics = CocoEvaluator.from_shards(val).evaluate(predictions)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.shards:
        from ddetr.batch_inference import predict_shards

        summary = predict_shards(args.checkpoint, args.shards, args.out, batch_size=args.batch_size,
                                 max_actors=args.actors, draw=args.draw, threshold=args.threshold)  # fmt: skip
        print(f"{summary['images']} images, {summary['detections']} detections in {summary['file']} "
              f"({summary['images_per_s']} images/s)")  # fmt: skip
        return 0
    if not args.images:
        raise SystemExit("ddetr predict: give image files, or a shard folder with --shards")
    from ddetr.inference import Detector, coco_records, draw_detections

    detector = Detector.from_checkpoint(args.checkpoint, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    detections = detector.predict_files(args.images, batch_size=args.batch_size)
    records = []
    for i, (path, det) in enumerate(zip(args.images, detections, strict=True)):
        draw_detections(path, det, out / f"{Path(path).stem}.png", threshold=args.threshold)
        found = coco_records(i, det["scores"].numpy(), det["labels"].numpy(), det["boxes"].numpy())
        records += [{**r, "file_name": str(path)} for r in found]
    tmp = out / "detections.json.tmp"
    tmp.write_text(json.dumps(records))
    tmp.replace(out / "detections.json")
    print(f"{len(args.images)} images: detections in {out / 'detections.json'}, drawings in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ddetr.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, overrides=args.overrides)
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
    from ddetr.data.convert import convert_coco

    summary = convert_coco(args.images, args.annotations, args.out, strict=args.strict, shard_size=args.shard_size)
    print(summary)
    return 0


def cmd_op_build(args: argparse.Namespace) -> int:
    from ddetr.ops.build import build_extension

    print(f"built {build_extension(verbose=args.verbose)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddetr", description="Deformable DETR on Ray")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"nargs": "*", "default": [], "help": "config overrides, e.g. train.epochs=2 model.num_queries=100"}

    p = sub.add_parser("train", help="train a model")
    p.add_argument("--preset", default="deformable_detr", choices=sorted(PRESETS))
    p.add_argument("--config", help="a JSON config file (Config.to_json()); replaces --preset")
    p.add_argument("--data", help="folder with train/ and val/ shards (or DIR/shards/...)")
    p.add_argument("--engine", default="ray", choices=["ray", "local"], help="Ray Train, or this process alone")
    p.add_argument("--resume", help="checkpoint folder to start from")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO metrics of a checkpoint on a validation split")
    p.add_argument("--checkpoint", required=True, help="a ddetr checkpoint folder or an official .pth")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images: detections.json and drawn PNGs")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score drawn")
    p.add_argument("--device", default=None, help="image files only; shards use a GPU per actor when there are any")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shards", default=None, help="a shard folder: batch inference with a Ray Data actor pool")
    p.add_argument("--actors", type=int, default=None, help="largest actor pool (default: GPUs, else CPUs)")
    p.add_argument("--draw", type=int, default=8, help="shards: images drawn")
    p.add_argument("images", nargs="*")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the main job: synthetic COCO, Ray training, results folder")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of 800 images")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate a synthetic COCO dataset and its shards")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=1000, help="training images")
    p.add_argument("--val", type=int, default=None, help="validation images (default: a fifth of --images)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    p = data.add_parser("convert", help="convert a COCO detection dataset into Parquet shards")
    p.add_argument("--images", required=True, help="image folder (path or URI)")
    p.add_argument("--annotations", required=True, help="instances json (path or URI)")
    p.add_argument("--out", required=True, help="shard folder (path or URI)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.set_defaults(func=cmd_convert)

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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
