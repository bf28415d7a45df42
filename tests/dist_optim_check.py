"""Worker for tests/test_optim.py: train a tiny GPT with MuonAdamW and save the result.

    python tests/dist_optim_check.py OUT                                   1 process, grad accumulation
    torchrun --standalone --nproc_per_node=2 tests/dist_optim_check.py OUT  sharded optimizer (gloo)

Both see the same global batch of GLOBAL_ROWS sequences per step: one process in micro-batches of
ROWS_PER_RANK with the loss scaled by 1/accumulation steps, each rank its own ROWS_PER_RANK. After
SAVE_AT steps the per-rank optimizer shard and the model are saved; training continues to STEPS,
then a fresh model+optimizer restored from those files replays the remaining steps and must end
bit-identical. Writes final_rank{r}.pt (parameters) and info_rank{r}.json.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import lr_multiplier, muon_momentum, set_hyperparams

STEPS, SAVE_AT = 5, 2
GLOBAL_ROWS, ROWS_PER_RANK, SEQ, VOCAB = 4, 2, 16, 200
# depth 3, 3 heads of 64, 1 kv head: Muon groups of 6, 3 (uneven across 2 ranks) and 2 matrices,
# value embeddings and a vocab padded to 256 rows (sharded AdamW) and per-layer scalars (all_reduced)
CONFIG = GPTConfig.from_depth(3, VOCAB, SEQ, head_dim=64, n_kv_head=1, window_pattern="SL")


def batches():
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, VOCAB, (STEPS, GLOBAL_ROWS, SEQ + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def train(model, opt, steps, rank, world):
    accum = GLOBAL_ROWS // (ROWS_PER_RANK * world)
    for step in steps:
        set_hyperparams(opt, lr_multiplier(step, STEPS, warmup_ratio=0.2, warmdown_ratio=0.4, final_lr_frac=0.1), muon_momentum(step))
        x, y = batches()[step]
        for micro in range(accum):
            rows = slice((rank * accum + micro) * ROWS_PER_RANK, (rank * accum + micro + 1) * ROWS_PER_RANK)
            (model(x[rows], y[rows]) / accum).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def build(seed):
    torch.manual_seed(seed)
    model = GPT.create(CONFIG)
    return model, model.setup_optimizer(compile=False, ortho_dtype=torch.float32)


def main(out):
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    model, opt = build(seed=0)
    train(model, opt, range(SAVE_AT), rank, world)
    torch.save(opt.state_dict(), out / f"optim_rank{rank}.pt")
    saved_model = copy.deepcopy(model.state_dict())
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(final, out / f"final_rank{rank}.pt")

    resumed, opt2 = build(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(torch.load(out / f"optim_rank{rank}.pt"))
    train(resumed, opt2, range(SAVE_AT, STEPS), rank, world)
    identical = all(torch.equal(final[k], v) for k, v in resumed.state_dict().items())
    (out / f"info_rank{rank}.json").write_text(json.dumps(dict(resume_identical=identical, state_numel=state_numel)))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
