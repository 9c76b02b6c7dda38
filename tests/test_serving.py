"""`registry pull --layout tf-serving`: DEST/<version>/ as TF Serving loads it, checked with TensorFlow's own
`saved_model_cli` (from the TensorFlow wheel) against `predict`, and refused when a file or DEST is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_pipeline.cli import main

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _pull(capsys, registry: Path, spec: str, dest: Path) -> tuple[int, str, str]:
    code = main(["registry", "pull", spec, str(dest), "--layout", "tf-serving", "--registry", str(registry)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _saved_model_cli(*calls: list[str]) -> list[str]:
    """Run `saved_model_cli` with each argument list, at the same time (each imports TensorFlow); the outputs."""
    procs = [
        subprocess.Popen(
            [str(BIN / "saved_model_cli"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        for args in calls
    ]
    outputs = []
    for args, proc in zip(calls, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"saved_model_cli {args}: {err[-3000:]}"
        outputs.append(out)
    return outputs


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_layout_is_what_tf_serving_loads_and_files_are_the_verified_ones(tiny_model, tmp_path, capsys):
    dest = tmp_path / "models" / "digits"
    code, out, err = _pull(capsys, tiny_model.registry, "digits", dest)
    assert code == 0, err
    assert out.strip() == f"pulled digits to {dest / '1'} (TF Serving: --model_base_path={dest.resolve()})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging folder left beside DEST
    assert sorted(p.name for p in dest.iterdir()) == ["1"]
    version = dest / "1"
    manifest = json.loads((version / "assets.extra" / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"]) == ("digits", 1)
    saved = {f.removeprefix("saved_model/"): e for f, e in manifest["files"].items() if f.startswith("saved_model/")}
    assert "saved_model.pb" in saved and any(f.startswith("variables/variables.data") for f in saved)
    # exactly the SavedModel's files, each with the sha256 the manifest lists, plus the extras
    assert _files(version) == set(saved) | {"assets.extra/manifest.json", "assets.extra/labels.json"}
    for file, entry in saved.items():
        assert hashlib.sha256((version / file).read_bytes()).hexdigest() == entry["sha256"], file
    assert (version / "assets.extra/labels.json").read_bytes() == (tiny_model.model_dir / "labels.json").read_bytes()


def test_saved_model_cli_shows_serving_default_and_runs_it_like_predict(tiny_model, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "base"
    assert _pull(capsys, tiny_model.registry, "digits:1", dest)[0] == 0
    inputs = tmp_path / "image_bytes.npy"
    np.save(inputs, np.array([p.read_bytes() for p in tiny_model.images], dtype=object), allow_pickle=True)
    outdir = tmp_path / "outputs"
    shown, _ = _saved_model_cli(
        ["show", "--all", "--dir", str(dest / "1")],
        [
            "run",
            "--dir",
            str(dest / "1"),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"image_bytes={inputs}",
            "--outdir",
            str(outdir),
        ],
    )
    section = shown.split("signature_def['serving_default']:", 1)[1].split("signature_def[", 1)[0]
    assert "inputs['image_bytes'] tensor_info:" in section and "dtype: DT_STRING" in section
    for name in ("classes", "probabilities", "class_ids"):
        assert f"outputs['{name}'] tensor_info:" in section
    assert "signature_def['serving_images']:" in shown

    served = [row[0].decode() for row in np.load(outdir / "classes.npy", allow_pickle=True)]

    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(tmp_path / "cache"))
    assert (
        main(
            [
                "predict",
                "--model",
                "digits:1",
                "--registry",
                str(tiny_model.registry),
                "--json",
                *map(str, tiny_model.images),
            ]
        )
        == 0
    )
    predicted = [p["top_k"][0]["label"] for p in json.loads(capsys.readouterr().out)]
    assert served == predicted
    assert len(set(predicted)) > 1  # a trained model, not one that answers the same class for everything


def test_a_second_version_goes_beside_the_first(tiny_model, tmp_path, capsys):
    from resnet_pipeline.registry import LocalRegistry

    registry = Path(shutil.copytree(tiny_model.registry, tmp_path / "registry"))
    m = tiny_model.model_dir
    assert (
        LocalRegistry(registry).register(
            "digits",
            {
                "model.keras": m / "model.keras",
                "params.yaml": m / "params.yaml",
                "labels.json": m / "labels.json",
                "saved_model": m / "saved_model",
            },
        )
        == 2
    )
    dest = tmp_path / "base"
    assert _pull(capsys, registry, "digits:1", dest)[0] == 0
    before = {f: (dest / "1" / f).read_bytes() for f in _files(dest / "1")}
    assert _pull(capsys, registry, "digits", dest)[0] == 0  # the latest: 2
    assert sorted(p.name for p in dest.iterdir()) == ["1", "2"]
    assert {f: (dest / "1" / f).read_bytes() for f in _files(dest / "1")} == before
    assert (dest / "2/saved_model.pb").read_bytes() == (dest / "1/saved_model.pb").read_bytes()


def _tree(root: Path) -> dict[str, bytes]:
    return {f: (root / f).read_bytes() for f in _files(root)}


@pytest.mark.parametrize(
    "case",
    [
        "tampered file",
        "tampered file, no dest yet",
        "no saved model",
        "version already there",
        "dest is a file",
        "unknown version",
    ],
)
def test_refusals_name_the_problem_and_leave_dest_as_it_was(case, tiny_model, tmp_path, capsys):
    from resnet_pipeline.registry import LocalRegistry

    registry = Path(shutil.copytree(tiny_model.registry, tmp_path / "registry"))
    dest = tmp_path / "base" / "digits"
    dest.mkdir(parents=True)
    (dest / "README").write_text("kept\n")
    spec = "digits:1"
    if case.startswith("tampered file"):
        if case.endswith("no dest yet"):
            shutil.rmtree(dest)
        [data] = (registry / "models/digits/versions/1/saved_model/variables").glob("variables.data-*")
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        expected = "model digits:1: file saved_model/variables/variables.data-"
    elif case == "no saved model":
        m = tiny_model.model_dir
        LocalRegistry(registry).register(
            "digits",
            {"model.keras": m / "model.keras", "labels.json": m / "labels.json", "params.yaml": m / "params.yaml"},
        )
        spec = "digits:2"
        expected = "model digits:2 has no saved_model/saved_model.pb (registered without a SavedModel)"
    elif case == "version already there":
        (dest / "1").mkdir()
        (dest / "1" / "saved_model.pb").write_bytes(b"the one being served")
        expected = f"{dest / '1'}: version 1 of digits is already there; refusing to overwrite it"
    elif case == "dest is a file":
        shutil.rmtree(dest)
        dest.write_text("not a folder\n")
        expected = f"{dest}: exists and is not a folder"
    else:
        spec = "digits:9"
        expected = "9"
    before = _tree(dest.parent)
    code, out, err = _pull(capsys, registry, spec, dest)
    assert code == 2 and out == ""
    assert err.startswith("resnet-pipeline registry: error: ") and expected in err, err
    if case.startswith("tampered file"):
        assert "fails verification" in err
    assert _tree(dest.parent) == before  # nothing added, nothing changed
    left = [] if case.endswith("no dest yet") else ["digits"]  # DEST not created by a failed pull
    assert sorted(p.name for p in dest.parent.iterdir()) == left  # and no staging folder left
