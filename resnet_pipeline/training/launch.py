"""`resnet-pipeline train --workers N`: N local worker processes with MultiWorkerMirroredStrategy.

    resnet-pipeline train --workers 2 [--params params.yaml] [--set train.epochs=3]

For trying multi-worker training on one machine before a cluster: each worker is
`resnet-pipeline train --set train.strategy=multi_worker` with a generated `TF_CONFIG` naming
free loopback ports (worker 0 is the chief). Their output is forwarded line by line with a
`[workerI]` prefix. SIGTERM and SIGINT are forwarded to every worker (they save a checkpoint and
stop). When a worker exits with an error, the others get SIGTERM and, after a grace period,
SIGKILL, and the launcher exits with the failed worker's code: a run never hangs on a dead peer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from resnet_pipeline.ports import free_ports

log = logging.getLogger(__name__)

GRACE_SECONDS = 30.0


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


def launch(workers: int, train_args: list[str], grace: float = GRACE_SECONDS, verbose: bool = False) -> int:
    """Run `resnet-pipeline train *train_args` as `workers` local workers (with `-v` when
    `verbose`); return the exit code."""
    if workers < 1:
        raise ValueError(f"--workers: received {workers}; allowed: 1 or more")
    ports = free_ports(workers)
    args = worker_command(train_args, verbose)
    procs, threads = [], []
    log.info("train: launching %d workers on 127.0.0.1 ports %s", workers, ", ".join(map(str, ports)))
    for index in range(workers):
        env = dict(os.environ, TF_CONFIG=tf_config(ports, index))
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        thread = threading.Thread(target=_forward, args=(proc.stdout, f"worker{index}", sys.stdout), daemon=True)
        thread.start()
        threads.append(thread)

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
        code = _supervise(procs, grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for thread in threads:
            thread.join(timeout=5)
    return code


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
