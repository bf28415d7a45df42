"""Profiles: named flag sets for every stage, in one place.

`common` applies to every stage that has the key; `stages[name]` to one stage; `nproc` is how many
processes per node each stage runs with (torchrun --nproc_per_node), `nodes` the node count.
The Kubernetes path reads the same table (a NanochatRun names a profile plus overrides).
"""
from __future__ import annotations

PROFILES: dict[str, dict] = {
    "tiny": {
        "description": "CPU, ~8 minutes on 2 cores: embedded corpus, 7M-parameter depth-4 model, every stage shown working",
        "gpus_per_node": 0,
        "nodes": 1,
        "common": {},
        "stages": {
            "tok_train": {"vocab_size": 4096},
            # 500 steps: bf16-mixed (auto on CPUs with fast bf16, e.g. Zen 5) reaches fp32's 400-step val bpb here, ~45 s sooner
            "base_train": {"depth": 4, "head_dim": 64, "window_pattern": "L", "max_seq_len": 256, "device_batch_size": 8, "total_batch_size": -1,
                           "num_iterations": 500, "eval_every": 100, "eval_tokens": 32768, "save_every": 100, "log_every": 25,
                           "core_metric_every": 0},
            "base_eval": {"device_batch_size": 8, "eval_tokens": 32768},
            "mid_train": {"device_batch_size": 8, "total_batch_size": -1, "max_seq_len": 256, "num_iterations": 150, "eval_every": 50,
                          "eval_tokens": 32768, "save_every": 50, "log_every": 25},
            "chat_sft": {"device_batch_size": 8, "target_examples_per_step": 16, "num_iterations": 100, "init_lr_frac": 0.5, "eval_every": 50,
                         "eval_steps": 16, "eval_metrics_every": 100, "eval_cat_examples": 200, "eval_gen_examples": 24, "eval_max_new_tokens": 128, "log_every": 25},
            # letter counting: the one synthetic skill SFT leaves at ~60%, so there is reward to gain
            "chat_rl": {"task": "synthetic_spelling", "num_iterations": 40, "examples_per_step": 8, "num_samples": 8, "device_batch_size": 8,
                        "max_new_tokens": 64, "init_lr_frac": 0.1, "eval_every": 20, "eval_examples": 100, "eval_samples": 4, "save_every": 20},
            # answers are <= 55 tokens; 100 problems per task keeps four evaluations under a few minutes
            "chat_eval": {"tasks": "synthetic_arithmetic|synthetic_spelling|synthetic_mc|synthetic_chat", "max_problems": 100, "max_new_tokens": 64, "batch_size": 32},
        },
        # two single-threaded ranks split the problems: decode does not scale with intra-op threads
        "nproc": {"chat_eval": 2, "chat_rl": 2},
    },
    "ci": {
        "description": "tiny, cut further for the test suite (seconds per stage)",
        "gpus_per_node": 0,
        "nodes": 1,
        "common": {},
        "stages": {
            "tok_train": {"vocab_size": 2048},
            "base_train": {"depth": 2, "head_dim": 64, "window_pattern": "L", "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": -1,
                           "num_iterations": 30, "eval_every": 0, "eval_tokens": 2048, "save_every": 0, "core_metric_every": 0},
            "base_eval": {"device_batch_size": 4, "eval_tokens": 2048},
            "data": {"embedded_chars": 300_000, "shard_chars": 100_000},
            "mid_train": {"max_seq_len": 256, "device_batch_size": 4, "total_batch_size": -1, "num_iterations": 20, "eval_every": 0,
                          "eval_tokens": 4096, "save_every": 0, "compile": "false"},
            "chat_sft": {"device_batch_size": 8, "target_examples_per_step": 8, "num_iterations": 20, "init_lr_frac": 0.5, "eval_every": 0,
                         "eval_steps": 8, "eval_cat_examples": 64, "eval_gen_examples": 8, "eval_max_new_tokens": 64},
            "chat_rl": {"task": "synthetic_arithmetic", "num_iterations": 4, "examples_per_step": 4, "num_samples": 4, "max_new_tokens": 64,
                        "eval_examples": 8, "eval_samples": 2, "eval_every": 0, "save_every": 2},
            "chat_eval": {"tasks": "synthetic_arithmetic|synthetic_spelling|synthetic_mc|synthetic_chat", "max_problems": 20, "max_new_tokens": 96, "batch_size": 32},
        },
        "nproc": {},
    },
    "d20": {
        "description": "8×H100, ~4 h: nanochat's classic $100 speedrun (depth 20, width 1280, data:param ratio 20)",
        "gpus_per_node": 8,
        "nodes": 1,
        # depth and ratio size both the model (base_train) and the download (data) — one place
        "common": {"depth": 20, "target_param_data_ratio": 20},
        "stages": {"base_train": {"device_batch_size": 32}},
        "nproc": {"base_train": 8, "base_eval": 8, "mid_train": 8, "chat_sft": 8, "chat_rl": 8, "chat_eval": 8},
    },
    "d24": {
        "description": "8×H100: depth 24 at data:param ratio ~8 (the time-to-GPT-2 record setting)",
        "gpus_per_node": 8,
        "nodes": 1,
        "common": {"depth": 24, "target_param_data_ratio": 8},
        # smaller micro-batches so activations fit 80 GB; grad accumulation keeps the 524K-token step
        "stages": {"base_train": {"device_batch_size": 16}, "mid_train": {"device_batch_size": 16}, "base_eval": {"device_batch_size": 16}},
        "nproc": {"base_train": 8, "base_eval": 8, "mid_train": 8, "chat_sft": 8, "chat_rl": 8, "chat_eval": 8},
    },
    "d26": {
        "description": "8×H100, ~12 h: depth 26, GPT-2-grade CORE",
        "gpus_per_node": 8,
        "nodes": 1,
        "common": {"depth": 26, "target_param_data_ratio": 20},
        "stages": {"base_train": {"device_batch_size": 16}, "mid_train": {"device_batch_size": 16}, "base_eval": {"device_batch_size": 16}},
        "nproc": {"base_train": 8, "base_eval": 8, "mid_train": 8, "chat_sft": 8, "chat_rl": 8, "chat_eval": 8},
    },
}


def names() -> list[str]:
    return list(PROFILES)


def get(name: str) -> dict:
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; accepted: {', '.join(PROFILES)}")
    return PROFILES[name]


def stage_overrides(profile: str, stage: str) -> dict:
    """The flags a profile sets for one stage (common keys first, stage keys win)."""
    p = get(profile)
    return {**p.get("common", {}), **p.get("stages", {}).get(stage, {})}


def nproc(profile: str, stage: str) -> int:
    return get(profile).get("nproc", {}).get(stage, 1)
