"""`resnet-pipeline registry ...`: list, show, pull, promote and restore registered models; collect garbage.

    resnet-pipeline registry list|show|pull|promote|gc ... [--registry FOLDER|s3://BUCKET/PREFIX]
    resnet-pipeline registry pull SPEC DEST [--layout registry|tf-serving]
    resnet-pipeline registry restore SPEC DIR [--repo URL] [--remote URL]

The registry is `--registry`, else `register.registry` of the params file; the params' S3 settings
apply either way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resnet_pipeline import config as config_mod
from resnet_pipeline import stages
from resnet_pipeline.config import Config, ConfigError


def open_from_args(args: argparse.Namespace):
    """--registry, else register.registry of the params file (whose S3 settings apply either way)."""
    cfg = config_mod.load(args.params) if not args.registry or Path(args.params).exists() else Config()
    return stages.open_registry(cfg, location=args.registry)


def _describe(manifest: dict, aliases: dict[str, int] | None = None) -> str:
    test = (manifest.get("metrics") or {}).get("test") or {}
    figures = "  ".join(f"{k} {v}" for k, v in test.items() if not isinstance(v, (dict, list)))
    tags = [a for a, v in (aliases or {}).items() if v == manifest["version"]]
    return (
        f"{manifest['name']}:{manifest['version']}  {manifest['created_at']}"
        + (f"  [{', '.join('@' + t for t in tags)}]" if tags else "")
        + (f"  {figures}" if figures else "")
    )


def _list(reg, args) -> None:
    for name in [args.model] if args.model else reg.names():
        aliases = reg.aliases(name)
        for version in reg.versions(name):
            print(_describe(reg.manifest(f"{name}:{version}"), aliases))


def _show(reg, args) -> None:
    from resnet_pipeline.registry import RegistryError, parse_spec

    if not args.history:
        manifest = reg.manifest(args.model)
        print(json.dumps(manifest, indent=2) if args.json else _describe(manifest, reg.aliases(manifest["name"])))
        return
    spec = parse_spec(args.model)
    if spec.alias is None:
        raise RegistryError(f"--history: {args.model!r} names no alias; expected NAME@ALIAS")
    entries = reg.history(spec.name, spec.alias)
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    for e in entries:
        print(
            f"{e['at']}  {e['outcome']:<4}  version {e['version']}  expected {e['expected_previous']}  "
            f"actual {e['actual_previous']}  by {e['by']}" + (f"  ({e['reason']})" if e.get("reason") else "")
        )


def _pull(reg, args) -> None:
    if args.layout == "tf-serving":
        from resnet_pipeline.registry.serving import pull_for_serving

        target = pull_for_serving(reg, args.model, args.dest)
        print(f"pulled {args.model} to {target} (TF Serving: --model_base_path={Path(args.dest).resolve()})")
    else:
        print(f"pulled {args.model} to {reg.pull(args.model, args.dest)}")


def _promote(reg, args) -> None:
    name, version = reg.resolve(args.model)
    before = reg.alias(name, args.alias)
    reg.promote(name, version, args.alias, expected=before, reason=f"by hand: registry promote {args.model}")
    print(f"{name}@{args.alias} -> version {version} (was {before.version})")


def _gc(reg, args) -> None:
    if not args.older_than >= 0:  # NaN too: every age would pass it
        raise ConfigError(f"--older-than: received {args.older_than}; allowed: 0 or more seconds")
    removed = reg.gc(args.model, older_than=args.older_than)
    for r in removed:
        print(
            f"removed uncommitted {r['name']}:{r['version']} ({len(r['objects'])} objects, "
            f"{r['age_seconds']:.0f}s old): {', '.join(r['objects'])}"
        )
    print(f"gc: {len(removed)} uncommitted version(s) removed")


def _restore(reg, args) -> None:
    from resnet_pipeline.restore import restore

    done = restore(reg, args.model, args.dest, repo=args.repo, remote=args.remote)
    print(
        f"restored {done['name']}:{done['version']} into {args.dest}: the project at commit {done['commit'][:12]}, "
        f"its dvc.lock and params, data and model from DVC remote {done['remote']!r} "
        f"({done['checked']} files checked); `dvc status` there is clean"
    )


ACTIONS = {"list": _list, "show": _show, "pull": _pull, "promote": _promote, "gc": _gc, "restore": _restore}


def run_registry(args: argparse.Namespace) -> int:
    ACTIONS[args.action](open_from_args(args), args)
    return 0


def add_parsers(sub) -> None:
    """The `registry` command and its actions, on the top-level subparsers `sub`."""
    reg = sub.add_parser("registry", help="list, show, pull, promote registered models; collect garbage")
    reg_sub = reg.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("list", "list committed versions"),
        ("show", "show a version or an alias' history"),
        ("pull", "pull a version, verified"),
        ("promote", "point an alias at a version"),
        ("gc", "delete uncommitted versions"),
        ("restore", "a version back as a project folder: code, dvc.lock, params, data and model, verified"),
    ):
        p = reg_sub.add_parser(action, help=helptext)
        p.add_argument("--params", default="params.yaml", help="params file naming the registry")
        p.add_argument("--registry", help="a folder or s3://bucket/prefix (default: register.registry in params)")
        if action in ("list", "gc"):
            p.add_argument("model", nargs="?", help="model name (default: all)")
        else:
            p.add_argument("model", metavar="SPEC", help="NAME (latest), NAME:VERSION or NAME@ALIAS")
    _action_options(reg_sub.choices)


OLDER_THAN = (
    "only versions whose newest object (claim, heartbeat or file) is at least this old "
    "(default: 86400, a day; a live registration refreshes its heartbeat every minute)"
)


def _action_options(parsers: dict[str, argparse.ArgumentParser]) -> None:
    show, pull, promote, gc, restore = (parsers[a] for a in ("show", "pull", "promote", "gc", "restore"))
    show.add_argument("--json", action="store_true", help="the whole manifest (or history) as JSON")
    show.add_argument("--history", action="store_true", help="every promotion attempt of NAME@ALIAS")
    pull.add_argument(
        "dest",
        help="destination folder (must not exist or be empty; with --layout tf-serving "
        "the model base path, where DEST/VERSION must not exist or be empty)",
    )
    pull.add_argument(
        "--layout",
        choices=("registry", "tf-serving"),
        default="registry",
        help="registry: the version's files as stored (default); tf-serving: its SavedModel "
        "as DEST/VERSION/saved_model.pb, variables/, assets/ for tensorflow_model_server",
    )
    promote.add_argument("alias", help="alias to point at the version, such as champion or staging")
    gc.add_argument("--older-than", type=float, default=86400.0, metavar="SECONDS", help=OLDER_THAN)
    restore.add_argument("dest", metavar="DIR", help="the folder to create (must not exist or be empty)")
    restore.add_argument(
        "--repo", help="the project's git repository (a URL or a folder; default: the one around the current folder)"
    )
    restore.add_argument("--remote", help="the DVC remote's URL, if not the one the version was pushed to")
