"""Free loopback TCP ports, for launching local multi-worker training (and local servers)."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free right now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
