"""A small test stage exercising the whole contract: config, store output, metrics, report, resume, SIGTERM."""
from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat.config import StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "echo"


@dataclass
class Config(StageConfig):
    value: int = opt(1, "value written to the output")
    steps: int = opt(5, "number of steps")
    step_s: float = opt(0.0, "seconds per step")
    fail_times: int = opt(0, "fail this many attempts before succeeding (counted in the store)")
    label: str = opt("", "instance label (stages/echo_<label>)")
    save_every: int = opt(0, "checkpoint every N steps (0 = never)")
    stop_s: float = opt(0.0, "seconds the checkpoint takes when the stage is stopped (a slow save)")

    def validate(self):
        from nanochat.config import ConfigError
        if self.steps < 0:
            raise ConfigError("--steps must be >= 0")

    def instance_name(self, stage):
        return f"{stage}_{self.label}" if self.label else stage


def run(ctx):
    cfg, store = ctx.cfg, ctx.store
    counter_key = f"test/{ctx.name}/attempts"
    attempts = int(store.get_bytes(counter_key)) + 1 if store.exists(counter_key) else 1
    store.put_bytes(counter_key, str(attempts).encode())
    store.put_bytes(f"test/{ctx.name}/executions/{attempts}", b"1")
    if attempts <= cfg.fail_times:
        raise RuntimeError(f"injected failure {attempts}/{cfg.fail_times}")
    start = 0
    ckpt = store.get_json_or(f"test/{ctx.name}/ckpt.json")
    if ckpt:
        start = ckpt["step"]
        ctx.load_history(start)
        ctx.log(f"resuming from step {start}")
    with ctx.graceful():
        for step in ctx.progress(range(start, cfg.steps), total=cfg.steps - start, desc="steps"):
            time.sleep(cfg.step_s)
            ctx.log_metrics(step + 1, total=cfg.steps, loss=1.0 / (step + 1), tokens_per_sec=100.0 * (step + 1))
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0:
                store.put_json(f"test/{ctx.name}/ckpt.json", {"step": done})
            try:
                ctx.check_stop()
            except Exception:
                time.sleep(cfg.stop_s)
                store.put_json(f"test/{ctx.name}/ckpt.json", {"step": done})
                raise
    digest = store.put_bytes(f"outputs/{ctx.name}.txt", str(cfg.value).encode())
    ctx.add_artifact(f"outputs/{ctx.name}.txt", digest)
    ctx.section(f"Echo {ctx.name}", {"value": cfg.value, "steps": cfg.steps})
    ctx.card("BASE" if not cfg.label else cfg.label.upper(), score=cfg.value / 10)
    return {"value": cfg.value, "final_loss": 1.0 / max(cfg.steps, 1)}


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
