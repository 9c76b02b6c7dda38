"""Read the weights of a file as `{layer name: [arrays]}`, without building the model that wrote it.

    with open_weights(path, names_by_class) as file:      # checked; nothing read yet
        kernel = file.layers["conv1_conv"][0]             # a Weight: dataset, shape, dtype as declared
        array = file.read(kernel, (7, 7, 3, 64))          # read only if declared of the layer's shape

Three formats:

- `.h5` in keras.applications' format (Keras 2's `save_weights`, the ImageNet files): the root's
  `layer_names` attribute, and per layer a group whose `weight_names` attribute lists its arrays.
- `.keras` (Keras 3's `model.save`): `config.json` names the layers; `model.weights.h5` stores
  them as `layers/<class>[_<k>]/vars/<i>`, numbered per class in the model's layer order.
- `.weights.h5` (Keras 3's `save_weights`): the same store with no names; the `k`-th layer of a
  class is taken to be the `k`-th layer of that class in the model being loaded (the caller's
  `names_by_class`).

A weights file is data from anyone who can write a path, a URL or a registry, never a set of
pointers: before anything is read, the whole HDF5 tree is walked and a file is refused if it holds
a soft or external link, a named datatype, or a dataset that is external (stored in other files of
the machine), virtual (mapped from other files) or compressed/filtered (what a filter allocates is
not bounded by the shape it declares). A weight's shape and dtype come from the file's metadata;
`read` reads it only when its declared shape is the layer's, so memory stays the model's own size.
A `.keras` is refused when a member declares a size its zip could not hold, and the `.h5` names,
variable-length strings whose stored lengths HDF5 allocates before checking them, are read in a
child process with capped memory.

Every error names the file, and the dataset or layer at fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

KERAS_WEIGHTS = "model.weights.h5"
MAX_CONFIG_BYTES = 16 << 20  # a .keras config.json (ResNet-152's: 0.5 MiB)
MAX_ZIP_RATIO = 100  # Keras stores its members; deflate cannot pass ~1032:1, so 100:1 is no weights file
ZIP_RATIO_FLOOR = 1 << 20  # small members may compress well
NAMES_MEMORY = 64 << 20  # what the child reading a .h5's names may allocate beyond its start
NAMES_TIMEOUT = 300
NUMBER_KINDS = "fiub"  # float, int, uint, bool: what a weight can be
PLAIN = "weights must be plain arrays stored in the file itself (no links, external, virtual or filtered datasets)"


class WeightsFileError(ValueError):
    """A weights file that cannot be read (truncated, corrupt, of an unknown layout) or that is refused."""


@dataclass(frozen=True)
class Weight:
    """One array of a layer as the file declares it; nothing of it read yet."""

    dataset: str  # its path in the HDF5 file
    shape: tuple[int, ...]
    dtype: np.dtype
    h5: h5py.Dataset = field(repr=False, compare=False)


@dataclass
class WeightsFile:
    """An opened, checked weights file: `layers` {layer: [Weight]} and, from a `.keras`, `configs`
    {layer: its config}, both from the file's structure alone."""

    where: str  # the file, and the member of a .keras
    layers: dict[str, list[Weight]]
    configs: dict[str, dict]

    def read(self, weight: Weight, shape: tuple[int, ...]) -> np.ndarray:
        """The array of `weight`, refused unless it is declared of `shape` (the layer's)."""
        shape = tuple(int(n) for n in shape)
        if weight.shape != shape:
            raise WeightsFileError(
                f"{self.where}: dataset {weight.dataset!r} is {weight.shape} in the file, {shape} in the model; "
                "not read"
            )
        out = np.empty(shape, weight.dtype)
        if out.size:
            try:
                weight.h5.read_direct(out)
            except (OSError, ValueError, RuntimeError, TypeError) as err:
                raise WeightsFileError(
                    f"{self.where}: dataset {weight.dataset!r}: cannot read it (truncated or corrupt?): {err}"
                ) from None
        return out


def snake_case(name: str) -> str:
    """Keras' `naming.to_snake_case` of a class name: `SyncBatchNormalization` -> `sync_batch_normalization`."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _class_key(class_name: str) -> str:
    """Sync and plain BatchNormalization hold the same weights."""
    return "batch_normalization" if class_name == "sync_batch_normalization" else class_name


@contextlib.contextmanager
def open_weights(path: str | Path, names_by_class: dict[str, list[str]] | None = None) -> Iterator[WeightsFile]:
    """The weights file at `path`, checked to be plain data, open for `read` while in the block."""
    path = Path(path)
    with contextlib.ExitStack() as stack:
        try:
            file = _open(path, names_by_class or {}, stack)
        except WeightsFileError:
            raise
        except (
            OSError,
            EOFError,
            KeyError,
            ValueError,
            RuntimeError,
            TypeError,
            AttributeError,
            zipfile.BadZipFile,
            zlib.error,
        ) as err:
            raise WeightsFileError(
                f"{path}: not a readable weights file (truncated or corrupt?): {type(err).__name__}: {err}"
            ) from None
        yield file


def _open(path: Path, names_by_class: dict[str, list[str]], stack: contextlib.ExitStack) -> WeightsFile:
    if path.name.endswith(".keras"):
        archive = stack.enter_context(zipfile.ZipFile(path))
        names_by_class, configs = _keras_config(path, archive)
        _check_member(path, archive, KERAS_WEIGHTS)
        where = f"{path}: {KERAS_WEIGHTS}"
        h5 = stack.enter_context(h5py.File(stack.enter_context(archive.open(KERAS_WEIGHTS)), "r"))
        _check_tree(where, h5)
        return WeightsFile(where, _store_layers(where, h5, names_by_class), configs)
    if path.name.endswith(".weights.h5"):
        h5 = stack.enter_context(h5py.File(path, "r"))
        _check_tree(str(path), h5)
        return WeightsFile(str(path), _store_layers(str(path), h5, names_by_class), {})
    if path.suffix == ".h5":
        h5 = stack.enter_context(h5py.File(path, "r"))
        _check_tree(str(path), h5)
        return WeightsFile(str(path), _legacy_layers(path, h5), {})
    raise WeightsFileError(f"{path}: unknown weights format; expected .h5 (keras.applications), .weights.h5 or .keras")


# ---------------------------------------------------------------------------------- plain data only


def _check_tree(where: str, h5: h5py.File) -> None:
    """Every link of the file hard, every object a group or a dataset stored plainly in the file;
    reads no data (links are listed, not followed)."""
    problem = h5.visititems_links(lambda name, link: _link_problem(h5, name, link))
    if problem is not None:
        raise WeightsFileError(f"{where}: {problem}; refused: {PLAIN}")


def _link_problem(h5: h5py.File, name: str, link) -> str | None:
    """What is wrong with the object linked at `name`, or None."""
    shown = repr("/" + name)
    if isinstance(link, h5py.SoftLink):
        return f"{shown} is a soft link to {link.path!r}"
    if isinstance(link, h5py.ExternalLink):
        return f"{shown} is an external link to {link.path!r} in {link.filename!r}"
    if not isinstance(link, h5py.HardLink):
        return f"{shown} is a link of an unknown kind ({type(link).__name__})"
    obj = h5[name]
    if isinstance(obj, h5py.Group):
        return None
    if not isinstance(obj, h5py.Dataset):
        return f"{shown} is a named datatype ({type(obj).__name__}), not a group or a dataset"
    if obj.is_virtual:
        files = sorted({source.file_name for source in obj.virtual_sources()})
        return f"dataset {shown} is virtual, mapped from {files}"
    if obj.external:
        return f"dataset {shown} is stored in external files {[entry[0] for entry in obj.external]}"
    plist = obj.id.get_create_plist()
    if plist.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
        return f"dataset {shown} has an unknown storage layout ({plist.get_layout()})"
    if plist.get_nfilters():
        filters = [_text(plist.get_filter(i)[3]) or str(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]
        return (
            f"dataset {shown} is compressed or filtered ({', '.join(filters)}): what decompressing it "
            "allocates is not bounded by its shape (store it uncompressed, e.g. `h5repack -f NONE`)"
        )
    return None


def _weight(where: str, obj, expected: str) -> Weight:
    """A Weight of the dataset `obj` (found at `expected`), from its metadata; refused unless an array of numbers."""
    if not isinstance(obj, h5py.Dataset):
        raise WeightsFileError(f"{where}: {expected!r} is not a dataset; not a Keras weights file")
    dtype, shape = obj.dtype, obj.shape
    if shape is None:
        raise WeightsFileError(f"{where}: dataset {obj.name!r} has no shape (an empty dataspace); expected an array")
    if dtype.kind not in NUMBER_KINDS or dtype.subdtype is not None or dtype.itemsize > 8:
        raise WeightsFileError(
            f"{where}: dataset {obj.name!r} has dtype {dtype}; expected numbers (float, int or bool, 8 bytes at most)"
        )
    return Weight(obj.name, tuple(int(n) for n in shape), dtype, obj)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------- Keras 3: .weights.h5, .keras


def _store_layers(where: str, h5: h5py.File, names_by_class: dict[str, list[str]]) -> dict[str, list[Weight]]:
    """The Keras 3 store; `names_by_class[class]` maps the k-th layer of a class to its name."""
    layers = h5.get("layers")
    if not isinstance(layers, h5py.Group):
        raise WeightsFileError(f"{where}: no 'layers' group; not a Keras 3 weights file")
    out = {}
    for key, group in layers.items():
        if not isinstance(group, h5py.Group):
            raise WeightsFileError(f"{where}: {group.name!r} is not a group; not a Keras 3 weights file")
        match = re.fullmatch(r"(.+?)(?:_(\d+))?", key)
        assert match is not None  # (.+?) matches any non-empty key
        cls, k = _class_key(match.group(1)), int(match.group(2) or 0)
        variables = group.get("vars")
        if variables is None or (isinstance(variables, h5py.Group) and not len(variables)):
            continue
        if not isinstance(variables, h5py.Group):
            raise WeightsFileError(f"{where}: {variables.name!r} is not a group; not a Keras 3 weights file")
        names = names_by_class.get(cls, [])
        name = names[k] if k < len(names) else f"{key} (no layer of that class and position in the model)"
        out[name] = [_weight(where, variables.get(str(i)), f"{group.name}/vars/{i}") for i in range(len(variables))]
    order = {n: i for i, n in enumerate(n for ns in names_by_class.values() for n in ns)}
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


def _check_member(path: Path, archive: zipfile.ZipFile, name: str, limit: int | None = None) -> None:
    """Refuse a member whose declared size no Keras file has, or its zip could not hold."""
    info = archive.getinfo(name)
    size = f"{name} declares {info.file_size / 2**20:.1f} MiB"
    if limit is not None and info.file_size > limit:
        raise WeightsFileError(f"{path}: {size}, more than the {limit >> 20} MiB it may take; not read")
    if info.file_size > ZIP_RATIO_FLOOR and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
        raise WeightsFileError(
            f"{path}: {size} in {info.compress_size} bytes of the zip (over {MAX_ZIP_RATIO}:1); not read"
        )


def _keras_config(path: Path, archive: zipfile.ZipFile) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """`({class: [layer names in model order]}, {layer: config})` from a .keras's config.json."""
    _check_member(path, archive, "config.json", MAX_CONFIG_BYTES)
    config = json.loads(archive.read("config.json"))
    layers = config.get("config", {}).get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, list):
        raise WeightsFileError(f"{path}: config.json lists no layers; not a functional Keras model")
    names_by_class: dict[str, list[str]] = {}
    configs = {}
    for layer in layers:
        cfg = layer.get("config", {})
        name = cfg.get("name") or layer.get("name")
        names_by_class.setdefault(_class_key(snake_case(layer["class_name"])), []).append(name)
        configs[name] = cfg
    return names_by_class, configs


# ---------------------------------------------------------------------------------- keras.applications' .h5


def _legacy_layers(path: Path, h5: h5py.File) -> dict[str, list[Weight]]:
    root = h5["model_weights"] if "model_weights" in h5 else h5  # a whole-model .h5 keeps them there
    layer_names, weight_names = _legacy_names(path)
    if not layer_names:
        raise WeightsFileError(f"{path}: no layer_names attribute; not a Keras .h5 weights file")
    out = {}
    for name in layer_names:
        names = weight_names.get(name)
        if names is None:
            raise WeightsFileError(f"{path}: layer {name!r} of layer_names has no group in {root.name!r}")
        if names:
            group = root[name]
            out[name] = [_weight(str(path), group.get(n), f"{group.name}/{n}") for n in names]
    return out


def _legacy_names(path: Path) -> tuple[list[str], dict[str, list[str] | None]]:
    """`layer_names`, and each layer's `weight_names` (None: no such group), read by a child process
    whose memory is capped: these are variable-length strings, and HDF5 allocates the length each
    one claims before it checks it against the bytes stored (a few KiB can claim GiBs)."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = "from resnet_pipeline.training.weights_file import legacy_names_child as m; m()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=NAMES_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise WeightsFileError(
            f"{path}: reading its layer_names and weight_names took over {NAMES_TIMEOUT} s"
        ) from None
    if done.returncode != 0:
        reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1][:500]
        raise WeightsFileError(
            f"{path}: cannot read its layer_names and weight_names attributes with {NAMES_MEMORY >> 20} MiB "
            f"(strings that claim more than they store?): {reason}"
        )
    names = json.loads(done.stdout)
    return names["layer_names"], names["weight_names"]


def legacy_names_child() -> None:
    """In a child process (see `_legacy_names`): print the names of the .h5 `sys.argv[1]` as JSON."""
    _cap_memory(NAMES_MEMORY)
    try:
        with h5py.File(sys.argv[1], "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            layer_names = _attribute(root, "layer_names")
            weight_names = {}
            for name in layer_names:
                hard = isinstance(root.get(name, getlink=True), h5py.HardLink)  # the parent refuses the others
                group = root[name] if hard else None
                weight_names[name] = _attribute(group, "weight_names") if isinstance(group, h5py.Group) else None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, MemoryError) as err:
        sys.exit(f"{type(err).__name__}: {err}")
    json.dump({"layer_names": layer_names, "weight_names": weight_names}, sys.stdout)


def _cap_memory(extra: int) -> None:
    """Let this process allocate at most `extra` bytes more than it holds (Linux counts malloc's
    mmaps in RLIMIT_DATA)."""
    try:
        with open("/proc/self/status") as status:
            held = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    limit = held + extra if hard == resource.RLIM_INFINITY else min(hard, held + extra)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _attribute(group, name: str) -> list[str]:
    """A list of strings of an HDF5 attribute, which Keras splits into `name0`, `name1`... when large."""
    values = list(group.attrs[name]) if name in group.attrs else []
    k = 0
    while f"{name}{k}" in group.attrs:
        values.extend(group.attrs[f"{name}{k}"])
        k += 1
    return [_text(v) for v in values]
