"""Profiles: named flag sets for every stage, in one place.

`common` applies to every stage that has the key; `stages[name]` to one stage; `nproc` is how many
processes per node each stage runs with (torchrun --nproc_per_node), `nodes` the node count.
The Kubernetes path reads the same table (a NanochatRun names a profile plus overrides).
"""
from __future__ import annotations

PROFILES: dict[str, dict] = {
    "tiny": {
        "description": "CPU, a few minutes: embedded corpus, ~1M-parameter model, every stage shown working",
        "gpus_per_node": 0,
        "nodes": 1,
        "common": {},
        "stages": {},
        "nproc": {},
    },
    "ci": {
        "description": "tiny, cut further for the test suite (seconds per stage)",
        "gpus_per_node": 0,
        "nodes": 1,
        "common": {},
        "stages": {},
        "nproc": {},
    },
    "d20": {
        "description": "8×H100, ~4 h: nanochat's classic $100 speedrun (depth 20, width 1280, data:param ratio 20)",
        "gpus_per_node": 8,
        "nodes": 1,
        "common": {},
        "stages": {},
        "nproc": {"base_train": 8, "base_eval": 8, "mid_train": 8, "chat_sft": 8, "chat_rl": 8, "chat_eval": 8},
    },
    "d24": {
        "description": "8×H100: depth 24 at data:param ratio ~8 (the time-to-GPT-2 record setting)",
        "gpus_per_node": 8,
        "nodes": 1,
        "common": {},
        "stages": {},
        "nproc": {"base_train": 8, "base_eval": 8, "mid_train": 8, "chat_sft": 8, "chat_rl": 8, "chat_eval": 8},
    },
    "d26": {
        "description": "8×H100, ~12 h: depth 26, GPT-2-grade CORE",
        "gpus_per_node": 8,
        "nodes": 1,
        "common": {},
        "stages": {},
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
