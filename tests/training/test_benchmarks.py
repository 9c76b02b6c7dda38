"""Smoke runs of `benchmark train` and `benchmark accuracy` at a tiny size (the real figures come
from running them by hand: see the README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from resnet_pipeline import cli

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_train_times_stage_bare_step_and_model_fit(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)  # no data/ here: the digits are made in a temporary folder
    out = tmp_path / "train.json"
    assert (
        cli.main(
            [
                "benchmark",
                "train",
                "--epochs",
                "1",
                "--rounds",
                "2",
                "--set",
                "train.global_batch_size=128",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    for key in ("stage", "bare_step", "model_fit"):
        assert result[key]["images"] > 0 and result[key]["images_per_sec"] > 0
    assert len(result["rounds"]) == 2
    assert [r["order"] for r in result["rounds"]] == [
        ["stage", "bare_step", "model_fit"],
        ["bare_step", "model_fit", "stage"],
    ], "the arms' order rotates"
    assert result["rounds"][0]["bare_step"]["images"] == result["rounds"][0]["stage"]["images"]
    for r in result["rounds"]:
        assert r["stage_vs_bare_step"] == round(r["stage"]["images_per_sec"] / r["bare_step"]["images_per_sec"], 3)
        stage = r["stage"]
        assert stage["cpu_ms_per_image"] > 0 and stage["validation_seconds"] > 0
        parts = stage["steps_seconds"] + stage["validation_seconds"] + stage["checkpoint_seconds"]
        assert 0 < stage["steps_seconds"] and parts <= stage["seconds"] + 1e-3, "the parts lie within the stage's time"
        assert stage["steps_images_per_sec"] >= stage["images_per_sec"]
    ratios = sorted(r["stage_vs_model_fit"] for r in result["rounds"])
    assert result["stage_vs_model_fit"] == round((ratios[0] + ratios[1]) / 2, 3)  # the median of two
    assert "stage / bare step:" in printed and "stage / model.fit:" in printed
    assert "stage's time: in its steps" in printed and "the rest" in printed
    assert not (tmp_path / "data").exists()


def test_benchmark_accuracy_runs_each_seed_and_reports_the_mean_interval(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "accuracy.json"
    assert cli.main(["benchmark", "accuracy", "--seeds", "2", "--set", "train.epochs=1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["seed"] for r in result["seeds"]] == [0, 1]
    tops = [r["top1"] for r in result["seeds"]]
    assert result["top1_mean"] == round(sum(tops) / 2, 6)
    low, high = result["top1_mean_ci95"]
    assert 0 <= low <= result["top1_mean"] <= high <= 1
    assert result["recipe"] == {"epochs": 1}
    assert "95% CI of the mean" in capsys.readouterr().out


def test_benchmark_arguments_are_checked_by_argparse(capsys):
    assert cli.main(["benchmark", "accuracy", "--seeds", "0"]) == 2
    assert "--seeds: received 0; allowed: 1 or more" in capsys.readouterr().err
