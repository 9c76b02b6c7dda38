"""Typed configuration: `params.yaml` is read once, validated, and handed down as `Config`.

Every error names the key (`train.lr`), the value received and what is allowed, and is raised
before any stage starts work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("digits", "cifar10", "voc2012", "imagefolder", "archive")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
# input normalisation: scale ([0, 1], then train.mean/std), caffe (BGR, 0..255 minus the ImageNet
# means: keras.applications ResNet v1), tf ([-1, 1]: ResNetV2); auto: the weights' own with init imagenet
PREPROCESS_MODES = ("auto", "scale", "caffe", "tf")
IMAGENET_DEPTHS = (50, 101, 152)
# what keras.applications' ImageNet weights need, per variant (models.resnet.KERAS_APPLICATIONS_LAYOUT
# without bn_momentum, which does not change what the weights compute)
IMAGENET_LAYOUT: dict[str, dict[str, Any]] = {
    "v1": {"stride_in_1x1": True, "use_bias": True, "bn_epsilon": 1.001e-5, "shortcut": "auto"},
    "v2": {"v2_stride_last": True, "use_bias": None, "bn_epsilon": 1.001e-5, "shortcut": "auto"},
}
IMAGENET_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1": {**IMAGENET_LAYOUT["v1"], "bn_momentum": 0.99},
    "v2": {**IMAGENET_LAYOUT["v2"], "bn_momentum": 0.99},
}


class ConfigError(ValueError):
    """params.yaml (or an override) holds a key or value the pipeline cannot use."""


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
    variant: str = field(default="cifar", metadata=_choice("cifar", "v1", "v2"))
    depth: int = 20
    image_size: int = field(default=32, metadata=_range(8, 1024))
    # the builder's options (resnet_pipeline.models.resnet.build_resnet)
    shortcut: str = field(default="auto", metadata=_choice("auto", "A", "B"))
    stride_in_1x1: bool = False
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
    augment: str = field(default="cifar", metadata=_choice("cifar", "imagenet", "seed", "none"))
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


@dataclass(frozen=True)
class Config:
    base: BaseConfig = BaseConfig()
    download: DownloadConfig = DownloadConfig()
    split: SplitConfig = SplitConfig()
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()

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


_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "bool | None": bool,
    "str | None": str,
    "float | None": float,
}


def _check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    if value is None and f.type in ("bool | None", "str | None", "float | None"):
        return None
    if f.type == "tuple[float, ...]" and f.metadata.get("any_length"):
        if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
        ):
            raise ConfigError(f"{key}: expected a list of numbers, received {value!r}")
        if not all(math.isfinite(v) for v in value):
            raise ConfigError(f"{key}: received {value!r}; allowed: finite numbers (no NaN or infinity)")
        if any(v <= 0 for v in value) or list(value) != sorted(set(value)):
            raise ConfigError(f"{key}: received {value!r}; allowed: increasing numbers > 0")
        return tuple(float(v) for v in value)
    if f.type == "tuple[float, ...]":
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
        ):
            raise ConfigError(f"{key}: expected a list of 3 numbers (one per RGB channel), received {value!r}")
        if not all(math.isfinite(v) for v in value):
            raise ConfigError(f"{key}: received {value!r}; allowed: finite numbers (no NaN or infinity)")
        if key.endswith(".std") and min(value) <= 0:
            raise ConfigError(f"{key}: received {value!r}; allowed: numbers > 0")
        return tuple(float(v) for v in value)
    kind = f.type if isinstance(f.type, type) else _TYPES[f.type]
    if kind is bool:
        if not isinstance(value, bool):
            allowed = "true, false or null" if f.type == "bool | None" else "true or false"
            raise ConfigError(f"{key}: expected {allowed}, received {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, received {value!r}")
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, received {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a number, received {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, received {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: received {value!r}; allowed: {', '.join(map(repr, meta['choices']))}")
    if "low" in meta:
        low, high = meta["low"], meta["high"]
        too_low = low is not None and (value <= low if meta["low_open"] else value < low)
        too_high = high is not None and (value >= high if meta["high_open"] else value > high)
        if too_low or too_high:
            lo = "" if low is None else (f"> {low}" if meta["low_open"] else f">= {low}")
            hi = "" if high is None else (f"< {high}" if meta["high_open"] else f"<= {high}")
            raise ConfigError(f"{key}: received {value!r}; allowed: {' and '.join(p for p in (lo, hi) if p)}")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, received {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown key (received {unknown[0]}: {raw[unknown[0]]!r}); "
            f"allowed keys in {name}: {', '.join(fields)}"
        )
    return cls(**{k: _check_value(f"{name}.{k}", v, fields[k]) for k, v in raw.items()})


def _check_cross_fields(cfg: Config) -> None:
    from resnet_pipeline.models.specs import allowed_depths, model_arguments, total_stride  # no TensorFlow

    s = cfg.split
    total = s.train + s.val + s.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"split: train + val + test must sum to 1, received {s.train} + {s.val} + {s.test} = {total:g}"
        )
    _check_download(cfg.download)
    t = cfg.train
    depths = allowed_depths(t.variant)
    if t.depth not in depths:
        raise ConfigError(
            f"train.depth: received {t.depth} for variant {t.variant!r}; allowed: {', '.join(map(str, depths))}"
        )
    stride = total_stride(t.variant, t.depth)
    if t.image_size < stride:
        raise ConfigError(
            f"train.image_size: received {t.image_size}; ResNet-{t.depth} ({t.variant}) needs at least {stride}, "
            "its total stride"
        )
    if t.lr_schedule == "step" and not t.lr_decay_at:
        raise ConfigError(
            "train.lr_decay_at: the step schedule needs the epochs (or steps) to divide the "
            "lr at, such as [30, 60, 90]; received []"
        )
    if t.init == "imagenet":  # before the builder's checks: its layout options are the weights'
        _check_imagenet_layout(t)
    try:  # the builder's own checks of the option combinations, named by their params keys
        model_arguments(t, num_classes=10)
    except ValueError as err:
        raise ConfigError(f"train.{err}") from None
    _check_init(t)


def init_kind(init: str | None) -> str | None:
    """What `train.init` names: None, "imagenet", "url", "path" or "registry"."""
    if init is None:
        return None
    if init == "imagenet":
        return "imagenet"
    if "://" in init:
        return "url"
    if init.endswith((".h5", ".keras")) or "/" in init or Path(init).exists():
        return "path"
    return "registry"


def input_mode(t: TrainConfig) -> str:
    """The input normalisation of `train.preprocess`, `auto` resolved: the ImageNet weights' own
    (caffe for v1, tf for v2) with init imagenet, else scale."""
    if t.preprocess != "auto":
        return t.preprocess
    return ("caffe" if t.variant == "v1" else "tf") if t.init == "imagenet" else "scale"


def stage_names(variant: str) -> tuple[str, ...]:
    """The names `train.trainable_from` takes: the stages of the variant, then the classifier."""
    return ("conv2", "conv3", "conv4") + (("conv5",) if variant != "cifar" else ()) + ("logits",)


def _check_init(t: TrainConfig) -> None:
    from resnet_pipeline.redact import redact_url

    kind = init_kind(t.init)
    init = t.init or ""
    if kind == "url" and not init.startswith(("http://", "https://", "file://")):
        raise ConfigError(f"train.init: received {redact_url(init)!r}; allowed URLs: http(s):// or file://")
    if kind == "registry":
        from resnet_pipeline.registry.spec import parse_spec
        from resnet_pipeline.registry.storage import RegistryError

        try:
            parse_spec(init)
        except RegistryError as err:
            raise ConfigError(f"train.init: {err}; or null, imagenet, a .h5/.weights.h5/.keras file or URL") from None
    if t.init_url is not None and kind != "imagenet":
        raise ConfigError(
            f"train.init_url: received {redact_url(t.init_url)!r}; only init imagenet takes a mirror "
            "(give the file itself as train.init)"
        )
    if t.init_sha256 is not None and (
        len(t.init_sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in t.init_sha256)
    ):
        raise ConfigError(f"train.init_sha256: received {t.init_sha256!r}; allowed: 64 hexadecimal digits")
    if kind == "url" and init.startswith(("http://", "https://")) and t.init_sha256 is None:
        raise ConfigError(f"train.init_sha256: required to download train.init {redact_url(init)!r}, received null")
    mode = input_mode(t)
    if mode != "scale":
        for key, neutral in (("mean", (0.0, 0.0, 0.0)), ("std", (1.0, 1.0, 1.0))):
            if getattr(t, key) != neutral:
                raise ConfigError(
                    f"train.{key}: received {list(getattr(t, key))}, which train.preprocess {mode!r} "
                    "ignores; set train.preprocess: scale to normalise with train.mean and train.std"
                )
    if t.trainable_from is not None and t.trainable_from not in stage_names(t.variant):
        raise ConfigError(
            f"train.trainable_from: received {t.trainable_from!r} for variant {t.variant!r}; allowed: "
            f"null or {', '.join(map(repr, stage_names(t.variant)))}"
        )
    if t.head_epochs >= t.epochs:
        raise ConfigError(f"train.head_epochs: received {t.head_epochs}; allowed: fewer than train.epochs ({t.epochs})")
    if t.head_lr_multiplier != 1.0 and t.optimizer != "sgd":
        raise ConfigError(
            f"train.head_lr_multiplier: received {t.head_lr_multiplier:g} with optimizer "
            f"{t.optimizer!r}; allowed: 1 (the multiplier scales the head's gradients, which "
            "only sgd turns into a proportional step)"
        )


def _check_imagenet_layout(t: TrainConfig) -> None:
    if t.variant not in IMAGENET_LAYOUT:
        raise ConfigError(
            f"train.variant: received {t.variant!r}; init imagenet needs 'v1' or 'v2' "
            "(keras.applications ResNet50/101/152 or ResNet50V2/101V2/152V2)"
        )
    if t.depth not in IMAGENET_DEPTHS:
        raise ConfigError(
            f"train.depth: received {t.depth}; init imagenet has weights for depths "
            f"{', '.join(map(str, IMAGENET_DEPTHS))}"
        )
    for key, needed in IMAGENET_LAYOUT[t.variant].items():
        if getattr(t, key) != needed:
            raise ConfigError(
                f"train.{key}: received {getattr(t, key)!r}; the ImageNet weights of ResNet-{t.depth} "
                f"({t.variant}) need {needed!r} (keras.applications' layout)"
            )


def _imagenet_defaults(raw_train: dict, variant: Any) -> dict:
    """With init imagenet, keras.applications' layout for the options params leave out."""
    defaults = IMAGENET_DEFAULTS.get(variant, {}) if isinstance(variant, str) else {}
    return {**{k: v for k, v in defaults.items() if k not in raw_train}, **raw_train}


def _check_download(d: DownloadConfig) -> None:
    needs = {"archive": ("url", "sha256"), "imagefolder": ("path",)}.get(d.dataset, ())
    for key in needs:
        if getattr(d, key) is None:
            raise ConfigError(f"download.{key}: required for dataset {d.dataset!r}, received null")
    for key, length in (("sha256", 64), ("md5", 32)):
        value = getattr(d, key)
        if value is not None and (len(value) != length or any(c not in "0123456789abcdefABCDEF" for c in value)):
            raise ConfigError(f"download.{key}: received {value!r}; allowed: {length} hexadecimal digits")
    if d.url is not None and d.dataset in ("digits", "imagefolder"):
        raise ConfigError(f"download.url: received {d.url!r}; dataset {d.dataset!r} takes no url")
    if d.path is not None and d.dataset != "imagefolder":
        raise ConfigError(f"download.path: received {d.path!r}; only dataset 'imagefolder' takes a path")


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
        raw = {**raw, "train": _imagenet_defaults(train_raw, train_raw.get("variant", TrainConfig.variant))}
    try:
        cfg = Config(**{name: _build_section(name, classes[name], raw.get(name)) for name in classes})
        _check_cross_fields(cfg)
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


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read, override and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return from_dict(raw, source=str(path))
