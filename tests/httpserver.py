"""A threaded loopback HTTP server for tests: serves a dict of path -> bytes, with fault knobs.

    with LoopbackHTTPServer({"/a.tar.gz": data}) as server:
        server.drop_after["/a.tar.gz"] = 1000   # next GET sends 1000 bytes, then cuts the connection
        fetch(server.url("/a.tar.gz"), dest)
        assert server.requests == [("/a.tar.gz", None), ("/a.tar.gz", "bytes=1000-")]

Supports `Range: bytes=N-` (206 + Content-Range, 416 past the end) unless `ignore_range` is set.
Paths not in `files` get 404; `status[path] = code` forces an error status for that path. Hostile
servers for the download bounds: `endless`, `drip`, `redirect`; `tls=` serves
https (a certificate from `self_signed_cert`).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["LoopbackHTTPServer", "self_signed_cert"]

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
            owner.headers.append((path, dict(self.headers)))
            forced = owner.status.get(path)
            drop = owner.drop_after.pop(path, owner.drop_always.get(path))
            location = owner.redirect.get(path)
        if forced is not None:
            return self._error(forced)
        if location is not None:
            return self._redirect(location)
        if path in owner.endless:
            return self._endless()
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
        if path in owner.drip:
            return self._drip(body, owner.drip[path])
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

    def _endless(self) -> None:
        """200 with no Content-Length: zeros until the client goes away (or `endless_cap` bytes, a
        safety net for a client that never stops)."""
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block, sent = bytes(1 << 16), 0
        try:
            while sent < owner.endless_cap and not owner.stopping.is_set():
                self.wfile.write(block)
                sent += len(block)
        except OSError:  # the client hung up: what a bounded download does
            pass
        with owner.lock:
            owner.endless_sent.append(sent)

    def _drip(self, body: bytes, interval: float) -> None:
        """The body one byte every `interval` seconds, until it ends, the client goes or the server stops."""
        self.close_connection = True
        try:
            for i in range(len(body)):
                if self.server.owner.stopping.wait(interval):
                    return
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
        except OSError:
            pass

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

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
      - `redirect[path] = url`: answer `path` with a 302 to `url` (another server's, or a path here).
      - `endless.add(path)`: a 200 without Content-Length and zeros without end (at most
        `endless_cap` bytes, a safety net); `endless_sent` logs what each such answer sent.
      - `drip[path] = seconds`: the body of `path`, its full length announced, one byte at a time.
    `requests` logs every GET as (path, Range header or None), `headers` as (path, its headers).
    """

    def __init__(self, files: dict[str, bytes] | None = None, *, tls: tuple[Path, Path] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.drop_after: dict[str, int] = {}
        self.drop_always: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.redirect: dict[str, str] = {}
        self.endless: set[str] = set()
        self.endless_cap = 64 << 20
        self.endless_sent: list[int] = []
        self.drip: dict[str, float] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.headers: list[tuple[str, dict[str, str]]] = []
        self.tls = tls
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackHTTPServer:
        self.stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # ends drips and endless bodies still being sent
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
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, written into `folder`: (cert.pem, key.pem). Trust it
    in a client with `SSL_CERT_FILE=cert.pem`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
