"""The data stage's corpus in the store against random histories: downloads of two datasets (any shard range, with
or without the val shard, --verify, a manifest, failing or corrupting mirrors, a process killed between a shard and
its record or before the index), `data prepare` over them (completed or stopped after its first shard), shards
damaged or deleted in the store by hand, index.json deleted, and files changing upstream. After every step a record
vouches only for the bytes it describes; a download without faults succeeds (whatever changed upstream or in the
store), leaving an index of that dataset alone, holding every shard asked for, each one a version the mirror served
(the manifest's, when given; re-hashed with --verify); a download that fails leaves the previous index as it was. At
the end, a clean download brings every shard up to date."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, note, strategies as st

from nanochat import dataset
from nanochat.dataset import DataError, INDEX_KEY, RECORDS_PREFIX, shard_key, shard_name
from nanochat.store import open_store, sha256_bytes
from tests.fixtures import fuzz
from tests.test_dataset import ShardServer

DATASETS = ("fineweb-edu", "climbmix")
TRAIN = 3  # train shards each mirror serves


def names(ds: str) -> list[str]:
    return [shard_name(i) for i in range(TRAIN)] + [shard_name(dataset.DATASETS[ds].val_index)]


def shard_bytes(ds: str, name: str, version: int) -> bytes:
    """A small shard whose rows say which dataset, shard and version they are."""
    import io

    import pyarrow as pa
    seed = DATASETS.index(ds) * 1000 + int(name[6:11]) % 997 + 17 * version
    texts = [f"{ds} {name} v{version} document {j} " + "words " * (1 + (seed + j) % 5) for j in range(6)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=2)
    return buf.getvalue()


class Killed(OSError):
    """The process dies here: nothing after this call runs."""


@pytest.fixture(scope="module")
def mirrors():
    # fineweb behaves like Hugging Face (a digest in X-Linked-Etag); climbmix like a plain mirror (no digest)
    servers = {"fineweb-edu": ShardServer({}, redirect=True), "climbmix": ShardServer({})}
    yield servers
    for s in servers.values():
        s.stop()


NAME = st.integers(0, TRAIN)  # an index into names(ds): TRAIN is the val shard
FAULTS = st.lists(st.tuples(NAME, st.lists(st.sampled_from(["500", "drop", "corrupt"]), max_size=2)), max_size=2)
DOWNLOAD = st.builds(lambda ds, n, start, val, verify, manifest, faults, crash: ("download", ds, n, min(start, n), val,
                                                                                  verify, manifest, faults, crash),
                     st.sampled_from(DATASETS), st.integers(0, TRAIN), st.integers(0, TRAIN), st.booleans(),
                     st.booleans(), st.booleans(), FAULTS,
                     st.one_of(st.none(), st.tuples(st.just("record"), st.integers(1, 3)), st.just(("index",))))
OPERATIONS = st.lists(st.one_of(
    DOWNLOAD, DOWNLOAD,
    st.tuples(st.just("prepare"), st.integers(2, 30), st.booleans()),  # documents; stopped after its first shard
    st.tuples(st.sampled_from(["damage", "remove"]), st.sampled_from(DATASETS), NAME),
    st.tuples(st.just("upstream"), st.sampled_from(DATASETS), NAME),
    st.tuples(st.just("drop_index"))), min_size=1, max_size=7)


class Corpus:
    """One history: the store, the mirrors' files, and every version each mirror ever served."""

    def __init__(self, root: Path, mirrors: dict):
        self.root, self.mirrors = root, mirrors
        self.store = open_store(f"file://{root / 'store'}")
        self.versions = {(ds, n): 0 for ds in DATASETS for n in names(ds)}
        self.served: dict[tuple[str, str], set[str]] = {k: set() for k in self.versions}
        self.damaged: set[str] = set()  # digests of bytes this history damaged in the store
        self.log: list[str] = []  # the download's lines (its workers' threads cannot note())
        for ds, server in mirrors.items():
            server.files = {n: shard_bytes(ds, n, 0) for n in names(ds)}
            server.faults, server.redirect = {}, ds == "fineweb-edu"
            server.counts.clear()
        self.remember()

    def remember(self):
        for ds, server in self.mirrors.items():
            for n, data in server.files.items():
                self.served[(ds, n)].add(sha256_bytes(data))

    def stored(self, name: str) -> bytes | None:
        key = shard_key(name)
        return self.store.get_bytes(key) if self.store.exists(key) else None

    # --- steps
    def download(self, ds, n, start, include_val, verify, use_manifest, faults, crash, workers=1):
        server = self.mirrors[ds]
        digest_known = ds == "fineweb-edu" or use_manifest  # a corrupt body is caught only against a digest
        server.faults = {names(ds)[i]: [f for f in script if f != "corrupt" or digest_known] for i, script in faults}
        manifest = {name: sha256_bytes(data) for name, data in server.files.items()} if use_manifest else None
        put_json, records_written = self.store.put_json, []

        def dying_put_json(key, obj):
            if crash and key.startswith(RECORDS_PREFIX):
                records_written.append(key)
                if crash == ("record", len(records_written)):  # after its shard was published
                    raise Killed(f"killed before writing {key}")
            if crash == ("index",) and key == INDEX_KEY:
                raise Killed("killed before writing the index")
            return put_json(key, obj)
        self.store.put_json = dying_put_json
        try:
            return dataset.download(self.store, ds, n, start, include_val, workers=workers, base_url=server.url,
                                    retries=1, backoff_s=0.0, manifest=manifest, verify=verify, log=self.log.append), manifest
        finally:
            self.store.put_json = put_json
            server.faults = {}

    def prepare(self, docs: int, stop_after_first: bool):
        src = self.root / "local.jsonl"
        src.write_text("".join(json.dumps({"text": f"local document {i} " + "words " * 9}) + "\n" for i in range(docs)))
        put_file, published = self.store.put_file, []

        def stopped(key, path):
            published.append(key)
            if stop_after_first and len(published) == 2:
                raise KeyboardInterrupt
            return put_file(key, path)
        self.store.put_file = stopped
        try:
            return dataset.prepare([str(src)], self.store, shard_chars=200, row_group_rows=2)
        finally:
            self.store.put_file = put_file

    def damage(self, name: str):
        if (data := self.stored(name)) is not None:
            at = len(data) // 2 + len(self.damaged)  # not the byte an earlier damage flipped: that would mend it
            bad = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
            self.store.local_path(shard_key(name)).write_bytes(bad)
            self.damaged.add(sha256_bytes(bad))

    def upstream(self, ds: str, name: str):
        self.versions[(ds, name)] += 1
        self.mirrors[ds].files[name] = shard_bytes(ds, name, self.versions[(ds, name)])
        self.remember()

    # --- what must hold
    def check_records(self):
        """A record vouches only for the bytes it describes: a version its dataset's mirror served."""
        for key in self.store.list(f"{RECORDS_PREFIX}/"):
            rec = self.store.get_json(key)
            assert rec["sha256"] in self.served[(rec["source"], rec["name"])], f"{key} describes bytes never served"
            data = self.stored(rec["name"])
            if data is not None and sha256_bytes(data) not in self.damaged:
                assert sha256_bytes(data) == rec["sha256"], f"{key} ({rec['source']}) vouches for other bytes"

    def check_index(self, index: dict, ds: str, planned: list[str], verify: bool, manifest: dict | None):
        assert self.store.get_json(INDEX_KEY) == index and index["source"] == ds
        entries = {e["name"]: e for e in index["shards"]}
        recorded = {r["name"] for r in map(self.store.get_json, self.store.list(f"{RECORDS_PREFIX}/"))
                    if r["source"] == ds and self.store.exists(r["key"])}
        assert set(entries) == recorded and set(planned) <= set(entries)
        val = shard_name(dataset.DATASETS[ds].val_index)
        assert all((e["split"] == "val") == (name == val) for name, e in entries.items())
        assert (index["num_train"], index["num_val"]) == (sum(n != val for n in entries), int(val in entries))
        for key in ("rows", "chars", "size"):
            assert index["bytes" if key == "size" else key] == sum(e[key] for e in entries.values())
        for name, e in entries.items():
            assert e["sha256"] in self.served[(ds, name)], f"{name}: not a version {ds} served"
            data = self.stored(name)
            if sha256_bytes(data) in self.damaged:
                assert not (verify and name in planned), f"{name}: --verify kept a damaged shard"
                continue
            assert sha256_bytes(data) == e["sha256"] and len(data) == e["size"]
            table = pq.read_table(self.store.local_path(e["key"]))
            assert (table.num_rows, sum(map(len, table["text"].to_pylist()))) == (e["rows"], e["chars"])
            assert all(t.startswith(f"{ds} {name} v") for t in table["text"].to_pylist())
            if manifest and name in planned:
                assert e["sha256"] == manifest[name], f"{name}: not the manifest's version"


def run_history(corpus: Corpus, operations: list):
    for op in operations:
        note(f"step: {op}")
        corpus.log.clear()
        before = corpus.store.get_json_or(INDEX_KEY)
        kind = op[0]
        if kind == "download":
            _, ds, n, start, include_val, verify, use_manifest, faults, crash = op
            planned = [shard_name(i) for i in dataset.plan_shards(ds, n, start, include_val)]
            try:
                index, manifest = corpus.download(ds, n, start, include_val, verify, use_manifest, faults, crash)
            except (DataError, Killed) as e:
                note("\n".join(["  " + line for line in corpus.log] + [f"  failed: {e}"]))
                assert isinstance(e, DataError) or crash is not None
                assert crash or any(script for _, script in faults), "a download without faults failed"
                after = corpus.store.get_json_or(INDEX_KEY)
                assert after == (before if before and before["source"] == ds else None), "a failed download changed the index"
            else:
                corpus.check_index(index, ds, planned, verify, manifest)
        elif kind == "prepare":
            try:
                index = corpus.prepare(op[1], op[2])
            except KeyboardInterrupt:
                assert op[2]
            else:
                assert corpus.store.get_json(INDEX_KEY) == index and index["source"] == "prepare"
                assert not corpus.store.list(f"{RECORDS_PREFIX}/")
                for e in index["shards"]:
                    assert sha256_bytes(corpus.stored(e["name"])) == e["sha256"]
        elif kind in ("damage", "remove"):
            name = names(op[1])[op[2]]
            corpus.damage(name) if kind == "damage" else corpus.store.delete(shard_key(name))
        elif kind == "upstream":
            corpus.upstream(op[1], names(op[1])[op[2]])
        else:
            corpus.store.delete(INDEX_KEY)
        corpus.check_records()


@fuzz(60)
@given(operations=OPERATIONS, final=st.sampled_from(DATASETS))
# a recorded shard lost from the store and changed upstream: fetched anew, not refused for its old digest
@example(operations=[("download", "climbmix", 1, 0, False, False, False, [], None), ("remove", "climbmix", 0),
                     ("upstream", "climbmix", 0), ("download", "climbmix", 1, 0, False, False, False, [], None)],
         final="climbmix")
# a cut `prepare` over a download leaves no record vouching for the shard it overwrote
@example(operations=[("download", "fineweb-edu", 1, 0, False, False, False, [], None), ("prepare", 2, True)],
         final="fineweb-edu")
def test_any_history_of_downloads_and_prepares_keeps_records_and_index_true(mirrors, operations, final):
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Corpus(Path(tmp), mirrors)
        run_history(corpus, operations)
        # a clean download against the mirror's current manifest, re-hashing: every shard current, whatever came before
        index, manifest = corpus.download(final, TRAIN, 0, True, True, True, [], None, workers=3)
        corpus.check_index(index, final, names(final), True, manifest)
        assert {e["name"]: e["sha256"] for e in index["shards"]} == manifest
        corpus.check_records()
