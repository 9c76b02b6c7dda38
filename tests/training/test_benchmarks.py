"""Smoke runs of `benchmark train` and `benchmark accuracy` at a tiny size (the real figures come
from running them by hand: see the README)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from resnet_pipeline import cli
from resnet_pipeline.benchmark.train import ARMS, arms_order, medians

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_train_times_stage_bare_step_and_model_fit(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)  # no data/ here: the digits are made in a temporary folder
    out = tmp_path / "train.json"
    args = ["benchmark", "train", "--epochs", "1", "--rounds", "1", "--output", str(out)]
    small = ["--set", "train.global_batch_size=128", "--set", "train.image_size=8", "--set", "train.pad_crop=2"]
    assert cli.main([*args, *small]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    for key in ARMS:
        assert result[key]["images"] > 0 and result[key]["images_per_sec"] > 0
    (r,) = result["rounds"]
    assert r["order"] == list(ARMS)
    assert len({r[key]["pid"] for key in ARMS} | {os.getpid()}) == 4, "each arm in a process of its own"
    assert r["bare_step"]["images"] == r["stage"]["images"]
    assert r["stage_vs_bare_step"] == round(r["stage"]["images_per_sec"] / r["bare_step"]["images_per_sec"], 3)
    stage = r["stage"]
    assert stage["cpu_ms_per_image"] > 0 and stage["validation_seconds"] > 0
    parts = stage["steps_seconds"] + stage["validation_seconds"] + stage["checkpoint_seconds"]
    assert 0 < stage["steps_seconds"] and parts <= stage["seconds"] + 1e-3, "the parts lie within the stage's time"
    assert stage["steps_images_per_sec"] >= stage["images_per_sec"]
    assert "stage / bare step:" in printed and "stage / model.fit:" in printed
    assert "stage's time: in its steps" in printed and "the rest" in printed
    assert not (tmp_path / "data").exists()


def test_the_arms_order_rotates_so_each_runs_first_second_and_third():
    orders = [arms_order(index) for index in range(3)]
    assert orders[0] == ARMS and arms_order(3) == ARMS
    for position in range(3):
        assert sorted(order[position] for order in orders) == sorted(ARMS)


def test_a_ratio_is_the_median_of_the_rounds_own_ratios_not_the_ratio_of_the_medians():
    def arm(images_per_sec):
        return {"images": 100, "images_per_sec": images_per_sec, "cpu_ms_per_image": 1.0, "pid": 7}

    rounds = []
    for stage, fit in ((80, 100), (60, 50), (99, 110)):
        rounds.append(
            {"stage": arm(stage), "bare_step": arm(100), "model_fit": arm(fit), "stage_vs_model_fit": stage / fit}
        )
    result = medians(rounds)
    assert result["stage_vs_model_fit"] == 0.9  # the rounds' 0.8, 1.2 and 0.9; the medians' 80 / 100 is 0.8
    assert result["stage"]["images_per_sec"] == 80 and result["model_fit"]["images_per_sec"] == 100
    assert "pid" not in result["stage"]


@pytest.mark.slow
def test_benchmark_accuracy_runs_each_seed_and_reports_the_mean_interval(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "accuracy.json"
    small = ["--set", "train.epochs=1", "--set", "train.image_size=8", "--set", "train.pad_crop=2"]  # the digits' 8x8
    assert cli.main(["benchmark", "accuracy", "--seeds", "2", *small, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["seed"] for r in result["seeds"]] == [0, 1]
    tops = [r["top1"] for r in result["seeds"]]
    assert result["top1_mean"] == round(sum(tops) / 2, 6)
    low, high = result["top1_mean_ci95"]
    assert 0 <= low <= result["top1_mean"] <= high <= 1
    assert result["recipe"] == {"epochs": 1, "image_size": 8, "pad_crop": 2}
    assert "95% CI of the mean" in capsys.readouterr().out


def test_benchmark_arguments_are_checked_by_argparse(capsys):
    assert cli.main(["benchmark", "accuracy", "--seeds", "0"]) == 2
    assert "--seeds: received 0; allowed: 1 or more" in capsys.readouterr().err
