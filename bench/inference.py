"""
Inference benchmark: the KV-cache engine vs naive generation (full recompute every step).

    python bench/inference.py                  # CPU: depths 2/4/6 (the ANCHORS.md "Inference" rows:
                                               # 13-token prompt, 128 new tokens, fp32, eager, head dim 64)
                                               # plus 256 new tokens at batch 1/8/32
    python bench/inference.py --device cuda    # GPU: d20-sized random weights, prompt 2048, decode 256

Columns: TTFT = time to the first token (cache allocation, prefill, first sample); decode tok/s =
tokens after the first one per second over all rows; tok/s = all new tokens / total time (what the
anchors report); tok per CPU-s = the same over the process's CPU time (with --threads 1, close to
what an idle machine gives: steadier on a shared box); peak = peak RSS of the process on CPU, peak
allocated GPU memory on CUDA. Every row runs in its own subprocess so its peak memory is its own;
timings are the median of --repeats.
On CUDA the batch-1 "bw limit" column is the memory-bandwidth bound: (weight bytes + mean KV bytes
read per step) / HBM bandwidth.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# /work/shared/ANCHORS.md, karpathy/nanochat on this machine kind (2 Zen 5 cores, fp32, eager):
# (depth, batch) -> tok/s with the KV-cache engine, and depth -> naive (no cache) batch-1 tok/s, 128 new tokens
ANCHOR_ENGINE = {(2, 1): 1692, (2, 4): 3136, (4, 1): 553, (4, 4): 1190, (6, 1): 202, (6, 4): 548}
ANCHOR_NAIVE = {2: 179, 4: 100, 6: 54}
# first match wins: the PCIe H100 before the SXM part the bare "H100" means
HBM_BYTES_PER_S = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def cpu_rows(args):
    rows = []
    for depth in args.depths:
        for batch in (1, 4):  # the anchor configurations
            rows.append(dict(depth=depth, mode="engine", batch=batch, new_tokens=128))
        rows.append(dict(depth=depth, mode="naive", batch=1, new_tokens=128))
        for batch in (1, 8, 32):
            rows.append(dict(depth=depth, mode="engine", batch=batch, new_tokens=256))
        # naive is slow (quadratic): batch 1 at every depth, larger batches only at the smallest, once
        for batch in args.naive_batches if depth == min(args.depths) else (1,):
            rows.append(dict(depth=depth, mode="naive", batch=batch, new_tokens=256, repeats=1 if batch > 1 else None))
    for r in rows:
        r.update(prompt=args.prompt or 13, vocab=args.vocab or 8192, head_dim=64, seq_len=512, dtype="float32")
    return rows


def cuda_rows(args):
    rows = []
    for batch in (1, 8, 32):
        rows.append(dict(mode="engine", batch=batch))
    for batch in args.naive_batches:
        rows.append(dict(mode="naive", batch=batch, repeats=1 if batch > 1 else None))
    for r in rows:
        r.update(depth=20, new_tokens=256, prompt=args.prompt or 2048, vocab=args.vocab or 32768, head_dim=128,
                 seq_len=2048, dtype="bfloat16")
    return rows


# -----------------------------------------------------------------------------
# one measurement (runs in a child process)

class SpecialsOnlyTokenizer:
    """What the engine needs from a tokenizer: special ids. Placed past the model's vocab, so no row
    ends early and every run decodes exactly the requested number of tokens."""

    def __init__(self, vocab_size):
        from nanochat.tokenizer import SPECIAL_TOKENS
        self.ids = {name: vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


def measure(row, device, repeats, threads):
    repeats = row.pop("repeats", None) or repeats
    import torch
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    os.environ["NANOCHAT_DTYPE"] = row["dtype"]
    torch.manual_seed(0)
    config = GPTConfig.from_depth(row["depth"], row["vocab"], row["seq_len"], head_dim=row["head_dim"])
    model = GPT.create(config, device)
    if device.type == "cuda":
        model.to(torch.bfloat16)  # inference keeps no fp32 master weights
    model.eval()
    engine = Engine(model, SpecialsOnlyTokenizer(row["vocab"]))
    stream = engine.generate if row["mode"] == "engine" else engine.generate_naive
    prompt = torch.randint(0, row["vocab"], (row["prompt"],), generator=torch.Generator().manual_seed(1)).tolist()

    def once(new_tokens):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        t_first, n = None, 0
        for column, _ in stream(prompt, num_samples=row["batch"], max_tokens=new_tokens, temperature=1.0, top_k=50):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
        t_end, c_end = time.perf_counter(), time.process_time()
        assert n == new_tokens, f"generated {n} of {new_tokens} tokens"
        return t_first - t0, t_end - t_first, t_end - t0, c_end - c0

    once(4)  # warm-up: allocator, kernels, threads
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [once(row["new_tokens"]) for _ in range(repeats)]
    ttft, decode, total, cpu = (statistics.median(x) for x in zip(*runs))
    B, N = row["batch"], row["new_tokens"]
    result = dict(row, ttft_ms=1000 * ttft, decode_tok_s=B * (N - 1) / decode, tok_s=B * N / total,
                  tok_per_cpu_s=B * N / cpu)
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["gpu"] = torch.cuda.get_device_name(device)
        weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                           if "wte" not in name and "value_embeds" not in name)  # gathered rows only, not read whole
        c = model.config
        mean_ctx = row["prompt"] + N / 2
        kv_bytes = 2 * c.n_layer * c.n_kv_head * c.head_dim * mean_ctx * 2 * B  # K and V, bf16
        bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in result["gpu"]), None)
        result["bw_limit_tok_s"] = B / ((weight_bytes + kv_bytes) / bw) if bw else None
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return result


# -----------------------------------------------------------------------------
# driver

def run_row(row, args):
    cmd = [sys.executable, __file__, "--one", json.dumps(row), "--device", args.device,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"row {row} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def print_table(results, device):
    naive = {(r["depth"], r["new_tokens"], r["batch"]): r["tok_s"] for r in results if r["mode"] == "naive"}
    head = "| depth | mode | batch | prompt | new | TTFT ms | decode tok/s | tok/s | tok per CPU-s | vs naive | anchor tok/s | peak GB |"
    if device == "cuda":
        head += " bw limit tok/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        anchor = (ANCHOR_ENGINE.get((r["depth"], r["batch"])) if r["mode"] == "engine" else
                  ANCHOR_NAIVE.get(r["depth"]) if r["batch"] == 1 else None)
        anchor = anchor if r["new_tokens"] == 128 and device == "cpu" else None
        base = naive.get((r["depth"], r["new_tokens"], r["batch"]))  # naive at the same batch
        speedup = f"{r['tok_s'] / base:.1f}×" if base and r["mode"] == "engine" else "—"
        line = (f"| {r['depth']} | {r['mode']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['ttft_ms']:.1f} "
                f"| {r['decode_tok_s']:,.0f} | {r['tok_s']:,.0f} | {r['tok_per_cpu_s']:,.0f} | {speedup} "
                f"| {fmt(anchor, ',')} | {r['peak_gb']:.2f} |")
        if device == "cuda":
            line += f" {fmt(r.get('bw_limit_tok_s'), ',.0f')} |"
        print(line, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depths", default="2,4,6", help="CPU depths")
    p.add_argument("--prompt", type=int, default=0, help="prompt tokens (default 13 on CPU, 2048 on CUDA)")
    p.add_argument("--vocab", type=int, default=0, help="vocab size (default 8192 on CPU, 32768 on CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--only", default="", help="comma-separated modes to run: engine,naive")
    p.add_argument("--naive-batches", default="1,8", help="batch sizes for naive generation at 256 new tokens "
                   "(CPU: at the smallest depth; batches > 1 run once)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = p.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    args.naive_batches = [int(b) for b in args.naive_batches.split(",")]
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.device, args.repeats, args.threads)))
        return
    rows = cuda_rows(args) if args.device == "cuda" else cpu_rows(args)
    if args.only:
        rows = [r for r in rows if r["mode"] in args.only.split(",")]
    import torch
    print(f"# inference benchmark: device={args.device}, torch {torch.__version__}, threads={args.threads or torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, median of {args.repeats}", flush=True)
    results = []
    for row in rows:
        results.append(run_row(row, args))
        print(f"  done: depth {row['depth']} {row['mode']} batch {row['batch']} new {row['new_tokens']}: "
              f"{results[-1]['tok_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    print()
    print_table(results, args.device)


if __name__ == "__main__":
    main()
