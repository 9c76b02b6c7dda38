"""A local registry folder is trusted for its bytes, not its shape.

Whoever can write the folder can plant symbolic links (a part of a path that leads out of the
registry) and special files (a FIFO a reader would block on forever). Every path under the registry
is opened without following links, regular files only: gc and register refuse a linked part naming
it, readers refuse a linked or special file naming it and never block. Files and folders get the
permissions the umask asks for. A pull's temporary names never collide with a listed name, and gc
never deletes the files of a version that is being committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from resnet_pipeline.registry import MANIFEST, Registry, RegistryError, fetch_model, open_registry
from resnet_pipeline.registry.manifest import check_file_name
from tests.registry.conftest import NAME, make_files

REFUSAL = "a registry folder holds regular files and folders only"
THREE_DAYS = 3 * 86400


def _age(path: Path, seconds: float) -> None:
    when = dt.datetime.now().timestamp() - seconds
    os.utime(path, (when, when))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder that is no part of the registry (someone's photos and papers, three days old)."""
    folder = tmp_path / "outside"
    for number, name, data in [("1", "photo.jpg", b"\xff\xd8 a photo"), ("2", "paper.pdf", b"%PDF-1.4 a paper")]:
        (folder / number).mkdir(parents=True)
        (folder / number / name).write_bytes(data)
        _age(folder / number / name, THREE_DAYS)
        _age(folder / number, THREE_DAYS)
    return folder


# ------------------------------------------------------------------------------- links: gc


@pytest.mark.parametrize("linked", ["models", f"models/{NAME}", f"models/{NAME}/versions"])
def test_gc_refuses_a_linked_folder_and_the_outside_files_survive(tmp_path, outside, linked):
    root = tmp_path / "registry"
    reg = open_registry(root)
    reg.register("other", make_files(tmp_path / "src"), {})  # a real model beside the planted one
    target = root / linked
    target.parent.mkdir(parents=True, exist_ok=True)
    if linked == "models":  # the whole models folder: move the real one out and link to outside
        os.rename(target, tmp_path / "real-models")
        os.symlink(outside, target)
    elif linked == f"models/{NAME}":
        (outside / "versions").mkdir()
        os.rename(outside / "1", outside / "versions" / "1")
        os.symlink(outside, target)
    else:
        os.symlink(outside, target)
    before = _tree(outside)
    for call in (lambda: reg.gc(NAME, older_than=60), lambda: reg.gc(older_than=60), reg.names):
        error: Exception | None = None
        try:
            call()
        except Exception as err:  # noqa: BLE001 - checked below, after the files outside
            error = err
        assert _tree(outside) == before  # nothing outside deleted
        assert isinstance(error, RegistryError), repr(error)
        assert f"{root / linked}: a symbolic link; {REFUSAL}" in str(error)


# ------------------------------------------------------------------------------- links: register


@pytest.mark.parametrize("linked", ["models", f"models/{NAME}", f"models/{NAME}/versions", f"models/{NAME}/versions/1"])
def test_register_refuses_a_linked_folder_and_writes_nothing_outside(tmp_path, linked):
    root, elsewhere = tmp_path / "registry", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / linked).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, root / linked)
    reg = open_registry(root)
    with pytest.raises(RegistryError) as err:
        reg.register(NAME, make_files(tmp_path / "src"), {})
    assert f"{root / linked}: a symbolic link; {REFUSAL}" in str(err.value)
    assert list(elsewhere.rglob("*")) == []


class _LinksTheVersionAfterItsClaim:
    """Test double for a local attacker racing a registration: right after the claim is written, the
    version's folder is moved aside and a symlink to another folder is put in its place, so the
    listing before the claim saw nothing wrong."""

    def __init__(self, inner, elsewhere: Path):
        self.inner, self.location, self.elsewhere, self.done = inner, inner.location, elsewhere, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, **kw):
        etag = self.inner.put(key, data, **kw)
        if key.endswith("/_claim.json") and not self.done:
            self.done = True
            folder = self.inner.root / key.rsplit("/", 1)[0]
            os.rename(folder, folder.with_name("aside"))
            os.symlink(self.elsewhere, folder)
        return etag


def test_register_refuses_a_version_folder_linked_after_its_claim(tmp_path):
    root, elsewhere = tmp_path / "registry", tmp_path / "elsewhere"
    elsewhere.mkdir()
    reg = Registry(_LinksTheVersionAfterItsClaim(open_registry(root).storage, elsewhere))
    with pytest.raises(RegistryError) as err:
        reg.register(NAME, make_files(tmp_path / "src"), {})
    assert f"{root}/models/{NAME}/versions/1: a symbolic link; {REFUSAL}" in str(err.value)
    assert list(elsewhere.rglob("*")) == []


def test_a_linked_lock_folder_is_refused_and_nothing_is_created_through_it(tmp_path):
    root, elsewhere = tmp_path / "registry", tmp_path / "elsewhere"
    elsewhere.mkdir()
    reg = open_registry(root)
    version = reg.register(NAME, make_files(tmp_path / "src"), {})
    reg.promote(NAME, version, "champion")
    os.rename(root / ".locks", tmp_path / "old-locks")
    os.symlink(elsewhere, root / ".locks")
    with pytest.raises(RegistryError, match=f"{root}/.locks: a symbolic link; {REFUSAL}"):
        reg.promote(NAME, version, "champion")
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------------------- links: readers


def _registered(tmp_path: Path) -> tuple[Registry, Path, int]:
    root = tmp_path / "registry"
    reg = open_registry(root)
    version = reg.register(NAME, make_files(tmp_path / "src"), {})
    reg.promote(NAME, version, "champion")
    return reg, root, version


READ_PARTS = {
    "alias": f"models/{NAME}/aliases/champion.json",
    "manifest": f"models/{NAME}/versions/1/{MANIFEST}",
    "model-file": f"models/{NAME}/versions/1/model.keras",
}


@pytest.mark.parametrize("part", list(READ_PARTS))
def test_a_reader_refuses_a_linked_file_even_to_the_same_bytes(tmp_path, part):
    """The link leads to a copy with the very bytes it replaces: a reader that followed it would
    verify every sha256 and succeed."""
    reg, root, _ = _registered(tmp_path)
    planted = root / READ_PARTS[part]
    copy = tmp_path / "outside-copy"
    copy.write_bytes(planted.read_bytes())
    planted.unlink()
    os.symlink(copy, planted)
    expected = f"{planted}: a symbolic link; {REFUSAL}"
    for read in (
        lambda: reg.pull(f"{NAME}@champion", tmp_path / "pulled"),
        lambda: fetch_model(f"{NAME}@champion", reg, tmp_path / "cache"),
    ):
        with pytest.raises(RegistryError) as err:
            read()
        assert expected in str(err.value)
    assert not (tmp_path / "pulled").exists()
    assert not (tmp_path / "cache" / NAME / "1").exists()


def _promptly(call, fifo: Path, seconds: float = 10.0) -> BaseException | None:
    """Run `call` in a thread; the exception it raised, None if it returned. If it is still running
    after `seconds` (blocked opening the FIFO), unblock it by opening the FIFO's writing end, and fail."""
    outcome: list = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - returned to the test
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a blocked reader gets EOF
        except OSError:
            pass
        thread.join(10)
        pytest.fail(f"the reader blocked on the FIFO {fifo} for {seconds} s")
    return outcome[0]


@pytest.mark.parametrize("part", list(READ_PARTS))
def test_a_reader_errors_promptly_on_a_fifo(tmp_path, part):
    reg, root, _ = _registered(tmp_path)
    fifo = root / READ_PARTS[part]
    fifo.unlink()
    os.mkfifo(fifo)
    listing = (lambda: reg.aliases(NAME)) if part == "alias" else (lambda: reg.versions(NAME))
    for read in (lambda: reg.pull(f"{NAME}@champion", tmp_path / "pulled"), listing):
        err = _promptly(read, fifo)
        assert isinstance(err, RegistryError), err
        assert f"{fifo}: a FIFO (named pipe); {REFUSAL}" in str(err)
    assert not (tmp_path / "pulled").exists()


# ------------------------------------------------------------------------------- umask


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_files_and_folders_follow_the_umask(tmp_path, mask, file_mode, folder_mode):
    old = os.umask(mask)
    try:
        reg, root, version = _registered(tmp_path)
        pulled = reg.pull(f"{NAME}:{version}", tmp_path / "pulled")
        cached = fetch_model(f"{NAME}:{version}", reg, tmp_path / "cache")
    finally:
        os.umask(old)
    for top in (root, pulled, cached):
        for path in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode == (folder_mode if path.is_dir() else file_mode), f"{path}: {oct(mode)}"


# ------------------------------------------------------------------------------- pull temp names


def _entry(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@pytest.mark.parametrize(
    "contents",
    [
        {".part-1": b"first file", "b": b"second file"},  # b came down to .part-1, over the first
        {".part-0": b"zero", ".part-1": b"one", "b": b"bee", ".part-2/c": b"sea"},
    ],
    ids=["issue", "more"],
)
def test_a_pull_gets_a_file_named_like_a_temporary_one(location, tmp_path, contents):
    reg = open_registry(location)
    base = f"models/{NAME}/versions/1/"
    for name, data in contents.items():
        reg.storage.put(base + name, data)
    manifest = {"name": NAME, "version": 1, "files": {n: _entry(d) for n, d in contents.items()}}
    reg.storage.put(base + MANIFEST, json.dumps(manifest).encode())
    dest = reg.pull(f"{NAME}:1", tmp_path / "pulled")
    got = {k: v for k, v in _tree(dest).items() if k != MANIFEST}
    assert got == contents


def test_no_manifest_can_list_a_pull_temporary_name():
    from resnet_pipeline.registry.pull import part_name

    for index in (0, 1, 99999):
        with pytest.raises(RegistryError):
            check_file_name(part_name(index), "manifest")


# ------------------------------------------------------------------------------- gc against a commit


class _GcAt:
    """Test double for an interleaving: the first time the registration calls `method` on a key
    ending with `suffix`, `registry gc` (a day ahead, no minimum age: everything uncommitted is fair
    game) runs first, in another Registry on the same store; then the call goes on."""

    def __init__(self, inner, method: str, suffix: str):
        self.inner, self.location, self.method, self.suffix = inner, inner.location, method, suffix
        self.removed: list | None = None

    def __getattr__(self, name):
        real = getattr(self.inner, name)
        if name != self.method:
            return real

        def hooked(key, *args, **kwargs):
            if key.endswith(self.suffix) and self.removed is None:
                later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
                self.removed = Registry(self.inner).gc(NAME, older_than=0, now=later)
            return real(key, *args, **kwargs)

        return hooked


def _listed_versions_are_complete(reg: Registry) -> None:
    for version in reg.versions(NAME):
        for file, entry in reg.manifest(f"{NAME}:{version}")["files"].items():
            info = reg.storage.head(f"models/{NAME}/versions/{version}/{file}")
            assert info is not None and info.size == entry["bytes"], (version, file)


def test_gc_between_the_last_check_and_the_commit_never_leaves_a_version_with_missing_files(location, tmp_path):
    """gc runs at the commit point itself: after every check of the registration, just before its
    manifest.json is written."""
    inner = open_registry(location).storage
    spy = _GcAt(inner, "put", "/" + MANIFEST)
    files = make_files(tmp_path / "src")
    version = Registry(spy).register(NAME, files, {})
    assert spy.removed == []  # the claim was sealed for the commit: gc kept off the version
    reg = open_registry(location)
    _listed_versions_are_complete(reg)
    assert reg.versions(NAME) == [version]
    pulled = reg.pull(f"{NAME}:{version}", tmp_path / "pulled")
    assert (pulled / "model.keras").read_bytes() == files["model.keras"].read_bytes()


def test_gc_while_the_registration_checks_its_claim_wins_and_nothing_is_committed(location, tmp_path):
    """gc runs when the registration reads its claim back before the commit."""
    spy = _GcAt(open_registry(location).storage, "get", "/_claim.json")
    with pytest.raises(RegistryError, match="no longer holds its claim"):
        Registry(spy).register(NAME, make_files(tmp_path / "src"), {})
    assert spy.removed is not None and [r["version"] for r in spy.removed] == [1]
    reg = open_registry(location)
    assert reg.versions(NAME) == []
    _listed_versions_are_complete(reg)


class _DiesAtTheCommit:
    """Test double for a registration killed between its seal and its manifest: the manifest PUT
    raises instead of reaching the store."""

    def __init__(self, inner):
        self.inner, self.location = inner, inner.location

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, **kw):
        if key.endswith("/" + MANIFEST):
            raise RegistryError(f"{key}: connection lost (test double)")
        return self.inner.put(key, data, **kw)


def test_gc_keeps_a_sealed_version_and_a_retry_of_its_registration_finishes_it(location, tmp_path, caplog):
    files = make_files(tmp_path / "src")
    token = "sealed-then-killed"
    with pytest.raises(RegistryError, match="connection lost"):
        Registry(_DiesAtTheCommit(open_registry(location).storage)).register(NAME, files, {}, token=token)
    reg = open_registry(location)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert reg.gc(NAME, older_than=0, now=later) == []
    assert "is being committed" in caplog.text and token in caplog.text
    assert reg.versions(NAME) == []
    assert reg.register(NAME, files, {}, token=token) == 1
    _listed_versions_are_complete(reg)
    reg.pull(f"{NAME}:1", tmp_path / "pulled")
