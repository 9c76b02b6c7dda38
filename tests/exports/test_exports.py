"""Exports to ONNX and LiteRT (float and int8) of the session's tiny digits model (tests/tiny_model.py) and
of a random ResNet-18 in ImageNet's layout, each checked against Keras; `resnet-pipeline export`,
`predict --format` and a smoke run of `benchmark export`. All in this process (no TensorFlow start-up
per command). The ResNet-50 at 224 px is measured by `resnet-pipeline benchmark export` itself: its
conversions cost ~10 s each here, too much for the suite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from resnet_pipeline.cli import main
from resnet_pipeline.config import Config
from resnet_pipeline.exports import FORMATS, ExportError, ExportSettings, sidecar
from resnet_pipeline.fileio import sha256_file

SEED = 42
SETTINGS = ExportSettings()  # the params' defaults: the bounds the README states


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    """The default params, written down: the tests do not depend on the repository's params.yaml."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(Config().to_yaml())
    return path


@pytest.fixture(scope="module")
def exported(tiny_model, digits_data, params, tmp_path_factory) -> Path:
    """A copy of the tiny model's folder with its three exports beside model.keras, each made by
    `resnet-pipeline export` (in process) with the default sample sizes and bounds."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(tiny_model.model_dir, folder)
    for fmt in FORMATS:
        args = ["export", "--format", fmt, "--model", str(folder), "--shards", str(digits_data.shards)]
        assert main([*args, "--params", str(params), str(folder)]) == 0, fmt
    return folder


def _record(folder: Path, fmt: str) -> dict:
    return json.loads(sidecar(folder / FORMATS[fmt].file).read_text())


def _test_records(digits_data) -> int:
    index = json.loads((digits_data.shards / "index.json").read_text())
    return sum(s["records"] for s in index["shards"] if s["split"] == "test")


def test_float_exports_give_keras_probabilities_within_the_bound_on_64_test_images(exported, digits_data):
    from resnet_pipeline import config as config_mod
    from resnet_pipeline.data.pipeline import Preprocess
    from resnet_pipeline.evaluation import load_model
    from resnet_pipeline.exports.make import keras_logits
    from resnet_pipeline.exports.runtime import Runner, softmax
    from resnet_pipeline.exports.sample import sample_split

    model = load_model(exported)
    prep = Preprocess.from_train(config_mod.load_saved(exported / "params.yaml").train, 32)
    images, _ = sample_split(digits_data.shards, "test", 64, prep, SEED)
    assert images.shape == (64, 32, 32, 3)
    reference = softmax(keras_logits(model, images))
    for fmt in ("onnx", "litert"):
        ours = softmax(Runner(fmt, exported / FORMATS[fmt].file).logits(images))
        diff = float(np.max(np.abs(ours - reference)))
        print(f"{fmt}: max |Δ| of the probabilities on 64 test images {diff:.3g} (bound {SETTINGS.max_diff})")
        assert diff <= SETTINGS.max_diff, fmt
        assert (ours.argmax(1) == reference.argmax(1)).all(), fmt
        check = _record(exported, fmt)["check"]  # the export's own check: every test image
        assert check["images"] == _test_records(digits_data)
        assert check["passed"] and check["max_abs_diff"] <= SETTINGS.max_diff
        assert check["bound"] == {"max_abs_diff": SETTINGS.max_diff}


def test_int8_keeps_top1_within_a_point_of_float_in_a_third_of_the_size(exported, digits_data):
    from resnet_pipeline.exports.convert import litert_ops

    int8, float32 = _record(exported, "litert-int8"), _record(exported, "litert")
    check = int8["check"]
    print(
        f"litert-int8: top-1 {check['top1']:.4f} vs Keras {check['keras_top1']:.4f} on {check['images']} test "
        f"images, agreement {check['top1_agreement']:.4f}; {int8['bytes']} bytes vs {float32['bytes']}"
    )
    assert check["images"] == _test_records(digits_data), "the whole test split"
    assert check["passed"] and check["top1_agreement"] >= SETTINGS.min_agreement
    # Top-1 within a point of float. The tiny model trained 20 steps (top-1 ~0.45) has small margins,
    # so int8 flips a few of its answers either way: on the 187 test images alone, two net flips are
    # 1.07 points. So the claim is measured on every digit (1,797 images: a point is 18 of them);
    # `benchmark export` shows it on the test split of a trained model.
    keras_top1, int8_top1, images = _top1_on_every_digit(exported, digits_data)
    print(f"on all {images} digits: litert-int8 top-1 {int8_top1:.4f} vs Keras {keras_top1:.4f}")
    assert abs(int8_top1 - keras_top1) <= 0.01
    assert int8["bytes"] <= float32["bytes"] / 3
    assert int8["input"]["dtype"] == "int8" and int8["output"]["dtype"] == "int8"
    assert set(int8["input"]["quantization"]) == {"scale", "zero_point"}
    assert int8["quantization"]["calibration"] == {"split": "train", "images": 200, "seed": SEED}
    ops = litert_ops((exported / "model.int8.tflite").read_bytes())
    convolutions = [op for op in ops if op["op"] == "CONV_2D"]
    assert convolutions and all(op["inputs"][1]["scales"] > 1 for op in convolutions), "a scale per output channel"
    assert not [op for op in ops if any(t["type"] == "FLOAT32" for t in op["inputs"] + op["outputs"])]


def _top1_on_every_digit(exported: Path, digits_data) -> tuple[float, float, int]:
    """(Keras top-1, litert-int8 top-1, images) on every split of the digits."""
    from resnet_pipeline import config as config_mod
    from resnet_pipeline.data.pipeline import Preprocess
    from resnet_pipeline.evaluation import load_model
    from resnet_pipeline.exports.make import keras_logits
    from resnet_pipeline.exports.runtime import Runner
    from resnet_pipeline.exports.sample import sample_split

    prep = Preprocess.from_train(config_mod.load_saved(exported / "params.yaml").train, 32)
    parts = [sample_split(digits_data.shards, split, 10**6, prep, SEED) for split in ("train", "val", "test")]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    keras_pred = keras_logits(load_model(exported), images).argmax(1)
    int8_pred = Runner("litert-int8", exported / FORMATS["litert-int8"].file).logits(images).argmax(1)
    return float((keras_pred == labels).mean()), float((int8_pred == labels).mean()), len(labels)


def test_the_json_tells_a_caller_what_to_feed_each_export(exported):
    labels = json.loads((exported / "labels.json").read_text())["classes"]
    for fmt, spec in FORMATS.items():
        record = _record(exported, fmt)
        path = exported / spec.file
        assert (record["format"], record["file"], record["runtime"]) == (fmt, spec.file, spec.runtime)
        assert (record["bytes"], record["sha256"]) == (path.stat().st_size, sha256_file(path))
        assert record["source"] == {"file": "model.keras", "sha256": sha256_file(exported / "model.keras")}
        assert record["input"]["shape"] == [None, 32, 32, 3] and record["input"]["layout"] == "NHWC"
        assert record["input"]["name"] in ("image", "serving_default_image:0")
        assert record["output"]["shape"] == [None, 10] and record["output"]["values"].startswith("logits")
        assert record["labels"] == labels
        prep = record["preprocessing"]
        assert (prep["mode"], prep["channel_order"], prep["scale"]) == ("scale", "RGB", 1 / 255)
        assert (prep["mean"], prep["std"]) == ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        assert prep["resize"]["shorter_side"] == 32 and prep["crop"]["size"] == [32, 32]
        assert record["check"]["reference"] == "keras" and record["check"]["seed"] == SEED
    assert _record(exported, "onnx")["onnx_opset"] == 17
    assert _record(exported, "onnx")["input"]["dtype"] == "float32"


def test_predict_runs_each_format_with_keras_top_k(exported, tiny_model, capsys):
    def predicted(*extra) -> list[dict]:
        assert main(["predict", "--model", str(exported), "--json", "--top-k", "3", *extra, *images]) == 0
        return json.loads(capsys.readouterr().out)

    images = list(map(str, tiny_model.images))
    keras = predicted()
    for fmt in FORMATS:
        ours = predicted("--format", fmt)
        assert [r["image"] for r in ours] == images
        assert all(len(r["top_k"]) == 3 for r in ours)
        if FORMATS[fmt].int8:
            continue  # its top-1 agrees with Keras' on most images, not all: see the check's figure
        assert [[t["label"] for t in r["top_k"]] for r in ours] == [[t["label"] for t in r["top_k"]] for r in keras]
        ours_p = [[t["probability"] for t in r["top_k"]] for r in ours]
        assert np.allclose(ours_p, [[t["probability"] for t in r["top_k"]] for r in keras], atol=SETTINGS.max_diff)


def test_predict_refuses_a_missing_export_and_one_of_another_model(exported, tiny_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model.model_dir, bare)
    image = str(tiny_model.images[0])
    assert main(["predict", "--model", str(bare), "--format", "onnx", image]) == 2
    err = capsys.readouterr().err
    assert f"{bare / 'model.onnx'}: no onnx export" in err and "resnet-pipeline export --format onnx" in err

    other = tmp_path / "other"
    shutil.copytree(exported, other)
    with open(other / "model.keras", "ab") as f:  # another model.keras than the export's
        f.write(b"\0")
    assert main(["predict", "--model", str(other), "--format", "litert", image]) == 2
    assert "model.tflite: exported from another model.keras" in capsys.readouterr().err


def test_an_export_beyond_its_bound_is_refused_and_nothing_is_written(
    tiny_model, digits_data, params, tmp_path, monkeypatch, capsys
):
    from resnet_pipeline.exports.runtime import Runner

    logits = Runner.logits
    shift = np.linspace(0.0, 2.0, 10, dtype=np.float32)  # moves every probability by far more than 1e-4
    monkeypatch.setattr(Runner, "logits", lambda self, images, batch_size=64: logits(self, images, batch_size) + shift)
    out = tmp_path / "model.onnx"
    args = ["export", "--format", "onnx", "--model", str(tiny_model.model_dir), "--shards", str(digits_data.shards)]
    assert main([*args, "--params", str(params), "--check-images", "32", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnx: refused, nothing written: a probability differs from Keras' by" in err
    assert "on 32 test images, above the bound 0.0001 (register.export_max_diff)" in err
    assert list(tmp_path.iterdir()) == [], "no file, no JSON"


def test_a_layer_without_an_int8_kernel_is_named():
    import keras

    from resnet_pipeline.exports.convert import convert

    class Wave(keras.layers.Layer):  # sin has a float kernel only: LiteRT leaves it in float32
        def call(self, x):
            return keras.ops.sin(x)

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = Wave(name="wave")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    images = np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 3)).astype(np.float32)
    with pytest.raises(ExportError, match=r"litert-int8: layer 'wave' \(SIN\) cannot be quantized to int8"):
        convert(model, "litert-int8", images)
    with pytest.raises(ExportError, match="needs calibration images"):
        convert(model, "litert-int8", None)


def test_benchmark_export_smoke_and_an_imagenet_layout_resnet_within_the_bound(tiny_model, digits_data):
    """The benchmark on the tiny model and, as its reference, a ResNet-18 v1.5 in ImageNet's layout (7x7
    stem, max-pool, projection shortcuts) at 64 px with random weights and 1000 classes, on 64 random
    images: its float exports hold the bound. (ResNet-50 at 224 px is the command's default reference:
    ~10 s a conversion here, too much for the suite.)"""
    from resnet_pipeline.benchmark.export import Reference, format_result, run

    settings = ExportSettings(calibration_images=16, check_images=32)
    result = run(
        tiny_model.model_dir,
        digits_data.shards,
        formats=list(FORMATS),
        settings=settings,
        reference=Reference(depth=18, variant="v1.5", image_size=64, classes=1000, images=64),
        steps=2,
        warmup=0,
        rounds=1,
    )
    print(format_result(result))
    rows = result["rows"]
    sides = ["keras", "saved_model", *FORMATS]
    assert [r["format"] for r in rows] == sides * 2
    assert [r["images"] for r in rows] == [32] * len(sides) + [64] * len(sides)
    for r in rows:
        assert r["bytes"] > 0 and r["ms_per_image_batch1"] > 0 and r["ms_per_image_batch32"] > 0
        assert 0.0 <= r["top1"] <= 1.0
    mine, reference = rows[: len(sides)], {r["format"]: r for r in rows[len(sides) :]}
    assert mine[0]["top1_change"] == 0.0 and mine[1]["agreement"] == 1.0, "the SavedModel is the Keras model"
    assert mine[-1]["bytes"] * 3 <= mine[-2]["bytes"], "int8: at most a third of the float file"
    for fmt in ("onnx", "litert"):
        assert reference[fmt]["within_bound"] and reference[fmt]["max_abs_diff"] <= SETTINGS.max_diff, fmt
        assert reference[fmt]["agreement"] == 1.0 and reference[fmt]["top1_is"] == "agreement with keras"
    assert "ResNet-18 v1.5 64px, random weights" in format_result(result)
