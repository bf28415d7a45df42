"""A test stage that needs torch.distributed: all ranks all_reduce their rank, rank 0 writes the sum."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.config import StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "allreduce"


@dataclass
class Config(StageConfig):
    scale: int = opt(1, "multiplier")


def run(ctx):
    x = torch.tensor([float(ctx.rank + 1) * ctx.cfg.scale])
    if ctx.world_size > 1:
        dist.all_reduce(x)
    if ctx.is_master:
        ctx.store.put_json("outputs/allreduce.json", {"sum": x.item(), "world_size": ctx.world_size, "threads": torch.get_num_threads()})
    return {"sum": x.item()}


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
