"""Bad inputs give one clear error naming the thing; the `registry` commands; fetch_model; the benchmark."""

from __future__ import annotations

import json

import pytest

from resnet_pipeline.cli import main
from resnet_pipeline.registry import RegistryError, fetch_model, open_registry, parse_spec
from resnet_pipeline.registry.spec import is_spec
from tests.registry.conftest import NAME, make_files


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "empty"),
        ("Resnet", "'Resnet'"),
        ("resnet:", "version ''"),
        ("resnet:abc", "version 'abc'"),
        ("resnet:0", "version '0'"),
        ("resnet@", "alias ''"),
        ("resnet@Champion", "alias 'Champion'"),
        ("resnet:1@champion", "not both"),
        ("a/b", "'a/b'"),
    ],
)
def test_bad_specs_are_refused_naming_the_part(spec, words):
    with pytest.raises(RegistryError) as err:
        parse_spec(spec)
    assert words in str(err.value) and f"{spec!r}" in str(err.value)
    assert not is_spec(spec), "predict's test of a spec is the same grammar"


@pytest.mark.parametrize("spec", ["resnet", "resnet-digits:3", "resnet.v2@champion", "r_1@staging-2"])
def test_good_specs_are_specs_for_predict_too(spec):
    assert is_spec(spec) and str(parse_spec(spec)) == spec


def test_unknown_version_alias_and_model(location, tmp_path):
    reg = open_registry(location)
    reg.register(NAME, make_files(tmp_path / "src"), {})
    for spec, words in (
        (f"{NAME}@staging", f"{NAME}@staging: no alias 'staging'"),
        (f"{NAME}:9", f"{NAME}:9: no such version"),
        ("other", "'other': no registered version"),
    ):
        with pytest.raises(RegistryError) as err:
            reg.resolve(spec)
        assert words in str(err.value)
    with pytest.raises(RegistryError, match=f"{NAME}:7"):
        reg.promote(NAME, 7, "champion")
    with pytest.raises(RegistryError, match="alias 'Bad Alias'"):
        reg.promote(NAME, 1, "Bad Alias")


def test_missing_file_to_register_creates_nothing(location, tmp_path):
    files = {**make_files(tmp_path / "src"), "model.keras": tmp_path / "missing.keras"}
    reg = open_registry(location)
    with pytest.raises(RegistryError) as err:
        reg.register(NAME, files, {})
    assert "missing.keras" in str(err.value) and "model.keras" in str(err.value)
    assert reg.storage.list("models/") == []


@pytest.mark.s3
def test_missing_bucket_and_wrong_credentials(s3_location, monkeypatch):
    with pytest.raises(RegistryError, match="s3://no-such-bucket-here: bucket does not exist"):
        open_registry("s3://no-such-bucket-here/registry").versions(NAME)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(RegistryError) as err:
        open_registry(s3_location).versions(NAME)
    assert "access denied" in str(err.value) and s3_location in str(err.value)
    with pytest.raises(RegistryError, match="s3_addressing_style"):
        open_registry(s3_location, addressing_style="sideways")


def test_registry_commands(location, tmp_path, capsys):
    reg = open_registry(location)
    for top1 in (0.5, 0.7):
        reg.register(NAME, make_files(tmp_path / f"src{top1}", top1=top1), {"metrics": {"test": {"top1": top1}}})
    run = ["--params", str(tmp_path / "no-params.yaml"), "--registry", location]

    assert main(["registry", "promote", f"{NAME}:1", "champion", *run]) == 0
    assert f"{NAME}@champion -> version 1 (was None)" in capsys.readouterr().out
    assert main(["registry", "list", *run]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        len(lines) == 2 and lines[0].startswith(f"{NAME}:1 ") and "[@champion]" in lines[0] and "top1 0.7" in lines[1]
    )
    assert main(["registry", "show", f"{NAME}@champion", "--json", *run]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["registry", "show", f"{NAME}@champion", "--history", *run]) == 0
    assert "won   version 1  expected None" in capsys.readouterr().out
    assert main(["registry", "pull", f"{NAME}@champion", str(tmp_path / "dest"), *run]) == 0
    assert (tmp_path / "dest" / "manifest.json").is_file()

    # a leftover claim of a writer that died, then gc
    reg.storage.put(f"models/{NAME}/versions/3/_claim.json", b"{}", if_none_match=True)
    assert main(["registry", "gc", *run]) == 0
    assert "0 uncommitted" in capsys.readouterr().out
    assert main(["registry", "gc", NAME, "--older-than", "0", *run]) == 0
    assert f"removed uncommitted {NAME}:3 (1 objects" in capsys.readouterr().out

    for argv, words in (
        (["registry", "show", "Bad:spec"], "'Bad:spec'"),
        (["registry", "show", f"{NAME}:1", "--history"], "names no alias"),
        (["registry", "pull", f"{NAME}@staging", str(tmp_path / "x")], f"{NAME}@staging"),
        (["registry", "gc", "--older-than", "-1"], "--older-than"),
        (["registry", "gc", "--older-than", "nan"], "--older-than: received nan"),
    ):
        assert main([*argv, *run]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    with pytest.raises(RegistryError, match="not a number"):  # NaN would make every leftover old enough
        reg.gc(NAME, older_than=float("nan"))
    assert reg.versions(NAME) == [1, 2]


def test_fetch_model_pulls_once_and_repairs_the_cache(location, tmp_path):
    reg = open_registry(location)
    reg.register(NAME, make_files(tmp_path / "src"), {})
    reg.promote(NAME, 1, "champion")
    cache = tmp_path / "cache"
    path = fetch_model(f"{NAME}@champion", location, cache)
    assert path == cache / NAME / "1" and (path / "model.keras").is_file()
    mtime = (path / "model.keras").stat().st_mtime_ns
    assert fetch_model(f"{NAME}:1", reg, cache) == path and (path / "model.keras").stat().st_mtime_ns == mtime
    (path / "labels.json").write_text("altered")
    assert fetch_model(NAME, reg, cache) == path
    assert (path / "labels.json").read_bytes() == (tmp_path / "src" / "labels.json").read_bytes()
    assert sorted(p.name for p in (cache / NAME).iterdir()) == ["1"]


@pytest.mark.s3
def test_benchmark_pull_prints_both_figures(s3_location, capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "benchmark",
                "pull",
                "--registry",
                s3_location,
                "--size-mb",
                "2",
                "--rounds",
                "2",
                "--part-mb",
                "0.5",
                "--connections",
                "2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "registry pull (0.5 MB parts, 2 connections" in text and "plain GET" in text and "ratio" in text
    result = json.loads(out.read_text())
    assert result["bytes"] > 2_000_000 and len(result["pull_seconds"]) == len(result["get_seconds"]) == 2
    assert result["pull_mb_s"] > 0 and result["get_mb_s"] > 0 and result["ratio"] > 0
    assert (result["part_bytes"], result["connections"], result["pinned"]) == (512 * 1024, 2, False)
    assert result["cpu_seconds"]["pull"] > 0 and "server_pull" not in result["cpu_seconds"]
    assert open_registry(s3_location).storage.list("models/") == [], "the benchmark deletes its objects"


@pytest.mark.s3
def test_benchmark_pull_on_an_s3_endpoint_makes_and_deletes_its_bucket(s3_server, s3_location, capsys):
    client = s3_server.client()
    before = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert main(["benchmark", "pull", "--s3-endpoint", s3_server.endpoint_url, "--size-mb", "1", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert f"at {s3_server.endpoint_url}: 1.0 MB per pull" in text and "ratio pull / GET" in text
    assert "server" not in text.split("registry pull")[1], "no server CPU figures for a remote endpoint"
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} == before, "the benchmark deletes its bucket"


def test_benchmark_pull_refuses_pin_without_a_local_server(capsys):
    assert main(["benchmark", "pull", "--registry", "s3://bucket/x", "--pin"]) == 2
    assert "--pin: only with --seaweed" in capsys.readouterr().err
    assert main(["benchmark", "pull", "--s3-endpoint", "http://127.0.0.1:1", "--pin"]) == 2
    assert "--pin: only with --seaweed" in capsys.readouterr().err
    assert main(["benchmark", "pull", "--seaweed", "--s3-endpoint", "http://127.0.0.1:1"]) == 2
    assert "--seaweed (the development server) goes with neither" in capsys.readouterr().err


def test_benchmarks_without_endpoint_or_dev_server_say_what_to_do(monkeypatch, tmp_path, capsys):
    """An installed wheel has no infra/devs3.py: stood in for by pointing DEV_SERVER at a missing file
    (tests/test_packaging.py runs the real wheel's command)."""
    from resnet_pipeline.benchmark import s3

    monkeypatch.setattr(s3, "DEV_SERVER", tmp_path / "infra" / "devs3.py")
    for argv in (["benchmark", "pull"], ["benchmark", "ingest", "--sizes", "20,40", "--classes", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"no development S3 server to start ({tmp_path / 'infra' / 'devs3.py'} is not there" in err
        assert "pass --s3-endpoint URL" in err and "run infra/dev-s3.sh" in err
