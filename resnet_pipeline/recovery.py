"""Crash recovery of scheduled runs: three Prefect automations, created or updated by
`resnet-pipeline recovery apply` (idempotent; by name).

1. **Heartbeats stopped** (proactive): a run of a deployment tagged `auto-resume` whose last flow-run
   heartbeat (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, 30 s in prefect.yaml) is older than the grace
   (90 s: three missed heartbeats) and that has not finished is set to `Crashed`: its process or its
   machine is gone and nothing else would report it (Prefect's "zombie" automation). Not forced: a
   heartbeat that reaches the server after its attempt ended cannot crash the run again.
2. **Reschedule** (proactive): a crashed run whose run count is 1..N (N = `max_reschedules`, 3) and
   that stayed `Crashed` for `settle_seconds` (10 s) is set back to `Scheduled`, the same flow run,
   as `prefect flow-run retry` does. The settle time lets the worker's second, late report of the
   same crash land on the `Crashed` state rather than on the rescheduled run.
3. **Give up** (reactive): a run that crashes with a run count past N is set `Crashed` again with a
   message naming the attempts; it stays there.

Why the same flow run rather than a new one (a deployment trigger): its id, parameters, task runs
and persisted results stay, so the UI shows one run with its crashes in its state history; the
rerun holds the same folder lock owner, trains on from the checkpoint its first attempt left in the
deployment's folder (the data tasks hit their cache, register is idempotent) and its run count is
the count of attempts, which is what limits the retries. A cancelled run (`Cancelled`) and a run
that failed (`Failed`) are not crashes and are never rescheduled; nor is a run that crashed before
it ever ran (run count 0: its pull step or infrastructure failed, which a rerun would repeat).
"""

from __future__ import annotations

import json
from typing import Any

TAG = "auto-resume"
MAX_RESCHEDULES = 3
HEARTBEAT_GRACE = 90  # seconds: three heartbeats of 30 s
SETTLE_SECONDS = 10
MIN_HEARTBEAT = 30  # Prefect's shortest heartbeat interval (flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
PREFIX = "resnet-pipeline recovery"
NAMES = {
    "heartbeat": f"{PREFIX}: crashed when heartbeats stop",
    "reschedule": f"{PREFIX}: reschedule a crashed run",
    "give-up": f"{PREFIX}: give up on a run that keeps crashing",
}
END_STATES = ("Completed", "Failed", "Cancelled", "Crashed")
# the states a crashed run moves to when something else took it on (its own heartbeat included):
# every Prefect state name but Crashed (event names are `prefect.flow-run.<state name>`)
MOVED_ON = (
    "heartbeat", "Scheduled", "Late", "AwaitingRetry", "AwaitingConcurrencySlot", "Pending", "Running",
    "Retrying", "Paused", "Suspended", "Cancelling", "Cancelled", "Completed", "Failed", "TimedOut",
)  # fmt: skip


class RecoveryError(ValueError):
    """A bad setting, or the Prefect server refused or could not be reached (named in the message)."""


def greater_than(n: int) -> list[str]:
    """Glob patterns (fnmatch, what Prefect's event matching uses) matching exactly the decimal
    integers greater than `n` >= 0, written without leading zeros."""
    digits = str(n)
    patterns = [f"[1-9]{'[0-9]' * len(digits)}*"]  # any number with more digits
    for i, d in enumerate(digits):
        if d != "9":  # same prefix, a greater digit here, anything after
            low = int(d) + 1
            patterns.append(f"{digits[:i]}[{low}-9]{'[0-9]' * (len(digits) - i - 1)}")
    return patterns


def automations(
    max_reschedules: int = MAX_RESCHEDULES,
    heartbeat_grace: int = HEARTBEAT_GRACE,
    settle_seconds: int = SETTLE_SECONDS,
    tag: str = TAG,
) -> list[dict[str, Any]]:
    """The three automations as Prefect's API takes them (checked here; a RecoveryError names the
    setting)."""
    _check("max_reschedules (--max-reschedules)", max_reschedules, 0, 100)
    _check("heartbeat_grace (--heartbeat-grace)", heartbeat_grace, 2 * MIN_HEARTBEAT, 24 * 3600)
    _check("settle_seconds (--settle)", settle_seconds, 5, 3600)
    if not isinstance(tag, str) or not tag or any(c in tag for c in "*?[]!"):
        raise RecoveryError(f"tag: received {tag!r}; expected a deployment tag (no glob characters)")
    related = {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"}
    runs = {"prefect.resource.id": "prefect.flow-run.*"}
    counts = [str(k) for k in range(1, max_reschedules + 1)]
    common = {"enabled": True, "tags": ["resnet-pipeline"]}
    heartbeat = {
        **common,
        "name": NAMES["heartbeat"],
        "description": f"A run tagged {tag!r} with no flow-run heartbeat for {heartbeat_grace} s is Crashed.",
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "match": runs,
            "match_related": related,
            "after": ["prefect.flow-run.heartbeat"],
            # a heartbeat can reach the server after the state change that ended its attempt: the run's
            # next states (rescheduled) resolve the window it opens, and the action below is not forced,
            # so it never changes a run that has already ended
            "expect": [f"prefect.flow-run.{s}" for s in ("heartbeat", *END_STATES, "Scheduled", "Pending")],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": heartbeat_grace,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "force": False,  # Prefect refuses Crashed for a run already in a final state
                "message": f"{PREFIX}: no heartbeat for {heartbeat_grace} s: the flow run's process or machine is gone",
            }
        ],
    }
    reschedule = {
        **common,
        "name": NAMES["reschedule"],
        "description": f"A crashed run tagged {tag!r} is scheduled again, at most {max_reschedules} times in a row.",
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "match": {**runs, "prefect.run-count": counts or ["never"]},
            "match_related": related,
            "after": ["prefect.flow-run.Crashed"],
            # the run moved on within the settle time (rescheduled by hand, or alive after all): no action
            "expect": [f"prefect.flow-run.{s}" for s in MOVED_ON],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": settle_seconds,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "SCHEDULED",
                "force": True,
                "message": f"{PREFIX}: rescheduled after a crash (at most {max_reschedules} times in a row; "
                "the run count is the attempt); it resumes from its checkpoint",
            }
        ],
    }
    give_up = {
        **common,
        "name": NAMES["give-up"],
        "description": f"A run tagged {tag!r} that crashes after {max_reschedules} reschedules stays Crashed.",
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "match": {
                **runs,
                "prefect.run-count": greater_than(max_reschedules),
                "prefect.state-message": f"!{PREFIX}: gave up*",  # not its own state again
            },
            "match_related": related,
            "expect": ["prefect.flow-run.Crashed"],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 0,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "force": True,
                "message": f"{PREFIX}: gave up: the run crashed on {max_reschedules + 1} attempts in a row "
                f"(1 + {max_reschedules} reschedules, the most this automation makes); the Crashed state "
                "before this one says why. Fix the cause, then `prefect flow-run retry <run id>`",
            }
        ],
    }
    return [heartbeat, reschedule, give_up]


def _check(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecoveryError(f"{name}: received {value!r}; expected a whole number from {low} to {high}")


def apply(payloads: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Create each automation, or replace the one of the same name (duplicates of it are deleted);
    `(action, name)` per automation. The Prefect server is PREFECT_API_URL's, as for `prefect`."""
    from prefect.events.schemas.automations import AutomationCore

    done = []
    with _client() as client:
        for payload in payloads:
            automation = AutomationCore.model_validate(payload)
            found = _call(client.read_automations_by_name, payload["name"])
            if found:
                _call(client.update_automation, found[0].id, automation)
                for extra in found[1:]:
                    _call(client.delete_automation, extra.id)
                done.append(("updated", payload["name"]))
            else:
                _call(client.create_automation, automation)
                done.append(("created", payload["name"]))
    return done


def remove() -> list[str]:
    """Delete the automations `apply` makes; the names of those deleted."""
    deleted = []
    with _client() as client:
        for name in NAMES.values():
            for automation in _call(client.read_automations_by_name, name):
                _call(client.delete_automation, automation.id)
                deleted.append(name)
    return deleted


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def _call(method, *args):
    """A client call; connection and HTTP errors as a RecoveryError naming the server (redacted)."""
    import httpx

    from resnet_pipeline.redact import redact_url

    try:
        return method(*args)
    except httpx.HTTPStatusError as err:
        detail = err.response.text[:500]
        raise RecoveryError(
            f"the Prefect server at {redact_url(str(err.request.url.copy_with(path='/api')))} refused the "
            f"automation ({err.response.status_code}): {detail}"
        ) from None
    except httpx.HTTPError as err:
        from prefect.settings import PREFECT_API_URL

        raise RecoveryError(
            f"cannot reach the Prefect server at {redact_url(PREFECT_API_URL.value() or '(no PREFECT_API_URL)')}: "
            f"{type(err).__name__}; start it, or set PREFECT_API_URL"
        ) from None


def describe(payloads: list[dict[str, Any]]) -> str:
    """The automations as indented JSON (what `recovery apply --print` shows)."""
    return json.dumps(payloads, indent=2)
