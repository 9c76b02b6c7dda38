"""Read the weights of a file into `{layer name: [arrays]}`, without building the model that wrote it.

Three formats:

- `.h5` in keras.applications' format (Keras 2's `save_weights`, the ImageNet files): the root's
  `layer_names` attribute, and per layer a group whose `weight_names` attribute lists its arrays.
- `.keras` (Keras 3's `model.save`): `config.json` names the layers; `model.weights.h5` stores
  them as `layers/<class>[_<k>]/vars/<i>`, numbered per class in the model's layer order.
- `.weights.h5` (Keras 3's `save_weights`): the same store with no names; the `k`-th layer of a
  class is taken to be the `k`-th layer of that class in the model being loaded (the caller's
  `names_by_class`).

Every error names the file, and the layer when one is at fault.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np


class WeightsFileError(ValueError):
    """A weights file that cannot be read (truncated, corrupt, of an unknown layout)."""


def snake_case(name: str) -> str:
    """Keras' `naming.to_snake_case` of a class name: `SyncBatchNormalization` -> `sync_batch_normalization`."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _class_key(class_name: str) -> str:
    """Sync and plain BatchNormalization hold the same weights."""
    return "batch_normalization" if class_name == "sync_batch_normalization" else class_name


def read_weights(path: str | Path, names_by_class: dict[str, list[str]] | None = None) -> tuple[dict, dict]:
    """`({layer: [arrays]}, {layer: layer config})` of a weights file; the configs only for `.keras`."""
    path = Path(path)
    try:
        if path.name.endswith(".keras"):
            return _read_keras(path)
        if path.name.endswith(".weights.h5"):
            return _read_store(path, names_by_class or {}), {}
        if path.suffix == ".h5":
            return _read_legacy_h5(path), {}
    except WeightsFileError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise WeightsFileError(
            f"{path}: not a readable weights file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from None
    raise WeightsFileError(f"{path}: unknown weights format; expected .h5 (keras.applications), .weights.h5 or .keras")


def _read_legacy_h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f  # a whole-model .h5 keeps them there
        layer_names = _attribute(root, "layer_names")
        if not layer_names:
            raise WeightsFileError(f"{path}: no layer_names attribute; not a Keras .h5 weights file")
        out = {}
        for name in layer_names:
            group = root[name]
            names = _attribute(group, "weight_names")
            if names:
                out[name] = [_array(path, name, group[n]) for n in names]
        return out


def _attribute(group, name: str) -> list[str]:
    """A list of strings of an HDF5 attribute, which Keras splits into `name0`, `name1`... when large."""
    values = list(group.attrs[name]) if name in group.attrs else []
    k = 0
    while f"{name}{k}" in group.attrs:
        values.extend(group.attrs[f"{name}{k}"])
        k += 1
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _array(path: Path, layer: str, dataset) -> np.ndarray:
    try:
        return np.asarray(dataset[()])
    except (OSError, KeyError, ValueError) as err:
        raise WeightsFileError(
            f"{path}: layer {layer}: cannot read its weights (truncated or corrupt?): {err}"
        ) from None


def _read_store(path: Path, names_by_class: dict[str, list[str]], h5: h5py.File | None = None) -> dict:
    """The Keras 3 store; `names_by_class[class]` maps the k-th layer of a class to its name."""
    f = h5 if h5 is not None else h5py.File(path, "r")
    try:
        if "layers" not in f:
            raise WeightsFileError(f"{path}: no 'layers' group; not a Keras 3 weights file")
        out = {}
        for key in f["layers"]:
            match = re.fullmatch(r"(.+?)(?:_(\d+))?", key)
            assert match is not None  # (.+?) matches any non-empty key
            cls, k = _class_key(match.group(1)), int(match.group(2) or 0)
            group = f["layers"][key].get("vars")
            if group is None or not len(group):
                continue
            names = names_by_class.get(cls, [])
            name = names[k] if k < len(names) else f"{key} (no layer of that class and position in the model)"
            out[name] = [_array(path, name, group[str(i)]) for i in range(len(group))]
        order = {n: i for i, n in enumerate(n for ns in names_by_class.values() for n in ns)}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))
    finally:
        if h5 is None:
            f.close()


def _read_keras(path: Path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
        layers = config.get("config", {}).get("layers")
        if not isinstance(layers, list):
            raise WeightsFileError(f"{path}: config.json lists no layers; not a functional Keras model")
        names_by_class: dict[str, list[str]] = {}
        configs = {}
        for layer in layers:
            cfg = layer.get("config", {})
            name = cfg.get("name") or layer.get("name")
            names_by_class.setdefault(_class_key(snake_case(layer["class_name"])), []).append(name)
            configs[name] = cfg
        with zf.open("model.weights.h5") as raw, h5py.File(raw, "r") as h5:
            return _read_store(path, names_by_class, h5), configs
