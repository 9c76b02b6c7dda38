"""Command line: one subcommand per stage, and the registry.

    resnet-pipeline download|split|shard|train|evaluate|register [--params params.yaml] [--set train.epochs=3]
    resnet-pipeline registry list|show|pull|promote|gc ... [--registry FOLDER|s3://BUCKET/PREFIX]
    resnet-pipeline registry pull SPEC DEST [--layout registry|tf-serving]
    resnet-pipeline predict --model MODEL_DIR|NAME[:VERSION|@ALIAS] IMAGE... [--top-k K] [--json]
    resnet-pipeline model summary [--depth 50] [--variant v1|v1.5|v2|cifar] [--image-size 224]
    resnet-pipeline benchmark model [--depths 50,101] [--variant v1] [--batch-size 16] [--steps 10]
    resnet-pipeline benchmark ingest [--sizes 10000,40000,160000] [--classes 100] [--s3-objects 2000] [--no-s3]
                                     [--s3-endpoint URL]
    resnet-pipeline benchmark pull [--seaweed [--pin] | --s3-endpoint URL | --registry s3://BUCKET/PREFIX]
                                   [--size-mb 100] [--rounds 3]
    resnet-pipeline benchmark warmstart [--epochs 3] [--source-epochs 10] [--seeds 1,2,3]

Each stage subcommand reads params once, validates them, and calls the stage function with the
typed config and the paths of `resnet_pipeline.paths.Paths` (relative to the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from resnet_pipeline import config as config_mod
from resnet_pipeline import logs
from resnet_pipeline.config import Config, ConfigError
from resnet_pipeline.models.specs import VARIANTS
from resnet_pipeline.paths import Paths
from resnet_pipeline.stagekeys import record_key, require_current
from resnet_pipeline.training.preempt import PREEMPTED_EXIT, Preempted


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected GROUP.KEY=VALUE, such as train.epochs=3")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({getattr(err, 'problem', err)})") from None
    return overrides


def run_download(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.data.download import download

    dest = download(cfg.download, paths.raw, paths.downloads)
    record_key("download", cfg, paths)
    return str(dest)


def run_split(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.data.split import split

    require_current(("download",), cfg, paths)
    table = split(cfg.split, cfg.base.seed, paths.raw / cfg.download.dataset, paths.manifest, paths.labels)
    record_key("split", cfg, paths)
    return {"images": table.num_rows}


def run_shard(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.data.shard import shard

    require_current(("download", "split"), cfg, paths)
    splits = shard(cfg.shard, paths.manifest, paths.raw, paths.shards)["splits"]
    record_key("shard", cfg, paths)
    return splits


def run_train(cfg: Config, paths: Paths) -> Any:
    """Raises `Preempted` (after a checkpoint) when SIGTERM arrives; the command exits 143 then."""
    require_current(("split", "shard"), cfg, paths)
    from resnet_pipeline.training.strategy import make_strategy

    # before anything else touches TensorFlow: MultiWorkerMirroredStrategy and logical CPUs need it
    strategy, cluster = make_strategy(cfg.train.strategy, cfg.train.cpu_devices)
    from resnet_pipeline.training.loop import train

    registry = _open_registry(cfg, paths.root) if config_mod.init_kind(cfg.train.init) == "registry" else None
    summary = train(
        cfg.train,
        cfg,
        paths.shards,
        paths.labels,
        paths.model_dir,
        paths.checkpoints,
        tensorboard_root=paths.tensorboard,
        strategy=strategy,
        cluster=cluster,
        registry=registry,
    )
    return {k: summary[k] for k in ("steps", "wall_time_sec", "images_per_sec")}


def run_evaluate(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.evaluation import evaluate
    from resnet_pipeline.registry import champion_summary
    from resnet_pipeline.registry.stage import data_version

    require_current(("split", "shard"), cfg, paths)
    champion = champion_summary(_open_registry(cfg, paths.root), cfg.register.model_name, cfg.register.alias)
    manifest_sha256 = data_version(paths.manifest, None)["manifest_sha256"]
    return evaluate(
        cfg.evaluate, paths.model_dir, paths.shards, paths.eval_dir, champion=champion, manifest_sha256=manifest_sha256
    )["test"]


def _open_registry(cfg: Config, root: str | Path = ".", location: str | None = None):
    """The registry of `register.registry` (or `location`), with the params' S3 settings."""
    from resnet_pipeline.registry import open_registry

    r = cfg.register
    return open_registry(
        location or r.registry,
        endpoint_url=r.s3_endpoint_url,
        region=r.s3_region,
        addressing_style=r.s3_addressing_style,
        root=root,
        allow_unsafe_store=r.allow_unsafe_store,
    )


def run_register(cfg: Config, paths: Paths) -> Any:
    from resnet_pipeline.provenance import assemble
    from resnet_pipeline.registry import register_model
    from resnet_pipeline.registry.gate import describe

    r = cfg.register
    record = register_model(
        _open_registry(cfg, paths.root),
        r.model_name,
        paths.model_dir,
        paths.eval_dir,
        paths.registered,
        alias=r.alias,
        gate_metric=r.gate_metric,
        min_improvement=r.min_improvement,
        data_manifest=paths.manifest,
        root=paths.root,
        provenance=assemble(cfg, paths),
        gate_options={
            "rule": r.gate,
            "min_value": r.min_value,
            "max_class_drop": r.max_class_drop,
            "bootstrap_samples": r.bootstrap_samples,
            "bootstrap_seed": r.bootstrap_seed,
        },
    )
    lines = [
        f"registered {record['name']}:{record['version']} in {record['registry']}",
        f"gate: {describe(record['gate'])}",
    ]
    if record["promotion"]["error"]:
        lines.append(f"promotion failed: {record['promotion']['error']}")
    return "\n".join(lines)


def _stage_lock(command: str, paths: Paths):
    """The folder lock for one stage command (a flow holds it for its whole run). The processes of
    a multi-worker training run (TF_CONFIG set) are one run: their launcher or cluster holds it."""
    import contextlib

    from resnet_pipeline.runlock import folder_lock

    if os.environ.get("TF_CONFIG"):
        return contextlib.nullcontext()
    return folder_lock(paths.root, {"command": f"resnet-pipeline {command}"})


STAGES = {
    "download": run_download,
    "split": run_split,
    "shard": run_shard,
    "train": run_train,
    "evaluate": run_evaluate,
    "register": run_register,
}


def _registry(args):
    """--registry, else register.registry of the params file (whose S3 settings apply either way)."""
    cfg = config_mod.load(args.params) if not args.registry or Path(args.params).exists() else Config()
    return _open_registry(cfg, location=args.registry)


def _describe(manifest: dict, aliases: dict[str, int] | None = None) -> str:
    test = (manifest.get("metrics") or {}).get("test") or {}
    figures = "  ".join(f"{k} {v}" for k, v in test.items() if not isinstance(v, (dict, list)))
    tags = [a for a, v in (aliases or {}).items() if v == manifest["version"]]
    return (
        f"{manifest['name']}:{manifest['version']}  {manifest['created_at']}"
        + (f"  [{', '.join('@' + t for t in tags)}]" if tags else "")
        + (f"  {figures}" if figures else "")
    )


def run_registry(args) -> int:
    from resnet_pipeline.registry import RegistryError, parse_spec

    reg = _registry(args)
    if args.action == "list":
        for name in [args.model] if args.model else reg.names():
            aliases = reg.aliases(name)
            for version in reg.versions(name):
                print(_describe(reg.manifest(f"{name}:{version}"), aliases))
    elif args.action == "show" and args.history:
        spec = parse_spec(args.model)
        if spec.alias is None:
            raise RegistryError(f"--history: {args.model!r} names no alias; expected NAME@ALIAS")
        entries = reg.history(spec.name, spec.alias)
        if args.json:
            print(json.dumps(entries, indent=2))
        for e in [] if args.json else entries:
            print(
                f"{e['at']}  {e['outcome']:<4}  version {e['version']}  expected {e['expected_previous']}  "
                f"actual {e['actual_previous']}  by {e['by']}" + (f"  ({e['reason']})" if e.get("reason") else "")
            )
    elif args.action == "show":
        manifest = reg.manifest(args.model)
        print(json.dumps(manifest, indent=2) if args.json else _describe(manifest, reg.aliases(manifest["name"])))
    elif args.action == "pull" and args.layout == "tf-serving":
        from resnet_pipeline.registry.serving import pull_for_serving

        target = pull_for_serving(reg, args.model, args.dest)
        print(f"pulled {args.model} to {target} (TF Serving: --model_base_path={Path(args.dest).resolve()})")
    elif args.action == "pull":
        dest = reg.pull(args.model, args.dest)
        print(f"pulled {args.model} to {dest}")
    elif args.action == "promote":
        name, version = reg.resolve(args.model)
        before = reg.alias(name, args.alias)
        reg.promote(name, version, args.alias, expected=before, reason=f"by hand: registry promote {args.model}")
        print(f"{name}@{args.alias} -> version {version} (was {before.version})")
    elif args.action == "gc":
        if args.older_than < 0:
            raise ConfigError(f"--older-than: received {args.older_than}; allowed: 0 or more seconds")
        removed = reg.gc(args.model, older_than=args.older_than)
        for r in removed:
            print(
                f"removed uncommitted {r['name']}:{r['version']} ({len(r['objects'])} objects, "
                f"{r['age_seconds']:.0f}s old): {', '.join(r['objects'])}"
            )
        print(f"gc: {len(removed)} uncommitted version(s) removed")
    return 0


def run_predict(args) -> int:
    from resnet_pipeline.predict import format_results, is_registry_spec, predict, resolve_model

    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: received {args.top_k}; allowed: 1 or more")
    registry = None
    if is_registry_spec(args.model) and (args.registry or Path(args.params).exists()):
        registry = _registry(args)  # with the params' S3 settings
    results = predict(resolve_model(args.model, registry), args.images, top_k=args.top_k)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0


def _summary_config(args) -> tuple[Config, int]:
    """The train config to summarize (params, then the flags) and the number of classes."""
    from resnet_pipeline.models.specs import SPECS

    if args.params is None and not Path("params.yaml").exists():
        cfg = Config()
    else:
        cfg = config_mod.load(args.params or "params.yaml", _parse_set(args.set))
    train = cfg.train
    depth = args.depth if args.depth is not None else train.depth
    name = args.variant
    if name is None and depth not in SPECS[VARIANTS[train.variant].family]:
        # a depth the configured variant lacks: the first named variant that has it (v1.5 for 50)
        name = next((n for n in ("v1.5", "v2", "cifar") if depth in SPECS[VARIANTS[n].family]), None)
    changes: dict[str, Any] = {"depth": depth}
    if name is not None:  # a variant named on the command line takes that variant's paper layout
        defaults = config_mod.TrainConfig()
        changes.update(
            variant=name, shortcut=defaults.shortcut, v2_stride_last=defaults.v2_stride_last, use_bias=defaults.use_bias
        )
    if args.image_size is not None:
        changes["image_size"] = args.image_size
    raw = cfg.to_dict()
    raw["train"] = {**raw["train"], **changes}
    cfg = config_mod.from_dict(raw, source="model summary")
    labels = Paths.from_config(cfg).labels
    if args.num_classes is not None:
        classes = args.num_classes
    elif labels.exists():
        classes = len(json.loads(labels.read_text())["classes"])
    else:
        classes = 10 if cfg.train.variant == "cifar" else 1000
    return cfg, classes


def run_model(args) -> int:
    from resnet_pipeline.models.resnet import build_resnet, model_arguments
    from resnet_pipeline.models.summary import format_summary

    cfg, classes = _summary_config(args)
    t = cfg.train
    if args.channels < 1:
        raise ConfigError(f"--channels: received {args.channels}; allowed: 1 or more")
    model = build_resnet(**model_arguments(t, num_classes=classes, channels=args.channels))
    options = {k: getattr(t, k) for k in ("shortcut", "v2_stride_last", "use_bias", "zero_init_residual")}
    title = (
        f"ResNet-{t.depth} {t.variant} at {t.image_size}x{t.image_size}x{args.channels}, {classes} classes  "
        + "  ".join(f"{k}={v}" for k, v in options.items())
    )
    print(format_summary(model, title))
    return 0


def run_benchmark(args) -> int:
    if args.replicas:
        if args.replicas < 2:
            raise ConfigError(f"--replicas: received {args.replicas}; allowed: 2 or more (compared with one device)")
        from resnet_pipeline.benchmark.replicas import prepare_devices

        prepare_devices(args.replicas)  # logical CPU devices: before anything else touches TensorFlow
    from resnet_pipeline.benchmark.model import benchmark_models, format_rows

    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        raise ConfigError(
            f"--depths: received {args.depths!r}; expected comma-separated depths such as 50,101"
        ) from None
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--steps", args.steps, 2),
        ("--warmup", args.warmup, 0),
        ("--rounds", args.rounds, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag}: received {value}; allowed: {low} or more")
    timing = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        steps=args.steps,
        warmup=args.warmup,
        rounds=min(args.rounds, args.steps),
    )
    if args.replicas:
        from resnet_pipeline.benchmark.replicas import benchmark_replicas
        from resnet_pipeline.models.specs import SPECS

        variant, stride_in_1x1 = VARIANTS[args.variant]
        rows = []
        for depth in depths:
            if depth not in SPECS[variant]:
                raise ConfigError(
                    f"--depths: received {depth} for variant {args.variant!r}; "
                    f"allowed: {', '.join(map(str, SPECS[variant]))}"
                )
            bottleneck = SPECS[variant][depth].block == "bottleneck"
            rows += benchmark_replicas(
                variant,
                depth,
                replicas=args.replicas,
                num_classes=10 if variant == "cifar" else 1000,
                stride_in_1x1=stride_in_1x1 and bottleneck,
                **timing,
            )
    else:
        rows = benchmark_models(args.variant, depths, **timing)
    print(format_rows(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def run_benchmark_warmstart(args) -> int:
    import tempfile

    from resnet_pipeline.benchmark.warmstart import format_result, run

    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise ConfigError(
            f"--seeds: received {args.seeds!r}; expected comma-separated integers such as 1,2,3"
        ) from None
    for flag, value in (("--epochs", args.epochs), ("--source-epochs", args.source_epochs)):
        if value < 1:
            raise ConfigError(f"{flag}: received {value}; allowed: 1 or more")
    with tempfile.TemporaryDirectory(prefix="warmstart-") as tmp:
        result = run(args.workdir or tmp, epochs=args.epochs, source_epochs=args.source_epochs, seeds=seeds)
    print(format_result(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_benchmark_shard(args) -> int:
    from resnet_pipeline.benchmark.shard import format_result, run

    if args.workers < 2:
        raise ConfigError(f"--workers: received {args.workers}; allowed: 2 or more (compared with 1)")
    if args.repeats < 1:
        raise ConfigError(f"--repeats: received {args.repeats}; allowed: 1 or more")
    result = run(
        Path(args.images) if args.images else None,
        count=args.count,
        workers=args.workers,
        max_shorter_side=args.max_shorter_side,
        repeats=args.repeats,
    )
    print(format_result(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_benchmark_input(args) -> int:
    from resnet_pipeline.benchmark.input import compare, format_rows

    rows = compare(
        Path(args.images) if args.images else None,
        count=args.count,
        image_size=args.image_size,
        batch_size=args.batch_size,
        max_shorter_side=args.max_shorter_side,
        generator_images=args.generator_images,
        photos=args.photos,
    )
    print(format_rows(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def run_benchmark_train(args) -> int:
    from resnet_pipeline.benchmark.train import format_result, run

    result = run(config_mod.load(args.params, _parse_set(args.set)), epochs=args.epochs)
    print(format_result(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_benchmark_accuracy(args) -> int:
    from resnet_pipeline.benchmark.accuracy import format_result, run

    result = run(config_mod.load(args.params, _parse_set(args.set)), seeds=args.seeds, first_seed=args.first_seed)
    print(format_result(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_benchmark_ingest(args) -> int:
    from resnet_pipeline.benchmark.ingest import format_result, run
    from resnet_pipeline.benchmark.s3 import check_available

    try:
        sizes = [int(n) for n in args.sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--sizes: received {args.sizes!r}; expected comma-separated image counts") from None
    if len(sizes) < 2 or min(sizes) < args.classes or args.classes < 2:
        raise ConfigError(
            f"--sizes {args.sizes} / --classes {args.classes}: allowed: 2 or more sizes, "
            "each at least the class count, and 2 classes or more"
        )
    if args.s3_objects < 0 or args.s3_workers < 1:
        raise ConfigError(f"--s3-objects {args.s3_objects} / --s3-workers {args.s3_workers}: allowed: >= 0 / >= 1")
    s3_objects = 0 if args.no_s3 else args.s3_objects
    if s3_objects:
        check_available(args.s3_endpoint)  # before the stages' minutes, not after
    result = run(
        sizes, classes=args.classes, s3_objects=s3_objects, s3_workers=args.s3_workers, s3_endpoint=args.s3_endpoint
    )
    print(format_result(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_benchmark_pull(args) -> int:
    from resnet_pipeline.benchmark.pull import format_result, run
    from resnet_pipeline.benchmark.s3 import check_available

    elsewhere = args.registry or args.s3_endpoint
    if args.seaweed and elsewhere:
        raise ConfigError(
            "benchmark pull: --seaweed (the development server) goes with neither --registry nor --s3-endpoint"
        )
    if args.rounds < 1 or args.size_mb <= 0:
        raise ConfigError(f"--rounds {args.rounds} / --size-mb {args.size_mb}: allowed: 1 or more / more than 0")
    if args.pin and elsewhere:
        raise ConfigError("benchmark pull --pin: only with --seaweed (the server must run on this machine)")
    if not args.registry:
        check_available(args.s3_endpoint)
    if (args.part_mb is not None and args.part_mb <= 0) or (args.connections is not None and args.connections < 1):
        raise ConfigError(
            f"--part-mb {args.part_mb} / --connections {args.connections}: allowed: more than 0 / 1 or more"
        )
    result = run(
        args.registry,
        s3_endpoint=args.s3_endpoint,
        size_mb=args.size_mb,
        rounds=args.rounds,
        pin=args.pin,
        part_mb=args.part_mb,
        connections=args.connections,
    )
    print(format_result(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected an integer of 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"received {value}; allowed: 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and TensorFlow's and absl's INFO lines"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override a param")
        if name == "train":
            p.add_argument(
                "--workers",
                type=int,
                default=0,
                help="launch N local worker processes with MultiWorkerMirroredStrategy on loopback",
            )
    reg = sub.add_parser("registry", help="list, show, pull, promote registered models; collect garbage")
    reg_sub = reg.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("list", "list committed versions"),
        ("show", "show a version or an alias' history"),
        ("pull", "pull a version, verified"),
        ("promote", "point an alias at a version"),
        ("gc", "delete uncommitted versions"),
    ):
        p = reg_sub.add_parser(action, help=helptext)
        p.add_argument("--params", default="params.yaml", help="params file naming the registry")
        p.add_argument("--registry", help="a folder or s3://bucket/prefix (default: register.registry in params)")
        if action in ("list", "gc"):
            p.add_argument("model", nargs="?", help="model name (default: all)")
        else:
            p.add_argument("model", metavar="SPEC", help="NAME (latest), NAME:VERSION or NAME@ALIAS")
        if action == "show":
            p.add_argument("--json", action="store_true", help="the whole manifest (or history) as JSON")
            p.add_argument("--history", action="store_true", help="every promotion attempt of NAME@ALIAS")
        if action == "pull":
            p.add_argument(
                "dest",
                help="destination folder (must not exist or be empty; with --layout tf-serving "
                "the model base path, where DEST/VERSION must not exist or be empty)",
            )
            p.add_argument(
                "--layout",
                choices=("registry", "tf-serving"),
                default="registry",
                help="registry: the version's files as stored (default); tf-serving: its SavedModel "
                "as DEST/VERSION/saved_model.pb, variables/, assets/ for tensorflow_model_server",
            )
        if action == "promote":
            p.add_argument("alias", help="alias to point at the version, such as champion or staging")
        if action == "gc":
            p.add_argument(
                "--older-than",
                type=float,
                default=86400.0,
                metavar="SECONDS",
                help="only versions whose newest object (claim, heartbeat or file) is at least this "
                "old (default: 86400, a day; a live registration refreshes its heartbeat every minute)",
            )

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

    model = sub.add_parser("model", help="describe a model of the table")
    model_sub = model.add_subparsers(dest="action", required=True)
    p = model_sub.add_parser("summary", help="layer table, parameters and multiply-adds")
    p.add_argument("--params", default=None, help="params file (default: params.yaml if present, else the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override a param")
    p.add_argument("--depth", type=int, help="depth (default: train.depth)")
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="v1 (stride on the 1x1), v1.5 (on the 3x3), v2 (pre-activation) or cifar; "
        "default: train.variant, or the first that has --depth",
    )
    p.add_argument("--image-size", type=int, help="input side in pixels (default: train.image_size)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, help="classes (default: labels.json, else 1000, or 10 for cifar)")

    bench = sub.add_parser("benchmark", help="time our code against a reference in the same run")
    bench_sub = bench.add_subparsers(dest="action", required=True)
    p = bench_sub.add_parser("model", help="forward and training-step throughput vs keras.applications")
    p.add_argument("--depths", default="50", help="comma-separated depths (default: 50)")
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="v1",
        help="v1 and v2 are built in keras.applications' layout (default: v1)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    p.add_argument("--image-size", type=int, default=224, help="input side (default: 224)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and phase (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two models (default: 2)")
    p.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="instead: training step on one device vs MirroredStrategy with N replicas "
        "(N logical CPU devices when there is no GPU)",
    )
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser("warmstart", help="fine-tuning from a registered model vs from scratch, on digits tasks")
    p.add_argument("--epochs", type=int, default=3, help="epochs on the second task, both arms (default: 3)")
    p.add_argument("--source-epochs", type=int, default=10, help="epochs on the first task (default: 10)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: 1,2,3)")
    p.add_argument("--workdir", help="folder for data, runs and the registry (default: a temporary one, removed)")
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser("shard", help="shard stage time with 1 and N worker processes")
    p.add_argument("--images", help="an image folder, one sub-folder per class (default: generate --count JPEGs)")
    p.add_argument("--count", type=int, default=2000, help="JPEGs of 500x375 to generate (default: 2000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes to compare with 1 (default: 2)")
    p.add_argument("--max-shorter-side", type=int, default=256, help="resize at write time (default: 256; 0: off)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians reported (default: 3)")
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser(
        "input",
        help="training input images/s: ours vs ImageDataGenerator, "
        "image_dataset_from_directory and JPEG decoding alone",
    )
    p.add_argument("--images", help="a folder of JPEGs, one sub-folder per class (default: generate --count)")
    p.add_argument("--count", type=int, default=1000, help="JPEGs of 500x375 to generate (default: 1000)")
    p.add_argument(
        "--photos",
        action="store_true",
        help="make the JPEGs from the photos bundled with scikit-learn and matplotlib (real content)",
    )
    p.add_argument("--image-size", type=int, default=224, help="output side (default: 224)")
    p.add_argument("--batch-size", type=int, default=32, help="batch (default: 32)")
    p.add_argument("--max-shorter-side", type=int, default=256, help="our shards' resize at write time (default: 256)")
    p.add_argument(
        "--generator-images",
        type=int,
        default=320,
        help="images timed through ImageDataGenerator, the slow one (default: 320)",
    )
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser("train", help="train stage images/s over a short run vs its bare step and model.fit")
    p.add_argument("--epochs", type=_positive_int, default=5, help="epochs of the run (default: 5)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override a param")
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser("accuracy", help="split, train, evaluate over N seeds: test top-1 mean, std, 95%% CI")
    p.add_argument("--seeds", type=_positive_int, default=5, help="values of base.seed to run (default: 5)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed; then +1 (default: 0)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override a param")
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser(
        "ingest",
        help="download/split/shard time, images/s and peak RSS at growing sizes; "
        "parallel vs sequential S3 folder download",
    )
    p.add_argument("--sizes", default="10000,40000,160000", help="image counts (default: 10000,40000,160000)")
    p.add_argument("--classes", type=int, default=100, help="class folders (default: 100)")
    p.add_argument("--s3-objects", type=int, default=2000, help="objects of the S3 folder download (default: 2000)")
    p.add_argument("--s3-workers", type=int, default=16, help="parallel requests compared with 1 (default: 16)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 part (no SeaweedFS started)")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="run the S3 part on this S3 (a new bucket, deleted after; credentials from the AWS env/profile) "
        "instead of the checkout's development SeaweedFS",
    )
    p.add_argument("--output", help="also write the figures as JSON to this file")

    p = bench_sub.add_parser("pull", help="registry pull MB/s vs a plain HTTP GET of the same objects")
    p.add_argument("--registry", help="s3://bucket/prefix; credentials and AWS_ENDPOINT_URL from the environment")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3 endpoint: of --registry, else a new bucket there (deleted after); credentials from the AWS "
        "env/profile",
    )
    p.add_argument(
        "--seaweed",
        action="store_true",
        help="start the checkout's development SeaweedFS on loopback (the default without --registry or --s3-endpoint)",
    )
    p.add_argument("--size-mb", type=float, default=100.0, help="size of the model.keras registered (default: 100)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported (default: 3)")
    p.add_argument(
        "--pin",
        action="store_true",
        help="with --seaweed: server on the first CPU, this process on the others (as a remote server)",
    )
    p.add_argument("--part-mb", type=float, help="size of the ranged GETs (default: the registry's)")
    p.add_argument("--connections", type=int, help="ranged GETs at a time (default: the registry's)")
    p.add_argument("--output", help="also write the figures as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(verbose=args.verbose)  # before any TensorFlow import
    try:
        if args.command == "registry":
            return run_registry(args)
        if args.command == "model":
            return run_model(args)
        if args.command == "predict":
            return run_predict(args)
        if args.command == "benchmark":
            return {
                "model": run_benchmark,
                "shard": run_benchmark_shard,
                "input": run_benchmark_input,
                "ingest": run_benchmark_ingest,
                "pull": run_benchmark_pull,
                "train": run_benchmark_train,
                "accuracy": run_benchmark_accuracy,
                "warmstart": run_benchmark_warmstart,
            }[args.action](args)
        cfg = config_mod.load(args.params, _parse_set(args.set))
        if args.command == "train" and args.workers:
            from resnet_pipeline.training.launch import launch

            return launch(args.workers, ["--params", args.params, *(f"--set={item}" for item in args.set)])
        paths = Paths.from_config(cfg)
        with _stage_lock(args.command, paths):
            result = STAGES[args.command](cfg, paths)
        print(result if isinstance(result, str) else json.dumps(result))
        return 0
    except Preempted as stop:
        print(f"resnet-pipeline {args.command}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"resnet-pipeline {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
