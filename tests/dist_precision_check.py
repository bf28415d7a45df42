"""Under torchrun (2 gloo processes on CPU): the ranks measure different bf16 speedups (argv: rank 0's, rank 1's);
after share_cpu_bf16_speedup both decide precision and Muon's dtype from rank 0's. One JSON line per rank."""
import json
import sys

import torch
import torch.distributed as dist

from nanochat import common
from nanochat.gpt import GPT, GPTConfig

CPU = torch.device("cpu")
common.init_distributed(CPU)
rank = dist.get_rank()
figures = [float(f) for f in sys.argv[1:3]]
common._measure_bf16_speedup = lambda: figures[rank]  # what this rank's CPU would have measured
before = common.autocast_dtype(CPU)
common.share_cpu_bf16_speedup()
model = GPT.create(GPTConfig.from_depth(1, 256, 32, head_dim=32, window_pattern="L"), CPU)
print(json.dumps({"rank": rank, "before": str(before), "after": str(common.autocast_dtype(CPU)),
                  "speedup": common.cpu_bf16_speedup(), "ortho": str(model.setup_optimizer().ortho_dtype)}), flush=True)
common.cleanup_distributed()
