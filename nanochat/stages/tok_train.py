"""Train the BPE tokenizer (our Rust rustbpe, run by tiktoken) on the store's train shards."""
from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "tok_train"


@dataclass
class Config(StageConfig):
    vocab_size: int = opt(65536, "vocabulary size, special tokens included")
    max_chars: int = opt(2_000_000_000, "characters of training text to read at most")
    doc_cap: int = opt(10_000, "characters kept per document (long documents are cut)")
    buffer_size: int = opt(8192, "documents handed to the Rust trainer per batch")
    backend: str = opt("rustbpe", "trainer: rustbpe (ours) or huggingface", choices=["rustbpe", "huggingface"])

    def validate(self):
        if self.vocab_size < 256 + 9 + 1:
            raise ConfigError(f"--vocab-size must exceed 265 (256 bytes + 9 special tokens), got {self.vocab_size}")
        if self.max_chars < 1 or self.doc_cap < 1:
            raise ConfigError("--max-chars and --doc-cap must be positive")


def run(ctx):
    from nanochat.text_shards import iter_texts
    from nanochat.tokenizer import train_tokenizer

    cfg = ctx.cfg
    ctx.require("data/shards/index.json", "data")
    if not ctx.is_master:  # one trainer is enough; other ranks (if any) wait at the final barrier
        return {}
    seen = {"chars": 0, "docs": 0}
    bar = ctx.progress(total=cfg.max_chars, desc="tokenizer text (chars)")

    def texts():
        for doc in iter_texts(ctx.store, "train"):
            doc = doc[:cfg.doc_cap]
            seen["chars"] += len(doc)
            seen["docs"] += 1
            bar.update(len(doc))
            yield doc
            if seen["chars"] >= cfg.max_chars:
                return
    t0 = time.time()
    tok = train_tokenizer(texts(), cfg.vocab_size, backend=cfg.backend, **({"buffer_size": cfg.buffer_size} if cfg.backend == "rustbpe" else {}))
    bar.close()
    train_s = time.time() - t0
    tok.save(ctx.store)
    token_bytes = tok.token_bytes()
    from nanochat.store import sha256_bytes
    for key in ("tokenizer/tokenizer.json", "tokenizer/token_bytes.pt"):
        ctx.add_artifact(key, sha256_bytes(ctx.store.get_bytes(key)))
    metrics = {"vocab_size": tok.get_vocab_size(), "train_chars": seen["chars"], "train_docs": seen["docs"], "train_s": round(train_s, 3),
               "mean_token_bytes": float(token_bytes[token_bytes > 0].float().mean()), "max_token_bytes": int(token_bytes.max())}
    ctx.log(f"trained {metrics['vocab_size']} tokens on {seen['chars']:,} chars in {train_s:.2f}s")
    ctx.section("Tokenizer training", {**metrics, "backend": cfg.backend})
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
