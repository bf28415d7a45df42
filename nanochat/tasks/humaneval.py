"""
HumanEval (https://huggingface.co/datasets/openai/openai_humaneval; Chen et al. 2021, MIT): 164
Python functions to complete. Graded by running the completion against the task's tests in the
sandbox (nanochat.execution): a subprocess with time and memory limits, no network, a temp dir.

Store layout: data/tasks/humaneval/openai_humaneval/test-*.parquet with columns task_id, prompt,
canonical_solution, test, entry_point.
"""
from __future__ import annotations

import re

from nanochat.execution import execute_code
from nanochat.tasks.base import Task
from nanochat.tasks.files import load_rows

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:\n```|\Z)", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (completions often omit them)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python block of a completion, or the whole completion if there is none."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip("\n")


def build_program(conversation: dict, completion: str) -> str:
    imports = extract_imports(conversation["messages"][0]["content"])
    return f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"


class HumanEval(Task):
    timeout = 5.0

    def __init__(self, store=None, split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if split != "test":
            raise ValueError(f"HumanEval has only a test split, got {split!r}")
        self.split = split
        self.rows = load_rows(store, "humaneval", ["openai_humaneval/test-*.parquet", "*.parquet", "*.jsonl"], "humaneval")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}{row['canonical_solution']}"},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, completion):
        return int(execute_code(build_program(conversation, completion), timeout=self.timeout).success)
