"""Command line: one subcommand per stage, and the registry.

    resnet-pipeline download|split|shard|train|evaluate|register [--params params.yaml] [--set train.epochs=3]
    resnet-pipeline registry list|show|pull|promote|gc ... [--registry FOLDER|s3://BUCKET/PREFIX]
    resnet-pipeline registry pull SPEC DEST [--layout registry|tf-serving]
    resnet-pipeline registry restore SPEC DIR [--repo URL] [--remote URL]
    resnet-pipeline predict --model MODEL_DIR|NAME[:VERSION|@ALIAS] IMAGE... [--top-k K] [--json]
                            [--format onnx|litert|litert-int8]
    resnet-pipeline export --format onnx|litert|litert-int8 [--model MODEL_DIR|NAME[:VERSION|@ALIAS]] OUT
    resnet-pipeline model summary [--depth 50] [--variant v1|v1.5|v2|cifar] [--image-size 224]
    resnet-pipeline benchmark model [--depths 50,101] [--variant v1] [--batch-size 16] [--steps 10]
    resnet-pipeline benchmark ingest [--sizes 10000,40000,160000] [--classes 100] [--s3-objects 2000] [--no-s3]
                                     [--s3-endpoint URL]
    resnet-pipeline benchmark pull [--seaweed [--pin] | --s3-endpoint URL | --registry s3://BUCKET/PREFIX]
                                   [--size-mb 100] [--rounds 3]
    resnet-pipeline benchmark warmstart [--epochs 3] [--source-epochs 10] [--seeds 1,2,3]
    resnet-pipeline recovery apply|remove   the Prefect automations that resume crashed scheduled runs

Each stage subcommand reads params once, validates them, and runs the stage with `stages.run_stage`
on the typed config and the paths of `resnet_pipeline.paths.Paths` (relative to the current folder). The registry,
model, export, benchmark and recovery commands live in `cli_registry`, `cli_model`, `cli_export`,
`cli_benchmark` and `cli_recovery`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from resnet_pipeline import cli_benchmark, cli_export, cli_model, cli_recovery, cli_registry, logs, stages
from resnet_pipeline.cli_args import add_params, load_params
from resnet_pipeline.config import EXPORT_FORMATS, ConfigError
from resnet_pipeline.paths import Paths
from resnet_pipeline.training.preempt import PREEMPTED_EXIT, Preempted


def run_stage_command(args: argparse.Namespace) -> int:
    """A stage subcommand: params, then the stage under the folder lock; its result on stdout."""
    cfg = load_params(args)
    if args.command == "train" and args.workers:
        from resnet_pipeline.training.launch import launch

        train_args = ["--params", args.params, *(f"--set={item}" for item in args.set)]
        return launch(args.workers, train_args, verbose=args.verbose)
    paths = Paths.from_config(cfg)
    with stages.stage_lock(args.command, paths):
        result = stages.run_stage(args.command, cfg, paths)
    print(result if isinstance(result, str) else json.dumps(result))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from resnet_pipeline.predict import format_results, is_registry_spec, predict, resolve_model

    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: received {args.top_k}; allowed: 1 or more")
    registry = None
    if is_registry_spec(args.model) and (args.registry or Path(args.params).exists()):
        registry = cli_registry.open_from_args(args)  # with the params' S3 settings
    results = predict(resolve_model(args.model, registry), args.images, top_k=args.top_k, fmt=args.format)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0


def _add_stage_parsers(sub) -> None:
    for name in stages.STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        add_params(p)
        if name == "train":
            p.add_argument(
                "--workers",
                type=int,
                default=0,
                help="launch N local worker processes with MultiWorkerMirroredStrategy on loopback",
            )


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files with a trained model")
    p.add_argument(
        "--model",
        required=True,
        help="a model folder (model.keras, labels.json, params.yaml), or a registry spec NAME, "
        "NAME:VERSION or NAME@ALIAS",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, GIF or BMP files")
    p.add_argument("--top-k", type=int, help="classes per image (default: the model's evaluate.top_k)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--registry", help="registry location for a spec (default: register.registry in params)")
    p.add_argument("--params", default="params.yaml", help="params file naming the registry")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="run the model's export in this format (model.onnx, model.tflite, model.int8.tflite in the folder "
        "or version) with ONNX Runtime or LiteRT instead of model.keras",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and TensorFlow's and absl's INFO lines"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stage_parsers(sub)
    cli_registry.add_parsers(sub)
    _add_predict_parser(sub)
    cli_model.add_parsers(sub)
    cli_export.add_parser(sub)
    cli_benchmark.add_parsers(sub)
    cli_recovery.add_parsers(sub)
    return parser


COMMANDS = {
    "registry": cli_registry.run_registry,
    "model": cli_model.run_model,
    "predict": run_predict,
    "export": cli_export.run_export,
    "benchmark": cli_benchmark.run_benchmark,
    "recovery": cli_recovery.run_recovery,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage and the error (2), or the help (0)
        return int(stop.code or 0)
    logs.setup(verbose=args.verbose)  # before any TensorFlow import
    try:
        return COMMANDS.get(args.command, run_stage_command)(args)
    except Preempted as stop:
        print(f"resnet-pipeline {args.command}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"resnet-pipeline {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
