"""
Pretraining throughput: forward + backward + MuonAdamW step on random tokens, one row per config.

    python bench/train.py                          CPU rows of shared/ANCHORS.md (d2/d4/d6, seq 512,
                                                   batch 4x512, vocab 8192, head dim 64, full attention,
                                                   fp32), torch.compile (cold + warm cache) and eager
    python bench/train.py --dtypes float32,bf16-mixed,bfloat16
                                                   also bf16 matmuls under autocast (auto's choice on CPUs
                                                   whose bf16 matmuls measured 1.3x fp32's) and all-bf16 compute
    python bench/train.py --device cuda            d12 (batch 32) and d20 (batch 16) at seq 2048, bf16,
                                                   with/without compile and fp8, MFU vs the GPU's peak

Each config runs in its own process so peak memory and first-step (compile) time are its own.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# karpathy/nanochat on this machine kind (shared/ANCHORS.md): depth -> (ms/step, tokens/s, peak RSS GB)
CPU_ANCHORS = {2: (207, 9893, 0.80), 4: (608, 3370, 1.04), 6: (1660, 1233, 1.44)}
CPU_CONFIG = dict(seq=512, batch=4, vocab=8192, head_dim=64, window="L")
GPU_ROWS = [(12, 32), (20, 16)]  # (depth, device batch) at seq 2048
GPU_CONFIG = dict(seq=2048, vocab=32768, head_dim=128, window="SSSL")


def worker(args):
    """One config: build, time the first step and then `--steps` more, print a JSON line."""
    import torch
    from nanochat import common
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.training import peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        common.keep_freed_memory()  # as the stages run (NANOCHAT_KEEP_FREED_MEMORY=0: glibc's defaults)
    cfg = GPTConfig.from_depth(args.depth, args.vocab, args.seq, head_dim=args.head_dim, window_pattern=args.window, fp8=args.fp8)
    torch.manual_seed(0)
    model = GPT.create(cfg, device)
    opt = model.setup_optimizer(compile=args.compile_optim)
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = common.autocast_dtype(device)  # NANOCHAT_DTYPE=bf16-mixed (or auto where common.fast_bf16_cpu)

    def step():
        with common.autocast(device, autocast):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    # fraction of the wall time our threads got the CPU: well below 1 means someone else was computing
    cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    ms = statistics.median(times) * 1000
    tokens = args.batch * args.seq
    flops = model.estimate_flops() * tokens / (ms / 1000)
    peak_mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = peak_flops(device)
    print(json.dumps(dict(cpu_share=cpu_share, ms=ms, tok_s=tokens / (ms / 1000), first_s=first, peak_gb=peak_mem / 1e9,
                          tflops=flops / 1e12, mfu=flops / peak if peak else None, gpu=gpu,
                          dtype=common.precision_name(model.compute_dtype, autocast), width=cfg.n_embd,
                          params=sum(p.numel() for p in model.parameters()))))


def cpu_idle_fraction(seconds=3.0):
    def read():
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    idle0, total0 = read()
    time.sleep(seconds)
    idle1, total1 = read()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(max_wait_s):
    """On a shared machine, timings are only meaningful while nobody else computes."""
    deadline = time.time() + max_wait_s
    while time.time() < deadline:
        if cpu_idle_fraction() > 0.9:
            return True
    print(f"(machine still busy after {max_wait_s:.0f} s; timing anyway)", file=sys.stderr)
    return False


def run_config(args, cache_dir, dtype=None, **overrides):
    if args.wait_idle and Path("/proc/stat").exists():
        wait_for_idle(args.wait_idle)
    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--steps", str(args.steps),
           "--threads", str(args.threads)]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else ["--no-" + flag[2:]]
        else:
            cmd += [flag, str(value)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if dtype:
        env["NANOCHAT_DTYPE"] = dtype
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_cpu(args):
    cache_root = Path(args.cache_dir or tempfile.mkdtemp(prefix="nanochat-bench-inductor-"))
    c = CPU_CONFIG
    print(f"CPU pretraining step: seq {c['seq']}, batch {c['batch']}x{c['seq']}, vocab {c['vocab']}, head dim {c['head_dim']}, "
          f"full attention, median of {args.steps} steps; compile = torch.compile(model) + compiled optimizer math; "
          f"first step = cold / warm inductor cache")
    from nanochat import common
    auto = "bf16-mixed, Muon in bf16" if common.fast_bf16_cpu() else "float32, Muon in fp32"
    print(f"this CPU's bf16 matmul runs at {common.cpu_bf16_speedup():.2f}x fp32's speed (0 = no bf16 instructions): auto trains in {auto}")
    print("| depth | width | mode | dtype | ms/step | anchor | tokens/s | anchor | peak RSS GB | anchor | first step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for depth in args.depths:
        for mode in args.modes:
            for dtype in args.dtypes:
                compiled = mode == "compile"
                cache = cache_root / f"d{depth}-{dtype}"
                opts = dict(depth=depth, compile=compiled, compile_optim=compiled, **c)
                cold = run_config(args, cache, dtype, **opts) if args.cold and compiled else None
                warm = run_config(args, cache, dtype, **opts)
                if warm is None:
                    print(f"| {depth} | | {mode} | {dtype} | failed |", flush=True)
                    continue
                a_ms, a_tok, a_rss = (f"{a:,}" for a in CPU_ANCHORS[depth]) if depth in CPU_ANCHORS else "---"
                first = f"{cold['first_s']:.1f} / {warm['first_s']:.1f}" if cold else f"{warm['first_s']:.1f}"
                busy = "*" if warm["cpu_share"] < 0.85 else ""  # timed while the CPU was shared
                print(f"| {depth} | {warm['width']} | {mode} | {dtype} | {warm['ms']:.0f}{busy} | {a_ms} | {warm['tok_s']:,.0f} | {a_tok} | "
                      f"{warm['peak_gb']:.2f} | {a_rss} | {first} |", flush=True)
    print("(* = our threads got under 85% of the CPU while timing: another process was computing)")


def bench_cuda(args):
    cache_root = Path(args.cache_dir or tempfile.mkdtemp(prefix="nanochat-bench-inductor-"))
    print(f"GPU pretraining step, seq {GPU_CONFIG['seq']}, vocab {GPU_CONFIG['vocab']}, window {GPU_CONFIG['window']}, median of {args.steps} steps")
    print("| depth | batch | compile | fp8 | ms/step | tokens/s | TFLOP/s | MFU | peak mem GB | first step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for depth, batch in GPU_ROWS:
        if depth not in args.depths:
            continue
        for compile_ in (True, False):
            for fp8 in (False, True):
                r = run_config(args, cache_root, args.dtypes[0], depth=depth, batch=batch, compile=compile_, compile_optim=True, fp8=fp8, **GPU_CONFIG)
                if r is None:
                    print(f"| {depth} | {batch} | {compile_} | {fp8} | failed |", flush=True)
                    continue
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
                print(f"| {depth} | {batch} | {compile_} | {fp8} | {r['ms']:.0f} | {r['tok_s']:,.0f} | {r['tflops']:.0f} | {mfu} | "
                      f"{r['peak_gb']:.1f} | {r['first_s']:.1f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depths", type=lambda s: [int(d) for d in s.split(",")], default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first (median reported)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=None, help="CPU: NANOCHAT_DTYPE values, e.g. float32,bf16-mixed,bfloat16")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["compile", "eager"], help="CPU: compile,eager")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True, help="also time the first step with an empty inductor cache")
    p.add_argument("--cache-dir", default=None, help="inductor cache root (default: a fresh temp dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--wait-idle", type=float, default=0, help="before each config, wait up to this many seconds for an idle CPU")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--window", default="L")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-optim", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.depths is None:
        args.depths = [2, 4, 6] if args.device == "cpu" else [12, 20]
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.device == "cpu" else ["bfloat16"]
    bench_cpu(args) if args.device == "cpu" else bench_cuda(args)


if __name__ == "__main__":
    main()
