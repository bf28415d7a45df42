"""Evaluate a chat model on tasks and compute ChatCORE (the mean centered accuracy), like nanochat's
chat_eval: multiple-choice tasks by the answer letter's logit, generative tasks by sampling with
the calculator and grading. One run per model source: stages/chat_eval_<source>/.

    nanochat stage chat_eval --source=sft -a 'ARC-Easy|GSM8K' --max-problems=100
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, opt
from nanochat.stage import MissingInput, stage_main

STAGE = "chat_eval"
SOURCES = ["base", "mid", "sft", "rl"]
DEFAULT_TASKS = "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee"  # nanochat's ChatCORE set
SHORT_FLAGS = {"-i": "--source", "-a": "--tasks"}  # nanochat's spelling


@dataclass
class Config(StageConfig):
    source: str = opt("sft", "model to evaluate (-i): base, mid, sft, rl = checkpoints of base_train, mid_train, chat_sft, chat_rl", choices=SOURCES)
    step: int = opt(-1, "checkpoint step (-1 = latest)")
    tasks: str = opt(DEFAULT_TASKS, "tasks to evaluate (-a), separated by | or ,")
    split: str = opt("test", "task split to evaluate on")
    max_problems: int = opt(-1, "problems per task, the first N (-1 = all)")
    batch_size: int = opt(8, "prompts per forward pass for multiple-choice tasks")
    num_samples: int = opt(1, "completions per problem for generative tasks (a problem passes if any is correct)")
    max_new_tokens: int = opt(512, "token budget per completion")
    temperature: float = opt(0.0, "sampling temperature for generative tasks (0 = greedy)")
    top_k: int = opt(50, "sample from the k most likely tokens (0 = all)")
    generate_rows: int = opt(16, "generative tasks: completions decoded together, each problem with its own seed "
                                 "(continuous batching; 1 = one problem at a time)")

    def validate(self):
        for key in ("batch_size", "num_samples", "max_new_tokens", "generate_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.temperature < 0 or self.top_k < 0:
            raise ConfigError("--temperature and --top-k must be >= 0")
        task_names(self.tasks)

    def instance_name(self, stage):
        return f"{stage}_{self.source}"


def task_names(spec: str) -> list[str]:
    """'ARC-Easy|GSM8K' or 'arc_easy,gsm8k' -> names as written; unknown names are a ConfigError."""
    from nanochat.tasks import canonical_name
    names = [n.strip() for n in re.split(r"[|,]", spec) if n.strip()]
    if not names:
        raise ConfigError("--tasks: no task given")
    for name in names:
        try:
            canonical_name(name)
        except KeyError as e:
            raise ConfigError(f"--tasks: {e.args[0]}") from None
    if len({canonical_name(n) for n in names}) != len(names):
        raise ConfigError(f"--tasks: a task is listed twice in {spec!r}")
    return names


def load_task(name: str, store, split: str):
    from nanochat.tasks import TaskDataMissing, get_task
    try:
        return get_task(name, store=store, split=split)
    except TaskDataMissing as e:
        raise MissingInput(str(e)) from None
    except ValueError as e:  # e.g. a split the task does not have
        raise ConfigError(f"--split {split!r} for task {name}: {e}") from None


def run(ctx):
    from nanochat.chat_eval_lib import chatcore, evaluate_task, num_problems
    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer

    cfg = ctx.cfg
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    tokenizer = get_tokenizer(ctx.store)
    names = task_names(cfg.tasks)
    tasks = {name: load_task(name, ctx.store, cfg.split) for name in names}  # fail on missing data before any work
    model, step, _ = load_model(ctx.store, cfg.source, ctx.device, None if cfg.step < 0 else cfg.step, dtype=ctx.dtype)
    engine = Engine(model, tokenizer)
    ctx.log(f"evaluating {cfg.source} (checkpoint step {step}) on {', '.join(names)}")

    results = {}
    for i, (name, task) in enumerate(tasks.items()):
        bar = ctx.progress(total=len(range(ctx.rank, num_problems(task, cfg.max_problems), ctx.world_size)), desc=name)
        results[name] = evaluate_task(task, tokenizer, model, engine, max_problems=cfg.max_problems, batch_size=cfg.batch_size,
                                      num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_k=cfg.top_k, seed=cfg.seed, progress=bar.update, rows=cfg.generate_rows)
        bar.close()
        r = results[name]
        ctx.log(f"{name}: accuracy {r['accuracy']:.4f} ({r['passed']}/{r['total']}), centered {r['centered']:.4f}")
        ctx.log_metrics(i + 1, total=len(tasks), **{f"accuracy_{name}": r["accuracy"]})
    score = chatcore(results)
    ctx.log(f"ChatCORE: {score:.4f}")

    table = [{"task": name, "accuracy": r["accuracy"], "centered": r["centered"], "baseline": r["baseline"], "n": r["total"]}
             for name, r in results.items()]
    table.append({"task": "ChatCORE", "centered": score})
    settings = {"checkpoint": f"{cfg.source} step {step}", "split": cfg.split,
                "max problems per task": cfg.max_problems if cfg.max_problems >= 0 else "all",
                "sampling": f"{cfg.num_samples} sample(s), temperature {cfg.temperature}, top-k {cfg.top_k}, {cfg.max_new_tokens} new tokens"}
    ctx.section(f"Chat evaluation: {cfg.source}", [settings, table])
    ctx.card(cfg.source.upper(), **{name: r["accuracy"] for name, r in results.items()}, ChatCORE=score)
    return {**{name: r["accuracy"] for name, r in results.items()}, "ChatCORE": score, "checkpoint_step": step,
            "tasks": results}


def expand_short_flags(argv):
    """-i sft / -a 'ARC-Easy|GSM8K' (nanochat's flags) -> --source=sft / --tasks=..."""
    out, argv = [], list(argv)
    while argv:
        a = argv.pop(0)
        if a in SHORT_FLAGS and argv:
            out.append(f"{SHORT_FLAGS[a]}={argv.pop(0)}")
        elif a[:2] in SHORT_FLAGS and len(a) > 2:
            out.append(f"{SHORT_FLAGS[a[:2]]}={a[2:].lstrip('=')}")
        else:
            out.append(a)
    return out


def main(argv=None):
    return stage_main(STAGE, Config, run, expand_short_flags(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
