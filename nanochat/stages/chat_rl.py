"""Reinforcement learning on GSM8K-format problems, as nanochat's chat_rl: on-policy policy gradient.

Each step takes --examples-per-step problems (split across ranks), samples --num-samples
completions per problem with the Engine (calculator calls executed), rewards each by its final
answer, and uses reward minus the group's mean reward as the advantage (no std normalisation, no
KL, no ratio clipping: plain REINFORCE with a per-group baseline). The loss is -advantage ·
log-prob summed over the tokens the policy sampled (prompt and forced tool outputs excluded),
divided by the group's token count. Gradients are averaged across ranks by the optimizer.
"""
from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass

import numpy as np

from nanochat.config import ConfigError, StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "chat_rl"


@dataclass
class Config(StageConfig):
    source: str = opt("sft", "model to start from: base, mid, sft, rl (checkpoints of base_train, mid_train, chat_sft, chat_rl)",
                      choices=["base", "mid", "sft", "rl"])
    task: str = opt("gsm8k", "task to train on (its train split); graded by the final '#### N' answer")
    train_examples: int = opt(-1, "train on the first N problems of the train split only (-1 = all)")
    val_split: str = opt("auto", "split for pass@k evaluation (auto: val, or test for tasks without one, like GSM8K)")
    num_epochs: int = opt(1, "passes over the train split (sets the number of steps)")
    num_iterations: int = opt(-1, "optimizer steps (-1: num_epochs × train examples / examples_per_step)")
    examples_per_step: int = opt(16, "problems per step across all ranks (a multiple of the world size)")
    num_samples: int = opt(16, "completions sampled per problem (the group whose mean reward is the baseline)")
    device_batch_size: int = opt(8, "most rows in one sampling group or forward/backward pass")
    generate_rows: int = opt(32, "rows decoded together: the step's sampling groups (and pass@k problems) in one continuous "
                                 "batch, each with its own seed (1 = one group at a time)")
    max_new_tokens: int = opt(256, "token budget per completion")
    temperature: float = opt(1.0, "sampling temperature")
    top_k: int = opt(50, "sample from the k most likely tokens (0 = all)")
    embedding_lr: float = opt(0.2, "AdamW lr for embeddings (times init_lr_frac)")
    unembedding_lr: float = opt(0.004, "AdamW lr for lm_head (times init_lr_frac)")
    matrix_lr: float = opt(0.02, "Muon lr for block matrices (times init_lr_frac)")
    scalar_lr: float = opt(0.5, "AdamW lr for per-layer scalars (times init_lr_frac)")
    weight_decay: float = opt(0.0, "Muon cautious weight decay")
    init_lr_frac: float = opt(0.05, "fraction of the learning rates to start at; decays linearly to 0")
    eval_every: int = opt(60, "steps between pass@k evaluations (0 = only before and after)")
    eval_examples: int = opt(400, "val problems per pass@k evaluation")
    eval_samples: int = opt(8, "samples per val problem: pass@1 .. pass@eval_samples")
    save_every: int = opt(60, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = opt(2, "complete checkpoints kept in the store")
    log_every: int = opt(1, "steps between log lines")

    def check_world_size(self, world_size: int):
        if self.examples_per_step % world_size:
            raise ConfigError(f"--examples-per-step {self.examples_per_step} must be a multiple of the processes ({world_size})")

    def validate(self):
        for key in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "eval_samples", "num_epochs",
                    "generate_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 for on-policy sampling, got {self.temperature}")
        from nanochat.tasks import canonical_name
        try:
            canonical_name(self.task)
        except KeyError as e:
            raise ConfigError(f"--task: {e.args[0]}") from None


class PromptSchedule:
    """Which problems each step trains on: a fresh seeded permutation of the train split per epoch,
    consumed examples_per_step at a time. Its state (steps taken) goes into checkpoints."""

    def __init__(self, num_examples: int, examples_per_step: int, seed: int):
        self.n, self.per_step, self.seed = num_examples, examples_per_step, seed
        self.steps = 0
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[position % self.n])

    def __next__(self) -> list[int]:
        first = self.steps * self.per_step
        self.steps += 1
        return [self._index(p) for p in range(first, first + self.per_step)]

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def sample_seed(*parts) -> int:
    """A sampling seed from (run seed, step, problem, pass): the same whatever the number of ranks."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def sample_groups(engine, groups, cfg):
    """(sequences, masks) per (prompt, num_samples, seed) group, in order: prompt + completion per row, the token that
    ended the row included (stopping is an action the policy takes too); mask 1 = sampled by the policy, 0 = prompt or
    forced tool output. The groups decode together in a continuous batch of cfg.generate_rows rows (nanochat.batching)
    when the model allows, each with its own seed: the same samples as one group at a time."""
    from nanochat.batching import batchable
    from nanochat.chat_eval_lib import batched_streams
    sampling = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    widest = max(n for _, n, _ in groups)
    if cfg.generate_rows > 1 and batchable(engine):
        streams = batched_streams(engine, [(p, dict(sampling, num_samples=n, seed=s)) for p, n, s in groups],
                                  max(1, cfg.generate_rows // widest), max(cfg.generate_rows, widest))
    else:
        streams = (engine.generate(p, n, seed=s, **sampling) for p, n, s in groups)
    return [engine.collect(stream, prompt, n, keep_terminal=True) for stream, (prompt, n, _) in zip(streams, groups)]


def completion_text(tokenizer, sequence, prompt_len, stops) -> str:
    tokens = sequence[prompt_len:]
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def policy_gradient_backward(model, sequences, masks, advantages, pad: int, norm: float, autocast=contextlib.nullcontext):
    """Accumulate the gradient of -Σ advantage·log p(sampled token) / norm for one batch of rows (the forward under
    `autocast`: the stage's ctx.autocast)."""
    import torch
    device = model.get_device()
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    with autocast():
        logp = -model(inputs, targets, loss_reduction="none")  # (B, T); 0 where the target is ignored
    adv = torch.tensor(advantages, dtype=logp.dtype, device=device)
    loss = -(logp * adv[:, None]).sum() / norm
    loss.backward()


def rl_step(model, engine, tokenizer, task, problems: list[int], cfg, step: int, autocast=contextlib.nullcontext) -> dict:
    """Sample, reward and backpropagate (forwards under `autocast`) for this rank's problems; returns sums for the
    step's stats."""
    stops = (engine.assistant_end, engine.bos)
    stats = {"reward_sum": 0.0, "samples": 0, "completion_tokens": 0, "correct_groups": 0}
    prompts = {idx: tokenizer.render_for_completion(task[idx]) for idx in problems}
    chunks = [(idx, b, min(cfg.device_batch_size, cfg.num_samples - b)) for idx in problems
              for b in range(0, cfg.num_samples, cfg.device_batch_size)]
    sampled = iter(sample_groups(engine, [(prompts[idx], n, sample_seed(cfg.seed, step, idx, b)) for idx, b, n in chunks], cfg))
    for idx in problems:
        conversation, prompt = task[idx], prompts[idx]
        sequences, masks = [], []
        for _ in range(0, cfg.num_samples, cfg.device_batch_size):  # the chunks of this problem, in order
            seqs, ms = next(sampled)
            sequences += seqs
            masks += ms
        rewards = [float(task.reward(conversation, completion_text(tokenizer, s, len(prompt), stops))) for s in sequences]
        mean = sum(rewards) / len(rewards)
        advantages = [r - mean for r in rewards]
        stats["reward_sum"] += sum(rewards)
        stats["samples"] += len(rewards)
        stats["completion_tokens"] += sum(len(s) - len(prompt) for s in sequences)
        stats["correct_groups"] += int(max(rewards) > 0)
        if all(a == 0 for a in advantages):
            continue  # every sample scored the same: zero gradient, skip the passes
        # token-normalised per problem; problems weigh equally (the optimizer averages over ranks)
        norm = max(1, sum(sum(m[1:]) for m in masks)) * len(problems)
        for b in range(0, len(sequences), cfg.device_batch_size):
            rows = slice(b, b + cfg.device_batch_size)
            policy_gradient_backward(model, sequences[rows], masks[rows], advantages[rows], engine.assistant_end, norm,
                                     autocast)
    return stats


def evaluate_pass_at_k(model, engine, tokenizer, task, cfg) -> dict:
    """pass@1..k on the first eval_examples val problems (same seeds every time: comparable curves)."""
    from nanochat.chat_eval_lib import all_reduce_sum, dist_info, generative_outcomes, num_problems, pass_at_k
    rank, world = dist_info()
    indices = range(rank, num_problems(task, cfg.eval_examples), world)
    outcomes = list(generative_outcomes(task, tokenizer, engine, indices, num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, rows=cfg.generate_rows))
    counts = all_reduce_sum([len(outcomes)] + [pass_at_k(outcomes, k) for k in range(1, cfg.eval_samples + 1)], model.get_device())
    total = max(counts[0], 1)
    return {f"pass@{k}": counts[k] / total for k in range(1, cfg.eval_samples + 1)}


def val_task(cfg, store):
    from nanochat.tasks import get_task
    if cfg.val_split != "auto":
        return get_task(cfg.task, store=store, split=cfg.val_split)
    try:
        return get_task(cfg.task, store=store, split="val")
    except ValueError:
        return get_task(cfg.task, store=store, split="test")


def evaluated_steps(ctx, upto: int) -> set[int]:
    """Steps whose pass@k is already in the history (a resumed run does not redo them); rank 0 reads
    the store and tells the others, so every rank makes the same evaluation (collective) calls."""
    import torch.distributed as dist
    from nanochat.report import load_history
    steps = [sorted({r["step"] for r in load_history(ctx.store, ctx.name) if "pass@1" in r and r["step"] <= upto})
             if ctx.is_master and upto > 0 else []]
    if ctx.world_size > 1:
        dist.broadcast_object_list(steps, src=0)
    return set(steps[0])


def reward_plot(history: list[dict]) -> bytes | None:
    rows = [(r["step"], r["reward"]) for r in history if "reward" in r]
    if not rows:
        return None
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, rewards = zip(*rows)
    window = max(1, len(rewards) // 10)
    smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, rewards, alpha=0.4, label="mean reward")
    ax.plot(steps[window - 1:], smooth, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(ctx):
    from nanochat.chat_eval_lib import all_reduce_sum
    from nanochat.checkpoint import CheckpointManager, load_model
    from nanochat.common import barrier
    from nanochat.engine import Engine
    from nanochat.optim import set_hyperparams
    from nanochat.stage import StageInterrupted
    from nanochat.tasks import TaskDataMissing, get_task
    from nanochat.tokenizer import get_tokenizer
    from nanochat.training import save, try_resume

    cfg = ctx.cfg
    cfg.check_world_size(ctx.world_size)
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    tokenizer = get_tokenizer(ctx.store)
    try:
        train_task, val = get_task(cfg.task, store=ctx.store, split="train"), val_task(cfg, ctx.store)
        if cfg.train_examples > 0:
            train_task = train_task[:cfg.train_examples]
    except TaskDataMissing as e:
        from nanochat.stage import MissingInput
        raise MissingInput(str(e)) from None
    model, source_step, _ = load_model(ctx.store, cfg.source, ctx.device, dtype=ctx.dtype)
    model.train()
    engine = Engine(model, tokenizer)
    optimizer = model.setup_optimizer(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                                      scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = group["lr"] * cfg.init_lr_frac
    num_steps = cfg.num_iterations if cfg.num_iterations > 0 else max(1, cfg.num_epochs * len(train_task) // cfg.examples_per_step)
    schedule = PromptSchedule(len(train_task), cfg.examples_per_step, cfg.seed)
    ckpt = CheckpointManager(ctx.store, STAGE, keep=cfg.keep_checkpoints)
    meta = {"model_config": model.config.to_dict(), "stage": STAGE, "source": cfg.source, "source_step": source_step, "task": cfg.task}
    start = try_resume(ctx, ckpt, model, optimizer, schedule)
    if start == 0 and ckpt.steps():
        # checkpoints of another config: they must not be mistaken for this run's model (source "rl")
        ctx.log(f"removing checkpoints of another config under {ctx.store.uri(ckpt.prefix)}")
        if ctx.is_master:
            ctx.store.delete_prefix(ckpt.prefix + "/")
        barrier()
    ctx.log(f"RL on {cfg.task} from {cfg.source} (step {source_step}): {num_steps} steps × {cfg.examples_per_step} problems × "
            f"{cfg.num_samples} samples, {len(train_task):,} train / {len(val):,} val problems" + (f", resuming at step {start}" if start else ""))

    evaluated = evaluated_steps(ctx, start)
    last_saved, train_time = start, 0.0

    def evaluate(step):
        model.eval()
        result = evaluate_pass_at_k(model, engine, tokenizer, val, cfg)
        model.train()
        evaluated.add(step)
        ctx.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        ctx.log_metrics(step, total=num_steps, **result)

    step = start
    with ctx.graceful():
        while step < num_steps:
            if (step == 0 or (cfg.eval_every and step % cfg.eval_every == 0)) and step not in evaluated:
                evaluate(step)
            t0 = time.time()
            problems = next(schedule)[ctx.rank::ctx.world_size]
            lrm = 1.0 - step / num_steps
            set_hyperparams(optimizer, lrm)
            stats = rl_step(model, engine, tokenizer, train_task, problems, cfg, step, ctx.autocast)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            reward_sum, samples, tokens, solved = all_reduce_sum([stats["reward_sum"], stats["samples"], stats["completion_tokens"],
                                                                  stats["correct_groups"]], ctx.device)
            dt = time.time() - t0
            step += 1
            train_time += dt
            values = {"reward": reward_sum / samples, "completion_tokens": tokens / samples, "solved_frac": solved / cfg.examples_per_step,
                      "lr_mult": lrm, "tokens_per_sec": tokens / max(dt, 1e-9)}
            ctx.log_metrics(step, total=num_steps, **values)
            if step % cfg.log_every == 0 or step == num_steps:
                ctx.log(f"step {step}/{num_steps} reward {values['reward']:.4f} solved {values['solved_frac']:.2f} "
                        f"completion {values['completion_tokens']:.1f} tok lrm {lrm:.3f} {dt:.1f}s/step eta {(num_steps - step) * dt:.0f}s")
            if cfg.save_every and step % cfg.save_every == 0 and step < num_steps:
                save(ctx, ckpt, step, model, optimizer, schedule, meta)
                last_saved = step
            try:
                ctx.check_stop()
            except StageInterrupted:
                if step != last_saved:
                    save(ctx, ckpt, step, model, optimizer, schedule, meta)
                ctx.log(f"stopped at step {step}; checkpoint saved, re-run to resume")
                raise
    if step not in evaluated:
        evaluate(step)
    if last_saved != step:
        save(ctx, ckpt, step, model, optimizer, schedule, meta)
    ctx.flush_history()
    return report(ctx, cfg, step, source_step, train_time)


def report(ctx, cfg, step, source_step, train_time) -> dict:
    """Metrics, report section (reward curve, pass@k table) and card values, from the step history."""
    from nanochat.report import load_history
    history = load_history(ctx.store, ctx.name) if ctx.is_master else []
    rewards = [r["reward"] for r in history if "reward" in r]
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("pass@")} for r in history if "pass@1" in r]
    tenth = max(1, len(rewards) // 10)
    first = float(np.mean(rewards[:tenth])) if rewards else float("nan")
    last = float(np.mean(rewards[-tenth:])) if rewards else float("nan")
    metrics = {"steps": step, "reward_first": first, "reward_last": last, "train_time_s": round(train_time, 2)}
    if evals:
        metrics.update({f"start_{k}": v for k, v in evals[0].items() if k != "step"})
        metrics.update({k: v for k, v in evals[-1].items() if k != "step"})
    plot = reward_plot(history) if ctx.is_master else None
    ctx.section("Chat RL", [
        {"task": cfg.task, "source": f"{cfg.source} step {source_step}", "steps": step,
         "problems × samples per step": f"{cfg.examples_per_step} × {cfg.num_samples}",
         f"mean reward, first {tenth} step(s)": first, f"mean reward, last {tenth} step(s)": last,
         "train time this run (s)": metrics["train_time_s"]},
        evals,
    ], figures={"chat_rl_reward": plot} if plot else None)
    ctx.card("RL", **{"RL reward": last, f"{cfg.task} val pass@1": metrics.get("pass@1")})
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
