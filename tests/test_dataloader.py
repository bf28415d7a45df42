"""nanochat.dataloader: BOS-aligned best-fit packing, rank striping, exact resume, file:// vs S3, torchrun epoch."""
from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from nanochat import dataset
from nanochat.dataloader import DataLoader, val_batches
from nanochat.dataset import ShardWriter
from nanochat.store import ObjectNotFound, open_store
from tests.dist_loader_check import BOS, DOC_ID_BASE, IntTokenizer, write_int_corpus
from tests.fixtures import fuzz

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bpe():
    """A real tokenizer (rustbpe-trained, tiktoken-run) on CPython's doc topics."""
    from pydoc_data.topics import topics
    from nanochat.tokenizer import train_tokenizer
    return train_tokenizer(iter([topics[k] for k in sorted(topics)]), 512)


def batches(loader, n):
    return [tuple(t.clone() for t in b) for b in loader.take(n)]


def full_rows(batch_list) -> list[list[int]]:
    """(x, y) batches → the packed rows of T+1 tokens; -1 marks padding."""
    rows = []
    for x, y in batch_list:
        full = torch.cat([x, y[:, -1:]], dim=1)
        full[:, 1:][y < 0] = -1
        full[y[:, 0] < 0, 0] = -1  # an all-padding row
        rows += full.tolist()
    return rows


def account(rows, docs: dict[int, list[int]], capacity: int) -> tuple[Counter, int]:
    """Check every packed row against the corpus; returns (documents seen, lone-<|bos|> crops).

    A row is BOS-aligned, then documents back to back: each segment is a whole document, or a
    prefix of one cropped to fill the row exactly (only the last segment of a full row)."""
    seen, lone = Counter(), 0
    for row in rows:
        n = row.index(-1) if -1 in row else len(row)
        assert all(t == -1 for t in row[n:]), "padding only at the end of the stream"
        row = row[:n]
        if not row:
            continue
        assert row[0] == BOS, "every row starts with <|bos|>"
        starts = [i for i, t in enumerate(row) if t == BOS]
        for k, s in enumerate(starts):
            seg = row[s:starts[k + 1] if k + 1 < len(starts) else n]
            last = k == len(starts) - 1
            if len(seg) == 1:  # a document cropped to its <|bos|> alone
                assert last and n == capacity
                lone += 1
                continue
            doc = docs[seg[1]]
            assert seg == doc[:len(seg)]
            if len(seg) < len(doc):
                assert last and n == capacity, "a document is cropped only to fill the end of a row"
            seen[seg[1]] += 1
    return seen, lone


def int_docs(texts) -> dict[int, list[int]]:
    return {ids[1]: ids for ids in IntTokenizer().encode(texts, prepend=BOS)}


# ----------------------------------------------------------------------------- packing


def test_rows_start_with_bos_and_targets_shift(tmp_path, bpe):
    store = open_store(f"file://{tmp_path}/s")
    dataset.build_embedded(store, max_chars=80_000, shard_chars=20_000, row_group_rows=8)
    loader = DataLoader(store, bpe, "train", 4, 64, tokenizer_threads=2)
    bos = bpe.get_bos_token_id()
    got = batches(loader, 40)
    for x, y in got:
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
        assert (x[:, 0] == bos).all()
        assert (x[:, 1:] == y[:, :-1]).all()
        assert (y >= 0).all()  # training mode never pads
    # decoded, the first document of the first row is the start of a real corpus document
    first = got[0][0][0].tolist()
    end = first.index(bos, 1) if bos in first[1:] else len(first)
    text = bpe.decode(first[1:end])
    docs, _ = dataset.embedded_documents(max_chars=80_000)
    assert any(d.startswith(text) for d in docs)


def write_lengths(store, lengths, row_group_rows=2):
    """Documents of exact token lengths (incl. <|bos|>): '<id> 1 1 ...'."""
    writer = ShardWriter(store, "test", shard_chars=10**9, row_group_rows=row_group_rows)
    for i, n in enumerate(lengths):
        writer.add(" ".join([str(DOC_ID_BASE + i)] + ["1"] * (n - 2)))
    writer.cut()
    writer.add(f"{DOC_ID_BASE + 999} 1")  # val shard
    writer.finish()


def segments_of(rows):
    out = []
    for row in rows:
        segs, cur = [], None
        for t in row:
            if t == BOS:
                cur = [t]
                segs.append(cur)
            elif t != -1:
                cur.append(t)
        out.append([(s[1] - DOC_ID_BASE if len(s) > 1 else None, len(s)) for s in segs])
    return out


def test_best_fit_takes_the_largest_document_that_fits(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    write_lengths(store, [5, 3, 8, 2])
    loader = DataLoader(store, IntTokenizer(), "train", 1, 9, buffer_docs=4, epochs=1)  # rows of 10 tokens
    assert segments_of(full_rows(batches(loader, 10))) == [[(2, 8), (3, 2)], [(0, 5), (1, 3)]]


def test_crops_only_when_nothing_fits(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    write_lengths(store, [12, 6, 6])
    loader = DataLoader(store, IntTokenizer(), "train", 1, 9, buffer_docs=3, epochs=1)
    # row 1: the oldest 6 fits, then nothing fits the last 4: the shortest (the other 6) is cropped to 4;
    # row 2: the 12 can never fit whole: cropped to the 10 tokens of the row
    assert segments_of(full_rows(batches(loader, 10))) == [[(1, 6), (2, 4)], [(0, 10)]]


def test_one_epoch_accounts_for_every_document(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    texts = write_int_corpus(store, 400, max_len=45, docs_per_shard=100, row_group_rows=16)
    val_text = texts[300:]
    loader = DataLoader(store, IntTokenizer(), "train", 4, 32, buffer_docs=32, epochs=1)
    got = batches(loader, 10_000)
    assert loader.finished and loader.exhausted and len(got) == loader.batches
    seen, lone = account(full_rows(got), int_docs(texts[:300]), 33)
    assert max(seen.values()) == 1, "no document twice"
    assert len(seen) + lone == 300, "every train document placed (whole or cropped)"
    assert not set(seen) & set(int_docs(val_text))
    pads = [(y < 0).sum().item() for _, y in got]
    assert all(p == 0 for p in pads[:-1]), "only the last batch of the epoch is padded"


def test_two_ranks_one_epoch_under_torchrun(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    texts = write_int_corpus(store, 500, max_len=40, docs_per_shard=120, row_group_rows=10)
    n_train = 480  # shards of 120, 120, 120, 120 | val: the last 20
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "tests/dist_loader_check.py"),
           "--store", store.root, "--out", str(out), "--B", "4", "--T", "32", "--buffer-docs", "16"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["batches"] == r1["batches"] > 0, "every rank yields the same number of batches"
    g0, g1 = ({tuple(g) for g in r["row_groups"]} for r in (r0, r1))
    assert not g0 & g1 and len(g0 | g1) == n_train // 10, "row groups striped across ranks"
    docs = int_docs(texts[:n_train])
    s0, lone0 = account(r0["rows"], docs, 33)
    s1, lone1 = account(r1["rows"], docs, 33)
    assert not set(s0) & set(s1), "no document on both ranks"
    assert max((s0 + s1).values()) == 1
    assert len(s0) + len(s1) + lone0 + lone1 == n_train, "no document lost"


# ----------------------------------------------------------------------------- ranks, splits, state


def test_ranks_read_disjoint_row_groups(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    write_int_corpus(store, 300, max_len=20, docs_per_shard=70, row_group_rows=10)
    loaders = [DataLoader(store, IntTokenizer(), "train", 2, 16, rank=r, world_size=3) for r in range(3)]
    groups = [set(l.assignments) for l in loaders]
    all_groups = [(s, rg) for s, e in enumerate(loaders[0].shards) for rg in range(e["row_groups"])]
    assert set().union(*groups) == set(all_groups) and sum(map(len, groups)) == len(all_groups)
    assert loaders[1].assignments == all_groups[1::3]
    ids = [{t for x, _ in batches(l, 5) for t in x.flatten().tolist() if t >= DOC_ID_BASE} for l in loaders]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]


def test_val_split_is_the_last_shard_and_val_batches_repeat(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    texts = write_int_corpus(store, 200, max_len=30, docs_per_shard=50, row_group_rows=5)
    val_ids = set(int_docs(texts[150:]))
    a = list(val_batches(store, IntTokenizer(), 2, 16, 6))
    b = list(val_batches(store, IntTokenizer(), 2, 16, 6))
    assert len(a) == 6 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert {t for x, _ in a for t in x.flatten().tolist() if t >= DOC_ID_BASE} <= val_ids
    train = batches(DataLoader(store, IntTokenizer(), "train", 2, 16), 30)
    assert not {t for x, _ in train for t in x.flatten().tolist() if t >= DOC_ID_BASE} & val_ids


@pytest.mark.parametrize("k", [0, 1, 9, 31])
def test_resume_equals_uninterrupted(tmp_path, k):
    store = open_store(f"file://{tmp_path}/s")
    write_int_corpus(store, 150, max_len=50, docs_per_shard=40, row_group_rows=7)
    make = lambda state=None: DataLoader(store, IntTokenizer(), "train", 3, 24, buffer_docs=20, prefetch=3, state=state)  # noqa: E731
    reference = batches(make(), 45)  # several epochs of this small corpus
    first = make()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(first, k), reference[:k]))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # as in a checkpoint
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    first.close()
    resumed = batches(make(state), 45 - k)
    for (x, y), (rx, ry) in zip(resumed, reference[k:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert make(state).epoch == state["epoch"]


@fuzz(30)
@given(n_docs=st.integers(12, 90), max_len=st.integers(1, 50), shards=st.integers(2, 5), row_group_rows=st.integers(1, 9),
       B=st.integers(1, 4), T=st.integers(1, 40), buffer_docs=st.integers(1, 40), prefetch=st.integers(1, 4),
       world=st.integers(1, 3), data=st.data(), epochs=st.sampled_from([None, 1, 2]),
       cuts=st.lists(st.integers(0, 15), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_any_chain_of_resumes_equals_uninterrupted(n_docs, max_len, shards, row_group_rows, B, T, buffer_docs, prefetch, world,
                                                   data, epochs, cuts, seed):
    """Stop after any number of batches, save the state as a checkpoint does, resume, stop again...: the batches are
    exactly those of one uninterrupted loader, for any corpus shape, batch shape, buffer, rank and epoch count."""
    rank = data.draw(st.integers(0, world - 1))
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"file://{tmp}/s")
        write_int_corpus(store, n_docs, max_len=max_len, docs_per_shard=-(-n_docs // shards), row_group_rows=row_group_rows,
                         seed=seed)

        def make(state=None):
            return DataLoader(store, IntTokenizer(), "train", B, T, rank=rank, world_size=world, buffer_docs=buffer_docs,
                              prefetch=prefetch, epochs=epochs, state=state)
        total = sum(cuts) + 10
        reference = make()
        expected = batches(reference, total)
        reference.close()
        got, state = [], None
        for n in cuts + [total - sum(cuts)]:
            loader = make(state)
            got += batches(loader, n)
            buf = io.BytesIO()
            torch.save(loader.state_dict(), buf)  # as in a checkpoint
            state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            loader.close()
        assert len(got) == len(expected)
        for i, ((x, y), (rx, ry)) in enumerate(zip(got, expected)):
            assert torch.equal(x, rx) and torch.equal(y, ry), f"batch {i} differs (resumed after {cuts})"


def test_resume_with_the_real_tokenizer_and_a_finished_epoch(tmp_path, bpe):
    store = open_store(f"file://{tmp_path}/s")
    dataset.build_embedded(store, max_chars=40_000, shard_chars=10_000, row_group_rows=8)
    ref = batches(DataLoader(store, bpe, "train", 2, 48, epochs=1), 10_000)
    loader = DataLoader(store, bpe, "train", 2, 48, epochs=1)
    half = len(ref) // 2
    batches(loader, half)
    rest = batches(DataLoader(store, bpe, "train", 2, 48, epochs=1, state=loader.state_dict()), 10_000)
    assert len(rest) == len(ref) - half
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, ref[half:]))
    done = DataLoader(store, bpe, "train", 2, 48, epochs=1)
    batches(done, 10_000)
    assert batches(DataLoader(store, bpe, "train", 2, 48, epochs=1, state=done.state_dict()), 5) == []


def test_state_from_another_layout_is_refused(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    write_int_corpus(store, 100, max_len=20, docs_per_shard=30, row_group_rows=5)
    loader = DataLoader(store, IntTokenizer(), "train", 2, 16, rank=0, world_size=2)
    batches(loader, 2)
    with pytest.raises(ValueError, match="same world size"):
        DataLoader(store, IntTokenizer(), "train", 2, 16, rank=1, world_size=2, state=loader.state_dict())


def test_file_and_s3_stores_yield_identical_batches(tmp_path, s3_uri, bpe):
    kw = dict(max_chars=60_000, shard_chars=15_000, row_group_rows=8)
    local, s3 = open_store(f"file://{tmp_path}/s"), open_store(s3_uri)
    assert dataset.build_embedded(local, **kw) == dataset.build_embedded(s3, **kw)
    for rank in (0, 1):
        a = batches(DataLoader(local, bpe, "train", 3, 40, rank=rank, world_size=2), 25)
        b = batches(DataLoader(s3, bpe, "train", 3, 40, rank=rank, world_size=2), 25)
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    va = list(val_batches(local, bpe, 3, 40, 3))
    vb = list(val_batches(s3, bpe, 3, 40, 3))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(va, vb))


def test_missing_corpus_names_the_data_stage(tmp_path):
    with pytest.raises(ObjectNotFound, match="run the data stage"):
        DataLoader(open_store(f"file://{tmp_path}/empty"), IntTokenizer(), "train", 2, 8)


def test_dropped_loader_stops_its_reader_thread(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    write_int_corpus(store, 200, max_len=20, docs_per_shard=50, row_group_rows=5)
    loader = DataLoader(store, IntTokenizer(), "train", 2, 16, prefetch=1)
    next(loader)
    alive = lambda: [t for t in threading.enumerate() if t.name.startswith("dataloader-")]  # noqa: E731
    assert alive()
    del loader
    gc.collect()
    for _ in range(100):
        if not alive():
            break
        threading.Event().wait(0.05)
    assert not alive()


EXIT_CHECK = """
import atexit, sys, threading
import pyarrow.fs  # registers pyarrow's S3 finalizer first: atexit hooks run last-registered first
atexit.register(lambda: print("readers at S3 finalize:", [t.name for t in threading.enumerate() if t.name.startswith("dataloader-")]))
from nanochat.dataloader import DataLoader
from nanochat.store import open_store
from tests.dist_loader_check import IntTokenizer
LOADER = DataLoader(open_store(sys.argv[1]), IntTokenizer(), "train", 2, 16, prefetch=1)  # a global: alive until exit
next(LOADER)
"""


def test_reader_threads_stop_before_pyarrow_finalizes_s3_at_exit(tmp_path):
    """A reader thread still in pyarrow's S3 client when the AWS SDK shuts down aborts the process at exit (SIGABRT
    after a stage's clean error line): loaders still alive at exit are stopped before pyarrow's finalizer runs."""
    store = open_store(f"file://{tmp_path}/s")
    write_int_corpus(store, 200, max_len=20, docs_per_shard=50, row_group_rows=5)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", EXIT_CHECK, store.root], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "readers at S3 finalize: []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
