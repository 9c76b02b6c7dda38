"""Output folders are replaced so that the old or the new one is always there, fsynced, with the
modes the umask asks for.

The kill tests run a child process that replaces a folder and SIGKILLs itself at one point between
the steps of the replacement: `fileio._step` is the test double that stops it there (a kill between
two lines cannot be caused otherwise). The parent then checks what is on disk.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resnet_pipeline.fileio import atomic_write_json, recover_dir, staged_dir

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from resnet_pipeline import fileio

    dest, point = Path(sys.argv[1]), sys.argv[2]
    os.umask(0o022)

    def stop(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    fileio._step = stop
    with fileio.staged_dir(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "which.txt").write_text("new")
        fileio.atomic_write_json(tmp / "index.json", {"which": "new"})
        if point == "inside":
            os.kill(os.getpid(), signal.SIGKILL)
""")

EXCHANGE_POINTS = ["inside", "synced", "exchanged", "exchange-synced", "end"]
FALLBACK_POINTS = ["inside", "synced", "aside", "renamed", "renamed-synced", "end"]


def _old(dest: Path) -> None:
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "which.txt").write_text("old")


def _run(dest: Path, point: str, fallback: bool) -> int:
    env = dict(os.environ)
    env.pop("RESNET_PIPELINE_NO_EXCHANGE", None)
    if fallback:
        env["RESNET_PIPELINE_NO_EXCHANGE"] = "1"
    return subprocess.run([sys.executable, "-c", CHILD, str(dest), point], env=env).returncode


def _content(dest: Path) -> str | None:
    try:
        return (dest / "sub" / "which.txt").read_text()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("point", EXCHANGE_POINTS)
def test_kill_during_exchange_leaves_old_or_new_at_the_name(tmp_path, point):
    dest = tmp_path / "shards"
    _old(dest)
    code = _run(dest, point, fallback=False)
    assert code == (0 if point == "end" else -signal.SIGKILL)
    # no recovery needed: the exchange is atomic, the name always holds a whole folder
    expected = {"inside": "old", "synced": "old"}.get(point, "new")
    assert _content(dest) == expected
    if expected == "new":
        assert (dest / "index.json").read_text().count("new") == 1


@pytest.mark.parametrize("point", FALLBACK_POINTS)
def test_kill_during_aside_and_rename_leaves_old_or_new(tmp_path, point):
    dest = tmp_path / "shards"
    _old(dest)
    code = _run(dest, point, fallback=True)
    assert code == (0 if point == "end" else -signal.SIGKILL)
    aside = tmp_path / ".shards.old"
    assert _content(dest) is not None or _content(aside) == "old"  # never neither
    recover_dir(dest)  # what the next staged_dir (and the readers of shards) do first
    expected = {"inside": "old", "synced": "old", "aside": "old"}.get(point, "new")
    assert _content(dest) == expected
    assert not aside.exists()


def test_kill_when_there_was_no_old_folder_leaves_none_or_new(tmp_path):
    dest = tmp_path / "fresh"
    assert _run(dest, "synced", fallback=False) == -signal.SIGKILL
    assert not dest.exists()
    assert _run(dest, "end", fallback=False) == 0
    assert _content(dest) == "new"


def test_next_run_after_a_kill_replaces_cleanly(tmp_path):
    dest = tmp_path / "shards"
    _old(dest)
    _run(dest, "aside", fallback=True)
    with staged_dir(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "which.txt").write_text("third")
    assert _content(dest) == "third"
    assert not (tmp_path / ".shards.old").exists()  # the killed run's own staging folder may stay


def test_modes_follow_a_022_umask(tmp_path):
    dest = tmp_path / "out"
    assert _run(dest, "end", fallback=False) == 0
    modes = {p.relative_to(dest).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [dest, *dest.rglob("*")]}
    assert modes == {".": 0o755, "sub": 0o755, "sub/which.txt": 0o644, "index.json": 0o644}


def test_modes_follow_a_027_umask_in_this_process(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "a.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == 0o640


def test_failed_block_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "shards"
    _old(dest)
    with pytest.raises(RuntimeError):
        with staged_dir(dest) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("stage failed")
    assert _content(dest) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_a_large_tree_is_made_durable_in_one_syncfs(tmp_path, monkeypatch):
    """Which path fsync_tree takes (the flush itself cannot be observed without a power cut)."""
    from resnet_pipeline import fileio

    calls = []
    monkeypatch.setattr(fileio, "_syncfs", lambda path: calls.append(path) or True)
    small, large = tmp_path / "small", tmp_path / "large"
    for folder, n in ((small, fileio.SYNCFS_ABOVE), (large, fileio.SYNCFS_ABOVE + 1)):
        folder.mkdir()
        for i in range(n):
            (folder / f"{i}.txt").write_text("x")
    fileio.fsync_tree(small)
    assert calls == []
    fileio.fsync_tree(large)
    assert calls == [large]
