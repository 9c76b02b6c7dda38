"""The export formats beside the Keras model and its SavedModel, in one run: file size, top-1 (and its
change from Keras), the check's figure, and latency per image at batch 1 and at batch 32.

    resnet-pipeline benchmark export [--model artifacts/model] [--formats onnx,litert,litert-int8]
                                     [--reference-depth 50 --reference-variant v1.5 --reference-size 224]

Two models:

- the project's (`--model`, default the train stage's folder) on a seeded sample of its test split
  (`register.export_check_images`; the whole split if smaller), top-1 against the labels, int8
  calibrated on the train split as the register stage does;
- a reference ResNet of the table with random weights (default ResNet-50 v1.5 at 224 px, 1000 classes)
  on random images (uniform in [0, 1]); with no labels, its "top-1" is the share of images whose top
  class is Keras', and its int8 is calibrated on the same images.

Each side runs on the same images: Keras (the model's call in a `tf.function`), the SavedModel (its
`serving_images` signature, loaded back), ONNX Runtime and LiteRT (`ai_edge_litert`) with as many
threads as cores. The timed calls take turns (`harness.timed_rounds`), after untimed warm-up calls; the
figure is the median call divided by the batch. Each export is checked as `resnet-pipeline export` does,
and its line says whether it is within the bound; a benchmark does not refuse it.
"""

from __future__ import annotations

import functools
import gc
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline.benchmark.harness import Timing, timed_rounds
from resnet_pipeline.data.pipeline import Preprocess
from resnet_pipeline.exports.formats import FORMATS, ExportSettings
from resnet_pipeline.exports.make import check, keras_logits
from resnet_pipeline.exports.runtime import Runner, softmax

log = logging.getLogger(__name__)

BATCHES = (1, 32)


class Reference(NamedTuple):
    """The reference network: a model of the table with random weights, on random images."""

    depth: int = 50
    variant: str = "v1.5"
    image_size: int = 224
    classes: int = 1000
    images: int = 64


REFERENCE = Reference()


class Subject(NamedTuple):
    """A model and the images it is measured on."""

    name: str
    model: keras.Model
    classes: list[str]
    prep: Preprocess
    images: np.ndarray
    labels: np.ndarray | None  # None: top-1 is agreement with Keras
    calibration: np.ndarray
    keras_file: Path


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _latencies(sides: dict[str, Any], images: np.ndarray, steps: int, warmup: int, rounds: int) -> dict[str, dict]:
    """Per side, ms per image at each batch of `BATCHES` (median call / batch)."""
    found: dict[str, dict] = {label: {} for label in sides}
    for batch in BATCHES:
        x = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)  # repeats the images if fewer
        calls = max(2, steps if batch == 1 else steps // 4)
        timing = Timing(batch, int(images.shape[1]), calls, warmup, min(rounds, calls))
        calls_of = {label: functools.partial(f, x) for label, f in sides.items()}
        durations = timed_rounds(calls_of, timing, f"batch {batch}")
        for label, values in durations.items():
            found[label][batch] = statistics.median(values) / batch * 1e3
    return found


def measure(
    subject: Subject, formats: list[str], settings: ExportSettings, *, steps: int, warmup: int, rounds: int
) -> list[dict]:
    """The rows of one model: keras, saved_model, then each format."""
    from resnet_pipeline.export import SIGNATURE_IMAGES, export_saved_model
    from resnet_pipeline.exports.convert import convert

    model, images, labels = subject.model, subject.images, subject.labels
    reference = keras_logits(model, images)
    keras_top = reference.argmax(1)
    forward = tf.function(lambda x: model(x, training=False))
    sides: dict[str, Any] = {"keras": lambda x: np.asarray(forward(tf.constant(x)))}
    rows: dict[str, dict] = {"keras": {"bytes": _size(subject.keras_file), "predicted": keras_top}}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = export_saved_model(model, subject.classes, subject.prep, Path(tmp) / "saved_model", top_k=1)
        serve = tf.saved_model.load(str(folder)).signatures[SIGNATURE_IMAGES]
        sides["saved_model"] = lambda x: serve(images=tf.constant(x))["class_ids"].numpy()
        chunks = range(0, len(images), 32)
        predicted = np.concatenate([sides["saved_model"](images[i : i + 32])[:, 0] for i in chunks])
        rows["saved_model"] = {"bytes": _size(folder), "predicted": predicted}
        for fmt in formats:
            log.info("benchmark export: %s, converting to %s", subject.name, fmt)
            content = convert(model, fmt, subject.calibration if FORMATS[fmt].int8 else None)
            runner = Runner(fmt, content)
            logits = runner.logits(images)
            figures = check(fmt, reference, logits, labels, settings, refuse=False)
            rows[fmt] = {"bytes": len(content), "predicted": softmax(logits).argmax(1), "check": figures}
            sides[fmt] = runner.logits
        times = _latencies(sides, images, steps, warmup, rounds)
    out = []
    truth = labels if labels is not None else keras_top
    keras_top1 = float(np.mean(keras_top == truth))
    for side, row in rows.items():
        top1 = float(np.mean(row["predicted"] == truth))
        c = row.get("check") or {}
        bound = c.get("bound", {})
        out.append(
            {
                "model": subject.name,
                "format": side,
                "bytes": row["bytes"],
                "images": int(len(images)),
                "top1": top1,
                "top1_is": "accuracy" if labels is not None else "agreement with keras",
                "top1_change": top1 - keras_top1,
                "agreement": float(np.mean(row["predicted"] == keras_top)),
                "max_abs_diff": c.get("max_abs_diff"),
                "max_abs_diff_logits": c.get("max_abs_diff_logits"),
                "max_abs_logit": float(np.max(np.abs(reference))),
                "bound": bound,
                "within_bound": c.get("passed"),
                **{f"ms_per_image_batch{b}": times[side][b] for b in BATCHES},
            }
        )
    return out


def project_subject(model_dir: Path, shards_dir: Path, settings: ExportSettings) -> Subject:
    from resnet_pipeline import config as config_mod
    from resnet_pipeline.evaluation import load_model
    from resnet_pipeline.exports.sample import sample_split
    from resnet_pipeline.fileio import read_json

    model = load_model(model_dir)
    trained = config_mod.load_saved(model_dir / config_mod.MODEL_PARAMS).train
    prep = Preprocess.from_train(trained, int(model.input_shape[1]))
    images, labels = sample_split(shards_dir, "test", settings.check_images, prep, settings.seed)
    calibration, _ = sample_split(shards_dir, "train", settings.calibration_images, prep, settings.seed)
    name = f"{model.name} ({model_dir})"
    classes = read_json(model_dir / "labels.json", "labels")["classes"]
    return Subject(name, model, classes, prep, images, labels, calibration, model_dir / "model.keras")


def reference_subject(reference: Reference, folder: Path, seed: int) -> Subject:
    from resnet_pipeline.models.resnet import build_resnet
    from resnet_pipeline.models.specs import SPECS, VARIANTS

    keras.utils.set_random_seed(seed)
    variant = VARIANTS[reference.variant]
    if reference.depth not in SPECS[variant.family]:
        allowed = ", ".join(map(str, SPECS[variant.family]))
        raise ValueError(f"--reference-depth: received {reference.depth} for {reference.variant!r}; allowed: {allowed}")
    model = build_resnet(
        reference.depth,
        variant.family,
        input_shape=(reference.image_size, reference.image_size, 3),
        num_classes=reference.classes,
        stride_in_1x1=variant.stride_in_1x1 and SPECS[variant.family][reference.depth].block == "bottleneck",
    )
    size = reference.image_size
    images = np.random.default_rng(seed).uniform(0, 1, (reference.images, size, size, 3)).astype(np.float32)
    path = folder / "reference.keras"
    model.save(path)
    name = f"ResNet-{reference.depth} {reference.variant} {size}px, random weights"
    classes = [str(i) for i in range(reference.classes)]
    return Subject(name, model, classes, Preprocess(size), images, None, images, path)


def run(
    model_dir: Path | None,
    shards_dir: Path | None,
    *,
    formats: list[str],
    settings: ExportSettings,
    reference: Reference | None = REFERENCE,
    steps: int = 20,
    warmup: int = 2,
    rounds: int = 2,
) -> dict:
    """Rows for the project's model (if `model_dir`) and the reference network (if `reference`)."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        subjects = []
        if model_dir is not None and shards_dir is not None:
            subjects.append(lambda: project_subject(Path(model_dir), Path(shards_dir), settings))
        if reference is not None:
            subjects.append(lambda: reference_subject(reference, Path(tmp), settings.seed))
        for make in subjects:
            subject = make()
            rows += measure(subject, formats, settings, steps=steps, warmup=warmup, rounds=rounds)
            del subject
            keras.backend.clear_session()
            gc.collect()
    return {"settings": settings.to_dict(), "rows": rows}


def format_result(result: dict) -> str:
    rows = result["rows"]
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        lines += [
            f"{model}: {mine[0]['images']} images, top-1 is {mine[0]['top1_is']}",
            f"  {'format':<12} {'MB':>8} {'top-1':>7} {'Δ top-1':>8} {'agree':>6} {'max |Δp|':>9} "
            f"{'max |Δz|':>9} {'bound':>6} {'ms/img b1':>10} {'ms/img b32':>11}",
        ]
        for r in mine:
            diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            diff_z = "" if r["max_abs_diff_logits"] is None else f"{r['max_abs_diff_logits']:.1e}"
            bound = "" if r["within_bound"] is None else ("ok" if r["within_bound"] else "BEYOND")
            lines.append(
                f"  {r['format']:<12} {r['bytes'] / 1e6:>8.2f} {r['top1']:>7.4f} {r['top1_change']:>+8.4f} "
                f"{r['agreement']:>6.3f} {diff:>9} {diff_z:>9} {bound:>6} {r['ms_per_image_batch1']:>10.2f} "
                f"{r['ms_per_image_batch32']:>11.2f}"
            )
    s = result["settings"]
    lines.append(
        f"bounds: float formats max |Δp| (probabilities) <= {s['max_diff']:g}; litert-int8 top-1 agreement "
        f">= {s['min_agreement']}. Δz: of the logits (largest |logit|: "
        + ", ".join(f"{model} {z:.3g}" for model, z in {r["model"]: r["max_abs_logit"] for r in rows}.items())
        + ")"
    )
    return "\n".join(lines)
