"""
Inference benchmark: the KV-cache engine vs naive generation (full recompute every step).

    python bench/inference.py                  # CPU: depths 2/4/6 (the ANCHORS.md "Inference" rows:
                                               # 13-token prompt, 128 new tokens, fp32, head dim 64; the Engine's
                                               # path and eager) plus 256 new tokens at batch 1/8/32
    python bench/inference.py --device cuda    # GPU: d20-sized random weights, prompt 2048, decode 256

Columns: TTFT = time to the first token (cache allocation, prefill, first sample); decode tok/s =
tokens after the first one per second over all rows; tok/s = all new tokens / total time (what the
anchors report); tok per CPU-s = the same over the process's CPU time (with --threads 1, close to
what an idle machine gives: steadier on a shared box); peak = peak RSS of the process on CPU, peak
allocated GPU memory on CUDA. Every row runs in its own subprocess so its peak memory is its own;
timings are the median of --repeats.
On CUDA the batch-1 "bw limit" column is the memory-bandwidth bound: (weight bytes + mean KV bytes
read per step) / HBM bandwidth.

mode engine = one request of `batch` samples (Engine.generate: one prompt, prefilled once); batched = `batch`
requests, each its own prompt (5 tokens shorter per request, so rows stand at different positions), decoded together
by nanochat.batching's Batcher (continuous batching, as `nanochat serve --batch-rows`) of `rows` rows (default:
`batch`); naive = no KV cache.
decode = the Engine's path (nanochat/engine.py): eager (GPT.forward + KVCache per step, the reference), static (the
static step run uncaptured over the slots in use, its weights laid out for the CPU: the CPU default), graph (the static
step in a CUDA graph; the CUDA default), compile (torch.compile'd, then graphed on CUDA), fused (the Triton kernels of
nanochat/fused_decode.py, graphed). The anchor column (ANCHORS.md: nanochat's eager engine) stands beside every row of
its configuration, whichever path ran it. CUDA rows also
profile 16 decode steps: kernels per step and GPU-busy ms per step against the wall ms per step (launch-bound or not).

    python bench/inference.py --chat-diag '{"variant": "eager"}' --device cuda
runs the chat_eval decode diagnostic (chat_diagnostic(): the ci model, greedy, 20 prompt lengths, cold then warm,
a torch.profiler table) used by bench/gpu.py.
"""

import argparse
import contextlib
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


def hbm_bytes_per_s(gpu_name):
    """Datasheet HBM bandwidth of a GPU by its device name (first match: PCIe/NVL before plain H100), else None."""
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in gpu_name), None)


def cpu_rows(args):
    rows = []
    for depth in args.depths:
        for batch in (1, 4):  # the anchor configurations: the Engine's path, and GPT.forward per step (the reference)
            rows.append(dict(depth=depth, mode="engine", batch=batch, new_tokens=128))
            if args.decode != "eager":
                rows.append(dict(depth=depth, mode="engine", batch=batch, new_tokens=128, decode="eager"))
        rows.append(dict(depth=depth, mode="naive", batch=1, new_tokens=128))
        for batch in (1, 8, 32):
            rows.append(dict(depth=depth, mode="engine", batch=batch, new_tokens=256))
        rows.append(dict(depth=depth, mode="batched", batch=8, new_tokens=256, decode="static"))  # 8 requests, one batch
        # naive is slow (quadratic): batch 1 at every depth, larger batches only at the smallest, once
        for batch in args.naive_batches if depth == min(args.depths) else (1,):
            rows.append(dict(depth=depth, mode="naive", batch=batch, new_tokens=256, repeats=1 if batch > 1 else None))
    for r in rows:
        r.setdefault("decode", args.decode)
        r.update(prompt=args.prompt or 13, vocab=args.vocab or 8192, head_dim=64, seq_len=512, dtype="float32")
    return rows


def cuda_rows(args):
    rows = [dict(mode="engine", decode=decode, batch=batch, profile=True) for decode in ("graph", "fused") for batch in (1, 8, 32)]
    rows += [dict(mode="batched", decode=decode, batch=32) for decode in ("graph", "fused")]
    rows += [dict(mode="engine", decode=decode, batch=1, profile=True) for decode in ("eager", "compile")]
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
    engine = Engine(model, SpecialsOnlyTokenizer(row["vocab"]), decode=row.get("decode", "eager"))
    if row["mode"] != "naive":
        row["decode"] = engine.decode_mode(row["batch"])  # auto resolved: the path of `batch` rows
    prompt = torch.randint(0, row["vocab"], (row["prompt"],), generator=torch.Generator().manual_seed(1)).tolist()
    if row["mode"] == "batched":
        from nanochat.batching import Batcher
        batcher = Batcher(engine, rows=row.get("rows") or row["batch"], max_len=row["prompt"] + row["new_tokens"])
        prompts = [prompt[:max(1, len(prompt) - 5 * i)] for i in range(row["batch"])]

        def stream(prompt, num_samples, **kwargs):
            return lockstep(batcher, prompts, **kwargs)
    else:
        stream = engine.generate if row["mode"] == "engine" else engine.generate_naive

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

    t0 = time.perf_counter()
    once(4)  # warm-up: allocator, kernels, threads; the graph capture (and compile) of the static paths
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [once(row["new_tokens"]) for _ in range(repeats)]
    ttft, decode, total, cpu = (statistics.median(x) for x in zip(*runs))
    B, N = row["batch"], row["new_tokens"]
    result = dict(row, ttft_ms=1000 * ttft, decode_tok_s=B * (N - 1) / decode, tok_s=B * N / total,
                  tok_per_cpu_s=B * N / cpu, decode_ms_per_step=1000 * decode / (N - 1), warmup_s=warmup_s)
    if "nanochat.fused_decode" in sys.modules:  # what the fused step ran with (PDL turns itself off if the capture refuses it)
        fused = sys.modules["nanochat.fused_decode"]
        result.update(fused_pdl=fused.pdl_on(device), fused_gemv=fused.GEMV)
    # batched: the Batcher's thread decodes ahead of the consumer, so a window of 16 consumed tokens holds no steps
    if row.get("profile") and device.type == "cuda" and row["mode"] != "batched":
        result["profile"] = profile_decode(lambda: stream(prompt, num_samples=B, max_tokens=N, temperature=1.0, top_k=50))
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["gpu"] = torch.cuda.get_device_name(device)
        weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                           if "wte" not in name and "value_embeds" not in name)  # gathered rows only, not read whole
        c = model.config
        mean_ctx = row["prompt"] + N / 2
        kv_bytes = 2 * c.n_layer * c.n_kv_head * c.head_dim * mean_ctx * 2 * B  # K and V, bf16
        bw = hbm_bytes_per_s(result["gpu"])
        result["bw_limit_tok_s"] = B / ((weight_bytes + kv_bytes) / bw) if bw else None
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if engine.decode_mode(1) == "fused":  # the engine's checks before first use, at this model's size (after the timing)
        import nanochat.engine as engine_mod
        weights = engine.shared_weights()
        result["fused_check"] = engine_mod.fused_step_errors(model, weights)
        result["fused_check_failure"] = engine_mod.fused_check_failure(result["fused_check"], weights.dtype)
    if "nanochat.fused_sample" in sys.modules:
        result["sample_verdicts"] = list(sys.modules["nanochat.fused_sample"]._verdicts.values())
    return result


def lockstep(batcher, prompts, **kwargs):
    """Requests for every prompt queued at once into the batcher (they join at its first step); yields once per step,
    when each has its next token (no row ends early: the tokenizer's special ids are past the vocab)."""
    with batcher.cond:
        streams = [batcher.generate(p, num_samples=1, **kwargs) for p in prompts]
    try:
        for columns in zip(*streams):
            yield columns, None
    finally:
        for s in streams:
            s.close()


def profile_decode(start_stream, cuda=True, skip=4, steps=16):
    """torch.profiler over `steps` decode steps of a running stream (after `skip`): GPU kernels per step, their summed
    time per step (GPU busy) and the wall time per step (profiler overhead included). busy << wall: launch-bound."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stream = start_stream()
    for _ in range(skip):
        next(stream)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            next(stream)
        sync()
        wall = time.perf_counter() - t0
    stream.close()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name, count = {}, {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
        count[e.name] = count.get(e.name, 0) + 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    return dict(steps=steps, kernels_per_step=len(kernels) / steps,
                gpu_busy_ms_per_step=sum(e.time_range.elapsed_us() for e in kernels) / steps / 1e3,
                gpu_span_ms_per_step=covered_us(spans) / steps / 1e3,
                wall_ms_per_step=1e3 * wall / steps,
                top_kernels_ms_per_step=[(name[:90], us / steps / 1e3, count[name] / steps) for name, us in top])


def covered_us(spans):
    """Microseconds in which at least one kernel ran: the union of (start, end) intervals. With programmatic
    dependent launch kernels overlap, so their summed time (GPU busy) can exceed this, and both can exceed the step."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


# -----------------------------------------------------------------------------
# the chat_eval decode diagnostic (bench/gpu.py runs each variant in its own process: cold caches each time)

CHAT_DIAG = dict(depth=2, head_dim=64, vocab=2048, seq=256, window="L",  # the ci profile's model (base_train)
                 prompt_lengths=[20 + 5 * i for i in range(21)], new_tokens=96,  # 20..120 tokens, up to 96 new (ci chat_eval)
                 profile_lengths=[300, 301], deadline_s=30.0)  # cold pass: half of it; warm: until 80%; profile: the rest
CHAT_DIAG_VARIANTS = {  # variant -> (Engine decode path, SDPA backends; None = torch's default order)
    "eager": ("eager", None),
    "eager, no cuDNN SDPA": ("eager", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]),
    "graph": ("graph", None),
}


def chat_diagnostic(spec, device):
    """Engine.generate greedy over prompts of varying length on the ci-sized model, as chat_eval decodes: a cold pass,
    the same prompts again (warm: every (Tq, Tk) shape already seen), then torch.profiler over two prompts whose
    shapes are new. A per-shape cost (e.g. cuDNN building an SDPA graph per new shape) shows as cold >> warm and in
    the profile's self-CPU column."""
    import torch
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    spec = dict(CHAT_DIAG, **spec)
    device = torch.device(device)
    decode, backends = CHAT_DIAG_VARIANTS[spec["variant"]]
    if device.type != "cuda" and decode == "graph":
        decode = "static"  # no CUDA graphs on a CPU: the same step, eager
    config = GPTConfig.from_depth(spec["depth"], spec["vocab"], spec["seq"], head_dim=spec["head_dim"], window_pattern=spec["window"])
    torch.manual_seed(0)
    model = GPT.create(config, device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)  # fp32 master weights
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.size(1) ** -0.5)
    model.eval()
    engine = Engine(model, SpecialsOnlyTokenizer(spec["vocab"]), decode=decode)
    prompts = [torch.randint(0, spec["vocab"], (n,), generator=g).tolist() for n in spec["prompt_lengths"]]
    t0, budget = time.perf_counter(), spec["deadline_s"]
    if backends:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        limit = sdpa_kernel([getattr(SDPBackend, name) for name in backends])
    else:
        limit = contextlib.nullcontext()
    out = dict(variant=spec["variant"], decode=decode, sdpa_backends=backends or "default", device=str(device),
               prompts=len(prompts), new_tokens=spec["new_tokens"], torch=torch.__version__)
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version(),
                   cudnn_sdp_enabled=torch.backends.cuda.cudnn_sdp_enabled(), flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled())
    with limit:
        out["cold"] = chat_pass(engine, prompts, spec["new_tokens"], t0 + 0.5 * budget)
        done = prompts[:out["cold"]["prompts_done"]]  # the warm pass repeats what the cold one reached: every shape seen
        out["warm"] = chat_pass(engine, done, spec["new_tokens"], t0 + 0.8 * budget)
        if time.perf_counter() < t0 + budget:
            extra = [torch.randint(0, spec["vocab"], (n,), generator=g).tolist() for n in spec["profile_lengths"]]
            out["profile"] = profile_prompts(engine, extra, spec["new_tokens"], device)
    return out


def chat_pass(engine, prompts, new_tokens, deadline):
    """Greedy generation of each prompt (as chat_eval: temperature 0, top_k 50) until the deadline: ms per step."""
    prefill_ms, step_ms = [], []
    t_pass = time.perf_counter()
    for prompt in prompts:
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        for i, _ in enumerate(engine.generate(prompt, num_samples=1, max_tokens=new_tokens, temperature=0.0, top_k=50)):
            now = time.perf_counter()
            (prefill_ms if i == 0 else step_ms).append(1e3 * (now - t))  # every step syncs (.tolist()): wall = device
            t = now
    done = len(prefill_ms)
    if not step_ms:
        return dict(prompts_done=done, seconds=time.perf_counter() - t_pass)
    return dict(prompts_done=done, seconds=time.perf_counter() - t_pass,
                prefill_ms_median=statistics.median(prefill_ms), prefill_ms_max=max(prefill_ms),
                step_ms_median=statistics.median(step_ms), step_ms_mean=statistics.fmean(step_ms), step_ms_max=max(step_ms),
                step_ms_p90=sorted(step_ms)[int(0.9 * (len(step_ms) - 1))], steps=len(step_ms))


def profile_prompts(engine, prompts, new_tokens, device):
    """torch.profiler over the generation of `prompts`: the top 10 ops by self CPU time and by self device time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for prompt in prompts:
            engine.generate_batch(prompt, num_samples=1, max_tokens=new_tokens, temperature=0.0, top_k=50)
    wall = time.perf_counter() - t0
    averages = prof.key_averages()

    def top(attr):
        rows = sorted(averages, key=lambda e: -getattr(e, attr))[:10]
        return [dict(op=e.key[:100], calls=e.count, self_ms=getattr(e, attr) / 1e3) for e in rows if getattr(e, attr) > 0]
    attention = {e.key: dict(calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3) for e in averages
                 if any(w in e.key.lower() for w in ("scaled_dot_product", "attention", "cudnn"))}
    return dict(prompt_lengths=[len(p) for p in prompts], wall_s=wall, top_self_cpu=top("self_cpu_time_total"),
                top_self_device=top("self_device_time_total") if device.type == "cuda" else [], attention_ops=attention,
                table_cpu=averages.table(sort_by="self_cpu_time_total", row_limit=10),
                table_device=averages.table(sort_by="self_device_time_total", row_limit=10) if device.type == "cuda" else "")


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
    head = "| depth | mode | decode | batch | prompt | new | TTFT ms | decode tok/s | tok/s | tok per CPU-s | vs naive | anchor tok/s | peak GB |"
    if device == "cuda":
        head += " bw limit tok/s | kernels/step | GPU busy / wall ms per step |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        anchor = (ANCHOR_ENGINE.get((r["depth"], r["batch"])) if r["mode"] == "engine" else
                  ANCHOR_NAIVE.get(r["depth"]) if r["batch"] == 1 else None)
        anchor = anchor if r["new_tokens"] == 128 and device == "cpu" else None
        base = naive.get((r["depth"], r["new_tokens"], r["batch"]))  # naive at the same batch
        speedup = f"{r['tok_s'] / base:.1f}×" if base and r["mode"] == "engine" else "—"
        line = (f"| {r['depth']} | {r['mode']} | {r.get('decode', '—') if r['mode'] != 'naive' else '—'} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['ttft_ms']:.1f} "
                f"| {r['decode_tok_s']:,.0f} | {r['tok_s']:,.0f} | {r['tok_per_cpu_s']:,.0f} | {speedup} "
                f"| {fmt(anchor, ',')} | {r['peak_gb']:.2f} |")
        if device == "cuda":
            prof = r.get("profile") or {}
            busy = f"{prof['gpu_busy_ms_per_step']:.2f} / {prof['wall_ms_per_step']:.2f}" if prof else "—"
            line += f" {fmt(r.get('bw_limit_tok_s'), ',.0f')} | {fmt(prof.get('kernels_per_step'), '.0f')} | {busy} |"
        print(line, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depths", default="2,4,6", help="CPU depths")
    p.add_argument("--prompt", type=int, default=0, help="prompt tokens (default 13 on CPU, 2048 on CUDA)")
    p.add_argument("--vocab", type=int, default=0, help="vocab size (default 8192 on CPU, 32768 on CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--only", default="", help="comma-separated modes to run: engine,batched,naive")
    p.add_argument("--naive-batches", default="1,8", help="batch sizes for naive generation at 256 new tokens "
                   "(CPU: at the smallest depth; batches > 1 run once)")
    p.add_argument("--decode", default="auto", choices=["auto", "eager", "static", "graph", "compile", "fused"],
                   help="the Engine's decode path for the CPU rows (default auto: the static step on CPU; the anchor "
                        "configurations also run eager, the reference). CUDA rows: graph and fused at batch 1/8/32, eager "
                        "and compile at batch 1")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    p.add_argument("--chat-diag", help=argparse.SUPPRESS)  # internal: one chat_eval diagnostic variant, print JSON
    args = p.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    args.naive_batches = [int(b) for b in args.naive_batches.split(",")]
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.device, args.repeats, args.threads)))
        return
    if args.chat_diag:
        print(json.dumps(chat_diagnostic(json.loads(args.chat_diag), args.device)))
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
        print(f"  done: depth {row['depth']} {row['mode']} {row.get('decode', '')} batch {row['batch']} new {row['new_tokens']}: "
              f"{results[-1]['tok_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    print()
    print_table(results, args.device)


if __name__ == "__main__":
    main()
