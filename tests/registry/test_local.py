"""The local-folder registry: numbered versions, manifest as commit point, verified pulls (the original tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from resnet_pipeline.registry import MANIFEST, LocalRegistry, RegistryError, register_model

NAME = "resnet-digits"


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Small stand-ins for the files of a model version (the registry does not read them)."""
    src = tmp_path / "src"
    src.mkdir()
    contents = {
        "model.keras": b"PK\x03\x04 not really a zip " + bytes(range(256)) * 8,
        "params.yaml": b"train:\n  epochs: 3\n",
        "labels.json": b'{"classes": ["0", "1"]}\n',
        "metrics.json": b'{"test": {"top1": 0.5}}\n',
    }
    out = {}
    for name, data in contents.items():
        (src / name).write_bytes(data)
        out[name] = src / name
    return out


@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def version_dir(reg: LocalRegistry, version: int, name: str = NAME) -> Path:
    return reg.root / "models" / name / "versions" / str(version)


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_register_numbers_versions_from_one(reg, files):
    assert reg.versions(NAME) == []
    assert [reg.register(NAME, files, {"metrics": {"run": i}}) for i in range(3)] == [1, 2, 3]
    assert reg.versions(NAME) == [1, 2, 3]
    assert reg.names() == [NAME]
    assert reg.resolve(NAME) == (NAME, 3)
    assert reg.resolve(f"{NAME}:2") == (NAME, 2)
    assert reg.manifest(f"{NAME}:2")["metrics"] == {"run": 1}


def test_versions_of_different_models_are_independent(reg, files):
    assert reg.register("a-model", files, {}) == 1
    assert reg.register("b-model", files, {}) == 1
    assert reg.register("a-model", files, {}) == 2
    assert reg.names() == ["a-model", "b-model"]


def test_manifest_lists_sha256_of_each_file(reg, files):
    version = reg.register(NAME, files, {"metrics": {"test": {"top1": 0.5}}})
    manifest = reg.manifest(f"{NAME}:{version}")
    assert manifest["name"] == NAME and manifest["version"] == version
    assert manifest["metrics"] == {"test": {"top1": 0.5}}
    assert "created_at" in manifest
    assert set(manifest["files"]) == set(files)
    for target, source in files.items():
        data = source.read_bytes()
        assert manifest["files"][target]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["files"][target]["bytes"] == len(data)
        assert (version_dir(reg, version) / target).read_bytes() == data
    on_disk = json.loads((version_dir(reg, version) / MANIFEST).read_text())
    assert on_disk == manifest


def test_register_with_a_missing_file_creates_no_version(reg, files, tmp_path):
    files = {**files, "model.keras": tmp_path / "missing.keras"}
    with pytest.raises(RegistryError) as err:
        reg.register(NAME, files, {})
    assert "missing.keras" in str(err.value) and "model.keras" in str(err.value)
    assert reg.versions(NAME) == []
    assert not (reg.root / "models" / NAME / "versions" / "1").exists()


@pytest.mark.parametrize("bad", ["Resnet", "-x", "a b", "a/b", ""])
def test_bad_model_names_are_refused(reg, files, bad):
    with pytest.raises(RegistryError):
        reg.register(bad, files, {})


def test_a_version_without_manifest_does_not_exist(reg, files):
    assert reg.register(NAME, files, {}) == 1
    half = version_dir(reg, 2)  # a writer that died before committing
    half.mkdir()
    (half / "model.keras").write_bytes(b"half-copied")
    assert reg.versions(NAME) == [1]
    assert reg.resolve(NAME) == (NAME, 1)
    with pytest.raises(RegistryError) as err:
        reg.resolve(f"{NAME}:2")
    assert f"{NAME}:2" in str(err.value)
    assert reg.register(NAME, files, {}) == 3, "a claimed number is never reused"
    assert reg.versions(NAME) == [1, 3]


def test_a_model_with_only_uncommitted_versions_is_not_listed(reg, files):
    version_dir(reg, 1, "ghost").mkdir(parents=True)
    assert reg.names() == []
    assert reg.versions("ghost") == []
    with pytest.raises(RegistryError, match="'ghost'"):
        reg.resolve("ghost")


def test_resolve_unknown_name_and_version(reg, files):
    reg.register(NAME, files, {})
    with pytest.raises(RegistryError) as err:
        reg.resolve("no-such-model")
    assert "no-such-model" in str(err.value)
    with pytest.raises(RegistryError) as err:
        reg.resolve(f"{NAME}:7")
    assert f"{NAME}:7" in str(err.value)
    with pytest.raises(RegistryError) as err:
        reg.resolve(f"{NAME}@latest")
    assert f"{NAME}@latest" in str(err.value)


def test_pull_verifies_and_copies(reg, files, tmp_path):
    reg.register(NAME, files, {})
    reg.register(NAME, {**files, "params.yaml": files["labels.json"]}, {})
    dest = tmp_path / "pulled" / "model"
    assert reg.pull(f"{NAME}:1", dest) == dest
    pulled = listing(dest)
    assert set(pulled) == set(files) | {MANIFEST}
    for target, source in files.items():
        assert pulled[target] == source.read_bytes()
    assert json.loads(pulled[MANIFEST])["version"] == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"], "no temp folders left"


def test_pull_latest_into_an_existing_empty_folder(reg, files, tmp_path):
    reg.register(NAME, files, {})
    reg.register(NAME, files, {"tag": "second"})
    dest = tmp_path / "empty"
    dest.mkdir()
    reg.pull(NAME, dest)
    assert json.loads((dest / MANIFEST).read_text())["tag"] == "second"


def test_pull_refuses_a_tampered_file(reg, files, tmp_path):
    version = reg.register(NAME, files, {})
    stored = version_dir(reg, version) / "model.keras"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF  # same size, other content
    stored.write_bytes(bytes(data))
    parent = tmp_path / "pulls"
    parent.mkdir()
    dest = parent / "model"
    with pytest.raises(RegistryError) as err:
        reg.pull(NAME, dest)
    assert "model.keras" in str(err.value)
    assert not dest.exists()
    assert list(parent.iterdir()) == [], "no temporary folder is left beside dest"


def test_pull_refuses_a_missing_file(reg, files, tmp_path):
    version = reg.register(NAME, files, {})
    (version_dir(reg, version) / "labels.json").unlink()
    dest = tmp_path / "pulls" / "model"
    with pytest.raises(RegistryError, match="labels.json"):
        reg.pull(NAME, dest)
    assert list(dest.parent.iterdir()) == []


def test_pull_into_a_non_empty_folder_refuses_and_touches_nothing(reg, files, tmp_path):
    reg.register(NAME, files, {})
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    before = listing(dest)
    with pytest.raises(RegistryError) as err:
        reg.pull(NAME, dest)
    assert str(dest) in str(err.value)
    assert listing(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["busy", "registry", "src"])


def test_register_model_stage_writes_the_record(tmp_path, files):
    model_dir, eval_dir = tmp_path / "model", tmp_path / "eval"
    model_dir.mkdir()
    eval_dir.mkdir()
    (model_dir / "model.keras").write_bytes(files["model.keras"].read_bytes())
    (model_dir / "params.yaml").write_bytes(files["params.yaml"].read_bytes())
    (model_dir / "labels.json").write_bytes(files["labels.json"].read_bytes())
    (eval_dir / "metrics.json").write_text(json.dumps({"test": {"top1": 0.9}}))
    out = tmp_path / "registered.json"
    record = register_model(tmp_path / "registry", NAME, model_dir, eval_dir, out)
    assert record["version"] == 1 and record["metrics"] == {"test": {"top1": 0.9}}
    assert json.loads(out.read_text()) == record
    manifest = LocalRegistry(tmp_path / "registry").manifest(NAME)
    assert set(manifest["files"]) == {"model.keras", "params.yaml", "labels.json", "metrics.json"}
    assert manifest["files"]["params.yaml"]["sha256"] == hashlib.sha256(files["params.yaml"].read_bytes()).hexdigest()
