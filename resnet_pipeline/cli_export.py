"""`resnet-pipeline export`: a model in a portable format, checked against its Keras model before it is written.

    resnet-pipeline export --format onnx|litert|litert-int8 [--model DIR|NAME@ALIAS|NAME:VERSION] OUT

OUT is the file to write (or a folder: the format's own name in it, `model.onnx`, `model.tflite`,
`model.int8.tflite`); its JSON goes beside it (`OUT.json`). The model defaults to the train stage's
folder of the params; a registry spec is pulled and verified into the cache first, as `predict` does.
The int8 calibration and the check read the shards of the params' data folder (`--shards`); the
sample sizes and bounds default to the params' `register.export_*`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from resnet_pipeline import config as config_mod
from resnet_pipeline.cli_args import add_params, positive_int
from resnet_pipeline.config import EXPORT_FORMATS, Config
from resnet_pipeline.paths import Paths

SUFFIXES = {".onnx": ("onnx",), ".tflite": ("litert", "litert-int8")}


def _params(args) -> Config:
    """--params (default: params.yaml if present, else the defaults) with the --set overrides."""
    overrides = config_mod.parse_overrides(args.set)
    if args.params is None and not Path("params.yaml").exists():
        return config_mod.from_dict(config_mod.apply_overrides(Config().to_dict(), overrides), source="defaults")
    return config_mod.load(args.params or "params.yaml", overrides)


def output_path(out: str, fmt: str) -> Path:
    """OUT as given, or the format's file in OUT if it is a folder; its suffix must be the format's."""
    from resnet_pipeline.exports.formats import get_format

    path = Path(out)
    if path.is_dir():
        return path / get_format(fmt).file
    if fmt not in SUFFIXES.get(path.suffix, ()):
        raise ValueError(f"OUT: received {out!r}; a {fmt} file ends in {Path(get_format(fmt).file).suffix}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: folder of OUT not found")
    return path


def run_export(args: argparse.Namespace) -> int:
    from resnet_pipeline import cli_registry
    from resnet_pipeline.exports.formats import ExportSettings
    from resnet_pipeline.exports.make import export_model, summary
    from resnet_pipeline.predict import is_registry_spec, resolve_model

    cfg = _params(args)
    paths = Paths.from_config(cfg)
    model = args.model or str(paths.model_dir)
    target = output_path(args.out, args.format)
    registry = None
    params = args.params or "params.yaml"
    if is_registry_spec(model) and (args.registry or Path(params).exists()):  # as `predict` opens it
        registry = cli_registry.open_from_args(argparse.Namespace(registry=args.registry, params=params))
    model_dir = resolve_model(model, registry)
    settings = ExportSettings.from_config(cfg)
    changes = {"calibration_images": args.calibration_images, "check_images": args.check_images}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    shards = Path(args.shards) if args.shards else paths.shards
    record = export_model(model_dir, {args.format: target}, shards_dir=shards, settings=settings)[args.format]
    print(f"wrote {target} and {target.name}.json: {summary(record)}")
    return 0


def add_parser(sub) -> None:
    """The `export` command, on the top-level subparsers `sub`."""
    p = sub.add_parser("export", help="a model as ONNX or LiteRT (float or int8), checked against it first")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="onnx, litert or litert-int8")
    p.add_argument(
        "--model",
        help="a model folder (model.keras, labels.json, params.yaml) or a registry spec NAME, NAME:VERSION or "
        "NAME@ALIAS (default: the train stage's folder of the params)",
    )
    p.add_argument("out", metavar="OUT", help="the file to write (.onnx, .tflite), or a folder for the format's name")
    p.add_argument("--registry", help="registry location for a spec (default: register.registry in params)")
    p.add_argument("--shards", help="shards folder to sample (default: the params' data folder's shards)")
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        help="litert-int8: train images that set the int8 ranges (default: register.export_calibration_images)",
    )
    p.add_argument(
        "--check-images",
        type=positive_int,
        help="test images the export is checked on (default: register.export_check_images)",
    )
    add_params(p, default=None, helptext="params file (default: params.yaml if present, else the defaults)")
