"""Hostile weights files (issue 30): weights are data, never pointers.

A weights file comes from anyone who can write a path, a URL or the registry. Each file here is a
real Keras file of the test model (`.weights.h5`, a `.keras`, or the keras.applications `.h5`)
edited with h5py so that one weight is stored elsewhere (an external dataset, a virtual dataset, a
soft or external link), declares another or a huge shape, or otherwise is not plain data. Every
one is refused through `train.init` before a byte of it is read, naming the file and the dataset,
and no weight of the model changes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from resnet_pipeline.config import from_dict
from resnet_pipeline.models.resnet import build_resnet, model_arguments
from resnet_pipeline.stages import init_fetcher
from resnet_pipeline.training.init import InitError, load_initial_weights

# what an attacker wants copied into the registered model: a credentials file on the training machine
SECRET = b"[default]\naws_access_key_id = AKIAHOSTILEWEIGHTS42\naws_secret_access_key = s3cr3t/Wt8s\n" * 40
STORE_KERNEL = "layers/conv2d/vars/0"  # the first convolution's kernel in Keras 3's store


def _cfg(**train):
    return from_dict({"train": {"image_size": 8, **train}}).train


@pytest.fixture(scope="module")
def model():
    """The default CIFAR ResNet-20; refused loads must leave it as it is (each test checks)."""
    import keras

    keras.utils.set_random_seed(0)
    return build_resnet(**model_arguments(_cfg(), num_classes=10))


@pytest.fixture(scope="module")
def good(model, tmp_path_factory) -> dict[str, Path]:
    """The model's own weights in each format: `.weights.h5`, `.keras` and keras.applications' `.h5`."""
    from keras.src.legacy.saving import legacy_h5_format

    folder = tmp_path_factory.mktemp("good")
    model.save_weights(folder / "good.weights.h5")
    model.save(folder / "good.keras")
    with h5py.File(folder / "good.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return {"weights.h5": folder / "good.weights.h5", "keras": folder / "good.keras", "h5": folder / "good.h5"}


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_bytes(SECRET)
    return path


def _kernel(f: h5py.File) -> str:
    """The path of the first convolution's kernel, in either layout."""
    if "layers" in f:
        return STORE_KERNEL
    layer = next(n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"] if "conv" in str(n))
    return f"{layer}/{_text(f[layer].attrs['weight_names'][0])}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hostile(src: Path, dest: Path, edit) -> Path:
    """A copy of `src` with `edit(h5 file, kernel path)` applied (inside the zip for a `.keras`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".keras"):
        with zipfile.ZipFile(src) as zin:
            members = {info.filename: zin.read(info) for info in zin.infolist()}
        inner = dest.with_name(dest.name + ".inner.h5")
        inner.write_bytes(members["model.weights.h5"])
        with h5py.File(inner, "r+") as f:
            edit(f, _kernel(f))
        members["model.weights.h5"] = inner.read_bytes()
        inner.unlink()
        with zipfile.ZipFile(dest, "w") as zout:
            for name, data in members.items():
                zout.writestr(name, data)
        return dest
    shutil.copy(src, dest)
    with h5py.File(dest, "r+") as f:
        edit(f, _kernel(f))
    return dest


def _replace(f: h5py.File, key: str, **kwargs) -> h5py.Dataset:
    shape, dtype = f[key].shape, f[key].dtype
    del f[key]
    return f.create_dataset(key, **{"shape": shape, "dtype": dtype, **kwargs})


def _external(secret: Path):
    """The kernel's storage is the secret file (HDF5 external storage: no byte of it in the file)."""
    return lambda f, key: _replace(f, key, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])


def _snapshot(model) -> list[np.ndarray]:
    return [w.numpy().copy() for w in model.weights]


def _unchanged(model, before) -> bool:
    return all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


def _files_holding(root: Path, needle: bytes, besides: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p != besides and needle in p.read_bytes()]


def _no_secret_anywhere(tmp_path: Path, secret: Path, err: pytest.ExceptionInfo, model) -> None:
    """Not in the message, in no file under the test's folders (caches, registry), not in the model."""
    assert "AKIAHOSTILE" not in str(err.value)
    assert _files_holding(tmp_path, b"AKIAHOSTILE", besides=secret) == []
    raw = b"".join(w.numpy().tobytes() for w in model.weights)
    assert b"AKIAHOSTILE" not in raw


@pytest.mark.parametrize("fmt", ["weights.h5", "keras", "h5"])
def test_an_external_dataset_is_refused_naming_file_and_dataset(model, good, secret, tmp_path, fmt):
    """The attack of issue 30: a small file naming a local credentials file as a weight's storage."""
    hostile = _hostile(good[fmt], tmp_path / f"hostile.{fmt}", _external(secret))
    assert b"AKIAHOSTILE" not in hostile.read_bytes()  # its sha256 pins nothing: the secret is elsewhere
    with h5py.File(good[fmt] if fmt != "keras" else good["weights.h5"]) as f:
        kernel = _kernel(f)
    before = _snapshot(model)
    with pytest.raises(InitError) as err:
        load_initial_weights(model, _cfg(init=str(hostile)), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert f"hostile.{fmt}" in message and f"/{kernel}" in message and "external" in message, message
    assert str(secret) in message  # where the file pointed: the user sees what was attempted
    assert _unchanged(model, before)
    _no_secret_anywhere(tmp_path, secret, err, model)


def test_an_external_dataset_through_a_registry_alias_is_refused(model, good, secret, tmp_path, monkeypatch):
    """`train.init=NAME@ALIAS`: the registered model.keras holds the same pointer; refused the same way."""
    from resnet_pipeline.registry import LocalRegistry

    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(tmp_path / "models-cache"))
    hostile = _hostile(good["keras"], tmp_path / "upload" / "model.keras", _external(secret))
    registry = LocalRegistry(tmp_path / "registry")
    version = registry.register("hostile", {"model.keras": hostile})
    registry.promote("hostile", version, "champion")
    before = _snapshot(model)
    with pytest.raises(InitError) as err:
        load_initial_weights(
            model, _cfg(init="hostile@champion"), cache_dir=tmp_path / "cache", fetch_init=init_fetcher(registry)
        )
    message = str(err.value)
    assert "model.keras" in message and f"/{STORE_KERNEL}" in message and "external" in message, message
    assert "hostile@champion" in message
    assert _unchanged(model, before)
    _no_secret_anywhere(tmp_path, secret, err, model)


def test_an_external_dataset_from_a_url_is_refused_with_the_url_redacted(model, good, secret, tmp_path):
    from tests.httpserver import LoopbackHTTPServer

    data = _hostile(good["weights.h5"], tmp_path / "served.weights.h5", _external(secret)).read_bytes()
    with LoopbackHTTPServer({"/w/hostile.weights.h5": data}) as server:
        url = server.url("/w/hostile.weights.h5").replace("://", "://user:pa55word@") + "?sig=TOPSIGNATURE"
        cfg = _cfg(init=url, init_sha256=hashlib.sha256(data).hexdigest())
        with pytest.raises(InitError) as err:
            load_initial_weights(model, cfg, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "hostile.weights.h5" in message and f"/{STORE_KERNEL}" in message and "external" in message, message
    assert "pa55word" not in message and "TOPSIGNATURE" not in message
    _no_secret_anywhere(tmp_path, secret, err, model)


def _secret_h5(tmp_path: Path, shape) -> Path:
    """Another HDF5 file on the machine, holding data of the kernel's shape."""
    path = tmp_path / "elsewhere.h5"
    if not path.exists():
        with h5py.File(path, "w") as f:
            f["kernel"] = np.frombuffer(SECRET[: 4 * int(np.prod(shape))], "<f4").reshape(shape)
    return path


def _soft_link(tmp_path):
    def edit(f, key):
        f["stash/kernel"] = f[key][()]
        del f[key]
        f[key] = h5py.SoftLink("/stash/kernel")

    return edit


def _external_link(tmp_path):
    def edit(f, key):
        other = _secret_h5(tmp_path, f[key].shape)
        del f[key]
        f[key] = h5py.ExternalLink(str(other), "/kernel")

    return edit


def _virtual(tmp_path):
    def edit(f, key):
        shape = f[key].shape
        layout = h5py.VirtualLayout(shape=shape, dtype="<f4")
        layout[...] = h5py.VirtualSource(str(_secret_h5(tmp_path, shape)), "kernel", shape=shape)
        del f[key]
        f.create_virtual_dataset(key, layout)

    return edit


def _inflating(tmp_path):
    """The kernel's own shape, gzip-compressed, its one chunk inflating to 64 MiB: the shape tells
    nothing of what the filter allocates."""

    def edit(f, key):
        ds = _replace(f, key, chunks=f[key].shape, compression="gzip")
        ds.id.write_direct_chunk((0,) * ds.ndim, zlib.compress(bytes(64 << 20), 9))

    return edit


def _array_dtype(tmp_path):
    """The kernel's shape, each element an array of 1,000 floats."""
    return lambda f, key: _replace(f, key, dtype=np.dtype(("<f4", (1000,))))


def _named_type(tmp_path):
    def edit(f, key):
        f["odd"] = np.dtype("<f4")

    return edit


@pytest.mark.parametrize(
    "fmt,edit,where,reason",
    [
        ("weights.h5", _soft_link, STORE_KERNEL, "soft link"),
        ("h5", _soft_link, None, "soft link"),
        ("weights.h5", _external_link, STORE_KERNEL, "external link"),
        ("keras", _external_link, STORE_KERNEL, "external link"),
        ("weights.h5", _virtual, STORE_KERNEL, "virtual"),
        ("h5", _virtual, None, "virtual"),
        ("weights.h5", _inflating, STORE_KERNEL, "compressed or filtered"),
        ("weights.h5", _array_dtype, STORE_KERNEL, "dtype"),
        ("weights.h5", _named_type, "odd", "named datatype"),
    ],
    ids=[
        "soft-link",
        "soft-link-h5",
        "external-link",
        "external-link-keras",
        "virtual",
        "virtual-h5",
        "inflating-chunk",
        "array-dtype",
        "named-datatype",
    ],
)
def test_pointers_and_odd_objects_are_refused_naming_the_dataset(model, good, tmp_path, fmt, edit, where, reason):
    hostile = _hostile(good[fmt], tmp_path / f"hostile.{fmt}", edit(tmp_path))
    if where is None:
        with h5py.File(good[fmt]) as f:
            where = _kernel(f)
    before = _snapshot(model)
    with pytest.raises(InitError) as err:
        load_initial_weights(model, _cfg(init=str(hostile)), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert f"hostile.{fmt}" in message and f"/{where}" in message and reason in message, message
    assert _unchanged(model, before)
    assert "AKIAHOSTILE" not in message


def test_a_shape_mismatch_is_refused_naming_the_dataset_and_both_shapes(model, good, tmp_path):
    def edit(f, key):
        del f[key]
        f[key] = np.zeros((3, 3, 3, 8), "<f4")

    hostile = _hostile(good["weights.h5"], tmp_path / "narrow.weights.h5", edit)
    before = _snapshot(model)
    with pytest.raises(InitError) as err:
        load_initial_weights(model, _cfg(init=str(hostile)), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "narrow.weights.h5" in message and f"/{STORE_KERNEL}" in message, message
    assert "(3, 3, 3, 8) in the file, (3, 3, 3, 16) in the model" in message
    assert _unchanged(model, before)


HEAD_KERNEL = "layers/dense/vars/0"  # the classifier's kernel: another shape there re-initialises the head


@pytest.mark.parametrize("target", [STORE_KERNEL, HEAD_KERNEL], ids=["refused", "head-reinitialised"])
def test_a_small_file_declaring_a_huge_dataset_is_never_allocated(model, good, tmp_path, target):
    """256 MiB declared, nothing stored: the file stays as small as the good one, and the load
    allocates nothing near the declared size (the old reader read every dataset whole, then compared
    shapes). In a layer, the file is refused; as the classifier, the head is re-initialised unread."""

    def edit(f, key):
        _replace(f, target, shape=(1 << 26,))

    hostile = _hostile(good["weights.h5"], tmp_path / "huge.weights.h5", edit)
    assert hostile.stat().st_size < good["weights.h5"].stat().st_size + (64 << 10)
    before = _snapshot(model)
    tracemalloc.start()
    try:
        try:
            record = load_initial_weights(model, _cfg(init=str(hostile)), cache_dir=tmp_path / "cache")
        except InitError as err:
            record, message = None, str(err)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB of Python allocations"
    assert _unchanged(model, before)
    if target == HEAD_KERNEL:
        assert record is not None and record["reinitialised"] == ["logits"]
        return
    assert record is None, "a kernel of another shape was loaded"
    assert f"/{STORE_KERNEL}" in message and f"({1 << 26},) in the file, (3, 3, 3, 16) in the model" in message


def test_a_keras_zip_member_declaring_an_absurd_size_is_refused(model, good, tmp_path):
    """A config.json of 64 MiB stored in 64 KiB (deflate): refused from the zip's directory, not read."""
    hostile = tmp_path / "bomb.keras"
    with zipfile.ZipFile(good["keras"]) as zin, zipfile.ZipFile(hostile, "w") as zout:
        for info in zin.infolist():
            if info.filename == "config.json":
                zout.writestr("config.json", b" " * (64 << 20) + zin.read(info), zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info, zin.read(info))
    assert hostile.stat().st_size < 4 << 20
    with pytest.raises(InitError, match=r"bomb\.keras: config\.json declares 64\.\d MiB"):
        load_initial_weights(model, _cfg(init=str(hostile)), cache_dir=tmp_path / "cache")


def _lying_string_length(path: Path, text: str, length: int) -> None:
    """Make the stored length of one variable-length string `text` of an attribute `length` (its
    bytes in a global heap stay as they are): HDF5 allocates that length before it compares it with
    the heap object's size."""
    data = bytearray(path.read_bytes())
    for heap in (m.start() for m in re.finditer(b"GCOL", data)):
        at = data.find(struct.pack("<IQ", len(text), heap))
        if at >= 0:
            data[at : at + 4] = struct.pack("<I", length)
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no stored string of {len(text)} bytes in {path}")


def _resident_peak(reset: bool = False) -> int:
    """This process's peak resident size (VmHWM), in bytes; `reset` first brings it down to the
    current size (Linux's clear_refs), so that what one call allocates shows whatever ran before."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) << 10


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak with Linux's clear_refs")
def test_a_layer_name_declaring_a_huge_length_is_refused_without_the_allocation(model, good, tmp_path):
    """keras.applications' `.h5` names its layers in an attribute of variable-length strings, whose
    stored lengths a file can lie about: 512 MiB claimed by 4 bytes of the file, which HDF5
    allocates before it compares them with the string stored."""
    hostile = tmp_path / "names.h5"
    shutil.copy(good["h5"], hostile)
    _lying_string_length(hostile, "conv1_conv", 512 << 20)
    assert hostile.stat().st_size == good["h5"].stat().st_size
    before = _snapshot(model)
    start = _resident_peak(reset=True)
    with pytest.raises(InitError) as err:
        load_initial_weights(model, _cfg(init=str(hostile)), cache_dir=tmp_path / "cache")
    grown = _resident_peak() - start
    assert grown < 128 << 20, f"the peak resident size grew by {grown / 2**20:.0f} MiB"
    message = str(err.value)
    assert "names.h5" in message and "layer_names" in message, message
    assert _unchanged(model, before)


@pytest.mark.parametrize("fmt", ["weights.h5", "keras", "h5"])
def test_the_models_own_files_still_load(model, good, tmp_path, fmt):
    """What Keras writes passes every check (the refusals above are not refusing everything)."""
    before = _snapshot(model)
    for w in model.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    try:
        record = load_initial_weights(model, _cfg(init=str(good[fmt])), cache_dir=tmp_path / "cache")
        assert _unchanged(model, before) and record["reinitialised"] == []
    finally:
        for w, value in zip(model.weights, before):
            w.assign(value)


@pytest.mark.slow
def test_train_refuses_a_hostile_init_by_path_and_by_alias_and_writes_no_secret(good, secret, digits_data, tmp_path):
    """The issue's must-show through `resnet-pipeline train` itself: `train.init=FILE` and
    `train.init=NAME@ALIAS` (the same file registered in the project's registry) each fail naming
    the file and the dataset; nothing under the project, the registry or the models cache holds the
    secret, and no model folder is written. The two runs train at once, each in its own project."""
    import os
    import subprocess
    import sys

    from resnet_pipeline.registry import LocalRegistry
    from tests.project import train_project

    hostile = _hostile(good["keras"], tmp_path / "upload" / "hostile.keras", _external(secret))
    projects = {
        init: train_project(tmp_path / name, digits_data)
        for name, init in (("by-path", str(hostile)), ("by-alias", "hostile@champion"))
    }
    registry = LocalRegistry(projects["hostile@champion"] / "registry")
    registry.promote("hostile", registry.register("hostile", {"model.keras": hostile}), "champion")
    env = dict(os.environ, RESNET_PIPELINE_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
    cli = Path(sys.executable).parent / "resnet-pipeline"
    runs = {
        init: subprocess.Popen(
            [
                str(cli),
                "train",
                "--set",
                f"train.init={init}",
                "--set",
                "train.image_size=8",
                "--set",
                "train.pad_crop=2",
            ],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for init, project in projects.items()
    }
    errors = {}
    for init, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (init, stdout[-2000:], stderr[-3000:])
        assert f"/{STORE_KERNEL}" in stderr and "external" in stderr, stderr[-3000:]
        assert "AKIAHOSTILE" not in stdout + stderr
        assert not (projects[init] / "artifacts/model").exists()
        errors[init] = stderr
    assert "hostile.keras" in errors[str(hostile)]
    assert "model.keras" in errors["hostile@champion"] and "hostile@champion" in errors["hostile@champion"]
    assert _files_holding(tmp_path, b"AKIAHOSTILE", besides=secret) == []
