"""`resnet-pipeline recovery`: the Prefect automations that resume crashed scheduled runs (`recovery`).

    resnet-pipeline recovery apply [--max-reschedules 3] [--heartbeat-grace 90] [--settle 10]
                                   [--tag auto-resume] [--print]
    resnet-pipeline recovery remove

The server is the one `prefect` itself talks to (PREFECT_API_URL, or the active profile).
"""

from __future__ import annotations

import argparse

from resnet_pipeline import recovery


def add_parsers(sub) -> None:
    p = sub.add_parser("recovery", help="the Prefect automations that resume crashed scheduled runs")
    actions = p.add_subparsers(dest="action", required=True)
    apply = actions.add_parser("apply", help="create or update the three automations (idempotent)")
    apply.add_argument(
        "--max-reschedules",
        type=int,
        default=recovery.MAX_RESCHEDULES,
        help="times in a row a crashed run is scheduled again before it stays Crashed (default %(default)s)",
    )
    apply.add_argument(
        "--heartbeat-grace",
        type=int,
        default=recovery.HEARTBEAT_GRACE,
        metavar="SECONDS",
        help="a running run with no heartbeat for this long is Crashed (default %(default)s: three heartbeats "
        "of prefect.yaml's 30 s)",
    )
    apply.add_argument(
        "--settle",
        type=int,
        default=recovery.SETTLE_SECONDS,
        metavar="SECONDS",
        help="how long a run stays Crashed before it is scheduled again (default %(default)s)",
    )
    apply.add_argument("--tag", default=recovery.TAG, help="the deployments' tag (default %(default)s)")
    apply.add_argument("--print", action="store_true", help="print the automations as JSON; change nothing")
    actions.add_parser("remove", help="delete the automations `apply` made")


def run_recovery(args: argparse.Namespace) -> int:
    if args.action == "remove":
        for name in recovery.remove():
            print(f"deleted: {name}")
        return 0
    payloads = recovery.automations(args.max_reschedules, args.heartbeat_grace, args.settle, args.tag)
    if args.print:
        print(recovery.describe(payloads))
        return 0
    for action, name in recovery.apply(payloads):
        print(f"{action}: {name}")
    return 0
