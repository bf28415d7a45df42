"""nanochat.download against a real HTTP server on 127.0.0.1 that serves files the test writes and
injects faults on cue: 5xx, 429 with Retry-After, connection resets, cut and stalled bodies, wrong
bytes, 404/403, redirects carrying Hugging Face's X-Linked-Etag."""
from __future__ import annotations

import email.utils
import io
import logging
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import example, given, note, strategies as st

from nanochat import download as dl
from nanochat.store import open_store, sha256_bytes
from tests.fixtures import fuzz
from tests.s3util import free_port

BODY = bytes(range(256)) * 40  # 10 KiB, every byte position distinct enough to catch a bad resume


class Server:
    """Serves `files` {path: bytes}. faults[path] is a list consumed one per request:
    "503", "500", "403", "429:<Retry-After value>", "reset" (RST before any response), "cut" (half the
    body, then the connection closes), "hang" (half the body, then silence), "corrupt" (one byte flipped),
    "416", "change" (half the body, then the file becomes the next of `versions[path]`, as an upstream
    update). `ranges=False` makes it ignore Range headers (answers 200 with the whole file). `etags=True` sends
    each version's ETag ("weak" a weak one, "modified" only a Last-Modified date) and honours If-Range (a
    stale one gets the whole file with 200) unless `if_range=False`.
    /r/<path> answers 302 to `redirect_to` + /<path> with X-Linked-Etag: "<sha256 of the file>"."""

    def __init__(self, ranges: bool = True, etags: bool | str = False, if_range: bool = True):
        self.files: dict[str, bytes] = {}
        self.versions: dict[str, list[bytes]] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None, str | None]] = []  # (path, Range, Authorization)
        self.if_ranges: list[str | None] = []
        self.ranges, self.etags, self.if_range, self.release = ranges, etags, if_range, threading.Event()
        self.redirect_to = None
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                srv.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if self.path.startswith("/r/"):
                    name = self.path[2:]
                    self.send_response(302)
                    self.send_header("Location", f"{srv.redirect_to or srv.url}{name}")
                    self.send_header("X-Linked-Etag", f'"{sha256_bytes(srv.files[name])}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                script = srv.faults.get(self.path) or []
                fault = script.pop(0) if script else ""
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # linger 0: the peer sees a TCP reset
                    self.close_connection = True
                    return
                if fault.split(":")[0] in ("500", "503", "403", "429", "416"):
                    code, _, retry_after = fault.partition(":")
                    return self._send(int(code), b"no", {"Retry-After": retry_after} if retry_after else {})
                if self.path not in srv.files:
                    return self._send(404, b"not found")
                body, status, start, headers = srv.files[self.path], 200, 0, srv.validator(self.path)
                if fault == "corrupt":
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                srv.if_ranges.append(if_range)
                stale = srv.etags and srv.if_range and if_range is not None and if_range not in headers.values()
                if rng and srv.ranges and not stale:
                    start, status = int(rng.removeprefix("bytes=").rstrip("-")), 206
                    if start >= len(body):  # nothing from there: the file got shorter
                        return self._send(416, b"range not satisfiable", {"Content-Range": f"bytes */{len(body)}"})
                    headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body) - start), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if fault in ("cut", "hang", "change"):
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    if fault == "hang":
                        srv.release.wait(60)
                    if fault == "change":
                        srv.files[self.path] = srv.versions[self.path].pop(0)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def _send(self, code, body, headers=()):
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **dict(headers)}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the "reset" fault closes the socket under the handler on purpose

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def paths(self):
        return [p for p, _, _ in self.requests]

    def validator(self, path: str) -> dict:
        """The headers naming the version of `path` served now (none unless `etags`)."""
        return self.validator_headers(self.files[path], self.etags)

    @staticmethod
    def validator_headers(body: bytes, etags) -> dict:
        tag = sha256_bytes(body)[:16]
        if etags == "modified":
            return {"Last-Modified": email.utils.formatdate(1_700_000_000 + int(tag, 16) % 10**8, usegmt=True)}
        return {"ETag": f'W/"{tag}"' if etags == "weak" else f'"{tag}"'} if etags else {}

    def validator_of(self, body: bytes, etags) -> str | None:
        """What a client names `body` by in If-Range."""
        return next(iter(self.validator_headers(body, etags).values()), None)

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    s.files["/data/file.bin"] = BODY
    yield s
    s.stop()


@pytest.fixture
def sleeps(monkeypatch):
    """The backoff delays the downloader asked for, without waiting them out."""
    asked = []
    monkeypatch.setattr(dl.time, "sleep", asked.append)
    return asked


def tmp_leftovers(tmp_path):
    return [p for p in (tmp_path / "tmp").rglob("*")]  # conftest points TMPDIR here


# ----------------------------------------------------------------------------- fetch into a store


def test_fetch_publishes_into_the_store(server, store_uri, tmp_path):
    store = open_store(store_uri)
    got = dl.fetch(f"{server.url}/data/file.bin", store, "data/x/file.bin", sha256=sha256_bytes(BODY), progress=False)
    assert got == dl.Fetched(f"{server.url}/data/file.bin", sha256_bytes(BODY), len(BODY))
    assert store.get_bytes("data/x/file.bin", sha256=got.sha256) == BODY
    assert dl.stored_sha256(store, "data/x/file.bin") == got.sha256
    assert server.requests == [("/data/file.bin", None, None)]
    assert tmp_leftovers(tmp_path) == []


def test_5xx_and_429_are_retried_honouring_retry_after(server, tmp_path, sleeps):
    store = open_store(f"file://{tmp_path}/s")
    date = email.utils.formatdate(time.time() + 120, usegmt=True)
    server.faults["/data/file.bin"] = ["503", "429:7", "500", f"429:{date}", "429:999999"]
    dl.fetch(f"{server.url}/data/file.bin", store, "k", backoff=0.01, progress=False)
    assert store.get_bytes("k") == BODY and len(server.requests) == 6
    assert len(sleeps) == 5
    assert sleeps[0] < 0.1 and sleeps[2] < 0.1     # plain backoff: 0.01 * 2**attempt, with jitter
    assert sleeps[1] == 7                          # Retry-After in seconds wins over a shorter backoff
    assert 100 < sleeps[3] <= 120                  # Retry-After as an HTTP date
    assert sleeps[4] == dl.MAX_RETRY_AFTER         # an absurd one is capped


def test_backoff_grows_exponentially_and_is_capped(server, tmp_path, sleeps):
    server.faults["/data/file.bin"] = ["503"] * 8
    dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k", retries=8, backoff=4.0, progress=False)
    for attempt, delay in enumerate(sleeps):
        ceiling = min(dl.MAX_BACKOFF, 4.0 * 2 ** attempt)
        assert ceiling / 2 <= delay <= ceiling     # jitter stays within [half, full] of the step
    assert sleeps[-1] <= dl.MAX_BACKOFF and sleeps[-1] >= dl.MAX_BACKOFF / 2


def test_connection_reset_is_retried(server, tmp_path, sleeps):
    server.faults["/data/file.bin"] = ["reset", "reset"]
    got = dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k", progress=False)
    assert got.sha256 == sha256_bytes(BODY) and len(server.requests) == 3 and len(sleeps) == 2


def test_cut_body_resumes_with_a_range_request(server, tmp_path, sleeps):
    server.faults["/data/file.bin"] = ["cut"]
    got = dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k", progress=False)
    assert got.sha256 == sha256_bytes(BODY) and got.size == len(BODY)
    assert [r for _, r, _ in server.requests] == [None, f"bytes={len(BODY) // 2}-"]


def test_cut_body_starts_over_when_the_server_ignores_range(tmp_path, sleeps):
    server = Server(ranges=False)
    try:
        server.files["/f"] = BODY
        server.faults["/f"] = ["cut", "cut"]
        store = open_store(f"file://{tmp_path}/s")
        assert dl.fetch(f"{server.url}/f", store, "k", progress=False).sha256 == sha256_bytes(BODY)
        assert [r for _, r, _ in server.requests][1:] == [f"bytes={len(BODY) // 2}-"] * 2  # asked, got 200, rewrote
        assert store.get_bytes("k") == BODY
    finally:
        server.stop()


def test_a_stalled_body_times_out_and_is_retried(server, tmp_path, sleeps):
    server.faults["/data/file.bin"] = ["hang"]
    got = dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k", timeout=0.5, progress=False)
    assert got.sha256 == sha256_bytes(BODY) and len(server.requests) == 2


def test_cancel_stops_a_download_mid_body_or_mid_backoff_publishing_nothing(server, tmp_path):
    store, cancel = open_store(f"file://{tmp_path}/s"), threading.Event()
    cancel.set()  # set while the body streams: stopped at the next chunk
    with pytest.raises(dl.Cancelled, match="download cancelled: .*/data/file.bin"):
        dl.fetch(f"{server.url}/data/file.bin", store, "k", progress=False, cancel=cancel)
    cancel.clear()
    server.faults["/data/file.bin"] = ["503"] * 3
    threading.Timer(0.3, cancel.set).start()  # set during a 30 s back-off: ends it at once
    with pytest.raises(dl.Cancelled):
        dl.fetch(f"{server.url}/data/file.bin", store, "k", backoff=60.0, progress=False, cancel=cancel)
    assert len(server.requests) == 2 and not store.exists("k") and tmp_leftovers(tmp_path) == []


def test_404_fails_fast_naming_the_url(server, tmp_path, sleeps):
    store = open_store(f"file://{tmp_path}/s")
    with pytest.raises(dl.NotFound, match=f"404.*{server.url}/data/missing.bin") as err:
        dl.fetch(f"{server.url}/data/missing.bin", store, "k", retries=5, progress=False)
    assert err.value.status == 404 and err.value.url == f"{server.url}/data/missing.bin"
    assert len(server.requests) == 1 and sleeps == [] and not store.exists("k")
    assert tmp_leftovers(tmp_path) == []


def test_403_fails_fast_with_its_status(server, tmp_path, sleeps):
    server.faults["/data/file.bin"] = ["403"]
    with pytest.raises(dl.DownloadError, match=f"HTTP 403.*{server.url}/data/file.bin") as err:
        dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k", progress=False)
    assert err.value.status == 403 and not isinstance(err.value, dl.NotFound)
    assert len(server.requests) == 1 and sleeps == []


def test_giving_up_names_the_url_and_the_last_error(server, tmp_path, sleeps):
    store = open_store(f"file://{tmp_path}/s")
    server.faults["/data/file.bin"] = ["503"] * 10
    with pytest.raises(dl.DownloadError, match=f"after 3 attempts: {server.url}/data/file.bin: HTTP 503"):
        dl.fetch(f"{server.url}/data/file.bin", store, "k", retries=2, progress=False)
    assert len(server.requests) == 3 and not store.exists("k")


def test_nothing_listening_is_retried_then_reported(tmp_path, sleeps):
    url = f"http://127.0.0.1:{free_port()}/f"
    with pytest.raises(dl.DownloadError, match=f"after 2 attempts: {url}: ConnectionError"):
        dl.fetch(url, open_store(f"file://{tmp_path}/s"), "k", retries=1, progress=False)


def test_digest_mismatch_is_retried_then_nothing_is_published(server, tmp_path, sleeps):
    store = open_store(f"file://{tmp_path}/s")
    server.faults["/data/file.bin"] = ["corrupt"]
    assert dl.fetch(f"{server.url}/data/file.bin", store, "k", sha256=sha256_bytes(BODY), progress=False).sha256 == sha256_bytes(BODY)
    assert len(server.requests) == 2 and server.requests[1][1] is None  # a mismatch restarts from byte 0

    server.faults["/data/file.bin"] = ["corrupt"] * 10
    with pytest.raises(dl.DownloadError, match="after 3 attempts.*sha256 mismatch"):
        dl.fetch(f"{server.url}/data/file.bin", store, "other", sha256=sha256_bytes(BODY), retries=2, progress=False)
    assert not store.exists("other") and tmp_leftovers(tmp_path) == []


def test_hugging_face_linked_etag_is_verified_and_auth_stays_on_its_host(server, tmp_path, sleeps):
    cdn = Server()
    try:
        cdn.files["/data/file.bin"] = BODY
        cdn.faults["/data/file.bin"] = ["corrupt"]
        server.redirect_to = cdn.url  # the hub redirects to a CDN on another port, as huggingface.co does
        got = dl.fetch(f"{server.url}/r/data/file.bin", open_store(f"file://{tmp_path}/s"), "k",
                       headers={"Authorization": "Bearer secret"}, progress=False)
        assert got.sha256 == sha256_bytes(BODY) and len(cdn.requests) == 2  # no sha256 given: the announced one caught it
        assert {a for _, _, a in server.requests} == {"Bearer secret"} and {a for _, _, a in cdn.requests} == {None}
    finally:
        cdn.stop()


def test_check_rejects_a_body(server, tmp_path, sleeps):
    seen = []

    def check(path):
        seen.append(path.read_bytes())
        if len(seen) == 1:
            raise ValueError("not a parquet file")

    got = dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k", check=check, progress=False)
    assert got.size == len(BODY) and seen == [BODY, BODY]  # no digest known: the objection may be transit damage

    seen.clear()
    with pytest.raises(dl.DownloadError, match="not a parquet file"):  # the digest matched: refetching cannot help
        dl.fetch(f"{server.url}/data/file.bin", open_store(f"file://{tmp_path}/s"), "k2", sha256=sha256_bytes(BODY),
                 check=lambda p: (_ for _ in ()).throw(ValueError("not a parquet file")), progress=False)
    assert len(server.requests) == 3


# ----------------------------------------------------------------------------- download_file


def test_download_file_resumes_a_part_left_by_an_earlier_call(server, tmp_path, sleeps):
    dest = tmp_path / "cache" / "file.bin"
    dest.parent.mkdir()
    server.faults["/data/file.bin"] = ["cut"]
    with pytest.raises(dl.DownloadError, match="truncated"):
        dl.download_file(f"{server.url}/data/file.bin", dest, retries=0, progress=False)
    assert not dest.exists() and dest.with_name("file.bin.part").stat().st_size == len(BODY) // 2
    dl.download_file(f"{server.url}/data/file.bin", dest, progress=False)
    assert dest.read_bytes() == BODY and not dest.with_name("file.bin.part").exists()
    assert server.requests[-1][1] == f"bytes={len(BODY) // 2}-"


BODY2 = bytes(reversed(BODY))  # the file after an upstream update: same size, other bytes


@pytest.mark.parametrize("etags", [True, "modified"])
def test_a_resume_after_an_upstream_change_starts_over(tmp_path, sleeps, etags):
    """Cut mid-body, then the file changes upstream: the resume names the version it has (If-Range), the server sends
    the new file whole, and the download is that file, not the old half glued to the new one's tail."""
    server = Server(etags=etags)
    try:
        server.files["/f"], server.versions["/f"], server.faults["/f"] = BODY, [BODY2], ["change"]
        dest = tmp_path / "file.bin"
        got = dl.download_file(f"{server.url}/f", dest, progress=False)
        assert dest.read_bytes() == BODY2 and got.sha256 == sha256_bytes(BODY2)
        assert server.if_ranges == [None, server.validator_of(BODY, etags)]
        assert not list(tmp_path.glob("file.bin.*"))  # no part, no validator left behind
    finally:
        server.stop()


def test_a_resume_that_gets_another_version_anyway_starts_over(tmp_path, sleeps):
    """A server that ignores If-Range but names what it sends: a 206 of another version is thrown away, not appended."""
    server = Server(etags=True, if_range=False)
    try:
        server.files["/f"], server.versions["/f"], server.faults["/f"] = BODY, [BODY2], ["change"]
        dest = tmp_path / "file.bin"
        with pytest.raises(dl.DownloadError, match="changed upstream"):
            dl.download_file(f"{server.url}/f", dest, retries=1, progress=False)
        assert not dest.exists()
        assert dl.download_file(f"{server.url}/f", dest, progress=False).sha256 == sha256_bytes(BODY2)
        assert dest.read_bytes() == BODY2
    finally:
        server.stop()


def test_a_part_resumes_across_calls_naming_its_version(server, tmp_path, sleeps):
    """The version a part holds is kept beside it, so a resume by a later call (a later run) still sends If-Range."""
    server.etags = True
    dest = tmp_path / "file.bin"
    server.faults["/data/file.bin"] = ["cut"]
    with pytest.raises(dl.DownloadError, match="truncated"):
        dl.download_file(f"{server.url}/data/file.bin", dest, retries=0, progress=False)
    dl.download_file(f"{server.url}/data/file.bin", dest, progress=False)
    assert dest.read_bytes() == BODY and server.requests[-1][1] == f"bytes={len(BODY) // 2}-"
    assert server.if_ranges[-1] == server.validator_of(BODY, True)


VERSIONS = [BODY, BODY2, BODY[:6000], BODY + bytes(range(200)) * 15]  # same size, shorter, longer with the same head


@fuzz(200)
# changed upstream between a cut and its resume: If-Range brings the new version whole (a 206 naming another is dropped)
@example(etags=True, if_range=True, ranges=True, digest=False, versions=[0, 1, 2, 3], calls=[(1, ["change"])])
@example(etags="modified", if_range=False, ranges=True, digest=False, versions=[0, 2, 1, 3], calls=[(2, ["change"])])
@given(etags=st.sampled_from([True, "modified", "weak", False]), if_range=st.booleans(), ranges=st.booleans(),
       digest=st.booleans(), versions=st.permutations(range(4)),
       calls=st.lists(st.tuples(st.integers(0, 3), st.lists(st.sampled_from(["", "cut", "change", "503", "reset", "416"]),
                                                          max_size=4)), min_size=1, max_size=3))
def test_any_faults_and_upstream_changes_give_one_whole_version_or_an_error(server, tmp_path, sleeps, etags, if_range,
                                                                           ranges, digest, versions, calls):
    """Calls of download_file (retries each, a part resumed across them) against a server that cuts, fails, resets
    and changes the file upstream: each either fails with nothing published or publishes one version whole (the
    expected one, when a digest is given) and leaves no part behind. Without a digest, only a server that names its
    versions (a strong ETag or Last-Modified) or never resumes can be trusted not to mix two; the weak-ETag and
    no-validator servers are only held to the rest."""
    note(f"{etags=} {if_range=} {ranges=} {digest=} {versions=} {calls=}")
    bodies = [VERSIONS[i] for i in versions]
    server.ranges, server.etags, server.if_range = ranges, etags, if_range  # one server for every example: fast
    server.files["/f"], server.versions["/f"] = bodies[0], bodies[1:]
    dest = tmp_path / f"v{len(list(tmp_path.iterdir()))}" / "file.bin"
    dest.parent.mkdir()
    trusted = digest or ranges is False or etags in (True, "modified")
    for retries, faults in calls:
        if not server.versions["/f"]:  # no newer version left to change to
            faults = [f for f in faults if f != "change"]
        server.faults["/f"] = list(faults)
        try:
            got = dl.download_file(f"{server.url}/f", dest, sha256=sha256_bytes(bodies[0]) if digest else None,
                                   retries=retries, progress=False)
        except dl.DownloadError:
            assert not dest.exists()
            continue
        body = dest.read_bytes()
        assert got.sha256 == sha256_bytes(body) and got.size == len(body)
        assert not list(dest.parent.glob("file.bin.*")), "a published download left its part behind"
        if digest:
            assert body == bodies[0]
        elif trusted:
            assert body in bodies, "published a mix of two versions"
        break
    assert not any(v and v.startswith("W/") for v in server.if_ranges), "If-Range with a weak ETag (RFC 9110 forbids)"


def test_download_file_starts_over_on_416(server, tmp_path, sleeps):
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(b"x" * 50)
    server.faults["/data/file.bin"] = ["416"]
    dl.download_file(f"{server.url}/data/file.bin", dest, progress=False)
    assert dest.read_bytes() == BODY and [r for _, r, _ in server.requests] == ["bytes=50-", None]


def test_file_urls_are_copied(tmp_path):
    src = tmp_path / "mirror" / "file.bin"
    src.parent.mkdir()
    src.write_bytes(BODY)
    got = dl.download_file(src.as_uri(), tmp_path / "out.bin", sha256=sha256_bytes(BODY), progress=False)
    assert (tmp_path / "out.bin").read_bytes() == BODY and got.size == len(BODY)
    with pytest.raises(dl.NotFound, match="no such file"):
        dl.download_file((tmp_path / "mirror" / "nope.bin").as_uri(), tmp_path / "out2.bin", progress=False)


def test_bad_urls_fail_at_once(tmp_path):
    with pytest.raises(dl.DownloadError, match="bad URL"):
        dl.download_file("ftp://127.0.0.1/x", tmp_path / "x", progress=False)


# ----------------------------------------------------------------------------- progress


def test_progress_off_is_silent(server, tmp_path, caplog, monkeypatch, capfd):
    monkeypatch.setattr(dl.sys.stderr, "isatty", lambda: True)
    with caplog.at_level(logging.INFO, logger="nanochat"):
        dl.download_file(f"{server.url}/data/file.bin", tmp_path / "f", progress=False)
    assert caplog.records == [] and capfd.readouterr().err == ""


def test_progress_logs_lines_without_a_terminal(server, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(dl.sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="nanochat"):
        dl.download_file(f"{server.url}/data/file.bin", tmp_path / "f")
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(f"{server.url}/data/file.bin" in line for line in lines)
    assert "(100%)" in lines[-1]


def test_progress_bar_on_a_terminal(server, tmp_path, monkeypatch):
    out = io.StringIO()
    out.isatty = lambda: True
    monkeypatch.setattr(dl.sys, "stderr", out)
    server.faults["/data/file.bin"] = ["cut"]  # the bar follows the resumed transfer
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    dl.download_file(f"{server.url}/data/file.bin", tmp_path / "f")
    text = out.getvalue()
    assert "file.bin" in text and "10.0k/10.0k" in text


def test_hf_endpoint_env_overrides_the_hub(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dl.hf_datasets_url() == "https://huggingface.co/datasets"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert dl.hf_datasets_url() == "http://127.0.0.1:9/datasets"
