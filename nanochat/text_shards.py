"""Read the text column of the store's parquet shards (train = all but the last shard, val = the last)."""
from __future__ import annotations

import pyarrow.parquet as pq

SHARD_PREFIX = "data/shards/"


def list_shards(store) -> list[str]:
    return [k for k in store.list(SHARD_PREFIX) if k.endswith(".parquet")]


def split_shards(store, split: str) -> list[str]:
    shards = list_shards(store)
    if not shards:
        raise FileNotFoundError(f"no parquet shards under {store.uri(SHARD_PREFIX)}: run the data stage first")
    if split == "train":
        return shards[:-1] or shards
    if split == "val":
        return shards[-1:]
    raise ValueError(f"split must be train or val, got {split!r}")


def iter_texts(store, split: str = "train", batch_rows: int = 1024):
    """Documents of a split in shard order, streamed row group by row group."""
    for key in split_shards(store, split):
        with store.open(key) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
                yield from batch.column(0).to_pylist()
