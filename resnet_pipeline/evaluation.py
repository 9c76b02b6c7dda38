"""Evaluate stage: loss, top-1, top-k, per-class precision/recall/F1 of the trained model on the test split.

Writes to the output folder:

- `metrics.json`: `test` (examples, loss, top1, topK, macro-averaged precision, recall and F1),
  `data` (the sha256 of the manifest evaluated on, when given) and `champion` (the comparison
  with the registry's champion, or null);
- `per_class.csv`: class, precision, recall, f1, support;
- `confusion.csv`: one row per test image, `actual` and `predicted` class names (the input of
  `dvc plots`' confusion template);
- `confusion_matrix.csv`: the matrix itself, rows actual, columns predicted, class names as headers;
- `confusion.png`: the same matrix drawn, counts in the cells.
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


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows actual, columns
    predicted); a score whose denominator is zero is 0, as sklearn's `zero_division=0`."""
    confusion = np.asarray(confusion, dtype=np.float64)
    correct = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, correct / predicted, 0.0)
        recall = np.where(support > 0, correct / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def compare_with_champion(candidate: dict, champion: dict | None, manifest_sha256: str | None) -> dict | None:
    """`metrics["champion"]`: the champion's version, whether both were tested on the same split
    (same manifest sha256), and champion, candidate and delta for every test figure both have."""
    if champion is None:
        return None
    theirs = champion.get("test") or {}
    champion_sha = (champion.get("data") or {}).get("manifest_sha256")
    figures = {}
    for name, mine in candidate.items():
        other = theirs.get(name)
        if isinstance(mine, (int, float)) and isinstance(other, (int, float)) and name != "examples":
            figures[name] = {"champion": other, "candidate": mine, "delta": round(mine - other, 6)}
    return {
        "version": champion.get("version"),
        "same_test_split": manifest_sha256 is not None and champion_sha == manifest_sha256,
        "metrics": figures,
    }


def plot_confusion(confusion: np.ndarray, classes: list[str], path: str | Path) -> Path:
    """The confusion matrix as a PNG: actual classes down, predicted across, counts in the cells."""
    from matplotlib.figure import Figure  # drawn with Agg, without pyplot's global state

    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2.0), 40.0)
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=classes, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix (test)")
    if n <= 50:  # beyond, the counts would not fit in the cells
        threshold = confusion.max() / 2 if confusion.size else 0
        for (i, j), count in np.ndenumerate(confusion):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def evaluate(cfg: EvaluateConfig, model_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, *,
             champion: dict | None = None, manifest_sha256: str | None = None) -> dict:
    """Evaluate `model_dir/model.keras` on the test shards; write and return the metrics.

    `champion`, the registry's current best as `{"version": N, "test": {...}, "data":
    {"manifest_sha256": ...}}`, is compared figure by figure with this model; `manifest_sha256`
    identifies the data evaluated on (recorded, and compared with the champion's).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir)
    classes = read_json(model_dir / "labels.json", "labels")["classes"]
    # the model's own preprocessing: the train params saved beside it
    trained = config_mod.load(model_dir / "config.yaml").train
    files, n_test = shard_files(shards_dir, "test")
    ds = make_dataset(files, 256, Preprocess.from_train(trained, int(model.input_shape[1])), training=False)

    predict = tf.function(lambda x: model(x, training=False))
    logit_batches, label_batches = [], []
    for images, y in ds:
        logit_batches.append(predict(images).numpy())
        label_batches.append(y.numpy())
    logits, labels = np.concatenate(logit_batches), np.concatenate(label_batches)
    if len(labels) != n_test:
        raise ValueError(f"{shards_dir}: read {len(labels)} test records, index.json lists {n_test}")

    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    k = min(cfg.top_k, len(classes))
    top_k = np.argsort(-logits, axis=1)[:, :k]
    predicted = top_k[:, 0]
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    scores = per_class_scores(confusion)
    per_class = [{"class": name, **{m: round(float(scores[m][i]), 6) for m in ("precision", "recall", "f1")},
                  "support": int(scores["support"][i])} for i, name in enumerate(classes)]
    test = {
        "examples": int(len(labels)),
        "loss": round(loss, 6),
        "top1": round(float(np.mean(predicted == labels)), 6),
        f"top{k}": round(float(np.mean((top_k == labels[:, None]).any(axis=1))), 6),
    }
    for m in ("precision", "recall", "f1"):  # macro: the unweighted mean over classes
        test[f"macro_{m}"] = round(float(np.mean(scores[m])), 6)
    metrics = {
        "test": test,
        "data": {"manifest_sha256": manifest_sha256},
        "champion": compare_with_champion(test, champion, manifest_sha256),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(per_class)
    with open(out_dir / "confusion.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["actual", "predicted"])
        rows.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted))
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["actual/predicted", *classes])
        rows.writerows([name, *map(int, row)] for name, row in zip(classes, confusion))
    plot_confusion(confusion, classes, out_dir / "confusion.png")
    atomic_write_json(out_dir / "metrics.json", metrics)  # last: the stage is done when it exists
    log.info("evaluate: %s", metrics["test"])
    return metrics
