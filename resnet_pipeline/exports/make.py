"""Export a model folder: convert, check against the Keras model, then write the file and its JSON.

    records = export_model("artifacts/model", {"onnx": Path("out/model.onnx")}, shards_dir="data/shards")

The check runs the export and `model.keras` on the same seeded sample of the test split
(`ExportSettings.check_images`), preprocessed as the evaluate stage does, and compares the softmax of
their outputs: a float format (onnx, litert) is refused if any probability differs by more than
`max_diff`; `litert-int8` is refused if its top-1 class is Keras' on a smaller share of the images than
`min_agreement`. Nothing is written for a refused export. The figures go into the JSON beside the file
(`model.onnx.json`), with what a caller needs: the input's name, shape, dtype (and int8 scale), the
preprocessing, the labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import TrainConfig
from resnet_pipeline.data.pipeline import CAFFE_BGR_MEANS, Preprocess
from resnet_pipeline.exports.convert import ONNX_OPSET, convert, weight_quantization
from resnet_pipeline.exports.formats import FORMATS, ExportError, ExportSettings, get_format, sidecar
from resnet_pipeline.exports.runtime import Runner, softmax
from resnet_pipeline.exports.sample import sample_split
from resnet_pipeline.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

OUTPUT_VALUES = "logits: the softmax over the last axis gives the probabilities of the classes, in the order of labels"


def keras_logits(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The model's float32 logits, `batch_size` images a call, in a graph (eager keeps every activation:
    ResNet-50 at 224 px took 6 GB for 32 images that way, 0.4 GB in a tf.function)."""
    forward = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32))
    parts = [forward(tf.constant(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate([p.numpy() for p in parts])


def preprocessing(train: TrainConfig, image_size: int) -> dict[str, Any]:
    """How an image becomes the model's input (`data.pipeline.eval_image`), for a caller to repeat."""
    mode = config_mod.input_mode(train)
    normalise: dict[str, Any] = {
        "scale": {"channel_order": "RGB", "scale": 1 / 255, "mean": list(train.mean), "std": list(train.std)},
        "caffe": {"channel_order": "BGR", "scale": 1.0, "mean": list(CAFFE_BGR_MEANS), "std": [1.0, 1.0, 1.0]},
        "tf": {"channel_order": "RGB", "scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0], "std": [1.0, 1.0, 1.0]},
    }[mode]
    return {
        "decode": "the image file (JPEG, PNG, GIF's first frame, BMP) as 8-bit RGB",
        "resize": {
            "shorter_side": math.ceil(image_size / train.eval_crop),
            "method": "bilinear, half-pixel centres, no antialiasing (tf.image.resize)",
            "longer_side": "scaled by the same factor, rounded",
        },
        "crop": {
            "size": [image_size, image_size],
            "where": "centre (offsets rounded down)",
            "eval_crop": train.eval_crop,
        },
        "mode": mode,
        **normalise,
        "formula": "x = (pixel * scale - mean) / std per channel, in channel_order, float32, NHWC",
    }


def check(
    fmt: str,
    reference: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray | None,
    settings: ExportSettings,
    what: str = "test images",
    refuse: bool = True,
) -> dict[str, Any]:
    """The figures of an export's outputs (`logits`) against Keras' (`reference`) on the same images;
    an ExportError if they are beyond the format's bound (with `refuse`; else `passed` says so)."""
    spec = get_format(fmt)
    theirs, ours = softmax(reference), softmax(logits)
    figures: dict[str, Any] = {
        "images": int(len(reference)),
        "max_abs_diff": float(np.max(np.abs(theirs - ours))),
        "max_abs_diff_logits": float(np.max(np.abs(reference - logits))),
        "top1_agreement": float(np.mean(theirs.argmax(1) == ours.argmax(1))),
    }
    if labels is not None:
        figures["keras_top1"] = float(np.mean(theirs.argmax(1) == labels))
        figures["top1"] = float(np.mean(ours.argmax(1) == labels))
        figures["top1_change"] = figures["top1"] - figures["keras_top1"]
    if spec.int8:
        figures["bound"] = {"min_top1_agreement": settings.min_agreement}
        figures["passed"] = figures["top1_agreement"] >= settings.min_agreement
        problem = (
            f"its top-1 class is Keras' on {figures['top1_agreement']:.4f} of {figures['images']} {what}, "
            f"below the bound {settings.min_agreement} (register.export_min_agreement)"
        )
    else:
        figures["bound"] = {"max_abs_diff": settings.max_diff}
        figures["passed"] = figures["max_abs_diff"] <= settings.max_diff
        problem = (
            f"a probability differs from Keras' by {figures['max_abs_diff']:.3g} on {figures['images']} {what}, "
            f"above the bound {settings.max_diff:g} (register.export_max_diff)"
        )
    if refuse and not figures["passed"]:
        raise ExportError(f"{fmt}: refused, nothing written: {problem}")
    return figures


def _versions(fmt: str) -> dict[str, str | None]:
    names = ["tensorflow", "keras"] + (["tf2onnx", "onnx", "onnxruntime"] if fmt == "onnx" else ["ai-edge-litert"])
    found: dict[str, str | None] = {}
    for name in names:
        for dist in (name, "tensorflow-cpu") if name == "tensorflow" else (name,):
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                found[name] = None
    return found


def describe(
    fmt: str,
    file: str,
    content: bytes,
    runner: Runner,
    *,
    labels: list[str],
    prep: dict[str, Any],
    check_figures: dict[str, Any],
    source: dict[str, Any],
    settings: ExportSettings,
    calibration_images: int = 0,
) -> dict[str, Any]:
    """The JSON written beside an export."""
    spec = get_format(fmt)
    record: dict[str, Any] = {
        "format": fmt,
        "file": file,
        "bytes": len(content),
        "sha256": sha256_bytes(content),
        "runtime": spec.runtime,
        "source": source,
        "input": {**runner.input, "layout": "NHWC"},
        "output": {**runner.output, "values": OUTPUT_VALUES},
        "preprocessing": prep,
        "labels": list(labels),
        "check": {"reference": "keras", "split": "test", "seed": settings.seed, **check_figures},
        "versions": _versions(fmt),
    }
    if fmt == "onnx":
        record["onnx_opset"] = ONNX_OPSET
    if spec.int8:
        record["quantization"] = {
            "weights": "int8, a scale per output channel",
            "activations": "int8, a scale per tensor",
            "input_output": "int8: quantize the input with input.quantization, dequantize the output",
            "weight_tensors": weight_quantization(content),
            "calibration": {"split": "train", "images": calibration_images, "seed": settings.seed},
        }
    return record


def summary(record: dict[str, Any]) -> str:
    """One line on an export and its check."""
    c = record["check"]
    if "min_top1_agreement" in c["bound"]:
        figure = f"top-1 agreement with Keras {c['top1_agreement']:.4f} (bound >= {c['bound']['min_top1_agreement']})"
    else:
        figure = f"max |Δ| of the probabilities {c['max_abs_diff']:.2g} (bound <= {c['bound']['max_abs_diff']:g})"
    top1 = f", top-1 {c['top1']:.4f} (Keras {c['keras_top1']:.4f})" if "top1" in c else ""
    size = f"{record['bytes'] / 1e6:.2f} MB"
    return f"{record['format']}: {record['file']}, {size}, {figure}{top1} on {c['images']} test images"


def export_model(
    model_dir: str | Path,
    targets: Mapping[str, str | Path],
    *,
    shards_dir: str | Path,
    settings: ExportSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Export `model_dir` (model.keras, params.yaml, labels.json) in each format of `targets` (format ->
    file to write), each checked first; the JSON record of each, also written beside its file."""
    from resnet_pipeline.evaluation import load_model

    settings = settings or ExportSettings()
    for fmt in targets:
        get_format(fmt)
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    trained = config_mod.load_saved(model_dir / config_mod.MODEL_PARAMS).train
    classes = read_json(model_dir / "labels.json", "labels")["classes"]
    size = int(model.input_shape[1])
    prep = Preprocess.from_train(trained, size)
    images, labels = sample_split(shards_dir, "test", settings.check_images, prep, settings.seed)
    reference = keras_logits(model, images)
    calibration = None
    if any(FORMATS[fmt].int8 for fmt in targets):
        calibration, _ = sample_split(shards_dir, "train", settings.calibration_images, prep, settings.seed)
    source = {"file": "model.keras", "sha256": sha256_file(model_dir / "model.keras")}
    records = {}
    for fmt, target in targets.items():
        target = Path(target)
        log.info("export: converting %s to %s", model_dir / "model.keras", fmt)
        content = convert(model, fmt, calibration)
        runner = Runner(fmt, content)
        figures = check(fmt, reference, runner.logits(images), labels, settings)
        record = describe(
            fmt,
            target.name,
            content,
            runner,
            labels=classes,
            prep=preprocessing(trained, size),
            check_figures=figures,
            source=source,
            settings=settings,
            calibration_images=0 if calibration is None else len(calibration),
        )
        atomic_write_bytes(target, content)
        atomic_write_json(sidecar(target), record)  # last: an export without its JSON is not one
        log.debug("export: %s", summary(record))
        records[fmt] = record
    return records


class RegistrationExports:
    """For the register stage: called with a folder, exports `model_dir` in `formats` into it and
    returns the files to add to the version (name in the version -> file); `records` then holds the
    JSON record of each format."""

    def __init__(self, formats: tuple[str, ...], model_dir: Path, shards_dir: Path, settings: ExportSettings):
        self.formats, self.model_dir, self.shards_dir, self.settings = formats, model_dir, shards_dir, settings
        self.records: dict[str, dict[str, Any]] = {}

    def __call__(self, folder: Path) -> dict[str, Path]:
        targets = {fmt: folder / FORMATS[fmt].file for fmt in self.formats}
        self.records = export_model(self.model_dir, targets, shards_dir=self.shards_dir, settings=self.settings)
        return {path.name: path for target in targets.values() for path in (target, sidecar(target))}
