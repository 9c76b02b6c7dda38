"""The network namespace of `train --workers` (no TensorFlow: plain sockets stand in for the workers).

TensorFlow's gRPC server listens on `0.0.0.0`, so the launcher runs its workers in a namespace of
their own with loopback only, or refuses to start them. The training run itself is checked in
`test_distributed.py` (sockets of the real workers, a connection from another namespace, the lock).
As root the namespace is a network namespace; as anyone else a user namespace comes with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_pipeline import config
from resnet_pipeline.training.launch import LoopbackNamespace, NamespaceError, network_need

SERVER = """
import socket, sys, time
with socket.create_server(("0.0.0.0", int(sys.argv[1]))) as server:  # as TensorFlow's does
    print("listening", flush=True)
    conn, _ = server.accept()
    conn.sendall(b"hello")
    conn.close()
"""
CLIENT = """
import socket, sys
print(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10).recv(5).decode())
"""


def _namespace(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_processes_in_the_namespace_reach_each_other_on_loopback_and_nothing_else_reaches_them():
    with contextlib.ExitStack() as stack:
        try:
            namespace = stack.enter_context(LoopbackNamespace())
        except NamespaceError as err:
            pytest.skip(f"no network namespace can be made here (the next test checks the refusal): {err}")
        (port,) = namespace.free_ports(1)
        server = namespace.popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            assert _namespace(server.pid) != _namespace("self")
            lines = Path(f"/proc/{server.pid}/net/dev").read_text().splitlines()[2:]
            assert [line.split(":")[0].strip() for line in lines] == ["lo"]
            with pytest.raises(ConnectionRefusedError):  # from this machine's own namespace, even on loopback
                socket.create_connection(("127.0.0.1", port), timeout=5)
            client = namespace.popen([sys.executable, "-c", CLIENT, str(port)], stdout=subprocess.PIPE, text=True)
            assert client.communicate(timeout=30)[0].strip() == "hello"
        finally:
            server.kill()
            server.wait()


@pytest.mark.skipif(not shutil.which("unshare"), reason="no `unshare` command (util-linux)")
def test_without_a_namespace_the_launcher_refuses_and_says_why():
    """In a user namespace that maps nobody, no namespace can be made: no worker may start."""
    script = (
        "from resnet_pipeline.training.launch import LoopbackNamespace\n"
        "with LoopbackNamespace():\n"
        "    print('a namespace was made')\n"
    )
    done = subprocess.run(["unshare", "--user", sys.executable, "-c", script], capture_output=True, text=True)
    if "unshare failed" in done.stderr:
        pytest.skip(f"user namespaces are not allowed here: {done.stderr.strip()}")
    assert done.returncode != 0 and "a namespace was made" not in done.stdout
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("resnet_pipeline.training.launch.NamespaceError: train --workers: cannot give the workers")
    for why in ("Operation not permitted", "listens on every interface", "Run as root", "user namespaces"):
        assert why in error


IMAGENET = {"train.init": "imagenet", "train.variant": "v1", "train.depth": 50}


@pytest.mark.parametrize(
    "overrides, needs",
    [
        (
            {"train.init": "https://u:p@example.com/w.h5?sig=1", "train.init_sha256": "0" * 64},
            "train.init=https://example.com/w.h5 is downloaded",
        ),
        ({**IMAGENET}, "train.init=imagenet downloads"),
        ({**IMAGENET, "train.init_url": "file:///srv/weights/"}, None),
        ({"train.init": "resnet-digits@champion", "register.registry": "s3://bucket/models"}, "pull it first"),
        ({"train.init": "resnet-digits@champion"}, None),  # a local registry folder
        ({"train.init": "weights/w.h5"}, None),
        ({}, None),
    ],
)
def test_a_run_that_needs_the_network_is_found_before_it_starts(overrides, needs):
    need = network_need(config.from_dict(config.apply_overrides({}, overrides)))
    assert need is None if needs is None else needs in need


def test_a_tf_config_of_loopback_addresses_is_exposed_on_the_other_interfaces():
    """What `make_strategy` warns about for a TF_CONFIG made by hand: its addresses say loopback, but
    TensorFlow listens on every interface of the namespace."""
    from resnet_pipeline.training.launch import tf_config
    from resnet_pipeline.training.strategy import exposed_interfaces

    others = [name for _, name in socket.if_nameindex() if name != "lo"]
    assert exposed_interfaces({"TF_CONFIG": tf_config([2222, 2223], 0)}) == others
    hosts = '{"cluster": {"worker": ["host0:2222", "127.0.0.1:2223"]}, "task": {"type": "worker", "index": 0}}'
    assert exposed_interfaces({"TF_CONFIG": hosts}) == []
    assert exposed_interfaces({}) == []
