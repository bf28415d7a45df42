"""One small API over artifact stores: `file:///path` and `s3://bucket/prefix`.

Every stage reads and writes through a Store, so the same code runs on a laptop folder, MinIO,
Ceph, R2 or AWS S3 (endpoint from AWS_ENDPOINT_URL). Keys are relative POSIX paths.

Atomicity: file:// writes go to a temp file then os.replace(); an S3 PUT (and a completed
multipart upload) is atomic per object, so a killed upload never leaves a visible object.
A multi-file artifact is visible only once its manifest (with sha256 digests) exists.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

CHUNK = 8 * 1024 * 1024
RETRIES = int(os.environ.get("NANOCHAT_STORE_RETRIES", "8"))
MULTIPART_THRESHOLD = 64 * 1024 * 1024
# a local write in progress: tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") beside its object; list() hides these only
LOCAL_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# what the OS answers for a key that is not a file (a folder, or a path through a file): no such object, as S3 says
NOT_A_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
log = logging.getLogger("nanochat")


class StoreError(RuntimeError):
    """Any store failure; the message names the URI."""


class ObjectNotFound(StoreError, FileNotFoundError):
    pass


class BucketNotFound(StoreError):
    pass


class AccessDenied(StoreError):
    pass


class CorruptObject(StoreError):
    """The object exists but its bytes are damaged (bad digest, undecodable parquet page, ...)."""


class DigestMismatch(CorruptObject):
    pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_digest(uri: str, actual: str, expected: str | None):
    if expected is not None and actual != expected:
        raise DigestMismatch(f"digest mismatch for {uri}: expected sha256 {expected[:12]}…, got {actual[:12]}… (object corrupted or tampered)")


class Store:
    """Base class: the methods every backend shares, built on a few primitives."""

    root: str

    def uri(self, key: str = "") -> str:
        return self.root.rstrip("/") + ("/" + key.lstrip("/") if key else "")

    # --- JSON helpers
    def put_json(self, key: str, obj) -> str:
        return self.put_bytes(key, self._json_bytes(obj))

    def get_json(self, key: str, sha256: str | None = None):
        return json.loads(self.get_bytes(key, sha256=sha256))

    def get_json_or(self, key: str, default=None):
        try:
            return self.get_json(key)
        except ObjectNotFound:
            return default

    @staticmethod
    def _json_bytes(obj) -> bytes:
        return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()

    # --- compare-and-swap, for locks: get_json_versioned → put_json_if(version) wins only if nobody wrote in between
    def get_json_versioned(self, key: str) -> tuple[object, str | None]:
        """(object, version), or (None, None) when there is no such object."""
        raise NotImplementedError

    def put_json_if(self, key: str, obj, version: str | None) -> str | None:
        """Write obj only if the object is still at `version` (None: only if it does not exist); returns the new
        version, or None when another writer got there first."""
        raise NotImplementedError

    # --- multi-file artifacts
    def publish(self, prefix: str, files: dict, manifest: str = "manifest.json", meta: dict | None = None) -> dict:
        """Upload files (name -> local path or bytes) under prefix, then the manifest LAST.

        Readers treat the artifact as absent until the manifest exists, so a crash mid-upload
        leaves nothing visible."""
        prefix = prefix.rstrip("/")
        digests = {}
        for name, src in files.items():
            key = f"{prefix}/{name}"
            if isinstance(src, (bytes, bytearray, memoryview)):
                digests[name] = {"sha256": self.put_bytes(key, bytes(src)), "size": len(src)}
            else:
                digests[name] = {"sha256": self.put_file(key, src), "size": os.path.getsize(src)}
        doc = {"files": digests, "created": time.time(), **({"meta": meta} if meta else {})}
        self.put_json(f"{prefix}/{manifest}", doc)
        return doc

    def read_manifest(self, prefix: str, manifest: str = "manifest.json") -> dict | None:
        """The artifact's manifest, or None if the artifact is not (completely) published."""
        return self.get_json_or(f"{prefix.rstrip('/')}/{manifest}")

    def get_artifact_file(self, prefix: str, name: str, path, manifest: str = "manifest.json") -> str:
        """Download one file of a published artifact, verifying its digest."""
        doc = self.read_manifest(prefix, manifest)
        if doc is None:
            raise ObjectNotFound(f"artifact not published (no {manifest}): {self.uri(prefix)}")
        return self.get_file(f"{prefix.rstrip('/')}/{name}", path, sha256=doc["files"][name]["sha256"])

    def delete_prefix(self, prefix: str):
        for key in self.list(prefix):
            self.delete(key)

    def describe(self) -> str:
        return self.root


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = root
        self.base = Path(urlparse(root).path if root.startswith("file://") else root).resolve()
        self.root = "file://" + str(self.base)
        self.base.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.base / key).resolve()
        if p != self.base and self.base not in p.parents:
            raise StoreError(f"key escapes the store: {key!r}")
        return p

    def _atomic_write(self, path: Path, write):
        tmp = None
        try:
            fd, tmp = self._mkstemp(path)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError)):  # S3 holds both `a` and `a/b`
                raise StoreError(f"cannot write {'file://' + str(path)}: a local store cannot hold an object and a "
                                 f"folder of objects under one name ({e.strerror or e}), as S3 can") from e
            if isinstance(e, OSError):  # disk full, quota, read-only, permissions: one line naming the object
                cls = AccessDenied if isinstance(e, PermissionError) else StoreError
                raise cls(f"cannot write {'file://' + str(path)}: {e.strerror or e}") from e
            raise

    @staticmethod
    def _mkstemp(path: Path):
        for attempt in range(3):  # a concurrent delete() may drop the folder between mkdir and mkstemp
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def put_bytes(self, key, data) -> str:
        self._atomic_write(self._path(key), lambda f: f.write(data))
        return sha256_bytes(data)

    def get_bytes(self, key, sha256=None) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except NOT_A_FILE:
            raise ObjectNotFound(f"no such object: {self.uri(key)}") from None
        except PermissionError:
            raise AccessDenied(f"permission denied reading {self.uri(key)}") from None
        _check_digest(self.uri(key), sha256_bytes(data), sha256)
        return data

    def get_json_versioned(self, key):
        try:
            data = self._path(key).read_bytes()
        except NOT_A_FILE:
            return None, None
        return json.loads(data), sha256_bytes(data)

    def put_json_if(self, key, obj, version):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(OSError):  # a filesystem without flock (some NFS) gets a best-effort check
                fcntl.flock(folder, fcntl.LOCK_EX)  # writers of this folder's objects through put_json_if take turns
            try:
                current = sha256_bytes(path.read_bytes())
            except NOT_A_FILE:
                current = None
            return self.put_bytes(key, self._json_bytes(obj)) if current == version else None
        finally:
            os.close(folder)  # and the flock with it

    def put_file(self, key, path) -> str:
        with open(path, "rb") as src:  # opened first: a missing source is not a store write error
            self._atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, CHUNK))
        return sha256_file(path)

    def get_file(self, key, path, sha256=None) -> str:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"no such object: {self.uri(key)}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        digest = sha256_file(path)
        _check_digest(self.uri(key), digest, sha256)
        return digest

    def open(self, key):
        try:
            return open(self._path(key), "rb")
        except NOT_A_FILE:
            raise ObjectNotFound(f"no such object: {self.uri(key)}") from None

    def exists(self, key) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with prefix, as S3 lists: a partial name ("shards/shard_0") or a whole key ("a") takes
        its siblings that start with it too ("shards/shard_00.parquet", "ab"), so walk the folder up to its last /."""
        folder = prefix.rpartition("/")[0]
        walk_root = self._path(folder) if folder else self.base
        if not walk_root.is_dir():
            return []
        out = []
        for p in walk_root.rglob("*"):
            if p.is_file() and not LOCAL_TEMP.fullmatch(p.name):
                rel = p.relative_to(self.base).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, key):
        path = self._path(key)
        try:
            path.unlink()
        except NOT_A_FILE:  # no such object: nothing to do, as on S3
            return
        for folder in path.parents:  # like S3, no empty folders: a pruned checkpoint step leaves nothing behind
            if folder == self.base or self.base not in folder.parents:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or not ours to remove): the folders above are not empty either
                break

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def arrow_fs(self):
        import pyarrow.fs as pafs
        return pafs.LocalFileSystem(), str(self.base)


def _unwrap(exc: BaseException) -> BaseException:
    """The S3 error inside boto3's transfer wrappers: upload_file raises S3UploadFailedError for any ClientError
    (403, 404, 503 alike) and download_file RetriesExceededError for broken streams; classify what is inside."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        return exc.__context__
    if isinstance(exc, RetriesExceededError) and isinstance(getattr(exc, "last_exception", None), Exception):
        return exc.last_exception
    return exc


def _transient(exc) -> bool:
    """True for errors worth retrying: 5xx, throttling, timeouts, resets, truncated bodies."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnError, HTTPClientError, IncompleteReadError, ResponseStreamingError, ReadTimeoutError
    if isinstance(exc, (BotoConnError, HTTPClientError, IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
    return False


class S3Store(Store):
    def __init__(self, root: str):
        import boto3
        from botocore.config import Config
        u = urlparse(root)
        if not u.netloc:
            raise StoreError(f"bad S3 URI {root!r}: expected s3://bucket[/prefix]")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # botocore retries requests; our _retry also covers body reads that fail mid-stream
        cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                     s3={"addressing_style": "path"} if self.endpoint else None)
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, config=cfg)
        self.retries: int | None = None  # None: the module default

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, key: str, fn):
        from botocore.exceptions import ClientError, NoCredentialsError
        retries = RETRIES if self.retries is None else self.retries
        for attempt in range(retries + 1):
            try:
                return fn()
            except Exception as raised:  # noqa: BLE001 - classified below
                e = _unwrap(raised)
                if isinstance(e, StoreError):
                    raise e from None
                if isinstance(e, NoCredentialsError):
                    raise AccessDenied(f"no S3 credentials for {self.uri(key)}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
                if isinstance(e, ClientError):
                    code = e.response.get("Error", {}).get("Code", "")
                    if code in ("NoSuchKey", "404", "NotFound"):
                        raise ObjectNotFound(f"no such object: {self.uri(key)}") from None
                    if code == "NoSuchBucket":
                        raise BucketNotFound(f"bucket does not exist: s3://{self.bucket} (while trying to {what} {self.uri(key)})") from None
                    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"):
                        raise AccessDenied(f"S3 denied {what} on {self.uri(key)} ({code}): check the credentials and bucket policy") from None
                if not _transient(e) or attempt == retries:
                    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise StoreError(f"S3 {what} failed for {self.uri(key)} (endpoint {self.endpoint or 'AWS'}): {detail}") from e
            time.sleep(min(8.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=8)

    def put_bytes(self, key, data) -> str:
        digest = sha256_bytes(data)
        self._retry("put", key, lambda: self.s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": digest}))
        return digest

    def get_bytes(self, key, sha256=None) -> bytes:
        data = self._retry("get", key, lambda: self.s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
        _check_digest(self.uri(key), sha256_bytes(data), sha256)
        return data

    def get_json_versioned(self, key):
        def get():
            resp = self.s3.get_object(Bucket=self.bucket, Key=self._key(key))
            return json.loads(resp["Body"].read()), resp["ETag"]
        try:
            return self._retry("get", key, get)
        except ObjectNotFound:
            return None, None

    def put_json_if(self, key, obj, version):
        from botocore.exceptions import ClientError
        data = self._json_bytes(obj)

        def write(**condition):
            return self.s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                      Metadata={"sha256": sha256_bytes(data)}, **condition)["ETag"]

        def put():
            try:  # S3 conditional writes (2024)
                return write(**({"IfMatch": version} if version else {"IfNoneMatch": "*"}))
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                lost = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
                if code in lost or version and code in ("NoSuchKey", "404"):  # If-Match on a deleted object: 404
                    return None
                if code in ("NotImplemented", "501"):  # an S3-compatible server without conditional writes
                    log.warning("%s: this S3 server has no conditional writes; %s is written without a "
                                "compare-and-swap", self.endpoint or "S3", self.uri(key))
                    return write()
                raise
        return self._retry("put", key, put)

    def put_file(self, key, path) -> str:
        digest = sha256_file(path)
        self._retry("upload", key, lambda: self.s3.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": digest}}, Config=self._transfer_config()))
        return digest

    def get_file(self, key, path, sha256=None) -> str:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.part"

        def download():
            try:
                self.s3.download_file(self.bucket, self._key(key), tmp, Config=self._transfer_config())
            except Exception as e:
                # download_file turns a missing key into a bare 404 ClientError from HeadObject
                from botocore.exceptions import ClientError
                if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    raise ObjectNotFound(f"no such object: {self.uri(key)}") from None
                raise
        self._retry("download", key, download)
        digest = sha256_file(tmp)
        try:
            _check_digest(self.uri(key), digest, sha256)
        except DigestMismatch:
            os.unlink(tmp)
            raise
        os.replace(tmp, path)
        return digest

    def open(self, key):
        """Seekable reader (pyarrow's S3 random-access file: fast for parquet footers and row groups)."""
        fs, base = self.arrow_fs()
        if not self.exists(key):
            raise ObjectNotFound(f"no such object: {self.uri(key)}")
        return fs.open_input_file(f"{base}/{key}")

    def exists(self, key) -> bool:
        try:
            self._retry("stat", key, lambda: self.s3.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except ObjectNotFound:
            return False
        except StoreError as e:
            # HEAD has no body, so a missing key arrives as a bare 404
            if "404" in str(e) or "Not Found" in str(e):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run():
            keys = []
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys += [o["Key"][strip:] for o in page.get("Contents", [])]
            return keys
        return sorted(self._retry("list", prefix, run))

    def delete(self, key):
        self._retry("delete", key, lambda: self.s3.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def arrow_fs(self):
        import pyarrow.fs as pafs
        creds = self.s3._request_signer._credentials  # the same credentials boto3 resolved
        kw = {}
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kw = dict(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
        if self.endpoint:
            u = urlparse(self.endpoint)
            kw.update(endpoint_override=u.netloc, scheme=u.scheme or "http")
        fs = pafs.S3FileSystem(region=self.region, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRIES), **kw)
        return fs, f"{self.bucket}/{self.prefix}".rstrip("/")


# `s3//bucket`, `file//dir`, `s3:bucket`: otherwise taken as a local folder named `s3` or `file:`
MISTYPED_SCHEME = re.compile(r"(s3|file)(//|:(?!//))", re.IGNORECASE)
# `s3/bucket/prefix`: a relative folder `s3/`, almost always a missing `://`; `./s3/...` opts out
S3_WITHOUT_SCHEME = re.compile(r"s3/(?=[a-z0-9])", re.IGNORECASE)


def mistyped_store_uri(uri: str) -> str | None:
    """Why `uri` looks like a mistyped s3:// or file:// URI (with the fix), or None when it looks as meant."""
    if m := MISTYPED_SCHEME.match(uri):
        scheme = m.group(1).lower()
        fixed = f"{scheme}://{'/' if scheme == 'file' else ''}{uri[m.end():].lstrip('/')}"
        return f"store URI {uri!r} has a mistyped scheme; did you mean {fixed!r}?"
    if S3_WITHOUT_SCHEME.match(uri) and not Path(uri).exists():
        return f"store URI {uri!r} has no scheme; did you mean 's3://{uri[3:]}'? (write './{uri}' for a local folder)"
    return None


def open_store(uri: str | None = None) -> Store:
    """Open a store by URI; a bare path is treated as file://."""
    uri = uri or os.environ.get("NANOCHAT_STORE") or default_store_uri()
    if why := mistyped_store_uri(uri):
        raise StoreError(why)
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        return LocalStore(uri)
    if scheme == "s3":
        return S3Store(uri)
    raise StoreError(f"unsupported store URI {uri!r}: use file:///path/to/dir or s3://bucket/prefix")


def default_store_uri(run: str = "default") -> str:
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return "file://" + os.path.abspath(os.path.join(base, "runs", run))


def check_reachable(store: Store):
    """Fail fast with one clear line if the store cannot be used (bad bucket, credentials, endpoint)."""
    probe = ".nanochat-probe"
    saved = getattr(store, "retries", None)
    if hasattr(store, "retries"):
        store.retries = 1  # a dead endpoint should fail in seconds, not after the full backoff
    try:
        store.put_bytes(probe, b"ok")
        store.delete(probe)
    finally:
        if hasattr(store, "retries"):
            store.retries = saved


def bytes_reader(data: bytes):
    return io.BytesIO(data)
