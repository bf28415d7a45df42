"""Task conversations -> training batches for mid_train and chat_sft.

    tasks = build_mixture("synthetic_mc,synthetic_chat*2,gsm8k:4000", store, split="train")
    mid = PackedConversations(tokenizer, tasks, batch_size=32, seq_len=2048, rank=r, world_size=w)
    sft = PaddedConversations(tokenizer, tasks, batch_size=4, max_seq_len=2048, rank=r, world_size=w)
    x, y = next(mid)                      # (B, T) long tensors; y == -1 is not trained

Both are endless, deterministic iterators of (inputs, targets) with state_dict()/load_state_dict()
for exact resume (what nanochat.training.train needs). Ranks read disjoint conversations.

- PackedConversations (midtraining): conversations rendered with the chat format and concatenated
  (each starts with <|bos|>) into one token stream cut into full (B, T) rows, like pretraining.
  By default every token is trained, as nanochat's midtraining does: it is continued pretraining
  on the chat format, so the model must also read user turns and special tokens, and more trained
  tokens per step means more signal. loss_tokens="assistant" masks everything but the assistant's
  text and tool calls instead.
- PaddedConversations (SFT): one conversation per row with its loss mask (only assistant text and
  tool calls are trained), padded to the longest row of the batch; shuffled anew each epoch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from nanochat.tasks import TaskMixture, TaskSequence, canonical_name, get_task

# name[@split][:N][*k], e.g. "mmlu@test:5200", "identity*2", "simple_spelling:200000"
SPEC_RE = re.compile(r"^(?P<name>[A-Za-z][\w\-]*)(?:@(?P<split>[A-Za-z_]+))?(?::(?P<count>\d+))?(?:\*(?P<repeat>\d+))?$")


# ----------------------------------------------------------------------------- task mixtures

@dataclass(frozen=True)
class TaskSpec:
    name: str
    split: str | None = None   # None: the mixture's default split
    count: int | None = None   # exactly N examples (generated tasks: generated at size N; datasets: cut or cycled)
    repeat: int = 1            # the task listed k times (k epochs of it per mixture epoch)

    def __str__(self):
        return (self.name + (f"@{self.split}" if self.split else "") + (f":{self.count}" if self.count is not None else "")
                + (f"*{self.repeat}" if self.repeat != 1 else ""))


def parse_tasks(spec: str) -> list[TaskSpec]:
    """Parse a comma list of name[@split][:N][*k]; raises ValueError naming the bad item."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("empty task list")
    out = []
    for item in items:
        m = SPEC_RE.match(item)
        if m is None:
            raise ValueError(f"bad task item {item!r}: expected name[@split][:N][*k], e.g. gsm8k, mmlu@test:5200, identity*2")
        try:
            name = canonical_name(m["name"])
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        count, repeat = m["count"], m["repeat"]
        if (count is not None and int(count) < 1) or (repeat is not None and int(repeat) < 1):
            raise ValueError(f"bad task item {item!r}: N and k must be >= 1")
        out.append(TaskSpec(name, m["split"], int(count) if count else None, int(repeat) if repeat else 1))
    return out


def build_task(spec: TaskSpec, store=None, split: str = "train"):
    task = get_task(spec.name, store=store, split=spec.split or split)
    n = spec.count
    if n is not None:
        if hasattr(task, "size"):  # a generator of examples: make exactly n
            task = get_task(spec.name, store=store, split=spec.split or split, size=n)
        elif n <= len(task):
            task = task[:n]
        else:  # oversample a small dataset by cycling through it
            task = TaskSequence([task] * math.ceil(n / len(task)))[:n]
    return task


def build_mixture(spec: str, store=None, split: str = "train", seed: int = 42) -> TaskMixture:
    """A shuffled TaskMixture from a task spec string (see parse_tasks). `mixture.summary` maps each
    item of the spec to its number of examples (repeats included), for logs and the report."""
    tasks, summary = [], {}
    for s in parse_tasks(spec):
        task = build_task(s, store, split)
        tasks.extend([task] * s.repeat)
        label = str(TaskSpec(s.name, s.split or split))
        summary[label] = summary.get(label, 0) + len(task) * s.repeat
    mixture = TaskMixture(tasks, seed=seed)
    mixture.summary = summary
    return mixture


def describe(mixture: TaskMixture) -> str:
    """'synthetic_mc@train: 5,000, gsm8k@train: 7,473' (one line for logs and the report)."""
    return ", ".join(f"{k}: {v:,}" for k, v in getattr(mixture, "summary", {}).items()) or f"{len(mixture):,} conversations"


# ----------------------------------------------------------------------------- batches

def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _targets(ids: list[int], mask: list[int], train_all: bool) -> list[int]:
    """Next-token targets for ids[:-1]: ids[1:], with -1 where the mask says "not trained"."""
    if train_all:
        return ids[1:]
    return [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


class PackedConversations:
    """Midtraining stream: rendered conversations concatenated and cut into full (B, T) rows.

    The mixture is read as an endless sequence of epochs; global position p (example p % len, epoch
    p // len) belongs to rank p % world_size, so ranks never share a conversation."""

    def __init__(self, tokenizer, task, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device="cpu", loss_tokens: str = "all", max_conversation_tokens: int = 2048):
        if len(task) == 0:
            raise ValueError("PackedConversations needs a non-empty task")
        if loss_tokens not in ("all", "assistant"):
            raise ValueError(f"loss_tokens must be 'all' or 'assistant', got {loss_tokens!r}")
        self.tokenizer, self.task = tokenizer, task
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        self.train_all = loss_tokens == "all"
        self.max_conversation_tokens = max_conversation_tokens
        self.position = rank  # next global position this rank renders
        self.ids: list[int] = []
        self.mask: list[int] = []

    @property
    def epoch(self) -> float:
        """Fraction of mixture epochs consumed (all ranks together)."""
        return self.position / len(self.task)

    def __iter__(self):
        return self

    def __next__(self):
        need = self.batch_size * self.seq_len + 1
        while True:
            while len(self.ids) < need:
                conversation = self.task[self.position % len(self.task)]
                ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=self.max_conversation_tokens)
                self.ids.extend(ids)
                self.mask.extend(mask)
                self.position += self.world_size
            ids, mask = self.ids[:need], self.mask[:need]
            del self.ids[:need], self.mask[:need]
            targets = _targets(ids, mask, self.train_all)
            if self.train_all or any(t >= 0 for t in targets):  # a batch with nothing to train has a NaN mean loss
                break
        x = torch.tensor(ids[:-1], dtype=torch.long).view(self.batch_size, self.seq_len)
        y = torch.tensor(targets, dtype=torch.long).view(self.batch_size, self.seq_len)
        return _to_device(x, self.device), _to_device(y, self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "ids": list(self.ids), "mask": list(self.mask), "world_size": self.world_size}

    def load_state_dict(self, state: dict):
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"data state was saved with world_size {state['world_size']}, this run has {self.world_size}")
        self.position, self.ids, self.mask = state["position"], list(state["ids"]), list(state["mask"])


class PaddedConversations:
    """SFT batches: one conversation per row, targets -1 where the loss mask is 0 and on padding,
    rows padded to the longest in the batch. Each epoch visits the examples in a fresh seeded order;
    rank r takes every world_size-th of them (the last len % world_size are skipped that epoch).
    Conversations with nothing to train (e.g. cut before the assistant speaks) are skipped."""

    def __init__(self, tokenizer, task, batch_size: int, max_seq_len: int, rank: int = 0, world_size: int = 1,
                 device="cpu", seed: int = 42, shuffle: bool = True):
        if len(task) < world_size:
            raise ValueError(f"PaddedConversations needs at least {world_size} examples (one per rank), got {len(task)}")
        self.tokenizer, self.task = tokenizer, task
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        self.seed, self.shuffle = seed, shuffle
        self.pad_id = tokenizer.get_bos_token_id()  # any id works: padded targets are -1
        self.per_rank = len(task) // world_size
        self.epoch, self.pos = 0, 0  # pos: index into this rank's share of the epoch
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.task)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_example(self) -> tuple[list[int], list[int]]:
        for _ in range(len(self.task) + 1):
            if self.pos >= self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
            index = int(self.order(self.epoch)[self.pos * self.world_size + self.rank])
            self.pos += 1
            ids, mask = self.tokenizer.render_conversation(self.task[index], max_tokens=self.max_seq_len + 1)
            if any(mask[1:]):
                return ids, mask
        raise ValueError("no conversation in the task has an assistant token to train on")

    def __iter__(self):
        return self

    def __next__(self):
        return collate([self.next_example() for _ in range(self.batch_size)], self.pad_id, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "world_size": self.world_size}

    def load_state_dict(self, state: dict):
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"data state was saved with world_size {state['world_size']}, this run has {self.world_size}")
        self.epoch, self.pos = state["epoch"], state["pos"]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device="cpu"):
    """(ids, mask) rows -> (inputs, targets) of shape (B, longest - 1); padding has target -1."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        y[i, :n] = torch.tensor(_targets(ids, mask, train_all=False), dtype=torch.long)
    return _to_device(x, device), _to_device(y, device)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_loss(model, batches) -> float:
    """Mean cross-entropy per trained target (target >= 0) over all batches and all ranks."""
    total = None
    for x, y in batches:
        loss = model(x, y, loss_reduction="sum").double()
        part = torch.stack([loss, (y >= 0).sum().double()])
        total = part if total is None else total + part
    if total is None:
        raise ValueError("evaluate_loss got no batches")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")
