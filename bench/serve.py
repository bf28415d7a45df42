"""
Serving benchmark: `nanochat serve` under 1/8/32 concurrent streaming clients.

    python bench/serve.py                               # CPU: tiny random-weight GPT (depth 2, vocab 512)
    python bench/serve.py --store file:///path -i sft   # a trained checkpoint from a store
    python bench/serve.py --device cuda --depth 20 --vocab 8192   # GPU, random weights
    python bench/serve.py --batch-rows 1,8,32                      # one request per replica vs continuous batching (default 1,8)

A real uvicorn on 127.0.0.1 serves the model; asyncio + httpx clients each send streaming chat
completions back to back (`--requests` in all per row, `--max-tokens` each). Columns: tok/s =
completion tokens (from each stream's usage) over the row's wall time; TTFT = request sent to the
first content delta, queue wait included (with one replica, requests run one at a time, so TTFT
grows with the number of streams); latency = request sent to [DONE]. rows = `nanochat serve --batch-rows`: requests
decoded together per replica (1: one at a time; > 1: continuous batching, the static decode step). Random weights end an answer
early now and then (a sampled <|assistant_end|>): the token counts come from usage, not max_tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def random_model(args):
    """A tokenizer trained on the Python docs + a random-init GPT with its vocab."""
    import pydoc_data.topics
    import torch
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import train_tokenizer
    texts = [v for _, v in sorted(pydoc_data.topics.topics.items())]
    tok = train_tokenizer(iter(texts), args.vocab)
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, tok.get_vocab_size(), args.seq_len, head_dim=args.head_dim, window_pattern="L")
    model = GPT.create(config, device=args.device).eval()
    return model, tok, f"random d{args.depth}"


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def client(url, n_requests, args, out):
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for i in range(n_requests):
            body = {"messages": [{"role": "user", "content": f"Tell me about the number {i}."}], "stream": True,
                    "max_tokens": args.max_tokens, "temperature": 1.0, "top_k": 50, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft = None
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                        ttft = time.perf_counter() - t0
                    if chunk.get("usage"):
                        out["tokens"] += chunk["usage"]["completion_tokens"]
            out["latency"].append(time.perf_counter() - t0)
            if ttft is not None:
                out["ttft"].append(ttft)


async def run_row(url, streams, args):
    out = {"tokens": 0, "errors": 0, "ttft": [], "latency": []}
    per_client = max(1, args.requests // streams)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(url, per_client, args, out) for _ in range(streams)))
    wall = time.perf_counter() - t0
    return dict(streams=streams, requests=per_client * streams, wall=wall, tok_s=out["tokens"] / wall,
                req_s=per_client * streams / wall, ttft_p50=percentile(out["ttft"], 0.5), ttft_p95=percentile(out["ttft"], 0.95),
                lat_p50=percentile(out["latency"], 0.5), errors=out["errors"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="serve this store's checkpoint instead of a random-weight model")
    p.add_argument("-i", "--source", help="sft|rl|mid|base (with --store; default: the most trained)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1, help="engine replicas (CPU replicas share one model)")
    p.add_argument("--streams", default="1,8,32", help="concurrent streaming clients per row")
    p.add_argument("--requests", type=int, default=64, help="requests per row")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--batch-rows", default="1,8", help="comma-separated `nanochat serve --batch-rows` values, one server each")
    args = p.parse_args()

    import torch
    from nanochat.serve import BackgroundServer, Limits, create_app
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] * args.num_workers if args.device != "cuda" else [f"cuda:{i}" for i in range(args.num_workers)]
    limits = Limits(max_tokens=max(args.max_tokens, 4096))
    if args.store:
        what = args.store
    else:
        model, tok, what = random_model(args)
    print(f"# serve benchmark: {what}, device={args.device}, replicas={args.num_workers}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, max_tokens={args.max_tokens}, {args.requests} requests per row")
    print("| rows | streams | requests | tok/s | req/s | TTFT p50 ms | TTFT p95 ms | latency p50 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in [int(r) for r in args.batch_rows.split(",")]:
        if args.store:
            app = create_app(args.store, source=args.source, devices=devices, max_queue=1024, limits=limits, batch_rows=rows)
        else:
            app = create_app(model=model, tokenizer=tok, devices=devices, max_queue=1024, limits=limits, batch_rows=rows)
        with BackgroundServer(app) as server:
            asyncio.run(run_row(server.url, 1, argparse.Namespace(**{**vars(args), "requests": 2})))  # warm-up
            for streams in [int(s) for s in args.streams.split(",")]:
                r = asyncio.run(run_row(server.url, streams, args))
                print(f"| {rows} | {r['streams']} | {r['requests']} | {r['tok_s']:,.0f} | {r['req_s']:.1f} | {1000 * r['ttft_p50']:.1f} "
                      f"| {1000 * r['ttft_p95']:.1f} | {1000 * r['lat_p50']:.1f} | {r['errors']} |", flush=True)


if __name__ == "__main__":
    main()
