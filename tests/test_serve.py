"""`nanochat serve` against a real uvicorn on 127.0.0.1: the official openai client, httpx for every
error case, health/readiness/metrics, queue limits, disconnects, graceful shutdown, the CLI."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from nanochat.chat_cli import answer_stops
from nanochat.checkpoint import load_model
from nanochat.engine import Engine
from nanochat.serve import (DEFAULT_BATCH_ROWS, BackgroundServer, Limits, Replica, StopMatcher, create_app, split_tool_calls)
from nanochat.store import open_store
from nanochat.tasks import LETTERS, render_mc
from tests.fixtures import fuzz, make_base_checkpoint, make_tokenizer

torch.set_num_threads(1)  # tiny models: threads only add contention on a 2-core box
REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
LIMITS = Limits(max_messages=8, max_message_chars=2000, max_total_chars=4000, max_tokens=100, max_n=4, max_body_bytes=64_000)
TOOL_ANSWER = "Let me compute. <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> The answer is 84."


# -----------------------------------------------------------------------------
# a scripted stand-in for the model: known output, tool call included, optional delay per step

class ScriptCache:
    """Stands in for a KVCache: each row's tokens so far."""

    def __init__(self, rows):
        self.rows = rows

    def replicate(self, n):
        return ScriptCache([list(self.rows[0]) for _ in range(n)])


class ScriptedChat:
    """After any prompt it writes "Let me compute. <python>12*7</python>" (or another call; the engine runs it and
    forces its output), then " The answer is 84." and <|assistant_end|>. With ticking=True it writes
    " tick" until max_tokens instead. `delay` seconds per forward keep a slot busy for the queue tests."""

    def __init__(self, tok, delay=0.0, ticking=False, context=100_000, call="12*7"):
        self.tok, self.delay, self.ticking = tok, delay, ticking
        self.config = SimpleNamespace(sequence_len=context)
        self.vocab = tok.get_vocab_size()
        s = tok.encode_special
        self.a_start, self.out_end = s("<|assistant_start|>"), s("<|output_end|>")
        self.head = tok.encode("Let me compute. ") + [s("<|python_start|>")] + tok.encode(call) + [s("<|python_end|>")]
        self.tail = tok.encode(" The answer is 84.") + [s("<|assistant_end|>")]
        self.tick = tok.encode(" tick")
        self.calls, self.prompts = 0, []

    def get_device(self):
        return torch.device("cpu")

    def new_kv_cache(self, batch_size, max_len=None):
        return ScriptCache([[] for _ in range(batch_size)])

    def next_token(self, generated):
        if self.ticking:
            return self.tick[len(generated) % len(self.tick)]
        if len(generated) < len(self.head):
            return self.head[len(generated)]
        if self.out_end not in generated:
            return 0  # the engine forces the tool output here
        return self.tail[min(len(generated) - generated.index(self.out_end) - 1, len(self.tail) - 1)]

    def __call__(self, idx, kv_cache=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if idx.size(1) > 1:
            self.prompts.append(idx[0].tolist())
        logits = torch.zeros(idx.size(0), 1, self.vocab)
        for b in range(idx.size(0)):
            kv_cache.rows[b].extend(idx[b].tolist())
            row = kv_cache.rows[b]
            start = len(row) - row[::-1].index(self.a_start)
            logits[b, 0, self.next_token(row[start:])] = 30.0
        return logits


def wait_until(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def idle(server, replicas=1):
    s = server.app.state.serve
    return s.in_flight == 0 and s.waiting == 0 and s.free.qsize() == replicas and not s.jobs


def chat(url, body, key=None, timeout=30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def user(text):
    return [{"role": "user", "content": text}]


def metrics_of(url) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def sse_lines(response):
    """The data payloads of an SSE response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[6:]


# -----------------------------------------------------------------------------
# fixtures: a store with a tiny GPT (served with an API key), scripted servers

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(open_store(f"file://{tmp_path_factory.mktemp('tok')}"))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory, tokenizer):
    uri = f"file://{tmp_path_factory.mktemp('serve')}/store"
    store = open_store(uri)
    tokenizer.save(store)
    make_base_checkpoint(store, tokenizer)  # seq_len 128: the context limit
    return uri


@pytest.fixture(scope="module")
def gpt_server(store_uri):
    app = create_app(store_uri, api_key=KEY, limits=LIMITS, devices=["cpu"])
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def engine(store_uri, tokenizer):
    """The same weights as the server's, for comparing outputs token for token."""
    model, _, _ = load_model(open_store(store_uri), "base")
    return Engine(model, tokenizer)


@pytest.fixture(scope="module")
def tool_model(tokenizer):
    return ScriptedChat(tokenizer)


@pytest.fixture(scope="module")
def tool_server(tool_model, tokenizer):
    with BackgroundServer(create_app(model=tool_model, tokenizer=tokenizer, limits=LIMITS)) as server:
        yield server


@pytest.fixture(scope="module")
def slow_model(tokenizer):
    return ScriptedChat(tokenizer, delay=0.02, ticking=True)


@pytest.fixture(scope="module")
def slow_server(slow_model, tokenizer):
    """One replica, one waiting request at most: the third concurrent request gets 429."""
    app = create_app(model=slow_model, tokenizer=tokenizer, max_queue=1, limits=Limits(max_tokens=4000))
    with BackgroundServer(app) as server:
        yield server


def openai_client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def generated_text(engine, tokenizer, messages, **kwargs):
    """The engine's answers as the server gives them: each ends at its first turn-ending special token."""
    prompt = tokenizer.render_for_completion({"messages": messages})
    rows, masks = engine.generate_batch(prompt, **kwargs)
    stops = answer_stops(tokenizer)

    def answer(ids):
        return ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    return [tokenizer.decode(answer(row[len(prompt):])) for row in rows], prompt


# -----------------------------------------------------------------------------
# the official client

def test_openai_client_non_streaming_matches_the_engine(gpt_server, engine, tokenizer):
    client = openai_client(gpt_server)
    messages = user("What is the capital of France?")
    r = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=16, seed=3)
    (expected,), prompt = generated_text(engine, tokenizer, messages, max_tokens=16, seed=3, temperature=1.0)
    assert r.object == "chat.completion" and r.model == "nanochat" and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint == "base/000001"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert 0 < r.usage.completion_tokens <= 16 and r.usage.total_tokens == len(prompt) + r.usage.completion_tokens
    model = client.models.list().data[0]
    assert model.id == "nanochat" and model.checkpoint == "base/000001" and model.step == 1 and model.source == "base"
    assert model.context_length == 128


def test_openai_client_streaming(gpt_server, engine, tokenizer):
    client = openai_client(gpt_server)
    messages = user("Tell me a story.")
    stream = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=24, seed=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    (expected,), prompt = generated_text(engine, tokenizer, messages, max_tokens=24, seed=10, temperature=1.0)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == expected and sum(1 for t in content if t) > 3  # it came in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt)
    assert 0 < chunks[-1].usage.completion_tokens <= 24


def test_raw_stream_ends_with_done(gpt_server):
    with httpx.stream("POST", f"{gpt_server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": user("hi"), "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = list(sse_lines(r))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]


def test_seed_reproducible_n_samples_and_top_p(gpt_server, engine, tokenizer):
    def ask(**kw):
        r = chat(gpt_server.url, {"messages": user("Say something."), "max_tokens": 12, **kw}, KEY)
        assert r.status_code == 200, r.text
        return [c["message"]["content"] for c in r.json()["choices"]]

    assert ask(seed=5) == ask(seed=5)
    assert ask(seed=5) != ask(seed=6)
    three = ask(seed=7, n=3)
    assert three == generated_text(engine, tokenizer, user("Say something."), num_samples=3, max_tokens=12, seed=7, temperature=1.0)[0]
    assert len(set(three)) == 3
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    assert ask(seed=8, top_p=1e-6) == ask(seed=9, temperature=0) == ask(seed=10, temperature=0.7, top_p=1e-6)
    assert ask(seed=8, top_k=1, temperature=1.5) == ask(seed=1, temperature=0)


# -----------------------------------------------------------------------------
# errors: OpenAI-style JSON with the right status, param and code

ERROR_CASES = [
    ("too many messages", {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(9)]}, 400, "messages", "array_too_long"),
    ("message too long", {"messages": user("x" * 2001)}, 400, "messages[0].content", "string_too_long"),
    ("conversation too long", {"messages": user("x" * 1500) + [{"role": "assistant", "content": "y" * 1500}] + user("z" * 1500)}, 400, "messages", "string_too_long"),
    ("temperature too high", {"messages": user("hi"), "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("temperature negative", {"messages": user("hi"), "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ("temperature not a number", {"messages": user("hi"), "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("top_k zero", {"messages": user("hi"), "top_k": 0}, 400, "top_k", "invalid_value"),
    ("top_k too large", {"messages": user("hi"), "top_k": 201}, 400, "top_k", "invalid_value"),
    ("top_p zero", {"messages": user("hi"), "top_p": 0}, 400, "top_p", "invalid_value"),
    ("n too large", {"messages": user("hi"), "n": 5}, 400, "n", "invalid_value"),
    ("max_tokens over the limit", {"messages": user("hi"), "max_tokens": 101}, 400, "max_tokens", "invalid_value"),
    ("max_tokens zero", {"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("prompt longer than the context", {"messages": user("pneumonoultramicroscopic " * 60)}, 400, "messages", "context_length_exceeded"),
    ("prompt + max_tokens past the context", {"messages": user("word " * 20), "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded"),
    ("too many stop sequences", {"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("no messages", {"messages": []}, 400, "messages", "invalid_value"),
    ("messages missing", {"model": "nanochat"}, 400, "messages", "invalid_value"),
    ("unknown role", {"messages": [{"role": "tool", "content": "42"}]}, 400, "messages[0].role", "invalid_value"),
    ("last message from the assistant", {"messages": user("hi") + [{"role": "assistant", "content": "yo"}]}, 400, "messages[1].role", "invalid_value"),
    ("roles out of order", {"messages": user("a") + user("b")}, 400, "messages", "invalid_value"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", "invalid_value"),
]


@pytest.mark.parametrize("name,body,status,param,code", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_cases(gpt_server, name, body, status, param, code):
    r = chat(gpt_server.url, body, KEY)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)


def test_bad_json_and_unknown_route(gpt_server):
    r = httpx.post(f"{gpt_server.url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{gpt_server.url}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_body_too_large(gpt_server):
    big = {"messages": user("x" * 100_000)}
    r = chat(gpt_server.url, big, KEY)  # declared by Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the server counts what arrives
        for _ in range(10):
            yield b" " * 10_000
    r = httpx.post(f"{gpt_server.url}/v1/chat/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_auth(gpt_server):
    url = gpt_server.url
    r = chat(url, {"messages": user("hi")})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key" and r.headers["www-authenticate"] == "Bearer"
    r = chat(url, {"messages": user("hi")}, key=KEY + "x")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    from openai import AuthenticationError, OpenAI
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(model="nanochat", messages=user("hi"))
    # the UI, probes and metrics stay open: the UI asks for the key itself
    for path in ("/", "/healthz", "/readyz", "/metrics", "/ui/app.js"):
        assert httpx.get(url + path).status_code == 200, path


# -----------------------------------------------------------------------------
# tool calls, stop sequences, history round trip (scripted model)

def test_tool_call_shown_in_the_content(tool_server, tool_model, tokenizer):
    r = chat(tool_server.url, {"messages": user("What is 12*7?")})
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["content"] == TOOL_ANSWER
    assert body["choices"][0]["finish_reason"] == "stop"
    # streamed the same way
    with httpx.stream("POST", f"{tool_server.url}/v1/chat/completions", json={"messages": user("What is 12*7?"), "stream": True}) as r:
        import json
        chunks = [json.loads(p) for p in sse_lines(r) if p != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == TOOL_ANSWER


def test_history_with_tool_calls_round_trips(tool_server, tool_model, tokenizer):
    messages = user("What is 12*7?") + [{"role": "assistant", "content": TOOL_ANSWER}] + user("And 84/2?")
    r = chat(tool_server.url, {"messages": messages})
    assert r.status_code == 200
    expected = tokenizer.render_for_completion({"messages": messages[:1] + [{"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]}] + messages[2:]})
    assert tool_model.prompts[-1] == expected
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    # the same history given as parts
    parts = [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12*7"},
             {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]
    r = chat(tool_server.url, {"messages": messages[:1] + [{"role": "assistant", "content": parts}] + messages[2:]})
    assert r.status_code == 200 and tool_model.prompts[-1] == expected


def test_choice_tool_reads_the_options_of_the_last_question(tokenizer):
    question = render_mc("Which of these is a fruit?", LETTERS, ["chair", "pear", "dog", "red"])
    with BackgroundServer(create_app(model=ScriptedChat(tokenizer, call="choice('pear')"), tokenizer=tokenizer,
                                     limits=LIMITS)) as server:
        r = chat(server.url, {"messages": user(question)})
        assert r.status_code == 200
        assert "<|python_start|>choice('pear')<|python_end|><|output_start|>B<|output_end|>" in r.json()["choices"][0]["message"]["content"]
        # a later question without options: the earlier one's options are not used
        r = chat(server.url, {"messages": user(question) + [{"role": "assistant", "content": "B"}] + user("And now?")})
        assert "<|output_start|>error: no options to choose from<|output_end|>" in r.json()["choices"][0]["message"]["content"]


def test_stop_sequences(tool_server):
    r = chat(tool_server.url, {"messages": user("hi"), "stop": ["answer", "zzz"]})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == TOOL_ANSWER[:TOOL_ANSWER.index("answer")] and choice["finish_reason"] == "stop"
    with httpx.stream("POST", f"{tool_server.url}/v1/chat/completions", json={"messages": user("hi"), "stop": "84", "stream": True}) as r:
        import json
        chunks = [json.loads(p) for p in sse_lines(r) if p != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == TOOL_ANSWER[:TOOL_ANSWER.index("84")]
    r = chat(tool_server.url, {"messages": user("hi"), "max_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 3


def test_a_made_up_next_turn_ends_the_answer(tokenizer):
    """A model writing the user's next turn (...?<|user_end|><|assistant_start|>...) is cut at the first turn marker:
    the tool markers stay, the marker's text never reaches the client, finish_reason is "stop", decoding stops there."""
    import json
    s = tokenizer.encode_special
    model = ScriptedChat(tokenizer)
    model.tail = tokenizer.encode(" Sure?") + [s("<|user_end|>"), s("<|assistant_start|>")] + tokenizer.encode(" The packs hold")
    expected = TOOL_ANSWER.replace(" The answer is 84.", " Sure?")
    with BackgroundServer(create_app(model=model, tokenizer=tokenizer, limits=LIMITS)) as server:
        calls = model.calls
        r = chat(server.url, {"messages": user("hi"), "max_tokens": 80})
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
        assert model.calls - calls <= usage["completion_tokens"] + 1 < 80  # no forward pass after <|user_end|>
        body = {"messages": user("hi"), "max_tokens": 80, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            chunks = [json.loads(p)["choices"] for p in sse_lines(r) if p != "[DONE]"]
    assert "".join(c[0]["delta"].get("content", "") for c in chunks if c) == expected
    assert [c[0]["finish_reason"] for c in chunks if c and c[0]["finish_reason"]] == ["stop"]


def test_stop_matcher_and_tool_split_units():
    m = StopMatcher(["END", "xy"])
    out = [m.feed(t) for t in ["abc E", "N", "x", "D more", "x", "y!"]]  # held back while it could still be a stop
    assert out == [("abc ", False), ("", False), ("EN", False), ("xD more", False), ("", False), ("", True)]
    m = StopMatcher(["END"])
    assert [m.feed(t) for t in ["ab", "cE", "ND tail"]] == [("ab", False), ("c", False), ("", True)]
    m = StopMatcher(["END"])
    assert m.feed("abE") == ("ab", False) and m.flush() == "E"
    assert split_tool_calls("a<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|>b<|python_start|>open") == [
        {"type": "text", "text": "a"}, {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"},
        {"type": "text", "text": "b<|python_start|>open"}]


def stop_reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Generation is a stream: the stop that completes first ends it (of stops completing at once, the longest)."""
    ends = [(e, -len(s)) for e in range(1, len(text) + 1) for s in stops if text[:e].endswith(s)]
    if not ends:
        return text, False
    end, minus_len = min(ends)
    return text[:end + minus_len], True


@fuzz(300)
@given(text=st.text("abc", max_size=24), stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=4),
       cuts=st.sets(st.integers(1, 23)))
@example(text="abcd", stops=["abcd", "c"], cuts=set())  # one chunk holds both: "c" completes first
@example(text="xabc", stops=["abc", "bc"], cuts={3})     # both complete at once: the longer one cuts earlier
def test_stop_matcher_cuts_where_a_token_by_token_stream_would_however_the_text_is_chunked(text, stops, cuts):
    """Whatever the chunks (tokens decode to one character or many), the streamed text is the text up to the first
    stop to complete, and after each chunk only a possible start of a stop is held back (the longest one)."""
    bounds = [0, *sorted(c for c in cuts if c < len(text)), len(text)]
    matcher, out, fed, hit = StopMatcher(stops), "", "", False
    for a, b in zip(bounds, bounds[1:]):
        fed += text[a:b]
        piece, hit = matcher.feed(text[a:b])
        out += piece
        if hit:
            break
        held = max((k for s in stops for k in range(1, len(s)) if fed.endswith(s[:k])), default=0)
        assert out == fed[:len(fed) - held]
    if not hit:
        out += matcher.flush()
    assert (out, hit) == stop_reference(text, stops)


# -----------------------------------------------------------------------------
# queue limits, disconnects, shutdown (slow scripted model: 20 ms per token)

def open_stream(client, url, max_tokens=4000):
    req = client.build_request("POST", f"{url}/v1/chat/completions",
                               json={"messages": user("go"), "max_tokens": max_tokens, "stream": True})
    r = client.send(req, stream=True)
    return r, sse_lines(r)


def first_content(lines):
    for payload in lines:
        if '"content":" ' in payload or '"content":"tick' in payload:
            return payload
    raise AssertionError("stream ended without content")


def test_queue_full_gets_429_and_slots_come_back(slow_server):
    url = slow_server.url
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        ra, lines_a = open_stream(a, url)
        first_content(lines_a)                      # A holds the only replica
        rb, lines_b = open_stream(b, url)           # B waits in the queue (max_queue=1)
        assert rb.status_code == 200
        wait_until(lambda: slow_server.app.state.serve.waiting == 1, what="B queued")
        r = chat(url, {"messages": user("go"), "max_tokens": 5})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                      "param": None, "code": "rate_limit_exceeded"}
        m = metrics_of(url)
        assert m[("nanochat_queue_depth", frozenset())] == 1 and m[("nanochat_requests_in_flight", frozenset())] == 2
        ra.close()                                  # A leaves: B gets the replica
        first_content(lines_b)
        rb.close()
    wait_until(lambda: idle(slow_server), what="the slot to come back")
    assert chat(url, {"messages": user("go"), "max_tokens": 3}).status_code == 200


def test_streaming_disconnect_stops_generation(slow_server, slow_model):
    url = slow_server.url
    before = metrics_of(url).get(("nanochat_abandoned_requests_total", frozenset()), 0)
    with httpx.Client(timeout=30) as client:
        r, lines = open_stream(client, url)
        first_content(lines)
        r.close()
    wait_until(lambda: idle(slow_server), what="the slot to come back")
    calls = slow_model.calls
    time.sleep(0.3)
    assert slow_model.calls == calls  # the worker thread stopped generating
    assert metrics_of(url)[("nanochat_abandoned_requests_total", frozenset())] == before + 1


def test_non_streaming_disconnect_frees_the_slot(slow_server, slow_model):
    url = slow_server.url
    with pytest.raises(httpx.ReadTimeout):
        chat(url, {"messages": user("go"), "max_tokens": 4000}, timeout=0.5)
    wait_until(lambda: idle(slow_server), what="the slot to come back")
    calls = slow_model.calls
    time.sleep(0.3)
    assert slow_model.calls == calls
    assert metrics_of(url)[("nanochat_requests_total", frozenset({("route", "/v1/chat/completions"), ("status", "499")}))] >= 1


def test_graceful_shutdown_drains_in_flight_streams(tokenizer):
    model = ScriptedChat(tokenizer, delay=0.02, ticking=True)
    server = BackgroundServer(create_app(model=model, tokenizer=tokenizer)).start().wait_ready()
    with httpx.Client(timeout=30) as client:
        r, lines = open_stream(client, server.url, max_tokens=40)
        first_content(lines)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = list(lines)  # the stream runs to its end while the server shuts down
    stopper.join(30)
    assert rest[-1] == "[DONE]" and '"finish_reason":"length"' in rest[-2]
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz")
    prefix = server.app.state.serve.thread_prefix
    assert model.calls == 40 and not [t for t in threading.enumerate() if t.name.startswith(prefix)]


# -----------------------------------------------------------------------------
# health, readiness, metrics

def test_readiness_waits_for_the_model_and_health_answers_at_once(tokenizer):
    gate = threading.Event()
    model = ScriptedChat(tokenizer)

    def slow_loader(devices):
        gate.wait(30)
        return [Replica(model, tokenizer, Engine(model, tokenizer), d) for d in devices], {"checkpoint": "sft/000042", "source": "sft", "step": 42}
    app = create_app(loader=slow_loader)
    server = BackgroundServer(app).start()
    try:
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = chat(server.url, {"messages": user("hi")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert metrics_of(server.url)[("nanochat_model_ready", frozenset())] == 0
        gate.set()
        wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, what="ready")
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["checkpoint"] == "sft/000042"
        assert chat(server.url, {"messages": user("hi")}).json()["choices"][0]["message"]["content"] == TOOL_ANSWER
        m = metrics_of(server.url)
        assert m[("nanochat_model_ready", frozenset())] == 1
        assert m[("nanochat_checkpoint_info", frozenset({("checkpoint", "sft/000042"), ("source", "sft"), ("step", "42")}))] == 1
    finally:
        gate.set()
        server.stop()


def test_failed_load_fails_liveness(tmp_path):
    app = create_app(f"file://{tmp_path}/empty-store", devices=["cpu"])
    server = BackgroundServer(app).start()
    try:
        wait_until(lambda: app.state.serve.load_error is not None, what="the load to fail")
        r = httpx.get(f"{server.url}/healthz")
        assert r.status_code == 500 and "tokenizer" in r.json()["error"]
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "failed"
        assert "loading the model failed" in chat(server.url, {"messages": user("hi")}).json()["error"]["message"]
    finally:
        server.stop()


def test_metrics_count_requests_tokens_and_latency(gpt_server):
    url = gpt_server.url
    before = metrics_of(url)
    usage = [chat(url, {"messages": user(f"hello {i}"), "max_tokens": 10, "seed": i}, KEY).json()["usage"]["completion_tokens"] for i in range(3)]
    chat(url, {"messages": user("hi"), "temperature": 9}, KEY)
    chat(url, {"messages": user("hi")})
    m = metrics_of(url)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return m.get(key, 0) - before.get(key, 0)
    route = "/v1/chat/completions"
    assert delta("nanochat_requests_total", route=route, status="200") == 3
    assert delta("nanochat_requests_total", route=route, status="400") == 1
    assert delta("nanochat_requests_total", route=route, status="401") == 1
    assert delta("nanochat_generated_tokens_total") == sum(usage)
    assert delta("nanochat_time_to_first_token_seconds_count") == 3
    assert delta("nanochat_tokens_per_second_count") == 3
    assert m[("nanochat_requests_in_flight", frozenset())] == 0 and m[("nanochat_queue_depth", frozenset())] == 0
    assert m[("nanochat_model_ready", frozenset())] == 1


def test_ui_is_served(gpt_server):
    r = httpx.get(gpt_server.url + "/")
    assert r.status_code == 200 and "ui/app.js" in r.text and "<script src=\"http" not in r.text
    assert "getReader()" in httpx.get(gpt_server.url + "/ui/app.js").text  # streams with fetch, no EventSource/CDN
    assert httpx.get(gpt_server.url + "/ui/style.css").headers["content-type"].startswith("text/css")


# -----------------------------------------------------------------------------
# continuous batching: --batch-rows

@pytest.fixture(scope="module")
def batched_server(store_uri):
    app = create_app(store_uri, api_key=KEY, limits=LIMITS, devices=["cpu"], batch_rows=3)
    with BackgroundServer(app) as server:
        yield server


def test_batched_requests_answer_as_the_engine_does(batched_server, engine, tokenizer):
    """Six concurrent requests through one replica's 3 rows (n=2 takes two): each answer is the engine's alone, and
    they shared decode steps."""
    from concurrent.futures import ThreadPoolExecutor
    bodies = [{"messages": user(f"Tell me about {w}."), "max_tokens": 10 + i, "seed": i, "n": 2 if i == 2 else 1,
               "temperature": [0, 0.7, 1.0][i % 3]} for i, w in enumerate(["cats", "dogs", "the sea", "rain", "maps", "tea"])]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: chat(batched_server.url, body, KEY), bodies))
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        want, _ = generated_text(engine, tokenizer, body["messages"], num_samples=body["n"], max_tokens=body["max_tokens"],
                                 seed=body["seed"], temperature=body["temperature"])
        assert [c["message"]["content"] for c in r.json()["choices"]] == want
    state = batched_server.app.state.serve
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in answers)
    assert state.replicas[0].batcher.steps < tokens  # some steps decoded several requests
    wait_until(lambda: idle(batched_server, replicas=3), what="every slot back")
    assert metrics_of(batched_server.url)[("nanochat_batch_rows_in_use", frozenset())] == 0
    assert httpx.get(f"{batched_server.url}/readyz").json()["batch_rows"] == 3


def test_batching_is_the_default_for_a_nanochat_gpt_only(gpt_server, slow_server):
    """A checkpoint's GPT decodes in a continuous batch of DEFAULT_BATCH_ROWS; a model without the static decode step
    (the scripted one here) falls back to one request at a time instead of failing to load."""
    assert httpx.get(f"{gpt_server.url}/readyz").json()["batch_rows"] == DEFAULT_BATCH_ROWS > 1
    assert gpt_server.app.state.serve.replicas[0].batcher.rows == DEFAULT_BATCH_ROWS
    assert httpx.get(f"{slow_server.url}/readyz").json()["batch_rows"] == 1
    assert slow_server.app.state.serve.replicas[0].batcher is None


def test_a_request_waiting_for_rows_counts_as_queued(batched_server, tokenizer):
    """nanochat_queue_depth counts a request that holds a replica slot but waits inside the batch for rows (here: held
    back by the batch's lock, as n samples would be by busy rows), not only those waiting for a slot."""
    batcher = batched_server.app.state.serve.replicas[0].batcher
    with batcher.cond:  # the scheduler cannot take arrivals while this is held
        stream = batcher.generate(tokenizer.encode("hi"), max_tokens=2)
        assert metrics_of(batched_server.url)[("nanochat_queue_depth", frozenset())] == 1
    assert len(list(stream)) == 2
    assert metrics_of(batched_server.url)[("nanochat_queue_depth", frozenset())] == 0


def test_a_batch_is_warmed_up_before_the_server_is_ready(store_uri):
    """/readyz says ready only after each batch decoded a warm-up request (cache allocated; on CUDA, graphs captured),
    which no metric counts as a request."""
    with BackgroundServer(create_app(store_uri, devices=["cpu"], batch_rows=2)) as server:
        batcher = server.app.state.serve.replicas[0].batcher
        assert batcher.decoder is not None and batcher.steps == 1  # 2 tokens: the second needs one step
        m = metrics_of(server.url)
        assert m[("nanochat_generated_tokens_total", frozenset())] == 0 and m[("nanochat_batch_rows_in_use", frozenset())] == 0


def test_batched_server_refuses_more_samples_than_rows(batched_server):
    r = chat(batched_server.url, {"messages": user("hi"), "n": 4}, KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--batch-rows" in r.json()["error"]["message"]


# -----------------------------------------------------------------------------
# the command line: `nanochat serve`

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_a_store_and_stops_on_sigterm(store_uri, tmp_path):
    port = free_port()
    env = {**os.environ, "NANOCHAT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--store", store_uri, "--port", str(port), "-i", "base"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                return False
        wait_until(ready, timeout=60, what="the server")
        assert httpx.get(f"{url}/readyz").json()["checkpoint"] == "base/000001"
        assert chat(url, {"messages": user("hi")}).status_code == 401  # the key came from the environment
        r = chat(url, {"messages": user("hi"), "max_tokens": 4}, KEY)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn drains, runs the lifespan shutdown, then re-raises SIGTERM so the exit status says why it ended
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out


def test_cli_without_a_model_says_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanochat.cli", "serve", "--store", f"file://{tmp_path}/nothing"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "speedrun" in r.stderr
