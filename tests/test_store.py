"""nanochat.store against file:// and a real S3 server on 127.0.0.1 (moto), through boto3 and pyarrow."""
from __future__ import annotations

import functools
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanochat import store as store_mod
from nanochat.store import AccessDenied, BucketNotFound, DigestMismatch, ObjectNotFound, StoreError, open_store, sha256_bytes
from tests.conftest import make_bucket
from tests.fixtures import fuzz
from tests.s3util import FaultProxy


def test_bytes_json_files_roundtrip(store_uri, tmp_path):
    s = open_store(store_uri)
    digest = s.put_bytes("a/b.bin", b"hello")
    assert digest == sha256_bytes(b"hello")
    assert s.get_bytes("a/b.bin") == b"hello"
    s.put_json("a/c.json", {"x": [1, 2]})
    assert s.get_json("a/c.json") == {"x": [1, 2]}
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(200_000))
    d = s.put_file("files/src.bin", src)
    dst = tmp_path / "out" / "dst.bin"
    assert s.get_file("files/src.bin", dst, sha256=d) == d
    assert dst.read_bytes() == src.read_bytes()
    assert s.exists("a/b.bin") and not s.exists("a/nope")
    assert s.list("a/") == ["a/b.bin", "a/c.json"]
    assert s.list("a/b") == ["a/b.bin"]
    assert s.list("zzz/") == []
    s.delete("a/b.bin")
    assert not s.exists("a/b.bin")
    s.delete_prefix("a/")
    assert s.list("a/") == []


def test_put_json_if_is_a_compare_and_swap(store_uri):
    """The lock's primitive: a write wins only against the version its writer read (None: only a new object)."""
    store = open_store(store_uri)
    assert store.get_json_versioned("runner/lock.json") == (None, None)
    v1 = store.put_json_if("runner/lock.json", {"pid": 1}, None)
    assert v1 and store.put_json_if("runner/lock.json", {"pid": 2}, None) is None  # a second creator loses
    assert store.get_json_versioned("runner/lock.json") == ({"pid": 1}, v1)
    v2 = store.put_json_if("runner/lock.json", {"pid": 1, "beat": 2}, v1)
    assert v2 and v2 != v1
    assert store.put_json_if("runner/lock.json", {"pid": 3}, v1) is None  # read before the last write: loses
    assert store.get_json("runner/lock.json") == {"pid": 1, "beat": 2}
    store.delete("runner/lock.json")
    assert store.put_json_if("runner/lock.json", {"pid": 4}, v2) is None  # the version it expected is gone
    assert store.put_json_if("runner/lock.json", {"pid": 4}, None)


def test_racing_put_json_if_has_one_winner(tmp_path):
    """Threads that read the same version and all try to write: exactly one wins, every time."""
    import threading
    store = open_store(f"file://{tmp_path}/st")
    for round_ in range(20):
        _, version = store.get_json_versioned("lock.json")
        start, wins = threading.Barrier(6), []

        def race(i):
            start.wait()
            if store.put_json_if("lock.json", {"round": round_, "by": i}, version):
                wins.append(i)
        threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(wins) == 1 and store.get_json("lock.json") == {"round": round_, "by": wins[0]}


def test_open_is_seekable_and_reads_parquet(store_uri, tmp_path):
    s = open_store(store_uri)
    table = pa.table({"text": [f"doc {i}" for i in range(1000)]})
    local = tmp_path / "shard.parquet"
    pq.write_table(table, local, row_group_size=100)
    s.put_file("data/shards/shard_00000.parquet", local)
    with s.open("data/shards/shard_00000.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_group(3).column("text")[0].as_py() == "doc 300"
    fs, base = s.arrow_fs()
    assert pq.read_table(f"{base}/data/shards/shard_00000.parquet", filesystem=fs).num_rows == 1000


def test_missing_key_names_the_uri(store_uri):
    s = open_store(store_uri)
    for call in (lambda: s.get_bytes("no/such.bin"), lambda: s.get_file("no/such.bin", "/tmp/x"), lambda: s.open("no/such.bin")):
        with pytest.raises(ObjectNotFound, match="no/such.bin"):
            call()
    assert s.get_json_or("no/such.json", {"d": 1}) == {"d": 1}


def test_publish_manifest_and_tamper_detection(store_uri, tmp_path):
    s = open_store(store_uri)
    f = tmp_path / "model.pt"
    f.write_bytes(b"weights" * 1000)
    doc = s.publish("checkpoints/base/10", {"model.pt": f, "meta-extra.json": b"{}"}, manifest="meta.json", meta={"step": 10})
    assert s.read_manifest("checkpoints/base/10", "meta.json")["meta"] == {"step": 10}
    assert set(doc["files"]) == {"model.pt", "meta-extra.json"}
    out = tmp_path / "dl.pt"
    s.get_artifact_file("checkpoints/base/10", "model.pt", out, manifest="meta.json")
    assert out.read_bytes() == f.read_bytes()
    s.put_bytes("checkpoints/base/10/model.pt", b"tampered")
    with pytest.raises(DigestMismatch, match="model.pt"):
        s.get_artifact_file("checkpoints/base/10", "model.pt", out, manifest="meta.json")
    with pytest.raises(DigestMismatch):
        s.get_bytes("checkpoints/base/10/model.pt", sha256=doc["files"]["model.pt"]["sha256"])
    assert s.read_manifest("checkpoints/base/20", "meta.json") is None
    with pytest.raises(ObjectNotFound, match="not published"):
        s.get_artifact_file("checkpoints/base/20", "model.pt", out, manifest="meta.json")


KILLED_UPLOAD = textwrap.dedent("""
    import os, sys, time
    from nanochat.store import open_store
    import nanochat.store as m
    m.MULTIPART_THRESHOLD = 5 * 1024 * 1024
    s = open_store(sys.argv[1])
    big = os.path.join(os.environ["TMPDIR"], "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(40 * 1024 * 1024))
    orig = s.put_file
    def slow_put_file(key, path):
        print("UPLOADING", flush=True)
        return orig(key, path)
    s.put_file = slow_put_file
    s.publish("artifact", {"big.bin": big, "small.txt": b"x"})
""")


def test_killed_upload_leaves_no_visible_artifact(store_uri, tmp_path):
    """SIGKILL mid-publish: the manifest never appears, and no partial object is listed as the final key."""
    p = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, store_uri], stdout=subprocess.PIPE, env=os.environ.copy())
    assert p.stdout.readline().strip() == b"UPLOADING"
    p.send_signal(signal.SIGKILL)
    p.wait()
    s = open_store(store_uri)
    assert s.read_manifest("artifact") is None
    # a torn object is never visible under its final name: either complete or absent
    if s.exists("artifact/big.bin"):
        assert len(s.get_bytes("artifact/big.bin")) == 40 * 1024 * 1024


def test_unknown_scheme_and_bad_uri():
    with pytest.raises(StoreError, match="unsupported store URI 'gs://x'"):
        open_store("gs://x")
    with pytest.raises(StoreError, match="bad S3 URI"):
        open_store("s3:///nobucket")


@pytest.mark.parametrize("uri, says", [("s3//b/run", "did you mean 's3://b/run'?"), ("file//tmp/x", "did you mean 'file:///tmp/x'?"),
                                        ("s3/b/run", "has no scheme; did you mean 's3://b/run'?")])
def test_mistyped_scheme_opens_nothing(uri, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=re.escape(says)):
        open_store(uri)
    assert not (tmp_path / "s3").exists() and not (tmp_path / "file").exists()
    (tmp_path / "s3" / "b" / "run").mkdir(parents=True)  # a folder that really exists is taken as asked
    if uri == "s3/b/run":
        assert open_store(uri).root == f"file://{tmp_path}/s3/b/run"


def test_stage_with_a_mistyped_store_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "tests.fake_stages.echo", "--store=s3//b/run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "did you mean 's3://b/run'?" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "s3").exists()


def test_missing_bucket(s3_env):
    s = open_store("s3://bucket-that-does-not-exist/x")
    with pytest.raises(BucketNotFound, match="bucket-that-does-not-exist"):
        s.put_bytes("k", b"v")


def test_transient_errors_are_retried(s3_env, monkeypatch):
    """503 SlowDown, 500s, connection resets and truncated bodies through a loopback proxy: all retried."""
    bucket = make_bucket(s3_env.url)
    plan = {2: ("status", 503, "SlowDown"), 3: ("status", 500, "InternalError"), 5: "reset", 7: "truncate", 8: ("status", 503, "SlowDown")}
    proxy = FaultProxy(s3_env.port, lambda method, path, n: plan.get(n)).start()
    monkeypatch.setattr(store_mod, "RETRIES", 6)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s = open_store(f"s3://{bucket}/p")
        payload = os.urandom(300_000)
        for i in range(4):
            s.put_bytes(f"obj{i}", payload)
            assert s.get_bytes(f"obj{i}", sha256=sha256_bytes(payload)) == payload
        assert len(proxy.injected) == len(plan)
    finally:
        proxy.stop()


def test_an_s3_server_without_conditional_writes_still_takes_the_lock(s3_env, monkeypatch, caplog):
    """A server that answers a conditional PUT with 501 NotImplemented: put_json_if writes plainly and warns, so a
    runner still starts (one runner per store is then up to the user, as before conditional writes)."""
    bucket = make_bucket(s3_env.url)
    proxy = FaultProxy(s3_env.port, lambda method, path, n: ("status", 501, "NotImplemented")
                       if method == "PUT" and path.endswith("lock.json") and n == 1 else None).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s = open_store(f"s3://{bucket}/p")
        with caplog.at_level(logging.WARNING, logger="nanochat"):
            assert s.put_json_if("runner/lock.json", {"pid": 1}, None)
        assert s.get_json("runner/lock.json") == {"pid": 1} and "no conditional writes" in caplog.text
        assert [a for _, _, a in proxy.injected] == [("status", 501, "NotImplemented")]
    finally:
        proxy.stop()


def test_access_denied_is_one_clear_error(s3_env, monkeypatch):
    bucket = make_bucket(s3_env.url)
    proxy = FaultProxy(s3_env.port, lambda m, p, n: ("status", 403, "InvalidAccessKeyId")).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(AccessDenied, match="check the credentials"):
            open_store(f"s3://{bucket}/p").put_bytes("k", b"v")
    finally:
        proxy.stop()


def test_local_delete_drops_emptied_folders_but_not_the_store(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    store.put_bytes("a/b/c/one", b"1")
    store.put_bytes("a/two", b"2")
    store.delete("a/b/c/one")
    assert not (tmp_path / "st" / "a" / "b").exists() and (tmp_path / "st" / "a" / "two").is_file()
    store.delete_prefix("a/")
    assert (tmp_path / "st").is_dir() and list((tmp_path / "st").iterdir()) == []
    store.put_bytes("a/b/again", b"3")  # writing into a folder a delete removed recreates it
    assert store.get_bytes("a/b/again") == b"3"


def test_local_store_rejects_escaping_keys(tmp_path):
    s = open_store(f"file://{tmp_path}/st")
    with pytest.raises(StoreError, match="escapes"):
        s.put_bytes("../outside", b"x")


SEGMENTS = ["a", "b", "ab", "a.tmp", "a b", "é"]  # siblings that share a start, a name like our temp files', odd bytes
KEYS = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map("/".join)
PREFIXES = st.one_of(st.just(""), KEYS, KEYS.map(lambda k: k + "/"), KEYS.map(lambda k: k[:-1]))
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("put"), KEYS, st.binary(max_size=8)),
    st.tuples(st.sampled_from(["get", "open", "exists", "delete"]), KEYS),
    st.tuples(st.sampled_from(["list", "delete_prefix"]), PREFIXES)), min_size=1, max_size=25)


def read_opened(store, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


def apply_to(store, model: dict, op, local: bool):
    """One operation on a store and on the dict it should behave as (S3's semantics): the results must agree.
    A local store cannot hold both `a` and `a/b` (a file and a folder): it refuses such a write in one line."""
    kind, key, *data = op
    if kind == "put":
        if local and any(k.startswith(key + "/") or key.startswith(k + "/") for k in model):
            with pytest.raises(StoreError, match="cannot hold an object and a folder"):
                store.put_bytes(key, data[0])
            return
        assert store.put_bytes(key, data[0]) == sha256_bytes(data[0])
        model[key] = data[0]
    elif kind in ("get", "open"):
        read = store.get_bytes if kind == "get" else functools.partial(read_opened, store)
        if key in model:
            assert read(key) == model[key]
        else:
            with pytest.raises(ObjectNotFound):
                read(key)
    elif kind == "exists":
        assert store.exists(key) == (key in model)
    elif kind == "list":
        assert store.list(key) == sorted(k for k in model if k.startswith(key))
    elif kind == "delete":
        store.delete(key)
        model.pop(key, None)
    else:
        store.delete_prefix(key)
        for k in [k for k in model if k.startswith(key)]:
            del model[k]


def test_file_and_s3_stores_behave_as_one_model(s3_env, tmp_path):
    """Random sequences of writes, reads, listings and deletes on a local store and on S3 (moto on 127.0.0.1), each
    checked against a dict: whatever backend a stage writes to, it reads and lists the same keys back."""
    bucket = make_bucket(s3_env.url)

    @fuzz(60)
    @given(OPERATIONS)
    def check(operations):
        run = uuid.uuid4().hex[:8]
        stores = [(open_store(f"file://{tmp_path}/{run}"), {}, True), (open_store(f"s3://{bucket}/{run}"), {}, False)]
        for op in operations:
            for store, model, local in stores:
                apply_to(store, model, op, local)
    check()
