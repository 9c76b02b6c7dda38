"""The register stage's gate: promote to champion only a better model tested on the same split."""

from __future__ import annotations

import hashlib
import json

import pytest

from resnet_pipeline.registry import RegistryError, champion_summary, decide, open_registry, register_model
from tests.registry.conftest import NAME, make_run


def register(location, tmp_path, tag: str, **run) -> dict:
    paths = make_run(tmp_path / tag, **run)
    return register_model(open_registry(location), NAME, paths["model_dir"], paths["eval_dir"], paths["out"],
                          data_manifest=paths["data_manifest"], dvc_lock=tmp_path / "no-dvc.lock", root=tmp_path)


def test_gate_promotes_first_and_better_models_only(location, tmp_path):
    reg = open_registry(location)
    assert champion_summary(reg, NAME) is None

    first = register(location, tmp_path, "first", top1=0.80)
    assert first["gate"]["promote"] and "no champion yet" in first["gate"]["reason"]
    assert first["promotion"] == {"alias": "champion", "promoted": True, "error": None}
    assert json.loads((tmp_path / "first" / "registered.json").read_text()) == first
    assert reg.resolve(f"{NAME}@champion") == (NAME, 1)

    better = register(location, tmp_path, "better", top1=0.90)
    gate = better["gate"]
    assert gate["promote"] and (gate["candidate"], gate["champion"], gate["champion_version"]) == (0.90, 0.80, 1)
    assert reg.resolve(f"{NAME}@champion") == (NAME, 2)

    worse = register(location, tmp_path, "worse", top1=0.85)
    assert not worse["gate"]["promote"] and "does not beat" in worse["gate"]["reason"]
    assert worse["promotion"]["promoted"] is False and reg.resolve(f"{NAME}@champion") == (NAME, 2)

    other_split = register(location, tmp_path, "other", top1=0.99, split=b"split B")
    assert not other_split["gate"]["promote"] and "another split" in other_split["gate"]["reason"]
    assert reg.resolve(f"{NAME}@champion") == (NAME, 2)

    # the decision, with both figures, is in each version's manifest
    manifest = reg.manifest(f"{NAME}:3")
    assert manifest["gate"] == worse["gate"]
    assert (manifest["gate"]["candidate"], manifest["gate"]["champion"]) == (0.85, 0.90)
    split_a = hashlib.sha256(b"split A").hexdigest()
    assert manifest["data"] == {"manifest_sha256": split_a, "dvc_lock_sha256": None}
    assert champion_summary(location, NAME) == {"version": 2, "test": {"top1": 0.90, "loss": 1.0, "examples": 10},
                                                "data": {"manifest_sha256": split_a}}
    history = reg.history(NAME, "champion")
    assert [(h["outcome"], h["version"]) for h in history] == [("won", 1), ("won", 2)]


def test_version_metadata_and_saved_model(location, tmp_path):
    record = register(location, tmp_path, "run", top1=0.5)
    manifest = open_registry(location).manifest(NAME)
    assert set(manifest["files"]) == {"model.keras", "params.yaml", "labels.json", "metrics.json",
                                      "saved_model/saved_model.pb", "saved_model/variables/variables.index"}
    assert manifest["params"] == {"train": {"epochs": 3}}
    assert manifest["labels"] == ["0", "1"] and manifest["metrics"] == record["metrics"]
    assert set(manifest["environment"]) == {"python", "tensorflow", "keras", "resnet_pipeline"}
    assert manifest["environment"]["keras"] and manifest["environment"]["python"]
    assert "git_commit" in manifest and "created_at" in manifest
    dest = open_registry(location).pull(NAME, tmp_path / "pulled")
    assert (dest / "saved_model" / "variables" / "variables.index").read_bytes() == b"index"


def test_lower_is_better_for_loss_and_min_improvement():
    champion = {"version": 4, "metrics": {"test": {"top1": 0.9, "loss": 0.5}}, "data": {"manifest_sha256": "a" * 64}}
    better_loss = decide({"test": {"top1": 0.1, "loss": 0.4}}, "a" * 64, champion, metric="loss")
    assert better_loss["promote"] and not better_loss["higher_is_better"] and better_loss["improvement"] == pytest.approx(0.1)
    assert not decide({"test": {"loss": 0.6}}, "a" * 64, champion, metric="loss")["promote"]
    assert not decide({"test": {"top1": 0.9}}, "a" * 64, champion)["promote"], "a tie does not beat"
    small = decide({"test": {"top1": 0.905}}, "a" * 64, champion, min_improvement=0.01)
    assert not small["promote"] and "at least 0.01" in small["reason"]
    assert decide({"test": {"top1": 0.92}}, "a" * 64, champion, min_improvement=0.01)["promote"]
    unknown = decide({"test": {"top1": 0.99}}, None, champion)
    assert not unknown["promote"] and "unknown" in unknown["reason"]
    with pytest.raises(RegistryError, match="'top5'"):
        decide({"test": {"top1": 0.9}}, "a" * 64, None, metric="top5")
