"""HTTP downloads into a store or a local file: retried, resumed, verified, published atomically.

    got = fetch(url, store, "data/tasks/gsm8k/main/test.parquet", sha256=None)   # -> Fetched(url, sha256, size)
    got = download_file(url, Path("cache/eval_bundle.zip"))                     # a local file

One attempt streams the body into <dest>.part. Transient failures (connection errors and resets,
timeouts, truncated bodies, HTTP 408/425/429/5xx) are retried with exponential backoff and jitter,
waiting at least what a Retry-After header asks; 404 and the other 4xx fail at once with the URL in
the message. A cut transfer resumes with an HTTP Range request when the server honours it (206),
else starts over. The resume names the version the part holds (If-Range: the strong ETag or the
Last-Modified it came with, kept in <dest>.part.version so a later run's resume names it too), so a
file changed upstream comes back whole, not as the old head glued to the new tail, and a 206 naming
another version is thrown away. The body is checked against `sha256` or, when none is given, against
the digest Hugging Face announces (X-Linked-Etag: the LFS object's sha256); a mismatch is retried
from scratch, then reported, and nothing is published. A server that names no version (or only a
weak ETag) and no digest leave an upstream change mid-download undetectable. file:// URLs are copied
(air-gapped mirrors).
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from urllib3.util import Retry

from nanochat.errors import Failure
from nanochat.store import sha256_file

log = logging.getLogger("nanochat")

RETRIES = 5
BACKOFF = 1.0            # seconds before the first retry; doubles each time (with jitter) up to MAX_BACKOFF
MAX_BACKOFF = 60.0
MAX_RETRY_AFTER = 600.0  # a server's Retry-After is honoured up to this (a misconfigured one must not stall a run for hours)
TIMEOUT = 60.0           # seconds to connect, and without a byte while reading
CHUNK = 1 << 20
USER_AGENT = "nanochat-k8s"
RETRY_STATUSES = (408, 425, 429)  # and every 5xx
HF_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(Failure):
    """A download that failed for good; the message names the URL and why. `status`: the HTTP status, if any;
    `mismatch`: every attempt's bytes had another sha256 than the expected one (corrupted, or changed upstream)."""

    def __init__(self, message: str, url: str, status: int | None = None, mismatch: bool = False):
        super().__init__(message)
        self.url, self.status, self.mismatch = url, status, mismatch


class NotFound(DownloadError):
    """HTTP 404/410, or a file:// path that does not exist."""


class Cancelled(DownloadError):
    """The caller's `cancel` event was set (Ctrl-C, a stage's SIGTERM): stopped at the next chunk or back-off."""


class _Transient(Exception):
    """Worth another attempt; `wait`: the server's Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, wait: float | None = None, mismatch: bool = False):
        super().__init__(message)
        self.wait, self.mismatch = wait, mismatch


@dataclass(frozen=True)
class Fetched:
    url: str
    sha256: str
    size: int


def hf_datasets_url() -> str:
    """The Hugging Face datasets base URL; $HF_ENDPOINT overrides it (mirrors, tests), as in huggingface_hub."""
    return os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/") + "/datasets"


def fetch(url: str, store, key: str, sha256: str | None = None, retries: int = RETRIES, backoff: float = BACKOFF,
          timeout: float = TIMEOUT, progress: bool = True, headers: dict | None = None, check=None,
          cancel=None) -> Fetched:
    """Download url into store[key]: a temp file, verified, then published with store.put_file (atomic:
    a failed or killed download never leaves an object behind)."""
    with tempfile.TemporaryDirectory(prefix="nanochat-dl-") as tmp:
        path = Path(tmp) / key.rsplit("/", 1)[-1]
        got = download_file(url, path, sha256, retries, backoff, timeout, progress, headers, check, cancel)
        store.put_file(key, path)
    return got


def download_file(url: str, dest, sha256: str | None = None, retries: int = RETRIES, backoff: float = BACKOFF,
                  timeout: float = TIMEOUT, progress: bool = True, headers: dict | None = None, check=None,
                  cancel=None) -> Fetched:
    """Download url to dest, which appears (os.replace) only once verified.

    `check(path)`, if given, inspects the complete body before it is accepted; an exception from it
    counts as a corrupted body (retried, unless the digest proved the bytes are the published ones).
    After a failure, <dest>.part stays behind: the next call resumes it. Setting `cancel` (a threading.Event)
    stops the download at its next chunk or back-off with Cancelled."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    bar = _Progress(url, progress)
    try:
        for attempt in range(retries + 1):
            try:
                announced = _attempt(url, part, timeout, headers, bar, cancel)
                return _accept(url, part, dest, sha256 or announced, check)
            except _Transient as e:
                if attempt == retries:
                    raise DownloadError(f"download failed after {retries + 1} attempts: {url}: {e}", url,
                                        mismatch=e.mismatch) from None
                delay = min(MAX_BACKOFF, backoff * 2 ** attempt) * (0.5 + random.random() / 2)  # jitter: failed together, retry apart
                delay = max(delay, min(e.wait or 0.0, MAX_RETRY_AFTER))
                log.warning("download: %s: %s; retrying in %.1fs (%d/%d)", url, e, delay, attempt + 1, retries)
                _pause(delay, cancel, url)
    finally:
        bar.close()


def _pause(seconds: float, cancel, url: str):
    """Back off before a retry; a set `cancel` ends the wait, and the download, at once."""
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled(f"download cancelled: {url}", url)


def stored_sha256(store, key: str) -> str:
    """sha256 of an object as the store holds it now (is it still the file we downloaded?)."""
    h = hashlib.sha256()
    with store.open(key) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _attempt(url: str, part: Path, timeout: float, headers: dict | None, bar, cancel=None) -> str | None:
    """One request: append url's bytes to part (from its current size, with a Range request).
    Returns the sha256 the server announced, if any."""
    if urllib.parse.urlsplit(url).scheme == "file":
        src = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not src.is_file():
            raise NotFound(f"not found: {url} (no such file)", url)
        shutil.copyfile(src, part)
        return None
    have = part.stat().st_size if part.exists() else 0
    held = _read_version(part) if have else None
    # identity: the bytes on disk are the server's bytes, and Range offsets count those bytes
    hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {}),
            **({"Range": f"bytes={have}-"} if have else {}), **({"If-Range": held} if held else {})}
    got, total, encoded = have, None, False
    try:
        with requests.get(url, headers=hdrs, stream=True, timeout=timeout) as resp:
            _check_status(url, resp, have, part)
            if resp.status_code == 206 and held and _version(resp) not in (None, held):  # If-Range not honoured
                _discard(part)
                raise _Transient(f"changed upstream while resuming ({held} -> {_version(resp)}); starting over")
            if resp.status_code != 206:  # no Range asked, or the server ignored it (or the file changed): start over
                have = got = 0
                _write_version(part, _version(resp))
            encoded = resp.headers.get("Content-Encoding", "identity") != "identity"  # asked for identity, got gzip anyway
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length and not encoded else None
            bar.start(have, total)
            with open(part, "ab" if have else "wb") as out:
                # raw reads: a cut connection still hands over the bytes that arrived, which a Range request then skips
                for chunk in resp.raw.stream(CHUNK, decode_content=encoded):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"download cancelled: {url}", url)
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(got)
            if total is not None and got < total:
                raise _Transient(f"truncated body: {got} of {total} bytes")
            return _announced_sha256(resp)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as e:
        raise DownloadError(f"bad URL {url}: {e}", url) from None
    except requests.exceptions.SSLError as e:  # a certificate problem does not fix itself
        raise DownloadError(f"TLS error for {url}: {e}", url) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as e:  # refused, reset, timed out, cut
        if encoded:  # decoded bytes cannot be resumed with a Range over encoded ones
            _discard(part)
        where = f" after {got} of {total} bytes (truncated body)" if total is not None else ""
        raise _Transient(f"{type(e).__name__}{where}: {e}") from None


def _version(resp) -> str | None:
    """What If-Range can name this response's version by: a strong ETag, else its Last-Modified date."""
    etag = resp.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")


def _version_file(part: Path) -> Path:
    return part.with_name(part.name + ".version")


def _read_version(part: Path) -> str | None:
    try:
        return _version_file(part).read_text().strip() or None
    except OSError:
        return None


def _write_version(part: Path, version: str | None):
    """Before the first byte of a new part: a part never outlives the note of which version it holds."""
    if version:
        _version_file(part).write_text(version)
    else:
        _version_file(part).unlink(missing_ok=True)


def _discard(part: Path):
    part.unlink(missing_ok=True)
    _version_file(part).unlink(missing_ok=True)


def _check_status(url: str, resp, have: int, part: Path):
    code = resp.status_code
    if have and code == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        _discard(part)
        raise _Transient(f"asked for bytes {have}- and got {resp.headers.get('Content-Range')!r}; starting over")
    if code < 400:
        return
    if code == 416 and have:  # our partial file is no prefix of theirs (or it changed upstream)
        _discard(part)
        raise _Transient("HTTP 416 on resume; starting over")
    if code in RETRY_STATUSES or code >= 500:
        raise _Transient(f"HTTP {code} {resp.reason}", wait=_retry_after(resp))
    if code in (404, 410):
        raise NotFound(f"not found (HTTP {code}): {url}", url, code)
    raise DownloadError(f"HTTP {code} {resp.reason}: {url}", url, code)


def _retry_after(resp) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return Retry().parse_retry_after(value) if value else None  # seconds, or an HTTP date
    except urllib3.exceptions.InvalidHeader:
        return None


def _announced_sha256(resp) -> str | None:
    """Hugging Face sends the LFS object's sha256 as X-Linked-Etag on the redirect to its CDN."""
    for r in (*resp.history, resp):
        etag = r.headers.get("X-Linked-Etag", "").strip('"').lower()
        if _SHA256.fullmatch(etag):
            return etag
    return None


def _accept(url: str, part: Path, dest: Path, expected: str | None, check) -> Fetched:
    digest = sha256_file(part)
    if expected and digest != expected:
        _discard(part)  # the next attempt starts from scratch: these bytes are not worth resuming
        raise _Transient(f"sha256 mismatch: expected {expected}, got {digest} (corrupted in transit, or changed upstream)",
                         mismatch=True)
    if check is not None:
        try:
            check(part)
        except Exception as e:  # noqa: BLE001 - any objection to the body
            _discard(part)
            if expected:  # the bytes are the published ones: another download would be the same
                raise DownloadError(f"{url}: {e}", url) from None
            raise _Transient(f"bad body: {e}") from None
    size = part.stat().st_size
    os.replace(part, dest)
    _version_file(part).unlink(missing_ok=True)
    return Fetched(url, digest, size)


class _Progress:
    """Bytes of one download: a tqdm bar on a terminal, else a log line every ~10% or 30 s (pod logs)."""

    def __init__(self, url: str, enabled: bool):
        self.url, self.enabled, self.bar, self.total = url, enabled, None, None
        self.t0, self.last_t, self.last_frac = time.time(), 0.0, -1.0

    def start(self, have: int, total: int | None):
        self.total = total
        if not self.enabled or not total or not sys.stderr.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.url.rsplit("/", 1)[-1], dynamic_ncols=True)
        else:  # a retry: the bar follows the restarted or resumed transfer
            self.bar.reset(total)
            self.bar.update(have)

    def update(self, got: int):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(got - self.bar.n)
            return
        now, frac = time.time(), got / self.total if self.total else 0.0
        if frac - self.last_frac >= 0.1 or now - self.last_t > 30 or (self.total and got == self.total and self.last_frac < 1):
            size = f"{got / 1e6:.1f}/{self.total / 1e6:.1f} MB ({100 * frac:.0f}%)" if self.total else f"{got / 1e6:.1f} MB"
            log.info("download: %s %s, %.1f MB/s", self.url, size, got / 1e6 / max(now - self.t0, 1e-6))
            self.last_t, self.last_frac = now, frac

    def close(self):
        if self.bar is not None:
            self.bar.close()
