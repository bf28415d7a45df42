"""
Reading task data from the store: `<store>/data/tasks/<name>/...`, as downloaded by
nanochat.tasks.download (the Hugging Face export layout, parquet or JSONL).

Parquet rows stay in Arrow and are converted one at a time on access, so a 460K-conversation
SmolTalk costs its Arrow buffers, not millions of Python dicts.
"""
from __future__ import annotations

import fnmatch
import json
import random

TASKS_PREFIX = "data/tasks"


class TaskDataMissing(FileNotFoundError):
    """A task's files are not in the store; the message says how to fetch them."""


def resolve_store(store):
    """A Store, a URI string, or None (the default store, $NANOCHAT_STORE)."""
    from nanochat.store import Store, open_store
    return store if isinstance(store, Store) else open_store(store)


def find_files(store, dataset: str, patterns: list[str]) -> list[str]:
    """Keys under data/tasks/<dataset>/ matching the first pattern that matches anything."""
    prefix = f"{TASKS_PREFIX}/{dataset}/"
    keys = [k for k in store.list(prefix) if not k.endswith("index.json")]
    for pattern in patterns:
        hits = sorted(k for k in keys if fnmatch.fnmatch(k[len(prefix):], pattern))
        if hits:
            return hits
    return []


def require_files(store, dataset: str, patterns: list[str], download_name: str | None = None) -> list[str]:
    keys = find_files(store, dataset, patterns)
    if not keys:
        name = download_name or dataset
        raise TaskDataMissing(
            f"no {dataset} task data matching {' or '.join(patterns)} under {store.uri(f'{TASKS_PREFIX}/{dataset}/')}; "
            f"fetch it with: python -m nanochat.tasks.download --store {store.uri()} {name}")
    return keys


def read_jsonl(store, key: str) -> list:
    rows = []
    for line in store.get_bytes(key).decode("utf-8").splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def read_table(store, keys: list[str]):
    """Concatenate parquet files into one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = []
    for key in keys:
        with store.open(key) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


class Rows:
    """Random access to rows (dicts) of a parquet table or a list, in a fixed shuffled order
    (seed 42 like nanochat, so 'the first N test examples' is a random sample)."""

    def __init__(self, data, shuffle: bool = True, seed: int = 42):
        self.data = data
        self.order = list(range(len(data)))
        if shuffle:
            random.Random(seed).shuffle(self.order)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        i = self.order[index]
        if isinstance(self.data, list):
            return self.data[i]
        return self.data.slice(i, 1).to_pylist()[0]


def load_rows(store, dataset: str, patterns: list[str], download_name: str | None = None, shuffle: bool = True) -> Rows:
    """Rows from parquet or JSONL files (whichever the first matching pattern finds)."""
    store = resolve_store(store)
    keys = require_files(store, dataset, patterns, download_name)
    if all(k.endswith(".parquet") for k in keys):
        return Rows(read_table(store, keys), shuffle)
    rows = []
    for key in keys:
        rows.extend(read_jsonl(store, key))
    return Rows(rows, shuffle)
