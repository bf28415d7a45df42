"""torchrun worker for tests/test_dataloader.py: one finite epoch of the train split on every rank.

    torchrun --nproc_per_node=2 tests/dist_loader_check.py --store URI --out DIR --B 4 --T 32

Each rank writes DIR/rank<r>.json: its packed rows (full T+1 token rows, -1 = padding) and batch count.
Also home of IntTokenizer, the test double the loader tests use to identify every document.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BOS = 0
DOC_ID_BASE = 100_000


class IntTokenizer:
    """A document is space-separated integers and its tokens are those integers; <|bos|> is 0.
    Corpus documents start with a unique id token (>= DOC_ID_BASE), so any row segment names its document."""

    def get_bos_token_id(self) -> int:
        return BOS

    def encode(self, text, prepend=None, append=None, num_threads=1):
        rows = [[int(w) for w in t.split()] for t in ([text] if isinstance(text, str) else text)]
        if prepend is not None:
            rows = [[prepend] + r for r in rows]
        return rows[0] if isinstance(text, str) else rows


def int_corpus(n_docs: int, max_len: int, seed: int = 0) -> list[str]:
    """Documents '<id> t t t ...' with 0..max_len-1 body tokens in [1, 1000)."""
    rng = random.Random(seed)
    return [" ".join(map(str, [DOC_ID_BASE + i] + [rng.randrange(1, 1000) for _ in range(rng.randrange(max_len))]))
            for i in range(n_docs)]


def write_int_corpus(store, n_docs: int, max_len: int, docs_per_shard: int, row_group_rows: int, seed: int = 0) -> list[str]:
    """The int corpus as shards (the last shard is val); returns the documents in order."""
    from nanochat.dataset import ShardWriter
    docs = int_corpus(n_docs, max_len, seed)
    writer = ShardWriter(store, "test", shard_chars=10**12, row_group_rows=row_group_rows)
    for i, doc in enumerate(docs):
        writer.add(doc)
        if (i + 1) % docs_per_shard == 0:
            writer.cut()
    writer.finish()
    return docs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=32)
    p.add_argument("--buffer-docs", type=int, default=16)
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    from nanochat.dataloader import DataLoader
    from nanochat.store import open_store

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = DataLoader(open_store(args.store), IntTokenizer(), "train", args.B, args.T, rank=rank, world_size=world,
                        epochs=1, buffer_docs=args.buffer_docs)
    rows = []
    for x, y in loader:
        full = torch.cat([x, y[:, -1:]], dim=1)
        full[:, 1:][y < 0] = -1  # padding: targets are -1 there
        full[y[:, 0] < 0, 0] = -1  # an all-padding row (this rank ran out before the others)
        rows += full.tolist()
    groups = [[loader.shards[s]["name"], rg] for s, rg in loader.assignments]
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "batches": loader.batches, "rows": rows, "row_groups": groups}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
