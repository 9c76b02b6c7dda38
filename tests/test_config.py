"""params.yaml -> Config: the repo's file loads, every bad key or value is refused with a message
naming the key and the value received, and the CLI refuses bad params before any stage writes."""

from __future__ import annotations

import dataclasses as _dc
from pathlib import Path

import pytest
import yaml

from resnet_pipeline import cli
from resnet_pipeline.config import Config, ConfigError, TrainConfig, from_dict, load


def _repo_params(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def _write(tmp_path: Path, raw, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def _with(repo_root: Path, group: str, key: str, value) -> dict:
    raw = _repo_params(repo_root)
    raw.setdefault(group, {})[key] = value
    return raw


# --- the repository's params.yaml ------------------------------------------------------------


def test_repo_params_load_into_typed_config(repo_root):
    cfg = load(repo_root / "params.yaml")
    assert isinstance(cfg, Config)
    raw = _repo_params(repo_root)
    as_dict = cfg.to_dict()
    assert set(raw) == set(as_dict), "every group of params.yaml is a Config group"
    for group, values in raw.items():
        for key, value in values.items():
            assert as_dict[group][key] == value, f"{group}.{key}"
    assert isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)


def test_overrides_apply_and_are_validated(repo_root):
    cfg = load(repo_root / "params.yaml", {"train.epochs": 3, "train.lr": 1})
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match=r"train\.epochs.*'three'"):
        load(repo_root / "params.yaml", {"train.epochs": "three"})


def test_config_round_trips_through_yaml(tmp_path):
    cfg = Config()
    assert load(_write(tmp_path, cfg.to_yaml())) == cfg


# --- each error names the key and the value received ----------------------------------------

BAD_VALUES = [
    pytest.param("train", "epochs", "ten", ["train.epochs", "'ten'"], id="epochs-string"),
    pytest.param("train", "random_flip", 1, ["train.random_flip", "1"], id="random_flip-int"),
    pytest.param("train", "depth", 42, ["train.depth", "42"], id="depth-not-in-table"),
    pytest.param("train", "lr", 0, ["train.lr", "0"], id="lr-zero"),
    pytest.param("train", "lr", -1, ["train.lr", "-1"], id="lr-negative"),
    pytest.param("train", "variant", "v3", ["train.variant", "'v3'"], id="variant"),
    pytest.param("download", "dataset", "imagenet", ["download.dataset", "'imagenet'"], id="dataset"),
    pytest.param("shard", "target_shard_mb", 0, ["shard.target_shard_mb", "0"], id="target_shard_mb"),
    pytest.param("shard", "jpeg_quality", 101, ["shard.jpeg_quality", "101", "<= 100"], id="jpeg_quality"),
    pytest.param("split", "min_side", 0, ["split.min_side", "0"], id="min_side"),
    pytest.param("download", "md5", "abc", ["download.md5", "'abc'", "32 hexadecimal"], id="md5"),
    pytest.param("download", "path", "/data/pets", ["download.path", "'imagefolder'"], id="path-for-digits"),
    pytest.param("train", "mean", [0.5, 0.5], ["train.mean", "[0.5, 0.5]", "3 numbers"], id="mean-two"),
    pytest.param("train", "std", [1, 0, 1], ["train.std", "[1, 0, 1]", "> 0"], id="std-zero"),
    pytest.param("train", "augment", "mixup", ["train.augment", "'mixup'"], id="augment"),
    pytest.param("train", "eval_crop", 1.5, ["train.eval_crop", "1.5"], id="eval_crop"),
    pytest.param(
        "register", "export_formats", ["tflite"], ["register.export_formats", "'tflite'", "'litert-int8'"], id="format"
    ),
    pytest.param(
        "register", "export_formats", "onnx", ["register.export_formats", "a list of names"], id="formats-str"
    ),
    pytest.param(
        "register", "export_formats", ["onnx", "onnx"], ["register.export_formats", "at most once"], id="twice"
    ),
    pytest.param("register", "export_min_agreement", 1.5, ["register.export_min_agreement", "<= 1.0"], id="agreement"),
]


@pytest.mark.parametrize(
    "download, expected",
    [
        ({"dataset": "archive", "url": "http://127.0.0.1/x.tar"}, "download.sha256: required for dataset 'archive'"),
        ({"dataset": "archive", "sha256": "0" * 64}, "download.url: required for dataset 'archive'"),
        ({"dataset": "imagefolder"}, "download.path: required for dataset 'imagefolder'"),
    ],
)
def test_sources_require_their_keys(download, expected):
    with pytest.raises(ConfigError, match=expected):
        from_dict({"download": download})
    assert from_dict({"download": {"dataset": "imagefolder", "path": "s3://bucket/pets"}}).download.path


@pytest.mark.parametrize("group, key, value, expected", BAD_VALUES)
def test_bad_value_is_refused_naming_key_and_value(tmp_path, repo_root, group, key, value, expected):
    path = _write(tmp_path, _with(repo_root, group, key, value))
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_lr_message_shows_the_received_value_not_another(tmp_path, repo_root):
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, _with(repo_root, "train", "lr", -1)))
    assert "-1" in str(err.value)
    assert "> 0" in str(err.value), "the message says what is allowed"


def test_depth_error_lists_allowed_depths(tmp_path, repo_root):
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, _with(repo_root, "train", "depth", 42)))
    message = str(err.value)
    assert "42" in message and "'cifar'" in message
    for depth in ("20", "32", "44", "56", "110"):
        assert depth in message


def test_depth_is_checked_against_the_variant(tmp_path, repo_root):
    raw = _with(repo_root, "train", "variant", "v1.5")
    raw["train"]["depth"] = 20  # a CIFAR depth, not a v1.5 one
    with pytest.raises(ConfigError, match=r"train\.depth.*20.*'v1\.5'"):
        load(_write(tmp_path, raw))
    raw["train"]["depth"] = 50
    assert load(_write(tmp_path, raw)).train.depth == 50


def test_unknown_key_is_refused(tmp_path, repo_root):
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, _with(repo_root, "train", "foo", 3)))
    assert "train.foo" in str(err.value)
    assert "epochs" in str(err.value), "the message lists the allowed keys"


def test_unknown_group_is_refused(tmp_path, repo_root):
    raw = _repo_params(repo_root)
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, raw))
    assert "trian" in str(err.value)


@pytest.mark.parametrize("ratios", [(0.5, 0.1, 0.1), (0.8, 0.2, 0.1)], ids=["sum-0.7", "sum-1.1"])
def test_split_ratios_must_sum_to_one(tmp_path, repo_root, ratios):
    raw = _repo_params(repo_root)
    raw["split"] = dict(zip(("train", "val", "test"), ratios))
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, raw))
    message = str(err.value)
    assert "split" in message
    for r in ratios:
        assert str(r) in message
    assert f"{sum(ratios):g}" in message


def test_missing_params_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value)
    assert "not found" in str(err.value)


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value)
    assert "YAML" in str(err.value)


def test_non_mapping_is_refused():
    with pytest.raises(ConfigError, match="mapping"):
        from_dict([1, 2, 3])
    with pytest.raises(ConfigError, match=r"train.*mapping.*5"):
        from_dict({"train": 5})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- the CLI refuses before any stage runs ---------------------------------------------------


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_cli_train_with_bad_params_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, _with(repo_root, "train", "epochs", "ten"), "bad.yaml")
    before = _tree(tmp_path)
    assert cli.main(["train", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "'ten'" in err
    assert not (tmp_path / "artifacts").exists()
    assert not (tmp_path / "data").exists()
    assert _tree(tmp_path) == before


def test_cli_set_override_is_validated(tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.chdir(tmp_path)
    good = _write(tmp_path, _repo_params(repo_root))
    before = _tree(tmp_path)
    assert cli.main(["train", "--params", str(good), "--set", "train.lr=0"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "received 0" in err
    assert _tree(tmp_path) == before


def test_cli_set_without_equals_is_refused(tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.chdir(tmp_path)
    good = _write(tmp_path, _repo_params(repo_root))
    assert cli.main(["train", "--params", str(good), "--set", "train.lr"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_cli_missing_params_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["download", "--params", "missing.yaml"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert _tree(tmp_path) == []


def test_cli_set_with_malformed_yaml_value_exits_2(tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.chdir(tmp_path)
    good = _write(tmp_path, _repo_params(repo_root))
    assert cli.main(["train", "--params", str(good), "--set", "train.variant=[v1"]) == 2
    assert "train.variant=[v1" in capsys.readouterr().err


def test_exponent_without_dot_is_a_number(tmp_path, repo_root):
    # YAML 1.1 reads `1e-4` as a string; a float key takes it as the number it means.
    cfg = load(_write(tmp_path, _with(repo_root, "train", "weight_decay", "1e-4")))
    assert cfg.train.weight_decay == pytest.approx(1e-4)


def test_image_size_below_the_total_stride_fails_before_training(tmp_path, repo_root):
    raw = _repo_params(repo_root)
    raw["train"].update(variant="v1.5", depth=18, image_size=16)
    with pytest.raises(ConfigError, match=r"train\.image_size: received 16.*at least 32"):
        load(_write(tmp_path, raw))


def test_unknown_key_message_names_the_value(tmp_path, repo_root):
    with pytest.raises(ConfigError, match=r"train\.foo.*3"):
        load(_write(tmp_path, _with(repo_root, "train", "foo", 3)))


# --- finite numbers and bounds for every float and count (issue 15) --------------------------

_NUMERIC = [
    (group.name, f)
    for group in _dc.fields(Config)
    for f in _dc.fields(type(getattr(Config(), group.name)))
    if f.type in ("int", "float")
]


@pytest.mark.parametrize("group, f", _NUMERIC, ids=[f"{g}.{f.name}" for g, f in _NUMERIC])
def test_every_count_and_float_has_both_bounds(group, f):
    if (group, f.name) == ("train", "depth"):  # checked against the depth table instead
        return
    assert f.metadata.get("low") is not None and f.metadata.get("high") is not None, f"{group}.{f.name}"


_FLOATS = [(g, f.name) for g, f in _NUMERIC if f.type == "float"]


@pytest.mark.parametrize("group, key", _FLOATS, ids=[f"{g}.{k}" for g, k in _FLOATS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), ".nan", ".inf"])
def test_nan_and_inf_are_refused_naming_the_key(group, key, value):
    raw = {group: {key: value}}
    if isinstance(value, str):  # as YAML spells them
        raw = yaml.safe_load(f"{group}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{group}\.{key}"):
        from_dict(raw)


@pytest.mark.parametrize(
    "key, value",
    [
        ("mean", [0.5, float("nan"), 0.5]),
        ("std", [1.0, float("inf"), 1.0]),
        ("lr_decay_at", [30, float("inf")]),
        ("lr_decay_at", [float("nan")]),
    ],
)
def test_nan_and_inf_in_lists_are_refused(key, value):
    train = (
        {key: value, "lr_schedule": "step", "lr_decay_at": [30]}
        if key != "lr_decay_at"
        else {key: value, "lr_schedule": "step"}
    )
    with pytest.raises(ConfigError, match=rf"train\.{key}: .*finite numbers"):
        from_dict({"train": train})


@pytest.mark.parametrize(
    "group, key, value, allowed",
    [
        ("download", "retries", 101, "<= 100"),
        ("download", "retries", 10**12, "<= 100"),
        ("download", "max_members", 0, ">= 1"),
        ("download", "max_ratio", 0.5, ">= 1.0"),
        ("download", "max_extract_gb", 0, "> 0.0"),
        ("download", "s3_workers", 1000, "<= 256"),
        ("download", "max_download_gb", 0, "> 0.0"),
        ("download", "max_download_seconds", 0, "> 0.0"),
        ("download", "max_download_seconds", 10**8, "<= 10000000"),
        ("download", "min_download_kb_s", -1, ">= 0.0"),
        ("shard", "workers", 10**6, "<= 1024"),
        ("train", "epochs", 10**9, "<= 1000000"),
        ("base", "seed", -1, ">= 0"),
        ("base", "seed", 2**40, "<= 4294967295"),
    ],
)
def test_counts_out_of_bounds_name_the_key_and_the_bound(group, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        from_dict({group: {key: value}})
    assert f"{group}.{key}: received {value!r}" in str(err.value) and allowed in str(err.value)


def test_archive_limits_from_params():
    d = from_dict({"download": {"max_members": 10, "max_extract_gb": 0.5, "max_ratio": 3}}).download
    assert (d.max_members, d.max_extract_gb, d.max_ratio) == (10, 0.5, 3.0)
