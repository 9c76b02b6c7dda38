"""The tests' Prefect server: `prefect server start` on a free loopback port, as users run it, with a
PREFECT_HOME (SQLite database, logs) of its own; started once per session by conftest's
`prefect_server` and shared by every test that talks to Prefect.

A flow run pointed at it (`env` carries PREFECT_API_URL) skips the temporary server Prefect would
start for each run, and its logs, task runs and artifacts stay queryable through `api` afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from resnet_pipeline.ports import free_ports

BIN = Path(sys.executable).parent


class PrefectServerError(RuntimeError):
    """The server did not start (its log's tail is in the message)."""


def api(base: str, method: str, path: str, body: dict | None = None):
    """One JSON request to the REST API at `base` (…/api); the parsed answer, or None."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(5):  # the SQLite-backed server answers 503 now and then on a busy machine
        request = urllib.request.Request(
            base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            if err.code != 503 or attempt == 4:
                raise
            time.sleep(2)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not ended in 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class PrefectServer:
    """A `prefect server start` bound to 127.0.0.1; `env` is the environment of its clients."""

    def __init__(self, home: Path, startup_timeout: float = 180) -> None:
        self.home = Path(home)
        self.startup_timeout = startup_timeout
        (self.port,) = free_ports(1)
        self.base = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(
            os.environ,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_API_URL=self.base,
        )
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def api(self, method: str, path: str, body: dict | None = None):
        return api(self.base, method, path, body)

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self.api("GET", "/health")
                return self
            except (urllib.error.URLError, ConnectionError, OSError) as err:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log_path.read_text()[-3000:]
                    raise PrefectServerError(f"prefect server did not start:\n{tail}") from err
                time.sleep(1)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def flow_logs(self, flow_run_id: str) -> str:
        return flow_logs(self.base, flow_run_id)


def flow_logs(base: str, flow_run_id: str) -> str:
    """A flow run's log lines, oldest first, as `LEVEL message`."""
    logs = api(
        base,
        "POST",
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"},
    )
    return "\n".join(f"{entry['level']} {entry['message']}" for entry in logs)
