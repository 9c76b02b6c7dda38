"""`resnet-pipeline model summary`: the layer table, parameters and multiply-adds of a model of the table.

resnet-pipeline model summary [--depth 50] [--variant v1|v1.5|v2|cifar] [--image-size 224] [--set ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from resnet_pipeline import config as config_mod
from resnet_pipeline.cli_args import add_params, positive_int
from resnet_pipeline.config import Config
from resnet_pipeline.models.specs import VARIANTS
from resnet_pipeline.paths import Paths

# without --variant, a depth the configured variant lacks takes the first of these that has it
INFERRED = ("v1.5", "v2", "cifar")


IMAGENET_SIZE = 224  # the input side of an ImageNet layout when no params file gives train.image_size


def _has_params(args) -> bool:
    return args.params is not None or Path("params.yaml").exists()


def _params(args) -> Config:
    """--params (default: params.yaml if present, else the defaults) with the --set overrides."""
    overrides = config_mod.parse_overrides(args.set)
    if not _has_params(args):
        return config_mod.from_dict(config_mod.apply_overrides(Config().to_dict(), overrides), source="defaults")
    return config_mod.load(args.params or "params.yaml", overrides)


def _layout(name: str) -> dict[str, Any]:
    """The train keys of a variant named on the command line (train.variant's names): the paper's layout."""
    defaults = config_mod.TrainConfig()
    return {
        "variant": name,
        "shortcut": defaults.shortcut,
        "v2_stride_last": defaults.v2_stride_last,
        "use_bias": defaults.use_bias,
    }


def summary_config(args: argparse.Namespace) -> tuple[Config, int]:
    """The train config to summarize (params, then the flags) and the number of classes."""
    from resnet_pipeline.models.specs import SPECS

    cfg = _params(args)
    depth = args.depth if args.depth is not None else cfg.train.depth
    name = args.variant
    if name is None and depth not in SPECS[VARIANTS[cfg.train.variant].family]:
        name = next((n for n in INFERRED if depth in SPECS[VARIANTS[n].family]), None)
    changes: dict[str, Any] = {"depth": depth, **(_layout(name) if name else {})}
    if args.image_size is not None:
        changes["image_size"] = args.image_size
    elif not _has_params(args) and changes.get("variant", cfg.train.variant) != "cifar":
        changes["image_size"] = IMAGENET_SIZE  # no params file: an ImageNet layout at its own size
    raw = cfg.to_dict()
    cfg = config_mod.from_dict({**raw, "train": {**raw["train"], **changes}}, source="model summary")
    labels = Paths.from_config(cfg).labels
    if args.num_classes is not None:
        return cfg, args.num_classes
    if labels.exists():
        return cfg, len(json.loads(labels.read_text())["classes"])
    return cfg, 10 if cfg.train.variant == "cifar" else 1000


def run_model(args: argparse.Namespace) -> int:
    from resnet_pipeline.models.resnet import build_resnet, model_arguments
    from resnet_pipeline.models.summary import format_summary

    cfg, classes = summary_config(args)
    t = cfg.train
    model = build_resnet(**model_arguments(t, num_classes=classes, channels=args.channels))
    options = {k: getattr(t, k) for k in ("shortcut", "v2_stride_last", "use_bias", "zero_init_residual")}
    title = (
        f"ResNet-{t.depth} {t.variant} at {t.image_size}x{t.image_size}x{args.channels}, {classes} classes  "
        + "  ".join(f"{k}={v}" for k, v in options.items())
    )
    print(format_summary(model, title))
    return 0


def add_parsers(sub) -> None:
    """The `model` command and its `summary`, on the top-level subparsers `sub`."""
    model = sub.add_parser("model", help="describe a model of the table")
    model_sub = model.add_subparsers(dest="action", required=True)
    p = model_sub.add_parser("summary", help="layer table, parameters and multiply-adds")
    add_params(p, default=None, helptext="params file (default: params.yaml if present, else the defaults)")
    p.add_argument("--depth", type=int, help="depth (default: train.depth)")
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="v1 (stride on the 1x1), v1.5 (on the 3x3), v2 (pre-activation) or cifar; "
        "default: train.variant, or the first that has --depth",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="input side in pixels (default: train.image_size of the params file; without one, 224, or 32 for cifar)",
    )
    p.add_argument("--channels", type=positive_int, default=3, help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, help="classes (default: labels.json, else 1000, or 10 for cifar)")
