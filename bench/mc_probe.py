"""Multiple choice on a small model, per chat checkpoint of a run: the bare letter, and the choice tool by kind.

    python bench/mc_probe.py [--store URI] [--sources base,mid,sft,rl] [--problems 200]

Per checkpoint, four teacher-forced numbers (no sampling), for why the bare letter stays at chance:
- mc: held-out synthetic_mc_letter accuracy, argmax over the four letters (the bare letter, no choice tool);
- lookup: held-out synthetic_mc_drill, whose question names the right option ("Which option is coffee?").
  The only skill left is binding an option to its letter, an in-context lookup;
- top letter: the share of mc questions answered with the model's most frequent letter (1.0 = one letter for all);
- copy: next-token accuracy on the second copy of a repeated list of 20 random words. A model that copies
  from context gets this near 1.0; it is an upper bound on lookup (a fixed offset also solves it).
Then held-out synthetic_mc answered greedily through the Engine (the choice tool runs), by kind of question.
"""
from __future__ import annotations

import argparse
import collections
import random

import torch

from nanochat.checkpoint import load_model
from nanochat.chat_eval_lib import letter_token_ids
from nanochat.engine import Engine
from nanochat.store import ObjectNotFound, default_store_uri, open_store
from nanochat.tasks import get_task
from nanochat.tasks.synthetic import WORDS
from nanochat.tokenizer import get_tokenizer


@torch.no_grad()
def letter_answers(model, tokenizer, task, n: int) -> tuple[float, float]:
    """(accuracy, share of the most frequent predicted letter) over the first n problems."""
    hits, letters = 0, collections.Counter()
    for i in range(n):
        conversation = task[i]
        # the drill's 8 turns outrun the trained context; the last turn repeats all options, so keep the end
        prompt = tokenizer.render_for_completion(conversation)[-model.config.sequence_len:]
        ids = letter_token_ids(tokenizer, conversation["letters"])
        letter = conversation["letters"][model(torch.tensor([prompt]))[0, -1, ids].argmax().item()]
        hits += letter == conversation["messages"][-1]["content"]
        letters[letter] += 1
    return hits / n, letters.most_common(1)[0][1] / n


@torch.no_grad()
def copy_accuracy(model, tokenizer, rows: int = 16, words: int = 20) -> float:
    lists = [tokenizer.encode(" " + " ".join(random.Random(i).sample(WORDS, words))) for i in range(rows)]
    n = min(map(len, lists))
    x = torch.tensor([[tokenizer.get_bos_token_id()] + ids[:n] + ids[:n] for ids in lists])
    predicted = model(x[:, :-1]).argmax(-1)
    return (predicted == x[:, 1:])[:, n + 1:].float().mean().item()


KINDS = {"largest": "largest", "smallest": "smallest", "+": "sum", "of these": "category", "opposite": "opposite"}


def kind_of(conversation) -> str:
    question = conversation["messages"][0]["content"].splitlines()[0]
    return next(kind for marker, kind in KINDS.items() if marker in question)


def tool_answers(model, tokenizer, task, n: int) -> dict[str, float]:
    """Greedy accuracy with the choice tool, per kind of question and over all ("all")."""
    engine, hits = Engine(model, tokenizer), collections.defaultdict(list)
    for i in range(n):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        (sequence,), _ = engine.generate_batch(prompt, max_tokens=48, temperature=0.0)
        correct = task.evaluate(conversation, tokenizer.decode(sequence[len(prompt):]))
        hits[kind_of(conversation)].append(correct)
        hits["all"].append(correct)
    return {kind: sum(h) / len(h) for kind, h in hits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="run store (default: the default run's)")
    parser.add_argument("--sources", default="base,mid,sft,rl", help="checkpoints to probe, comma list")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems per task")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    store = open_store(args.store or default_store_uri())
    tokenizer = get_tokenizer(store)
    mc, drill = get_task("synthetic_mc_letter", split="val"), get_task("synthetic_mc_drill", split="val")
    print(f"store {store.uri('')}, {args.problems} held-out problems per task, chance 0.25\n")
    print("| checkpoint | step | mc | lookup | top letter | copy |\n|---|---|---|---|---|---|")
    models = {}
    for source in args.sources.split(","):
        try:
            model, step, _ = load_model(store, source, "cpu")
        except ObjectNotFound:
            print(f"| {source} | (no checkpoint) | | | | |")
            continue
        models[source] = model.eval()
        mc_acc, top = letter_answers(model, tokenizer, mc, args.problems)
        lookup, _ = letter_answers(model, tokenizer, drill, args.problems)
        print(f"| {source} | {step} | {mc_acc:.2f} | {lookup:.2f} | {top:.2f} | {copy_accuracy(model, tokenizer):.2f} |", flush=True)
    kinds = [*dict.fromkeys(KINDS.values()), "all"]
    print(f"\nwith the choice tool (greedy):\n\n| checkpoint | {' | '.join(kinds)} |\n|---|{'---|' * len(kinds)}")
    for source, model in models.items():
        accuracy = tool_answers(model, tokenizer, get_task("synthetic_mc", split="val"), args.problems)
        print(f"| {source} | " + " | ".join(f"{accuracy.get(k, float('nan')):.2f}" for k in kinds) + " |", flush=True)


if __name__ == "__main__":
    main()
