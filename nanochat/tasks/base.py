"""
The task framework: a Task is a dataset of conversations plus, optionally, a way to grade them.

Conversations follow docs/CONVENTIONS.md: {"messages": [{"role", "content"}, ...]} where an
assistant's content is a string or a list of parts (text / python / python_output).
Multiple-choice tasks add conversation["letters"].

Tasks are lightweight views: `task[10:50:2]` (or Task(start=, stop=, step=)) is another Task over
the same data, and TaskMixture / TaskSequence combine tasks for training.
"""
from __future__ import annotations

import bisect
import re

import numpy as np

LETTERS = ("A", "B", "C", "D")

# GSM8K's official answer marker: the final answer follows "#### "
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


class Task:
    """Base class. Subclasses implement num_examples() and get_example(i); graded tasks
    also set eval_type and implement evaluate()."""

    eval_type = "generative"  # "generative" (sample then grade) | "categorical" (pick a letter)
    baseline = 0.0            # accuracy of random guessing, for centering (ChatCORE)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        return type(self).__name__

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil division

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TaskSlice(self, *index.indices(len(self)))
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"task index must be an int or a slice, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} with {n} examples")
        return self.get_example(self.start + int(index) * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion (the assistant's text) answers the conversation correctly, else 0."""
        raise NotImplementedError(f"{self.name} has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward; by default the 0/1 evaluation."""
        return float(self.evaluate(conversation, completion))

    def __repr__(self):
        return f"{self.name}(len={len(self)})"


class TaskSlice(Task):
    """A start:stop:step view of another task (what task[a:b:c] returns)."""

    def __init__(self, task: Task, start: int, stop: int, step: int):
        super().__init__(start, max(start, stop), step)
        self.task = task
        self.eval_type, self.baseline = task.eval_type, task.baseline

    @property
    def name(self):
        return self.task.name

    def num_examples(self):
        return len(self.task)

    def get_example(self, index):
        return self.task[index]

    def evaluate(self, conversation, completion):
        return self.task.evaluate(conversation, completion)

    def reward(self, conversation, completion):
        return self.task.reward(conversation, completion)


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (fixed by seed).
    List a task twice to oversample it."""

    def __init__(self, tasks: list[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        lengths = [len(t) for t in self.tasks]
        # two flat arrays instead of a list of tuples: mixtures of ~1M conversations stay small
        self.task_ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        self.local_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]) if lengths else np.zeros(0, np.int64)
        order = np.random.default_rng(seed).permutation(len(self.task_ids))
        self.task_ids, self.local_ids = self.task_ids[order], self.local_ids[order]

    def num_examples(self):
        return len(self.task_ids)

    def get_example(self, index):
        return self.tasks[self.task_ids[index]][int(self.local_ids[index])]

    def source(self, index: int) -> Task:
        """The task that example `index` of this mixture comes from."""
        return self.tasks[self.task_ids[self.start + index * self.step]]


class TaskSequence(Task):
    """Tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks: list[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tasks]).tolist()

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        task_idx = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[task_idx][index - self.offsets[task_idx]]


# -----------------------------------------------------------------------------
# shared helpers for task implementations

def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt. The letter comes *after* each choice with no space
    before it ("- Paris=A"), meant to make the prompt's letter the answer's token "A"; a tokenizer
    that learned "=A" as one token (the tiny profile's) breaks that, and the letter still binds late."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def evaluate_letter(conversation: dict, completion: str) -> int:
    """The completion's answer is the right letter: the letter itself (categorical grading), or the text
    after the last tool output of a sampled answer (a reply that looked the letter up with `choice`)."""
    content = conversation["messages"][-1]["content"]
    answer = content if isinstance(content, str) else content[-1]["text"]
    pred = completion.rsplit("<|output_end|>", 1)[-1].strip().rstrip(".").strip()
    return int(pred == answer)


def extract_answer(text: str) -> str | None:
    """The number after the '#### ' marker, commas removed (GSM8K's normalization), or None."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def evaluate_final_answer(conversation: dict, completion: str) -> int:
    """Generative grading by final answer: compare the '#### N' of the reference (the last text
    part of the last assistant message) with the completion's."""
    content = conversation["messages"][-1]["content"]
    reference = content if isinstance(content, str) else content[-1]["text"]
    return int(same_number(extract_answer(completion), extract_answer(reference)))


def message_text(content) -> str:
    """Plain text of a message: a string, or parts joined (tool calls shown as <<expr=result>>)."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part["type"] == "python":
            out.append(f"<<{part['text']}=")
        elif part["type"] == "python_output":
            out.append(f"{part['text']}>>")
        else:
            out.append(part["text"])
    return "".join(out)


def conversation_to_text(conversation: dict) -> str:
    """A plain-text rendering (for pretraining documents and previews)."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {message_text(m['content'])}" for m in conversation["messages"])


def check_conversation(conversation: dict) -> None:
    """Raise ValueError unless the conversation has the agreed shape: an optional system
    message, then user/assistant alternating, starting with user; parts only in assistant turns."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages:
        raise ValueError("conversation has no messages")
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            raise ValueError("system content must be a string")
        messages = messages[1:]
    if len(messages) < 1:
        raise ValueError("conversation has no user message")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"message {i} has role {message.get('role')!r}, expected {expected!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if expected == "user" or not isinstance(content, list):
            raise ValueError(f"message {i}: content must be a string{'' if expected == 'user' else ' or a list of parts'}")
        for part in content:
            if part.get("type") not in ("text", "python", "python_output") or not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}: bad part {part!r}")
