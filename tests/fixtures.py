"""Builders for test stores: a small trained tokenizer and a (random-init) base checkpoint."""
from __future__ import annotations

import os

import torch

from nanochat.checkpoint import CheckpointManager


def small_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Real prose from the Python install plus the synthetic task documents."""
    import pydoc_data.topics
    from nanochat.tasks import synthetic_documents
    prose = [v for _, v in sorted(pydoc_data.topics.topics.items())][:n // 2]
    return prose + synthetic_documents(n - len(prose), seed=seed)


def make_tokenizer(store, vocab_size: int = 512, texts: list[str] | None = None):
    from nanochat.tokenizer import train_tokenizer
    tok = train_tokenizer(iter(texts or small_texts()), vocab_size)
    tok.save(store)
    return tok


def make_base_checkpoint(store, tokenizer, depth: int = 2, seq_len: int = 128, head_dim: int = 64, stage: str = "base_train", seed: int = 0):
    """A randomly initialised GPT saved as if base_train had produced it (model_config in meta)."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(depth, tokenizer.get_vocab_size(), seq_len, head_dim=head_dim, window_pattern="L")
    model = GPT.create(config, device="cpu")
    CheckpointManager(store, stage).save(1, model.state_dict(), {}, {"model_config": config.to_dict(), "config_hash": "fixture", "stage": stage})
    return model


def write_shards(store, texts: list[str], num_shards: int = 3):
    """Parquet text shards + index.json in the store's layout (the last shard is the val split)."""
    import io as io_mod
    import pyarrow as pa
    import pyarrow.parquet as pq
    per = -(-len(texts) // num_shards)
    index = []
    for i in range(num_shards):
        buf = io_mod.BytesIO()
        pq.write_table(pa.table({"text": texts[i * per:(i + 1) * per]}), buf, row_group_size=64, compression="zstd",
                       write_page_checksum=True)
        key = f"data/shards/shard_{i:05d}.parquet"
        split = "val" if i == num_shards - 1 else "train"
        index.append({"name": key.rsplit("/", 1)[1], "key": key, "split": split, "sha256": store.put_bytes(key, buf.getvalue())})
    store.put_json("data/shards/index.json", {"shards": index})


def measure_leaving_rng(probe):
    """probe() measured with its cache cleared; asserts it drew nothing from the seeded global RNG (its own generator)."""
    probe.cache_clear()
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    value = probe()
    assert torch.equal(torch.rand(4), want), "the probe moved the global RNG"
    return value


def fuzz(examples: int):
    """Hypothesis settings for a fuzz test: `examples` runs (times FUZZ_SCALE, for a longer hunt: `make fuzz`), random
    each time (no example database), no deadline."""
    from hypothesis import HealthCheck, settings
    scale = float(os.environ.get("FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, round(examples * scale)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
