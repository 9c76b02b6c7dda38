"""The whole pipeline as a Prefect 3 flow: the same stage functions as `dvc repro`, as tasks.

    python flows/pipeline.py [--params params.yaml] [--root .] [--set train.epochs=3] [--force]

Without PREFECT_API_URL, Prefect starts a temporary local server for the run; `prefect.yaml` deploys
the flow on a schedule to a work pool (see the README). The stage logic lives in `resnet_pipeline`.

- One run at a time per `root`: the run holds the folder's lock (`resnet_pipeline.runlock`) from
  start to end; another run fails at once naming it (or waits `lock_wait_seconds`).
- The data tasks (download, split, shard) are cached like `dvc repro` skips stages, on the stage
  key (`resnet_pipeline.stagekeys`: the params and code dvc.yaml lists, and the keys of the stages
  it reads). A cached result is used only if the outputs on disk carry that same key; otherwise the
  task runs and refreshes its cache entry; so does it, in a DVC project, when dvc.lock records the
  stage and DVC sees its files changed (an upstream output changed while its inputs did not).
- DVC: in a DVC project (`root` has .dvc/ and dvc.yaml), each stage the flow runs, or finds cached,
  is recorded in dvc.lock through DVC's API, as `dvc repro` records it (a `dvc-commit-<stage>` task),
  and register pushes the data and model to the DVC remote before it registers; after a run
  `dvc status` is clean. Train, evaluate and register are skipped when dvc.lock records them as
  this run would run them, as `dvc repro` skips them: a second run with the same inputs trains,
  registers and pushes nothing (`force` runs them all). In a bare folder the run logs one line and
  goes on without DVC.
- Retries: download and register on I/O errors; train when SIGTERM stopped it with a checkpoint
  (`Preempted`), at most PREEMPT_RETRIES times, resuming from that checkpoint. A run whose process
  was killed (SIGKILL, the OOM killer, a machine gone) is Crashed; the automations of
  `resnet-pipeline recovery apply` (resnet_pipeline/recovery.py) schedule the same flow run again,
  which resumes here in the same folder.
- Results are persisted as JSON (never pickle) in Prefect's result storage; the `resnet_pipeline`
  loggers go to the run's log in the Prefect UI.
- Each run publishes a Markdown artifact (test metrics, the gate's decision with both figures, the
  registered version and how to pull it) and a table artifact (per-class precision, recall, F1).
- Secrets never become flow-run parameters (Prefect stores those in its database as given): a value
  with credentials or a signature comes from the environment (`RESNET_PIPELINE_SECRET_OVERRIDES`,
  which `--set` here fills for such values) or from Prefect Secret blocks named in `secret_blocks`;
  a run whose `overrides` hold one is refused, naming the key.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# before Prefect configures its logging and settings
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "resnet_pipeline")
os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # stage code used outside a run

from prefect import flow, runtime, task, unmapped  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from resnet_pipeline import config as config_mod  # noqa: E402
from resnet_pipeline import stages  # noqa: E402
from resnet_pipeline.config import Config  # noqa: E402
from resnet_pipeline.redact import redact_values  # noqa: E402
from resnet_pipeline.stages import DATA_STAGES, Paths, Preempted, folder_lock, is_current, stage_key  # noqa: E402

logging.getLogger("resnet_pipeline").setLevel(logging.INFO)  # the stages' INFO lines reach the run's log
log = logging.getLogger("resnet_pipeline.flow")

PREEMPT_RETRIES = 3
RESULTS = {"persist_result": True, "result_serializer": "json"}


# --------------------------------------------------------------------------- cache keys


def _cache_key(context, parameters) -> str:
    return stage_key(context.task.name, parameters["cfg"], parameters["paths"].root)


def _preempted(task, task_run, state) -> bool:
    """Retry train only when it stopped on SIGTERM with a checkpoint, and not while the flow run is
    being cancelled (Prefect's cancellation also arrives as SIGTERM)."""
    if not isinstance(state.result(raise_on_failure=False), Preempted):
        return False
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_state = client.read_flow_run(task_run.flow_run_id).state
    return flow_state is None or flow_state.type.value not in ("CANCELLING", "CANCELLED")


# --------------------------------------------------------------------------- tasks


def _stage_task(name: str, **options):
    def run(cfg: Config, paths: Paths) -> Any:
        return stages.run_stage(name, cfg, paths)

    run.__name__ = name
    return task(run, name=name, **options)


_data_options = {"cache_key_fn": _cache_key, **RESULTS}
download = _stage_task("download", retries=2, retry_delay_seconds=5, **_data_options)
split = _stage_task("split", **_data_options)
train = _stage_task("train", retries=PREEMPT_RETRIES, retry_condition_fn=_preempted, cache_policy=NO_CACHE, **RESULTS)
evaluate = _stage_task("evaluate", cache_policy=NO_CACHE, **RESULTS)
register = _stage_task("register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, **RESULTS)


@task(name="dvc-commit", cache_policy=NO_CACHE, persist_result=False)
def _dvc_commit(name: str, cfg: Config, root: Path) -> None:
    stages.record_in_dvc(name, cfg, root)


def record_in_dvc(name: str, cfg: Config, root: Path | None) -> None:
    """Record stage `name` in dvc.lock as `dvc repro` would (a `dvc-commit` task), in a DVC project."""
    if root is not None:
        _dvc_commit.with_options(task_run_name=f"dvc-commit-{name}")(name, cfg, root)


@task(name="write-shard", cache_policy=NO_CACHE, persist_result=False)
def write_shard(plan: dict, cfg: Config, paths: Paths, staging: Path) -> dict:
    return stages.write_shard(plan, cfg, paths, staging)


@task(name="shard", **_data_options)
def shard(cfg: Config, paths: Paths) -> dict:
    """The shard stage with the writing of each shard a task of its own (`write_shard.map`), so a
    Dask or Ray task runner can spread it over machines; the shards replace the old ones at the end."""
    plans, staging = stages.begin_shard(cfg, paths)
    try:
        entries = write_shard.map(plans, cfg=unmapped(cfg), paths=unmapped(paths), staging=unmapped(staging)).result()
    except BaseException:
        stages.discard_shard(staging)
        raise
    return stages.end_shard(entries, cfg, paths, staging)


# --------------------------------------------------------------------------- artifacts


def _beside(figure: dict | None) -> str:
    """The champion's value of a test figure and the candidate's delta, from the gate's `figures`."""
    return "" if figure is None else f"{figure['champion']} ({figure['delta']:+g})"


def report_markdown(cfg: Config, record: dict) -> str:
    """Metrics beside the champion's, the gate's decision with both figures, and the registered version."""
    name, version, gate = record["name"], record["version"], record["gate"]
    test, figures = record["metrics"]["test"], gate.get("figures") or {}
    rows = "\n".join(f"| {k} | {v} | {_beside(figures.get(k))} |" for k, v in test.items())
    champion = "none yet" if gate["champion"] is None else f"{gate['champion']} (version {gate['champion_version']})"
    promoted = record["promotion"]
    verdict = (
        "promoted"
        if promoted["promoted"]
        else f"promotion failed: {promoted['error']}"
        if promoted["error"]
        else "not promoted"
    )
    link = stages.version_link(record["registry"], name, version)
    return (
        f"# {name}:{version} — ResNet-{cfg.train.depth} ({cfg.train.variant}) on {cfg.download.dataset}\n\n"
        f"Registered as **[{name}:{version}]({link})** in `{record['registry']}`.\n\n"
        f"| test metric | value | {gate['alias']} (delta) |\n|---|---|---|\n{rows}\n\n"
        f"## Gate: {verdict} to `{gate['alias']}`\n\n"
        f"| | {gate['metric']} |\n|---|---|\n| this version | {gate['candidate']} |\n"
        f"| {gate['alias']} | {champion} |\n\n"
        f"{gate['reason']}\n\n"
        f"Pull it with `resnet-pipeline registry pull {name}:{version} DEST --registry {record['registry']}`.\n"
    )


def per_class_table(eval_dir: Path) -> list[dict]:
    with open(eval_dir / "per_class.csv", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- the flow


@flow(name="resnet-pipeline", log_prints=True, **RESULTS)
def resnet_pipeline_flow(
    params: str = "params.yaml",
    root: str = ".",
    overrides: dict[str, Any] | None = None,
    dataset: str | None = None,
    depth: int | None = None,
    epochs: int | None = None,
    lock_wait_seconds: float = 0,
    secret_blocks: dict[str, str] | None = None,
    force: bool = False,
) -> dict:
    """download -> split -> shard -> train -> evaluate -> register, holding the lock of `root`.

    `params` is read relative to `root` unless absolute; `overrides` are `{"group.key": value}` like
    `--set`; `dataset`, `depth` and `epochs` are shortcuts for `download.dataset`, `train.depth` and
    `train.epochs`. Everything is checked like params.yaml before any stage runs. If another run
    holds `root`, wait up to `lock_wait_seconds`, then fail naming it. In a DVC project, train,
    evaluate and register are skipped when dvc.lock records them as this run would (as `dvc repro`
    skips them); `force` runs every stage (`dvc repro --force`), the data tasks' caches refreshed.

    Secrets (a URL with `user:pass@` or a signed query) are not parameters: `secret_blocks` maps
    `group.key` to the name of a Prefect Secret block read at run time, and the environment variable
    `RESNET_PIPELINE_SECRET_OVERRIDES` (a JSON object like `overrides`) adds more.
    """
    refuse_secret_overrides(overrides)
    if runtime.flow_run.run_count > 1:  # rescheduled after a crash (resnet-pipeline recovery)
        log.warning(
            "attempt %d of this flow run (the last one crashed): resuming in %s; cached data stages are "
            "reused and train resumes from its last checkpoint",
            runtime.flow_run.run_count,
            Path(root).resolve(),
        )
    merged = {**(overrides or {}), **secret_overrides(secret_blocks)}
    cfg = load_config(params, root, merged, dataset=dataset, depth=depth, epochs=epochs)
    paths = Paths.from_config(cfg, root)
    owner = {
        "flow_run_id": runtime.flow_run.id,
        "flow_run_name": runtime.flow_run.name,
        "deployment": runtime.deployment.name,
    }
    with folder_lock(paths.root, owner, wait=lock_wait_seconds):
        dvc = stages.dvc_root(paths)  # each stage recorded in dvc.lock after it ran (or was cached)
        for stage_task, name in zip((download, split, shard), DATA_STAGES):
            stale = force or not is_current(name, cfg, paths) or stages.stale_in_dvc(name, dvc)
            stage_task.with_options(refresh_cache=stale)(cfg, paths)
            record_in_dvc(name, cfg, dvc)
        # register pushes the data and model to the DVC remote, then registers
        for stage_task, name in ((train, "train"), (evaluate, "evaluate"), (register, "register")):
            if not force and stages.current_in_dvc(name, cfg, dvc):
                log.info("%s: up to date in dvc.lock (deps, params, outputs as recorded): skipped", name)
                continue
            result = stage_task(cfg, paths)
            if name == "register":
                print(result)
            record_in_dvc(name, cfg, dvc)
        record = stages.registration(paths)
        per_class = per_class_table(paths.eval_dir)
    create_markdown_artifact(
        report_markdown(cfg, record),
        key="resnet-report",
        description=f"{record['name']}:{record['version']}: metrics, gate, registry",
    )
    create_table_artifact(
        per_class, key="resnet-per-class", description="Per-class precision, recall and F1 on the test split"
    )
    return {
        "test": record["metrics"]["test"],
        "name": record["name"],
        "version": record["version"],
        "registry": record["registry"],
        "promoted": record["promotion"]["promoted"],
    }


SECRET_ENV = "RESNET_PIPELINE_SECRET_OVERRIDES"


def has_secret(value: Any) -> bool:
    """Whether `value` (or a string inside it) holds a URL's credentials, query or fragment."""
    return redact_values(value) != value


def refuse_secret_overrides(overrides: dict[str, Any] | None) -> None:
    """A ValueError naming the first key of `overrides` whose value holds a secret: Prefect has
    stored the run's parameters, so the run stops before the secret reaches anything else."""
    for key, value in (overrides or {}).items():
        if has_secret(value):
            raise ValueError(
                f"overrides[{key!r}] holds credentials or a signature ({redact_values(value)} with them): flow-run "
                f"parameters are stored in Prefect's database as given. Give it through a Prefect Secret block "
                f"(secret_blocks={{{key!r}: BLOCK_NAME}}) or the worker's {SECRET_ENV} environment variable"
            )


def secret_overrides(secret_blocks: dict[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """`{"group.key": value}` from the RESNET_PIPELINE_SECRET_OVERRIDES variable (a JSON object) and
    from the Prefect Secret blocks `secret_blocks` names. Errors name the variable or the block,
    never a value."""
    raw = (os.environ if environ is None else environ).get(SECRET_ENV)
    found: Any = {}
    if raw:
        try:
            found = json.loads(raw)
        except ValueError:
            found = None
        if not isinstance(found, dict):
            raise ValueError(f'{SECRET_ENV}: expected a JSON object of {{"group.key": value}}')
    for key, block in (secret_blocks or {}).items():
        if not isinstance(block, str) or not block:
            raise ValueError(f"secret_blocks[{key!r}]: expected the name of a Prefect Secret block")
        from prefect.blocks.system import Secret

        try:
            found[key] = Secret.load(block).get()
        except ValueError as err:
            raise ValueError(f"secret_blocks[{key!r}]: cannot read the Secret block {block!r} ({err})") from None
    return found


def load_config(params: str, root: str, overrides: dict[str, Any] | None = None, **shortcuts: Any) -> Config:
    """The flow's parameters as a validated Config (a ConfigError names the bad key or value)."""
    merged = dict(overrides or {})
    for key, dotted in (("dataset", "download.dataset"), ("depth", "train.depth"), ("epochs", "train.epochs")):
        if shortcuts.get(key) is not None:
            merged[dotted] = shortcuts[key]
    path = Path(params) if Path(params).is_absolute() else Path(root) / params
    return config_mod.load(path, merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="run every stage, as `dvc repro --force`")
    args = parser.parse_args(argv)
    overrides = config_mod.parse_overrides(args.set)
    # a secret `--set` value reaches the run through this process's environment, not its parameters
    secret = {key: value for key, value in overrides.items() if has_secret(value)}
    if secret:
        os.environ[SECRET_ENV] = json.dumps({**secret_overrides(), **secret})
    plain = {key: value for key, value in overrides.items() if key not in secret}
    resnet_pipeline_flow(params=args.params, root=args.root, overrides=plain, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
