"""Command line: one subcommand per stage, and the registry.

    resnet-pipeline download|split|shard|train|evaluate|register [--params params.yaml] [--set train.epochs=3]
    resnet-pipeline registry list|show|pull ...

Each stage subcommand reads params once, validates them, and calls the stage function with the
typed config and the paths of design.md (relative to the current folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import yaml

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config, ConfigError
from resnet_pipeline.paths import Paths


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected GROUP.KEY=VALUE, such as train.epochs=3")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err.problem})") from None
    return overrides


def run_download(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.data.download import download

    return str(download(cfg.download, paths.raw))


def run_split(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.data.split import split

    table = split(cfg.split, cfg.base.seed, paths.raw / cfg.download.dataset, paths.manifest, paths.labels)
    return {"images": table.num_rows}


def run_shard(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.data.shard import shard

    return shard(cfg.shard, paths.manifest, paths.raw, paths.shards)["splits"]


def run_train(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.training.loop import train

    summary = train(cfg.train, cfg, paths.shards, paths.labels, paths.model_dir, paths.checkpoints)
    return {k: summary[k] for k in ("steps", "wall_time_sec", "images_per_sec")}


def run_evaluate(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.evaluation import evaluate

    return evaluate(cfg.evaluate, paths.model_dir, paths.shards, paths.eval_dir)["test"]


def run_register(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.registry import register_model

    record = register_model(paths.root / cfg.register.registry, cfg.register.model_name,
                            paths.model_dir, paths.eval_dir, paths.registered)
    return f"registered {record['name']}:{record['version']}  test top-1 accuracy {record['metrics']['test']['top1']:.4f}"


STAGES = {
    "download": run_download,
    "split": run_split,
    "shard": run_shard,
    "train": run_train,
    "evaluate": run_evaluate,
    "register": run_register,
}


def _registry(args, cfg_path: str):
    from resnet_pipeline.registry import LocalRegistry

    if args.registry:
        return LocalRegistry(args.registry)
    return LocalRegistry(config_mod.load(cfg_path).register.registry)


def _describe(manifest: dict) -> str:
    test = manifest.get("metrics", {}).get("test", {})
    figures = "  ".join(f"{k} {v}" for k, v in test.items())
    return f"{manifest['name']}:{manifest['version']}  {manifest['created_at']}  {figures}"


def run_registry(args) -> int:
    reg = _registry(args, args.params)
    if args.action == "list":
        names = [args.model] if args.model else reg.names()
        for name in names:
            for version in reg.versions(name):
                print(_describe(reg.manifest(f"{name}:{version}")))
    elif args.action == "show":
        manifest = reg.manifest(args.model)
        print(json.dumps(manifest, indent=2) if args.json else _describe(manifest))
    elif args.action == "pull":
        dest = reg.pull(args.model, args.dest)
        print(f"pulled {args.model} to {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override a param")
    reg = sub.add_parser("registry", help="list, show or pull registered models")
    reg_sub = reg.add_subparsers(dest="action", required=True)
    for action, helptext in (("list", "list versions"), ("show", "show a version"), ("pull", "pull a version")):
        p = reg_sub.add_parser(action, help=helptext)
        p.add_argument("--params", default="params.yaml", help="params file naming the registry")
        p.add_argument("--registry", help="registry folder (default: register.registry in params)")
        if action == "list":
            p.add_argument("model", nargs="?", help="model name (default: all)")
        else:
            p.add_argument("model", help="NAME (latest) or NAME:VERSION")
        if action == "show":
            p.add_argument("--json", action="store_true", help="the whole manifest as JSON")
        if action == "pull":
            p.add_argument("dest", help="destination folder (must not exist or be empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "registry":
            return run_registry(args)
        cfg = config_mod.load(args.params, _parse_set(args.set))
        result = STAGES[args.command](cfg, Paths.from_config(cfg))
        print(result if isinstance(result, str) else json.dumps(result))
        return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"resnet-pipeline {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
