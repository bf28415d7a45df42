"""Midtraining: continue the base model on a mixture of chat tasks rendered into one token stream.

The model learns the conversation format (special tokens), multiple choice and calculator tool use.
Like pretraining, only simpler: full (B, T) rows packed from conversations, Muon + AdamW, lr constant
then decaying to zero, val bpb on held-out conversations, resumable checkpoints/mid_train/.

Tasks: a comma list of name[@split][:N][*k] (`nanochat.chat_data.parse_tasks`); "auto" picks
nanochat's mixture on GPU profiles and the synthetic tasks that ship with the package otherwise.
Horizon: --num-iterations, else --num-epochs of the mixture (token count estimated from a sample).
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, batch_split_error, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "mid_train"

# nanochat's midtraining mixture (460K + 100K + 8K + 2K + 200K + 80K rows) and its val mixture
GPU_TASKS = "smoltalk,mmlu_aux,gsm8k,identity*2,simple_spelling:200000,spellingbee:80000"
GPU_VAL_TASKS = "smoltalk@test,mmlu@test:5200,gsm8k@test:420"
SYNTHETIC = ("synthetic_arithmetic", "synthetic_spelling", "synthetic_mc", "synthetic_chat")
TINY_TASKS = ",".join(SYNTHETIC)
TINY_VAL_TASKS = ",".join(f"{t}@val" for t in SYNTHETIC)
ESTIMATE_SAMPLES = 1000  # conversations rendered to estimate the mixture's token count


def resolve_tasks(value: str, profile: str, gpu_default: str, tiny_default: str, flag: str) -> str:
    """'auto' -> the profile's default mixture; any spec is parsed now so a typo fails before any work."""
    from nanochat.chat_data import parse_tasks
    from nanochat.pipeline import GPU_PROFILES
    if value == "auto":
        value = gpu_default if profile in GPU_PROFILES else tiny_default
    try:
        parse_tasks(value)
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None
    return value


@dataclass
class Config(StageConfig):
    source: str = opt("base", "model to start from: base|mid|sft|rl (checkpoint source)")
    tasks: str = opt("auto", "training mixture: comma list of name[@split][:N][*k] (auto: nanochat's mixture on GPU profiles, the synthetic tasks otherwise)")
    val_tasks: str = opt("auto", "validation mixture, same syntax (default split: val)")
    loss_tokens: str = opt("all", "tokens trained: all (nanochat's midtraining) or assistant (only assistant text and tool calls)", choices=["all", "assistant"])
    max_seq_len: int = opt(-1, "row length in tokens (-1: the model's sequence_len)")
    device_batch_size: int = opt(32, "rows per device per micro-step")
    total_batch_size: int = opt(524288, "tokens per optimizer step across all ranks (-1 = one micro-batch per rank)")
    num_iterations: int = opt(-1, "optimizer steps (-1: --num-epochs of the mixture)")
    num_epochs: float = opt(1.0, "passes over the training mixture when --num-iterations is -1")
    embedding_lr: float = opt(0.2, "AdamW lr for embeddings (scaled by 1/sqrt(width/768))")
    unembedding_lr: float = opt(0.004, "AdamW lr for lm_head")
    matrix_lr: float = opt(0.02, "Muon lr for block matrices")
    scalar_lr: float = opt(0.5, "AdamW lr for per-layer scalars")
    init_lr_frac: float = opt(1.0, "every lr above is multiplied by this")
    weight_decay: float = opt(0.0, "Muon cautious weight decay")
    warmdown_ratio: float = opt(0.2, "fraction of steps at the end over which the lr decays to final_lr_frac")
    final_lr_frac: float = opt(0.0, "lr at the end as a fraction of the peak")
    eval_every: int = opt(150, "steps between val bpb evaluations (0 = only at the end)")
    eval_tokens: int = opt(20 * 524288, "tokens per val bpb evaluation")
    save_every: int = opt(500, "steps between checkpoints (0 = only at the end); bounds work lost to preemption")
    keep_checkpoints: int = opt(2, "complete checkpoints kept in the store")
    compile: str = opt("auto", "torch.compile the model: auto (GPU only), true, false", choices=["auto", "true", "false"])
    log_every: int = opt(10, "steps between log lines")

    def check_world_size(self, world_size: int):
        if self.max_seq_len > 0:  # -1: the model's, known once it is loaded (plan checks it then)
            if why := batch_split_error(self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size):
                raise ConfigError(why)

    def validate(self):
        from nanochat.checkpoint import SOURCES
        if self.source not in SOURCES:
            raise ConfigError(f"--source: {self.source!r} is not one of: {', '.join(SOURCES)}")
        for key in ("device_batch_size", "eval_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.num_iterations == 0 or (self.num_iterations < 0 and self.num_epochs <= 0):
            raise ConfigError("--num-iterations must be >= 1 (or -1 with --num-epochs > 0)")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ConfigError(f"--warmdown-ratio must be in [0, 1], got {self.warmdown_ratio}")
        self.tasks = resolve_tasks(self.tasks, self.profile, GPU_TASKS, TINY_TASKS, "tasks")
        self.val_tasks = resolve_tasks(self.val_tasks, self.profile, GPU_VAL_TASKS, TINY_VAL_TASKS, "val-tasks")


def estimate_tokens(tokenizer, mixture, samples: int = ESTIMATE_SAMPLES) -> int:
    """Tokens in one epoch of the mixture, from an evenly strided sample of its conversations."""
    n = len(mixture)
    stride = max(1, n // samples)
    lengths = [len(tokenizer.render_conversation(mixture[i])[0]) for i in range(0, n, stride)]
    return round(sum(lengths) / len(lengths) * n)


def plan(cfg, model, world_size: int, seq_len: int, epoch_tokens: int | None) -> dict:
    tokens_per_micro = cfg.device_batch_size * seq_len * world_size
    total_batch = tokens_per_micro if cfg.total_batch_size <= 0 else cfg.total_batch_size
    if why := batch_split_error(total_batch, cfg.device_batch_size, seq_len, world_size):
        raise ConfigError(why)
    if cfg.num_iterations > 0:
        steps, how = cfg.num_iterations, "--num-iterations"
    else:
        steps, how = max(1, round(cfg.num_epochs * epoch_tokens / total_batch)), f"--num-epochs {cfg.num_epochs}"
    out = {"total_batch_size": total_batch, "grad_accum_steps": total_batch // tokens_per_micro, "num_iterations": steps,
           "horizon_from": how, "train_tokens": steps * total_batch, "flops_per_token": model.estimate_flops()}
    if epoch_tokens:
        out["mixture_tokens_est"] = epoch_tokens
        out["epochs"] = round(steps * total_batch / epoch_tokens, 3)
    return out


def run(ctx):
    import torch
    from nanochat.chat_data import PackedConversations, build_mixture, describe
    from nanochat.checkpoint import CheckpointManager, load_model
    from nanochat.optim import lr_multiplier, muon_momentum
    from nanochat.tokenizer import get_tokenizer
    from nanochat.training import LoopConfig, drop_other_configs, evaluate_bpb, train

    cfg = ctx.cfg
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    tokenizer = get_tokenizer(ctx.store)
    model, source_step, source_meta = load_model(ctx.store, cfg.source, ctx.device, dtype=ctx.dtype)
    model_config = source_meta["model_config"]
    seq_len = cfg.max_seq_len if cfg.max_seq_len > 0 else model_config["sequence_len"]
    train_mix = build_mixture(cfg.tasks, ctx.store, split="train", seed=cfg.seed)
    val_mix = build_mixture(cfg.val_tasks, ctx.store, split="val", seed=cfg.seed)
    ctx.log(f"{cfg.source} model from step {source_step}; train mixture {len(train_mix):,} conversations ({describe(train_mix)}); "
            f"val {len(val_mix):,} ({describe(val_mix)})")
    epoch_tokens = estimate_tokens(tokenizer, train_mix)
    p = plan(cfg, model, ctx.world_size, seq_len, epoch_tokens)
    ctx.log("plan: " + ", ".join(f"{k}={v}" for k, v in p.items()))

    scale = cfg.init_lr_frac
    optimizer = model.setup_optimizer(matrix_lr=cfg.matrix_lr * scale, embedding_lr=cfg.embedding_lr * scale,
                                      unembedding_lr=cfg.unembedding_lr * scale, scalar_lr=cfg.scalar_lr * scale,
                                      weight_decay=cfg.weight_decay)
    model.train()
    compiled = cfg.compile == "true" or (cfg.compile == "auto" and ctx.device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if compiled else model

    def stream(mixture):
        return PackedConversations(tokenizer, mixture, cfg.device_batch_size, seq_len, rank=ctx.rank,
                                   world_size=ctx.world_size, device=ctx.device, loss_tokens=cfg.loss_tokens)
    token_bytes = tokenizer.token_bytes(ctx.device)
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * seq_len * ctx.world_size))

    def evaluate(m, step):
        val = stream(val_mix)  # the same val tokens every time
        bpb = evaluate_bpb(m, (next(val) for _ in range(eval_steps)), token_bytes)
        ctx.log(f"step {step}: val bpb {bpb:.4f}")
        return {"val_bpb": bpb}

    # the starting model's val bpb, so the report shows what midtraining bought
    model.eval()
    initial = evaluate(model, 0)["val_bpb"]
    model.train()
    ckpt = CheckpointManager(ctx.store, STAGE, keep=cfg.keep_checkpoints)
    drop_other_configs(ctx, ckpt)  # a stale checkpoint must not suppress the step-0 row
    if ckpt.latest() is None:
        ctx.log_metrics(0, total=p["num_iterations"], val_bpb=initial)

    n = p["num_iterations"]
    loop = LoopConfig(
        num_iterations=n, grad_accum_steps=p["grad_accum_steps"], tokens_per_step=p["total_batch_size"],
        flops_per_token=p["flops_per_token"], save_every=cfg.save_every, eval_every=cfg.eval_every, log_every=cfg.log_every,
        lr_multiplier=lambda s: lr_multiplier(s, n, 0.0, cfg.warmdown_ratio, cfg.final_lr_frac), momentum=muon_momentum,
        meta={"model_config": model_config, "stage": STAGE, "source": cfg.source, "source_step": source_step,
              "max_seq_len": seq_len, "plan": p})
    metrics = train(ctx, train_model, optimizer, stream(train_mix), ckpt, loop, evaluate=evaluate)
    metrics.update(initial_val_bpb=initial, num_iterations=n, train_tokens=p["train_tokens"])
    ctx.section("Midtraining", {
        "source": f"{cfg.source} (step {source_step})", "train mixture": describe(train_mix), "val mixture": describe(val_mix),
        "loss on": cfg.loss_tokens + " tokens", **{k: v for k, v in p.items() if k != "flops_per_token"},
        "val bpb before": initial, "val bpb after": metrics.get("val_bpb"),
        "final train loss": metrics.get("final_loss"), "train time (s, excl. step 1)": metrics.get("train_time_s")})
    ctx.card("MID", **{"chat val bpb": metrics.get("val_bpb")})
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
