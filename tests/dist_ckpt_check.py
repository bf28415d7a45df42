"""torchrun worker: every rank saves its own shard state; a reload gets each rank its own state back."""
import sys

import torch
import torch.distributed as dist

from nanochat.checkpoint import CheckpointManager
from nanochat.store import open_store

dist.init_process_group("gloo")
rank = dist.get_rank()
store = open_store(sys.argv[1])
mgr = CheckpointManager(store, "base_train")
model = {"w": torch.arange(6.0)}
for step in (10, 20):
    mgr.save(step, model if rank == 0 else None, {"shard": torch.full((3,), float(rank * 100 + step)), "loader": {"pos": rank + step}}, {"step": step})
if rank == 1:  # tamper with rank 1's newest shard: every rank must fall back to step 10 together
    store.put_bytes("checkpoints/base_train/000020/optim_rank1.pt", b"garbage")
step, model_state, rank_state, meta = mgr.load()
assert step == 10 and meta == {"step": 10}, (rank, step)
assert torch.equal(model_state["w"], torch.arange(6.0))
assert torch.equal(rank_state["shard"], torch.full((3,), float(rank * 100 + 10))) and rank_state["loader"]["pos"] == rank + 10
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
