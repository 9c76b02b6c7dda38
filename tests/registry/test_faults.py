"""Faults: a server stopped mid-registration, an object altered on the server, racing promotions."""

from __future__ import annotations

import threading

import pytest

from resnet_pipeline.registry import CLAIM, HEARTBEAT, RegistryError, open_registry
from resnet_pipeline.registry.s3 import S3Storage
from tests.registry.conftest import NAME, make_files
from tests.s3server import SeaweedS3


@pytest.mark.s3
def test_server_stopped_mid_upload_leaves_no_version_and_gc_removes_the_rest(s3_server, tmp_path):
    """Fault: the registration's own boto3 client calls a `before-call` hook before each request;
    when it is about to PUT the second file (metrics.json, after labels.json is stored), the hook
    stops the server (SIGTERM to its process group). That request and all after it get connection
    refused, so the claim and one file are stored and the manifest never is."""
    server = SeaweedS3(tmp_path / "own-s3", startup_timeout=90)
    server.start()
    try:
        server.make_bucket("faults")
        options = dict(
            endpoint_url=server.endpoint_url,
            region=server.region,
            access_key=server.access_key,
            secret_key=server.secret_key,
            max_attempts=1,
        )
        reg = open_registry("s3://faults/registry", **options)
        files = make_files(tmp_path / "src")
        stopped = []

        def stop_before_second_file(params, **_):
            if params.get("method") == "PUT" and params["url_path"].endswith("/metrics.json") and not stopped:
                stopped.append(params["url_path"])
                server.stop()

        assert isinstance(reg.storage, S3Storage)
        reg.storage.client.meta.events.register("before-call.s3.PutObject", stop_before_second_file)
        with pytest.raises(RegistryError) as err:
            reg.register(NAME, files, {"run": "interrupted"})
        assert stopped and "cannot reach" in str(err.value) and "metrics.json" in str(err.value)

        server.restart()  # same dir and ports: what was stored is still there
        reg = open_registry("s3://faults/registry", **options)
        leftovers = sorted(o.key.rsplit("/", 1)[1] for o in reg.storage.list(f"models/{NAME}/versions/1/"))
        assert leftovers == [CLAIM, HEARTBEAT, "labels.json"]
        assert reg.versions(NAME) == [] and reg.names() == []
        with pytest.raises(RegistryError, match=f"'{NAME}': no registered version"):
            reg.resolve(NAME)

        assert reg.register(NAME, files, {"run": "after restart"}) == 2
        assert reg.versions(NAME) == [2]
        assert reg.gc(NAME, older_than=3600) == []  # the leftover claim is younger than an hour
        removed = reg.gc(older_than=0)
        assert removed == [
            {
                "name": NAME,
                "version": 1,
                "age_seconds": removed[0]["age_seconds"],
                "objects": ["1/" + CLAIM, "1/" + HEARTBEAT, "1/labels.json"],
            }
        ]
        assert reg.storage.list(f"models/{NAME}/versions/1/") == []
        assert reg.versions(NAME) == [2]
        reg.pull(NAME, tmp_path / "pulled")
    finally:
        server.stop()


@pytest.mark.s3
def test_pull_refuses_an_object_altered_on_the_server(s3_server, s3_location, tmp_path):
    reg = open_registry(s3_location)
    files = make_files(tmp_path / "src")
    version = reg.register(NAME, files, {})
    bucket, prefix = s3_location[len("s3://") :].split("/", 1)
    key = f"{prefix}/models/{NAME}/versions/{version}/model.keras"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"not the registered model")

    parent = tmp_path / "pulls"
    parent.mkdir()
    with pytest.raises(RegistryError) as err:
        reg.pull(f"{NAME}:{version}", parent / "model")
    assert f"{NAME}:{version}: file model.keras fails verification" in str(err.value)
    assert list(parent.iterdir()) == [], "DEST untouched, no temporary folder left"

    dest = parent / "empty"  # an existing empty DEST stays empty
    dest.mkdir()
    with pytest.raises(RegistryError, match="model.keras"):
        reg.pull(NAME, dest)
    assert list(dest.iterdir()) == [] and sorted(p.name for p in parent.iterdir()) == ["empty"]


def test_racing_promotions_have_one_winner_and_both_are_recorded(location, tmp_path):
    reg = open_registry(location)
    files = make_files(tmp_path / "src")
    v1, v2, v3 = (reg.register(NAME, files, {}) for _ in range(3))
    reg.promote(NAME, v1, "champion")
    barrier = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    def promote(version: int) -> None:
        r = open_registry(location)
        state = r.alias(NAME, "champion")  # both read the same ETag ...
        barrier.wait()  # ... before either writes
        try:
            outcomes[version] = r.promote(NAME, version, "champion", expected=state)
        except RegistryError as err:
            outcomes[version] = err

    threads = [threading.Thread(target=promote, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors = {v: o for v, o in outcomes.items() if isinstance(o, RegistryError)}
    assert len(outcomes) == 2 and len(errors) == 1
    (loser,) = errors
    winner = v3 if loser == v2 else v2
    message = str(errors[loser])
    assert f"{NAME}@champion" in message and f"now points to version {winner}" in message
    assert reg.alias(NAME, "champion").version == winner
    assert reg.resolve(f"{NAME}@champion") == (NAME, winner)

    history = reg.history(NAME, "champion")
    assert [h["outcome"] for h in history[:1]] == ["won"] and history[0]["version"] == v1
    races = sorted(history[1:], key=lambda h: h["outcome"])
    assert [(h["outcome"], h["version"], h["expected_previous"], h["actual_previous"]) for h in races] == [
        ("lost", loser, v1, winner),
        ("won", winner, v1, v1),
    ]
