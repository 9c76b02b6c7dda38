"""The evaluate stage on the digits test shards, with an untrained CIFAR ResNet-20."""

from __future__ import annotations

import collections
import csv
import json

import numpy as np
import pytest

from resnet_pipeline.config import Config, EvaluateConfig
from resnet_pipeline.evaluation import evaluate
from resnet_pipeline.models.resnet import build_resnet


@pytest.fixture(scope="module")
def evaluated(digits_data, tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("evaluation")
    model_dir, out_dir = root / "model", root / "eval"
    model_dir.mkdir()
    build_resnet(20, num_classes=10).save(model_dir / "model.keras")
    classes = json.loads(digits_data.labels.read_text())["classes"]
    (model_dir / "labels.json").write_text(json.dumps({"classes": classes}))
    (model_dir / "config.yaml").write_text(Config().to_yaml())  # the preprocessing evaluate repeats
    metrics = evaluate(EvaluateConfig(top_k=3), model_dir, digits_data.shards, out_dir)
    index = json.loads((digits_data.shards / "index.json").read_text())
    return {"metrics": metrics, "out": out_dir, "classes": classes, "n_test": index["splits"]["test"]["records"]}


def test_metrics_json(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    assert metrics == evaluated["metrics"]
    test = metrics["test"]
    assert set(test) == {"examples", "loss", "top1", "top3"}
    assert test["examples"] == evaluated["n_test"] > 0
    assert 0.0 <= test["top1"] <= test["top3"] <= 1.0
    assert np.isfinite(test["loss"]) and test["loss"] > 0


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


def test_confusion_csv_has_one_row_per_test_example(evaluated, digits_data):
    header, rows = _read_csv(evaluated["out"] / "confusion.csv")
    assert header == ["actual", "predicted"]
    assert len(rows) == evaluated["n_test"]
    classes = set(evaluated["classes"])
    assert all(len(r) == 2 and r[0] in classes and r[1] in classes for r in rows)
    from resnet_pipeline.data.split import read_manifest

    expected = collections.Counter(r["label_name"] for r in read_manifest(digits_data.manifest).to_pylist()
                                   if r["split"] == "test" and r["status"] == "ok")
    assert collections.Counter(r[0] for r in rows) == expected
    top1 = sum(a == p for a, p in rows) / len(rows)
    assert top1 == pytest.approx(evaluated["metrics"]["test"]["top1"], abs=1e-6)


def test_per_class_csv(evaluated):
    header, rows = _read_csv(evaluated["out"] / "per_class.csv")
    assert header == ["class", "support", "accuracy"]
    assert len(rows) == 10
    assert [r[0] for r in rows] == evaluated["classes"]
    assert sum(int(r[1]) for r in rows) == evaluated["n_test"]
    _, confusion = _read_csv(evaluated["out"] / "confusion.csv")
    for name, support, accuracy in rows:
        mine = [p for a, p in confusion if a == name]
        assert int(support) == len(mine)
        assert float(accuracy) == pytest.approx(sum(p == name for p in mine) / len(mine), abs=1e-6)


def test_top_k_larger_than_the_class_count_is_capped(evaluated, digits_data, tmp_path):
    model_dir = evaluated["out"].parent / "model"
    metrics = evaluate(EvaluateConfig(top_k=50), model_dir, digits_data.shards, tmp_path)
    assert metrics["test"]["top10"] == 1.0
    assert metrics["test"]["top1"] == evaluated["metrics"]["test"]["top1"]


def test_missing_model_is_reported(digits_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.keras"):
        evaluate(EvaluateConfig(), tmp_path, digits_data.shards, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
