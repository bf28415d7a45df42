"""Fetch the chat task datasets (SmolTalk, MMLU, ARC, GSM8K, HumanEval, SpellingBee words, identity
conversations) from their public Hugging Face exports into data/tasks/ in the store."""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "task_data"
DEFAULT_TASKS = "smoltalk,mmlu,mmlu_aux,arc_easy,arc_challenge,gsm8k,humaneval,spellingbee,identity"


@dataclass
class Config(StageConfig):
    tasks: str = opt(DEFAULT_TASKS, "comma-separated datasets to fetch")
    base_url: str = opt("", "Hugging Face datasets endpoint override (mirrors); default $HF_ENDPOINT or huggingface.co", hash=False)
    retries: int = opt(5, "retries per file on transient errors", hash=False)

    def validate(self):
        from nanochat.tasks.download import SOURCES
        unknown = [t for t in self.tasks.split(",") if t.strip() and t.strip() not in SOURCES]
        if unknown:
            raise ConfigError(f"--tasks: unknown dataset(s) {', '.join(unknown)}; accepted: {', '.join(SOURCES)}")


def run(ctx):
    from nanochat.tasks.download import HF_DEFAULT, download_task_data
    names = [t.strip() for t in ctx.cfg.tasks.split(",") if t.strip()]
    if not ctx.is_master:
        return {}
    result = download_task_data(ctx.store, names, base_url=ctx.cfg.base_url or HF_DEFAULT, retries=ctx.cfg.retries)
    ctx.section("Task data", {"datasets": ", ".join(names), "files": len(result) if hasattr(result, "__len__") else "-"})
    return {"datasets": len(names)}


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
