"""Typed configuration: `params.yaml` is read once, validated, and handed down as `Config`.

Every error names the key (`train.lr`), the value received and what is allowed, and is raised
before any stage starts work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resnet_pipeline.config_checks import (
    IMAGENET_DEFAULTS,
    IMAGENET_DEPTHS,
    IMAGENET_LAYOUT,
    ConfigError,
    build_section,
    check_cross_fields,
    imagenet_defaults,
    init_kind,
    input_mode,
    refuse_ambiguous_variant,
    refuse_old_spellings,
    stage_names,
    upgrade_saved,
)
from resnet_pipeline.models.specs import VARIANTS

__all__ = [
    "IMAGENET_DEFAULTS",
    "IMAGENET_DEPTHS",
    "IMAGENET_LAYOUT",
    "MODEL_PARAMS",
    "Config",
    "ConfigError",
    "init_kind",
    "input_mode",
    "stage_names",
    "from_dict",
    "apply_overrides",
    "parse_overrides",
    "load",
    "load_saved",
    "upgrade_saved",
]

# the config saved beside every trained model (train stage) and registered version: loadable as params
MODEL_PARAMS = "params.yaml"
DATASETS = ("digits", "cifar10", "voc2012", "imagefolder", "archive")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
# input normalisation: scale ([0, 1], then train.mean/std), caffe (BGR, 0..255 minus the ImageNet
# means: keras.applications ResNet v1), tf ([-1, 1]: ResNetV2); auto: the weights' own with init imagenet
PREPROCESS_MODES = ("auto", "scale", "caffe", "tf")
# training augmentations (data.pipeline): pad-and-crop, random-resized-crop, the VOC seed's
# ImageDataGenerator recipe (shift 20 %, shear, zoom 80-120 %), none
AUGMENTATIONS = ("cifar", "imagenet", "shift_shear_zoom", "none")
# portable formats a model is exported to beside its SavedModel (resnet_pipeline.exports)
EXPORT_FORMATS = ("onnx", "litert", "litert-int8")


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> dict:
    return {"low": low, "high": high, "low_open": low_open, "high_open": high_open}


@dataclass(frozen=True)
class BaseConfig:
    seed: int = field(default=42, metadata=_range(0, 2**32 - 1))
    data_dir: str = "data"
    artifacts_dir: str = "artifacts"


@dataclass(frozen=True)
class DownloadConfig:
    dataset: str = field(default="digits", metadata=_choice(*DATASETS))
    url: str | None = None  # cifar10 / voc2012: the official URL when null; archive: required
    sha256: str | None = None  # archive: required; cifar10 / voc2012: checked too when given
    md5: str | None = None  # cifar10 / voc2012: the official md5 when null
    path: str | None = None  # imagefolder: a local folder or s3://bucket/prefix
    s3_endpoint_url: str | None = None  # imagefolder on an S3-compatible store (else AWS_ENDPOINT_URL)
    voc_drop_multiclass: bool = False
    retries: int = field(default=5, metadata=_range(0, 100))
    # archives: refused when they hold more members, unpack to more bytes, or compress more than this
    max_members: int = field(default=1_000_000, metadata=_range(1, 10**9))
    max_extract_gb: float = field(default=200.0, metadata=_range(0.0, 10**6, low_open=True))
    max_ratio: float = field(default=100.0, metadata=_range(1.0, 10**6))  # unpacked bytes / archive bytes
    s3_workers: int = field(default=16, metadata=_range(1, 256))  # parallel requests of an s3:// imagefolder
    # downloads (archives over http(s)), bounded while their bytes arrive: the size (a larger
    # Content-Length is refused before the body), the whole time, retries included, and the average
    # rate over each minute (0: no minimum)
    max_download_gb: float = field(default=200.0, metadata=_range(0.0, 10**6, low_open=True))
    max_download_seconds: float = field(default=86_400.0, metadata=_range(0.0, 10**7, low_open=True))
    min_download_kb_s: float = field(default=1.0, metadata=_range(0.0, 10**6))


@dataclass(frozen=True)
class SplitConfig:
    train: float = field(default=0.8, metadata=_range(0.0, 1.0, low_open=True))
    val: float = field(default=0.1, metadata=_range(0.0, 1.0))
    test: float = field(default=0.1, metadata=_range(0.0, 1.0, low_open=True))
    min_side: int = field(default=8, metadata=_range(1, 65535))  # smaller images are excluded


@dataclass(frozen=True)
class ShardConfig:
    target_shard_mb: float = field(default=64.0, metadata=_range(0.0, 10**6, low_open=True))
    workers: int = field(default=0, metadata=_range(0, 1024))  # processes preparing records; 0: one per CPU
    max_shorter_side: int = field(default=0, metadata=_range(0, 65535))  # shrink larger images at write time; 0: off
    jpeg_quality: int = field(default=90, metadata=_range(1, 100))  # of re-encoded JPEGs


@dataclass(frozen=True)
class TrainConfig:
    variant: str = field(default="cifar", metadata=_choice(*VARIANTS))  # v1: stride on the 1x1, v1.5: on the 3x3
    depth: int = 20
    image_size: int = field(default=32, metadata=_range(8, 1024))
    # the builder's options (resnet_pipeline.models.resnet.build_resnet)
    shortcut: str = field(default="auto", metadata=_choice("auto", "A", "B"))
    v2_stride_last: bool = False
    use_bias: bool | None = None
    zero_init_residual: bool = False
    bn_momentum: float = field(default=0.9, metadata=_range(0.0, 1.0, high_open=True))
    bn_epsilon: float = field(default=1e-5, metadata=_range(0.0, 1.0, low_open=True))
    epochs: int = field(default=30, metadata=_range(1, 10**6))
    global_batch_size: int = field(default=64, metadata=_range(1, 2**20))  # per-replica batch: this / replicas
    optimizer: str = field(default="sgd", metadata=_choice("sgd", "adam"))
    lr: float = field(default=0.1, metadata=_range(0.0, 100.0, low_open=True))
    scale_lr: bool = False  # linear scaling rule: lr x global_batch_size / 256
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=1e-4, metadata=_range(0.0, 1.0))  # L2: the gradient of w gets weight_decay * w
    decay_bn_and_bias: bool = False  # also decay BN gamma/beta and biases
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 1.0, high_open=True))
    lr_schedule: str = field(default="cosine", metadata=_choice("cosine", "step", "constant", "linear", "onecycle"))
    lr_decay_at: tuple[float, ...] = field(default=(), metadata={"any_length": True})  # step schedule
    lr_decay_unit: str = field(default="epochs", metadata=_choice("epochs", "steps"))
    lr_decay_factor: float = field(default=0.1, metadata=_range(0.0, 1.0, low_open=True, high_open=True))
    warmup_epochs: int = field(default=1, metadata=_range(0, 10**6))
    augment: str = field(default="cifar", metadata=_choice(*AUGMENTATIONS))
    pad_crop: int = field(default=4, metadata=_range(0, 1024))
    random_flip: bool = False
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    eval_crop: float = field(default=1.0, metadata=_range(0.0, 1.0, low_open=True))
    # distribution, precision, determinism
    strategy: str = field(default="auto", metadata=_choice(*STRATEGIES))
    cpu_devices: int = field(default=1, metadata=_range(1, 64))  # logical CPU devices when there is no GPU
    sync_bn: bool = False  # BatchNormalization statistics over the global batch
    precision: str = field(default="float32", metadata=_choice("float32", "mixed_float16", "mixed_bfloat16"))
    jit_compile: bool = False  # XLA
    deterministic: bool = False  # op determinism; each global batch split across the replicas
    checkpoint_every_steps: int = field(default=100, metadata=_range(1, 10**9))
    keep_checkpoints: int = field(default=2, metadata=_range(1, 1000))
    summary_every_steps: int = field(default=10, metadata=_range(1, 10**9))  # host reads, steps.csv rows, TensorBoard
    validate_every_epochs: int = field(default=5, metadata=_range(1, 10**6))  # and always after the last epoch
    ema_decay: float = field(default=0.0, metadata=_range(0.0, 1.0, high_open=True))  # 0: off; e.g. 0.999
    export: str = field(default="last", metadata=_choice("last", "best"))  # best: the best on val
    # starting weights and fine-tuning (README, "Fine-tuning")
    init: str | None = None  # null (from scratch), imagenet, a weights file path or URL, or NAME@ALIAS / NAME:VERSION
    init_url: str | None = None  # imagenet: a mirror (URL or folder ending in /) or the file itself
    init_sha256: str | None = None  # of the weights file; required for an http(s) init
    preprocess: str = field(default="auto", metadata=_choice(*PREPROCESS_MODES))
    freeze_bn: bool = False  # every BatchNormalization in inference mode, its statistics and gamma/beta fixed
    trainable_from: str | None = None  # conv2..conv5 or logits: freeze the stem and the stages before it
    head_epochs: int = field(default=0, metadata=_range(0, 10**6))  # train only the head for the first N epochs
    head_lr_multiplier: float = field(default=1.0, metadata=_range(0.0, 1000.0, low_open=True))  # sgd only


@dataclass(frozen=True)
class EvaluateConfig:
    top_k: int = field(default=3, metadata=_range(1, 1000))
    tta: str = field(default="none", metadata=_choice("none", "flip", "shift"))  # test-time views averaged
    bootstrap_samples: int = field(default=1000, metadata=_range(100, 1_000_000))  # for the 95% intervals
    bootstrap_seed: int = field(default=0, metadata=_range(0, 2**32 - 1))


@dataclass(frozen=True)
class RegisterConfig:
    registry: str = "registry"  # a local folder (relative to the project root) or s3://bucket/prefix
    model_name: str = "resnet-digits"
    alias: str = "champion"  # the alias the gate promotes a better version to
    gate_metric: str = "top1"  # a test figure of metrics.json; loss is better lower, the others higher
    min_improvement: float = field(default=0.0, metadata=_range(0.0, 10**6))  # strictly better, and by at least this
    s3_endpoint_url: str | None = None  # S3-compatible stores (else AWS_ENDPOINT_URL, else AWS)
    s3_region: str | None = None  # else AWS_DEFAULT_REGION / the AWS config
    s3_addressing_style: str = field(default="auto", metadata=_choice("auto", "path", "virtual"))
    allow_unsafe_store: bool = False  # write to a store that ignores If-None-Match / If-Match (see README)
    gate: str = field(default="better", metadata=_choice("better", "paired_bootstrap"))
    min_value: float | None = None  # an absolute floor on gate_metric, the first model included
    max_class_drop: float | None = field(default=None, metadata=_range(0.0, 1.0))  # paired_bootstrap only
    bootstrap_samples: int = field(default=2000, metadata=_range(100, 1_000_000))
    bootstrap_seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    # portable exports added to each version, each checked against the Keras model (README, "Export formats")
    export_formats: tuple[str, ...] = field(default=(), metadata={"each_of": EXPORT_FORMATS})
    export_calibration_images: int = field(default=200, metadata=_range(1, 100_000))  # litert-int8: train images
    export_check_images: int = field(default=256, metadata=_range(1, 100_000))  # test images each export runs on
    export_max_diff: float = field(default=1e-4, metadata=_range(0.0, 1.0, low_open=True))  # onnx, litert: probs
    export_min_agreement: float = field(default=0.9, metadata=_range(0.0, 1.0))  # litert-int8: top-1 vs Keras


@dataclass(frozen=True)
class DvcConfig:
    push: bool = True  # before registering, push the run's data and model to the DVC remote
    push_raw: bool = True  # with data/raw (every image file); false: manifest, labels, shards and model only


@dataclass(frozen=True)
class Config:
    base: BaseConfig = BaseConfig()
    download: DownloadConfig = DownloadConfig()
    split: SplitConfig = SplitConfig()
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    dvc: DvcConfig = DvcConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain YAML-able values: tuples become lists."""
        return {
            group: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            for group, values in dataclasses.asdict(self).items()
        }

    def to_yaml(self) -> str:
        """The config as YAML to write down, with every URL in it redacted (no userinfo, no query)."""
        from resnet_pipeline.redact import redact_values

        return yaml.safe_dump(redact_values(self.to_dict()), sort_keys=False)


def from_dict(raw: Any, source: str = "params") -> Config:
    """Validate a params mapping and return the typed config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of stage groups, received {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    classes = {name: type(getattr(Config(), name)) for name in sections}
    unknown = sorted(set(raw) - set(classes))
    if unknown:
        raise ConfigError(f"{source}: unknown group {unknown[0]!r}; allowed groups: {', '.join(classes)}")
    train_raw = raw.get("train")
    if isinstance(train_raw, dict) and train_raw.get("init") == "imagenet":
        raw = {**raw, "train": imagenet_defaults(train_raw, train_raw.get("variant", TrainConfig.variant))}
    try:
        refuse_old_spellings(raw)
        cfg = Config(**{name: build_section(name, classes[name], raw.get(name)) for name in classes})
        check_cross_fields(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of a params mapping with dotted overrides (`{"train.epochs": 3}`) applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for dotted, value in overrides.items():
        group, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected GROUP.KEY, such as train.epochs")
        out.setdefault(group, {})
        if not isinstance(out[group], dict):
            raise ConfigError(f"override {dotted!r}: {group} is not a group")
        out[group][key] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set` items (`GROUP.KEY=VALUE`, the value read as YAML) as `{"group.key": value}`."""
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


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read, override and validate a params file (the spellings of release 0.1 refused)."""
    path = Path(path)
    raw = _read(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    if isinstance(raw, dict):
        try:
            refuse_old_spellings(raw)  # the removed key first: its message names both new values
            refuse_ambiguous_variant(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return from_dict(raw, source=str(path))


def load_saved(path: str | Path) -> Config:
    """The config saved with a model (its `params.yaml`), also as an older release wrote it."""
    path = Path(path)
    return from_dict(upgrade_saved(_read(path)), source=str(path))
