"""fetch (resume, retry, verification, bounds, redirects) against a real loopback server; safe_extract
on real archives."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from resnet_pipeline import cli
from resnet_pipeline.data.fetch import (
    DownloadError,
    DownloadLimits,
    UnsafeArchiveError,
    fetch,
    file_digest,
    safe_extract,
)
from resnet_pipeline.redact import redact_url
from resnet_pipeline.runlock import folder_lock
from tests.httpserver import LoopbackHTTPServer, self_signed_cert

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # > 3 chunks, not chunk-aligned
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
WRONG = "0" * 64


@pytest.fixture
def server():
    with LoopbackHTTPServer({"/data.bin": PAYLOAD}) as srv:
        yield srv


# ---------------------------------------------------------------- fetch


def test_download_verifies_and_is_not_repeated(server, tmp_path):
    dest = tmp_path / "dl" / "data.bin"
    assert fetch(server.url("/data.bin"), dest, sha256=SHA, md5=MD5, backoff=0) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "dl" / "data.bin.part").exists()
    assert file_digest(dest, "sha256") == SHA and file_digest(dest, "md5") == MD5
    assert server.requests == [("/data.bin", None)]

    fetch(server.url("/data.bin"), dest, sha256=SHA, md5=MD5, backoff=0)
    assert server.requests == [("/data.bin", None)]  # verified copy reused, no request


def test_dropped_connection_resumes_with_range(server, tmp_path):
    cut = (1 << 20) + 777
    server.drop_after["/data.bin"] = cut
    dest = tmp_path / "data.bin"
    fetch(server.url("/data.bin"), dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", None), ("/data.bin", f"bytes={cut}-")]


def test_existing_part_file_is_resumed(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:5000])
    fetch(server.url("/data.bin"), dest, md5=MD5, backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", "bytes=5000-")]


def test_complete_part_file_416_is_verified(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    fetch(server.url("/data.bin"), dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_wrong_checksum_raises_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "data.bin"
    url = server.url("/data.bin")
    with pytest.raises(DownloadError) as err:
        fetch(url, dest, sha256=WRONG, backoff=0)
    msg = str(err.value)
    assert url in msg and "sha256" in msg and WRONG in msg and SHA in msg
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()

    with pytest.raises(DownloadError, match="md5") as err:
        fetch(url, dest, md5="f" * 32, backoff=0)
    assert MD5 in str(err.value)


def test_existing_good_dest_untouched_by_bad_replacement(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"the old, good file")
    server.files["/data.bin"] = b"something else entirely"
    old_sha = hashlib.sha256(b"the old, good file").hexdigest()
    # dest does not match the requested checksum -> a download is tried, mismatches, dest survives
    with pytest.raises(DownloadError):
        fetch(server.url("/data.bin"), dest, sha256=WRONG, backoff=0)
    assert dest.read_bytes() == b"the old, good file"
    assert fetch(server.url("/data.bin"), dest, sha256=old_sha, backoff=0) == dest
    assert len(server.requests) == 1


def test_mismatching_dest_replaced_when_new_download_verifies(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    fetch(server.url("/data.bin"), dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"garbage that must not be kept")
    fetch(server.url("/data.bin"), dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", "bytes=29-")]


def test_drop_then_ignore_range_restarts(server, tmp_path):
    server.ignore_range = True
    server.drop_after["/data.bin"] = 100_000
    dest = tmp_path / "data.bin"
    fetch(server.url("/data.bin"), dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", None), ("/data.bin", "bytes=100000-")]


def test_404_raises_at_once(server, tmp_path):
    url = server.url("/missing.tar")
    with pytest.raises(DownloadError, match="404") as err:
        fetch(url, tmp_path / "missing.tar", sha256=SHA, retries=5, backoff=0)
    assert url in str(err.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "missing.tar").exists()


def test_5xx_is_retried_then_gives_up(server, tmp_path):
    server.status["/data.bin"] = 503
    url = server.url("/data.bin")
    with pytest.raises(DownloadError, match="503") as err:
        fetch(url, tmp_path / "data.bin", sha256=SHA, retries=2, backoff=0)
    assert url in str(err.value)
    assert len(server.requests) == 3


def test_connection_refused_is_retried(tmp_path):
    with LoopbackHTTPServer() as srv:
        url = srv.url("/data.bin")
    with pytest.raises(DownloadError, match="3 attempts"):
        fetch(url, tmp_path / "data.bin", retries=2, backoff=0, timeout=2)


def test_local_path_and_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    assert fetch(str(src), tmp_path / "a.bin", sha256=SHA).read_bytes() == PAYLOAD
    assert fetch(src.as_uri(), tmp_path / "b.bin", md5=MD5).read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="sha256"):
        fetch(src.as_uri(), tmp_path / "c.bin", sha256=WRONG)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


# ---------------------------------------------------------------- bounds while bytes arrive (issue 30)

MiB = 1 << 20
USER, PASSWORD = "alice", "hunter2-secret"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def _with_credentials(url: str, query: str = "") -> str:
    return url.replace("://", f"://{USER}:{PASSWORD}@", 1) + query


def _authorization(server: LoopbackHTTPServer, path: str) -> list[str | None]:
    """The Authorization header of every request `server` received for `path` (None: not sent)."""
    return [
        next((v for k, v in h.items() if k.lower() == "authorization"), None) for p, h in server.headers if p == path
    ]


def _sent(server: LoopbackHTTPServer) -> list[int]:
    """What the server's endless answers sent, once they have ended (the client hung up)."""
    deadline = time.monotonic() + 10
    while not server.endless_sent and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.endless_sent


def test_endless_body_stops_at_the_size_limit_and_leaves_no_part(tmp_path):
    with LoopbackHTTPServer() as server:
        server.endless.add("/endless.tar")
        url = server.url("/endless.tar")
        with pytest.raises(DownloadError) as err:
            fetch(url, tmp_path / "endless.tar", sha256=SHA, backoff=0, limits=DownloadLimits(max_bytes=MiB))
        sent = _sent(server)
    msg = str(err.value)
    assert msg.startswith(f"{url}: ") and "download.max_download_gb" in msg and f"{MiB:,} bytes" in msg, msg
    assert not (tmp_path / "endless.tar").exists() and not (tmp_path / "endless.tar.part").exists()
    assert sent and sent[0] < server.endless_cap, "the client hung up long before the server's safety cap"


def test_content_length_over_the_limit_is_refused_before_the_body(server, tmp_path):
    url = server.url("/data.bin")
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "data.bin", sha256=SHA, backoff=0, limits=DownloadLimits(max_bytes=MiB))
    msg = str(err.value)
    assert msg.startswith(f"{url}: ") and f"Content-Length {len(PAYLOAD):,}" in msg, msg
    assert "download.max_download_gb" in msg and "before the body" in msg
    assert not (tmp_path / "data.bin.part").exists(), "not one byte of the body was written"
    assert server.requests == [("/data.bin", None)], "refused, not retried"


def _drip(tmp_path: Path, body: bytes, limits: DownloadLimits) -> tuple[str, str, float]:
    """Fetch `body` served at 50 bytes a second (8 s for 400 bytes) under `limits`: (URL, the
    DownloadError's message, seconds until it was raised)."""
    with LoopbackHTTPServer({"/slow.bin": body}) as server:
        server.drip["/slow.bin"] = 0.02
        url = server.url("/slow.bin")
        started = time.monotonic()
        with pytest.raises(DownloadError) as err:
            fetch(url, tmp_path / "slow.bin", backoff=0, limits=limits)
        return url, str(err.value), time.monotonic() - started


def test_slow_drip_stops_at_the_deadline_and_keeps_the_part_for_a_resume(tmp_path):
    body = PAYLOAD[:400]
    url, msg, took = _drip(tmp_path, body, DownloadLimits(max_seconds=1.0, min_bytes_per_s=0))
    assert msg.startswith(f"{url}: ") and "download.max_download_seconds = 1 s" in msg, msg
    assert 0.9 < took < 3.0, took
    part = tmp_path / "slow.bin.part"
    assert part.stat().st_size < len(body) and body.startswith(part.read_bytes())
    assert not (tmp_path / "slow.bin").exists()


def test_slow_drip_below_the_minimum_rate_stops_within_a_window(tmp_path):
    url, msg, took = _drip(tmp_path, PAYLOAD[:400], DownloadLimits(min_bytes_per_s=1000, rate_window=0.5))
    assert msg.startswith(f"{url}: ") and "download.min_download_kb_s" in msg, msg
    assert took < 2.5, took


@pytest.mark.parametrize("hostile", ["endless", "drip"])
def test_download_stage_stops_a_hostile_server_and_releases_the_lock(tmp_path, repo_root, monkeypatch, capsys, hostile):
    """The must-show of issue 30 through the command: params keys, the stage's lock, the .part file."""
    monkeypatch.chdir(tmp_path)
    with LoopbackHTTPServer({"/d.tar.gz": PAYLOAD[:2000]}) as server:
        if hostile == "endless":
            server.endless.add("/d.tar.gz")
            bound, key = "download.max_download_gb=0.001", "download.max_download_gb = 0.001"
        else:
            server.drip["/d.tar.gz"] = 0.02
            bound, key = "download.max_download_seconds=1.5", "download.max_download_seconds = 1.5 s"
        url = server.url("/d.tar.gz")
        settings = [bound, "download.dataset=archive", f"download.url={url}", f"download.sha256={SHA}"]
        started = time.monotonic()
        code = cli.main(["download", "--params", str(repo_root / "params.yaml"), *(f"--set={s}" for s in settings)])
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and f"{url}: " in err and key in err, err
    assert took < 10, took
    part = tmp_path / "data" / "downloads" / "d.tar.gz.part"
    assert not part.exists() or part.stat().st_size <= 0.001 * 2**30
    assert not (tmp_path / "data" / "raw" / "archive").exists()
    with folder_lock(tmp_path):  # free again: FolderLocked if the failed run still held it
        pass


# ---------------------------------------------------------------- redirects (issue 30)


def test_credentials_are_not_sent_on_a_redirect_to_another_port(tmp_path):
    with LoopbackHTTPServer({"/data.bin": PAYLOAD}) as other, LoopbackHTTPServer({"/here.bin": PAYLOAD}) as first:
        first.redirect["/data.bin"] = other.url("/data.bin")
        first.redirect["/moved.bin"] = "/here.bin"  # the same scheme, host and port
        assert fetch(_with_credentials(first.url("/data.bin")), tmp_path / "a.bin", sha256=SHA, backoff=0)
        assert fetch(_with_credentials(first.url("/moved.bin")), tmp_path / "b.bin", sha256=SHA, backoff=0)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD == (tmp_path / "b.bin").read_bytes()
    assert _authorization(first, "/data.bin") == [BASIC], "the first server gets the credentials"
    assert _authorization(other, "/data.bin") == [None], "the server on another port does not"
    assert _authorization(first, "/here.bin") == [BASIC], "a redirect within one origin keeps them"


def test_https_to_http_redirect_is_refused(tmp_path, monkeypatch):
    """Served over real TLS on loopback (a self-signed certificate the client trusts by SSL_CERT_FILE)."""
    cert, key = self_signed_cert(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with (
        LoopbackHTTPServer({"/data.bin": PAYLOAD}) as plain,
        LoopbackHTTPServer({"/data.bin": PAYLOAD}, tls=(cert, key)) as secure,
    ):
        target = plain.url("/data.bin")
        secure.redirect["/down.bin"] = target
        assert fetch(secure.url("/data.bin"), tmp_path / "ok.bin", sha256=SHA, backoff=0).read_bytes() == PAYLOAD
        url = _with_credentials(secure.url("/down.bin"), "?token=t0k3n-secret")
        with pytest.raises(DownloadError) as err:
            fetch(url, tmp_path / "down.bin", sha256=SHA, backoff=0)
    msg = str(err.value)
    assert plain.requests == [], "nothing is asked of the http server"
    assert redact_url(url) in msg and target in msg and "https" in msg, msg
    assert PASSWORD not in msg and "t0k3n" not in msg
    assert not (tmp_path / "down.bin.part").exists()


def test_an_error_after_a_redirect_names_the_url_that_failed(tmp_path):
    with LoopbackHTTPServer() as other, LoopbackHTTPServer() as first:
        gone = other.url("/gone.tar")
        first.redirect["/a.tar"] = gone + "?X-Amz-Signature=s1gnature-secret"
        url = _with_credentials(first.url("/a.tar"), "?token=t0k3n-secret")
        with pytest.raises(DownloadError) as err:
            fetch(url, tmp_path / "a.tar", sha256=SHA, backoff=0)
    msg = str(err.value)
    assert msg.startswith(f"{gone}: HTTP 404"), msg
    assert f"redirected from {redact_url(url)}" in msg
    assert PASSWORD not in msg and "secret" not in msg


# ---------------------------------------------------------------- safe_extract


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _refused(archive: Path, dest: Path, member: str) -> None:
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, dest)
    assert str(archive) in str(err.value) and repr(member) in str(err.value)
    assert not dest.exists() or not any(dest.iterdir())


def test_tar_gz_extracts(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [_file("top/a.txt", b"A"), _file("top/sub/b.txt", b"B")], "w:gz")
    names = safe_extract(archive, tmp_path / "out")
    assert names == ["top/a.txt", "top/sub/b.txt"]
    assert (tmp_path / "out/top/sub/b.txt").read_bytes() == b"B"


def test_tar_dotdot_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar", [_file("ok.txt"), _file("sub/../../evil")])
    _refused(archive, tmp_path / "out", "sub/../../evil")
    assert not (tmp_path / "evil").exists()
    archive = _tar(tmp_path / "b.tar", [_file("ok.txt"), _file("../evil")])
    _refused(archive, tmp_path / "out", "../evil")


def test_tar_symlink_escaping_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar", [_file("ok.txt"), _link("d/link", "../../outside")])
    _refused(archive, tmp_path / "out", "d/link")
    archive = _tar(tmp_path / "b.tar", [_link("abs", "/etc/passwd")])
    _refused(archive, tmp_path / "out", "abs")


def test_tar_hardlink_escaping_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar", [_file("ok.txt"), _link("hard", "../outside", tarfile.LNKTYPE)])
    _refused(archive, tmp_path / "out", "hard")


@pytest.mark.parametrize("name", ["/etc/evil", "\\evil", "C:/evil", "c:\\evil"])
def test_tar_absolute_path_refused(tmp_path, name):
    archive = _tar(tmp_path / "a.tar", [_file("ok.txt"), _file(name)])
    _refused(archive, tmp_path / "out", name)


def test_tar_internal_links_are_refused_too(tmp_path):
    # links are never extracted (see tests/data/test_archive.py for the tricks this closes)
    archive = _tar(tmp_path / "a.tar", [_file("d/real.txt", b"R"), _link("d/sub/link", "../real.txt")])
    _refused(archive, tmp_path / "out", "d/sub/link")
    archive = _tar(tmp_path / "b.tar", [_file("d/real.txt", b"R"), _link("hard", "d/real.txt", tarfile.LNKTYPE)])
    _refused(archive, tmp_path / "out", "hard")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_device_and_fifo_refused(tmp_path, kind):
    info = tarfile.TarInfo("dev/thing")
    info.type = kind
    archive = _tar(tmp_path / "a.tar", [_file("ok.txt"), (info, None)])
    _refused(archive, tmp_path / "out", "dev/thing")


def test_select_extracts_only_chosen(tmp_path):
    archive = _tar(tmp_path / "a.tgz", [_file("keep/a.jpg"), _file("skip/b.xml"), _file("keep/c.jpg")], "w:gz")
    out = tmp_path / "out"
    assert safe_extract(archive, out, select=lambda n: n.startswith("keep/")) == ["keep/a.jpg", "keep/c.jpg"]
    assert not (out / "skip").exists()


def test_select_does_not_skip_checks(tmp_path):
    archive = _tar(tmp_path / "a.tar", [_file("keep/a.jpg"), _file("../evil")])
    with pytest.raises(UnsafeArchiveError, match="evil"):
        safe_extract(archive, tmp_path / "out", select=lambda n: n.startswith("keep/"))
    assert not (tmp_path / "out" / "keep").exists()


def test_format_detected_by_content(tmp_path):
    archive = _tar(tmp_path / "x.tar.gz", [_file("a.txt", b"A")], "w:gz")
    disguised = archive.rename(tmp_path / "download.bin")
    assert safe_extract(disguised, tmp_path / "out") == ["a.txt"]
    zpath = tmp_path / "z.tar.gz"  # a zip with a tar name
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("z.txt", b"Z")
    assert safe_extract(zpath, tmp_path / "zout") == ["z.txt"]


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"just some text, not an archive\n" * 100)
    with pytest.raises(ValueError, match="not a tar or zip archive") as err:
        safe_extract(junk, tmp_path / "out")
    assert str(junk) in str(err.value) and not isinstance(err.value, UnsafeArchiveError)


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def test_zip_extracts_and_selects(tmp_path):
    archive = _zip(tmp_path / "a.zip", [("d/a.txt", b"A", None), ("d/b.txt", b"B", None)])
    assert safe_extract(archive, tmp_path / "out", select=lambda n: n.endswith("b.txt")) == ["d/b.txt"]
    assert (tmp_path / "out/d/b.txt").read_bytes() == b"B" and not (tmp_path / "out/d/a.txt").exists()


@pytest.mark.parametrize("name", ["../x", "d/../../x", "/abs/x", "C:/x"])
def test_zip_unsafe_names_refused(tmp_path, name):
    archive = _zip(tmp_path / "a.zip", [("ok.txt", b"ok", None), (name, b"x", None)])
    _refused(archive, tmp_path / "out", name)


def test_zip_symlink_escaping_refused(tmp_path):
    link = stat.S_IFLNK | 0o777
    archive = _zip(tmp_path / "a.zip", [("ok.txt", b"ok", None), ("d/link", b"../../outside", link)])
    _refused(archive, tmp_path / "out", "d/link")


def test_zip_internal_symlink_is_refused_too(tmp_path):
    link = stat.S_IFLNK | 0o777
    archive = _zip(tmp_path / "a.zip", [("d/real.txt", b"R", None), ("d/link", b"real.txt", link)])
    _refused(archive, tmp_path / "out", "d/link")


def test_tar_symlink_chain_escaping_refused_before_extracting(tmp_path):
    # each link looks internal on its own, but a/b is the root, so a/b/c -> .. is outside
    members = [_file("ok.txt"), _link("a/b", ".."), _link("a/b/c", ".."), _file("a/b/c/pwned")]
    _refused(_tar(tmp_path / "a.tar", members), tmp_path / "out", "a/b")
    assert not (tmp_path / "pwned").exists()


def test_file_written_through_escaping_symlink_refused(tmp_path):
    # a dir link to the root is fine, but a later member writing through it must stay inside too
    members = [_link("up", "."), _link("up/x", "../.."), _file("inner/ok.txt")]
    _refused(_tar(tmp_path / "a.tar", members), tmp_path / "out", "up")
    link = stat.S_IFLNK | 0o777
    archive = _zip(tmp_path / "a.zip", [("d", b".", link), ("d/e", b"..", link), ("d/e/f.txt", b"x", None)])
    _refused(archive, tmp_path / "zout", "d")
