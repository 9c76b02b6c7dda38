"""Evaluate stage: loss, top-1, top-k, per-class precision/recall/F1 of the trained model on the test split.

Writes to the output folder:

- `metrics.json`: `test` (examples, loss, top1, topK, macro-averaged precision, recall and F1),
  `test_ci95` (their intervals) and `data` (the sha256 of the manifest evaluated on, when given);
- `per_class.csv`: class, precision, recall, f1, support;
- `confusion.csv`: one row per test image, `actual` and `predicted` class names (the input of
  `dvc plots`' confusion template);
- `confusion_matrix.csv`: the matrix itself, rows actual, columns predicted, class names as headers;
- `confusion.png`: the same matrix drawn, counts in the cells;
- `predictions.parquet`: one row per test image (`sha256`, `filename`, `label`, `predicted`,
  `correct`, `probability` of the predicted class), so two models can be compared image by image.

Beside each test figure, `test_ci95` holds its 95% interval: Wilson's score interval for the
proportions (top-1, top-k), a seeded bootstrap over the test images for the loss and the macro
averages. With `evaluate.tta`, the logits are averaged over test-time views of each image
(`flip`: the mirror image, only where mirroring is valid for the data; `shift`: four translations
by two pixels and the image itself).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import EvaluateConfig
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


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (successes of n); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def bootstrap_interval(values: np.ndarray, statistic, *, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """2.5% and 97.5% quantiles of `statistic` over `samples` resamples of `values` (rows), seeded."""
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = np.array([statistic(values[rng.integers(0, n, n)]) for _ in range(samples)])
    low, high = np.quantile(stats, [0.025, 0.975])
    return float(low), float(high)


def tta_views(images: tf.Tensor, mode: str) -> list[tf.Tensor]:
    """The views of a batch that `evaluate.tta` averages over (the batch itself first)."""
    if mode == "flip":
        return [images, tf.image.flip_left_right(images)]
    if mode == "shift":
        size = tf.shape(images)[1:3]
        padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="SYMMETRIC")
        return [images] + [
            tf.image.crop_to_bounding_box(padded, dy, dx, size[0], size[1])
            for dy, dx in ((0, 2), (4, 2), (2, 0), (2, 4))
        ]
    return [images]


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
            ax.text(
                j, i, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black"
            )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def evaluate(
    cfg: EvaluateConfig,
    model_dir: str | Path,
    shards_dir: str | Path,
    out_dir: str | Path,
    *,
    manifest_sha256: str | None = None,
) -> dict:
    """Evaluate `model_dir/model.keras` on the test shards; write and return the metrics.

    `manifest_sha256` identifies the data evaluated on: it is recorded, and the register stage's
    gate compares it with the champion's.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir)
    classes = read_json(model_dir / "labels.json", "labels")["classes"]
    # the model's own preprocessing: the train params saved beside it
    trained = config_mod.load_saved(model_dir / config_mod.MODEL_PARAMS).train
    files, n_test = shard_files(shards_dir, "test")
    ds = make_dataset(files, 256, Preprocess.from_train(trained, int(model.input_shape[1])), training=False)

    if cfg.tta == "flip" and not trained.random_flip:
        raise ValueError(
            "evaluate.tta: received 'flip' but the model was trained with train.random_flip: false "
            "(mirror images are not valid for this data, e.g. digits); use 'shift' or 'none'"
        )

    @tf.function
    def predict(images):  # mean of the softmax over the views, back as log-probabilities
        views = tta_views(images, cfg.tta)
        probs = tf.add_n([tf.nn.softmax(tf.cast(model(v, training=False), tf.float32)) for v in views]) / len(views)
        return (
            tf.math.log(tf.maximum(probs, 1e-12))
            if len(views) > 1
            else tf.cast(model(images, training=False), tf.float32)
        )

    logit_batches, label_batches = [], []
    for images, y in ds:
        logit_batches.append(predict(images).numpy())
        label_batches.append(y.numpy())
    logits, labels = np.concatenate(logit_batches), np.concatenate(label_batches)
    if len(labels) != n_test:
        raise ValueError(f"{shards_dir}: read {len(labels)} test records, index.json lists {n_test}")
    ids = record_ids(files)

    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    k = min(cfg.top_k, len(classes))
    top_k = np.argsort(-logits, axis=1)[:, :k]
    predicted = top_k[:, 0]
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    scores = per_class_scores(confusion)
    per_class = [
        {
            "class": name,
            **{m: round(float(scores[m][i]), 6) for m in ("precision", "recall", "f1")},
            "support": int(scores["support"][i]),
        }
        for i, name in enumerate(classes)
    ]
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
        "test_ci95": intervals(labels, predicted, top_k, logits, n, cfg),
        "data": {"manifest_sha256": manifest_sha256},
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
    write_predictions(out_dir / "predictions.parquet", ids, labels, predicted, logits)
    atomic_write_json(out_dir / "metrics.json", metrics)  # last: the stage is done when it exists
    log.info("evaluate: %s", metrics["test"])
    return metrics


def intervals(
    labels: np.ndarray,
    predicted: np.ndarray,
    top_k: np.ndarray,
    logits: np.ndarray,
    num_classes: int,
    cfg: EvaluateConfig,
) -> dict:
    """95% intervals of the test figures: Wilson for top-1/top-k, a seeded bootstrap for the others."""
    n = len(labels)
    correct = predicted == labels
    out = {"top1": {"low": 0.0, "high": 1.0, "method": "wilson"}}
    out["top1"].update(zip(("low", "high"), wilson_interval(int(correct.sum()), n)))
    k = top_k.shape[1]
    hits = int((top_k == labels[:, None]).any(axis=1).sum())
    out[f"top{k}"] = dict(zip(("low", "high"), wilson_interval(hits, n)), method="wilson")
    losses = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    rows = np.stack([labels, predicted], axis=1)

    def macro(rows: np.ndarray, metric: str) -> float:
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (rows[:, 0], rows[:, 1]), 1)
        return float(np.mean(per_class_scores(confusion)[metric]))

    boot = {"samples": cfg.bootstrap_samples, "seed": cfg.bootstrap_seed}
    if n:
        out["loss"] = dict(zip(("low", "high"), bootstrap_interval(losses, np.mean, **boot)), method="bootstrap")
        for m in ("precision", "recall", "f1"):
            out[f"macro_{m}"] = dict(
                zip(("low", "high"), bootstrap_interval(rows, lambda r, m=m: macro(r, m), **boot)), method="bootstrap"
            )
    return {
        name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()} for name, entry in out.items()
    }


def record_ids(files: list[str]) -> dict[str, np.ndarray]:
    """`sha256` and `filename` of every record of `files`, in the order `make_dataset(training=False)`
    reads them (the same interleave of the same files)."""
    features = {
        "image/sha256": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(4, len(files)),
        deterministic=True,
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    sha: list[str] = []
    names: list[str] = []
    for batch in ds.batch(1024).map(lambda r: tf.io.parse_example(r, features)):
        sha.extend(v.decode() for v in batch["image/sha256"].numpy())
        names.extend(v.decode() for v in batch["image/filename"].numpy())
    return {"sha256": np.array(sha, dtype=object), "filename": np.array(names, dtype=object)}


def write_predictions(path: Path, ids: dict, labels: np.ndarray, predicted: np.ndarray, logits: np.ndarray) -> Path:
    """One row per test image: sha256, filename, label, predicted, correct, probability of the prediction."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    probs = tf.nn.softmax(logits, axis=-1).numpy()
    table = pa.table(
        {
            "sha256": pa.array(list(ids["sha256"]), pa.string()),
            "filename": pa.array(list(ids["filename"]), pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "predicted": pa.array(predicted.astype(np.int32)),
            "correct": pa.array(predicted == labels),
            "probability": pa.array(probs[np.arange(len(predicted)), predicted].astype(np.float32)),
        }
    )
    pq.write_table(table, path)
    return path
