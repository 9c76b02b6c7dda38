"""`resnet-pipeline benchmark ...`: each times our code against a reference in the same run, prints
the figures and, with `--output`, writes them as JSON.

    resnet-pipeline benchmark model [--depths 50,101] [--variant v1] [--batch-size 16] [--steps 10] [--replicas N]
    resnet-pipeline benchmark export [--model artifacts/model] [--formats onnx,litert-int8] [--reference-depth 50]
    resnet-pipeline benchmark dvc [--images 20000] [--classes 100] [--no-digits] [--data-only] [--remote URL]
    resnet-pipeline benchmark shard|input|train|accuracy|ingest|pull|warmstart ...

The options are checked by their argparse types; what depends on two options is checked here.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from resnet_pipeline.cli_args import (
    add_output,
    add_params,
    at_least,
    int_list,
    load_params,
    options,
    positive_float,
    positive_int,
    write_output,
)
from resnet_pipeline.config import EXPORT_FORMATS, Config, ConfigError, DownloadConfig
from resnet_pipeline.models.specs import VARIANTS


def _model(args) -> tuple[Any, str]:
    if args.replicas:
        from resnet_pipeline.benchmark.replicas import prepare_devices

        prepare_devices(args.replicas)  # logical CPU devices: before anything else touches TensorFlow
    from resnet_pipeline.benchmark.model import benchmark_models, format_rows

    timing = {**options(args, "batch_size", "image_size", "steps", "warmup"), "rounds": min(args.rounds, args.steps)}
    rows = _replica_rows(args, timing) if args.replicas else benchmark_models(args.variant, args.depths, **timing)
    return rows, format_rows(rows)


def _replica_rows(args, timing: dict) -> list[dict]:
    from resnet_pipeline.benchmark.harness import Timing
    from resnet_pipeline.benchmark.replicas import benchmark_replicas
    from resnet_pipeline.models.specs import SPECS

    variant, stride_in_1x1 = VARIANTS[args.variant]
    rows = []
    for depth in args.depths:
        if depth not in SPECS[variant]:
            raise ConfigError(
                f"--depths: received {depth} for variant {args.variant!r}; "
                f"allowed: {', '.join(map(str, SPECS[variant]))}"
            )
        stride = stride_in_1x1 and SPECS[variant][depth].block == "bottleneck"
        classes = 10 if variant == "cifar" else 1000
        rows += benchmark_replicas(
            variant, depth, Timing(**timing), replicas=args.replicas, num_classes=classes, stride_in_1x1=stride
        )
    return rows


def _warmstart(args) -> tuple[Any, str]:
    import tempfile

    from resnet_pipeline.benchmark.warmstart import format_result, run

    with tempfile.TemporaryDirectory(prefix="warmstart-") as tmp:
        result = run(args.workdir or tmp, epochs=args.epochs, source_epochs=args.source_epochs, seeds=tuple(args.seeds))
    return result, format_result(result)


def _shard(args) -> tuple[Any, str]:
    from pathlib import Path

    from resnet_pipeline.benchmark.shard import format_result, run

    images = Path(args.images) if args.images else None
    result = run(images, **options(args, "count", "workers", "max_shorter_side", "repeats"))
    return result, format_result(result)


def _input(args) -> tuple[Any, str]:
    from pathlib import Path

    from resnet_pipeline.benchmark.input import compare, format_rows

    images = Path(args.images) if args.images else None
    names = ("count", "image_size", "batch_size", "max_shorter_side", "generator_images", "photos")
    rows = compare(images, **options(args, *names))
    return rows, format_rows(rows)


def _train(args) -> tuple[Any, str]:
    from resnet_pipeline.benchmark.train import format_result, run

    result = run(load_params(args), epochs=args.epochs, rounds=args.rounds)
    return result, format_result(result)


def _accuracy(args) -> tuple[Any, str]:
    from resnet_pipeline.benchmark.accuracy import format_result, run

    result = run(load_params(args), seeds=args.seeds, first_seed=args.first_seed)
    return result, format_result(result)


def _ingest(args) -> tuple[Any, str]:
    from resnet_pipeline.benchmark.ingest import format_result, run
    from resnet_pipeline.benchmark.s3 import check_available

    if len(args.sizes) < 2 or min(args.sizes) < args.classes:
        raise ConfigError(
            f"--sizes {','.join(map(str, args.sizes))} / --classes {args.classes}: allowed: 2 or more sizes, "
            "each at least the class count"
        )
    s3_objects = 0 if args.no_s3 else args.s3_objects
    if s3_objects:
        check_available(args.s3_endpoint)  # before the stages' minutes, not after
    result = run(
        args.sizes,
        classes=args.classes,
        s3_objects=s3_objects,
        s3_workers=args.s3_workers,
        s3_endpoint=args.s3_endpoint,
    )
    return result, format_result(result)


def _pull(args) -> tuple[Any, str]:
    from resnet_pipeline.benchmark.pull import format_result, run
    from resnet_pipeline.benchmark.s3 import check_available

    elsewhere = args.registry or args.s3_endpoint
    if args.seaweed and elsewhere:
        raise ConfigError(
            "benchmark pull: --seaweed (the development server) goes with neither --registry nor --s3-endpoint"
        )
    if args.pin and elsewhere:
        raise ConfigError("benchmark pull --pin: only with --seaweed (the server must run on this machine)")
    if not args.registry:
        check_available(args.s3_endpoint)
    result = run(args.registry, **options(args, "s3_endpoint", "size_mb", "rounds", "pin", "part_mb", "connections"))
    return result, format_result(result)


def _export(args) -> tuple[Any, str]:
    from pathlib import Path

    from resnet_pipeline.benchmark.export import Reference, format_result, run
    from resnet_pipeline.exports.formats import ExportSettings
    from resnet_pipeline.paths import Paths

    unknown = [f for f in args.formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ConfigError(f"--formats: received {unknown[0]!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    if args.no_project and args.no_reference:
        raise ConfigError("benchmark export: --no-project with --no-reference leaves nothing to run")
    cfg = load_params(args) if Path(args.params).exists() or args.set else Config()
    settings = ExportSettings.from_config(cfg)
    changes = {"check_images": args.images, "calibration_images": args.calibration_images}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    paths = Paths.from_config(cfg)
    model_dir = None if args.no_project else Path(args.model or paths.model_dir)
    shards = Path(args.shards) if args.shards else paths.shards
    reference = None
    if not args.no_reference:
        reference = Reference(
            args.reference_depth,
            args.reference_variant,
            args.reference_size,
            args.reference_classes,
            args.reference_images,
        )
    result = run(
        model_dir,
        shards,
        formats=args.formats,
        settings=settings,
        reference=reference,
        **options(args, "steps", "warmup", "rounds"),
    )
    return result, format_result(result)


def _dvc(args) -> tuple[Any, str]:
    from resnet_pipeline.benchmark.dvccost import format_result, run

    if args.no_digits and not args.images:
        raise ConfigError("benchmark dvc: --no-digits with --images 0 leaves nothing to run")
    result = run(
        args.images,
        args.classes,
        digits=not args.no_digits,
        data_only=args.data_only,
        remote=args.remote,
        work_dir=args.workdir,
    )
    return result, format_result(result)


BENCHMARKS = {
    "model": _model,
    "warmstart": _warmstart,
    "shard": _shard,
    "input": _input,
    "train": _train,
    "accuracy": _accuracy,
    "ingest": _ingest,
    "pull": _pull,
    "export": _export,
    "dvc": _dvc,
}


def run_benchmark(args: argparse.Namespace) -> int:
    """Run `benchmark ACTION`, print its figures and write them to `--output` if given."""
    result, text = BENCHMARKS[args.action](args)
    print(text)
    write_output(args, result)
    return 0


ABOUT = {  # each benchmark's line in `resnet-pipeline benchmark --help`
    "model": "forward and training-step throughput vs keras.applications",
    "warmstart": "fine-tuning from a registered model vs from scratch, on digits tasks",
    "shard": "shard stage time with 1 and N worker processes",
    "input": "training input images/s: ours vs ImageDataGenerator, image_dataset_from_directory, JPEG decoding alone",
    "train": "train stage images/s over a short run vs its bare step and model.fit",
    "accuracy": "split, train, evaluate over N seeds: test top-1 mean, std, 95%% CI",
    "ingest": "download/split/shard time, images/s and peak RSS at growing sizes; "
    "parallel vs sequential S3 folder download",
    "pull": "registry pull MB/s vs a plain HTTP GET of the same objects",
    "dvc": "what dvc.lock bookkeeping and the push add to a run, beside the stages' own seconds",
    "export": "ONNX and LiteRT (float, int8) beside Keras and the SavedModel: size, top-1, latency at batch 1 and 32",
}


def add_parsers(sub) -> None:
    """The `benchmark` command and its sub-commands, on the top-level subparsers `sub`."""
    bench = sub.add_parser("benchmark", help="time our code against a reference in the same run")
    bench_sub = bench.add_subparsers(dest="action", required=True)
    for add in (
        _model_parser,
        _warmstart_parser,
        _shard_parser,
        _input_parser,
        _run_parsers,
        _ingest_parser,
        _pull_parser,
        _export_parser,
        _dvc_parser,
    ):
        add(bench_sub)


def _dvc_parser(bench_sub) -> None:
    p = bench_sub.add_parser("dvc", help=ABOUT["dvc"])
    p.add_argument(
        "--images", type=at_least(0), default=20000, help="JPEGs of 64x48 in a folder, 0: none (default: 20000)"
    )
    p.add_argument("--classes", type=at_least(2), default=100, help="their class folders (default: 100)")
    p.add_argument("--no-digits", action="store_true", help="leave out the embedded digits")
    p.add_argument("--data-only", action="store_true", help="download, split and shard only (no TensorFlow)")
    p.add_argument("--remote", help="a DVC remote URL to push to (default: the project's local folder .dvc-remote)")
    p.add_argument("--workdir", help="folder for the projects (default: a temporary one, removed)")
    add_output(p)


def _model_parser(bench_sub) -> None:
    p = bench_sub.add_parser("model", help=ABOUT["model"])
    p.add_argument("--depths", type=int_list("50,101"), default=[50], help="comma-separated depths (default: 50)")
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="v1",
        help="v1 and v2 are built in keras.applications' layout (default: v1)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default: 16)")
    p.add_argument("--image-size", type=positive_int, default=224, help="input side (default: 224)")
    p.add_argument("--steps", type=at_least(2), default=10, help="timed steps per model and phase (default: 10)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first (default: 3)")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternations of the two models (default: 2)")
    p.add_argument(
        "--replicas",
        type=at_least(2),
        help="instead: training step on one device vs MirroredStrategy with N replicas "
        "(N logical CPU devices when there is no GPU)",
    )
    add_output(p)


def _warmstart_parser(bench_sub) -> None:
    p = bench_sub.add_parser("warmstart", help=ABOUT["warmstart"])
    p.add_argument("--epochs", type=positive_int, default=3, help="epochs on the second task, both arms (default: 3)")
    p.add_argument("--source-epochs", type=positive_int, default=10, help="epochs on the first task (default: 10)")
    p.add_argument(
        "--seeds", type=int_list("1,2,3", low=0), default=[1, 2, 3], help="comma-separated seeds (default: 1,2,3)"
    )
    p.add_argument("--workdir", help="folder for data, runs and the registry (default: a temporary one, removed)")
    add_output(p)


def _shard_parser(bench_sub) -> None:
    p = bench_sub.add_parser("shard", help=ABOUT["shard"])
    p.add_argument("--images", help="an image folder, one sub-folder per class (default: generate --count JPEGs)")
    p.add_argument("--count", type=positive_int, default=2000, help="JPEGs of 500x375 to generate (default: 2000)")
    p.add_argument("--workers", type=at_least(2), default=2, help="worker processes to compare with 1 (default: 2)")
    p.add_argument(
        "--max-shorter-side", type=at_least(0), default=256, help="resize at write time (default: 256; 0: off)"
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="alternating rounds; medians reported (default: 3)")
    add_output(p)


def _input_parser(bench_sub) -> None:
    p = bench_sub.add_parser("input", help=ABOUT["input"])
    p.add_argument("--images", help="a folder of JPEGs, one sub-folder per class (default: generate --count)")
    p.add_argument("--count", type=positive_int, default=1000, help="JPEGs of 500x375 to generate (default: 1000)")
    p.add_argument(
        "--photos",
        action="store_true",
        help="make the JPEGs from the photos bundled with scikit-learn and matplotlib (real content)",
    )
    p.add_argument("--image-size", type=positive_int, default=224, help="output side (default: 224)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch (default: 32)")
    p.add_argument(
        "--max-shorter-side", type=at_least(0), default=256, help="our shards' resize at write time (default: 256)"
    )
    p.add_argument(
        "--generator-images",
        type=positive_int,
        default=320,
        help="images timed through ImageDataGenerator, the slow one (default: 320)",
    )
    add_output(p)


def _run_parsers(bench_sub) -> None:
    """`train` and `accuracy`: runs of the pipeline with the params."""
    p = bench_sub.add_parser("train", help=ABOUT["train"])
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs of the run (default: the params' train.epochs)"
    )
    p.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds of the three arms; medians are printed (default: 3)"
    )
    add_params(p)
    add_output(p)

    p = bench_sub.add_parser("accuracy", help=ABOUT["accuracy"])
    p.add_argument("--seeds", type=positive_int, default=5, help="values of base.seed to run (default: 5)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed; then +1 (default: 0)")
    add_params(p)
    add_output(p)


def _ingest_parser(bench_sub) -> None:
    p = bench_sub.add_parser("ingest", help=ABOUT["ingest"])
    p.add_argument(
        "--sizes",
        type=int_list("10000,40000,160000"),
        default=[10000, 40000, 160000],
        help="image counts (default: 10000,40000,160000)",
    )
    p.add_argument("--classes", type=at_least(2), default=100, help="class folders (default: 100)")
    p.add_argument(
        "--s3-objects", type=at_least(0), default=2000, help="objects of the S3 folder download (default: 2000)"
    )
    p.add_argument(
        "--s3-workers",
        type=positive_int,
        default=DownloadConfig.s3_workers,
        help=f"parallel requests (default: the stage's, {DownloadConfig.s3_workers})",
    )
    p.add_argument("--no-s3", action="store_true", help="skip the S3 part (no SeaweedFS started)")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="run the S3 part on this S3 (a new bucket, deleted after; credentials from the AWS env/profile) "
        "instead of the checkout's development SeaweedFS",
    )
    add_output(p)


def _pull_parser(bench_sub) -> None:
    p = bench_sub.add_parser("pull", help=ABOUT["pull"])
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
    p.add_argument(
        "--size-mb", type=positive_float, default=100.0, help="size of the model.keras registered (default: 100)"
    )
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds; medians reported (default: 3)")
    p.add_argument(
        "--pin",
        action="store_true",
        help="with --seaweed: server on the first CPU, this process on the others (as a remote server)",
    )
    p.add_argument("--part-mb", type=positive_float, help="size of the ranged GETs (default: the registry's)")
    p.add_argument("--connections", type=positive_int, help="ranged GETs at a time (default: the registry's)")
    add_output(p)


def _export_parser(bench_sub) -> None:
    p = bench_sub.add_parser("export", help=ABOUT["export"])
    p.add_argument("--model", help="the project's model folder (default: the train stage's folder of the params)")
    p.add_argument("--shards", help="its shards folder (default: the params' data folder's shards)")
    p.add_argument(
        "--formats",
        type=lambda text: text.split(","),
        default=list(EXPORT_FORMATS),
        help=f"comma-separated formats (default: {','.join(EXPORT_FORMATS)})",
    )
    p.add_argument("--images", type=positive_int, help="test images (default: register.export_check_images)")
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        help="int8: train images (default: register.export_calibration_images)",
    )
    p.add_argument("--reference-depth", type=positive_int, default=50, help="reference ResNet's depth (default: 50)")
    p.add_argument("--reference-variant", choices=list(VARIANTS), default="v1.5", help="its variant (default: v1.5)")
    p.add_argument("--reference-size", type=positive_int, default=224, help="its input side (default: 224)")
    p.add_argument("--reference-classes", type=at_least(2), default=1000, help="its classes (default: 1000)")
    p.add_argument("--reference-images", type=positive_int, default=64, help="its random images (default: 64)")
    p.add_argument("--no-reference", action="store_true", help="the project's model only")
    p.add_argument("--no-project", action="store_true", help="the reference network only")
    p.add_argument(
        "--steps", type=at_least(2), default=20, help="timed calls at batch 1; a quarter at 32 (default: 20)"
    )
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed calls first (default: 2)")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds (default: 2)")
    add_params(p)
    add_output(p)
