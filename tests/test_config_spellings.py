"""One name per idea in params and on the command line: `train.variant` takes `--variant`'s names,
`train.augment: shift_shear_zoom`; release 0.1's spellings are refused naming the new ones, and
configs saved with 0.1 models are read in today's spelling."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resnet_pipeline import cli
from resnet_pipeline.config import (
    AUGMENTATIONS,
    MODEL_PARAMS,
    Config,
    ConfigError,
    TrainConfig,
    from_dict,
    load,
    load_saved,
)
from resnet_pipeline.models.specs import VARIANTS, model_arguments


def _params(tmp_path: Path, repo_root: Path, **train) -> Path:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["train"].update(train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_params_and_cli_name_the_variants_from_one_table():
    import dataclasses

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    assert choices["variant"] == tuple(VARIANTS) == ("v1", "v1.5", "v2", "cifar")
    assert "stride_in_1x1" not in choices
    assert choices["augment"] == AUGMENTATIONS and "shift_shear_zoom" in AUGMENTATIONS and "seed" not in AUGMENTATIONS
    summary = cli.build_parser().parse_args(["model", "summary", "--variant", "v1.5"])
    assert summary.variant == "v1.5"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["benchmark", "model", "--variant", "v3"])


@pytest.mark.parametrize(
    "variant, depth, on_1x1",
    [("v1", 50, True), ("v1.5", 50, False), ("v1", 18, False), ("v1.5", 18, False), ("v2", 50, False)],
)
def test_v1_strides_the_1x1_and_v1_5_the_3x3(variant, depth, on_1x1):
    """As on the command line: v1 is the paper's and keras.applications' layout, v1.5 torchvision's
    (basic blocks have no 1x1: the two are one network there)."""
    cfg = from_dict({"train": {"variant": variant, "depth": depth, "image_size": 64}})
    kwargs = model_arguments(cfg.train, num_classes=10)
    assert kwargs["stride_in_1x1"] is on_1x1
    assert kwargs["variant"] == VARIANTS[variant].family


@pytest.mark.parametrize(
    "train, fragment",
    [
        (
            {"variant": "v1.5", "depth": 50, "stride_in_1x1": False},
            "train.stride_in_1x1: received False; the key is gone: train.variant names the stride's place now, "
            "'v1.5' for the stride on the 3x3",
        ),
        ({"variant": "v1.5", "depth": 50, "stride_in_1x1": True}, "'v1' for the stride on the 1x1 (true;"),
        ({"augment": "seed"}, "train.augment: received 'seed', now named 'shift_shear_zoom'"),
        (
            {"variant": "v1", "depth": 50},
            "train.variant: received 'v1', whose meaning changed in 0.2: 'v1' is now ResNet v1 with the stride on "
            "the 1x1",
        ),
    ],
)
def test_old_spellings_in_params_are_refused_naming_the_new(tmp_path, repo_root, train, fragment):
    path = _params(tmp_path, repo_root, **train)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)


def test_v1_refusal_says_what_v1_built_and_is_refused_through_set_before_any_stage(
    tmp_path, repo_root, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    path = _params(tmp_path, repo_root)
    assert cli.main(["train", "--params", str(path), "--set", "train.variant=v1", "--set", "train.depth=50"]) == 2
    err = capsys.readouterr().err
    assert "the old train.variant 'v1' (stride on the 3x3) is now 'v1.5'" in err
    assert "Write 'v1.5' to build what this file built" in err and "except with init: imagenet" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing written"
    # what it says to write loads, and builds the stride on the 3x3, as 0.1's v1 did
    cfg = load(path, {"train.variant": "v1.5", "train.depth": 50})
    assert model_arguments(cfg.train, num_classes=10)["stride_in_1x1"] is False


def test_v1_with_init_imagenet_is_accepted_in_params(tmp_path):
    """With init imagenet 0.1's v1 always took keras.applications' stride on the 1x1: no change, no refusal."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"init": "imagenet", "variant": "v1", "depth": 50, "image_size": 224}}))
    cfg = load(path)
    assert cfg.train.variant == "v1" and model_arguments(cfg.train, num_classes=10)["stride_in_1x1"] is True
    with pytest.raises(ConfigError, match=r"train\.variant: received 'v1\.5'; init imagenet needs 'v1' or 'v2'"):
        load(path, {"train.variant": "v1.5"})


def _saved_by_0_1(tmp_path: Path, variant: str, stride_in_1x1: bool, augment: str = "seed") -> Path:
    """A model's params.yaml as release 0.1 wrote it: every key, `stride_in_1x1` among them."""
    raw = Config().to_dict()
    raw["train"].update(variant=variant, depth=50, image_size=64, stride_in_1x1=stride_in_1x1, augment=augment)
    path = tmp_path / MODEL_PARAMS
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "variant, stride_in_1x1, now", [("v1", False, "v1.5"), ("v1", True, "v1"), ("v2", False, "v2")]
)
def test_configs_saved_by_0_1_are_read_in_todays_spelling(tmp_path, variant, stride_in_1x1, now):
    path = _saved_by_0_1(tmp_path, variant, stride_in_1x1)
    with pytest.raises(ConfigError, match="train.stride_in_1x1: received"):
        load(path)  # as params, the old file is refused
    cfg = load_saved(path)
    assert cfg.train.variant == now and cfg.train.augment == "shift_shear_zoom"
    if variant == "v1":
        assert model_arguments(cfg.train, num_classes=10)["stride_in_1x1"] is stride_in_1x1  # the same model


def test_saved_configs_of_today_load_unchanged(tmp_path):
    cfg = from_dict({"train": {"variant": "v1", "depth": 50, "image_size": 64, "augment": "shift_shear_zoom"}})
    path = tmp_path / MODEL_PARAMS
    path.write_text(cfg.to_yaml())
    assert load_saved(path) == cfg
