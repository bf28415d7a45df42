"""
Conversations from a JSONL file, one JSON list of {role, content} messages per line (user and
assistant alternating). nanochat's identity conversations use this format; they live at
data/tasks/identity/identity_conversations.jsonl in the store.
"""
from __future__ import annotations

import json
from pathlib import Path

from nanochat.tasks.base import Task, check_conversation
from nanochat.tasks.files import read_jsonl, require_files, resolve_store

IDENTITY_DATASET = "identity"


class CustomJSON(Task):
    """From a key in the store (`key=`) or a local file (`path=`)."""

    def __init__(self, store=None, key: str | None = None, path: str | None = None, split: str | None = None, **kwargs):
        super().__init__(**kwargs)  # split is accepted for a uniform get_task() call; one file holds everything
        if (key is None) == (path is None):
            raise ValueError("CustomJSON needs exactly one of key= (in the store) or path= (a local file)")
        if path is not None:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            raw = [json.loads(line) for line in lines if line.strip()]
            self.source = str(path)
        else:
            store = resolve_store(store)
            raw = read_jsonl(store, key)
            self.source = store.uri(key)
        self.conversations = []
        for i, messages in enumerate(raw):
            if isinstance(messages, dict):  # also accept {"messages": [...]}
                messages = messages.get("messages")
            conversation = {"messages": messages}
            try:
                check_conversation(conversation)
            except ValueError as e:
                raise ValueError(f"{self.source} line {i + 1}: {e}") from None
            self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.conversations[index]]}


class Identity(CustomJSON):
    """nanochat's identity conversations (who the assistant is), from the store."""

    def __init__(self, store=None, **kwargs):
        store = resolve_store(store)
        key = require_files(store, IDENTITY_DATASET, ["*.jsonl"], "identity")[0]
        super().__init__(store, key=key, **kwargs)

    @property
    def name(self):
        return "Identity"

