"""
MMLU (https://huggingface.co/datasets/cais/mmlu; Hendrycks et al. 2021, MIT): 57 subjects of
4-way multiple choice. The assistant answers with the letter.

Store layout (either works):
- the HF parquet export: data/tasks/mmlu/all/{test,validation,dev}-*.parquet and
  data/tasks/mmlu/auxiliary_train/train-*.parquet (whose rows sit under a 'train' struct);
  columns question, subject, choices, answer (0-3).
- the original csvs (hendrycks/test data.tar): data/tasks/mmlu/{dev,val,test,auxiliary_train}/<subject>_<split>.csv,
  no header: question, A, B, C, D, answer letter.
"""
from __future__ import annotations

import csv
import io

from nanochat.tasks.base import LETTERS, Task, evaluate_letter, render_mc
from nanochat.tasks.files import Rows, find_files, load_rows, require_files, resolve_store

SPLITS = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}
CSV_DIRS = {"test": "test", "validation": "val", "dev": "dev", "train": "auxiliary_train"}


def read_csv_rows(text: str, subject: str) -> list[dict]:
    rows = []
    for record in csv.reader(io.StringIO(text)):
        if len(record) != 6:
            raise ValueError(f"MMLU csv row for {subject} has {len(record)} fields, expected 6")
        question, *choices, answer = record
        rows.append({"question": question, "subject": subject, "choices": choices, "answer": LETTERS.index(answer.strip())})
    return rows


def subject_from_key(key: str, csv_dir: str) -> str:
    name = key.rsplit("/", 1)[-1].removesuffix(".csv")
    return name.removesuffix(f"_{csv_dir}")


class MMLU(Task):
    eval_type = "categorical"
    baseline = 0.25
    letters = LETTERS

    def __init__(self, store=None, split: str | None = None, subset: str = "all", **kwargs):
        super().__init__(**kwargs)
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be all|auxiliary_train, got {subset!r}")
        split = {"val": "validation"}.get(split, split) or SPLITS[subset][0]  # test, or train for auxiliary_train
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU {subset} split must be one of {SPLITS[subset]}, got {split!r}")
        self.split, self.subset = split, subset
        download_name = "mmlu_aux" if subset == "auxiliary_train" else "mmlu"
        store = resolve_store(store)
        if find_files(store, "mmlu", [f"{subset}/{split}-*.parquet"]) or not find_files(store, "mmlu", [f"{CSV_DIRS[split]}/*.csv"]):
            self.rows = load_rows(store, "mmlu", [f"{subset}/{split}-*.parquet"], download_name)
        else:
            self.rows = Rows(self._csv_rows(store, split, download_name))

    @staticmethod
    def _csv_rows(store, split, download_name):
        csv_dir = CSV_DIRS[split]
        rows = []
        for key in require_files(store, "mmlu", [f"{csv_dir}/*.csv"], download_name):
            rows.extend(read_csv_rows(store.get_bytes(key).decode("utf-8"), subject_from_key(key, csv_dir)))
        return rows

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        row = row.get("train") or row  # auxiliary_train wraps each row in a 'train' struct
        choices = list(row["choices"])
        if len(choices) != 4:
            raise ValueError(f"MMLU row has {len(choices)} choices, expected 4")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
                {"role": "assistant", "content": self.letters[int(row["answer"])]},
            ],
            "subject": row.get("subject", ""),
            "letters": list(self.letters),
        }

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)
