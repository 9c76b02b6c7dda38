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
