"""The shard stage and the readers of shards against tampered contracts (manifest rows,
labels.json, index.json), and shard writing with few file descriptors."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_pipeline.config import Config, ShardConfig, SplitConfig
from resnet_pipeline.data.contracts import SCHEMA, ContractError
from resnet_pipeline.data.shard import shard
from resnet_pipeline.data.split import split
from resnet_pipeline.fileio import sha256_bytes
from resnet_pipeline.paths import Paths

SEED = 42


def _png(rng: np.random.Generator, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def staged(tmp_path):
    """raw/pets/{cat,dog}/*.png, its manifest and labels, and shards made from them."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "raw" / "pets" / c).mkdir(parents=True)
        for i in range(10):
            (tmp_path / "raw" / "pets" / c / f"{i}.png").write_bytes(_png(rng))
    split(SplitConfig(), SEED, tmp_path / "raw" / "pets", tmp_path / "manifest.parquet", tmp_path / "labels.json")
    shard(ShardConfig(workers=1), tmp_path / "manifest.parquet", tmp_path / "raw", tmp_path / "shards")
    return tmp_path


def _tamper(root: Path, **changes) -> dict:
    """Rewrite row 3 of the manifest with `changes`; return the original row."""
    rows = pq.read_table(root / "manifest.parquet").to_pylist()
    original = dict(rows[3])
    rows[3].update(changes)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "manifest.parquet")
    return original


def _shards_before(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "shards").iterdir()}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"path": "/etc/passwd"}, "path '/etc/passwd': absolute path"),
        ({"path": "../outside.png"}, "path '../outside.png': '..', '.' or empty component"),
        ({"path": "pets/cat/../../../outside.png"}, "'..', '.' or empty component"),
        ({"label": -1}, "label -1: expected an integer in 0..1"),
        ({"label": 2}, "label 2: expected an integer in 0..1"),
        ({"label_name": "zebra"}, "label_name 'zebra': labels.json names class"),
        ({"split": "holdout"}, "split 'holdout'"),
        ({"status": "fine, trust me"}, "status 'fine, trust me'"),
        ({"sha256": "0" * 10}, "sha256 '0000000000'"),
    ],
    ids=["absolute", "dotdot", "dotdot-inside", "label-1", "label-n", "label_name", "split", "status", "sha256"],
)
def test_tampered_manifest_row_is_refused_naming_the_row(staged, changes, expected):
    # a readable image outside raw/ with the row's own sha256: it would be sharded if it were read
    outside = staged / "outside.png"
    outside.write_bytes(_png(np.random.default_rng(99)))
    if "path" in changes:
        changes["sha256"] = sha256_bytes(outside.read_bytes())
    before = _shards_before(staged)
    _tamper(staged, **changes)
    with pytest.raises(ContractError) as err:
        shard(ShardConfig(workers=1), staged / "manifest.parquet", staged / "raw", staged / "shards")
    message = str(err.value)
    assert f"{staged / 'manifest.parquet'}: row 3: " in message and expected in message, message
    assert _shards_before(staged) == before, "the old shards are kept"


def test_a_link_inside_raw_pointing_out_is_refused_when_read(staged):
    outside = staged / "outside.png"
    outside.write_bytes(_png(np.random.default_rng(99)))
    os.symlink(outside, staged / "raw" / "pets" / "cat" / "innocent.png")
    original = _tamper(staged, path="pets/cat/innocent.png", sha256=sha256_bytes(outside.read_bytes()), status="ok")
    assert original["status"] == "ok"
    with pytest.raises(ValueError, match=r"innocent.png: resolves to .*outside.png, outside"):
        shard(ShardConfig(workers=1), staged / "manifest.parquet", staged / "raw", staged / "shards")


def test_bad_labels_json_is_refused(staged):
    (staged / "labels.json").write_text(json.dumps({"classes": ["cat", "cat"]}))
    with pytest.raises(ContractError, match="labels.json: expected"):
        shard(ShardConfig(workers=1), staged / "manifest.parquet", staged / "raw", staged / "shards")


def _index(root: Path) -> dict:
    return json.loads((root / "shards" / "index.json").read_text())


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("file", "../../manifest.parquet", "expected a shard name"),
        ("file", "train-00009-of-00009.tfrecord", "is missing"),
        ("records", -5, "records -5"),
        ("split", "val", "differs from the shard name"),
        ("sha256", "f" * 64, "sha256 differs from index.json's"),
    ],
)
def test_train_checks_index_json_against_the_files(staged, field, value, expected):
    from resnet_pipeline.data.pipeline import shard_files

    files, records = shard_files(staged / "shards", "train")
    assert records > 0 and all(Path(f).is_file() for f in files)
    index = _index(staged)
    entry = next(e for e in index["shards"] if e["split"] == "train")
    entry[field] = value
    (staged / "shards" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ContractError) as err:
        shard_files(staged / "shards", "train")
    assert "index.json" in str(err.value) or "tfrecord" in str(err.value)
    assert expected in str(err.value), str(err.value)


def test_a_changed_shard_file_is_caught_by_its_sha256(staged):
    from resnet_pipeline.data.pipeline import shard_files

    name = next(e["file"] for e in _index(staged)["shards"] if e["split"] == "train")
    with open(staged / "shards" / name, "ab") as f:
        f.write(b"x")
    with pytest.raises(ContractError, match=rf"{name}: sha256 differs"):
        shard_files(staged / "shards", "train")


CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from resnet_pipeline.config import ShardConfig
    from resnet_pipeline.data.shard import shard

    root = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    index = shard(ShardConfig(workers=1, target_shard_mb=1e-6), root / "manifest.parquet", root / "raw",
                  root / "shards")
    print(len(index["shards"]), index["splits"]["train"]["shards"])
    try:  # the limit is real: holding 300 files open at once fails
        held = [open(root / "manifest.parquet", "rb") for _ in range(300)]
        print("limit not enforced")
    except OSError as err:
        print("EMFILE" if err.errno == 24 else err)
""")


def test_2500_shards_with_256_open_files(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "raw" / "set" / c).mkdir(parents=True)
    for i in range(2520):
        (tmp_path / "raw" / "set" / "ab"[i % 2] / f"{i}.png").write_bytes(_png(rng))
    cfg = SplitConfig(train=0.996, val=0.002, test=0.002)
    split(cfg, SEED, tmp_path / "raw" / "set", tmp_path / "manifest.parquet", tmp_path / "labels.json")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    total, train = map(int, out.stdout.split()[:2])
    assert total >= 2500 and train >= 2480, out.stdout
    assert out.stdout.split()[2] == "EMFILE"
    assert len(list((tmp_path / "shards").glob("*.tfrecord"))) == total


# --------------------------------------------------------------------------- a symlinked data/shards


@pytest.fixture()
def linked_shards(digits_data, tmp_path):
    """A copy of the digits data whose `data/shards` is a link to shards on another disk: the config,
    the paths and the link's target (which holds the session's shards)."""
    cfg = dataclasses.replace(Config(), shard=ShardConfig(workers=1))
    paths = Paths.from_config(cfg, root=tmp_path / "project")
    paths.data.mkdir(parents=True)
    shutil.copytree(digits_data.raw, paths.raw, copy_function=os.link)  # read only: hard links will do
    shutil.copyfile(digits_data.manifest, paths.manifest)
    shutil.copyfile(digits_data.labels, paths.labels)
    target = tmp_path / "bigdisk" / "shards"
    shutil.copytree(digits_data.shards, target)
    os.symlink(target, paths.shards)
    return cfg, paths, target


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_a_symlinked_shards_folder_is_written_in_its_target_and_keeps_its_key(
    linked_shards, digits_data, monkeypatch, exchange
):
    """Issue 30: with `data/shards` a link, the shard stage failed after the swap (rmtree on the
    link), left the new shards on the local disk and recorded no key. The shards now go into the
    link's target, swapped there; the link stays; the key is recorded and a second run reuses it."""
    from resnet_pipeline.stagekeys import is_current, recorded, require_current, stage_key
    from resnet_pipeline.stages import run_stage

    cfg, paths, target = linked_shards
    if not exchange:
        monkeypatch.setenv("RESNET_PIPELINE_NO_EXCHANGE", "1")
    expected = {p.name: p.read_bytes() for p in digits_data.shards.glob("*.tfrecord")}
    (target / "stale.tfrecord").write_bytes(b"from an older run")
    assert not is_current("shard", cfg, paths)
    keys = []
    for _run in range(2):
        if _run and is_current("shard", cfg, paths):
            # what the flow does with a current output: reuse it; the CLI (dvc) may rerun it all the same
            assert require_current(("shard",), cfg, paths) == {"shard": keys[0]}
        run_stage("shard", cfg, paths)
        assert paths.shards.is_symlink() and os.readlink(paths.shards) == str(target), "the link is kept"
        assert {p.name: p.read_bytes() for p in target.glob("*.tfrecord")} == expected, "same shards, in the target"
        assert sorted(os.listdir(paths.data)) == ["labels.json", "manifest.parquet", "raw", "shards"]
        assert sorted(os.listdir(target.parent)) == ["shards"], "no staging or aside folder left"
        assert is_current("shard", cfg, paths)
        keys.append(recorded("shard", cfg, paths)["key"])
    assert keys[0] == keys[1] == stage_key("shard", cfg, paths.root)
    index = json.loads((target / "index.json").read_text())
    assert index["stage_key"] == keys[0] and len(index["shards"]) == len(expected)


def test_flow_steps_and_recovery_follow_a_symlinked_destination(tmp_path, monkeypatch):
    """The Prefect flow's shard task stages and replaces `data/shards` itself (new_staging_dir,
    replace_dir), and readers call recover_dir first: all three work on the link's target, so a kill
    between the fallback's two renames (target aside, link dangling) is repaired through the link."""
    from resnet_pipeline.fileio import _aside, new_staging_dir, recover_dir, replace_dir

    target = tmp_path / "bigdisk" / "shards"
    target.mkdir(parents=True)
    (target / "which").write_text("old")
    link = tmp_path / "data" / "shards"
    link.parent.mkdir()
    os.symlink(os.path.relpath(target, link.parent), link)
    for fallback in ("", "1"):
        monkeypatch.setenv("RESNET_PIPELINE_NO_EXCHANGE", fallback)
        staging = new_staging_dir(link)
        assert staging.parent == target.parent
        (staging / "which").write_text(f"new{fallback}")
        replace_dir(staging, link)
        assert link.is_symlink() and (link / "which").read_text() == f"new{fallback}"
        assert sorted(os.listdir(target.parent)) == ["shards"] and os.listdir(link.parent) == ["shards"]
    os.rename(target, _aside(target))  # killed after "aside": the link dangles, the old content waits
    recover_dir(link)
    assert (link / "which").read_text() == "new1" and link.is_symlink()


def test_a_link_to_a_missing_folder_on_a_missing_disk_is_refused_naming_it(tmp_path):
    from resnet_pipeline.fileio import staged_dir

    link = tmp_path / "data" / "shards"
    link.parent.mkdir()
    os.symlink(tmp_path / "unmounted" / "shards", link)
    with pytest.raises(FileNotFoundError, match=r"data/shards: a symbolic link to .*unmounted/shards"):
        with staged_dir(link):
            pass
    assert not (tmp_path / "unmounted").exists(), "no folder is made where the disk should be"
