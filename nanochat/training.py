"""The training loop shared by base_train, mid_train and chat_sft (torchtitan-style: model, data,
optimizer and checkpointing come in from outside; this file only sequences them).

Resume is exact: a checkpoint holds the model, every rank's optimizer shard, the data iterator's
position and RNG states, taken at a step boundary, so a resumed run sees the same batches and
produces the same losses as an uninterrupted one (bit-exact on CPU fp32 at equal world size).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat.checkpoint import CheckpointManager, rng_state, set_rng_state
from nanochat.stage import StageContext, StageInterrupted

# bf16 dense peak FLOP/s per GPU, for MFU (CPU: no MFU); first match wins, so PCIe/NVL parts precede "H100"
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def all_reduce_mean(x: float, device) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / dist.get_world_size()
    return x


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor) -> float:
    """Bits per byte: summed nats over tokens that have bytes, / total bytes, / ln 2 (vocab-invariant).

    Special tokens (0 bytes) and ignored targets (-1) are excluded. All ranks' sums are combined."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for x, y in batches:
        loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        total_nats += (loss.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


@dataclass
class LoopConfig:
    num_iterations: int
    grad_accum_steps: int
    tokens_per_step: int
    flops_per_token: float = 0.0
    save_every: int = 0                 # 0: only at the end (and on stop)
    eval_every: int = 0                 # 0: only at the end
    log_every: int = 10
    lr_multiplier: callable = None      # step -> multiplier of each group's initial_lr
    momentum: callable = None           # step -> Muon momentum (None: untouched)
    grad_clip: float = 0.0
    meta: dict = field(default_factory=dict)


def _set_hyperparams(optimizer, lr_mult: float, momentum: float | None):
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"]) * lr_mult
        if momentum is not None and group.get("kind") == "muon":
            group["momentum"] = momentum


def drop_other_configs(ctx: StageContext, ckpt: CheckpointManager):
    """Delete checkpoints written by another config (rank 0, then all ranks wait): resuming from them would
    mix two runs, and later stages would take the newest of them for this run's model."""
    if ctx.is_master:
        for step, theirs in ckpt.delete_other_configs(ctx.config_hash):
            ctx.log(f"deleted stale checkpoint {ctx.store.uri(ckpt.step_prefix(step))}: written by config {theirs}, "
                    f"this run is {ctx.config_hash}")
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()


def try_resume(ctx: StageContext, ckpt: CheckpointManager, model, optimizer, data) -> int:
    """Load the newest usable checkpoint written by this exact config; returns the step to start at.
    Checkpoints of other configs are deleted first; torn or corrupted ones are skipped (logged)."""
    drop_other_configs(ctx, ckpt)
    got = ckpt.load(map_location=ctx.device)
    if got is None:
        return 0
    step, model_state, rank_state, meta = got
    if meta.get("config_hash") != ctx.config_hash:  # a rank saw another set of checkpoints than rank 0
        ctx.log(f"checkpoint at step {step} was made with another config ({meta.get('config_hash')}); starting fresh")
        return 0
    model.load_state_dict(model_state)
    optimizer.load_state_dict(rank_state["optimizer"])
    data.load_state_dict(rank_state["data"])
    set_rng_state(rank_state["rng"])
    ctx.load_history(step)
    ctx.log(f"resumed from checkpoint step {step} ({ctx.store.uri(ckpt.step_prefix(step))})")
    return step


def save(ctx: StageContext, ckpt: CheckpointManager, step: int, model, optimizer, data, meta: dict):
    with ctx.graceful():  # never leave a half-written checkpoint because of SIGTERM
        raw = getattr(model, "_orig_mod", model)
        ckpt.save(step, raw.state_dict() if ctx.is_master else None,
                  {"optimizer": optimizer.state_dict(), "data": data.state_dict(), "rng": rng_state()},
                  {**meta, "config_hash": ctx.config_hash, "step": step})


def _evaluate(ctx, model, step, total, evals) -> dict:
    """Run the given (every, fn) evaluations in eval mode; log and return their scalars."""
    values = {}
    model.eval()
    for _, fn in evals:
        values.update(fn(model, step))
    model.train()
    if values:
        ctx.log_metrics(step, total=total, flush=True, **values)
    return values


def train(ctx: StageContext, model, optimizer, data, ckpt: CheckpointManager, loop: LoopConfig, evaluate=None, periodic=()) -> dict:
    """Run steps [resume step, num_iterations); returns final metrics. `data` yields (x, y) micro-batches
    and has state_dict()/load_state_dict(); `evaluate(model, step)` returns a dict of scalars and runs every
    loop.eval_every steps; `periodic` adds (every, fn) evaluations on their own cadence (e.g. CORE). All run
    at the end too; `every` 0 means only there."""
    raw = getattr(model, "_orig_mod", model)
    if getattr(raw, "compute_dtype", ctx.dtype) != ctx.dtype:  # the stage's --dtype wins over the per-device default
        ctx.log(f"computing in {str(ctx.dtype).replace('torch.', '')} (the model defaulted to {str(raw.compute_dtype).replace('torch.', '')})")
        raw.requested_dtype = raw.compute_dtype = ctx.dtype
    evals = ([(loop.eval_every, evaluate)] if evaluate else []) + [(every, fn) for every, fn in periodic if fn]
    start = try_resume(ctx, ckpt, raw, optimizer, data)
    step, smooth, last_saved = start, None, start
    peak = peak_flops(ctx.device)
    metrics: dict = {}
    train_time = 0.0

    def stop_point():
        """Stop here if SIGTERM/SIGINT came (all ranks agree), saving the current step first."""
        try:
            ctx.check_stop()
        except StageInterrupted:
            if step != last_saved:
                save(ctx, ckpt, step, model, optimizer, data, loop.meta)
            ctx.log(f"stopped at step {step}; checkpoint saved, re-run to resume")
            raise

    with ctx.graceful():
        while step < loop.num_iterations:
            due = [e for e in evals if e[0] and step % e[0] == 0] if step > start else []
            if due:
                metrics.update(_evaluate(ctx, model, step, loop.num_iterations, due))
                stop_point()  # a long evaluation (CORE) may have outlasted a preemption notice
            t0 = time.time()
            mult = loop.lr_multiplier(step) if loop.lr_multiplier else 1.0
            _set_hyperparams(optimizer, mult, loop.momentum(step) if loop.momentum else None)
            loss_sum = 0.0
            for _ in range(loop.grad_accum_steps):
                x, y = next(data)
                with ctx.autocast():
                    loss = model(x, y)
                (loss / loop.grad_accum_steps).backward()
                loss_sum += loss.detach()
            if loop.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            loss_val = all_reduce_mean(float(loss_sum) / loop.grad_accum_steps, ctx.device)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            step += 1
            if step > start + 1:  # the first step includes compilation
                train_time += dt
            smooth = loss_val if smooth is None else 0.9 * smooth + 0.1 * loss_val
            tok_s = loop.tokens_per_step / max(dt, 1e-9)
            values = {"loss": loss_val, "lr_mult": mult, "tokens_per_sec": tok_s}
            if peak and loop.flops_per_token:
                values["mfu"] = loop.flops_per_token * tok_s / (peak * ctx.world_size)
            ctx.log_metrics(step, total=loop.num_iterations, **values)
            if step % loop.log_every == 0 or step == loop.num_iterations:
                eta = (loop.num_iterations - step) * dt
                mfu = f" mfu {values['mfu'] * 100:.1f}%" if "mfu" in values else ""
                ctx.log(f"step {step}/{loop.num_iterations} loss {loss_val:.4f} (smooth {smooth:.4f}) lrm {mult:.2f} "
                        f"{tok_s:,.0f} tok/s{mfu} eta {eta:.0f}s")
            if loop.save_every and step % loop.save_every == 0 and step < loop.num_iterations:
                save(ctx, ckpt, step, model, optimizer, data, loop.meta)
                last_saved = step
            stop_point()
        if last_saved != step or ckpt.latest() is None:  # before the final evaluation, so a preemption during it loses no training
            save(ctx, ckpt, step, model, optimizer, data, loop.meta)
    metrics.update(_evaluate(ctx, model, step, loop.num_iterations, evals))
    metrics.update(final_loss=smooth if smooth is not None else float("nan"), steps=step, train_time_s=round(train_time, 2))
    return metrics
