"""Dataloader throughput: tokens/s one loader process delivers per rank, from file:// and from S3
(a moto server on loopback), with 1 and 4 tokenizer threads — against the tokens/s a d20 trainer eats.

    .venv/bin/python bench/dataloader.py [--batches 30] [--B 32] [--T 2048] [--vocab-size 16384]

The corpus is the embedded one (CPython docs + synthetic tasks, ~2M chars), re-read every epoch, so
every measured batch pays for parquet reads, tokenization and best-fit packing. Target from the
issue: >= 3x what one H100 consumes at d20 (~140K tok/s).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D20_TOKENS_PER_S = 140_000  # one H100 training d20 (nanochat speedrun: ~1.1M tok/s on 8 GPUs)


def start_s3():
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    from tests.s3util import MotoServer
    import boto3
    server = MotoServer().start()
    os.environ["AWS_ENDPOINT_URL"] = server.url
    boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket="bench")
    return server


def measure(store, tokenizer, B, T, threads, n) -> dict:
    from nanochat.dataloader import DataLoader
    loader = DataLoader(store, tokenizer, "train", B, T, tokenizer_threads=threads)
    t0 = time.perf_counter()
    next(loader)  # first batch: opens the shard, fills the buffer
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        next(loader)
    dt = time.perf_counter() - t0
    loader.close()
    return {"tok_s": n * B * T / dt, "ms_batch": 1000 * dt / n, "first_s": first}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=16384, help="the embedded corpus supports up to ~29K")
    p.add_argument("--threads", default="1,4")
    args = p.parse_args()

    import torch
    torch.set_num_threads(1)
    from nanochat import dataset
    from nanochat.store import open_store
    from nanochat.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-dataloader-"))
    server = start_s3()
    try:
        t0 = time.perf_counter()
        docs, _ = dataset.embedded_documents()
        tokenizer = train_tokenizer(iter(docs), args.vocab_size)
        print(f"tokenizer: vocab {tokenizer.get_vocab_size()} trained in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        stores = {"file://": open_store(f"file://{work}/store"), "s3 (moto, loopback)": open_store("s3://bench/run")}
        for store in stores.values():
            index = dataset.build_embedded(store, row_group_rows=256)
        sample = docs[:200]
        cpt = sum(map(len, sample)) / sum(map(len, tokenizer.encode(sample)))
        print(f"corpus: {index['rows']:,} docs, {index['chars']:,} chars in {index['num_train']} train shards, {cpt:.2f} chars/token",
              file=sys.stderr)
        d20 = dataset.recipe(20, vocab_size=args.vocab_size, seq_len=args.T)
        rows = []
        for name, store in stores.items():
            for threads in [int(t) for t in args.threads.split(",")]:
                r = measure(store, tokenizer, args.B, args.T, threads, args.batches)
                rows.append((name, threads, r))
                print(f"  {name} threads={threads}: {r['tok_s']:,.0f} tok/s", file=sys.stderr)
    finally:
        server.stop()

    cpus = os.cpu_count()
    print(f"\nDataloader throughput per rank (one process), B={args.B} T={args.T}, {cpus} CPU cores, "
          f"best-fit packing, embedded corpus")
    print(f"trainer needs: ~{D20_TOKENS_PER_S / 1e3:.0f}K tok/s per H100 at d20 (nanochat speedrun); "
          f"recipe at {d20['mfu']:.0%} MFU: {d20['tokens_per_s_per_gpu'] / 1e3:.0f}K tok/s; target >= 3x = {3 * D20_TOKENS_PER_S / 1e3:.0f}K\n")
    header = f"{'store':<22} {'tok threads':>11} {'tokens/s':>12} {'ms/batch':>9} {'first batch s':>13} {'x d20 H100':>10}"
    print(header)
    print("-" * len(header))
    for name, threads, r in rows:
        print(f"{name:<22} {threads:>11} {r['tok_s']:>12,.0f} {r['ms_batch']:>9.1f} {r['first_s']:>13.2f} {r['tok_s'] / D20_TOKENS_PER_S:>10.2f}")


if __name__ == "__main__":
    main()
