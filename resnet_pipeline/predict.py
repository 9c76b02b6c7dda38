"""Predict: the top-k classes of image files with a trained model, preprocessed as in evaluation.

    resnet-pipeline predict --model artifacts/model IMAGE... [--top-k K] [--json]
    resnet-pipeline predict --model NAME[:VERSION|@ALIAS] [--registry LOCATION] IMAGE...
    resnet-pipeline predict --model MODEL --format onnx|litert|litert-int8 IMAGE...

The model folder holds `model.keras`, `labels.json` and `params.yaml`, the config it was trained
with (as the train stage writes it and the registry stores it).
A registry spec is pulled (and verified) into the cache folder first: `$RESNET_PIPELINE_CACHE`,
else `~/.cache/resnet-pipeline/models`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import MODEL_PARAMS, Config
from resnet_pipeline.data.pipeline import Preprocess, eval_image
from resnet_pipeline.fileio import read_json

log = logging.getLogger(__name__)

IMAGE_FORMATS = "JPEG, PNG, GIF or BMP"  # what tf.io.decode_image reads
BATCH = 64


def cache_dir() -> Path:
    """Where registry versions are pulled to: `$RESNET_PIPELINE_CACHE`, else ~/.cache/resnet-pipeline/models."""
    return Path(os.environ.get("RESNET_PIPELINE_CACHE") or Path.home() / ".cache" / "resnet-pipeline" / "models")


def is_registry_spec(model: str) -> bool:
    """`NAME`, `NAME:VERSION` or `NAME@ALIAS` (the registry's grammar) that is not an existing path."""
    from resnet_pipeline.registry.spec import is_spec

    return not Path(model).exists() and is_spec(model)


def resolve_model(model: str, registry) -> Path:
    """The model folder named by `model`: a folder as it is, a registry spec pulled into `cache_dir()`
    from `registry` (a Registry, a folder or s3:// location, or None)."""
    if not is_registry_spec(model):
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: model folder not found; expected a folder with model.keras, "
                f"labels.json and {MODEL_PARAMS}, or a registry spec NAME[:VERSION|@ALIAS]"
            )
        return path
    if registry is None:
        raise FileNotFoundError(
            f"{model}: no such model folder, and no registry to look the spec up in "
            "(pass --registry, or run where params.yaml names register.registry)"
        )
    from resnet_pipeline.registry import fetch_model

    return Path(fetch_model(model, registry, cache_dir()))


def model_config(model_dir: str | Path) -> Config:
    """The config saved with a model, `params.yaml` (also as release 0.1 wrote it)."""
    path = Path(model_dir) / MODEL_PARAMS
    if not path.exists():
        old = " (release 0.1's train stage named it config.yaml: train again, or rename it)"
        raise FileNotFoundError(
            f"{model_dir}: no {MODEL_PARAMS} beside the model; expected a model folder written by the train "
            f"stage or pulled from the registry{old if (path.parent / 'config.yaml').exists() else ''}"
        )
    return config_mod.load_saved(path)


def read_image(path: str | Path) -> bytes:
    """The bytes of an image file, checked to decode; errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
        raise ValueError(f"{path}: not an image; expected an encoded {IMAGE_FORMATS} file") from None
    return data


def predict(
    model_dir: str | Path, images: list[str | Path], top_k: int | None = None, fmt: str | None = None
) -> list[dict]:
    """`[{"image": path, "top_k": [{"label", "probability"}, ...]}]` per image, best first.

    `top_k` defaults to the model config's `evaluate.top_k`; it is capped at the number of classes.
    `fmt` (onnx, litert, litert-int8) runs the folder's export in that format (`model.onnx`, ...)
    instead of `model.keras`, with ONNX Runtime or LiteRT, on the same preprocessed images.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder not found")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k: received {top_k}; allowed: 1 or more")
    if not images:
        raise ValueError("no images given")
    encoded = [read_image(p) for p in images]  # every file checked before the model loads
    cfg = model_config(model_dir)
    classes = read_json(model_dir / "labels.json", "labels")["classes"]
    run, image_size = _model_function(model_dir, fmt)
    prep = Preprocess.from_train(cfg.train, image_size)
    k = min(top_k or cfg.evaluate.top_k, len(classes))

    batches = []
    for start in range(0, len(encoded), BATCH):
        batch = tf.stack([eval_image(tf.constant(b), prep) for b in encoded[start : start + BATCH]])
        logits = tf.cast(run(batch), tf.float32)
        batches.append(tf.nn.softmax(logits, axis=-1).numpy())
    probabilities = np.concatenate(batches)
    results = []
    for path, p in zip(images, probabilities):
        best = np.argsort(-p, kind="stable")[:k]
        results.append({"image": str(path), "top_k": [{"label": classes[i], "probability": float(p[i])} for i in best]})
    return results


def _model_function(model_dir: Path, fmt: str | None):
    """(images -> logits, the input side) of `model.keras` or of the folder's export in `fmt`."""
    if fmt is None:
        from resnet_pipeline.evaluation import load_model

        model = load_model(model_dir)
        return (lambda batch: model(batch, training=False)), int(model.input_shape[1])
    from resnet_pipeline.exports.formats import get_format, sidecar
    from resnet_pipeline.exports.runtime import Runner
    from resnet_pipeline.fileio import sha256_file

    path = model_dir / get_format(fmt).file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no {fmt} export in {model_dir}; make one with `resnet-pipeline export --format {fmt} "
            f"--model {model_dir} {path}`, or register with register.export_formats: [{fmt}]"
        )
    described = sidecar(path)
    if described.is_file() and (model_dir / "model.keras").is_file():  # an export of another model.keras
        made_from = (read_json(described, f"{fmt} export record").get("source") or {}).get("sha256")
        if made_from != sha256_file(model_dir / "model.keras"):
            raise ValueError(
                f"{path}: exported from another model.keras (sha256 {str(made_from)[:12]}..., per "
                f"{described.name}) than the one beside it; export it again"
            )
    runner = Runner(fmt, path)
    return (lambda batch: runner.logits(batch.numpy())), runner.image_size


def format_results(results: list[dict]) -> str:
    """Per image: its path, then one `label  probability` line per class."""
    lines = []
    for r in results:
        lines.append(r["image"])
        width = max(len(t["label"]) for t in r["top_k"])
        lines.extend(f"  {t['label']:<{width}}  {t['probability']:.4f}" for t in r["top_k"])
    return "\n".join(lines)
