"""`resnet-pipeline model summary` and `benchmark model`: the figures they print are the model's own."""

from __future__ import annotations

import json
import re

import pytest

from resnet_pipeline import cli
from resnet_pipeline.benchmark.model import benchmark_models, build_pair
from resnet_pipeline.models.flops import multiply_adds
from resnet_pipeline.models.resnet import build_resnet


def _summary(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["model", "summary", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _figure(out: str, label: str) -> int:
    return int(re.search(rf"^{label}:\s+([\d,]+)", out, re.M).group(1).replace(",", ""))


def test_summary_of_resnet50_v1_prints_its_layers_parameters_and_multiply_adds(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: the defaults
    code, out, _ = _summary(capsys, "--depth", "50", "--variant", "v1", "--image-size", "224")
    assert code == 0
    model = build_resnet(50, "v1", input_shape=(224, 224, 3), num_classes=1000, stride_in_1x1=True)
    assert out.startswith("ResNet-50 v1 at 224x224x3, 1000 classes")
    assert _figure(out, "trainable params") == 25_557_032  # torchvision's resnet50
    assert _figure(out, "total params") == model.count_params()
    assert _figure(out, "multiply-adds") == multiply_adds(model)
    rows = [line.split() for line in out.splitlines() if line.startswith("conv")]
    assert [r[0] for r in rows][:3] == ["conv1_pad", "conv1_conv", "conv1_bn"]
    assert {"conv2_block1_1_conv", "conv5_block3_out"} <= {r[0] for r in rows}
    conv = next(r for r in rows if r[0] == "conv3_block1_1_conv")  # v1: the stride on the 1x1
    assert conv[2] == "28x28x128"


@pytest.mark.slow
def test_summary_variant_names_and_inferred_variant(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, v1, _ = _summary(capsys, "--depth", "50", "--variant", "v1", "--image-size", "64")
    code, inferred, _ = _summary(capsys, "--depth", "50", "--image-size", "64")  # cifar lacks 50: v1.5
    assert code == 0 and inferred.startswith("ResNet-50 v1.5 at 64x64x3")
    assert _figure(inferred, "multiply-adds") > _figure(v1, "multiply-adds")  # the stride moved to the 3x3
    assert _figure(inferred, "trainable params") == _figure(v1, "trainable params")
    _, v2, _ = _summary(capsys, "--depth", "200", "--image-size", "32", "--num-classes", "5", "--channels", "1")
    assert v2.startswith("ResNet-200 v2 at 32x32x1, 5 classes")


def test_summary_outside_a_project_takes_the_layouts_own_input_size_and_says_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: no train.image_size of a dataset
    code, out, _ = _summary(capsys, "--depth", "50")
    assert code == 0 and out.startswith("ResNet-50 v1.5 at 224x224x3, 1000 classes"), out[:200]
    assert re.search(r"^multiply-adds: .* for one 224x224x3 image$", out, re.M)
    assert 4.0e9 < _figure(out, "multiply-adds") < 4.2e9  # ResNet-50 v1.5's ~4.1 G at 224
    code, out, _ = _summary(capsys, "--depth", "56")  # a CIFAR depth: CIFAR's 32x32
    assert code == 0 and out.startswith("ResNet-56 cifar at 32x32x3, 10 classes"), out[:200]


def test_summary_reads_params_and_its_overrides(capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    code, out, _ = _summary(capsys, "--set", "train.depth=32")
    assert code == 0 and out.startswith("ResNet-32 cifar at 32x32x3")
    assert abs(_figure(out, "trainable params") - 0.46e6) / 0.46e6 < 0.02


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--depth", "42"], "train.depth: received 42"),
        (["--depth", "200", "--image-size", "16"], "train.image_size: received 16; ResNet-200 (v2) needs at least 32"),
        (["--variant", "v2", "--depth", "20"], "train.depth: received 20 for variant 'v2'"),
        (["--channels", "0"], "--channels: received 0"),
    ],
)
def test_summary_refuses_what_cannot_be_built(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = _summary(capsys, *argv)
    assert code == 2 and out == ""
    assert fragment in err


@pytest.mark.slow
def test_benchmark_times_ours_and_keras_on_the_same_network(tmp_path):
    rows = benchmark_models("v1", [50], batch_size=2, image_size=32, steps=3, warmup=1, rounds=2)
    assert [(r["model"], r["phase"]) for r in rows] == [
        ("ResNet-50 v1 (ours)", "forward"),
        ("keras.applications.ResNet50", "forward"),
        ("ResNet-50 v1 (ours)", "train_step"),
        ("keras.applications.ResNet50", "train_step"),
    ]
    for ours, ref in (rows[0:2], rows[2:4]):
        # the keras layout makes them one network: the ratio compares implementations
        assert ours["params"] == ref["params"] and ours["multiply_adds"] == ref["multiply_adds"]
        assert ours["steps"] == ref["steps"] == 3
        assert ours["mean_sec"] > 0 and ours["std_sec"] >= 0
        assert ours["ratio_vs_keras"] == pytest.approx(ref["mean_sec"] / ours["mean_sec"])
        assert "ratio_vs_keras" not in ref


@pytest.mark.slow
def test_benchmark_without_a_keras_counterpart_and_its_cli(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code = cli.main(
        [
            "benchmark",
            "model",
            "--depths",
            "20",
            "--variant",
            "cifar",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--output",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out_file.read_text())
    assert [r["model"] for r in rows] == ["ResNet-20 cifar (ours)"] * 2
    assert "ResNet-20 cifar (ours)  forward" in out and "keras.applications" not in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--depths", "fifty"], "--depths: received 'fifty'"),
        (["--depths", "42"], "depth: received 42 for variant 'v1'"),
        (["--steps", "1"], "--steps: received 1; allowed: 2 or more"),
    ],
)
def test_benchmark_refuses_bad_arguments(capsys, argv, fragment):
    assert cli.main(["benchmark", "model", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_v1_5_is_timed_against_keras_v1():
    ours, reference = build_pair("v1.5", 50, (32, 32, 3), 10)
    assert reference.name.lower().startswith("resnet50")
    assert ours.get_layer("conv3_block1_2_conv").strides == (2, 2)
