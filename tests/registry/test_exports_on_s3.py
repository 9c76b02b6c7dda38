"""`register.export_formats: [onnx, litert-int8]` on a SeaweedFS registry: the register stage's exports of
the session's tiny model go into the version's manifest, `registry pull` takes and verifies them, and
`predict NAME@ALIAS --format litert-int8` answers as the SavedModel does on the test split's images."""

from __future__ import annotations

import json

import pytest

from resnet_pipeline import config as config_mod
from resnet_pipeline import stages
from resnet_pipeline.cli import main
from resnet_pipeline.fileio import sha256_file
from resnet_pipeline.paths import Paths
from resnet_pipeline.registry import open_registry, register_model

NAME = "digits"
EXPORTED = ["model.int8.tflite", "model.int8.tflite.json", "model.onnx", "model.onnx.json"]


def _test_images(digits_data) -> list[str]:
    from resnet_pipeline.data.contracts import read_manifest

    rows = read_manifest(digits_data.manifest).to_pylist()
    return [str(digits_data.raw / r["path"]) for r in rows if r["split"] == "test" and r["status"] == "ok"]


def _saved_model_top1(saved_model, images: list[str]) -> list[str]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    encoded = tf.constant([open(p, "rb").read() for p in images])
    return [row[0].decode() for row in serve(image_bytes=encoded)["classes"].numpy()]


@pytest.mark.s3
def test_exports_are_registered_pulled_verified_and_served(
    tiny_model, digits_data, s3_server, s3_location, tmp_path, monkeypatch, capsys
):
    cfg = config_mod.from_dict({"register": {"export_formats": ["onnx", "litert-int8"]}})
    # the register stage's paths: the tiny model as artifacts/model, the digits as data/
    paths = Paths(tmp_path, digits_data.data, tiny_model.model_dir.parent)
    assert (paths.model_dir, paths.shards) == (tiny_model.model_dir, digits_data.shards)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"test": {"examples": 187, "top1": 0.4}}))
    exports = stages.register_exports(cfg, paths)
    record = register_model(s3_location, NAME, paths.model_dir, eval_dir, tmp_path / "registered.json", **exports)
    assert (record["version"], record["promotion"]["promoted"]) == (1, True)
    assert sorted(exports["exports"].records) == ["litert-int8", "onnx"]
    files = open_registry(s3_location).manifest(f"{NAME}:1")["files"]
    assert set(EXPORTED) <= set(files), "every export and its JSON is in the manifest"

    dest = tmp_path / "pulled"
    assert main(["registry", "pull", f"{NAME}@champion", str(dest), "--registry", s3_location]) == 0
    capsys.readouterr()
    for name in EXPORTED:
        assert sha256_file(dest / name) == files[name]["sha256"], name
    check = json.loads((dest / "model.int8.tflite.json").read_text())["check"]

    # predict from the registry with the int8 export, against the SavedModel, on every test image
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(tmp_path / "cache"))
    images = _test_images(digits_data)
    args = ["predict", "--model", f"{NAME}@champion", "--registry", s3_location, "--format", "litert-int8"]
    assert main([*args, "--top-k", "1", "--json", *images]) == 0
    int8 = [r["top_k"][0]["label"] for r in json.loads(capsys.readouterr().out)]
    served = _saved_model_top1(dest / "saved_model", images)
    disagree = [
        (image.rsplit("/", 2)[-2:], ours, theirs) for image, ours, theirs in zip(images, int8, served) if ours != theirs
    ]
    agreement = 1 - len(disagree) / len(images)
    with capsys.disabled():
        print(f"\npredict --format litert-int8 vs the SavedModel, {len(images)} test images: agreement {agreement:.4f}")
        print("disagreements (image, int8, SavedModel):", disagree)
    assert agreement >= check["bound"]["min_top1_agreement"], disagree
    # the export's own check ran the same images through Keras: the same figure, give or take a near tie
    assert abs(agreement - check["top1_agreement"]) <= 1 / len(images) + 1e-9

    # a byte flipped in the .tflite on the server: the pull is refused, naming the file
    bucket, prefix = s3_location[len("s3://") :].split("/", 1)
    key = f"{prefix}/models/{NAME}/versions/1/model.int8.tflite"
    body = bytearray(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=bytes(body))
    refused = tmp_path / "refused"
    assert main(["registry", "pull", f"{NAME}@champion", str(refused), "--registry", s3_location]) == 2
    err = capsys.readouterr().err
    assert "model.int8.tflite" in err and "fails verification" in err, err
    assert not refused.exists()
