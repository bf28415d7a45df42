"""
Chat evaluation: a chat model's accuracy on tasks, ChatCORE, pass@k (used by chat_eval, chat_rl
and anyone who wants task accuracy during training).

- Categorical tasks (multiple choice) are scored without sampling: one batched forward pass, and
  at the answer position (the last prompt token, <|assistant_start|>) the logits restricted to the
  answer letters pick the prediction. A model cannot miss by formatting, only by knowledge.
- Generative tasks sample completions with the Engine (calculator calls executed) and grade them
  with task.evaluate; a problem passes if any of its samples is correct (pass@num_samples). Problems
  decode together, GENERATE_ROWS rows at a time (nanochat.batching), each with its own seed: the
  completions are those each would get alone.

Under torch.distributed every rank takes every world_size-th problem and the counts are summed,
so the numbers do not depend on the number of ranks (sampling seeds depend on the problem only).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from nanochat.batching import batchable
from nanochat.engine import Engine
from nanochat.gpt import logits_at

GENERATE_ROWS = 16  # completions decoded together by generative tasks (chat_eval --generate-rows); 1 = one at a time


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (float64: exact for counts)."""
    _, world = dist_info()
    if world == 1:
        return list(values)
    device = device if torch.device(device).type == "cuda" else "cpu"  # gloo reduces CPU tensors
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def num_problems(task, max_problems: int | None = None) -> int:
    n = len(task)
    return n if max_problems is None or max_problems < 0 else min(n, max_problems)


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect: (acc - baseline) / (1 - baseline)."""
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(results: dict[str, dict]) -> float:
    """ChatCORE: the mean centered accuracy over the evaluated tasks ({name: {"accuracy", "baseline"}})."""
    if not results:
        return float("nan")
    return sum(centered_accuracy(r["accuracy"], r["baseline"]) for r in results.values()) / len(results)


def letter_token_ids(tokenizer, letters, cache: dict | None = None) -> list[int]:
    """The token the assistant's answer starts with for each letter. render_conversation encodes the
    assistant text on its own right after <|assistant_start|>, so that is encode(letter)[0]."""
    cache = {} if cache is None else cache
    ids = []
    for letter in letters:
        if letter not in cache:
            cache[letter] = tokenizer.encode(letter)[0]
        ids.append(cache[letter])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer letters {list(letters)} do not start with distinct tokens: {ids}")
    return ids


@torch.no_grad()
def categorical_outcomes(task, tokenizer, model, indices, batch_size: int = 8, progress=None) -> list[int]:
    """0/1 per problem: the letter with the highest logit at the answer position is the answer."""
    device = model.get_device()
    pad = tokenizer.get_bos_token_id()  # after the answer position: causal attention never sees it
    outcomes, cache = [], {}
    for b in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        x = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        at = torch.zeros_like(x, dtype=torch.bool)
        at[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])] = True
        logits = logits_at(model, x, at)  # (B, vocab): each row's answer position only
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            ids = letter_token_ids(tokenizer, letters, cache)
            choice = logits[row, ids].argmax().item()
            outcomes.append(int(task.evaluate(conversation, letters[choice])))
        if progress is not None:
            progress(len(conversations))
    return outcomes


@torch.no_grad()
def generative_outcomes(task, tokenizer, engine: Engine, indices, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, seed: int = 0, progress=None,
                        rows: int = GENERATE_ROWS):
    """Yield, per problem (in order), the 0/1 outcome of each of its num_samples completions. Problem i samples with
    seed + i; with rows > 1 (and a nanochat GPT) the problems decode together in a continuous batch of that many rows,
    each the same completions as alone."""
    problems = [(i, task[i]) for i in indices]
    prompts = [tokenizer.render_for_completion(conversation) for _, conversation in problems]
    sampling = dict(num_samples=num_samples, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None)
    if rows > 1 and problems and batchable(engine):
        streams = batched_streams(engine, [(p, dict(sampling, seed=seed + i)) for (i, _), p in zip(problems, prompts)],
                                  max(1, rows // num_samples), max(rows, num_samples))
    else:
        streams = (engine.generate(p, seed=seed + i, **sampling) for (i, _), p in zip(problems, prompts))
    for (_, conversation), prompt, stream in zip(problems, prompts, streams):
        sequences, _ = engine.collect(stream, prompt, num_samples)
        yield [int(task.evaluate(conversation, tokenizer.decode(seq[len(prompt):]))) for seq in sequences]
        if progress is not None:
            progress(1)


def batched_streams(engine: Engine, requests, in_flight: int, rows: int):
    """Yield each request's stream, in order, from the engine's Batcher (Engine.batcher: kept for the next call) that
    keeps `in_flight` of them decoding at once: the next request joins as the caller finishes reading one."""
    batcher = engine.batcher(rows, max(len(p) + kw["max_tokens"] for p, kw in requests))
    pending, window = iter(requests), deque()
    try:
        while True:
            while len(window) < in_flight and (request := next(pending, None)) is not None:
                window.append(batcher.generate(request[0], **request[1]))
            if not window:
                return
            yield window.popleft()
    finally:
        for stream in window:
            stream.close()


def pass_at_k(outcomes: list[list[int]], k: int) -> int:
    """How many problems have a correct completion among their first k samples."""
    return sum(1 for o in outcomes if any(o[:k]))


def evaluate_task(task, tokenizer, model, engine: Engine | None = None, max_problems: int | None = None,
                  batch_size: int = 8, num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0,
                  top_k: int | None = 50, seed: int = 0, progress=None, rows: int = GENERATE_ROWS) -> dict:
    """Accuracy of the model on the first max_problems problems of a task, combined over all ranks:
    {"accuracy", "passed", "total", "baseline", "centered"}."""
    rank, world = dist_info()
    model = getattr(model, "_orig_mod", model)  # eager: eval shapes vary, a torch.compile'd model would recompile
    indices = list(range(rank, num_problems(task, max_problems), world))
    if task.eval_type == "categorical":
        outcomes = categorical_outcomes(task, tokenizer, model, indices, batch_size, progress)
    else:
        engine = engine or Engine(model, tokenizer)
        outcomes = [int(any(o)) for o in generative_outcomes(task, tokenizer, engine, indices, num_samples, max_new_tokens,
                                                             temperature, top_k, seed, progress, rows)]
    passed, total = all_reduce_sum([sum(outcomes), len(outcomes)], model.get_device())
    accuracy = passed / total if total else 0.0
    return {"accuracy": accuracy, "passed": int(passed), "total": int(total), "baseline": task.baseline,
            "centered": centered_accuracy(accuracy, task.baseline)}
