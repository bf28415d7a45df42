"""
ARC, the AI2 Reasoning Challenge (https://huggingface.co/datasets/allenai/ai2_arc; Clark et al. 2018,
CC BY-SA 4.0): grade-school science multiple choice, Easy and Challenge sets. The letters come
from the data (usually A-D, sometimes 3 or 5 options, a few use 1-4).

Store layout: data/tasks/arc/{ARC-Easy,ARC-Challenge}/{train,validation,test}-*.parquet with
columns id, question, choices {text, label}, answerKey.
"""
from __future__ import annotations

from nanochat.tasks.base import Task, evaluate_letter, render_mc
from nanochat.tasks.files import load_rows

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"
    baseline = 0.25

    def __init__(self, store=None, split: str = "test", subset: str = "ARC-Easy", **kwargs):
        super().__init__(**kwargs)
        split = {"val": "validation"}.get(split, split)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.split, self.subset = split, subset
        download_name = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
        self.rows = load_rows(store, "arc", [f"{subset}/{split}-*.parquet"], download_name)

    @property
    def name(self):
        return self.subset

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        letters, choices = list(row["choices"]["label"]), list(row["choices"]["text"])
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC answer {row['answerKey']!r} is not one of {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices)},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)
