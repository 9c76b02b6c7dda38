"""Stage keys: what `dvc repro` compares for a stage, as one hash, and that hash recorded in the
stage's own output.

The key of a stage hashes the params `dvc.yaml` lists for it (with their values), the code files and
folders it lists as deps, and, for a dep that another stage writes, that stage's key. A `dvc repro`
and a Prefect flow run of the same inputs compute the same keys.

Each data stage records the key of the inputs that made it inside its output:

- download: `data/raw/<dataset>/.complete` (`stage_key`, `params`);
- split: the schema metadata of `data/manifest.parquet` (`resnet_pipeline.stage`: key, params and
  the sha256 of the `labels.json` written with it);
- shard: `data/shards/index.json` (`stage_key`, `params`).

An output is *current* for a config when it carries that config's key. A cached flow task is used
only then; train and evaluate refuse data that carries another key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from resnet_pipeline.config import Config
from resnet_pipeline.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from resnet_pipeline.paths import Paths
from resnet_pipeline.redact import redact_values

log = logging.getLogger(__name__)

DATA_STAGES = ("download", "split", "shard")
PARQUET_KEY = b"resnet_pipeline.stage"
PACKAGE_PROJECT = Path(__file__).resolve().parents[1]


class StaleDataError(RuntimeError):
    """The data on disk was made from other inputs than the config's."""


def project_dir(root: str | Path = ".") -> Path:
    """The folder whose `dvc.yaml` and code the keys hash: `root` if it has a dvc.yaml, else the
    checkout this package was imported from."""
    root = Path(root)
    for candidate in (root, PACKAGE_PROJECT):
        if (candidate / "dvc.yaml").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"{root / 'dvc.yaml'}: not found (nor next to the package in {PACKAGE_PROJECT}); "
        "stage keys are computed from dvc.yaml"
    )


@lru_cache(maxsize=8)
def _dvc_stages(dvc_yaml: str, mtime_ns: int) -> dict:
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages")
    if not isinstance(stages, dict):
        raise ValueError(f"{dvc_yaml}: expected a `stages:` mapping")
    return stages


def dvc_stages(project: Path) -> dict:
    path = project / "dvc.yaml"
    return _dvc_stages(str(path), path.stat().st_mtime_ns)


def _name(entry: str | dict) -> str:
    """A dvc.yaml list entry: `path` or `{path: {options}}`."""
    return entry if isinstance(entry, str) else next(iter(entry))


def _param_value(params: dict, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def tree_sha256(path: Path) -> str:
    """sha256 over the relative names and bytes of a file or of every file of a folder."""
    h = hashlib.sha256()
    files = (
        [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    )
    for f in files:
        h.update(f.relative_to(path.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stage_params(stage: str, cfg: Config, project: Path) -> dict[str, Any]:
    """`{dotted name: value}` of the params dvc.yaml lists for `stage` (a group name gives the group),
    URLs redacted: these are written into outputs and records (a presigned URL's signature changes
    with every signing, while the archive it names is pinned by its checksum)."""
    params = cfg.to_dict()
    return redact_values(
        {_name(item): _param_value(params, _name(item)) for item in dvc_stages(project)[stage].get("params", [])}
    )


def stage_key(stage: str, cfg: Config, root: str | Path = ".") -> str:
    """What `dvc repro` would compare for `stage`: its params, its code deps and, for a dep that is
    another stage's output, that stage's key."""
    project = project_dir(root)
    stages = dvc_stages(project)
    if stage not in stages:
        raise KeyError(f"{project / 'dvc.yaml'}: no stage {stage!r}")
    producers = {_name(out): name for name, spec in stages.items() for out in spec.get("outs", [])}
    h = hashlib.sha256(stage.encode())
    for name, value in stage_params(stage, cfg, project).items():
        h.update(json.dumps([name, value], sort_keys=True, default=str).encode())
    for dep in map(_name, stages[stage].get("deps", [])):
        if dep in producers:
            h.update(stage_key(producers[dep], cfg, project).encode())
        else:
            h.update(tree_sha256(project / dep).encode())
    return f"{stage}-{h.hexdigest()}"


# --------------------------------------------------------------------------- keys inside outputs


def _complete_marker(cfg: Config, paths: Paths) -> Path:
    return paths.raw / cfg.download.dataset / ".complete"


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recorded(stage: str, cfg: Config, paths: Paths) -> dict | None:
    """`{"key", "params"}` recorded in the output of `stage` on disk; None if absent or unreadable."""
    if stage == "download":
        record = _read_json_file(_complete_marker(cfg, paths))
        record = {"key": record.get("stage_key"), "params": record.get("params")} if isinstance(record, dict) else None
    elif stage == "split":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(paths.manifest).metadata or {}
            record = json.loads(meta[PARQUET_KEY])
        except (OSError, ValueError, KeyError):
            return None
        if (
            not isinstance(record, dict)
            or not paths.labels.is_file()
            or record.get("labels_sha256") != sha256_file(paths.labels)
        ):
            return None  # labels.json is not the one written with this manifest
    elif stage == "shard":
        record = _read_json_file(paths.shards / "index.json")
        record = {"key": record.get("stage_key"), "params": record.get("params")} if isinstance(record, dict) else None
    else:
        raise KeyError(f"no recorded key for stage {stage!r}; data stages: {DATA_STAGES}")
    return record if record and isinstance(record.get("key"), str) else None


def is_current(stage: str, cfg: Config, paths: Paths) -> bool:
    """Does the output of `stage` on disk carry the key of `cfg`'s inputs?"""
    found = recorded(stage, cfg, paths)
    return found is not None and found["key"] == stage_key(stage, cfg, paths.root)


def record_key(stage: str, cfg: Config, paths: Paths, index: dict | None = None) -> str:
    """Write `stage`'s key (and params) into its output on disk, which that stage just wrote; return
    the key. For shard, `index` (the index about to be written, or None to read it) gets the fields."""
    project = project_dir(paths.root)
    key, params = stage_key(stage, cfg, project), stage_params(stage, cfg, project)
    if stage == "download":
        marker = _complete_marker(cfg, paths)
        atomic_write_json(marker, {**(_read_json_file(marker) or {}), "stage_key": key, "params": params})
    elif stage == "split":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(paths.manifest)
        meta = {
            **(table.schema.metadata or {}),
            PARQUET_KEY: json.dumps(
                {"key": key, "params": params, "labels_sha256": sha256_file(paths.labels)}, sort_keys=True
            ).encode(),
        }
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd")
        atomic_write_bytes(paths.manifest, sink.getvalue().to_pybytes())
    elif stage == "shard":
        target = index if index is not None else _read_json_file(paths.shards / "index.json")
        target.update(stage_key=key, params=params)
        if index is None:
            atomic_write_json(paths.shards / "index.json", target)
    else:
        raise KeyError(f"no recorded key for stage {stage!r}; data stages: {DATA_STAGES}")
    log.info("%s: outputs carry key %s", stage, key[:24])
    return key


def require_current(stages: tuple[str, ...], cfg: Config, paths: Paths) -> dict[str, str]:
    """The keys recorded in these stages' outputs, after checking they are `cfg`'s; a StaleDataError
    names the output made from other inputs. Outputs without a key (older runs) are warned about."""
    found = {}
    for stage in stages:
        record, expected = recorded(stage, cfg, paths), stage_key(stage, cfg, paths.root)
        where = {
            "download": _complete_marker(cfg, paths),
            "split": paths.manifest,
            "shard": paths.shards / "index.json",
        }[stage]
        if record is None:
            log.warning("%s: %s carries no stage key; cannot check it was made from these params", stage, where)
            continue
        if record["key"] != expected:
            raise StaleDataError(
                f"{where}: made by {stage} with key {record['key'][:24]}..., but these params and "
                f"code give {expected[:24]}...: another run wrote it; run the {stage} stage "
                f"again (dvc repro, or the flow)"
            )
        found[stage] = record["key"]
    return found
