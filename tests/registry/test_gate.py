"""The register stage's gate: promote to champion only a better model tested on the same split."""

from __future__ import annotations

import hashlib
import json

import pytest

from resnet_pipeline.registry import RegistryError, decide, open_registry, register_model
from tests.registry.conftest import NAME, make_run


def register(location, tmp_path, tag: str, **run) -> dict:
    paths = make_run(tmp_path / tag, **run)
    return register_model(
        open_registry(location),
        NAME,
        paths["model_dir"],
        paths["eval_dir"],
        paths["out"],
        data_manifest=paths["data_manifest"],
        dvc_lock=tmp_path / "no-dvc.lock",
        root=tmp_path,
    )


def test_gate_promotes_first_and_better_models_only(location, tmp_path):
    reg = open_registry(location)
    assert reg.alias(NAME, "champion").record is None

    first = register(location, tmp_path, "first", top1=0.80)
    assert first["gate"]["promote"] and "no champion yet" in first["gate"]["reason"]
    assert first["gate"]["figures"] is None  # nothing to compare with
    assert first["promotion"] == {"alias": "champion", "promoted": True, "error": None}
    assert json.loads((tmp_path / "first" / "registered.json").read_text()) == first
    assert reg.resolve(f"{NAME}@champion") == (NAME, 1)

    better = register(location, tmp_path, "better", top1=0.90)
    gate = better["gate"]
    assert gate["promote"] and (gate["candidate"], gate["champion"], gate["champion_version"]) == (0.90, 0.80, 1)
    # every test figure both have, beside the gate's own; not the example count
    assert gate["figures"] == {
        "top1": {"champion": 0.80, "candidate": 0.90, "delta": pytest.approx(0.10)},
        "loss": {"champion": 1.0, "candidate": 1.0, "delta": 0.0},
    }
    assert reg.resolve(f"{NAME}@champion") == (NAME, 2)

    worse = register(location, tmp_path, "worse", top1=0.85)
    assert not worse["gate"]["promote"] and "does not beat" in worse["gate"]["reason"]
    assert worse["promotion"]["promoted"] is False and reg.resolve(f"{NAME}@champion") == (NAME, 2)

    other_split = register(location, tmp_path, "other", top1=0.99, split=b"split B")
    assert not other_split["gate"]["promote"] and "another split" in other_split["gate"]["reason"]
    split_b = hashlib.sha256(b"split B").hexdigest()
    assert (
        other_split["gate"]["candidate_manifest_sha256"] == split_b != other_split["gate"]["champion_manifest_sha256"]
    )
    assert other_split["gate"]["figures"]["top1"] == {"champion": 0.90, "candidate": 0.99, "delta": pytest.approx(0.09)}
    assert reg.resolve(f"{NAME}@champion") == (NAME, 2)

    # the decision, with both figures, is in each version's manifest
    manifest = reg.manifest(f"{NAME}:3")
    assert manifest["gate"] == worse["gate"]
    assert (manifest["gate"]["candidate"], manifest["gate"]["champion"]) == (0.85, 0.90)
    split_a = hashlib.sha256(b"split A").hexdigest()
    assert manifest["data"] == {"manifest_sha256": split_a, "dvc_lock_sha256": None}
    assert manifest["gate"]["champion_manifest_sha256"] == manifest["gate"]["candidate_manifest_sha256"] == split_a
    champion = reg.manifest(f"{NAME}@champion")
    assert (champion["version"], champion["metrics"]["test"]) == (2, {"top1": 0.90, "loss": 1.0, "examples": 10})
    assert champion["data"]["manifest_sha256"] == split_a
    history = reg.history(NAME, "champion")
    assert [(h["outcome"], h["version"]) for h in history] == [("won", 1), ("won", 2)]


def test_version_metadata_and_saved_model(location, tmp_path):
    record = register(location, tmp_path, "run", top1=0.5)
    manifest = open_registry(location).manifest(NAME)
    assert set(manifest["files"]) == {
        "model.keras",
        "params.yaml",
        "labels.json",
        "metrics.json",
        "saved_model/saved_model.pb",
        "saved_model/variables/variables.index",
    }
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
    assert (
        better_loss["promote"]
        and not better_loss["higher_is_better"]
        and better_loss["improvement"] == pytest.approx(0.1)
    )
    assert not decide({"test": {"loss": 0.6}}, "a" * 64, champion, metric="loss")["promote"]
    assert not decide({"test": {"top1": 0.9}}, "a" * 64, champion)["promote"], "a tie does not beat"
    small = decide({"test": {"top1": 0.905}}, "a" * 64, champion, min_improvement=0.01)
    assert not small["promote"] and "at least 0.01" in small["reason"]
    assert decide({"test": {"top1": 0.92}}, "a" * 64, champion, min_improvement=0.01)["promote"]
    unknown = decide({"test": {"top1": 0.99}}, None, champion)
    assert not unknown["promote"] and "unknown" in unknown["reason"]
    with pytest.raises(RegistryError, match="'top5'"):
        decide({"test": {"top1": 0.9}}, "a" * 64, None, metric="top5")


@pytest.mark.parametrize("same_split", [True, False])
def test_the_decision_compares_every_test_figure_both_have(same_split):
    """The champion comparison that evaluation once wrote into metrics.json lives in the gate's decision."""
    champion = {
        "version": 4,
        "data": {"manifest_sha256": "a" * 64 if same_split else "0" * 64},
        "metrics": {"test": {"examples": 150, "loss": 0.5, "top1": 0.75, "top3": 0.9, "macro_f1": 0.7, "top5": 0.99}},
    }
    test = {"examples": 187, "loss": 0.25, "top1": 0.875, "top3": 0.95, "macro_f1": 0.8, "ok": True}
    decision = decide({"test": test}, "a" * 64, champion)
    assert decision["champion_version"] == 4
    assert (decision["champion_manifest_sha256"] == decision["candidate_manifest_sha256"]) is same_split
    assert decision["promote"] is same_split
    # the figures both have as numbers; not the example count, not the champion's top5
    assert set(decision["figures"]) == {"loss", "top1", "top3", "macro_f1"}
    for name, figures in decision["figures"].items():
        assert figures["champion"] == champion["metrics"]["test"][name]
        assert figures["candidate"] == test[name]
        assert figures["delta"] == pytest.approx(test[name] - champion["metrics"]["test"][name], abs=1e-6)
