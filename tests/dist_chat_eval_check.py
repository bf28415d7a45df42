"""A scripted "oracle" chat model for chat_eval tests, and a worker that runs the chat_eval stage with it.

    python tests/dist_chat_eval_check.py STORE_URI [stage flags]                                   1 process
    torchrun --standalone --nproc_per_node=2 tests/dist_chat_eval_check.py STORE_URI [stage flags]  2 ranks (gloo)

The scripted model answers problem i of each task correctly unless i % 3 == 0 (see `is_correct`),
so the exact accuracies are known in advance (`expected_results`). It implements the model
interface the Engine and the evaluators use (forward with/without a KV cache, new_kv_cache,
get_device), looks the prompt up in its script and emits the scripted next token:

- multiple choice: the right (or a wrong) letter, with an even larger logit on a non-letter token,
  so only an evaluator that restricts the logits to the letters gets the expected accuracy;
- tool tasks (arithmetic, spelling): the reference calculator call, then "#### " followed by a copy
  of whatever the tool printed: correct only if the Engine really executes the call; multiple choice
  with the choice tool: the reference `choice(...)` call, then a copy of the letter the tool printed;
- other generative tasks: the reference text (or a wrong one).
"""
from __future__ import annotations

import sys

import torch

HIGH, HIGHER = 10.0, 20.0


def is_correct(index: int) -> bool:
    return index % 3 != 0


class ScriptCache:
    """Stands in for a KVCache: it just remembers each row's tokens."""

    def __init__(self, rows):
        self.rows = rows

    def replicate(self, n):
        assert len(self.rows) == 1
        return ScriptCache([list(self.rows[0]) for _ in range(n)])


class ScriptedModel:
    def __init__(self, tokenizer, vocab_size):
        self.tok, self.vocab_size = tokenizer, vocab_size
        self.scripts = {}  # prompt tuple -> callable(generated tokens) -> {token: logit}
        self.prompt_lengths = set()
        self.calls = 0

    def get_device(self):
        return torch.device("cpu")

    def eval(self):
        return self

    def new_kv_cache(self, batch_size, max_len=None):
        return ScriptCache([[] for _ in range(batch_size)])

    def add(self, prompt, script):
        self.scripts[tuple(prompt)] = script
        self.prompt_lengths.add(len(prompt))

    def _next(self, history):
        for n in sorted(self.prompt_lengths, reverse=True):
            script = self.scripts.get(tuple(history[:n])) if len(history) >= n else None
            if script is not None:
                return script(history[n:])
        return {}

    def __call__(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        assert targets is None
        self.calls += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            new = idx[b].tolist()
            if kv_cache is not None:
                kv_cache.rows[b].extend(new)
                history = kv_cache.rows[b]
            else:
                history = new
            offset = len(history) - T
            for t in range(T):
                for token, value in self._next(history[:offset + t + 1]).items():
                    logits[b, t, token] = value
        return logits


def mc_script(tokenizer, conversation, correct):
    letters = conversation["letters"]
    answer = conversation["messages"][-1]["content"]
    letter = answer if correct else letters[(letters.index(answer) + 1) % len(letters)]
    distractor = tokenizer.encode("Z")[0]  # not a letter of the choices: must be ignored

    def script(generated):
        if generated:
            return {tokenizer.encode_special("<|assistant_end|>"): HIGH}
        return {tokenizer.encode(letter)[0]: HIGH, distractor: HIGHER}
    return script


def tool_script(tokenizer, conversation, correct):
    """Write the reference's last tool call (its result is the final answer), then '#### ' + the tool's
    printed output (just the output after a `choice` call: the answer is the letter)."""
    special = tokenizer.encode_special
    call = [p["text"] for p in conversation["messages"][-1]["content"] if p["type"] == "python"][-1]
    if not correct:
        call = f"({call})+1"
    head = [special("<|python_start|>"), *tokenizer.encode(call), special("<|python_end|>")]
    out_start, out_end = special("<|output_start|>"), special("<|output_end|>")

    def script(generated):
        if len(generated) < len(head):
            return {head[len(generated)]: HIGH}
        if out_end not in generated:
            return {}  # the Engine forces the tool output here: the logits do not matter
        output = generated[generated.index(out_start) + 1:generated.index(out_end)]
        prefix = [] if call.startswith(("choice(", "(choice(")) else tokenizer.encode("\n#### ")
        tail = prefix + output + [special("<|assistant_end|>")]
        written = len(generated) - generated.index(out_end) - 1
        return {tail[min(written, len(tail) - 1)]: HIGH}
    return script


def text_script(tokenizer, conversation, correct):
    content = conversation["messages"][-1]["content"]
    text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    tail = tokenizer.encode(text if correct else "I do not know.") + [tokenizer.encode_special("<|assistant_end|>")]

    def script(generated):
        return {tail[min(len(generated), len(tail) - 1)]: HIGH}
    return script


def has_tool_call(conversation) -> bool:
    content = conversation["messages"][-1]["content"]
    return isinstance(content, list) and any(p["type"] == "python" for p in content)


def build_model(tokenizer, tasks: dict, max_problems: int) -> ScriptedModel:
    """tasks: {name: Task}. Registers a script for the first max_problems problems of each task."""
    model = ScriptedModel(tokenizer, tokenizer.get_vocab_size())
    for task in tasks.values():
        for i in range(min(len(task), max_problems)):
            conversation = task[i]
            maker = mc_script if task.eval_type == "categorical" else tool_script if has_tool_call(conversation) else text_script
            model.add(tokenizer.render_for_completion(conversation), maker(tokenizer, conversation, is_correct(i)))
    return model


def expected_results(tasks: dict, max_problems: int) -> dict:
    out = {}
    for name, task in tasks.items():
        n = min(len(task), max_problems)
        acc = sum(is_correct(i) for i in range(n)) / n
        out[name] = {"accuracy": acc, "baseline": task.baseline, "total": n}
    return out


def main(store_uri, flags):
    """Run the chat_eval stage with the scripted model in place of the checkpoint."""
    from nanochat import checkpoint
    from nanochat.stages import chat_eval
    from nanochat.store import open_store
    from nanochat.tokenizer import get_tokenizer

    store = open_store(store_uri)
    cfg_flags = dict(f[2:].split("=", 1) for f in flags if f.startswith("--") and "=" in f)
    max_problems = int(cfg_flags.get("max-problems", 10))
    names = chat_eval.task_names(cfg_flags["tasks"])
    tasks = {n: chat_eval.load_task(n, store, cfg_flags.get("split", "test")) for n in names}
    model = build_model(get_tokenizer(store), tasks, max_problems)
    real = checkpoint.load_model
    checkpoint.load_model = lambda store, source, device="cpu", step=None, dtype=None: (model, 7, {})
    try:
        return chat_eval.main([f"--store={store_uri}", *flags])
    finally:
        checkpoint.load_model = real  # (the tests call main() in-process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
