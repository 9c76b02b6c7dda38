"""A tiny trained model in a local registry, shared by the export/predict, serving and packaging tests.

A CIFAR ResNet-20 trained 20 steps on the digits, with its SavedModel (top 3), registered as version 1
of `digits` in a local registry; plus a few test-split images.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

NAME = "digits"


@dataclass(frozen=True)
class TinyModel:
    registry: Path  # a local registry folder holding NAME:1
    model_dir: Path  # the train stage's layout: model.keras, params.yaml, labels.json, saved_model/
    images: list[Path]  # test-split PNGs of several classes and one JPEG
    name: str = NAME
    version: int = 1


def make_tiny_model(digits, folder: Path, steps: int = 20) -> TinyModel:
    """Train, export and register the tiny model under `folder`; `digits` is conftest's digits_data."""
    import keras

    from resnet_pipeline.config import Config
    from resnet_pipeline.data.pipeline import Preprocess, make_dataset, shard_files
    from resnet_pipeline.export import export_saved_model
    from resnet_pipeline.models.resnet import build_resnet
    from resnet_pipeline.registry import LocalRegistry

    keras.utils.set_random_seed(0)
    cfg = Config()
    prep = Preprocess.from_train(cfg.train)
    files, _ = shard_files(digits.shards, "train")
    model = build_resnet(20, num_classes=10)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(make_dataset(files, 32, prep, training=True, seed=0).take(steps), verbose=0)
    classes = json.loads(digits.labels.read_text())["classes"]
    model_dir = folder / "model"
    model_dir.mkdir(parents=True)
    model.save(model_dir / "model.keras")
    (model_dir / "params.yaml").write_text(cfg.to_yaml())
    (model_dir / "labels.json").write_text(json.dumps({"classes": classes}))
    export_saved_model(model, classes, prep, model_dir / "saved_model", top_k=3)
    registry = folder / "registry"
    version = LocalRegistry(registry).register(
        NAME,
        {
            "model.keras": model_dir / "model.keras",
            "params.yaml": model_dir / "params.yaml",
            "labels.json": model_dir / "labels.json",
            "saved_model": model_dir / "saved_model",
        },
    )
    assert version == 1
    return TinyModel(registry, model_dir, _test_images(digits, folder / "images"))


def _test_images(digits, folder: Path) -> list[Path]:
    from PIL import Image

    from resnet_pipeline.data.contracts import read_manifest

    folder.mkdir()
    rows = [r for r in read_manifest(digits.manifest).to_pylist() if r["split"] == "test" and r["status"] == "ok"]
    picked = []
    for label in range(4):
        r = next(r for r in rows if r["label"] == label)
        picked.append(Path(shutil.copy(digits.raw / r["path"], folder / f"{r['label_name']}-{label}.png")))
    jpeg = folder / "digit.jpg"
    Image.open(picked[0]).convert("RGB").resize((32, 32)).save(jpeg, "JPEG", quality=95)
    return [*picked, jpeg]
