"""
Tasks: datasets of conversations that can grade a model's answers (see base.py), and a registry
so stages and configs name them by string:

    task = get_task("gsm8k", store, split="test")           # real data, from <store>/data/tasks/
    task = get_task("synthetic_arithmetic", split="train")   # ships with the package
    mixture = TaskMixture([get_task("smoltalk", store), get_task("mmlu_aux", store)], seed=42)

Names are case-insensitive and '-' equals '_' (so nanochat's "ARC-Easy", "GSM8K" work too).
"""
from __future__ import annotations

from nanochat.tasks.base import (LETTERS, Task, TaskMixture, TaskSequence, TaskSlice, check_conversation,
                                 conversation_to_text, extract_answer, render_mc)
from nanochat.tasks.files import TaskDataMissing
from nanochat.tasks.synthetic import (SyntheticArithmetic, SyntheticChat, SyntheticChoiceDrill, SyntheticMultipleChoice,
                                      SyntheticMultipleChoiceLetter, SyntheticSpelling, synthetic_documents)


def _arc(subset):
    def make(store=None, split="test", **kw):
        from nanochat.tasks.arc import ARC
        return ARC(store, split=split, subset=subset, **kw)
    return make


def _lazy(module: str, cls: str, **fixed):
    """Import real-data tasks on first use (keeps `import nanochat.tasks` light)."""
    def make(store=None, split=None, **kw):
        import importlib
        task_cls = getattr(importlib.import_module(f"nanochat.tasks.{module}"), cls)
        if split is not None:
            kw["split"] = split
        return task_cls(store, **fixed, **kw)
    return make


def _synthetic(cls):
    def make(store=None, split="train", **kw):
        return cls(split=split, **kw)
    return make


# name -> factory(store, split, **kw)
TASKS = {
    "smoltalk": _lazy("smoltalk", "SmolTalk"),
    "mmlu": _lazy("mmlu", "MMLU", subset="all"),
    "mmlu_aux": _lazy("mmlu", "MMLU", subset="auxiliary_train"),
    "arc_easy": _arc("ARC-Easy"),
    "arc_challenge": _arc("ARC-Challenge"),
    "gsm8k": _lazy("gsm8k", "GSM8K"),
    "humaneval": _lazy("humaneval", "HumanEval"),
    "spellingbee": _lazy("spellingbee", "SpellingBee"),
    "simple_spelling": _lazy("spellingbee", "SimpleSpelling"),
    "identity": _lazy("customjson", "Identity"),
    "customjson": _lazy("customjson", "CustomJSON"),
    "synthetic_arithmetic": _synthetic(SyntheticArithmetic),
    "synthetic_spelling": _synthetic(SyntheticSpelling),
    "synthetic_mc": _synthetic(SyntheticMultipleChoice),
    "synthetic_mc_letter": _synthetic(SyntheticMultipleChoiceLetter),
    "synthetic_chat": _synthetic(SyntheticChat),
    "synthetic_mc_drill": _synthetic(SyntheticChoiceDrill),
}
ALIASES = {
    "mmlu_auxiliary_train": "mmlu_aux",
    "synthetic_multiple_choice": "synthetic_mc",
    "spelling_bee": "spellingbee",
    "identity_conversations": "identity",
}


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return key


def get_task(name: str, store=None, split: str | None = None, **kwargs) -> Task:
    """Build a task by name. `store` (a Store or URI) is needed by real-data tasks only; split
    defaults to the task's own default (train for training sets, test for benchmarks)."""
    factory = TASKS[canonical_name(name)]
    return factory(store, split, **kwargs) if split is not None else factory(store, **kwargs)


def list_tasks() -> list[str]:
    return sorted(TASKS)


__all__ = [
    "LETTERS", "Task", "TaskSlice", "TaskMixture", "TaskSequence", "TaskDataMissing", "TASKS",
    "get_task", "list_tasks", "canonical_name", "render_mc", "extract_answer", "check_conversation",
    "conversation_to_text", "SyntheticArithmetic", "SyntheticSpelling", "SyntheticMultipleChoice",
    "SyntheticChat", "synthetic_documents",
]
