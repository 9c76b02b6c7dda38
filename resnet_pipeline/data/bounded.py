"""Bounded HTTP for downloads: limits applied while bytes arrive, and redirects that keep credentials home.

`bounded_opener(watch, redirects)` is a urllib opener whose connections a `Watch` thread shuts when a
bound of `DownloadLimits` passes (so no read blocks past it), whose responses are read through
`Counted` (each piece counted against the size and rate bounds), and whose `Redirects` follow only
http(s), never https -> http, and drop the Authorization header when scheme, host or port change.
"""

from __future__ import annotations

import functools
import http.client
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from resnet_pipeline.redact import redact_url


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds on one download, applied while its bytes arrive (params: download.max_download_gb,
    max_download_seconds, min_download_kb_s)."""

    max_bytes: int = 200 * 2**30
    max_seconds: float = 86_400.0  # the whole download, retries and their waits included
    min_bytes_per_s: float = 1024.0  # averaged over each `rate_window` seconds; 0: no minimum
    rate_window: float = 60.0

    def size_text(self) -> str:
        return f"download.max_download_gb = {self.max_bytes / 2**30:.4g} ({self.max_bytes:,} bytes)"


class Refused(Exception):
    """A bound of the download passed, or a redirect refused: final; the message says which. Not an
    OSError, so that neither urllib nor the retries take it for a lost connection."""


class TooLarge(Refused):
    """More bytes than `max_bytes`: the partial file is of no use."""


class Watch:
    """The time bounds of one download. A thread checks the deadline and the rate of the bytes counted
    in `arrived`; when one passes it records why and shuts every socket the download opened, so that
    a read blocked on a slow drip returns at once."""

    def __init__(self, limits: DownloadLimits) -> None:
        self.limits = limits
        self.arrived = 0  # bytes received so far (written by the reading thread only)
        self.reason: str | None = None
        self.started = time.monotonic()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def remaining(self) -> float:
        return self.limits.max_seconds - (time.monotonic() - self.started)

    def check(self) -> None:
        """Raise Refused if a bound has passed."""
        if self.reason is None and self.remaining() <= 0:
            self._stop(self._late())
        if self.reason is not None:
            raise Refused(self.reason)

    def add(self, sock: socket.socket) -> None:
        """A connection of this download: shut when a bound passes (at once if one has)."""
        with self._lock:
            self._sockets.append(sock)
            stopped = self.reason is not None
        if stopped:
            _shut(sock)

    def _late(self) -> str:
        return (
            f"not complete after download.max_download_seconds = {self.limits.max_seconds:g} s "
            f"({self.arrived:,} bytes received){self._kept()}"
        )

    def _kept(self) -> str:
        return "; the partial file is kept to resume" if self.arrived else ""

    def _stop(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def _run(self) -> None:
        limits = self.limits
        window_start, window_bytes = self.started, 0
        while not self._done.wait(min(0.25, limits.rate_window / 4, max(self.remaining(), 0.01))):
            now = time.monotonic()
            if self.remaining() <= 0:
                return self._stop(self._late())
            if limits.min_bytes_per_s and now - window_start >= limits.rate_window:
                got, need = self.arrived - window_bytes, limits.min_bytes_per_s * (now - window_start)
                if got < need:
                    return self._stop(
                        f"{got:,} bytes in {now - window_start:.1f} s, below download.min_download_kb_s = "
                        f"{limits.min_bytes_per_s / 1024:g} ({need:,.0f} bytes expected){self._kept()}"
                    )
                window_start, window_bytes = now, self.arrived


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown, also for a TLS socket: the fd, not the TLS session
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


class Counted:
    """A response read as its bytes arrive (`read1`), each piece counted for the watch; `readinto`
    fills the buffer as far as half a second of arrivals allows, then returns."""

    def __init__(self, response: Any, watch: Watch) -> None:
        self._response, self._watch = response, watch

    def readinto(self, buf: memoryview) -> int:
        view, got, began = memoryview(buf), 0, time.monotonic()
        while got < len(view):
            self._watch.check()
            try:
                piece = self._response.read1(len(view) - got)
            except (OSError, http.client.HTTPException):
                self._watch.check()  # the watch shut the connection: say why, not "connection reset"
                raise
            if not piece:
                self._watch.check()
                break
            view[got : got + len(piece)] = piece
            got += len(piece)
            self._watch.arrived += len(piece)
            if time.monotonic() - began > 0.5:
                break
        return got

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _WatchedConnection(http.client.HTTPConnection):
    """Hands its socket to the download's watch once connected."""

    def __init__(self, *args: Any, watch: Watch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch = watch

    def connect(self) -> None:
        super().connect()
        self._watch.add(self.sock)


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass  # _WatchedConnection.connect runs HTTPSConnection's (TCP and TLS), then hands the TLS socket


class _WatchedOpen(urllib.request.AbstractHTTPHandler):
    """A urllib handler whose connections are watched (mixed into HTTPHandler and HTTPSHandler)."""

    watch: Watch

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> http.client.HTTPResponse:
        tls = issubclass(http_class, http.client.HTTPSConnection)
        watched = _WatchedHTTPSConnection if tls else _WatchedConnection
        return super().do_open(functools.partial(watched, watch=self.watch), req, **kwargs)


class _HTTPHandler(_WatchedOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedOpen, urllib.request.HTTPSHandler):
    pass


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http(s), never from https to http, and without the Authorization
    header when scheme, host or port change; `url` is the last URL asked for, for messages."""

    def __init__(self, url: str) -> None:
        self.url = url

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        old, target = urlsplit(req.full_url), urlsplit(new.full_url)
        if target.scheme not in ("http", "https") or (old.scheme == "https" and target.scheme != "https"):
            raise Refused(
                f"redirected ({code}) to {redact_url(new.full_url)}; refused: an {old.scheme} download may "
                "only be redirected to https"
                + ("" if old.scheme == "https" else " or http")
                + " (give that URL itself in params if it is meant)"
            )
        if _origin(req.full_url) != _origin(new.full_url):
            new.remove_header("Authorization")  # the credentials are for the URL's own server
        self.url = new.full_url
        return new


def bounded_opener(watch: Watch, redirects: Redirects) -> urllib.request.OpenerDirector:
    http_handler, https_handler = _HTTPHandler(), _HTTPSHandler()
    http_handler.watch = https_handler.watch = watch
    return urllib.request.build_opener(http_handler, https_handler, redirects)
