"""`resnet-pipeline registry restore SPEC DIR`: a registered version back as a project folder, byte for byte.

    restore(registry, "resnet-digits@champion", "restored/")           # from the current repository
    restore(registry, "resnet-digits:3", "restored/", repo="https://git.example.com/ml/resnet-pipeline.git")

DIR becomes a git checkout of the project at the commit the version records, with the version's
`dvc.lock` and params, and the data and model pulled from the DVC remote the version was pushed to
(recorded in its manifest; `remote` gives another URL), then checked: the manifest and the shard
index against the sha256 the version records, every shard against the index, every raw image
against the manifest, the model files against the registry's. The register stage is recorded in
DIR's dvc.lock as having made this version (`artifacts/registered.json` names it), so `dvc status`
in DIR is clean and `dvc repro` there reruns nothing.

Everything happens in a new folder beside DIR that takes DIR's name only at the end: a commit not
in the repository, an object missing from the remote or a checksum that differs fails, naming it
and the version, and leaves no DIR. A version pushed with `dvc.push_raw: false` comes back without
`data/raw`: `dvc status` then lists the download stage, and `dvc repro` would download again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from resnet_pipeline.dvcrecord import LOCK, PUBLISHED, open_repo, record_stage, stage_of, target
from resnet_pipeline.fileio import atomic_write_json, current_umask, sha256_file
from resnet_pipeline.redact import redact_url
from resnet_pipeline.registry import Registry, Spec

log = logging.getLogger(__name__)

MODEL_FILES = {  # version file -> where the pipeline keeps it (saved_model/... below the model folder)
    "model.keras": "artifacts/model/model.keras",
    "labels.json": "artifacts/model/labels.json",
    "metrics.json": "artifacts/eval/metrics.json",
    "predictions.parquet": "artifacts/eval/predictions.parquet",
}
RESTORE_REMOTE = "restore"  # the remote's name in DIR when the version names none


class RestoreError(RuntimeError):
    """A version that cannot be restored, or a restore that found other bytes than it recorded."""


def _git(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def current_repository(cwd: str | Path = ".") -> str:
    """The top folder of the git repository around `cwd` (what `--repo` defaults to)."""
    proc = _git(["rev-parse", "--show-toplevel"], Path(cwd))
    if proc.returncode != 0:
        raise RestoreError(
            f"{Path(cwd).resolve()}: not in a git repository; pass --repo URL of the project's repository"
        )
    return proc.stdout.strip()


def _checkout(source: str, commit: str, folder: Path, what: str) -> None:
    clone = _git(["clone", "-q", "--no-checkout", source, str(folder)])
    if clone.returncode != 0:
        raise RestoreError(f"{what}: git clone of {redact_url(source)} failed: {clone.stderr.strip()[-500:]}")
    checkout = _git(["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", commit], folder)
    if checkout.returncode != 0:
        raise RestoreError(
            f"{what}: commit {commit} is not in {redact_url(source)} ({checkout.stderr.strip()[-300:]}); "
            "pass --repo URL of the repository the version was made from"
        )


def _set(tree: dict, dotted: str, value: Any) -> None:
    *groups, last = dotted.split(".")
    for group in groups:
        tree = tree.setdefault(group, {})
    tree[last] = value


def params_for(version_params: dict, lock: dict) -> dict:
    """DIR's params.yaml: the version's, with the values dvc.lock records for the stages before
    register (the same values, as DVC reads them, so that `dvc status` compares equal)."""
    params = yaml.safe_load(yaml.safe_dump(version_params))  # a deep copy
    for name in PUBLISHED:
        recorded = ((lock.get("stages") or {}).get(name) or {}).get("params") or {}
        for dotted, value in (recorded.get("params.yaml") or {}).items():
            _set(params, dotted, value)
    return params


def _use_remote(folder: Path, recorded: dict | None, url: str | None, what: str) -> str:
    """The name of the remote to pull from in `folder`: the version's (or `url`), written to
    .dvc/config.local unless the checkout's own config already has it."""
    recorded = dict(recorded or {})
    if url:
        recorded = {"name": recorded.get("name") or RESTORE_REMOTE, "url": url}
    if not recorded.get("url"):
        raise RestoreError(f"{what}: the version records no DVC remote; pass --remote URL of the one it was pushed to")
    name = recorded["name"]
    with open_repo(folder) as repo:
        have = repo.config["remote"].get(name) or {}
        if have.get("url") == recorded["url"] and repo.config["core"].get("remote") == name:
            return name
        with repo.config.edit("local") as conf:
            conf["remote"][name] = {k: v for k, v in recorded.items() if k != "name"}
            conf["core"]["remote"] = name
    return name


def _listing(repo, remote: str, oid: str) -> list[dict] | None:
    """The entries (`relpath`, `md5`) of a folder's `.dir` listing, from the local cache or else the
    remote; None if neither has it."""
    path = repo.cache.local.oid_to_path(oid)
    if os.path.exists(path):
        return json.loads(Path(path).read_text())
    odb = repo.cloud.get_remote_odb(remote)
    try:
        with odb.fs.open(odb.oid_to_path(oid), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _not_fetched(repo, names: list[str], remote: str) -> list[str]:
    """After a pull that failed: the outputs' files (`path (md5 ...)`) of stages `names` that the local
    cache does not hold, so the remote did not have them. (DVC's `status -c` cannot say: it takes a
    folder as pushed when the remote has its `.dir` listing.)"""
    cache = repo.cache.local
    missing = []
    for name in names:
        for out in stage_of(repo, name).outs:
            oid = out.hash_info.value if out.use_cache else None
            if not oid:
                continue
            entries = _listing(repo, remote, oid) if out.hash_info.isdir else None
            if not out.hash_info.isdir:
                files = [(out.def_path, oid)]
            elif entries is None:
                files = [(f"{out.def_path}/ (its listing)", oid)]
            else:
                files = [(f"{out.def_path}/{e['relpath']}", e["md5"]) for e in entries]
            missing += [f"{path} (md5 {md5})" for path, md5 in files if not os.path.exists(cache.oid_to_path(md5))]
    return missing


def _pull(repo, names: list[str], remote: str, what: str) -> None:
    """`dvc pull` of the outputs of stages `names`; a file the remote lacks fails, naming it."""
    from dvc.exceptions import DvcException

    try:
        repo.pull(targets=[target(repo, s) for s in names], remote=remote)
    except DvcException as err:
        missing = _not_fetched(repo, names, remote)
        if not missing:
            raise
        url = redact_url(str(repo.config["remote"][remote].get("url")))
        raise RestoreError(
            f"{what}: not in the DVC remote {remote!r} ({url}): {', '.join(missing[:10])}"
            f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}; nothing restored"
        ) from err


def _verify(folder: Path, manifest: dict, what: str, raw: bool) -> int:
    """Check the pulled files against the version; the number of files checked."""
    import pyarrow.parquet as pq

    from resnet_pipeline.data.contracts import SPLITS, ContractError, check_index
    from resnet_pipeline.fileio import read_json

    def expect(path: str, sha256: str | None, source: str) -> None:
        actual = sha256_file(folder / path) if (folder / path).is_file() else "absent"
        if actual != sha256:
            raise RestoreError(f"{what}: {path} is {actual}, but {source} records {sha256}")

    data = manifest.get("data") or {}
    expect("data/manifest.parquet", data.get("manifest_sha256"), "the version")
    expect("data/shards/index.json", data.get("shards_index_sha256"), "the version")
    checked = 2
    index = read_json(folder / "data/shards/index.json", "shard index")
    for split in SPLITS:
        try:
            checked += len(check_index(index, folder / "data/shards", split))
        except ContractError as err:
            raise RestoreError(f"{what}: {err}") from None
    for name, entry in manifest["files"].items():
        target = MODEL_FILES.get(name) or (f"artifacts/model/{name}" if name.startswith("saved_model/") else None)
        if target is not None:
            expect(target, entry["sha256"], "the registry")
            checked += 1
    if raw:
        for row in pq.read_table(folder / "data/manifest.parquet", columns=["path", "sha256"]).to_pylist():
            expect(f"data/raw/{row['path']}", row["sha256"], "data/manifest.parquet")
            checked += 1
    return checked


def _unexpected(status: dict, raw: bool) -> dict:
    """DVC's status of DIR, without what a version pushed without data/raw leaves (the download
    stage's output, and split's and shard's dependency on it, are absent)."""
    if raw:
        return status
    out = {}
    for stage, report in status.items():
        if stage.rsplit(":", 1)[-1] == "download":  # DVC names it relative to the current folder
            continue
        rest = [
            e
            for e in report
            if not (isinstance(e, dict) and set(e.get("changed deps", {"": 0})) == {"data/raw"} and len(e) == 1)
        ]
        if rest:
            out[stage] = rest
    return out


def _registered_record(reg: Registry, manifest: dict) -> dict:
    """artifacts/registered.json of DIR: the register stage's record, naming the restored version."""
    return {
        "name": manifest["name"],
        "version": manifest["version"],
        "registry": redact_url(reg.location),
        "metrics": manifest.get("metrics"),
        "gate": manifest.get("gate"),
        "restored": True,
    }


def restore(reg: Registry, spec: str, dest: str | Path, *, repo: str | None = None, remote: str | None = None) -> dict:
    """Restore the version `spec` of `reg` into `dest` (absent or an empty folder); see the module doc.
    Returns `{"name", "version", "commit", "remote", "checked"}`."""
    name, version = reg.resolve(spec)
    what = f"model {name}:{version}"
    manifest = reg.manifest(Spec(name, version=version))
    if LOCK not in manifest["files"]:
        raise RestoreError(
            f"{what}: the version has no {LOCK} (registered outside a DVC project, or before versions carried "
            "one): its data cannot be restored"
        )
    commit = manifest.get("git_commit")
    if not commit:
        raise RestoreError(f"{what}: the version records no git commit (registered outside a git repository)")
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise RestoreError(f"{dest}: exists and is not an empty folder; refusing to restore {what} into it")
    source = repo or current_repository()
    dvc = manifest.get("dvc") or {}
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.restore-"))
    try:
        _checkout(source, commit, folder, what)
        exact = Spec(name, version=version)
        reg.fetch_file(exact, LOCK, folder / LOCK)
        reg.fetch_file(exact, "params.yaml", folder / ".version-params.yaml")
        lock = yaml.safe_load((folder / LOCK).read_text())
        version_params = yaml.safe_load((folder / ".version-params.yaml").read_text())
        (folder / ".version-params.yaml").unlink()
        (folder / "params.yaml").write_text(
            f"# the params of {name}:{version}, restored by `resnet-pipeline registry restore`\n"
            + yaml.safe_dump(params_for(version_params, lock), sort_keys=False)
        )
        raw = dvc.get("raw", True)
        remote_name = _use_remote(folder, dvc.get("remote"), remote, what)
        with open_repo(folder) as dvc_repo:
            names = [s for s in PUBLISHED if raw or s != "download"]
            _pull(dvc_repo, names, remote_name, what)
        checked = _verify(folder, manifest, what, raw)
        atomic_write_json(folder / "artifacts/registered.json", _registered_record(reg, manifest))
        record_stage(folder, "register", None)  # DIR's register stage made this version, with these params
        with open_repo(folder) as dvc_repo:
            status = _unexpected(dvc_repo.status(), raw)
        if status:
            raise RestoreError(f"{what}: `dvc status` in the restored folder is not clean: {status}")
        os.chmod(folder, 0o777 & ~current_umask())  # mkdtemp makes 0700
        if dest.exists():
            dest.rmdir()
        os.rename(folder, dest)
    except BaseException as err:
        shutil.rmtree(folder, ignore_errors=True)
        from dvc.exceptions import DvcException

        if isinstance(err, DvcException):
            raise RestoreError(f"{what}: {redact_url(str(err))}; nothing restored") from err
        raise
    log.info("restore: %s at commit %s into %s (%d files checked)", what, commit[:12], dest, checked)
    return {"name": name, "version": version, "commit": commit, "remote": remote_name, "checked": checked}
