"""Pretraining text shards into the store: the embedded corpus (tiny/ci) or FineWeb-Edu / ClimbMix shards.

Downloads run in two parts, as in the seed's speedrun: `--part first` fetches the first few shards
(+ the val shard) so the tokenizer can train, while `--part rest` (instance `data_rest`) fetches the
remainder in the background. `--num-shards 0` sizes the download from the recipe for --depth and
--target-param-data-ratio (tokens = ratio × scaling params, ~250M chars per shard).
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat import dataset as corpus  # (a config field is called `dataset`)
from nanochat.config import ConfigError, StageConfig, opt
from nanochat.stage import run_module_main, stage_main
from nanochat.store import sha256_bytes

STAGE = "data"
CPU_PROFILES = ("tiny", "ci")


@dataclass
class Config(StageConfig):
    dataset: str = opt("auto", "embedded (no download), fineweb-edu, climbmix (non-commercial license); auto: embedded for tiny/ci, fineweb-edu otherwise",
                      choices=["auto", "embedded", *corpus.DATASETS])
    part: str = opt("all", "all; first (the first --first-shards + val, enough for the tokenizer); rest (the remainder: instance data_rest)",
                    choices=["all", "first", "rest"])
    num_shards: int = opt(0, "train shards to download (0 = from the recipe for --depth / --target-param-data-ratio)")
    first_shards: int = opt(8, "train shards the first part fetches (~2B chars for the tokenizer)")
    depth: int = opt(20, "model depth the recipe sizes the download for")
    target_param_data_ratio: float = opt(corpus.DEFAULT_RATIO, "tokens per scaling parameter the recipe sizes the download for")
    vocab_size: int = opt(corpus.DEFAULT_VOCAB_SIZE, "tokenizer vocabulary size (recipe: lm_head parameters)")
    max_seq_len: int = opt(corpus.DEFAULT_SEQ_LEN, "context length (recipe: attention FLOPs)")
    shard_margin: float = opt(0.1, "extra shards over the recipe, as a fraction (cropping discards some tokens)")
    workers: int = opt(8, "parallel shard downloads", hash=False)
    data_base_url: str = opt("", "mirror base URL for shard downloads: <url>/shard_XXXXX.parquet", hash=False)
    retries: int = opt(corpus.DOWNLOAD_RETRIES, "download retries per shard (exponential backoff)", hash=False)
    timeout_s: float = opt(corpus.DOWNLOAD_TIMEOUT_S, "seconds without data before a download retry", hash=False)
    verify: bool = opt(False, "re-hash shards already in the store and re-fetch mismatches", hash=False)
    embedded_chars: int = opt(0, "embedded: cap on prose characters (0 = all, ~1.7M)")
    synthetic_fraction: float = opt(corpus.EMBEDDED_SYNTHETIC_FRACTION, "embedded: fraction of characters from the synthetic task generators")
    shard_chars: int = opt(corpus.EMBEDDED_SHARD_CHARS, "embedded: characters per train shard")
    row_group_rows: int = opt(corpus.EMBEDDED_ROW_GROUP_ROWS, "embedded: documents per parquet row group")
    val_fraction: float = opt(corpus.EMBEDDED_VAL_FRACTION, "embedded: fraction of characters held out in the val shard")

    def validate(self):
        if self.dataset == "auto":  # resolved here so the config hash records the real dataset
            self.dataset = "embedded" if self.profile in CPU_PROFILES else "fineweb-edu"
        for key in ("num_shards", "embedded_chars"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        for key in ("first_shards", "depth", "workers", "shard_chars", "row_group_rows", "vocab_size", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.synthetic_fraction < 1:
            raise ConfigError(f"--synthetic-fraction must be in [0, 1), got {self.synthetic_fraction}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.dataset in corpus.DATASETS and self.num_shards > corpus.DATASETS[self.dataset].val_index:
            raise ConfigError(f"--num-shards: {self.dataset} has {corpus.DATASETS[self.dataset].val_index} train shards, got {self.num_shards}")

    def instance_name(self, stage):
        return f"{stage}_rest" if self.part == "rest" else stage


def shard_range(cfg, store) -> tuple[int, int, int]:
    """(start, stop, total) of the upstream train shards this part fetches."""
    total = cfg.num_shards or corpus.shards_needed(cfg.depth, cfg.target_param_data_ratio, cfg.vocab_size, cfg.max_seq_len,
                                                    store=store, margin=cfg.shard_margin)
    total = min(total, corpus.DATASETS[cfg.dataset].val_index)
    first = min(cfg.first_shards, total)
    return {"all": (0, total, total), "first": (0, first, total), "rest": (first, total, total)}[cfg.part]


def run(ctx):
    cfg, store = ctx.cfg, ctx.store
    if not ctx.is_master:
        return {}
    if cfg.dataset == "embedded":
        if cfg.part == "rest":
            ctx.log("embedded corpus: nothing left to fetch")
            index = corpus.load_index(store)
            if index is None:
                ctx.require(corpus.INDEX_KEY, "data")
        else:
            index = corpus.build_embedded(store, cfg.embedded_chars, cfg.synthetic_fraction, cfg.shard_chars, cfg.row_group_rows,
                                           cfg.val_fraction, seed=cfg.seed, log=ctx.log)
        detail = index.get("sources", {})
    else:
        start, stop, total = shard_range(cfg, store)
        ctx.log(f"{cfg.dataset}: part {cfg.part} fetches train shards [{start}, {stop}) of {total} (+ val)")
        index = corpus.download(store, cfg.dataset, stop, start, True, cfg.workers, cfg.data_base_url or None, cfg.retries,
                                 timeout_s=cfg.timeout_s, verify=cfg.verify, log=ctx.log)
        detail = {"planned_train_shards": total, "part_range": f"[{start}, {stop})", "base_url": index.get("base_url")}
    metrics = {"num_shards": len(index["shards"]), "num_train_shards": index["num_train"], "num_val_shards": index["num_val"],
               "rows": index["rows"], "chars": index["chars"], "bytes": index["bytes"]}
    ctx.add_artifact(corpus.INDEX_KEY, sha256_bytes(store.get_bytes(corpus.INDEX_KEY)))
    ctx.section("Data" if cfg.part != "rest" else "Data (remaining shards)", {
        "source": index["source"], "shards": f"{index['num_train']} train + {index['num_val']} val",
        "documents": f"{index['rows']:,}", "characters": f"{index['chars']:,}", "size": f"{index['bytes'] / 1e6:.1f} MB", **detail})
    ctx.log(f"{index['num_train']} train + {index['num_val']} val shard(s), {index['rows']:,} documents, {index['chars']:,} chars")
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
