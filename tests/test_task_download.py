"""The task-data downloader against a real HTTP server on 127.0.0.1 serving files the test writes
at the same paths as the Hugging Face exports (…/<repo>/resolve/<revision>/<path>)."""
import dataclasses
import hashlib
import io
import json
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.store import open_store
from nanochat.tasks import get_task
from nanochat.tasks.download import (GITHUB_RAW, KARPATHY_S3, SOURCES, TaskDownloadError, download_task_data,
                                     resolve_names)

GSM8K = [{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4 = <<3+4=7>>7 apples.\n#### 7"},
         {"question": "What is 6 times 7?", "answer": "6*7 = <<6*7=42>>42.\n#### 42"}]


def parquet_bytes(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


class FakeHub:
    """Serves {url path: bytes}; `failures[path] = [500, 500]` answers those statuses first;
    `truncate` paths get a Content-Length longer than the body."""

    def __init__(self):
        self.files, self.failures, self.truncate, self.requests = {}, {}, set(), Counter()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests[self.path] += 1
                pending = hub.failures.get(self.path)
                if pending:
                    self.send_error(pending.pop(0))
                    return
                if self.path not in hub.files:
                    self.send_error(404)
                    return
                body = hub.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if self.path in hub.truncate else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture
def store(tmp_path):
    return open_store(f"file://{tmp_path}/store")


def unpinned(name):
    """The real table entry (real paths and revision) without digests, for fixture content."""
    return dataclasses.replace(SOURCES[name], files={p: None for p in SOURCES[name].files})


def hf_path(name, path):
    src = SOURCES[name]
    return f"/{src.repo}/resolve/{src.revision}/{path}"


def serve_gsm8k(hub):
    hub.files[hf_path("gsm8k", "main/train-00000-of-00001.parquet")] = parquet_bytes(GSM8K)
    hub.files[hf_path("gsm8k", "main/test-00000-of-00001.parquet")] = parquet_bytes(GSM8K[:1])


def test_downloads_into_the_store_and_tasks_load(hub, store):
    serve_gsm8k(hub)
    report = download_task_data(store, ["gsm8k"], base_url=hub.url, sources={"gsm8k": unpinned("gsm8k")}, backoff=0)
    key = "data/tasks/gsm8k/main/train-00000-of-00001.parquet"
    assert store.get_bytes(key) == parquet_bytes(GSM8K)
    index = store.get_json("data/tasks/gsm8k/index.json")
    assert index[key]["sha256"] == hashlib.sha256(parquet_bytes(GSM8K)).hexdigest() == report[key]["sha256"]
    assert index[key]["revision"] == SOURCES["gsm8k"].revision and index[key]["url"].startswith(hub.url)
    task = get_task("gsm8k", store, split="train")
    assert len(task) == 2 and {c["messages"][0]["content"] for c in task} == {r["question"] for r in GSM8K}
    assert len(get_task("gsm8k", store, split="test")) == 1


def test_retries_server_errors_then_succeeds(hub, store):
    serve_gsm8k(hub)
    path = hf_path("gsm8k", "main/train-00000-of-00001.parquet")
    hub.failures[path] = [500, 503]
    download_task_data(store, ["gsm8k"], base_url=hub.url, sources={"gsm8k": unpinned("gsm8k")}, backoff=0.01)
    assert hub.requests[path] == 3
    assert store.exists("data/tasks/gsm8k/main/train-00000-of-00001.parquet")


def test_truncated_body_is_retried(hub, store):
    serve_gsm8k(hub)
    path = hf_path("gsm8k", "main/test-00000-of-00001.parquet")
    hub.truncate.add(path)
    with pytest.raises(TaskDownloadError, match="truncated|IncompleteRead"):
        download_task_data(store, ["gsm8k"], base_url=hub.url, sources={"gsm8k": unpinned("gsm8k")}, retries=2, backoff=0.01)
    assert hub.requests[path] == 3
    assert not store.exists("data/tasks/gsm8k/main/test-00000-of-00001.parquet")


def test_corrupted_file_is_detected_by_sha256(hub, store):
    serve_gsm8k(hub)
    good = parquet_bytes(GSM8K)
    path = hf_path("gsm8k", "main/train-00000-of-00001.parquet")
    hub.files[path] = good[:-10] + b"corrupted!"
    pinned = dataclasses.replace(SOURCES["gsm8k"], files={"main/train-00000-of-00001.parquet": hashlib.sha256(good).hexdigest()})
    with pytest.raises(TaskDownloadError, match="sha256 mismatch"):
        download_task_data(store, ["gsm8k"], base_url=hub.url, sources={"gsm8k": pinned}, retries=1, backoff=0.01)
    assert hub.requests[path] == 2 and not store.exists("data/tasks/gsm8k/main/train-00000-of-00001.parquet")
    hub.files[path] = good  # fixed upstream: the same pin now verifies
    download_task_data(store, ["gsm8k"], base_url=hub.url, sources={"gsm8k": pinned}, backoff=0.01)
    assert store.get_bytes("data/tasks/gsm8k/main/train-00000-of-00001.parquet") == good


def test_404_is_a_clear_error_without_retries(hub, store):
    with pytest.raises(TaskDownloadError, match=r"404.*openai/gsm8k/resolve/.*main/train-00000-of-00001\.parquet"):
        download_task_data(store, ["gsm8k"], base_url=hub.url, sources={"gsm8k": unpinned("gsm8k")}, retries=3, backoff=0.01)
    assert sum(hub.requests.values()) == 1


def test_resumes_and_skips_verified_files(hub, store):
    serve_gsm8k(hub)
    sources = {"gsm8k": unpinned("gsm8k")}
    download_task_data(store, ["gsm8k"], base_url=hub.url, sources=sources, backoff=0)
    before = sum(hub.requests.values())
    report = download_task_data(store, ["gsm8k"], base_url=hub.url, sources=sources, backoff=0)
    assert sum(hub.requests.values()) == before and all(r["skipped"] for r in report.values())
    # a stored file that no longer matches its recorded digest is fetched again
    key = "data/tasks/gsm8k/main/test-00000-of-00001.parquet"
    store.put_bytes(key, b"bit rot")
    report = download_task_data(store, ["gsm8k"], base_url=hub.url, sources=sources, backoff=0)
    assert not report[key]["skipped"] and store.get_bytes(key) == parquet_bytes(GSM8K[:1])
    assert sum(hub.requests.values()) == before + 1


def test_plain_file_sources_through_mirrors(hub, store):
    words = "\r\n".join(["apple", "banana", "cherry"]) + "\r\n"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("words_alpha.txt", words)
    (words_path,) = SOURCES["spellingbee"].files
    hub.files[f"/gh/{words_path}"] = zbuf.getvalue()
    identity = [[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}]]
    hub.files["/s3/identity_conversations.jsonl"] = "".join(json.dumps(c) + "\n" for c in identity).encode()
    sources = {"spellingbee": unpinned("spellingbee"), "identity": unpinned("identity")}
    mirrors = {GITHUB_RAW: f"{hub.url}/gh", KARPATHY_S3: f"{hub.url}/s3"}
    download_task_data(store, ["spellingbee", "identity"], mirrors=mirrors, sources=sources, backoff=0)
    assert store.exists("data/tasks/spellingbee/words_alpha.zip")
    bee = get_task("spellingbee", store, size=5)
    assert all(any(w in c["messages"][0]["content"] for w in ("apple", "banana", "cherry")) for c in bee)
    assert [c["messages"] for c in get_task("identity", store)] == identity


def test_the_real_table():
    """Every task has a pinned source; HF entries use real export paths; names resolve with aliases."""
    assert resolve_names(["ARC", "GSM8K"], SOURCES) == ["arc_easy", "arc_challenge", "gsm8k"]
    for name, src in SOURCES.items():
        assert src.files and src.license, name
        for path, sha in src.files.items():
            assert sha is None or (len(sha) == 64 and int(sha, 16) >= 0), (name, path)
            if src.repo:
                assert len(src.revision) == 40 and path.endswith(".parquet"), (name, path)
    assert SOURCES["gsm8k"].url("main/train-00000-of-00001.parquet", "https://huggingface.co/datasets", {}) == \
        "https://huggingface.co/datasets/openai/gsm8k/resolve/740312add88f781978c0658806c59bc2815b9866/main/train-00000-of-00001.parquet"
    with pytest.raises(KeyError, match="known"):
        resolve_names(["nope"], SOURCES)
