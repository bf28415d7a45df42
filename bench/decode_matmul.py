"""
The CPU decode matmul, per weight layout: why DecodeMatrix (nanochat/gpt.py) reads each weight the way it does.

    python bench/decode_matmul.py                    # d4 shapes (width 256, vocab 8192), 1/4/8/32 rows, 1 thread
    python bench/decode_matmul.py --depths 2,4,6 --rows 1,2,4

A decode step multiplies a few rows (one per sequence) by every weight of the model, so on a CPU each matmul streams
its weight from memory. Each weight is timed cold, as in a real step (copies of it totalling --cold-mb, more than the
L3, are cycled through), in three forms:
  linear  F.linear(x, W), W (out, in) as the parameter is stored: what GPT.forward runs
  T       x @ W.T made contiguous, (in, out): DecodeMatrix's one-row path where out >= in (nanochat.gpt.input_major)
  packed  oneDNN on W packed once (mkldnn._reorder_linear_weight): DecodeMatrix's path for 2+ rows (gpt.cpu_packing)
          where it measured faster on this CPU (gpt.cpu_packing_speedup)
The "picked" column is what DecodeMatrix runs for that shape and row count. Times in microseconds, median of --rounds.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.gpt import cpu_packing, cpu_packing_pays, cpu_packing_speedup, input_major, pack_for_cpu  # noqa: E402


def shapes(depth, vocab):
    C = 64 * depth  # GPTConfig.from_depth(depth, head_dim=64): width = 64 * depth
    return {"qkv": (3 * C, C), "proj": (C, C), "fc": (4 * C, C), "mlp_proj": (C, 4 * C), "lm_head": (vocab, C)}


def time_us(fn, weights, calls, rounds):
    """Median over rounds of the mean time of `calls` calls, each on the next of `weights` (cold in cache)."""
    for w in weights[:3]:
        fn(w)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(weights[i % len(weights)])
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def picked(out, inn, rows):
    if rows > 1 and cpu_packing("cpu", torch.float32, out, inn) and cpu_packing_pays():
        return "packed"
    return "T" if input_major("cpu", out, inn) else "linear"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="4", help="model depths whose shapes to time (width 64 * depth)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rows", default="1,4,8,32", help="rows per matmul (the decode batch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (decoding on CPU uses 1: engine.DECODE_CPU_THREADS)")
    p.add_argument("--cold-mb", type=int, default=64, help="bytes of copies cycled through per weight")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"# decode matmul, fp32, torch {torch.__version__}, {args.threads} thread(s), weights cold ({args.cold_mb} MB cycled)")
    print(f"# this CPU's packing probe (gpt.cpu_packing_speedup): packed {cpu_packing_speedup():.2f}x as fast as (in, out) "
          f"at 8 rows, so steps of 2+ rows {'use' if cpu_packing_pays() else 'skip'} the packed copies")
    print("| depth | weight | out × in | rows | linear µs | T µs | packed µs | picked | picked vs linear |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth in (int(d) for d in args.depths.split(",")):
        for name, (out, inn) in shapes(depth, args.vocab).items():
            copies = max(3, (args.cold_mb << 20) // (out * inn * 4))
            Ws = [torch.randn(out, inn) for _ in range(copies)]
            forms = {"linear": Ws, "T": [w.t().contiguous() for w in Ws], "packed": [pack_for_cpu(w) for w in Ws]}
            for m in rows:
                x = torch.randn(m, inn)
                us = {
                    "linear": time_us(lambda w: F.linear(x, w), forms["linear"], args.calls, args.rounds),
                    "T": time_us(lambda w: x @ w, forms["T"], args.calls, args.rounds),
                    "packed": time_us(lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                                      forms["packed"], args.calls, args.rounds),
                }
                choice = picked(out, inn, m)
                print(f"| {depth} | {name} | {out} × {inn} | {m} | {us['linear']:,.0f} | {us['T']:,.0f} | {us['packed']:,.0f} "
                      f"| {choice} | {us['linear'] / us[choice]:.2f}× |", flush=True)
            del forms, Ws


if __name__ == "__main__":
    main()
