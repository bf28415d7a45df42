"""Bounded load: 32 concurrent streaming clients against a real uvicorn + tiny GPT for ~12 s.
No 5xx, every stream well formed, some clients hang up mid-answer on purpose, and at the end
nothing is left behind: no queued or in-flight jobs, no extra asyncio tasks on the server's loop,
no extra threads, every replica back in the pool."""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest
import torch

from nanochat.serve import BackgroundServer, Limits, create_app
from nanochat.store import open_store
from tests.fixtures import make_base_checkpoint, make_tokenizer
from tests.test_serve import metrics_of, wait_until

torch.set_num_threads(1)
CLIENTS = 32
DURATION_S = 12
REPLICAS = 2


def server_tasks(server) -> int:
    """Number of asyncio tasks alive on the server's event loop."""
    loop = server.app.state.serve.loop

    async def count():
        return len(asyncio.all_tasks())
    return asyncio.run_coroutine_threadsafe(count(), loop).result(10)


async def one_client(url, seed, deadline, stats):
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            body = {"messages": [{"role": "user", "content": f"request {rng.random()}"}], "stream": True,
                    "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.7, 1.0]), "top_k": rng.choice([None, 20]),
                    "stream_options": {"include_usage": True}}
            hang_up = rng.random() < 0.15  # some clients leave mid-answer
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                if r.status_code != 200:
                    await r.aread()
                    continue
                payloads = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        payloads.append(line[6:])
                        if hang_up and len(payloads) == 3:
                            break
                if hang_up:
                    stats["hung_up"] += 1
                    continue
            assert payloads[-1] == "[DONE]", payloads[-3:]
            usage = json.loads(payloads[-2])["usage"]
            assert 0 <= usage["completion_tokens"] <= body["max_tokens"]  # greedy may pick <|assistant_end|> first
            stats["completed"] += 1
            stats["tokens"] += usage["completion_tokens"]


async def load(url):
    stats = {"status": {}, "completed": 0, "hung_up": 0, "tokens": 0}
    deadline = time.monotonic() + DURATION_S
    await asyncio.gather(*(one_client(url, i, deadline, stats) for i in range(CLIENTS)))
    assert asyncio.all_tasks() == {asyncio.current_task()}  # nothing left on the client side either
    return stats


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
    store = open_store(f"file://{tmp_path_factory.mktemp('load')}")
    tok = make_tokenizer(store)
    return make_base_checkpoint(store, tok).eval(), tok


@pytest.mark.parametrize("batch_rows", [1, 4])
def test_32_concurrent_streams(tiny_gpt, batch_rows):
    """One request per replica at a time, or 4 decoding together in each replica's batch."""
    model, tok = tiny_gpt
    app = create_app(model=model, tokenizer=tok, devices=["cpu"] * REPLICAS, max_queue=64, limits=Limits(max_tokens=64),
                     batch_rows=batch_rows)
    slots = REPLICAS * batch_rows
    threads_before = {t.ident for t in threading.enumerate()}
    server = BackgroundServer(app).start().wait_ready()
    state = app.state.serve
    try:
        tasks_before = server_tasks(server)
        stats = asyncio.run(load(server.url))
        print(f"\nload: {stats}")
        assert set(stats["status"]) == {200}, stats  # no 5xx, and no 429 either: the queue holds 32
        assert stats["completed"] > CLIENTS and stats["hung_up"] > 0

        wait_until(lambda: state.in_flight == 0 and state.waiting == 0 and not state.jobs and state.free.qsize() == slots,
                   what="the server to go idle")
        wait_until(lambda: server_tasks(server) == tasks_before, what="the server's tasks to finish")
        m = metrics_of(server.url)
        assert m[("nanochat_requests_in_flight", frozenset())] == 0 and m[("nanochat_queue_depth", frozenset())] == 0
        assert m[("nanochat_requests_total", frozenset({("route", "/v1/chat/completions"), ("status", "200")}))] == sum(stats["status"].values())
        # a client that hangs up after the last token was generated did not abandon anything
        assert 0 < m[("nanochat_abandoned_requests_total", frozenset())] <= stats["hung_up"]
        assert m[("nanochat_generated_tokens_total", frozenset())] >= stats["tokens"]
        workers = [t for t in threading.enumerate() if t.name.startswith(state.thread_prefix)]
        assert len(workers) <= slots  # the executor's threads, bounded by the slot count
        if batch_rows > 1:
            assert m[("nanochat_batch_rows_in_use", frozenset())] == 0
            assert all(r.batcher.steps < m[("nanochat_generated_tokens_total", frozenset())] for r in state.replicas)
    finally:
        server.stop()
    leftover = [t for t in threading.enumerate() if t.ident not in threads_before]
    assert not leftover, leftover
