"""DVC's record of a run: the stages in `dvc.lock`, their outputs in the DVC cache and remote.

    root = project_root(paths)            # None (logged once) outside a DVC project
    record_stage(root, "split", cfg)      # what `dvc repro` writes after running split
    published = publish(root, cfg)        # before a version is registered: dvc.lock checked, outputs pushed

`dvc repro` records each stage it runs in `dvc.lock`; the Prefect flow runs the same stage
functions and records each of them through DVC's own API (`record_stage`: DVC hashes the deps and
outputs, copies the outputs into its cache and writes the lock), so that after either door
`dvc status` is clean and the other reuses what was made.

The params a stage ran with are what DVC records for it. DVC reads them from params.yaml; a flow
run with overrides (`--set`, a deployment's `overrides`, another params file) ran with other
values, and those are recorded instead, only for the keys that differ: the lock tells what made the
outputs, and `dvc status` lists those keys as changed until params.yaml says the same (`dvc repro`
would then rerun the stage with params.yaml's values, as it should).

Before a version is registered (the register stage, whichever door ran it), `publish` checks that
dvc.lock records the files in the workspace for every stage before register, and pushes their
outputs to the default DVC remote (or the remote of RESNET_PIPELINE_DVC_REMOTE), so that no
version points at bytes nobody has. DVC is imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.paths import Paths
from resnet_pipeline.redact import redact_url, redact_values

log = logging.getLogger(__name__)

LOCK = "dvc.lock"
PARAMS_FILE = "params.yaml"
STAGES = ("download", "split", "shard", "train", "evaluate", "register")
PUBLISHED = STAGES[:-1]  # what a version is made of: every stage before register
REMOTE_ENV = "RESNET_PIPELINE_DVC_REMOTE"  # a remote URL for every push (deployments set it)
ENV_REMOTE = "pipeline"  # its name in .dvc/config.local
REMOTE_KEYS = ("url", "endpointurl", "region")  # what a version records of its remote: never credentials


class DvcStateError(RuntimeError):
    """dvc.lock does not record the workspace, or a push failed."""


def project_root(paths: Paths) -> Path | None:
    """`paths.root` (resolved) if it is a DVC project whose dvc.yaml writes where `paths` do; None
    otherwise, with one log line saying why (the stages run the same; dvc.lock is not written and
    nothing is pushed)."""
    root = paths.root.resolve()
    why = None
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        why = f"{root} is not a DVC project (no .dvc/ and dvc.yaml)"
    elif paths.data.resolve() != root / "data" or paths.artifacts.resolve() != root / "artifacts":
        why = (
            f"base.data_dir / base.artifacts_dir put the outputs in {paths.data} and {paths.artifacts}, "
            "not where dvc.yaml has them (data/, artifacts/)"
        )
    if why is None:
        return root
    if (root, why) not in _SAID:  # once per process: a flow asks again before register
        _SAID.add((root, why))
        log.info("dvc: %s: no dvc.lock written, nothing pushed", why)
    return None


_SAID: set[tuple[Path, str]] = set()


@contextlib.contextmanager
def open_repo(root: str | Path) -> Iterator[Any]:
    """DVC's `Repo` of `root`, closed at the end."""
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        yield repo
    finally:
        repo.close()


def target(repo, name: str) -> str:
    """DVC's address of stage `name` of `repo`: absolute, since DVC resolves a relative one against
    the current folder, which need not be the project's."""
    return f"{Path(repo.root_dir) / 'dvc.yaml'}:{name}"


def stage_of(repo, name: str):
    (stage,) = repo.stage.collect(target(repo, name))
    return stage


def _params_deps(stage) -> list:
    from dvc.dependency.param import ParamsDependency

    return [d for d in stage.deps if isinstance(d, ParamsDependency) and d.def_path == PARAMS_FILE]


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def run_params(read: dict[str, Any], run: dict, in_file: dict | None) -> tuple[dict[str, Any], list[str]]:
    """What dvc.lock records for a stage's params, and the dotted keys where it differs from params.yaml.

    `read` is DVC's reading of params.yaml for the stage (`{entry: value}`, an entry a key or a
    whole group); `run` the config the stage ran with, `in_file` params.yaml's own config (both as
    `Config.to_dict()`, URLs redacted; None if params.yaml does not load). An entry keeps DVC's
    value unless the run's differs: a group then gets the run's value of each key that differs."""
    out, differ = dict(read), []
    for entry, value in read.items():
        mine, theirs = _get(run, entry), _get(in_file, entry) if in_file is not None else None
        if in_file is not None and mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(value, dict):
            keys = [k for k, v in mine.items() if not isinstance(theirs, dict) or theirs.get(k) != v]
            out[entry] = {**value, **{k: mine[k] for k in keys}}
            differ += [f"{entry}.{k}" for k in keys]
        elif mine != value:
            out[entry] = mine
            differ.append(entry)
    return out, differ


def _file_config(root: Path) -> dict | None:
    try:
        return redact_values(config_mod.load(root / PARAMS_FILE).to_dict())
    except config_mod.ConfigError as err:
        log.warning("dvc: %s does not load (%s): recording this run's values for every param", PARAMS_FILE, err)
        return None


def record_stage(root: str | Path, name: str, cfg: Config | None) -> None:
    """Record stage `name` of the DVC project `root` in dvc.lock, as `dvc repro` does after running it:
    DVC hashes its deps and outputs and copies the outputs into its cache. Its params are the values
    it ran with (`cfg`; see the module doc), or params.yaml's as DVC reads them if `cfg` is None.
    Raises DVC's error if an output is missing."""
    from dvc.repo import lock_repo

    root = Path(root)
    started = time.monotonic()
    with open_repo(root) as repo, lock_repo(repo):
        stage = stage_of(repo, name)
        stage.save_deps()
        run: dict = redact_values(cfg.to_dict()) if cfg is not None else {}
        in_file = None
        for dep in _params_deps(stage) if cfg is not None else []:
            in_file = in_file if in_file is not None else _file_config(root)
            values, differ = run_params(dep.hash_info.value or {}, run, in_file)
            if differ:
                dep.fill_values(values)
                log.info(
                    "dvc: %s recorded with this run's %s, not params.yaml's (an override): `dvc status` lists "
                    "them until params.yaml says the same",
                    name,
                    ", ".join(differ),
                )
        stage.save_outs()
        stage.commit()
        stage.dump(update_pipeline=False)
    log.info("dvc: %s recorded in %s (%.1f s)", name, root / LOCK, time.monotonic() - started)


def stale_stages(repo, names: tuple[str, ...] = PUBLISHED) -> dict[str, list]:
    """`{stage: what DVC reports}` for the stages whose files (deps, outputs) dvc.lock does not
    record as they are in the workspace; params are left out (a run with overrides records its own)."""
    from dvc.repo import lock_repo

    stale = {}
    for name in names:
        stage = stage_of(repo, name)
        params = {str(d) for d in _params_deps(stage)}
        report = []
        with lock_repo(repo):
            status = stage.status().get(stage.addressing, [])
        for entry in status:
            if isinstance(entry, dict) and "changed deps" in entry:
                deps = {k: v for k, v in entry["changed deps"].items() if k not in params}
                if deps:
                    report.append({"changed deps": deps})
            else:
                report.append(entry)
        if report:
            stale[name] = report
    return stale


def describe(report: list, most: int = 4) -> str:
    """One line of DVC's status of a stage: `data/raw modified, model.keras deleted, ...`."""
    items = [
        f"{path} {state if isinstance(state, str) else 'modified'}"
        for entry in report
        for changes in (entry.values() if isinstance(entry, dict) else [{entry: ""}])
        for path, state in changes.items()
    ]
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def stale_in_lock(root: str | Path, name: str) -> list | None:
    """What DVC reports changed in the files of stage `name` when dvc.lock records it; None when it
    is up to date there or not recorded. A flow reruns a cached data stage that DVC sees changed:
    stage keys hash the keys of the stages upstream, DVC their outputs, so only DVC sees an output
    that changed while its inputs did not (a source now serving other bytes, `dvc repro -f download`,
    a file edited by hand)."""
    with open_repo(root) as repo:
        stage = stage_of(repo, name)
        if not any(out.hash_info for out in stage.outs):  # not in dvc.lock (a fresh clone)
            return None
        return stale_stages(repo, (name,)).get(name)


def current_in_lock(root: str | Path, name: str, cfg: Config) -> bool:
    """Whether `dvc repro` would skip stage `name` for a run with `cfg`: dvc.lock records it, its
    deps and outputs are as recorded, and the params it recorded are this run's values (not
    params.yaml's: a run with overrides records its own)."""
    run = redact_values(cfg.to_dict())
    with open_repo(root) as repo:
        stage = stage_of(repo, name)
        if not stage.outs or not all(out.hash_info for out in stage.outs):  # not in dvc.lock
            return False
        for dep in _params_deps(stage):
            recorded = dep.hash_info.value or {}
            if not recorded or any(_get(run, entry) != value for entry, value in recorded.items()):
                return False
        return not stale_stages(repo, (name,))


def _env_remote(repo) -> str | None:
    """The remote of RESNET_PIPELINE_DVC_REMOTE, added to .dvc/config.local as `pipeline` and made
    the default there (so `dvc push`/`dvc pull` by hand in the folder use it too); None if unset."""
    url = os.environ.get(REMOTE_ENV, "").strip()
    if url.startswith("{{"):  # a deployment created without the variable: prefect.yaml's placeholder
        log.warning(
            "dvc: %s is %r (unset when the deployment was created): using the project's remote", REMOTE_ENV, url
        )
        return None
    if not url:
        return None
    remotes = repo.config["remote"]
    if remotes.get(ENV_REMOTE, {}).get("url") != url or repo.config["core"].get("remote") != ENV_REMOTE:
        with repo.config.edit("local") as conf:
            conf["remote"].setdefault(ENV_REMOTE, {})["url"] = url
            conf["core"]["remote"] = ENV_REMOTE
        log.info("dvc: remote %r is %s (%s), the default in .dvc/config.local", ENV_REMOTE, redact_url(url), REMOTE_ENV)
    return ENV_REMOTE


def default_remote(repo) -> dict | None:
    """`{"name", "url", ...}` of the remote a push goes to (RESNET_PIPELINE_DVC_REMOTE, else the
    default remote), without credentials; None without one."""
    name = _env_remote(repo) or repo.config["core"].get("remote")
    if not name:
        return None
    conf = repo.config["remote"].get(name) or {}
    return {"name": name, **{k: redact_url(str(conf[k])) for k in REMOTE_KEYS if conf.get(k)}}


def push(repo, remote: dict, names: tuple[str, ...] | list[str]) -> int:
    """`dvc push` of the outputs of stages `names` to `remote` (of `default_remote`); the files sent
    (DVC sends only what the remote lacks). A failure raises DvcStateError naming the remote."""
    started = time.monotonic()
    try:
        pushed = repo.push(targets=[target(repo, s) for s in names], remote=remote["name"])
    except Exception as err:  # DVC's UploadError, or the remote's own (no bucket, no access)
        raise DvcStateError(
            f"dvc push to {remote['name']} ({remote.get('url')}) failed: {redact_url(str(err))}"
        ) from err
    log.info(
        "dvc: pushed %d files of %s to %s (%s) in %.1f s",
        pushed,
        ", ".join(names),
        remote["name"],
        remote.get("url"),
        time.monotonic() - started,
    )
    return pushed


def publish(root: str | Path, cfg: Config) -> dict:
    """Before a version is registered: check that dvc.lock records the workspace for every stage before
    register, push their outputs (without data/raw if `dvc.push_raw` is false) to the remote, and
    return what the version records (`remote`, `pushed` files, `raw`, and `lock`: a copy of dvc.lock,
    URLs redacted, in a new temporary folder the caller removes)."""
    root = Path(root)
    with open_repo(root) as repo:
        stale = stale_stages(repo)
        if stale:
            raise DvcStateError(
                f"{root / LOCK} does not record the outputs in the workspace: "
                + "; ".join(f"{stage}: {describe(report)}" for stage, report in stale.items())
                + ". A version carries dvc.lock: record them first (`dvc commit STAGE`, or run `dvc repro` "
                "or the flow)"
            )
        remote = default_remote(repo)
        pushed, raw = 0, cfg.dvc.push and cfg.dvc.push_raw
        if remote is None:
            log.warning("dvc: no default DVC remote: the data and model of this version stay in %s/.dvc/cache", root)
        elif not cfg.dvc.push:
            log.warning(
                "dvc: dvc.push is false: nothing pushed to %s; this version points at bytes no remote has", remote
            )
        else:
            try:
                pushed = push(repo, remote, [s for s in PUBLISHED if raw or s != "download"])
            except DvcStateError as err:
                raise DvcStateError(f"{err}; nothing registered") from err.__cause__
    return {"lock": _lock_copy(root / LOCK), "remote": remote, "pushed": pushed, "raw": raw}


def _lock_copy(lock: Path) -> Path:
    """dvc.lock as a version stores it: the same bytes, unless a value in it holds a URL's secret
    (a signed download.url in params.yaml), then with it redacted, as the version's params.yaml is."""
    folder = Path(tempfile.mkdtemp(prefix="dvc-lock-"))
    copy = folder / LOCK
    data = yaml.safe_load(lock.read_text())
    clean = redact_values(data)
    if clean == data:
        shutil.copyfile(lock, copy)
    else:
        copy.write_text(yaml.safe_dump(clean, sort_keys=False))
    return copy
