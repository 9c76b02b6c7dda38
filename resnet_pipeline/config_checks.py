"""The checks of params: each value against its field, the fields against each other, and the
spellings of older releases (refused in params with the new name; translated in saved configs).

Every error names the key (`train.lr`), the value received and what is allowed. No TensorFlow: the
depth table comes from `models.specs`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_pipeline.models.specs import VARIANTS, allowed_depths, model_arguments, total_stride

if TYPE_CHECKING:
    from resnet_pipeline.config import Config, DownloadConfig, TrainConfig

IMAGENET_DEPTHS = (50, 101, 152)
# what keras.applications' ImageNet weights need, per variant (models.specs.KERAS_APPLICATIONS_LAYOUT
# without bn_momentum, which does not change what the weights compute); v1 strides the 1x1
IMAGENET_LAYOUT: dict[str, dict[str, Any]] = {
    "v1": {"use_bias": True, "bn_epsilon": 1.001e-5, "shortcut": "auto"},
    "v2": {"v2_stride_last": True, "use_bias": None, "bn_epsilon": 1.001e-5, "shortcut": "auto"},
}
IMAGENET_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1": {**IMAGENET_LAYOUT["v1"], "bn_momentum": 0.99},
    "v2": {**IMAGENET_LAYOUT["v2"], "bn_momentum": 0.99},
}


class ConfigError(ValueError):
    """params.yaml (or an override) holds a key or value the pipeline cannot use."""


_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "bool | None": bool,
    "str | None": str,
    "float | None": float,
}


def check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    if value is None and f.type in ("bool | None", "str | None", "float | None"):
        return None
    if f.type == "tuple[str, ...]":
        allowed = f.metadata["each_of"]
        if not isinstance(value, (list, tuple)) or any(not isinstance(v, str) for v in value):
            raise ConfigError(
                f"{key}: expected a list of names such as [{', '.join(allowed[:2])}], received {value!r}; "
                f"allowed names: {', '.join(map(repr, allowed))}"
            )
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ConfigError(f"{key}: received {unknown[0]!r}; allowed: {', '.join(map(repr, allowed))}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{key}: received {list(value)!r}; allowed: each name at most once")
        return tuple(value)
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


def build_section(name: str, cls: type, raw: Any) -> Any:
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
    return cls(**{k: check_value(f"{name}.{k}", v, fields[k]) for k, v in raw.items()})


def check_cross_fields(cfg: Config) -> None:
    """The checks that read more than one value: ratios, depth and size, the builder's, init's."""
    s = cfg.split
    total = s.train + s.val + s.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"split: train + val + test must sum to 1, received {s.train} + {s.val} + {s.test} = {total:g}"
        )
    _check_download(cfg.download)
    t = cfg.train
    family = VARIANTS[t.variant].family
    depths = allowed_depths(family)
    if t.depth not in depths:
        raise ConfigError(
            f"train.depth: received {t.depth} for variant {t.variant!r}; allowed: {', '.join(map(str, depths))}"
        )
    stride = total_stride(family, t.depth)
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
        from resnet_pipeline.modelspec import SpecError, parse_spec

        try:
            parse_spec(init)
        except SpecError as err:
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
            "(keras.applications ResNet50/101/152, which stride the 1x1, or ResNet50V2/101V2/152V2)"
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


def imagenet_defaults(raw_train: dict, variant: Any) -> dict:
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


# ---------------------------------------------------------------- the spellings of release 0.1

V1_IN_PARAMS = (
    "train.variant: received 'v1', whose meaning changed in 0.2: 'v1' is now ResNet v1 with the stride on "
    "the 1x1 (as --variant v1 of `model summary` and `benchmark model`), and the old train.variant 'v1' "
    "(stride on the 3x3) is now 'v1.5'. Write 'v1.5' to build what this file built. So that no params file "
    "silently changes model, 'v1' is refused in params of this release except with init: imagenet (where it "
    "always meant the stride on the 1x1)"
)


def refuse_old_spellings(raw: dict) -> None:
    """The keys and values of release 0.1 that are gone, refused with today's spelling."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return
    if "stride_in_1x1" in train:
        raise ConfigError(
            f"train.stride_in_1x1: received {train['stride_in_1x1']!r}; the key is gone: train.variant names "
            "the stride's place now, 'v1.5' for the stride on the 3x3 (what stride_in_1x1: false built) or "
            "'v1' for the stride on the 1x1 (true; in params of this release only with init: imagenet)"
        )
    if train.get("augment") == "seed":
        raise ConfigError(
            "train.augment: received 'seed', now named 'shift_shear_zoom' (the VOC seed's ImageDataGenerator "
            "augmentation: shift, shear and zoom)"
        )


def refuse_ambiguous_variant(raw: dict) -> None:
    """`train.variant: v1` in a params file or override: refused in this release, except with init imagenet."""
    train = raw.get("train")
    if isinstance(train, dict) and train.get("variant") == "v1" and train.get("init") != "imagenet":
        raise ConfigError(V1_IN_PARAMS)


def upgrade_saved(raw: Any) -> Any:
    """A config saved with a model by release 0.1 (its params.yaml), in today's spelling; others as they are.

    0.1 wrote every key, so `train.stride_in_1x1` marks it: `variant: v1` becomes 'v1' (stride on the
    1x1) or 'v1.5' by that flag, and `augment: seed` becomes 'shift_shear_zoom'.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        return raw
    train = dict(raw["train"])
    if "stride_in_1x1" in train:
        on_1x1 = train.pop("stride_in_1x1")
        if train.get("variant") == "v1" and on_1x1 is not True:
            train["variant"] = "v1.5"
    if train.get("augment") == "seed":
        train["augment"] = "shift_shear_zoom"
    return {**raw, "train": train}
