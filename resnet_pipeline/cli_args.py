"""The argparse pieces the command modules share: checked types (argparse's error then names the
option) and the `--params`/`--set`/`--output` options."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of `low` or more."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"received {text!r}; expected an integer of {low} or more") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"received {value}; allowed: {low} or more")
        return value

    return check


positive_int = at_least(1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected a number above 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"received {value}; allowed: a finite number above 0")
    return value


def int_list(example: str, low: int = 1) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers of `low` or more, such as `example`."""

    def check(text: str) -> list[int]:
        try:
            values = [int(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"received {text!r}; expected comma-separated integers such as {example}"
            ) from None
        if min(values) < low:
            raise argparse.ArgumentTypeError(f"received {text!r}; allowed: integers of {low} or more")
        return values

    return check


def options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """`{name: args.name}` for the options a function takes under the same names."""
    return {name: getattr(args, name) for name in names}


def add_params(p: argparse.ArgumentParser, default: str | None = "params.yaml", helptext: str | None = None) -> None:
    """`--params FILE` and `--set GROUP.KEY=VALUE` (repeatable)."""
    p.add_argument("--params", default=default, help=helptext or f"params file (default: {default})")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override a param")


def load_params(args: argparse.Namespace) -> Config:
    """The validated config of `--params` with the `--set` overrides."""
    return config_mod.load(args.params, config_mod.parse_overrides(args.set))


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", help="also write the figures as JSON to this file")


def write_output(args: argparse.Namespace, result: Any) -> None:
    """The figures as JSON to `--output`, if given."""
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
