"""Supervised finetuning: one conversation per row, only the assistant's tokens trained.

Starts from the midtrained model, scaled-down learning rates (init_lr_frac: 0.02 by default, 0.5 in the CPU profiles) decaying
linearly to zero, rows padded to the longest conversation of the batch. Periodic masked val loss
and a quick accuracy check on a few examples of some tasks (categorical: argmax over the answer
letters' logits; generative: greedy sampling with the engine, graded by task.evaluate). The full
evaluation is chat_eval's job. Checkpoints go to checkpoints/chat_sft/.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, opt
from nanochat.stage import run_module_main, stage_main
from nanochat.stages.mid_train import SYNTHETIC, resolve_tasks

STAGE = "chat_sft"

# nanochat's SFT mixture (2.3K + 1.1K + 8K + 10K + 1K + 0.3K + 0.3K rows), val set and quick metrics
GPU_TASKS = "arc_easy@train,arc_challenge@train,gsm8k,smoltalk:10000,identity,simple_spelling:300,spellingbee:300"
GPU_VAL_TASKS = "smoltalk@test"
GPU_EVAL_TASKS = "mmlu@test,arc_easy@test"
# oversampling multiple choice and spelling, the slowest skills (as nanochat repeats MMLU and GSM8K epochs)
TINY_TASKS = "synthetic_mc*4,synthetic_spelling*2,synthetic_arithmetic,synthetic_chat"
TINY_VAL_TASKS = ",".join(f"{t}@val" for t in SYNTHETIC)
TINY_EVAL_TASKS = "synthetic_mc@val,synthetic_arithmetic@val"


@dataclass
class Config(StageConfig):
    source: str = opt("mid", "model to start from: base|mid|sft|rl (checkpoint source)")
    tasks: str = opt("auto", "training mixture: comma list of name[@split][:N][*k] (auto: nanochat's SFT mixture on GPU profiles, the synthetic tasks otherwise)")
    val_tasks: str = opt("auto", "validation conversations for the masked val loss, same syntax (default split: val)")
    eval_tasks: str = opt("auto", "tasks for the quick accuracy check, same syntax ('none' = off)")
    max_seq_len: int = opt(-1, "conversations are cut to this many tokens (-1: the model's sequence_len)")
    device_batch_size: int = opt(4, "conversations per device per micro-step")
    target_examples_per_step: int = opt(32, "conversations per optimizer step across all ranks")
    num_epochs: int = opt(1, "passes over the training mixture when --num-iterations is -1")
    num_iterations: int = opt(-1, "optimizer steps (-1: from --num-epochs)")
    embedding_lr: float = opt(0.2, "AdamW lr for embeddings (scaled by 1/sqrt(width/768)), before init_lr_frac")
    unembedding_lr: float = opt(0.004, "AdamW lr for lm_head, before init_lr_frac")
    matrix_lr: float = opt(0.02, "Muon lr for block matrices, before init_lr_frac")
    scalar_lr: float = opt(0.5, "AdamW lr for per-layer scalars, before init_lr_frac")
    init_lr_frac: float = opt(0.02, "every lr above is multiplied by this (SFT only nudges the model)")
    weight_decay: float = opt(0.0, "Muon cautious weight decay")
    warmdown_ratio: float = opt(1.0, "fraction of steps at the end over which the lr decays to zero (1: linear decay all along)")
    eval_every: int = opt(100, "steps between val loss evaluations (0 = only at the end)")
    eval_steps: int = opt(100, "val batches per evaluation (capped at one pass over the val set)")
    eval_metrics_every: int = opt(200, "steps between accuracy checks (a multiple of --eval-every; always at the end)")
    eval_cat_examples: int = opt(1024, "examples per categorical task in the accuracy check")
    eval_gen_examples: int = opt(24, "examples per generative task in the accuracy check")
    eval_max_new_tokens: int = opt(256, "sampling budget per generative example")
    save_every: int = opt(500, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = opt(2, "complete checkpoints kept in the store")
    log_every: int = opt(10, "steps between log lines")

    def check_world_size(self, world_size: int):
        if self.target_examples_per_step % (self.device_batch_size * world_size):
            raise ConfigError(f"--target-examples-per-step {self.target_examples_per_step} must be a multiple of device_batch_size × "
                              f"processes ({self.device_batch_size} × {world_size} = {self.device_batch_size * world_size})")

    def validate(self):
        from nanochat.checkpoint import SOURCES
        if self.source not in SOURCES:
            raise ConfigError(f"--source: {self.source!r} is not one of: {', '.join(SOURCES)}")
        for key in ("device_batch_size", "target_examples_per_step", "eval_steps", "eval_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.num_iterations == 0 or (self.num_iterations < 0 and self.num_epochs < 1):
            raise ConfigError("--num-iterations must be >= 1 (or -1 with --num-epochs >= 1)")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ConfigError(f"--warmdown-ratio must be in [0, 1], got {self.warmdown_ratio}")
        self.tasks = resolve_tasks(self.tasks, self.profile, GPU_TASKS, TINY_TASKS, "tasks")
        self.val_tasks = resolve_tasks(self.val_tasks, self.profile, GPU_VAL_TASKS, TINY_VAL_TASKS, "val-tasks")
        if self.eval_tasks != "none":
            self.eval_tasks = resolve_tasks(self.eval_tasks, self.profile, GPU_EVAL_TASKS, TINY_EVAL_TASKS, "eval-tasks")


# ----------------------------------------------------------------------------- the stage

def run(ctx):
    from nanochat.chat_data import PaddedConversations, build_mixture, build_task, describe, evaluate_loss, parse_tasks
    from nanochat.chat_eval_lib import evaluate_task
    from nanochat.checkpoint import CheckpointManager, load_model
    from nanochat.optim import lr_multiplier
    from nanochat.tokenizer import get_tokenizer
    from nanochat.training import LoopConfig, drop_other_configs, train

    cfg = ctx.cfg
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    tokenizer = get_tokenizer(ctx.store)
    model, source_step, source_meta = load_model(ctx.store, cfg.source, ctx.device, dtype=ctx.dtype)
    model_config = source_meta["model_config"]
    max_len = cfg.max_seq_len if cfg.max_seq_len > 0 else model_config["sequence_len"]
    train_mix = build_mixture(cfg.tasks, ctx.store, split="train", seed=cfg.seed)
    val_mix = build_mixture(cfg.val_tasks, ctx.store, split="val", seed=cfg.seed)
    eval_specs = [] if cfg.eval_tasks == "none" else parse_tasks(cfg.eval_tasks)
    eval_tasks = {str(s): build_task(s, ctx.store, split="val") for s in eval_specs}
    ctx.log(f"{cfg.source} model from step {source_step}; train mixture {len(train_mix):,} conversations ({describe(train_mix)}); "
            f"val {len(val_mix):,}; accuracy check on {list(eval_tasks) or 'nothing'}")

    cfg.check_world_size(ctx.world_size)
    examples_per_micro = cfg.device_batch_size * ctx.world_size
    grad_accum = cfg.target_examples_per_step // examples_per_micro
    n = cfg.num_iterations if cfg.num_iterations > 0 else max(1, len(train_mix) // cfg.target_examples_per_step * cfg.num_epochs)

    scale = cfg.init_lr_frac
    optimizer = model.setup_optimizer(matrix_lr=cfg.matrix_lr * scale, embedding_lr=cfg.embedding_lr * scale,
                                      unembedding_lr=cfg.unembedding_lr * scale, scalar_lr=cfg.scalar_lr * scale,
                                      weight_decay=cfg.weight_decay)

    def batches(task, shuffle=True):
        return PaddedConversations(tokenizer, task, cfg.device_batch_size, max_len, rank=ctx.rank, world_size=ctx.world_size,
                                   device=ctx.device, seed=cfg.seed, shuffle=shuffle)
    val_steps = min(cfg.eval_steps, -(-len(val_mix) // examples_per_micro))  # at most one pass over the val set

    def evaluate(m, step):
        val = batches(val_mix, shuffle=False)  # the same val conversations every time
        out = {"val_loss": evaluate_loss(m, (next(val) for _ in range(val_steps)))}
        if step == 0 or step == n or (cfg.eval_metrics_every > 0 and step % cfg.eval_metrics_every == 0):
            for name, task in eval_tasks.items():
                limit = cfg.eval_cat_examples if task.eval_type == "categorical" else cfg.eval_gen_examples
                result = evaluate_task(task, tokenizer, m, max_problems=limit, batch_size=cfg.device_batch_size,
                                       max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
                out[f"{name.split('@')[0]}_acc"] = result["accuracy"]
        ctx.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    # the starting model's scores, so the report shows what SFT bought
    model.eval()
    initial = evaluate(model, 0)
    model.train()
    ckpt = CheckpointManager(ctx.store, STAGE, keep=cfg.keep_checkpoints)
    drop_other_configs(ctx, ckpt)  # a stale checkpoint must not suppress the step-0 row
    if ckpt.latest() is None:
        ctx.log_metrics(0, total=n, **initial)

    data = batches(train_mix)
    sample = [len(tokenizer.render_conversation(train_mix[i], max_tokens=max_len + 1)[0]) for i in range(min(256, len(train_mix)))]
    loop = LoopConfig(
        num_iterations=n, grad_accum_steps=grad_accum,
        tokens_per_step=round(sum(sample) / len(sample) * cfg.target_examples_per_step),  # approximate: rows vary
        flops_per_token=model.estimate_flops(), save_every=cfg.save_every, eval_every=cfg.eval_every, log_every=cfg.log_every,
        lr_multiplier=lambda s: lr_multiplier(s, n, 0.0, cfg.warmdown_ratio, 0.0),
        meta={"model_config": model_config, "stage": STAGE, "source": cfg.source, "source_step": source_step, "max_seq_len": max_len})
    metrics = train(ctx, model, optimizer, data, ckpt, loop, evaluate=evaluate)
    metrics.update({f"initial_{k}": v for k, v in initial.items()})
    metrics.update(num_iterations=n, grad_accum_steps=grad_accum, epochs=round(n * cfg.target_examples_per_step / len(train_mix), 3))
    accuracy = {k: (initial.get(k), metrics.get(k)) for k in metrics if k.endswith("_acc") and not k.startswith("initial_")}
    ctx.section("Chat SFT", {
        "source": f"{cfg.source} (step {source_step})", "train mixture": describe(train_mix), "val conversations": len(val_mix),
        "iterations": n, "examples per step": cfg.target_examples_per_step, "epochs": metrics["epochs"],
        "lr scale (init_lr_frac)": cfg.init_lr_frac, "val loss before": initial["val_loss"], "val loss after": metrics.get("val_loss"),
        **{f"{k} before -> after": f"{a:.4f} -> {b:.4f}" for k, (a, b) in accuracy.items()},
        "final train loss": metrics.get("final_loss"), "train time (s, excl. step 1)": metrics.get("train_time_s")})
    ctx.card("SFT", **{"sft val loss": metrics.get("val_loss")})
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
