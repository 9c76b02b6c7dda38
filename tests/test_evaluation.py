"""The evaluate stage on the digits test shards, with an untrained CIFAR ResNet-20.

Per-class precision, recall and F1 are checked against scikit-learn on the same predictions.
"""

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
    (model_dir / "params.yaml").write_text(Config().to_yaml())  # the preprocessing evaluate repeats
    metrics = evaluate(EvaluateConfig(top_k=3), model_dir, digits_data.shards, out_dir)
    index = json.loads((digits_data.shards / "index.json").read_text())
    return {"metrics": metrics, "out": out_dir, "classes": classes, "n_test": index["splits"]["test"]["records"]}


def test_metrics_json(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    assert metrics == evaluated["metrics"]
    test = metrics["test"]
    assert set(test) == {"examples", "loss", "top1", "top3", "macro_precision", "macro_recall", "macro_f1"}
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
    from resnet_pipeline.data.contracts import read_manifest

    expected = collections.Counter(
        r["label_name"]
        for r in read_manifest(digits_data.manifest).to_pylist()
        if r["split"] == "test" and r["status"] == "ok"
    )
    assert collections.Counter(r[0] for r in rows) == expected
    top1 = sum(a == p for a, p in rows) / len(rows)
    assert top1 == pytest.approx(evaluated["metrics"]["test"]["top1"], abs=1e-6)


def test_per_class_csv_matches_sklearn(evaluated):
    from sklearn.metrics import precision_recall_fscore_support

    header, rows = _read_csv(evaluated["out"] / "per_class.csv")
    assert header == ["class", "precision", "recall", "f1", "support"]
    classes = evaluated["classes"]
    assert [r[0] for r in rows] == classes
    assert sum(int(r[4]) for r in rows) == evaluated["n_test"]
    _, confusion = _read_csv(evaluated["out"] / "confusion.csv")
    actual, predicted = [a for a, _ in confusion], [p for _, p in confusion]
    assert len(set(predicted)) < len(classes)  # an untrained model: some classes are never predicted
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted, labels=classes, zero_division=0)
    np.testing.assert_allclose([float(r[1]) for r in rows], precision, atol=1e-6)
    np.testing.assert_allclose([float(r[2]) for r in rows], recall, atol=1e-6)
    np.testing.assert_allclose([float(r[3]) for r in rows], f1, atol=1e-6)
    assert [int(r[4]) for r in rows] == support.tolist()
    macro = precision_recall_fscore_support(actual, predicted, labels=classes, average="macro", zero_division=0)
    test = evaluated["metrics"]["test"]
    assert [test["macro_precision"], test["macro_recall"], test["macro_f1"]] == pytest.approx(macro[:3], abs=1e-6)


def test_per_class_scores_of_a_known_matrix():
    from resnet_pipeline.evaluation import per_class_scores

    # class 0: 3 of 4 right, predicted 5 times; class 1: 2 of 2 right; class 2: never seen nor predicted
    scores = per_class_scores(np.array([[3, 1, 0], [0, 2, 0], [2, 0, 0]]))
    assert scores["precision"].tolist() == pytest.approx([3 / 5, 2 / 3, 0.0])
    assert scores["recall"].tolist() == pytest.approx([3 / 4, 1.0, 0.0])
    assert scores["f1"].tolist() == pytest.approx([2 / 3, 0.8, 0.0])
    assert scores["support"].tolist() == [4, 2, 2]


def test_confusion_matrix_csv_and_png(evaluated):
    from PIL import Image
    from sklearn.metrics import confusion_matrix

    classes = evaluated["classes"]
    header, rows = _read_csv(evaluated["out"] / "confusion_matrix.csv")
    assert header == ["actual/predicted", *classes]
    assert [r[0] for r in rows] == classes
    _, per_image = _read_csv(evaluated["out"] / "confusion.csv")
    expected = confusion_matrix([a for a, _ in per_image], [p for _, p in per_image], labels=classes)
    assert [[int(c) for c in r[1:]] for r in rows] == expected.tolist()

    png = evaluated["out"] / "confusion.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) >= 300


def test_metrics_hold_only_the_models_figures(evaluated):
    """Evaluation knows nothing of the registry: the champion comparison is the gate's (tests/registry/test_gate.py)."""
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    assert set(metrics) == {"test", "test_ci95", "data"}
    assert metrics["data"] == {"manifest_sha256": None}


def test_the_manifest_evaluated_on_is_recorded(evaluated, digits_data, tmp_path):
    from resnet_pipeline.fileio import sha256_file

    sha = sha256_file(digits_data.manifest)
    metrics = evaluate(
        EvaluateConfig(top_k=3), evaluated["out"].parent / "model", digits_data.shards, tmp_path, manifest_sha256=sha
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["data"] == {"manifest_sha256": sha}
    assert metrics["test"] == evaluated["metrics"]["test"]  # the same model on the same data


def test_top_k_larger_than_the_class_count_is_capped(evaluated, digits_data, tmp_path):
    model_dir = evaluated["out"].parent / "model"
    metrics = evaluate(EvaluateConfig(top_k=50), model_dir, digits_data.shards, tmp_path)
    assert metrics["test"]["top10"] == 1.0
    assert metrics["test"]["top1"] == evaluated["metrics"]["test"]["top1"]


def test_missing_model_is_reported(digits_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.keras"):
        evaluate(EvaluateConfig(), tmp_path, digits_data.shards, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
