"""The crash-recovery automations (resnet_pipeline.recovery) without a server: their settings, and
what they match, judged by Prefect's own server-side trigger matching on made-up events. The
automations at work, against a real server, worker and deployments: tests/test_deployment.py."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from resnet_pipeline import recovery

BIN = Path(sys.executable).parent


def test_greater_than_matches_exactly_the_numbers_above_n():
    for n in (*range(0, 130), 199, 999, 1000, 4321):
        patterns = recovery.greater_than(n)
        for k in range(0, 2 * n + 1200):
            assert any(fnmatch.fnmatchcase(str(k), p) for p in patterns) == (k > n), (n, k, patterns)


def _trigger(payload: dict):
    from prefect.server.events.schemas.automations import Automation

    return Automation.model_validate({**payload, "id": str(uuid.uuid4())}).trigger


def _event(name: str, run_count: int, message: str = "", tags: tuple[str, ...] = ("auto-resume", "nightly")):
    from prefect.server.events.schemas.events import ReceivedEvent

    now = datetime.now(UTC)
    return ReceivedEvent.model_validate(
        {
            "occurred": now,
            "received": now,
            "event": name,
            "id": str(uuid.uuid4()),
            "resource": {
                "prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}",
                "prefect.run-count": str(run_count),
                "prefect.state-message": message,
            },
            "related": [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in tags],
        }
    )


def test_each_automation_takes_the_runs_it_is_for_and_no_other():
    heartbeat, reschedule, give_up = (_trigger(p) for p in recovery.automations())
    crashed = "prefect.flow-run.Crashed"
    # heartbeats stop: any run of a tagged deployment, not another's
    assert heartbeat.covers(_event("prefect.flow-run.heartbeat", 1))
    assert not heartbeat.covers(_event("prefect.flow-run.heartbeat", 1, tags=("nightly",)))
    assert heartbeat.starts_after("prefect.flow-run.heartbeat") and heartbeat.expects("prefect.flow-run.Completed")
    # a heartbeat that arrives after its attempt crashed: the rescheduled run's states close its window,
    # and the action is not forced (Prefect refuses Crashed for a run already in a final state)
    assert heartbeat.expects("prefect.flow-run.Scheduled") and not heartbeat.expects("prefect.flow-run.Running")
    assert recovery.automations()[0]["actions"][0]["force"] is False
    # reschedule: crashes of attempts 1..3, started by Crashed, resolved by any other state
    assert [reschedule.covers(_event(crashed, k)) for k in range(6)] == [False, True, True, True, False, False]
    assert not reschedule.covers(_event(crashed, 1, tags=("nightly",)))
    assert reschedule.starts_after(crashed) and not reschedule.expects(crashed)
    for moved_on in ("Scheduled", "Pending", "Running", "Cancelled", "heartbeat"):
        assert reschedule.expects(f"prefect.flow-run.{moved_on}")
    # give up: attempts past 3, not its own Crashed state again
    assert [give_up.covers(_event(crashed, k)) for k in (0, 1, 3, 4, 5, 12)] == [False] * 3 + [True] * 3
    own = recovery.automations()[2]["actions"][0]["message"]
    assert not give_up.covers(_event(crashed, 4, message=own))
    assert give_up.covers(_event(crashed, 4, message="Process exited with status code: -9."))


def test_max_reschedules_sets_both_ends():
    _, reschedule, give_up = (_trigger(p) for p in recovery.automations(max_reschedules=12))
    crashed = "prefect.flow-run.Crashed"
    assert [k for k in range(30) if reschedule.covers(_event(crashed, k))] == list(range(1, 13))
    assert [k for k in range(30) if give_up.covers(_event(crashed, k))] == list(range(13, 30))
    _, never, always = (_trigger(p) for p in recovery.automations(max_reschedules=0))
    assert not any(never.covers(_event(crashed, k)) for k in range(5))
    assert all(always.covers(_event(crashed, k)) for k in range(1, 5))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_reschedules": -1}, "max_reschedules (--max-reschedules): received -1"),
        ({"max_reschedules": 101}, "max_reschedules (--max-reschedules): received 101"),
        ({"max_reschedules": True}, "max_reschedules (--max-reschedules): received True"),
        ({"max_reschedules": "3"}, "max_reschedules (--max-reschedules): received '3'"),
        ({"heartbeat_grace": 59}, "heartbeat_grace (--heartbeat-grace): received 59; expected a whole number from 60"),
        ({"settle_seconds": 1}, "settle_seconds (--settle): received 1"),
        ({"tag": "auto-*"}, "tag: received 'auto-*'"),
        ({"tag": ""}, "tag: received ''"),
    ],
)
def test_bad_settings_are_refused_naming_them(kwargs, named):
    with pytest.raises(recovery.RecoveryError) as err:
        recovery.automations(**kwargs)
    assert named in str(err.value)


def test_the_command_prints_the_automations_and_names_an_unreachable_server_without_its_credentials():
    printed = subprocess.run(
        [str(BIN / "resnet-pipeline"), "recovery", "apply", "--print", "--max-reschedules", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    payloads = json.loads(printed.stdout)
    assert [p["name"] for p in payloads] == list(recovery.NAMES.values())
    assert payloads[1]["trigger"]["match"]["prefect.run-count"] == ["1", "2", "3", "4", "5"]

    env = {"PATH": str(BIN), "HOME": "/nonexistent", "PREFECT_API_URL": "http://ops:s3cr3t@127.0.0.1:9/api"}
    refused = subprocess.run(
        [str(BIN / "resnet-pipeline"), "recovery", "apply"], capture_output=True, text=True, timeout=120, env=env
    )
    assert refused.returncode == 2
    assert "cannot reach the Prefect server at http://127.0.0.1:9/api" in refused.stderr, refused.stderr
    assert "s3cr3t" not in refused.stderr + refused.stdout

    bad = subprocess.run(
        [str(BIN / "resnet-pipeline"), "recovery", "apply", "--heartbeat-grace", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--heartbeat-grace" in bad.stderr and "received 30" in bad.stderr
