"""A hostile registry: whoever writes the bucket writes the manifests too. Nothing it lists may be
written outside the pull's destination, and a refused pull leaves no trace.

Each case plants a version by hand (objects and a manifest, as a writer of the bucket could) and
points `champion` at it; `registry pull`, `fetch_model` and `predict NAME@ALIAS` must refuse it,
naming the file, with nothing written anywhere around DEST.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from resnet_pipeline.registry import RegistryError, fetch_model, open_registry
from tests.registry.conftest import NAME

GOOD = b"a good model file " * 100


def _entry(data: bytes, size: int | None = None) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data) if size is None else size}


def plant(reg, version: int, objects: dict[str, bytes], listed: dict[str, dict]) -> None:
    """Objects under the version (and, where the store takes the key, one for every other name listed,
    with the content the manifest's sha256 names), a manifest listing `listed`, champion -> it."""
    base = f"models/{NAME}/versions/{version}/"
    for name, data in objects.items():
        reg.storage.put(base + name, data)
    for name in set(listed) - set(objects):
        try:
            reg.storage.put(base + name, b"pwned")
        except (RegistryError, OSError, ValueError):
            pass  # a key this store cannot hold (a NUL in it)
    manifest = {"name": NAME, "version": version, "files": listed}
    reg.storage.put(base + "manifest.json", json.dumps(manifest).encode())
    reg.storage.put(f"models/{NAME}/aliases/champion.json", json.dumps({"version": version}).encode())


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def hostile_cases(outside: Path) -> dict[str, tuple[dict, dict, str]]:
    """case -> (objects, manifest files, what the error must name)."""
    big = b"x" * 5000
    return {
        "absolute": (
            {"model.keras": GOOD},
            {"model.keras": _entry(GOOD), str(outside / ".bashrc"): _entry(b"pwned")},
            str(outside / ".bashrc"),
        ),
        "dotdot": (
            {"model.keras": GOOD},
            {"model.keras": _entry(GOOD), "../../escaped.txt": _entry(b"pwned")},
            "../../escaped.txt",
        ),
        "backslash": (
            {"model.keras": GOOD},
            {"model.keras": _entry(GOOD), "..\\..\\escaped.txt": _entry(b"pwned")},
            "escaped.txt",
        ),
        "nul": (
            {"model.keras": GOOD},
            {"model.keras": _entry(GOOD), "model\x00.keras": _entry(b"pwned")},
            "'model\\x00.keras'",
        ),
        "file-and-folder": (
            {"model.keras": GOOD},
            {"model.keras": _entry(GOOD), "model.keras/x": _entry(b"pwned")},
            "'model.keras' is both a file and the folder",
        ),
        "size-lies": ({"model.keras": big}, {"model.keras": _entry(big, size=10)}, "model.keras fails verification"),
    }


@pytest.fixture
def arena(tmp_path):
    """tmp_path/outside (must stay empty), tmp_path/pulls (DEST's parent), the whole tree's snapshot."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "pulls").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", list(hostile_cases(Path("/x"))))
def test_pull_and_fetch_refuse_a_hostile_manifest_and_write_nothing(location, arena, case):
    reg = open_registry(location)
    objects, listed, named = hostile_cases(arena / "outside")[case]
    plant(reg, 1, objects, listed)
    before = snapshot(arena)
    dest = arena / "pulls" / "model"
    with pytest.raises(RegistryError) as err:
        reg.pull(f"{NAME}@champion", dest)
    assert named in str(err.value)
    assert not dest.exists()
    with pytest.raises(RegistryError) as err:
        fetch_model(f"{NAME}@champion", reg, arena / "pulls" / "cache")
    assert named in str(err.value)
    after = snapshot(arena)
    assert after - before <= {"pulls/cache", f"pulls/cache/{NAME}"}, after - before  # the empty cache folders only
    assert not any((arena / "pulls" / "cache").rglob("*.*"))
    assert list((arena / "outside").iterdir()) == []
    assert not (arena.parent / "escaped.txt").exists() and not (arena / "escaped.txt").exists()


class _PlantsASymlink:
    """Test double for a local attacker racing the pull: after the first file comes down into the
    pull's folder, a symlink `sub -> outside` appears beside it (no registry server can make one)."""

    def __init__(self, inner, outside: Path):
        self.inner, self.outside, self.location = inner, outside, inner.location

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def download_file(self, key, path, size=None):
        digest = self.inner.download_file(key, path, size=size)
        link = Path(path).parent / "sub"
        if not link.exists():
            os.symlink(self.outside, link)
        return digest


def test_a_name_that_resolves_through_a_symlink_out_of_dest_is_refused(location, arena):
    reg = open_registry(location)
    plant(reg, 1, {"a.bin": GOOD, "sub/evil.bin": b"pwned"}, {"a.bin": _entry(GOOD), "sub/evil.bin": _entry(b"pwned")})
    reg.storage = _PlantsASymlink(reg.storage, arena / "outside")
    dest = arena / "pulls" / "model"
    with pytest.raises(RegistryError, match=r"sub/evil\.bin"):
        reg.pull(f"{NAME}:1", dest)
    assert not dest.exists() and list((arena / "outside").iterdir()) == []
    assert list((arena / "pulls").iterdir()) == []


def test_a_symlinked_cache_folder_is_refused(tmp_path):
    reg = open_registry(tmp_path / "registry")
    source = tmp_path / "src.bin"
    source.write_bytes(GOOD)
    reg.register(NAME, {"model.keras": source})
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, cache / NAME)  # planted in a shared cache by someone else
    with pytest.raises(RegistryError, match="symlink"):
        fetch_model(NAME, reg, cache)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("case", ["dotdot", "size-lies"])
def test_predict_refuses_a_hostile_champion_naming_the_file(arena, case, monkeypatch, capsys):
    from resnet_pipeline import cli

    location = str(arena / "registry")
    reg = open_registry(location)
    objects, listed, named = hostile_cases(arena / "outside")[case]
    plant(reg, 1, objects, listed)
    image = arena / "image.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(arena / "pulls" / "cache"))
    before = snapshot(arena)
    code = cli.main(["predict", "--model", f"{NAME}@champion", "--registry", location, str(image)])
    assert code != 0
    assert named in capsys.readouterr().err
    assert snapshot(arena) - before <= {"pulls/cache", f"pulls/cache/{NAME}"}
    assert list((arena / "outside").iterdir()) == []


def test_register_refuses_unsafe_names_before_claiming(tmp_path):
    reg = open_registry(tmp_path / "registry")
    source = tmp_path / "src.bin"
    source.write_bytes(GOOD)
    for bad in ("../x", "/abs", "a\\b", "a//b", "./a", "manifest.json", "_claim.json"):
        with pytest.raises(RegistryError, match="file name|reserved"):
            reg.register(NAME, {bad: source})
    assert reg.storage.list(f"models/{NAME}/versions/") == []


def test_a_manifest_larger_than_the_bound_is_refused_unread(tmp_path, monkeypatch):
    from resnet_pipeline.registry import core

    reg = open_registry(tmp_path / "registry")
    plant(reg, 1, {"model.keras": GOOD}, {"model.keras": _entry(GOOD)})
    monkeypatch.setattr(core, "MAX_MANIFEST_BYTES", 50)
    with pytest.raises(RegistryError, match="larger than 50 bytes"):
        reg.pull(f"{NAME}:1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
