"""
GSM8K grade-school math (https://huggingface.co/datasets/openai/gsm8k; Cobbe et al. 2021, MIT).

Solutions carry calculator annotations: "48/2 = <<48/2=24>>24 clips". Each <<expr=result>> becomes
a python part (the model writes the call) and a python_output part (the tool answers), so the
model learns to use the calculator. The final answer follows "#### ". Graded by that number.

Store layout: data/tasks/gsm8k/{main,socratic}/{train,test}-*.parquet (the HF export), or
data/tasks/gsm8k/{train,test}.jsonl (openai/grade-school-math's JSONL).
"""
from __future__ import annotations

import re

from nanochat.tasks.base import Task, evaluate_final_answer
from nanochat.tasks.files import load_rows

ANNOTATION_RE = re.compile(r"(<<[^>]*>>)")
SPLITS = ("train", "test")


def answer_to_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into text / python / python_output parts."""
    parts = []
    for piece in ANNOTATION_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    def __init__(self, store=None, split: str = "train", subset: str = "main", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main|socratic, got {subset!r}")
        self.split, self.subset = split, subset
        self.rows = load_rows(store, "gsm8k", [f"{subset}/{split}-*.parquet", f"{split}.jsonl"], "gsm8k")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]}

    def evaluate(self, conversation, completion):
        return evaluate_final_answer(conversation, completion)
