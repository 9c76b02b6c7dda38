"""Evaluate stage: loss, top-1, top-k and per-class accuracy of the trained model on the test split.

Writes `metrics.json`, `per_class.csv` and `confusion.csv` (one row per test image, `actual` and
`predicted` class names: the input of `dvc plots`' confusion template).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline.config import EvaluateConfig
from resnet_pipeline import config as config_mod
from resnet_pipeline.data.pipeline import Preprocess, make_dataset, shard_files
from resnet_pipeline.fileio import atomic_write_json, read_json
from resnet_pipeline.models import resnet  # also registers the custom layers for loading

log = logging.getLogger(__name__)


def load_model(model_dir: str | Path) -> keras.Model:
    path = Path(model_dir) / "model.keras"
    if not path.exists():
        raise FileNotFoundError(f"{path}: model not found; run the train stage first")
    with resnet.recursion_limit():  # ResNet-1202's graph is deeper than Python's default limit
        return keras.saving.load_model(path, safe_mode=True)


def evaluate(cfg: EvaluateConfig, model_dir: str | Path, shards_dir: str | Path, out_dir: str | Path) -> dict:
    """Evaluate `model_dir/model.keras` on the test shards; write and return the metrics."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir)
    classes = read_json(model_dir / "labels.json", "labels")["classes"]
    # the model's own preprocessing: the train params saved beside it
    trained = config_mod.load(model_dir / "config.yaml").train
    files, n_test = shard_files(shards_dir, "test")
    ds = make_dataset(files, 256, Preprocess.from_train(trained, int(model.input_shape[1])), training=False)

    predict = tf.function(lambda x: model(x, training=False))
    logits, labels = [], []
    for images, y in ds:
        logits.append(predict(images).numpy())
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    if len(labels) != n_test:
        raise ValueError(f"{shards_dir}: read {len(labels)} test records, index.json lists {n_test}")

    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    k = min(cfg.top_k, len(classes))
    top_k = np.argsort(-logits, axis=1)[:, :k]
    predicted = top_k[:, 0]
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = []
    for i, name in enumerate(classes):
        support = int(confusion[i].sum())
        per_class.append({"class": name, "support": support,
                          "accuracy": round(float(confusion[i, i] / support), 6) if support else None})
    metrics = {
        "test": {
            "examples": int(len(labels)),
            "loss": round(loss, 6),
            "top1": round(float(np.mean(predicted == labels)), 6),
            f"top{k}": round(float(np.mean((top_k == labels[:, None]).any(axis=1))), 6),
        }
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "support", "accuracy"])
        writer.writeheader()
        writer.writerows(per_class)
    with open(out_dir / "confusion.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted))
    log.info("evaluate: %s", metrics["test"])
    return metrics
