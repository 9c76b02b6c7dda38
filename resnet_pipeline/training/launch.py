"""`resnet-pipeline train --workers N`: N local worker processes with MultiWorkerMirroredStrategy.

    resnet-pipeline train --workers 2 [--params params.yaml] [--set train.epochs=3]

For trying multi-worker training on one machine before a cluster: each worker is
`resnet-pipeline train --set train.strategy=multi_worker` with a generated `TF_CONFIG` naming
loopback ports (worker 0 is the chief). Their output is forwarded line by line with a
`[workerI]` prefix. SIGTERM and SIGINT are forwarded to every worker (they save a checkpoint and
stop). When a worker exits with an error, the others get SIGTERM and, after a grace period,
SIGKILL, and the launcher exits with the failed worker's code: a run never hangs on a dead peer.

Reachable from this machine only: TensorFlow's gRPC server listens on every interface (it binds
`0.0.0.0:PORT`, whatever host `TF_CONFIG` names; no ServerDef, ConfigProto or environment setting
changes that in TF 2.21), and anyone who reaches it can run operations in the worker. So the
workers run in a network namespace of their own with loopback only: made by a small process
(`python -m resnet_pipeline.training.launch hold`; a user namespace with it when not root), which
each worker joins before it starts (`... join`). When no namespace can be made, the launcher
refuses to start, saying why; it never lets the workers listen on the machine's interfaces.

One run, one lock: the launcher holds the folder lock for the whole run, and the workers inherit
it; they run under it on the launcher's word (a token in their environment whose digest the lock
record carries), never because `TF_CONFIG` is set (`resnet_pipeline.runlock`).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from resnet_pipeline.ports import free_ports  # noqa: F401 - re-exported: tests make TF_CONFIGs of their own

log = logging.getLogger(__name__)

GRACE_SECONDS = 30.0
MODULE = "resnet_pipeline.training.launch"  # `python -m` this module: the namespace's helpers

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


class NamespaceError(RuntimeError):
    """No network namespace of their own for the workers: they must not start."""


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    )


def _forward(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[{prefix}] {line.decode(errors='replace')}")
        out.flush()
    stream.close()


def worker_command(train_args: list[str], verbose: bool = False) -> list[str]:
    """One worker's command line: this interpreter's `resnet-pipeline [-v] train`, multi-worker."""
    verbosity = ["-v"] if verbose else []
    return [
        sys.executable,
        "-m",
        "resnet_pipeline",
        *verbosity,
        "train",
        *train_args,
        "--set",
        "train.strategy=multi_worker",
    ]


def _config(train_args: list[str]):
    """The config the workers will read from `train_args` (`--params FILE`, `--set=KEY=VALUE`...)."""
    from resnet_pipeline import config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(train_args)
    return config.load(args.params, config.parse_overrides(args.set))


def network_need(cfg) -> str | None:
    """What of the run needs the network beyond loopback (the workers have none), or None."""
    from resnet_pipeline.config import init_kind
    from resnet_pipeline.redact import redact_url

    init, kind = cfg.train.init, init_kind(cfg.train.init)
    if kind == "url" and urlparse(init).scheme not in ("file", ""):
        return f"train.init={redact_url(init)} is downloaded by the workers: download it first and name the file"
    if kind == "imagenet" and (not cfg.train.init_url or urlparse(cfg.train.init_url).scheme not in ("file", "")):
        return (
            "train.init=imagenet downloads keras.applications' weights: download the file first and set "
            "train.init_url to it (or to its folder, ending in /)"
        )
    if kind == "registry" and cfg.register.registry.startswith("s3://"):
        return (
            f"train.init={init} is pulled from {redact_url(cfg.register.registry)}: pull it first "
            f"(`resnet-pipeline registry pull {init} DEST`) and set train.init=DEST/model.keras"
        )
    return None


def launch(workers: int, train_args: list[str], grace: float = GRACE_SECONDS, verbose: bool = False) -> int:
    """Run `resnet-pipeline train *train_args` as `workers` local workers (with `-v` when
    `verbose`), in a network namespace with loopback only, under the folder lock; the exit code."""
    from resnet_pipeline.config import ConfigError
    from resnet_pipeline.paths import Paths
    from resnet_pipeline.runlock import RUN_TOKEN_ENV, folder_lock, new_run_token

    if workers < 1:
        raise ValueError(f"--workers: received {workers}; allowed: 1 or more")
    cfg = _config(train_args)
    if need := network_need(cfg):
        raise ConfigError(f"train --workers: the workers have no network but loopback (README: Security model); {need}")
    token, vouch = new_run_token()
    owner = {"command": f"resnet-pipeline train --workers {workers}", **vouch}
    with folder_lock(Paths.from_config(cfg).root, owner) as holder, LoopbackNamespace() as namespace:
        ports = namespace.free_ports(workers)
        log.info(
            "train: launching %d workers on 127.0.0.1 ports %s, in a network namespace with loopback only",
            workers,
            ", ".join(map(str, ports)),
        )
        args = worker_command(train_args, verbose)
        procs: list[subprocess.Popen] = []
        threads = []
        try:
            for index in range(workers):
                env = dict(os.environ, TF_CONFIG=tf_config(ports, index), **{RUN_TOKEN_ENV: token})
                proc = namespace.popen(
                    args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(holder.fd,)
                )
                procs.append(proc)
                thread = threading.Thread(
                    target=_forward, args=(proc.stdout, f"worker{index}", sys.stdout), daemon=True
                )
                thread.start()
                threads.append(thread)
        except BaseException:
            _stop(procs, grace)
            raise
        return _run(procs, threads, grace)


def _run(procs: list[subprocess.Popen], threads: list[threading.Thread], grace: float) -> int:
    """Supervise the workers (signals forwarded) until they end; the run's exit code."""

    def forward_signal(signum, frame):
        log.warning("train: signal %d: forwarding it to the workers", signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, forward_signal)
    try:
        return _supervise(procs, grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for thread in threads:
            thread.join(timeout=5)


def _supervise(procs: list[subprocess.Popen], grace: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            log.error("train: worker%d exited with code %d; stopping the other workers", index, code)
            _stop(procs, grace)
            return code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error("train: worker pid %d did not stop within %.0f s; killing it", p.pid, grace)
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- the workers' namespace


class LoopbackNamespace:
    """A network namespace with nothing but loopback, for the workers of one run.

    A small process makes it (`hold`) and keeps it until the launcher closes its stdin (or dies);
    `popen` starts a command inside it (`join`, then exec). Not root: a user namespace that maps
    only the caller's own uid and gid comes with it, so that no privilege is needed where the
    kernel allows unprivileged user namespaces.
    """

    def __enter__(self) -> LoopbackNamespace:
        self._holder = subprocess.Popen(
            [sys.executable, "-m", MODULE, "hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._fds: dict[str, int] = {}
        try:
            self._enter()
        except BaseException:
            self._close()
            self._holder.kill()
            self._holder.wait()
            raise
        return self

    def _enter(self) -> None:
        ready = self._holder.stdout.readline().split() if self._holder.stdout else []
        if ready[:1] != ["ready"]:
            _, err = self._holder.communicate(timeout=30)
            raise NamespaceError(
                f"train --workers: cannot give the workers a network namespace of their own "
                f"({err.strip().splitlines()[-1] if err.strip() else f'exit code {self._holder.returncode}'}). "
                "TensorFlow's gRPC server listens on every interface, whatever TF_CONFIG says, and whoever "
                "reaches it can run operations in the worker, so the workers start only where nothing but "
                "loopback can reach them. Run as root, or allow unprivileged user namespaces (sysctl "
                "user.max_user_namespaces above 0; on Ubuntu 23.10 and later also "
                "kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for this Python); in a "
                "container, give it CAP_SYS_ADMIN. Or start each worker yourself with TF_CONFIG where a "
                "firewall admits only the other workers (README: Security model)."
            )
        self._ephemeral_low = int(ready[1])
        for kind in ("user", "net"):
            self._fds[kind] = os.open(f"/proc/{self._holder.pid}/ns/{kind}", os.O_RDONLY)
        self._check()

    def _check(self) -> None:
        """The namespace is not this one, and holds loopback only: never start workers elsewhere."""
        net = self._fds["net"]
        interfaces = [line.split(":")[0].strip() for line in _read(f"/proc/{self._holder.pid}/net/dev")[2:]]
        if os.fstat(net).st_ino == os.stat("/proc/self/ns/net").st_ino or interfaces != ["lo"]:
            raise NamespaceError(f"train --workers: the workers' network namespace has {interfaces}; expected lo alone")

    def free_ports(self, count: int) -> list[int]:
        """`count` distinct ports, below the namespace's ephemeral range (its connections' own ports):
        nothing else listens there."""
        return random.sample(range(10000, max(self._ephemeral_low, 10000 + 2 * count)), count)

    def popen(self, args: list[str], *, pass_fds: tuple[int, ...] = (), **options) -> subprocess.Popen:
        """Start `args` inside the namespace; the process is `args` itself (the joining step execs it)."""
        user, net = self._fds["user"], self._fds["net"]
        command = [sys.executable, "-m", MODULE, "join", str(user), str(net), "--", *args]
        return subprocess.Popen(command, pass_fds=(*pass_fds, user, net), **options)

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __exit__(self, *exc) -> None:
        self._close()
        if self._holder.stdin:
            self._holder.stdin.close()
        try:
            self._holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._holder.kill()
            self._holder.wait()


def _read(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


_libc = ctypes.CDLL(None, use_errno=True)


def _check_call(name: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _loopback_up() -> None:
    """Bring `lo` up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP), as `ip link set lo up` does."""
    get_flags, set_flags, up = 0x8913, 0x8914, 0x1
    layout = "16sH22x"  # struct ifreq: the name, then the flags in the union
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack(layout, fcntl.ioctl(s, get_flags, struct.pack(layout, b"lo", 0)))[1]
        fcntl.ioctl(s, set_flags, struct.pack(layout, b"lo", flags | up))


def _hold() -> int:
    """Make the namespace (with a user namespace when not root, or when root may not make one
    alone), bring loopback up, say `ready LOW` (the start of its ephemeral ports), then keep it
    until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops the run
    uid, gid = os.geteuid(), os.getegid()
    attempts = [CLONE_NEWNET] if uid == 0 else []
    errors = []
    for flags in [*attempts, CLONE_NEWUSER | CLONE_NEWNET]:
        try:
            _check_call("unshare", _libc.unshare(flags))
            if flags & CLONE_NEWUSER:
                Path("/proc/self/setgroups").write_text("deny")
                Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
                Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
            _loopback_up()
            break
        except OSError as err:
            errors.append(f"{'user and network' if flags & CLONE_NEWUSER else 'network'} namespace: {err}")
    else:
        print("; ".join(errors), file=sys.stderr)
        return 1
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    print(f"ready {low}", flush=True)
    sys.stdin.read()
    return 0


def _join(user: int, net: int, argv: list[str]) -> None:
    """Enter the namespaces open as `user` and `net` (the user one only if it is not ours), then exec `argv`."""
    if os.fstat(user).st_ino != os.stat("/proc/self/ns/user").st_ino:
        _check_call("setns", _libc.setns(user, CLONE_NEWUSER))
    _check_call("setns", _libc.setns(net, CLONE_NEWNET))
    os.close(user)
    os.close(net)
    os.execv(argv[0], argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["hold"]:
        return _hold()
    if argv[:1] == ["join"] and len(argv) > 4 and argv[3] == "--":
        _join(int(argv[1]), int(argv[2]), argv[4:])
    print(f"usage: python -m {MODULE} hold | join USER_FD NET_FD -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
