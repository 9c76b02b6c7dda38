"""Initial weights (`train.init`): ImageNet, a weights file or URL, or a registered version.

    record = load_initial_weights(model, cfg, fetch_init=..., cache_dir=...)

The source is fetched first (URLs through the verified, resumable `data.fetch.fetch`; `imagenet`
with keras.applications' own file names and md5 hashes, from `train.init_url` when given; a
registry spec with `registry.fetch_model`), all into the cache. Weights are then matched to the
model by layer name and shape: keras.applications' classifier `predictions` is our `logits`, and
the head is re-initialised when the class count differs (or the file has none). Any other layer
that is missing, extra or of another shape refuses the file before a single weight is read (shapes
are compared as the file declares them), naming the file, the layer and, where it can tell, the
option (`train.depth`, `train.use_bias`...) and the value it needs. A file that is not plain data
(links, external, virtual or filtered datasets: `weights_file`) is refused whatever its sha256, since
what it points at is not in it. The record says what was loaded and re-initialised, with the source and
its sha256; the trainer writes it to `init.json` in the model folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import yaml

from resnet_pipeline.config import TrainConfig, init_kind, upgrade_saved
from resnet_pipeline.data.fetch import DownloadError, fetch
from resnet_pipeline.fileio import sha256_file
from resnet_pipeline.models.specs import SPECS, VARIANTS
from resnet_pipeline.redact import redact_url
from resnet_pipeline.training.weights_file import WeightsFile, WeightsFileError, open_weights, snake_case

log = logging.getLogger(__name__)

HEAD = "logits"
HEAD_ALIASES = {"predictions": HEAD}  # keras.applications' classifier
# the options of a registered version's params that change which weights fit or what they compute
LAYOUT_KEYS = ("variant", "depth", "shortcut", "v2_stride_last", "use_bias", "bn_epsilon")


def init_cache_dir() -> Path:
    """Where fetched weights files are kept: `$RESNET_PIPELINE_INIT_CACHE`, else ~/.cache/resnet-pipeline/init.
    (Registry versions go to the cache of `predict`, `$RESNET_PIPELINE_CACHE`.)"""
    return Path(os.environ.get("RESNET_PIPELINE_INIT_CACHE") or Path.home() / ".cache" / "resnet-pipeline" / "init")


@contextlib.contextmanager
def _locked(dest: Path):
    """One process at a time fetches `dest` (workers of one machine share the cache)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch(url: str, dest: Path, **digests) -> Path:
    with _locked(dest):
        return fetch(url, dest, **digests)


class InitError(ValueError):
    """The initial weights cannot be used: missing, corrupt, or of another layout than the model."""


def imagenet_file(variant: str, depth: int, include_top: bool = True) -> tuple[str, str, str]:
    """(file name, official URL, md5) of keras.applications' ImageNet weights, read from Keras itself."""
    from keras.src.applications.resnet import BASE_WEIGHTS_PATH, WEIGHTS_HASHES

    name = f"resnet{depth}" + ("v2" if variant == "v2" else "")
    if name not in WEIGHTS_HASHES:
        raise InitError(f"train.depth: received {depth}; keras.applications has no ImageNet weights for {name}")
    file = f"{name}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"
    return file, BASE_WEIGHTS_PATH + file, WEIGHTS_HASHES[name][0 if include_top else 1]


def resolve_source(cfg: TrainConfig, cache_dir: str | Path, fetch_init: Callable[[str], Path] | None = None) -> dict:
    """Fetch what `cfg.init` names into `cache_dir`; `{"init", "path", "source", "sha256", "params"}`."""
    kind, cache_dir = init_kind(cfg.init), Path(cache_dir)
    params = None
    init = cfg.init or ""
    url: str | None = None
    path: Path
    try:
        if kind == "imagenet":
            file, url, md5 = imagenet_file(cfg.variant, cfg.depth)
            if cfg.init_url:
                url = cfg.init_url + file if cfg.init_url.endswith("/") else cfg.init_url
            path = _fetch(url, cache_dir / "imagenet" / file, md5=md5, sha256=cfg.init_sha256)
        elif kind == "url":
            url = init
            name = Path(url.split("?", 1)[0]).name or "weights.h5"
            folder = cfg.init_sha256 or re.sub(r"[^A-Za-z0-9._-]", "_", redact_url(url))[-100:]
            path = _fetch(url, cache_dir / "files" / folder / name, sha256=cfg.init_sha256)
        elif kind == "path":
            path = Path(init)
            if not path.is_file():
                raise InitError(f"train.init: {path}: weights file not found")
        else:
            if fetch_init is None:
                raise InitError(
                    f"train.init: {cfg.init!r} is a registry spec, and there is no registry to fetch it from"
                )
            pulled = Path(fetch_init(init))
            path, url = pulled / "model.keras", f"{init} ({pulled.parent.name}:{pulled.name})"
            if (pulled / "params.yaml").is_file():
                params = (yaml.safe_load((pulled / "params.yaml").read_text()) or {}).get("train")
    except DownloadError as err:
        raise InitError(f"train.init: {err}") from None
    digest = sha256_file(path)
    if kind == "path" and cfg.init_sha256 and digest.lower() != cfg.init_sha256.lower():
        raise InitError(f"train.init: {path}: sha256 mismatch: expected {cfg.init_sha256}, received {digest}")
    source = str(path) if kind == "path" or url is None else redact_url(url)
    return {
        "init": cfg.init if kind != "url" else redact_url(init),
        "kind": kind,
        "path": str(path),
        "source": source,
        "sha256": digest,
        "params": params,
    }


def check_layout(cfg: TrainConfig, params: dict | None, spec: str) -> None:
    """A registered version's train params against ours: refuse what changes the weights' meaning."""
    if not isinstance(params, dict):
        return
    params = upgrade_saved({"train": params})["train"]  # a version registered by release 0.1
    for key in LAYOUT_KEYS:
        if key in params and params[key] != getattr(cfg, key):
            raise InitError(
                f"train.{key}: received {getattr(cfg, key)!r}; the weights of {spec} need "
                f"{params[key]!r} (its params.yaml)"
            )


def _weighted_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    return {layer.name: layer for layer in model.layers if layer.weights}


def _names_by_class(model: keras.Model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for layer in model.layers:
        cls = snake_case(type(layer).__name__)
        out.setdefault("batch_normalization" if cls == "sync_batch_normalization" else cls, []).append(layer.name)
    return out


def _stage_blocks(names) -> tuple[int, ...]:
    blocks: dict[int, int] = {}
    for name in names:
        m = re.match(r"conv(\d+)_block(\d+)_", name)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)))
    return tuple(blocks[k] for k in sorted(blocks))


def _depth_hint(file_names, cfg: TrainConfig) -> str:
    blocks = _stage_blocks(file_names)
    depths = [
        d for d, spec in SPECS[VARIANTS[cfg.variant].family].items() if tuple(s.blocks for s in spec.stages) == blocks
    ]
    if depths and depths[0] != cfg.depth:
        return (
            f"; the file holds ResNet-{depths[0]} ({'-'.join(map(str, blocks))} blocks): set train.depth: {depths[0]}"
        )
    return f"; the file's stages have {'-'.join(map(str, blocks))} blocks (check train.depth and train.variant)"


def _describe(arrays) -> str:
    return ", ".join(str(tuple(a.shape)) for a in arrays)


def _check_config(path, name: str, ours: dict, theirs: dict | None) -> None:
    """Layer options the weights do not show but depend on (strides, BN epsilon), from a .keras config."""
    if not theirs:
        return
    hints = {
        "strides": "train.variant ('v1' strides the 1x1, 'v1.5' the 3x3) or train.v2_stride_last (v2)",
        "epsilon": "train.bn_epsilon",
        "use_bias": "train.use_bias",
    }
    for key, hint in hints.items():
        if key in ours and key in theirs and list(np.atleast_1d(ours[key])) != list(np.atleast_1d(theirs[key])):
            raise InitError(
                f"{path}: layer {name}: {key} is {theirs[key]!r} in the file, {ours[key]!r} in the "
                f"model; set {hint} to match the weights"
            )


def plan(model: keras.Model, cfg: TrainConfig, path: str | Path) -> tuple[dict, list[str], list[str]]:
    """`({layer: arrays to assign}, [re-initialised layers], [skipped layers of the file])`; raises
    InitError at the first mismatch. Shapes are compared as the file declares them, and the arrays
    read only after every layer matched (weights_file refuses a file that is not plain data)."""
    try:
        with open_weights(path, _names_by_class(model)) as file:
            chosen, reinit, skipped = _match(model, cfg, path, file)
            assign = {
                name: [file.read(w, tuple(v.shape)) for w, v in zip(weights, model.get_layer(name).weights)]
                for name, weights in chosen.items()
            }
    except WeightsFileError as err:
        raise InitError(str(err)) from None
    return assign, reinit, skipped


def _match(model: keras.Model, cfg: TrainConfig, path, file: WeightsFile) -> tuple[dict, list[str], list[str]]:
    """`plan` on the declared weights of `file`: `({layer: [Weight]}, reinitialised, skipped)`."""
    ours = _weighted_layers(model)
    weights = {HEAD_ALIASES.get(k, k): v for k, v in file.layers.items()}
    configs = {HEAD_ALIASES.get(k, k): v for k, v in file.configs.items()}
    if not weights:
        raise InitError(f"{path}: holds no weights")
    for name in weights:  # a layer of the file the model lacks: another depth or variant
        if name not in ours:
            raise InitError(
                f"{path}: layer {name} of the file is not in the model ResNet-{cfg.depth} "
                f"({cfg.variant}){_depth_hint(weights, cfg)}"
            )
    assign, reinit = {}, []
    for name, layer in ours.items():
        declared = weights.get(name)
        if name == HEAD and (
            declared is None or [w.shape for w in declared] != [tuple(v.shape) for v in layer.weights]
        ):
            reinit.append(name)  # another class count, or a file without the classifier
            continue
        if declared is None:
            raise InitError(f"{path}: layer {name} of the model is not in the file{_depth_hint(weights, cfg)}")
        shapes = [tuple(w.shape) for w in layer.weights]
        if len(declared) != len(shapes):
            hint = "; set train.use_bias to match the file" if isinstance(layer, keras.layers.Conv2D) else ""
            raise InitError(
                f"{path}: layer {name}: the file has {len(declared)} weights ({_describe(declared)}), the "
                f"model {len(shapes)} ({', '.join(map(str, shapes))}){hint}"
            )
        for weight, shape, var in zip(declared, shapes, layer.weights):
            if weight.shape != shape:
                raise InitError(
                    f"{path}: layer {name}: weight {var.name} (dataset {weight.dataset!r}) is {weight.shape} in the "
                    f"file, {shape} in the model (check train.depth, train.variant and train.shortcut); not read"
                )
        _check_config(path, name, layer.get_config(), configs.get(name))
        assign[name] = declared
    return assign, reinit, [name for name in weights if name not in assign]


def load_initial_weights(
    model: keras.Model, cfg: TrainConfig, *, cache_dir: str | Path, fetch_init: Callable[[str], Path] | None = None
) -> dict | None:
    """Load `cfg.init` into `model` (built, inside the strategy's scope); the record, or None from scratch."""
    if cfg.init is None:
        return None
    source = resolve_source(cfg, cache_dir, fetch_init)
    if source["kind"] == "registry":
        check_layout(cfg, source["params"], cfg.init)
    try:
        assign, reinit, skipped = plan(model, cfg, source["path"])
    except InitError as err:
        if source["kind"] == "path":
            raise
        raise InitError(f"{err} (train.init: {source['source']})") from None  # the cached file's origin, redacted
    for name, arrays in assign.items():
        for var, array in zip(model.get_layer(name).weights, arrays):
            var.assign(array.astype(var.dtype))
    record = {
        "init": source["init"],
        "source": source["source"],
        "sha256": source["sha256"],
        "loaded": sorted(assign),
        "reinitialised": reinit,
        "loaded_weights": sum(len(a) for a in assign.values()),
        "skipped": skipped,
    }
    log.info(
        "init: loaded %d layers (%d weights) from %s (sha256 %s); re-initialised: %s",
        len(assign),
        record["loaded_weights"],
        source["source"],
        source["sha256"][:12],
        ", ".join(reinit) or "none",
    )
    return record
