"""
SmolTalk (https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk, Apache-2.0): general
conversations for small models (460K train / 24K test). Not graded; used for midtraining and SFT.

Store layout: data/tasks/smoltalk/data/{train,test}-*.parquet with a `messages` column
(list of {role, content}); an optional system message comes first.
"""
from __future__ import annotations

from nanochat.tasks.base import Task, check_conversation
from nanochat.tasks.files import load_rows

SPLITS = ("train", "test")


class SmolTalk(Task):
    def __init__(self, store=None, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.rows = load_rows(store, "smoltalk", [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.jsonl"], "smoltalk")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        conversation = {"messages": messages}
        check_conversation(conversation)
        return conversation
