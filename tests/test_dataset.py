"""nanochat.dataset + the data stage: embedded corpus, downloads against a loopback HTTP server, prepare, recipe."""
from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import DataError, DownloadError, INDEX_KEY, RECORDS_PREFIX, shard_key, shard_name
from nanochat.store import open_store, sha256_bytes
from tests.s3util import free_port

FINEWEB_VAL = dataset.DATASETS["fineweb-edu"].val_index


# ----------------------------------------------------------------------------- a loopback "Hugging Face"


def make_shard(i: int, rows: int = 40, row_group_rows: int = 8) -> bytes:
    texts = [f"shard {i} document {j}: " + "lorem ipsum dolor " * (1 + (i * 7 + j) % 13) for j in range(rows)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_rows, compression="zstd")
    return buf.getvalue()


class ShardServer:
    """Serves test-made shards on 127.0.0.1 with scripted faults per file, counting requests per file.

    faults[name] is a list consumed one per request: "500", "drop" (half the body, then the connection
    closes), "hang" (half the body, then nothing until released), "corrupt" (one byte flipped).
    With redirect=True it behaves like Hugging Face: /ds/<name> answers 302 to /cdn/<name> carrying
    X-Linked-Etag: "<sha256>"."""

    def __init__(self, files: dict[str, bytes], redirect: bool = False):
        self.files, self.redirect = dict(files), redirect
        self.faults: dict[str, list[str]] = {}
        self.counts: Counter = Counter()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                kind, _, name = self.path.strip("/").partition("/")
                data = server.files.get(name)
                if data is None:
                    return self._send(404, b"not found")
                if server.redirect and kind == "ds":
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{name}")
                    self.send_header("X-Linked-Etag", f'"{sha256_bytes(data)}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.counts[name] += 1
                script = server.faults.get(name) or []
                action = script.pop(0) if script else None
                if action == "500":
                    return self._send(500, b"internal error")
                if action == "corrupt":
                    mid = len(data) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action in ("drop", "hang"):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if action == "hang":
                        server.release.wait(120)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ds"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def fineweb_files(n: int = 6) -> dict[str, bytes]:
    files = {shard_name(i): make_shard(i) for i in range(n)}
    files[shard_name(FINEWEB_VAL)] = make_shard(FINEWEB_VAL)
    return files


@pytest.fixture
def server():
    s = ShardServer(fineweb_files())
    yield s
    s.stop()


def fetch(store, server, n, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("log", lambda msg: None)
    return dataset.download(store, "fineweb-edu", n, base_url=server.url, **kw)


# ----------------------------------------------------------------------------- downloads


def test_download_parallel_index_and_resume(store_uri, server):
    store = open_store(store_uri)
    index = fetch(store, server, 3, workers=4)
    names = [shard_name(i) for i in range(3)] + [shard_name(FINEWEB_VAL)]
    assert [e["name"] for e in index["shards"]] == names
    assert [e["split"] for e in index["shards"]] == ["train"] * 3 + ["val"]
    assert store.get_json(INDEX_KEY) == index
    for e in index["shards"]:
        served = server.files[e["name"]]
        assert e["sha256"] == sha256_bytes(served) and e["size"] == len(served)
        assert store.get_bytes(shard_key(e["name"]), sha256=e["sha256"]) == served
        assert e["rows"] == 40 and e["row_groups"] == 5
        assert e["chars"] == sum(map(len, pq.read_table(io.BytesIO(served))["text"].to_pylist()))
    assert store.exists(f"{RECORDS_PREFIX}/{names[0]}.json")
    assert all(server.counts[n] == 1 for n in names)

    # resumable: nothing already recorded is fetched again; more shards extend the index
    fetch(store, server, 3)
    assert all(server.counts[n] == 1 for n in names)
    index = fetch(store, server, 5)
    assert index["num_train"] == 5 and index["num_val"] == 1
    assert server.counts[shard_name(3)] == server.counts[shard_name(4)] == 1
    assert all(server.counts[n] == 1 for n in names)


def test_download_retries_5xx_resets_and_timeouts(tmp_path, server):
    store = open_store(f"file://{tmp_path}/store")
    server.faults = {shard_name(0): ["hang"], shard_name(1): ["500", "500"], shard_name(2): ["drop"]}
    index = fetch(store, server, 3, timeout_s=1.0)
    assert server.counts[shard_name(0)] == 2  # timed out mid-body, retried
    assert server.counts[shard_name(1)] == 3  # two 500s, then success
    assert server.counts[shard_name(2)] == 2  # connection dropped mid-body, retried
    for e in index["shards"]:
        assert e["sha256"] == sha256_bytes(server.files[e["name"]])


def test_download_gives_up_after_retries(tmp_path, server):
    store = open_store(f"file://{tmp_path}/store")
    server.faults = {shard_name(0): ["500"] * 10}
    with pytest.raises(DownloadError, match="3 attempts.*HTTP 500"):
        fetch(store, server, 1, retries=2, workers=1)
    assert server.counts[shard_name(0)] == 3
    assert not store.exists(INDEX_KEY) and not store.exists(shard_key(shard_name(0)))


def test_download_404_names_the_url(tmp_path, server, capsys):
    store = open_store(f"file://{tmp_path}/store")
    del server.files[shard_name(2)]
    with pytest.raises(DownloadError) as err:
        fetch(store, server, 4, workers=1)
    assert "404" in str(err.value) and f"{server.url}/{shard_name(2)}" in str(err.value)
    assert not store.exists(INDEX_KEY)  # an incomplete download publishes no index
    code = dataset.cli(["download", "-n", "4", "--base-url", server.url, "--store", store.root, "--workers", "1"])
    assert code == 1
    assert f"not found (HTTP 404): {server.url}/{shard_name(2)}" in capsys.readouterr().err


def test_corrupted_download_detected_by_manifest_and_refetched(tmp_path, server):
    store = open_store(f"file://{tmp_path}/store")
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text("".join(f"{sha256_bytes(d)}  {n}\n" for n, d in server.files.items()))
    server.faults = {shard_name(1): ["corrupt"]}
    index = fetch(store, server, 2, manifest=dataset.read_manifest(str(manifest)))
    assert server.counts[shard_name(1)] == 2
    assert store.get_bytes(shard_key(shard_name(1))) == server.files[shard_name(1)]
    assert {e["name"]: e["sha256"] for e in index["shards"]}[shard_name(1)] == sha256_bytes(server.files[shard_name(1)])

    server.faults = {shard_name(3): ["corrupt"] * 10}
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch(store, server, 4, manifest=dataset.read_manifest(str(manifest)), retries=2)
    assert not store.exists(shard_key(shard_name(3)))


def test_a_manifest_refetches_recorded_shards_it_disagrees_with(tmp_path, server):
    """A shard recorded before upstream changed it is kept by a plain re-run, but not against a manifest of the new files."""
    store = open_store(f"file://{tmp_path}/store")
    fetch(store, server, 2)
    server.files[shard_name(1)] = make_shard(1, rows=41)
    manifest = {n: sha256_bytes(d) for n, d in server.files.items()}
    assert server.counts[shard_name(1)] == 1 and fetch(store, server, 2) and server.counts[shard_name(1)] == 1
    index = fetch(store, server, 2, manifest=manifest)
    assert server.counts[shard_name(1)] == 2 and server.counts[shard_name(0)] == 1
    assert {e["name"]: e["sha256"] for e in index["shards"]} == {n: manifest[n] for n in (shard_name(0), shard_name(1), shard_name(FINEWEB_VAL))}
    assert store.get_bytes(shard_key(shard_name(1))) == server.files[shard_name(1)]


def test_a_recorded_shard_changed_upstream_is_fetched_anew_unless_a_manifest_pins_it(tmp_path, server):
    """Its stored copy lost (or damaged, with --verify), a shard is fetched again against its recorded digest; when the
    mirror's file no longer matches it attempt after attempt, it changed upstream: the current file is taken, said so.
    A manifest's digest is a pin: there, a mismatch stays an error."""
    store, lines = open_store(f"file://{tmp_path}/store"), []
    fetch(store, server, 2)
    store.delete(shard_key(shard_name(1)))
    server.files[shard_name(1)] = make_shard(1, rows=41)
    index = fetch(store, server, 2, retries=1, log=lines.append)
    assert any("changed upstream; fetching the current one" in line for line in lines), lines
    assert store.get_bytes(shard_key(shard_name(1))) == server.files[shard_name(1)]
    assert {e["name"]: e["sha256"] for e in index["shards"]}[shard_name(1)] == sha256_bytes(server.files[shard_name(1)])
    store.delete(shard_key(shard_name(1)))
    with pytest.raises(DownloadError, match="sha256 mismatch"):  # pinned to the old file's digest
        fetch(store, server, 2, manifest={shard_name(1): sha256_bytes(make_shard(1))}, retries=1)


def test_corruption_detected_from_huggingface_linked_etag(tmp_path):
    server = ShardServer(fineweb_files(), redirect=True)
    try:
        store = open_store(f"file://{tmp_path}/store")
        server.faults = {shard_name(0): ["corrupt"]}
        fetch(store, server, 1)  # no manifest: the digest comes from the redirect's X-Linked-Etag
        assert server.counts[shard_name(0)] == 2
        assert store.get_bytes(shard_key(shard_name(0))) == server.files[shard_name(0)]
    finally:
        server.stop()


def test_verify_refetches_a_corrupted_stored_shard(tmp_path, server):
    store = open_store(f"file://{tmp_path}/store")
    fetch(store, server, 2)
    path = store.local_path(shard_key(shard_name(1)))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    fetch(store, server, 2)  # without --verify the record is trusted
    assert server.counts[shard_name(1)] == 1
    fetch(store, server, 2, verify=True)
    assert server.counts[shard_name(1)] == 2 and server.counts[shard_name(0)] == 1
    assert store.get_bytes(shard_key(shard_name(1))) == server.files[shard_name(1)]


def _wait(cond, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_shard_overwritten_by_another_datasets_cut_download_is_not_trusted(tmp_path, server, monkeypatch):
    """Records are named by shard, whatever the dataset: climbmix's shard_00000 lands over fineweb's, and the process
    dies before writing its record. fineweb's old record must not vouch for climbmix's bytes in fineweb's corpus."""
    store = open_store(f"file://{tmp_path}/store")
    server.faults = {shard_name(1): ["500"]}
    with pytest.raises(DownloadError):  # fineweb's first download stops at shard 1: shard 0 recorded, no index yet
        fetch(store, server, 2, workers=1, retries=0)
    assert store.exists(f"{RECORDS_PREFIX}/{shard_name(0)}.json") and not store.exists(INDEX_KEY)
    climb_val = dataset.DATASETS["climbmix"].val_index
    climb = ShardServer({shard_name(0): make_shard(100), shard_name(climb_val): make_shard(101)})
    put_json = store.put_json

    def killed_before_the_record(key, obj):
        if key == f"{RECORDS_PREFIX}/{shard_name(0)}.json" and obj["source"] == "climbmix":
            raise OSError("killed")
        return put_json(key, obj)
    monkeypatch.setattr(store, "put_json", killed_before_the_record)
    try:
        with pytest.raises(DownloadError, match="killed"):
            dataset.download(store, "climbmix", 1, base_url=climb.url, backoff_s=0.01, log=lambda m: None)
    finally:
        climb.stop()
        monkeypatch.setattr(store, "put_json", put_json)
    assert store.get_bytes(shard_key(shard_name(0))) == make_shard(100)  # climbmix's bytes, unrecorded
    index = fetch(store, server, 2)
    assert server.counts[shard_name(0)] == 2  # fetched again: no record vouches for what is stored
    for e in index["shards"]:
        assert store.get_bytes(shard_key(e["name"]), sha256=e["sha256"]) == server.files[e["name"]]


def test_a_cut_prepare_over_a_downloaded_corpus_leaves_no_record_vouching_for_its_shards(tmp_path, server, monkeypatch):
    """`data prepare` (or the embedded corpus) writes shard_00000... over a download, and is stopped after its first
    shard. The download's records must be gone by then: the next download would keep that shard as its own."""
    store = open_store(f"file://{tmp_path}/store")
    fetch(store, server, 2)
    src = tmp_path / "local.jsonl"
    src.write_text("".join(json.dumps({"text": f"local document {i} " + "words " * 20}) + "\n" for i in range(40)))
    put_file, calls = store.put_file, []

    def stopped_after_the_first_shard(key, path):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return put_file(key, path)
    monkeypatch.setattr(store, "put_file", stopped_after_the_first_shard)
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare([str(src)], store, shard_chars=400)
    monkeypatch.setattr(store, "put_file", put_file)
    assert not list((tmp_path / "tmp").glob("nanochat-shards-*"))  # nor a half-written shard in the temp folder
    assert store.get_bytes(shard_key(shard_name(0))) != server.files[shard_name(0)]  # the local corpus's first shard
    index = fetch(store, server, 2)
    assert server.counts[shard_name(0)] == 2
    for e in index["shards"]:
        assert store.get_bytes(shard_key(e["name"]), sha256=e["sha256"]) == server.files[e["name"]]


def test_killed_download_resumes_without_refetching(tmp_path, server):
    uri = f"file://{tmp_path}/store"
    store = open_store(uri)
    server.faults = {shard_name(2): ["hang"]}
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "download", "-n", "4", "--workers", "1", "--retries", "0",
                             "--base-url", server.url, "--store", uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: server.counts[shard_name(2)] == 1 and store.exists(f"{RECORDS_PREFIX}/{shard_name(1)}.json"),
              what="shards 0-1 downloaded and shard 2 in flight")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not store.exists(INDEX_KEY)
    assert not store.exists(shard_key(shard_name(2)))  # the half-downloaded shard never became visible
    server.release.set()
    index = fetch(store, server, 4)
    assert server.counts[shard_name(0)] == server.counts[shard_name(1)] == 1  # verified shards are not fetched again
    assert server.counts[shard_name(2)] == 2
    assert index["num_train"] == 4 and index["num_val"] == 1
    for e in index["shards"]:
        assert store.get_bytes(shard_key(e["name"]), sha256=e["sha256"]) == server.files[e["name"]]


@pytest.mark.parametrize("how", ["ctrl-c on nanochat data download", "sigterm on the data stage"])
def test_an_interrupted_download_stops_at_once_even_with_shards_stalled_mid_body(tmp_path, server, how):
    """Every shard in flight stalls half-way (a silent server, 60 s before a read times out): Ctrl-C, or the SIGTERM
    the runner or Kubernetes sends a stage, still ends the process at once, with one line and no index written;
    the next run fetches what is missing."""
    uri = f"file://{tmp_path}/store"
    server.faults = {shard_name(i): ["hang"] for i in (0, 1, 2, 3)}
    if how.startswith("ctrl-c"):
        argv = ["nanochat.dataset", "download", "-n", "4", "--store", uri, "--base-url", server.url]
        sig, code, line = signal.SIGINT, 130, "nanochat data download: interrupted; what is stored is kept"
    else:
        argv = ["nanochat.stages.data", "--store", uri, "--profile", "ci", "--dataset", "fineweb-edu", "--num-shards", "4",
                "--data-base-url", server.url]
        sig, code, line = signal.SIGTERM, 143, "received SIGTERM"
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--workers", "2", "--retries", "0"], stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: server.counts[shard_name(0)] + server.counts[shard_name(1)] == 2, what="two shards in flight")
        time.sleep(0.5)  # both bodies stalled half-way
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code and line in err and "Traceback" not in err, err
    assert not list((tmp_path / "tmp").iterdir())  # nor the stalled shards' partial files
    store = open_store(uri)
    assert not store.exists(INDEX_KEY) and not store.exists(shard_key(shard_name(0)))
    server.faults = {}
    assert fetch(store, server, 4)["num_train"] == 4


def test_background_download_returns_and_finishes(tmp_path, server, capsys):
    uri = f"file://{tmp_path}/store"
    log_file = tmp_path / "download.log"
    code = dataset.cli(["download", "-n", "2", "--base-url", server.url, "--store", uri, "--background", "--log-file", str(log_file)])
    assert code == 0
    assert "background" in capsys.readouterr().out
    store = open_store(uri)
    _wait(lambda: store.exists(INDEX_KEY), what="the background download's index.json")
    assert store.get_json(INDEX_KEY)["num_train"] == 2
    _wait(lambda: "2 train + 1 val" in log_file.read_text(), what="the log line")


def test_climbmix_notes_its_license_and_mirror_env(tmp_path, monkeypatch):
    val = dataset.DATASETS["climbmix"].val_index
    server = ShardServer({shard_name(0): make_shard(0), shard_name(val): make_shard(val)})
    try:
        monkeypatch.setenv("NANOCHAT_DATA_BASE_URL", server.url)
        lines = []
        index = dataset.download(open_store(f"file://{tmp_path}/s"), "climbmix", 1, log=lines.append)
        assert index["source"] == "climbmix" and [e["name"] for e in index["shards"]] == [shard_name(0), shard_name(val)]
        assert any("CC BY-NC 4.0" in line and "non-commercial" in line for line in lines)
    finally:
        server.stop()


def test_plan_rejects_too_many_shards():
    assert dataset.plan_shards("fineweb-edu", 2) == [0, 1, FINEWEB_VAL]
    assert dataset.plan_shards("fineweb-edu", 4, start=2, include_val=False) == [2, 3]
    with pytest.raises(DataError, match="1822 train shards"):
        dataset.plan_shards("fineweb-edu", 1823)


# ----------------------------------------------------------------------------- embedded corpus


def _shard_texts(store, index):
    out = []
    for e in index["shards"]:
        with store.open(e["key"]) as f:
            out.append(pq.read_table(f)["text"].to_pylist())
    return out


def test_embedded_corpus_is_deterministic(tmp_path):
    kw = dict(max_chars=120_000, shard_chars=40_000, row_group_rows=16)
    a = dataset.build_embedded(open_store(f"file://{tmp_path}/a"), **kw)
    b = dataset.build_embedded(open_store(f"file://{tmp_path}/b"), **kw)
    assert a == b  # same sha256 for every shard, same index
    assert (tmp_path / "a/data/shards/index.json").read_bytes() == (tmp_path / "b/data/shards/index.json").read_bytes()
    assert a["num_train"] >= 3 and a["num_val"] == 1 and a["shards"][-1]["split"] == "val"
    for e in a["shards"]:
        assert sha256_bytes((tmp_path / "a" / e["key"]).read_bytes()) == e["sha256"]
        md = pq.ParquetFile(tmp_path / "a" / e["key"]).metadata
        assert md.num_row_groups == e["row_groups"] == math.ceil(e["rows"] / 16)
        assert md.row_group(0).column(0).compression == "ZSTD"
    c = dataset.build_embedded(open_store(f"file://{tmp_path}/c"), **{**kw, "seed": 1})
    assert [e["sha256"] for e in c["shards"]] != [e["sha256"] for e in a["shards"]]


def test_embedded_corpus_mixes_prose_and_synthetic_and_round_trips(store_uri):
    store = open_store(store_uri)
    index = dataset.build_embedded(store, max_chars=60_000, synthetic_fraction=0.25, shard_chars=30_000, row_group_rows=8)
    docs, sources = dataset.embedded_documents(max_chars=60_000, synthetic_fraction=0.25)
    texts = _shard_texts(store, index)
    assert [t for shard in texts for t in shard] == docs  # every document, in order, through the store
    assert list(dataset.iter_documents(store, "train")) + list(dataset.iter_documents(store, "val")) == docs
    assert store.get_json(INDEX_KEY) == index
    for e in index["shards"]:
        assert sha256_bytes(store.get_bytes(e["key"])) == e["sha256"]
    assert sources["synthetic_chars"] / (sources["synthetic_chars"] + sources["prose_chars"]) == pytest.approx(0.25, abs=0.02)
    assert any("Assistant:" in d for d in docs)  # synthetic dialogues
    assert any(d.startswith("The ") or "Python" in d for d in docs)  # CPython's prose
    val_chars = index["shards"][-1]["chars"]
    assert 0 < val_chars < 0.2 * index["chars"]


def test_stdlib_docstrings_parse_without_imports():
    docs = []
    for d in dataset.stdlib_docstrings():
        docs.append(d)
        if len(docs) == 50:
            break
    assert len(docs) == 50 and all(len(d) > dataset.MIN_DOCSTRING_CHARS for d in docs)
    assert "test_" not in "".join(d.split("\n", 1)[0] for d in docs)


def test_rebuilding_a_smaller_corpus_removes_stale_shards(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    big = dataset.build_embedded(store, max_chars=150_000, shard_chars=20_000)
    small = dataset.build_embedded(store, max_chars=50_000, shard_chars=20_000)
    assert len(small["shards"]) < len(big["shards"])
    assert sorted(k for k in store.list("data/shards/") if k.endswith(".parquet")) == [e["key"] for e in small["shards"]]


# ----------------------------------------------------------------------------- prepare


def test_prepare_from_txt_jsonl_parquet(store_uri, tmp_path, capsys):
    src = tmp_path / "inputs"
    (src / "books").mkdir(parents=True)
    (src / "books" / "a.txt").write_text("First book.\n\nSecond paragraph.")
    (src / "books" / "b.txt").write_text("Another book.")
    with open(src / "web.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"web page {i} " + "words " * i, "url": f"u{i}"}) + "\n")
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(20)]}), src / "more.parquet")
    code = dataset.cli(["prepare", "--input", str(src / "books"), str(src / "web.jsonl"), str(src / "more.parquet"),
                        "--out-store", store_uri, "--shard-chars", "600", "--row-group-rows", "4"])
    assert code == 0, capsys.readouterr().err
    store = open_store(store_uri)
    index = store.get_json(INDEX_KEY)
    texts = [t for shard in _shard_texts(store, index) for t in shard]
    expected = (["First book.\n\nSecond paragraph.", "Another book."] + [f"web page {i} " + "words " * i for i in range(30)]
                + [f"parquet doc {i}" for i in range(20)])
    assert texts == expected
    assert index["source"] == "prepare" and index["num_val"] == 1 and index["num_train"] >= 2
    assert all(e["chars"] >= 600 for e in index["shards"][:-1])
    assert all(e["row_groups"] == math.ceil(e["rows"] / 4) for e in index["shards"])


def test_prepare_small_input_still_has_train_and_val(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n\nfour")
    store = open_store(f"file://{tmp_path}/s")
    index = dataset.prepare([str(tmp_path / "a.txt")], store, txt_split="paragraph", val_fraction=0.25)
    assert [e["rows"] for e in index["shards"]] == [3, 1] and index["shards"][1]["split"] == "val"


def test_prepare_reports_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no string field 'text'"):
        dataset.prepare([str(tmp_path / "bad.jsonl")], open_store(f"file://{tmp_path}/s"))
    with pytest.raises(DataError, match="no such file"):
        dataset.prepare([str(tmp_path / "missing")], open_store(f"file://{tmp_path}/s"))


# ----------------------------------------------------------------------------- recipe


def test_recipe_numbers_are_consistent(tmp_path):
    import torch
    from nanochat.gpt import GPT, GPTConfig
    r = dataset.recipe(12, ratio=10, vocab_size=32768, gpus=8, mfu=0.5, margin=0.0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(12, 32768, 2048))
    counts = model.num_scaling_params()
    assert r["params_scaling"] == counts["transformer_matrices"] + counts["lm_head"]
    assert r["flops_per_token"] == model.estimate_flops()
    assert r["tokens"] == int(10 * r["params_scaling"])
    assert r["chars_per_token"] == dataset.DEFAULT_CHARS_PER_TOKEN and r["chars_per_token_source"] == "default"
    assert r["chars"] == int(r["tokens"] * dataset.DEFAULT_CHARS_PER_TOKEN)
    assert r["shards"] == math.ceil(r["chars"] / dataset.CHARS_PER_SHARD)
    assert r["hours"] * 3600 == pytest.approx(r["flops_per_token"] * r["tokens"] / (8 * 989e12 * 0.5))
    assert dataset.recipe(12, ratio=20, margin=0.0)["tokens"] == pytest.approx(2 * r["tokens"], abs=1)
    assert dataset.recipe(12, ratio=10, gpus=16, mfu=0.5)["hours"] == pytest.approx(r["hours"] / 2)

    # the tokenizer's measured chars/token (tok_eval) drives chars and shards
    store = open_store(f"file://{tmp_path}/s")
    store.put_json("stages/tok_eval/done.json", {"metrics": {"chars_per_token": 3.0}})
    m = dataset.recipe(12, ratio=10, store=store, margin=0.0)
    assert m["chars_per_token_source"] == "tok_eval" and m["chars"] == int(r["tokens"] * 3.0)
    assert dataset.shards_needed(12, 10, store=store, margin=0.0) == math.ceil(r["tokens"] * 3.0 / dataset.CHARS_PER_SHARD)
    assert dataset.shards_needed(20) > dataset.shards_needed(12) > 0
    store.put_json("stages/tok_eval/done.json", {"metrics": {"bytes_per_token_train_shard": 4.0}})  # what tok_eval reports today
    assert dataset.recipe(12, ratio=10, store=store)["chars_per_token"] == 4.0


def test_recipe_cli_prints_the_table(capsys):
    assert dataset.cli(["recipe", "--depth", "20,26", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    header, d20, d26 = out.splitlines()[:3]
    assert "params" in header and "shards" in header and "hours" in header
    r = dataset.recipe(20)
    assert d20.split()[0] == "20" and str(r["shards"]) in d20.split()
    assert d26.split()[0] == "26"


# ----------------------------------------------------------------------------- the data stage


def test_data_stage_embedded(tmp_path):
    from nanochat.stages import data
    uri = f"file://{tmp_path}/store"
    args = ["--store", uri, "--profile", "ci", "--embedded-chars", "50000", "--shard-chars", "20000"]
    assert data.main(args) == 0
    store = open_store(uri)
    done = store.get_json("stages/data/done.json")
    index = store.get_json(INDEX_KEY)
    assert done["config"]["dataset"] == "embedded"
    assert done["metrics"]["num_shards"] == len(index["shards"]) >= 3
    assert done["metrics"]["chars"] == index["chars"] and done["metrics"]["rows"] == index["rows"]
    report = store.get_bytes("report/data.md").decode()
    assert "embedded" in report and "synthetic_chars" in report
    assert data.main(args) == 0  # idempotent: skipped
    assert store.get_json("stages/data/done.json")["ended"] == done["ended"]


def test_data_stage_two_part_download(tmp_path, server):
    from nanochat.stages import data
    uri = f"file://{tmp_path}/store"
    common = ["--store", uri, "--profile", "ci", "--dataset", "fineweb-edu", "--data-base-url", server.url, "--num-shards", "4",
              "--first-shards", "2"]
    assert data.main([*common, "--part", "first"]) == 0
    store = open_store(uri)
    index = store.get_json(INDEX_KEY)
    assert [e["name"] for e in index["shards"]] == [shard_name(0), shard_name(1), shard_name(FINEWEB_VAL)]
    assert data.main([*common, "--part", "rest"]) == 0
    assert store.exists("stages/data_rest/done.json")
    index = store.get_json(INDEX_KEY)
    assert index["num_train"] == 4 and index["num_val"] == 1
    assert all(c == 1 for c in server.counts.values())
    assert store.get_json("stages/data_rest/done.json")["metrics"]["num_shards"] == 5


def test_a_dead_mirror_fails_the_data_stage_in_one_line(tmp_path, capsys):
    """A download that fails for good is an expected failure: one line naming the URL, no traceback."""
    from nanochat.stages import data
    uri = f"file://{tmp_path}/store"
    code = data.main(["--store", uri, "--profile", "ci", "--dataset", "fineweb-edu", "--num-shards", "1", "--retries", "0",
                      "--data-base-url", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "nanochat stage data: error: download failed after 1 attempts: http://127.0.0.1:" in err and "refused" in err


def test_data_stage_rejects_bad_flags(tmp_path, capsys):
    from nanochat.stages import data
    assert data.main(["--store", f"file://{tmp_path}/s", "--dataset", "fineweb-edu", "--num-shards", "5000"]) == 2
    assert "--num-shards" in capsys.readouterr().err


def test_data_stage_dataset_follows_the_profile():
    from nanochat.config import parse_config
    from nanochat.stages import data
    assert parse_config(data.Config, ["--profile", "tiny"], "data", env={}).dataset == "embedded"
    assert parse_config(data.Config, ["--profile", "d20"], "data", env={}).dataset == "fineweb-edu"
    cfg = parse_config(data.Config, ["--profile", "d24", "--dataset", "climbmix", "--part", "rest"], "data", env={})
    assert cfg.dataset == "climbmix" and cfg.instance_name("data") == "data_rest"
    cfg = parse_config(data.Config, ["--profile", "d20", "--num-shards", "0", "--depth", "12", "--first-shards", "3"], "data", env={})
    total = dataset.shards_needed(12, margin=cfg.shard_margin)
    assert data.shard_range(cfg, None) == (0, total, total)
    cfg.part = "first"
    assert data.shard_range(cfg, None) == (0, 3, total)
    cfg.part = "rest"
    assert data.shard_range(cfg, None) == (3, total, total)
