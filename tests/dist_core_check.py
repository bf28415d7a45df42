"""torchrun worker: CORE of the wrong oracle over the fixture bundle, examples split across ranks.

    torchrun --standalone --nproc_per_node=2 tests/dist_core_check.py STORE_URI OUT.json
Rank 0 writes the result plus how many examples each rank scored per task."""
import json
import sys

import torch
import torch.distributed as dist

from nanochat.core_eval import evaluate_core, evaluate_task, load_bundle
from nanochat.store import open_store
from tests.test_core_eval import WRONG, Oracle, WordTokenizer, all_texts, favoured

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
store = open_store(sys.argv[1])
tok = WordTokenizer(all_texts())
model = Oracle(tok, favoured(wrong=WRONG))
out = evaluate_core(model, tok, store, "cpu")
mine = {}
for task in load_bundle(store):
    model.calls = 0
    evaluate_task(model, tok, task, "cpu", batch_tokens=1)  # one forward per example: calls = examples scored here
    mine[task.label] = model.calls
gathered = [None] * world
dist.all_gather_object(gathered, mine)
if rank == 0:
    out["world_size"] = world
    out["rank_examples"] = {label: [g[label] for g in gathered] for label in mine}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
