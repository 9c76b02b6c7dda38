"""A threaded loopback HTTP server for tests: serves a dict of path -> bytes, with fault knobs.

    with LoopbackHTTPServer({"/a.tar.gz": data}) as server:
        server.drop_after["/a.tar.gz"] = 1000   # next GET sends 1000 bytes, then cuts the connection
        fetch(server.url("/a.tar.gz"), dest)
        assert server.requests == [("/a.tar.gz", None), ("/a.tar.gz", "bytes=1000-")]

Supports `Range: bytes=N-` (206 + Content-Range, 416 past the end) unless `ignore_range` is set.
Paths not in `files` get 404; `status[path] = code` forces an error status for that path.
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LoopbackHTTPServer"]

_RANGE = re.compile(r"^bytes=(\d+)-$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        with owner.lock:
            owner.requests.append((path, range_header))
            forced = owner.status.get(path)
            drop = owner.drop_after.pop(path, owner.drop_always.get(path))
        if forced is not None:
            return self._error(forced)
        data = owner.files.get(path)
        if data is None:
            return self._error(404)

        start = 0
        match = _RANGE.match(range_header or "")
        if match and not owner.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "none" if owner.ignore_range else "bytes")
        self.end_headers()
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            try:  # abrupt close: no more bytes, the client sees a short body
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)

    def _error(self, code: int) -> None:
        body = f"error {code}\n".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LoopbackHTTPServer


class LoopbackHTTPServer:
    """HTTP server on 127.0.0.1 (a free port) serving `files`; use as a context manager.

    Knobs, changeable while running:
      - `drop_after[path] = n`: the next GET of `path` announces the full Content-Length, writes only
        n bytes and closes the connection (once; later requests are served normally).
      - `drop_always[path] = n`: the same at every GET of `path`, until removed.
      - `ignore_range = True`: answer every request with 200 and the whole body.
      - `status[path] = code`: answer `path` with that HTTP status (e.g. 404, 503) until removed.
    `requests` logs every GET as (path, Range header or None).
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.drop_after: dict[str, int] = {}
        self.drop_always: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackHTTPServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str = "/") -> str:
        """Full URL of `path` on this server."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"
