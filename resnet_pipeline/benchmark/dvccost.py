"""What DVC's bookkeeping and the push add to a run of the pipeline, beside the stages' own seconds.

    resnet-pipeline benchmark dvc [--images 20000] [--classes 100] [--no-digits] [--data-only]
                                  [--remote URL] [--workdir DIR] [--output FILE]

For each dataset (the embedded digits, and a generated folder of `--images` 64x48 JPEGs in
`--classes` classes), the stages run twice, in process, with the same params (1 epoch at 8x8, so
that training is short): in a bare folder, where nothing is recorded (the stages' own seconds), and
in a git + DVC project made from this checkout's dvc.yaml, params.yaml and code, where each stage is
recorded in dvc.lock after it ran (`dvc commit` through DVC's API, as the flow does) and register
first checks dvc.lock against the workspace and pushes. The check and the push are timed on their
own, the push in the order a first run meets it: the data and model without the raw images, then
the raw images, then a push with nothing new (what a second run of the same inputs pushes).
`dvc status` of the project is timed last. The bare folder runs first: it pays the imports, as the
first stages of a flow run do.

The remote is the project's local folder remote (`.dvc-remote`), or `--remote URL` (an S3 URL
takes its credentials and endpoint from the environment, as DVC does).
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import time
from pathlib import Path

from resnet_pipeline.benchmark.harness import work_folder

log = logging.getLogger(__name__)

STAGES = ("download", "split", "shard", "train", "evaluate", "register")
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvc/plots", ".gitignore")
SMALL = {"train.epochs": 1, "train.image_size": 8, "train.pad_crop": 2, "train.global_batch_size": 64}


def checkout() -> Path:
    """The source checkout this package runs from (its dvc.yaml and code make the project)."""
    from resnet_pipeline.stagekeys import PACKAGE_PROJECT

    if not (PACKAGE_PROJECT / "dvc.yaml").is_file():
        raise FileNotFoundError(
            f"{PACKAGE_PROJECT / 'dvc.yaml'}: benchmark dvc runs from a source checkout (it copies dvc.yaml "
            "and the code into a project of its own)"
        )
    return PACKAGE_PROJECT


def make_project(dest: Path, remote: str | None = None) -> Path:
    """A git + DVC project in `dest`: this checkout's dvc.yaml, params, DVC config and code, committed."""
    source = checkout()
    for name in PROJECT_FILES:
        src, dst = source / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.is_file():
            shutil.copy(src, dst)
    shutil.copytree(source / "resnet_pipeline", dest / "resnet_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=benchmark", "-c", "user.email=benchmark@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark project"]):
        subprocess.run([*git, *cmd], cwd=dest, check=True, capture_output=True)
    if remote:
        from resnet_pipeline.dvcrecord import open_repo

        with open_repo(dest) as repo, repo.config.edit("local") as conf:
            conf["remote"]["benchmark"] = {"url": remote}
            conf["core"]["remote"] = "benchmark"
    return dest


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_pipeline(root: Path, overrides: dict, stages: tuple[str, ...], dvc: bool) -> dict:
    """Seconds of each stage on `root` and, in a DVC project (`dvc`), of recording it; with register,
    the pushes before it, timed on their own."""
    import yaml

    from resnet_pipeline import config, dvcrecord
    from resnet_pipeline import stages as stages_mod
    from resnet_pipeline.paths import Paths

    # the run's params in the folder's params.yaml, as a user sets them: DVC reads the same values
    raw = config.apply_overrides(yaml.safe_load((checkout() / "params.yaml").read_text()), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = config.load(root / "params.yaml")
    paths = Paths.from_config(cfg, root)
    figures: dict = {"stage": {}, "record": {}}
    pushed = [s for s in stages if s != "register"]
    for name in stages:
        if dvc and name == "register":
            figures["push"] = _pushes(root, pushed)
            figures["check"] = _timed(_check, root)
        figures["stage"][name] = _timed(stages_mod.run_stage, name, cfg, paths)
        if dvc:
            figures["record"][name] = _timed(dvcrecord.record_stage, root, name, cfg)
        log.info("benchmark dvc: %s on %s: %.2f s", name, root, figures["stage"][name])
    if dvc and "register" not in stages:
        figures["push"] = _pushes(root, pushed)
    if dvc:
        start = time.perf_counter()
        with dvcrecord.open_repo(root) as repo:
            clean = repo.status(targets=[dvcrecord.target(repo, s) for s in stages]) == {}
        figures["status"] = {"seconds": time.perf_counter() - start, "clean": clean}
    return figures


def _check(root: Path) -> None:
    """What register does before it pushes: check that dvc.lock records the workspace."""
    from resnet_pipeline import dvcrecord

    with dvcrecord.open_repo(root) as repo:
        stale = dvcrecord.stale_stages(repo)
    if stale:
        raise RuntimeError(f"{root}: dvc.lock does not record the workspace: {stale}")


def _pushes(root: Path, stages: list[str]) -> list[dict]:
    """The push of a first run of `stages`, in parts (without data/raw, then data/raw), then one with
    nothing new (a second run of the same inputs)."""
    from resnet_pipeline import dvcrecord

    rows = []
    for what, names in (
        ("of the outputs but the raw images", [s for s in stages if s != "download"]),
        ("of the raw images", ["download"]),
        ("of everything again (a second run)", stages),
    ):
        with dvcrecord.open_repo(root) as repo:
            remote = dvcrecord.default_remote(repo)
            if remote is None:
                raise RuntimeError(f"{root}: no default DVC remote to push to")
            start = time.perf_counter()
            files = dvcrecord.push(repo, remote, names)
            rows.append({"what": what, "files": files, "seconds": time.perf_counter() - start})
    return rows


def run_dataset(name: str, work: Path, overrides: dict, stages: tuple[str, ...], remote: str | None) -> dict:
    bare, project = work / f"{name}-bare", make_project(work / f"{name}-dvc", remote)
    bare.mkdir(parents=True)
    without = run_pipeline(bare, overrides, stages, dvc=False)
    with_dvc = run_pipeline(project, overrides, stages, dvc=True)
    raw = project / "data/raw"
    files = sum(1 for p in raw.rglob("*") if p.is_file())
    return {"dataset": name, "raw_files": files, "bare": without, "dvc": with_dvc}


def run(
    images: int = 20000,
    classes: int = 100,
    *,
    digits: bool = True,
    data_only: bool = False,
    remote: str | None = None,
    work_dir: Path | None = None,
) -> dict:
    """Every figure of the benchmark (see the module doc)."""
    from resnet_pipeline.benchmark.ingest import make_folder

    stages = STAGES[:3] if data_only else STAGES
    with work_folder(work_dir, "bench-dvc-") as work:
        rows = []
        if digits:
            rows.append(run_dataset("digits", work, {**SMALL, "download.dataset": "digits"}, stages, remote))
        if images:
            folder = make_folder(work / "jpegs", images, classes)
            jpegs = {**SMALL, "download.dataset": "imagefolder", "download.path": str(folder)}
            rows.append(run_dataset(f"{images} JPEGs", work, jpegs, stages, remote))
        return {"stages": list(stages), "remote": remote or ".dvc-remote (local folder)", "datasets": rows}


def format_result(r: dict) -> str:
    out = io.StringIO()
    for d in r["datasets"]:
        bare, dvc = d["bare"]["stage"], d["dvc"]
        out.write(f"{d['dataset']} ({d['raw_files']} files in data/raw), remote {r['remote']}\n")
        out.write(f"  {'stage':<9} {'bare s':>8} {'DVC project s':>14} {'dvc commit s':>13}\n")
        for name in r["stages"]:
            out.write(f"  {name:<9} {bare[name]:>8.2f} {dvc['stage'][name]:>14.2f} {dvc['record'][name]:>13.2f}\n")
        pushes = dvc.get("push", [])
        for p in pushes:
            out.write(f"  push {p['what']}: {p['files']} files, {p['seconds']:.2f} s\n")
        status = dvc["status"]
        out.write(f"  dvc status: {status['seconds']:.2f} s ({'clean' if status['clean'] else 'NOT clean'})\n")
        stages_s = sum(bare.values())
        commits = sum(dvc["record"].values())
        # a first run pushes the two first parts; register's own check and empty push are in its seconds
        first_push = sum(p["seconds"] for p in pushes[:2])
        check = dvc.get("check", 0.0)
        added = commits + first_push + check
        out.write(
            f"  stages {stages_s:.2f} s bare; DVC adds {added:.2f} s ({added / stages_s:.0%}): "
            f"commits {commits:.2f} s, push {first_push:.2f} s, register's dvc.lock check {check:.2f} s\n"
        )
    return out.getvalue().rstrip("\n")
