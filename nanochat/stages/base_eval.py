"""Evaluate the base model: train/val bits per byte, greedy samples from fixed prompts, CORE when
the eval bundle is in the store."""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "base_eval"
PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@dataclass
class Config(StageConfig):
    source: str = opt("base", "which checkpoints to evaluate: base, mid, sft, rl", choices=["base", "mid", "sft", "rl"])
    step: int = opt(-1, "checkpoint step (-1 = latest)")
    device_batch_size: int = opt(32, "sequences per device per eval batch")
    eval_tokens: int = opt(10 * 524288, "tokens per split for bpb")
    sample_tokens: int = opt(24, "new tokens per greedy sample")
    core: str = opt("auto", "CORE metric: auto (when the eval bundle is in the store), true, false", choices=["auto", "true", "false"])
    max_per_task: int = opt(-1, "CORE examples per task (-1 = all)")
    tokenizer_threads: int = opt(4, "dataloader tokenizer threads")

    def instance_name(self, stage):
        return stage if self.source == "base" else f"{stage}_{self.source}"


def run(ctx):
    from nanochat.checkpoint import load_model
    from nanochat.core_eval import bundle_available, evaluate_core, load_bundle
    from nanochat.dataloader import DataLoader
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    from nanochat.training import evaluate_bpb

    cfg = ctx.cfg
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    core_tasks = None
    if cfg.core == "true" or (cfg.core == "auto" and bundle_available(ctx.store)):
        core_tasks = load_bundle(ctx.store, cfg.max_per_task)  # before any work: a missing bundle names its fetch command
    tokenizer = get_tokenizer(ctx.store)
    model, step, meta = load_model(ctx.store, cfg.source, ctx.device, None if cfg.step < 0 else cfg.step, dtype=ctx.dtype)
    seq = model.config.sequence_len
    token_bytes = tokenizer.token_bytes(ctx.device)
    steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * seq * ctx.world_size))
    metrics = {"checkpoint_step": step}
    for split in ("train", "val"):
        loader = DataLoader(ctx.store, tokenizer, split, cfg.device_batch_size, seq, rank=ctx.rank, world_size=ctx.world_size,
                            device=ctx.device, tokenizer_threads=cfg.tokenizer_threads)
        metrics[f"{split}_bpb"] = evaluate_bpb(model, (next(loader) for _ in range(steps)), token_bytes)
        loader.close()
        ctx.log(f"{split} bpb: {metrics[f'{split}_bpb']:.4f}")

    samples = []
    if ctx.is_master:
        engine = Engine(model, tokenizer)
        for prompt in PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=cfg.sample_tokens, temperature=0.0)
            text = tokenizer.decode(out[0][len(tokens):] if len(out[0]) > len(tokens) else out[0])
            samples.append({"prompt": prompt, "completion": text.replace("\n", " ").strip()})
            ctx.log(f"sample: {prompt!r} → {samples[-1]['completion']!r}")

    core_table = []
    if core_tasks is not None:
        core = evaluate_core(model, tokenizer, ctx.store, ctx.device, max_per_task=cfg.max_per_task, tasks=core_tasks)
        metrics["core"] = core["core"]
        metrics.update({f"core_centered_{k}": v["centered"] for k, v in core["tasks"].items()})  # flat: scalars become gauges
        core_table = [{"task": k, "type": v["task_type"], "shots": v["num_fewshot"], "examples": v["examples"],
                       "accuracy": v["accuracy"], "centered": v["centered"]} for k, v in core["tasks"].items()]
        ctx.log(f"CORE: {core['core']:.4f}")
    ctx.section(f"Base model evaluation ({cfg.source}, step {step})",
                [{"train bpb": metrics["train_bpb"], "val bpb": metrics["val_bpb"], **({"CORE": metrics["core"]} if "core" in metrics else {})},
                 samples, *([core_table] if core_table else [])])
    ctx.card(cfg.source.upper(), **{"val bpb": metrics["val_bpb"], **({"CORE": metrics["core"]} if "core" in metrics else {})})
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
