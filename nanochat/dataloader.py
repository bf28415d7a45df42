"""Distributed tokenizing dataloader: store shards → BOS-aligned best-fit packed (B, T) batches.

    loader = DataLoader(store, tokenizer, "train", B, T, rank=rank, world_size=world_size, device=device)
    x, y = next(loader)                 # LongTensors (B, T); y is x shifted left by one
    state = loader.state_dict()         # in the checkpoint (torch.save: it holds tensors)
    loader = DataLoader(..., state=state)   # yields exactly the batches the uninterrupted run would have

- Row groups of the split (train: every shard but the last, val: the last) are striped across ranks:
  rank r reads row groups r, r+W, r+2W, ... of the concatenated shard list.
- A background thread reads the next row groups (local file or S3, through pyarrow's filesystem) and
  tokenizes them with the tokenizer's parallel batch encode, each document prefixed with <|bos|>.
  Parquet page checksums are verified: a damaged shard is a CorruptObject naming it and the row group.
- Packing (nanochat's "BOS-aligned best fit"): every row starts at a document start; each row is
  filled with the largest buffered document that fits whole; only when none fits is the shortest
  one cropped to fill the row exactly. No padding, every token trained on.
- State = stream cursor (epoch, shard, row group, row) + the packing buffer (its documents' tokens,
  capped at T+1 since no row uses more), so resume is exact and independent of read-ahead.
"""
from __future__ import annotations

import atexit
import bisect
import logging
import math
import queue
import threading
import time
import weakref

import numpy as np
import pyarrow.fs  # noqa: F401 - imported before our atexit hook so that pyarrow's S3 finalizer runs after it
import torch

from nanochat.dataset import INDEX_KEY, shard_entries
from nanochat.store import ObjectNotFound
from nanochat.text_shards import open_parquet, read_texts

log = logging.getLogger("nanochat.dataloader")

BUFFER_DOCS = 1000      # documents the best-fit packer chooses from (nanochat's default)
PREFETCH_ROW_GROUPS = 2  # tokenized row groups the reader thread keeps ready
STATE_VERSION = 1
_END = object()


class DataLoader:
    def __init__(self, store, tokenizer, split: str, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu",
                 tokenizer_threads: int = 4, buffer_docs: int = BUFFER_DOCS, state: dict | None = None,
                 epochs: int | None = None, prefetch: int = PREFETCH_ROW_GROUPS, sync_end: bool = True):
        """epochs=None streams forever (training); epochs=k stops after k passes, draining the buffer and
        padding the last batch (inputs <|bos|>, targets -1); under torch.distributed every rank then
        yields the same number of batches (sync_end)."""
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be >= 1, got B={B} T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.store, self.tokenizer, self.split, self.B, self.T = store, tokenizer, split, B, T
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.tokenizer_threads, self.buffer_docs, self.epochs, self.prefetch, self.sync_end = tokenizer_threads, buffer_docs, epochs, prefetch, sync_end
        self.capacity = T + 1  # T inputs + the one extra target
        self.bos = tokenizer.get_bos_token_id()
        self.shards = shard_entries(store, split)
        if not self.shards:
            raise ObjectNotFound(f"no {split} shards in {store.uri(INDEX_KEY)}: run the data stage first "
                                 f"(`nanochat stage data --store {store.root}`)")
        self.assignments = self._assign()
        # a buffer larger than an epoch would only hold duplicates (tiny corpora, small val shards)
        self.buffer_docs = max(1, min(buffer_docs, self._docs_per_epoch()))
        # stream cursor: the next document to enter the buffer
        self.epoch, self.pos, self.row = 0, 0, 0
        self.exhausted = False      # finite mode: nothing left to read
        self.finished = False       # finite mode: iteration has ended
        self.batches = 0
        self._keys: list[tuple[int, int]] = []   # sorted (length, -seq): best fit and oldest-first ties by bisect
        self._docs: dict[int, np.ndarray] = {}   # seq -> tokens (at most `capacity` of them)
        self._seq = 0
        self._chunk, self._chunk_i = None, 0
        self._thread = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        if state is not None:
            self.load_state_dict(state)

    # --- row groups of this rank
    def _assign(self) -> list[tuple[int, int]]:
        groups = []
        for i, entry in enumerate(self.shards):
            n = entry.get("row_groups")
            if n is None:  # no index.json: read the footer
                n = self._parquet(i).num_row_groups
            groups += [(i, rg) for rg in range(n)]
        mine = groups[self.rank::self.world_size]
        if not mine:
            if not groups:
                raise ObjectNotFound(f"the {self.split} shards in {self.store.uri(INDEX_KEY)} hold no rows")
            # fewer row groups than ranks (a tiny val shard): ranks share them rather than idle
            log.warning("%s split has %d row groups for %d ranks; rank %d re-reads row group %d", self.split, len(groups),
                        self.world_size, self.rank, self.rank % len(groups))
            mine = [groups[self.rank % len(groups)]]
        return mine

    def _docs_per_epoch(self) -> int:
        """Documents this rank reads per epoch, from the index's row counts (huge when unknown)."""
        total = 0
        for shard_i, _ in self.assignments:
            entry = self.shards[shard_i]
            if "rows" not in entry or not entry.get("row_groups"):
                return 1 << 62
            total += entry["rows"] / entry["row_groups"]
        return int(total)

    def _parquet(self, shard_i: int):
        return _open_parquet(self.store, self.shards[shard_i]["key"])

    # --- reader thread: row groups → token lists, in stream order
    def _start(self):
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        # the thread gets what it reads, not the loader: a dropped loader is collected and its __del__ stops the thread
        reader = _Reader(self.store, [s["key"] for s in self.shards], self.assignments, self.tokenizer, self.bos,
                         self.capacity, self.tokenizer_threads, self.epochs)
        self._thread = threading.Thread(target=reader.run, args=(self.epoch, self.pos, self.row, self._queue, self._stop),
                                        daemon=True, name=f"dataloader-{self.split}-r{self.rank}")
        self._thread.start()
        _LIVE.add(self)

    def close(self, timeout: float | None = None):
        """Stop the reader thread (prefetched data is dropped; the state is unaffected); wait at most `timeout` s."""
        if self._thread is not None:
            self._stop.set()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._thread.is_alive() and (deadline is None or time.monotonic() < deadline):
                try:
                    self._queue.get(timeout=0.05)  # unblock a put
                except queue.Empty:
                    pass
            self._thread = None
        self._chunk, self._chunk_i = None, 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- documents into the buffer
    def _next_doc(self):
        """The next (length, tokens) of the stream, advancing the cursor; None at the end (finite mode)."""
        while True:
            if self._chunk is None:
                if self._thread is None:
                    self._start()
                item = self._queue.get()
                if item is _END:
                    self.exhausted = True
                    self.close()
                    return None
                if isinstance(item, BaseException):
                    self.close()
                    raise item
                self._chunk, self._chunk_i = item, 0
            epoch, pos, row0, docs = self._chunk
            if self._chunk_i < len(docs):
                doc = docs[self._chunk_i]
                self._chunk_i += 1
                if self._chunk_i < len(docs):
                    self.epoch, self.pos, self.row = epoch, pos, row0 + self._chunk_i
                else:
                    self.epoch, self.pos, self.row = *_next_group(epoch, pos, len(self.assignments))[:2], 0
                return doc
            self._chunk = None
            self.epoch, self.pos, self.row = *_next_group(epoch, pos, len(self.assignments))[:2], 0

    def _refill(self):
        while len(self._keys) < self.buffer_docs and not self.exhausted:
            doc = self._next_doc()
            if doc is None:
                return
            self._insert(*doc)

    def _insert(self, length: int, tokens: np.ndarray):
        seq = self._seq
        self._seq += 1
        self._docs[seq] = tokens
        bisect.insort(self._keys, (length, -seq))

    def _take(self, j: int) -> tuple[int, np.ndarray]:
        length, neg_seq = self._keys.pop(j)
        return length, self._docs.pop(-neg_seq)

    # --- packing
    def _pack_batch(self) -> np.ndarray | None:
        rows = np.full((self.B, self.capacity), -1, dtype=np.int64)  # -1: padding (finite mode's last batch only)
        placed = False
        for r in range(self.B):
            pos = 0
            while pos < self.capacity:
                self._refill()
                if not self._keys:
                    break
                remaining = self.capacity - pos
                j = bisect.bisect_right(self._keys, (remaining, math.inf)) - 1  # largest that fits, oldest on ties
                if j >= 0:
                    length, tokens = self._take(j)
                    rows[r, pos:pos + length] = tokens
                    pos += length
                else:  # nothing fits: crop the shortest (oldest on ties) to fill the row exactly
                    shortest = self._keys[0][0]
                    _, tokens = self._take(bisect.bisect_right(self._keys, (shortest, math.inf)) - 1)
                    rows[r, pos:] = tokens[:remaining]
                    pos = self.capacity
            placed = placed or pos > 0
            if pos < self.capacity:
                break  # the stream ended: the rest of the batch stays padding
        return rows if placed else None

    def _to_device(self, rows: np.ndarray):
        cuda = self.device.type == "cuda"
        both = torch.empty((2, self.B, self.T), dtype=torch.long, pin_memory=cuda)
        full = torch.from_numpy(rows)
        both[0].copy_(full[:, :-1])
        both[1].copy_(full[:, 1:])
        both[0].masked_fill_(both[0] < 0, self.bos)  # padded inputs (finite mode) are <|bos|>; their targets stay -1
        if cuda:
            both = both.to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            both = both.to(self.device)
        return both[0], both[1]

    def _all_ranks_have(self, have: bool) -> bool:
        import torch.distributed as dist
        if not (self.epochs is not None and self.sync_end and self.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return have
        flag = torch.tensor([1 if have else 0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- iteration
    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        rows = self._pack_batch()
        if not self._all_ranks_have(rows is not None):
            self.finished = True
            raise StopIteration
        if rows is None:  # other ranks still have data: an all-padding batch keeps collectives in step
            rows = np.full((self.B, self.capacity), -1, dtype=np.int64)
        self.batches += 1
        return self._to_device(rows)

    def take(self, n: int):
        """The next n batches (fewer if a finite stream ends)."""
        for _ in range(n):
            try:
                yield next(self)
            except StopIteration:
                return

    # --- state
    def state_dict(self) -> dict:
        """Everything resume needs, taken between batches. Holds tensors: save it with torch.save."""
        seqs = sorted(self._docs)
        lengths = {-neg: length for length, neg in self._keys}
        tokens = [self._docs[s] for s in seqs]
        at_end = self.epochs is not None and self.epoch >= self.epochs
        shard_i, rg = (None, None) if at_end else self.assignments[self.pos]
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "epoch": self.epoch, "shard": None if shard_i is None else self.shards[shard_i]["name"], "row_group": rg, "row": self.row,
            "batches": self.batches, "exhausted": self.exhausted, "finished": self.finished,
            "pending_lengths": torch.tensor([lengths[s] for s in seqs], dtype=torch.long),
            "pending_sizes": torch.tensor([len(t) for t in tokens], dtype=torch.long),
            "pending_tokens": torch.from_numpy(np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)).clone(),
        }

    def load_state_dict(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"dataloader state version {state.get('version')} is not {STATE_VERSION}")
        if (state["split"], state["rank"], state["world_size"]) != (self.split, self.rank, self.world_size):
            raise ValueError(f"dataloader state is for split={state['split']} rank {state['rank']}/{state['world_size']}, "
                             f"not split={self.split} rank {self.rank}/{self.world_size}: resume with the same world size")
        self.close()
        self.epoch, self.row, self.batches = state["epoch"], state["row"], state["batches"]
        self.exhausted, self.finished = state["exhausted"], state["finished"]
        if state["shard"] is None:
            self.pos = 0
        else:
            where = {(self.shards[s]["name"], rg): p for p, (s, rg) in enumerate(self.assignments)}
            if (state["shard"], state["row_group"]) not in where:
                raise ValueError(f"dataloader state points at {state['shard']} row group {state['row_group']}, which this "
                                 f"rank does not read: the {self.split} shards changed since the checkpoint")
            self.pos = where[(state["shard"], state["row_group"])]
        self._keys, self._docs, self._seq = [], {}, 0
        sizes = state["pending_sizes"].cpu().tolist()
        flat = state["pending_tokens"].cpu().numpy().astype(np.int32)
        offsets = np.cumsum([0] + sizes)
        for length, a, b in zip(state["pending_lengths"].cpu().tolist(), offsets[:-1], offsets[1:]):
            self._insert(length, flat[a:b])


def _open_parquet(store, key: str, fs=None):
    """ParquetFile on a seekable reader, page checksums verified (see text_shards.open_parquet)."""
    try:
        return open_parquet(store, key, fs)
    except ObjectNotFound:
        raise ObjectNotFound(f"no such object: {store.uri(key)} (listed in {store.uri(INDEX_KEY)})") from None


class _Reader:
    """Reads this rank's row groups from a cursor on, tokenizes them, and queues (epoch, pos, row, docs)."""

    def __init__(self, store, keys, assignments, tokenizer, bos, capacity, threads, epochs):
        self.store, self.keys, self.assignments, self.tokenizer, self.bos = store, keys, assignments, tokenizer, bos
        self.capacity, self.threads, self.epochs = capacity, threads, epochs

    def run(self, epoch: int, pos: int, row: int, out: queue.Queue, stop: threading.Event):
        open_shard, pf = None, None
        try:
            fs = self.store.arrow_fs()  # one filesystem (one S3 client) for the whole stream
            while not stop.is_set():
                if self.epochs is not None and epoch >= self.epochs:
                    break
                shard_i, rg = self.assignments[pos]
                if shard_i != open_shard:
                    pf, open_shard = _open_parquet(self.store, self.keys[shard_i], fs), shard_i
                texts = read_texts(pf, rg, self.store, self.keys[shard_i])[row:]
                encoded = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.threads) if texts else []
                docs = [(len(ids), np.asarray(ids[:self.capacity], dtype=np.int32)) for ids in encoded]
                if not _put(out, (epoch, pos, row, docs), stop):
                    return
                epoch, pos, row = _next_group(epoch, pos, len(self.assignments))
            _put(out, _END, stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            _put(out, e, stop)


# loaders with a reader thread; stopped at exit, before pyarrow's S3 finalizer: a reader still inside pyarrow's S3
# client when the AWS SDK shuts down aborts the process ("terminate called without an active exception")
_LIVE: weakref.WeakSet = weakref.WeakSet()
EXIT_WAIT_S = 10.0


@atexit.register
def _close_live_loaders():
    deadline = time.monotonic() + EXIT_WAIT_S
    for loader in list(_LIVE):
        loader.close(timeout=max(0.0, deadline - time.monotonic()))


def _next_group(epoch: int, pos: int, n: int) -> tuple[int, int, int]:
    return (epoch, pos + 1, 0) if pos + 1 < n else (epoch + 1, 0, 0)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def val_batches(store, tokenizer, B: int, T: int, n: int, rank: int = 0, world_size: int = 1, device="cpu", **kwargs):
    """The first n batches of the val split for this rank: the same every call (for bpb evaluation)."""
    loader = DataLoader(store, tokenizer, "val", B, T, rank=rank, world_size=world_size, device=device, **kwargs)
    try:
        yield from loader.take(n)
    finally:
        loader.close()
