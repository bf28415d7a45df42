"""Pretrain the base GPT on the store's text shards: one dial (depth), Muon + AdamW, resumable.

Horizon: --num-iterations, else --target-flops, else --target-param-data-ratio (tokens = ratio ×
scaling params). Run under torchrun for data parallelism; checkpoints go to checkpoints/base_train/.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, batch_split_error, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "base_train"


@dataclass
class Config(StageConfig):
    depth: int = opt(20, "model depth: the one dial; width = depth × aspect_ratio rounded to head_dim")
    aspect_ratio: int = opt(64, "width per layer of depth")
    head_dim: int = opt(128, "attention head dimension")
    n_kv_head: int = opt(0, "key/value heads for GQA (0 = as many as query heads)")
    window_pattern: str = opt("SSSL", "sliding-window pattern tiled over layers (L = full context, S = half); last layer always L")
    max_seq_len: int = opt(2048, "context length")
    device_batch_size: int = opt(32, "sequences per device per micro-step")
    total_batch_size: int = opt(524288, "tokens per optimizer step across all ranks (-1 = one micro-batch per rank)")
    num_iterations: int = opt(-1, "optimizer steps (-1: from target_flops or target_param_data_ratio)")
    target_flops: float = opt(-1.0, "training FLOPs budget (-1: off)")
    target_param_data_ratio: float = opt(20.0, "tokens per scaling parameter (Chinchilla ≈ 20)")
    embedding_lr: float = opt(0.3, "AdamW lr for embeddings (scaled by 1/sqrt(width/768))")
    unembedding_lr: float = opt(0.004, "AdamW lr for lm_head")
    matrix_lr: float = opt(0.02, "Muon lr for block matrices")
    scalar_lr: float = opt(0.5, "AdamW lr for per-layer scalars")
    weight_decay: float = opt(0.0, "Muon cautious weight decay")
    warmup_ratio: float = opt(0.0, "fraction of steps warming up the lr")
    warmdown_ratio: float = opt(0.4, "fraction of steps decaying the lr at the end")
    final_lr_frac: float = opt(0.0, "lr at the end as a fraction of the peak")
    eval_every: int = opt(250, "steps between val bpb evaluations (0 = only at the end)")
    eval_tokens: int = opt(10 * 524288, "tokens per val bpb evaluation")
    core_metric_every: int = opt(2000, "steps between CORE evaluations, also run at the end (0 = off; skipped when the eval bundle is not in the store)")
    core_metric_max_per_task: int = opt(500, "CORE examples per task in those evaluations (-1 = all)")
    # bookkeeping keys stay out of the config hash: changing them must not orphan the checkpoints of a run
    save_every: int = opt(500, "steps between checkpoints (0 = only at the end); bounds work lost to preemption", hash=False)
    keep_checkpoints: int = opt(2, "complete checkpoints kept in the store", hash=False)
    compile: str = opt("auto", "torch.compile the model: auto (GPU only), true, false", choices=["auto", "true", "false"])
    fp8: bool = opt(False, "fp8 matmuls (Hopper only)")
    tokenizer_threads: int = opt(4, "threads for batch tokenization in the dataloader", hash=False)
    log_every: int = opt(10, "steps between log lines", hash=False)
    wandb_run: str = opt("", "Weights & Biases run name (empty = off)", hash=False)

    def check_world_size(self, world_size: int):
        if why := batch_split_error(self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size):
            raise ConfigError(why)

    def validate(self):
        for key in ("depth", "max_seq_len", "device_batch_size", "aspect_ratio", "head_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        from nanochat.gpt import MAX_DEPTH
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"--depth must be <= {MAX_DEPTH} (the speedrun's models are 4 to 32 layers), got {self.depth}")
        if self.window_pattern.strip("SL") or not self.window_pattern:
            raise ConfigError(f"--window-pattern: only letters S and L allowed, got {self.window_pattern!r}")
        if self.core_metric_max_per_task == 0 or self.core_metric_max_per_task < -1:
            raise ConfigError(f"--core-metric-max-per-task must be -1 (all) or >= 1, got {self.core_metric_max_per_task}")


def build_model(cfg, vocab_size, device, dtype=None):
    from nanochat.gpt import GPT, GPTConfig
    kw = dict(window_pattern=cfg.window_pattern, fp8=cfg.fp8)
    if cfg.n_kv_head:
        kw["n_kv_head"] = cfg.n_kv_head
    mc = GPTConfig.from_depth(cfg.depth, vocab_size, cfg.max_seq_len, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim, **kw)
    return GPT.create(mc, device=device, dtype=dtype), mc


def plan(cfg, model, world_size) -> dict:
    """The seed's budget planning: params → tokens → steps, printed before training."""
    counts = model.num_scaling_params()
    scaling = counts["transformer_matrices"] + counts["lm_head"]
    flops_per_token = model.estimate_flops()
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    total_batch = tokens_per_micro if cfg.total_batch_size <= 0 else cfg.total_batch_size
    cfg.check_world_size(world_size)
    grad_accum = total_batch // tokens_per_micro
    if cfg.num_iterations > 0:
        steps, how = cfg.num_iterations, "--num-iterations"
    elif cfg.target_flops > 0:
        steps, how = round(cfg.target_flops / (flops_per_token * total_batch)), "--target-flops"
    else:
        steps, how = math.ceil(cfg.target_param_data_ratio * scaling / total_batch), f"--target-param-data-ratio {cfg.target_param_data_ratio}"
    steps = max(1, steps)
    tokens = steps * total_batch
    return {"params_total": counts["total"], "params_scaling": scaling, "flops_per_token": flops_per_token,
            "total_batch_size": total_batch, "grad_accum_steps": grad_accum, "num_iterations": steps, "horizon_from": how,
            "train_tokens": tokens, "tokens_per_param": tokens / scaling, "train_flops": flops_per_token * tokens}


def core_evaluator(ctx, cfg, model, tokenizer):
    """(every, fn) for periodic CORE on the uncompiled model (prompt lengths vary), or None when off or the
    eval bundle is not in the store (logged once: pretraining never waits for an eval download)."""
    from nanochat.core_eval import bundle_available, evaluate_core, fetch_command, load_bundle
    if cfg.core_metric_every <= 0:
        return None
    if not bundle_available(ctx.store):
        ctx.log(f"CORE during training skipped: no eval bundle in the store (fetch it with `{fetch_command(ctx.store)}`)")
        return None
    tasks = load_bundle(ctx.store, cfg.core_metric_max_per_task)  # once: every evaluation scores the same rows

    def core(_, step):
        result = evaluate_core(model, tokenizer, ctx.store, ctx.device, max_per_task=cfg.core_metric_max_per_task, tasks=tasks)
        ctx.log(f"step {step}: CORE {result['core']:.4f} ({len(tasks)} tasks, {result['seconds']:.0f}s)")
        return {"core_metric": result["core"]}
    return cfg.core_metric_every, core


def run(ctx):
    import torch
    from nanochat.checkpoint import CheckpointManager
    from nanochat.dataloader import DataLoader
    from nanochat.optim import lr_multiplier, muon_momentum
    from nanochat.tokenizer import get_tokenizer
    from nanochat.training import LoopConfig, drop_other_configs, evaluate_bpb, train

    cfg = ctx.cfg
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    ctx.require("data/shards/index.json", "data")
    tokenizer = get_tokenizer(ctx.store)
    model, model_config = build_model(cfg, tokenizer.get_vocab_size(), ctx.device, ctx.dtype)
    p = plan(cfg, model, ctx.world_size)
    ctx.log("plan: " + ", ".join(f"{k}={v:,.4g}" if isinstance(v, float) else f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in p.items()))
    optimizer = model.setup_optimizer(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                                      scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay)
    compiled = cfg.compile == "true" or (cfg.compile == "auto" and ctx.device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if compiled else model

    def loader(split):
        return DataLoader(ctx.store, tokenizer, split, cfg.device_batch_size, cfg.max_seq_len, rank=ctx.rank,
                          world_size=ctx.world_size, device=ctx.device, tokenizer_threads=cfg.tokenizer_threads)
    data = loader("train")
    token_bytes = tokenizer.token_bytes(ctx.device)
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * ctx.world_size))

    def evaluate(m, step):
        val = loader("val")
        bpb = evaluate_bpb(m, (next(val) for _ in range(eval_steps)), token_bytes)
        val.close()
        ctx.log(f"step {step}: val bpb {bpb:.4f}")
        return {"val_bpb": bpb}

    n = p["num_iterations"]
    loop = LoopConfig(
        num_iterations=n, grad_accum_steps=p["grad_accum_steps"], tokens_per_step=p["total_batch_size"],
        flops_per_token=p["flops_per_token"], save_every=cfg.save_every, eval_every=cfg.eval_every, log_every=cfg.log_every,
        lr_multiplier=lambda s: lr_multiplier(s, n, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac),
        momentum=muon_momentum, meta={"model_config": model_config.to_dict(), "stage": STAGE, "plan": p})
    ckpt = CheckpointManager(ctx.store, STAGE, keep=cfg.keep_checkpoints)
    drop_other_configs(ctx, ckpt)  # before deciding whether this is a fresh start
    core = core_evaluator(ctx, cfg, model, tokenizer)
    # val bpb before any training, so the report shows the fall
    if ckpt.latest() is None:
        model.eval()
        initial = evaluate(model, 0)
        model.train()
        ctx.log_metrics(0, total=n, **initial)
    try:
        metrics = train(ctx, train_model, optimizer, data, ckpt, loop, evaluate=evaluate, periodic=[core] if core else [])
    finally:
        data.close()  # its reader thread ends here, not at interpreter exit (see dataloader._close_live_loaders)
    metrics.update({k: p[k] for k in ("params_total", "params_scaling", "num_iterations", "train_tokens", "flops_per_token")})
    summary = {**p, "final val bpb": metrics.get("val_bpb")}
    if "core_metric" in metrics:
        summary[f"final CORE ({cfg.core_metric_max_per_task} per task)"] = metrics["core_metric"]
    summary.update({"final train loss": metrics.get("final_loss"), "train time (s, excl. step 1)": metrics.get("train_time_s")})
    ctx.section("Base model training", summary)
    ctx.card("BASE", **{"val bpb": metrics.get("val_bpb")})
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
