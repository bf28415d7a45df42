"""Read the text column of the store's parquet shards (the splits of data/shards/index.json).

Readers verify parquet page checksums (CRC32 per page, written by the data stage): a flipped bit in a
shard is an error naming the shard and row group, never silently different training text. Damaged
files, bad UTF-8 and a missing text column are `CorruptObject`s; I/O failures are `StoreError`s.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.store import CorruptObject, ObjectNotFound, StoreError

SHARD_PREFIX = "data/shards/"
TEXT_COLUMN = "text"
IO_MARKERS = ("AWS Error", "curlCode", "Connection", "connection", "timed out", "Timeout")  # pyarrow S3 errors, not damage


def list_shards(store) -> list[str]:
    return [k for k in store.list(SHARD_PREFIX) if k.endswith(".parquet")]


def split_shards(store, split: str) -> list[str]:
    """Keys of a split's shards: as index.json lists them (so a lost shard is an error, not a smaller split),
    else every shard file with the last one as val."""
    from nanochat.dataset import shard_entries
    keys = [e["key"] for e in shard_entries(store, split)]
    if not keys:
        raise ObjectNotFound(f"no {split} shards under {store.uri(SHARD_PREFIX)}: run the data stage first "
                             f"(`nanochat stage data --store {store.root}`)")
    return keys


def shard_error(store, key: str, where: str, e: BaseException) -> StoreError:
    """One clear error for a failed shard read: missing, damaged, or I/O."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, FileNotFoundError):
        return ObjectNotFound(f"no such object: {store.uri(key)}")
    if isinstance(e, OSError) and any(m in msg for m in IO_MARKERS):
        return StoreError(f"cannot read {where} of {store.uri(key)}: {msg}")
    return CorruptObject(f"corrupt parquet shard {store.uri(key)} ({where}): {msg}; "
                         f"re-create the shards (`nanochat stage data --force --store {store.root}`)")


def open_parquet(store, key: str, fs=None) -> pq.ParquetFile:
    """ParquetFile on a seekable reader (local file or pyarrow's S3 file): footer + row-group range reads."""
    fs, base = fs or store.arrow_fs()
    try:
        pf = pq.ParquetFile(fs.open_input_file(f"{base}/{key}"), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise shard_error(store, key, "footer", e) from None
    field = pf.schema_arrow.field(TEXT_COLUMN) if TEXT_COLUMN in pf.schema_arrow.names else None
    if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        found = f"type {field.type}" if field is not None else f"columns {pf.schema_arrow.names}"
        raise CorruptObject(f"parquet shard {store.uri(key)} has no UTF-8 {TEXT_COLUMN!r} column ({found})")
    return pf


def read_texts(pf: pq.ParquetFile, rg: int, store, key: str) -> list[str]:
    """The documents of one row group, checksums verified."""
    try:
        return pf.read_row_group(rg, columns=[TEXT_COLUMN]).column(0).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise shard_error(store, key, f"row group {rg}", e) from None


def iter_texts(store, split: str = "train"):
    """Documents of a split in shard order, streamed row group by row group."""
    for key in split_shards(store, split):
        pf = open_parquet(store, key)
        for rg in range(pf.num_row_groups):
            yield from read_texts(pf, rg, store, key)
