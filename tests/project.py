"""Copies of the project for tests that run it as users do (git, `dvc repro`, `prefect deploy`)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_project(dest: Path, names: list[str]) -> Path:
    """Copy these files and folders of the repository into `dest` (without __pycache__)."""
    for name in names:
        src, dst = REPO / name, dest / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return dest


def train_project(dest: Path, digits) -> Path:
    """A project folder for `resnet-pipeline train`: params.yaml and the digits' shards and labels
    (`digits` is conftest's digits_data). A run holds its folder's lock: one folder per running run."""
    (dest / "data").mkdir(parents=True)
    shutil.copytree(digits.shards, dest / "data/shards")
    shutil.copy(digits.labels, dest / "data/labels.json")
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")
    return dest
