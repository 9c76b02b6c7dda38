"""`benchmark ingest` at a smoke size: every stage and size measured, the S3 part against the
session's SeaweedFS, the figures consistent with what the stages wrote."""

from __future__ import annotations

import pytest

from resnet_pipeline import cli
from resnet_pipeline.benchmark.ingest import format_result, make_folder, run, subset


def test_subset_takes_the_first_images_of_each_class(tmp_path):
    source = make_folder(tmp_path / "src", 20, 4)
    part = subset(source, tmp_path / "part", 8)
    assert sorted(p.name for p in part.glob("*/*.jpg")) == [f"img_{i:06d}.jpg" for i in range(8)]


@pytest.mark.slow
def test_benchmark_ingest_smoke(tmp_path, s3_server):
    result = run([60, 120], classes=3, s3_objects=30, s3_workers=4, work_dir=tmp_path, s3_server=s3_server)
    rows = {(r["stage"], r["images"]): r for r in result["stages"]}
    assert set(rows) == {(s, n) for s in ("download", "split", "shard") for n in (60, 120)}
    for r in rows.values():
        assert r["seconds"] > 0 and r["rss_mb"] > 10
        assert abs(r["us_per_image"] - r["seconds"] / r["images"] * 1e6) < 1e-6
    assert rows[("shard", 60)]["workers_rss_mb"] > 10  # the shard stage's pool of workers was measured
    g = result["growth"]["split"]
    assert abs(g - rows[("split", 120)]["us_per_image"] / rows[("split", 60)]["us_per_image"]) < 1e-9
    s3 = result["s3"]
    assert s3["objects"] == 30 and all(len(v) == 2 for v in s3["rounds"].values())
    assert s3["speedup_vs_get_object_loop"] == s3["seconds"]["get_object loop"] / s3["seconds"]["parallel"]
    text = format_result(result)
    assert "per-image cost shard at 120 / at 60" in text and "S3 folder of 30 objects" in text


def test_cli_refuses_bad_sizes(capsys):
    assert cli.main(["benchmark", "ingest", "--sizes", "10k,20k"]) == 2
    assert "--sizes: received '10k,20k'" in capsys.readouterr().err
    assert cli.main(["benchmark", "ingest", "--sizes", "50", "--classes", "3"]) == 2
