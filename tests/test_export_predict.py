"""SavedModel export and `resnet-pipeline predict`, on the session's CIFAR ResNet-20 trained a few steps on the digits.

The SavedModel is loaded in a fresh Python process (no resnet_pipeline import, no custom layers),
and must agree with `predict` on real test images: the digits' PNGs and a JPEG made from one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from resnet_pipeline import config as config_mod
from resnet_pipeline.cli import main
from resnet_pipeline.config import Config, ConfigError

BIN = Path(sys.executable).parent
TOP_K = 3
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    """The session's tiny model (tests/tiny_model.py) in the train stage's layout: model.keras, its
    SavedModel (top 3), params.yaml, labels.json. Shared: tests copy it, never change it."""
    assert TOP_K == 3, "the tiny model's SavedModel gives the top 3"
    return tiny_model.model_dir


@pytest.fixture(scope="module")
def images(digits_data, tmp_path_factory) -> list[Path]:
    """12 test-split PNGs of the digits (2 per class for the first 6 classes) and one JPEG."""
    from PIL import Image

    from resnet_pipeline.data.contracts import read_manifest

    folder = tmp_path_factory.mktemp("images")
    rows = [r for r in read_manifest(digits_data.manifest).to_pylist() if r["split"] == "test" and r["status"] == "ok"]
    picked: list[Path] = []
    for label in range(6):
        for r in [r for r in rows if r["label"] == label][:2]:
            src = digits_data.raw / r["path"]
            dst = folder / f"{r['label_name']}-{len(picked)}.png"
            shutil.copy(src, dst)
            picked.append(dst)
    jpeg = folder / "digit.jpg"
    Image.open(picked[0]).convert("RGB").resize((32, 32)).save(jpeg, "JPEG", quality=95)
    return [*picked, jpeg]


SERVE_SCRIPT = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures["serving_default"]
images = [open(p, "rb").read() for p in sys.argv[2:]]
out = fn(image_bytes=tf.constant(images))
_, inputs = fn.structured_input_signature
print(json.dumps({
    "signatures": sorted(loaded.signatures),
    "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in inputs.items()},
    "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_outputs.items()},
    "classes": [[c.decode() for c in row] for row in out["classes"].numpy()],
    "probabilities": out["probabilities"].numpy().tolist(),
    "class_ids": out["class_ids"].numpy().tolist(),
}))
"""


def _python(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def served(model_dir, images) -> dict:
    """The SavedModel's answers for `images`, from a fresh process."""
    return json.loads(_python(SERVE_SCRIPT, model_dir / "saved_model", *images).stdout)


def _predict_json(capsys, *args) -> list[dict]:
    assert main(["predict", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_saved_model_signature_names_and_dtypes(served):
    assert served["signatures"] == ["serving_default", "serving_images"]
    assert served["inputs"] == {"image_bytes": ["string", [None]]}
    assert served["outputs"] == {
        "classes": ["string", [None, TOP_K]],
        "probabilities": ["float32", [None, TOP_K]],
        "class_ids": ["int32", [None, TOP_K]],
    }


def test_saved_model_agrees_with_predict(served, model_dir, images, capsys):
    predicted = _predict_json(capsys, "--model", model_dir, "--top-k", TOP_K, *images)
    assert [p["image"] for p in predicted] == [str(p) for p in images]
    assert [p["top_k"][0]["label"] for p in predicted] == [row[0] for row in served["classes"]]
    assert np.allclose([[t["probability"] for t in p["top_k"]] for p in predicted], served["probabilities"], atol=1e-4)
    classes = json.loads((model_dir / "labels.json").read_text())["classes"]
    assert [[classes[i] for i in row] for row in served["class_ids"]] == served["classes"]
    # a model trained 30 steps is right on most of these test digits (chance is 1 in 10)
    truth = [p.name.split("-")[0] for p in images[:-1]]
    assert sum(t == row[0] for t, row in zip(truth, served["classes"])) >= len(truth) // 2


def test_saved_model_is_served_by_saved_model_cli(model_dir):
    proc = subprocess.run(
        [
            str(BIN / "saved_model_cli"),
            "show",
            "--dir",
            str(model_dir / "saved_model"),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inputs['image_bytes']" in proc.stdout and "DT_STRING" in proc.stdout
    for name in ("classes", "probabilities", "class_ids"):
        assert f"outputs['{name}']" in proc.stdout


def test_serving_images_signature_matches_eval_preprocessing(model_dir, images):
    """`serving_images` on eval_image's output equals `serving_default` on the bytes."""
    import tensorflow as tf

    from resnet_pipeline.data.pipeline import Preprocess, eval_image

    loaded = tf.saved_model.load(str(model_dir / "saved_model"))
    encoded = [p.read_bytes() for p in images]
    prep = Preprocess.from_train(Config().train)
    batch = tf.stack([eval_image(tf.constant(b), prep) for b in encoded])
    from_images = loaded.signatures["serving_images"](images=batch)
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    np.testing.assert_allclose(from_images["probabilities"], from_bytes["probabilities"], atol=1e-6)
    assert (from_images["class_ids"].numpy() == from_bytes["class_ids"].numpy()).all()
    empty = loaded.signatures["serving_default"](image_bytes=tf.constant([], tf.string))
    assert empty["classes"].shape == (0, TOP_K)


def test_export_replaces_dest_and_caps_top_k(model_dir, tmp_path):
    import tensorflow as tf

    from resnet_pipeline.data.pipeline import Preprocess
    from resnet_pipeline.evaluation import load_model
    from resnet_pipeline.export import export_saved_model

    model = load_model(model_dir)
    classes = json.loads((model_dir / "labels.json").read_text())["classes"]
    dest = tmp_path / "saved_model"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    export_saved_model(model, classes, Preprocess(32), dest, top_k=50)
    assert not (dest / "stale.txt").exists() and (dest / "saved_model.pb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]  # no staging folder left
    out = tf.saved_model.load(str(dest)).signatures["serving_images"](images=tf.zeros([1, 32, 32, 3]))
    assert out["classes"].shape == (1, 10)
    assert sorted(c.decode() for c in out["classes"].numpy()[0]) == sorted(classes)
    with pytest.raises(ValueError, match="image_size"):
        export_saved_model(model, classes, Preprocess(64), tmp_path / "other")


def test_predict_text_output(model_dir, images, capsys):
    assert main(["predict", "--model", str(model_dir), str(images[0]), str(images[-1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    k = Config().evaluate.top_k  # the default: the model config's evaluate.top_k
    assert len(lines) == 2 * (1 + k)
    assert lines[0] == str(images[0]) and lines[1 + k] == str(images[-1])
    for line in lines[1 : 1 + k] + lines[2 + k :]:
        label, probability = line.split()
        assert label.isdigit() and 0.0 <= float(probability) <= 1.0


def test_predict_json_shape(model_dir, images, capsys):
    predicted = _predict_json(capsys, "--model", model_dir, "--top-k", 50, *images[:2])
    assert len(predicted) == 2
    for p in predicted:
        assert set(p) == {"image", "top_k"}
        assert len(p["top_k"]) == 10  # capped at the number of classes
        assert all(set(t) == {"label", "probability"} for t in p["top_k"])
        probabilities = [t["probability"] for t in p["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_predict_reads_a_pulled_registry_folder(model_dir, images, tmp_path, capsys):
    """A folder as the registry stores a version: the config has the train stage's name, params.yaml."""
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name in ("model.keras", "labels.json", "params.yaml"):
        shutil.copy(model_dir / name, pulled / name)
    assert not (model_dir / "config.yaml").exists(), "one name end to end"
    ours = _predict_json(capsys, "--model", model_dir, images[0])
    theirs = _predict_json(capsys, "--model", pulled, images[0])
    assert ours == theirs


def test_predict_reads_a_version_registered_by_release_0_1(model_dir, images, tmp_path, capsys):
    """0.1 saved `variant`/`stride_in_1x1`/`augment: seed` (refused in params today): still read."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.keras", "labels.json"):
        shutil.copy(model_dir / name, old / name)
    raw = yaml.safe_load((model_dir / "params.yaml").read_text())
    raw["train"].update(stride_in_1x1=False, augment="seed")
    (old / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match="train.stride_in_1x1"):
        config_mod.load(old / "params.yaml")
    assert _predict_json(capsys, "--model", old, images[0]) == _predict_json(capsys, "--model", model_dir, images[0])


def test_predict_as_a_command(model_dir, images):
    proc = subprocess.run(
        [str(BIN / "resnet-pipeline"), "predict", "--model", str(model_dir), "--json", "--top-k", "1", str(images[-1])],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result] = json.loads(proc.stdout)
    assert result["image"] == str(images[-1]) and len(result["top_k"]) == 1


@pytest.mark.parametrize(
    "case", ["missing image", "not an image", "missing model", "top-k 0", "model without config", "0.1 folder"]
)
def test_predict_bad_inputs_exit_2_with_a_clear_error(case, model_dir, images, tmp_path, capsys):
    model, image, extra = str(model_dir), str(images[0]), []
    if case == "missing image":
        image = str(tmp_path / "nowhere.png")
        expected = "nowhere.png: image not found"
    elif case == "not an image":
        bogus = tmp_path / "notes.png"
        bogus.write_text("these are not pixels\n")
        image = str(bogus)
        expected = "notes.png: not an image; expected an encoded JPEG, PNG, GIF or BMP file"
    elif case == "missing model":
        model = str(tmp_path / "no-model")
        expected = "no-model: model folder not found"
    elif case == "top-k 0":
        extra = ["--top-k", "0"]
        expected = "--top-k: received 0; allowed: 1 or more"
    else:
        shutil.copy(model_dir / "model.keras", tmp_path / "model.keras")
        model = str(tmp_path)
        expected = "no params.yaml beside the model; expected a model folder written by the train stage"
        if case == "0.1 folder":  # a local train output of release 0.1
            shutil.copy(model_dir / "params.yaml", tmp_path / "config.yaml")
            expected = "(release 0.1's train stage named it config.yaml: train again, or rename it)"
    assert main(["predict", "--model", model, image, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("resnet-pipeline predict: error: ")
    assert expected in captured.err, captured.err


@pytest.fixture(scope="module")
def registry(model_dir, tmp_path_factory) -> Path:
    """A local registry with two versions of the model; `champion` points at version 1."""
    from resnet_pipeline.registry import LocalRegistry

    root = tmp_path_factory.mktemp("registry")
    reg = LocalRegistry(root)
    files = {
        "model.keras": model_dir / "model.keras",
        "params.yaml": model_dir / "params.yaml",
        "labels.json": model_dir / "labels.json",
    }
    assert [reg.register("digits", files), reg.register("digits", files)] == [1, 2]
    reg.promote("digits", 1, "champion")
    return root


@pytest.mark.parametrize("spec, version", [("digits@champion", 1), ("digits:2", 2), ("digits", 2)])
def test_predict_pulls_a_registry_spec_into_the_cache(
    spec, version, registry, model_dir, images, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(cache))
    theirs = _predict_json(capsys, "--model", spec, "--registry", registry, images[0])
    assert theirs == _predict_json(capsys, "--model", model_dir, images[0])
    assert sorted(p.name for p in (cache / "digits").iterdir()) == [str(version)]
    assert (cache / "digits" / str(version) / "model.keras").read_bytes() == (model_dir / "model.keras").read_bytes()


def test_predict_spec_takes_the_registry_from_params(registry, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"register:\n  registry: {registry}\n")
    [result] = _predict_json(capsys, "--model", "digits@champion", "--top-k", 1, images[0])
    assert len(result["top_k"]) == 1
    assert (tmp_path / "cache/digits/1/labels.json").exists()


def test_predict_unknown_spec_is_an_error(registry, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(tmp_path / "cache"))
    assert main(["predict", "--model", "digits:9", "--registry", str(registry), str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-pipeline predict: error: ") and "9" in err
    monkeypatch.chdir(tmp_path)  # no params.yaml here, no --registry: nowhere to look the spec up
    assert main(["predict", "--model", "digits@champion", str(images[0])]) == 2
    assert "no registry to look the spec up in" in capsys.readouterr().err
