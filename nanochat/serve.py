"""
`nanochat serve`: the web chat UI and an OpenAI-compatible API over the inference engine.

    nanochat serve [--store URI] [--run NAME] [-i sft|rl|mid|base] [--port 8000] [--api-key KEY]

One engine replica per GPU (or one on CPU) sits behind an async queue: a request waits for a free
slot of a replica, its generation runs in a worker thread, and the text streams back to the event loop
through an asyncio.Queue. A replica has --batch-rows N slots (default 8) whose requests decode together, one token
each per step (continuous batching, nanochat.batching); with --batch-rows 1 it runs one request at a time. The model loads
in the background: /healthz answers at once, /readyz and the API say 503 until the weights are in and each
batch has decoded a warm-up request (its cache allocated, its CUDA graphs captured). A load that fails stops
`nanochat serve` with one error line and exit status 1 (Kubernetes restarts it with backoff).

Tool calls appear in the text between the tokenizer's own markers,
`<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>`; assistant messages sent back
in a conversation are split at the same markers, so a history with tool calls round-trips exactly.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.batching import Batcher, batchable
from nanochat.chat_cli import answer_stops
from nanochat.engine import Engine, Utf8StreamDecoder, requested_decode
from nanochat.store import StoreError

log = logging.getLogger("nanochat.serve")

UI_DIR = Path(__file__).resolve().parent / "ui"
MODEL_NAME = "nanochat"
DEFAULT_MAX_QUEUE = 64       # requests waiting for a replica before new ones get 429
DEFAULT_BATCH_ROWS = 8       # rows decoded together per replica (continuous batching; 1: one request at a time)
DRAIN_TIMEOUT_S = 30         # graceful shutdown: how long in-flight streams may finish
TOOL_PARTS = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


@dataclass
class Limits:
    """What one request may ask for; beyond it the API answers 4xx with an OpenAI-style error."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens: int = 4096
    max_n: int = 8
    max_stop: int = 4
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_body_bytes: int = 1_000_000


# -----------------------------------------------------------------------------
# errors: {"error": {"message", "type", "param", "code"}} like the OpenAI API

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message, param=None, code="invalid_value"):
    return APIError(400, message, param, code)


# -----------------------------------------------------------------------------
# requests: validation and the conversation they describe

class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, penalties...) are accepted
    messages: list
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None


def chat_request_schema(limits: Limits) -> dict:
    """JSON schema of the POST /v1/chat/completions body as this server accepts it (published in /openapi.json:
    the route reads its body itself, so FastAPI cannot derive it). Other OpenAI fields are accepted and ignored."""
    text = {"type": "string", "maxLength": limits.max_message_chars}
    part = {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"enum": ["text", "python", "python_output"], "description": "python parts: assistant messages only"},
        "text": text}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "user", "assistant"]},
        "content": {"anyOf": [text, {"type": "array", "items": part}]}}}
    def integer(lo, hi):
        return {"anyOf": [{"type": "integer", "minimum": lo, "maximum": hi}, {"type": "null"}]}
    stop = {"type": "string", "minLength": 1}
    return {"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": limits.max_messages,
                     "description": "the last message is from the user"},
        "model": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "max_tokens": integer(1, limits.max_tokens), "max_completion_tokens": integer(1, limits.max_tokens),
        "temperature": {"anyOf": [{"type": "number", "minimum": 0, "maximum": limits.max_temperature}, {"type": "null"}]},
        "top_p": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "null"}]},
        "top_k": integer(1, limits.max_top_k), "n": integer(1, limits.max_n), "seed": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "stop": {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": limits.max_stop}, {"type": "null"}]},
        "stream": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "stream_options": {"anyOf": [{"type": "object", "properties": {"include_usage": {"type": "boolean"}}}, {"type": "null"}]}}}


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    n: int
    seed: int
    stop: list[str]


def parse_request(body: bytes, limits: Limits) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"request body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise invalid(f"{param}: {err['msg']}", param=param)
    check_ranges(req, limits)
    return req


def check_ranges(req: ChatRequest, limits: Limits):
    if not req.messages:
        raise invalid("messages must be a non-empty list", "messages")
    if len(req.messages) > limits.max_messages:
        raise invalid(f"too many messages: {len(req.messages)} > {limits.max_messages}", "messages", "array_too_long")
    if req.temperature is not None and not 0 <= req.temperature <= limits.max_temperature:
        raise invalid(f"temperature must be between 0 and {limits.max_temperature}, got {req.temperature}", "temperature")
    if req.top_k is not None and not 1 <= req.top_k <= limits.max_top_k:
        raise invalid(f"top_k must be between 1 and {limits.max_top_k}, got {req.top_k}", "top_k")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.n is not None and not 1 <= req.n <= limits.max_n:
        raise invalid(f"n must be between 1 and {limits.max_n}, got {req.n}", "n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and not 1 <= value <= limits.max_tokens:
            raise invalid(f"{name} must be between 1 and {limits.max_tokens}, got {value}", name)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise invalid(f"stop must be up to {limits.max_stop} non-empty strings", "stop")


def text_of(content, param: str) -> str:
    """A user or system message's text: a string, or OpenAI's list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise invalid("content must be a string or a list of text parts", param)


def assistant_parts(content, param: str) -> list[dict]:
    """Assistant content as conversation parts: text is split at the tool-call markers we emit."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid("content must be a string or a list of parts", param)
    parts = []
    for p in content:
        if not (isinstance(p, dict) and p.get("type") in ("text", "python", "python_output") and isinstance(p.get("text"), str)):
            raise invalid("assistant parts must be {type: text|python|python_output, text: string}", param)
        parts.extend(split_tool_calls(p["text"]) if p["type"] == "text" else [{"type": p["type"], "text": p["text"]}])
    return parts


def split_tool_calls(text: str) -> list[dict]:
    parts, pos = [], 0
    for m in TOOL_PARTS.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m[1]} if m[1] is not None else {"type": "python_output", "text": m[2]})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def to_conversation(messages: list, limits: Limits) -> dict:
    out, total = [], 0
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or "content" not in m:
            raise invalid("each message needs a role and a content", param)
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise invalid(f"role {role!r} is not supported (system, user, assistant)", f"{param}.role")
        if role == "assistant":
            content = assistant_parts(m["content"], f"{param}.content")
            chars = sum(len(p["text"]) for p in content)
        else:
            content = text_of(m["content"], f"{param}.content")
            chars = len(content)
        if chars > limits.max_message_chars:
            raise invalid(f"message {i} has {chars} characters, more than {limits.max_message_chars}", f"{param}.content", "string_too_long")
        total += chars
        out.append({"role": role, "content": content})
    if total > limits.max_total_chars:
        raise invalid(f"the conversation has {total} characters, more than {limits.max_total_chars}", "messages", "string_too_long")
    if out[-1]["role"] != "user":
        raise invalid("the last message must be from the user", f"messages[{len(out) - 1}].role")
    return {"messages": out}


async def read_body(request: Request, cap: int) -> bytes:
    """The body, refused with 413 past `cap` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body is larger than {cap} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > cap:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# -----------------------------------------------------------------------------
# text of one sample: UTF-8-safe decoding, stop sequences, finish reason

class StopMatcher:
    """Holds back text that could be the start of a stop sequence; cuts at the first one to complete, as a stream of
    single characters would, however many characters a token brings (of stops completing together, the longest)."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [(i + len(s), i) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)[1]], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class SampleText:
    def __init__(self, tokenizer, stops: list[str], terminals: set[int]):
        self.decoder, self.stop, self.terminals = Utf8StreamDecoder(tokenizer), StopMatcher(stops), terminals
        self.finish, self.tokens = None, 0

    def add(self, token: int):
        """(new text, finish reason or None) for one generated token; None once the sample is finished."""
        if self.finish:
            return None
        if token in self.terminals:
            return self._end(self.decoder.flush(), "stop")
        self.tokens += 1
        text, hit = self.stop.feed(self.decoder.feed(token))
        if hit:
            self.finish = "stop"
        return text, self.finish

    def close(self):
        """Out of tokens: the rest of the text with finish reason "length"."""
        return None if self.finish else self._end(self.decoder.flush(), "length")

    def _end(self, text, reason):
        self.finish = reason
        text, hit = self.stop.feed(text)
        return (text if hit else text + self.stop.flush()), "stop" if hit else reason


# -----------------------------------------------------------------------------
# metrics: one registry per app, so several apps can live in one process (tests)

class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "API requests by route and HTTP status", ["route", "status"], registry=r)
        self.in_flight = Gauge("nanochat_requests_in_flight", "chat completions admitted and not finished (queued or generating)", registry=r)
        self.queue_depth = Gauge("nanochat_queue_depth", "chat completions waiting for a free engine replica, or for "
                                 "free rows in its continuous batch", registry=r)
        self.batch_rows = Gauge("nanochat_batch_rows_in_use", "rows of the continuous batches decoding a request (all replicas)", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "request arrival to the first generated token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tokens_per_s = Histogram("nanochat_tokens_per_second", "completion tokens per second of generation, per request",
                                      buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000), registry=r)
        self.tokens = Counter("nanochat_generated_tokens", "completion tokens generated", registry=r)
        self.abandoned = Counter("nanochat_abandoned_requests", "chat completions whose client left before the end", registry=r)
        self.ready = Gauge("nanochat_model_ready", "1 once the model is loaded", registry=r)
        self.checkpoint = Info("nanochat_checkpoint", "the checkpoint being served", registry=r)


class StatusCounter:
    """ASGI middleware counting API responses by status (pure ASGI: streaming passes straight through)."""
    ROUTES = ("/v1/chat/completions", "/v1/models")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()


# -----------------------------------------------------------------------------
# replicas, the queue in front of them, and one request's generation

@dataclass
class Replica:
    model: object
    tokenizer: object
    engine: Engine
    device: str
    batcher: Batcher | None = None  # continuous batching (--batch-rows > 1): the requests of all its slots decode together

    @property
    def slots(self):
        return self.batcher.rows if self.batcher else 1


def warm_up(batcher: Batcher, tokenizer):
    """Decode two tokens through the batch before the replica is ready: its cache is allocated and, on CUDA, its step
    graphs captured (a second or so for d20) at startup, not in the first client's time to first token."""
    t0 = time.perf_counter()
    for _ in batcher.generate([tokenizer.get_bos_token_id()], max_tokens=2, temperature=0.0):
        pass
    log.info("warmed up a %d-row batch (%s decode) in %.2f s", batcher.rows, batcher.mode, time.perf_counter() - t0)


class Job:
    """One chat completion: admitted (or 429), waits for a replica, generates in a worker thread.

    Events from the thread: ("step", [(text, finish) | None per sample]), ("end", [... per sample]),
    ("error", message). close() is idempotent and always runs: it stops the thread at its next token,
    and the thread hands the replica back when it returns."""

    def __init__(self, server: "ServeState", prompt: list[int], sampling: Sampling):
        self.server, self.prompt, self.sampling = server, prompt, sampling
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.state = "queued"  # queued → running → done | closed
        self.t_arrival = time.perf_counter()
        self.t_first = None
        self.tokens = [0] * sampling.n

    async def start(self):
        server = self.server
        replica = await server.free.get()  # FIFO; cancellation-safe
        if self.state != "queued":  # closed while we waited
            server.free.put_nowait(replica)
            return
        server.waiting -= 1
        self.state = "running"
        server.executor.submit(self._run, replica)

    async def next_event(self):
        kind, payload = await self.events.get()
        now = time.perf_counter()
        if kind == "step" and self.t_first is None:
            self.t_first = now
            self.server.metrics.ttft.observe(now - self.t_arrival)
        if kind == "end":
            self.tokens = [t for _, _, t in payload]
            total = sum(self.tokens)
            self.server.metrics.tokens.inc(total)
            if total > 1 and now > self.t_first:
                self.server.metrics.tokens_per_s.observe(total / (now - self.t_first))
            self.state = "done"
        if kind == "error":
            self.state = "done"
            raise APIError(500, f"generation failed: {payload}", code="generation_failed")
        return kind, payload

    def close(self):
        server = self.server
        if self.state == "closed":
            return
        if self.state == "queued":
            server.waiting -= 1
        if self.state in ("queued", "running"):
            server.metrics.abandoned.inc()
        self.cancel.set()
        self.state = "closed"
        server.in_flight -= 1
        server.metrics.in_flight.set(server.in_flight)
        server.jobs.discard(self)

    # -- the worker thread ---------------------------------------------------------------------

    def _post(self, kind, payload):
        try:
            self.server.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def _run(self, replica: Replica):
        try:
            self._generate(replica)
        except Exception as e:
            log.exception("generation failed")
            self._post("error", f"{type(e).__name__}: {e}")
        finally:
            self.server.release_threadsafe(replica)

    def _generate(self, replica: Replica):
        s = self.sampling
        engine = replica.engine  # one per replica: its static decoders (CUDA graphs) serve every request
        terminals = answer_stops(replica.tokenizer)  # <|assistant_end|>, and a made-up next turn's <|user_end|>...
        samples = [SampleText(replica.tokenizer, s.stop, terminals) for _ in range(s.n)]
        decoder = replica.batcher or engine  # the same stream either way
        stream = decoder.generate(self.prompt, num_samples=s.n, max_tokens=s.max_tokens, temperature=s.temperature,
                                  top_k=s.top_k, seed=s.seed, top_p=s.top_p)
        try:
            for column, _ in stream:
                if self.cancel.is_set():
                    return
                self._post("step", [sample.add(token) for sample, token in zip(samples, column)])
                if all(sample.finish for sample in samples):
                    break
        finally:
            stream.close()  # frees the KV cache now, not at garbage collection
        self._post("end", [(*(sample.close() or ("", None)), sample.tokens) for sample in samples])


class ServeState:
    """Everything one app holds: the replicas, the queue, the limits, the metrics, the readiness."""

    def __init__(self, loader, devices: list[str], api_key: str | None, max_queue: int, limits: Limits, model_name: str,
                 batch_rows: int = DEFAULT_BATCH_ROWS):
        self.loader, self.devices, self.batch_rows = loader, devices, batch_rows
        self.api_key, self.max_queue, self.limits, self.model_name = api_key, max_queue, limits, model_name
        self.metrics = Metrics()
        self.ready, self.load_error = False, None
        self.on_load_error = None  # called after a failed load (`nanochat serve`: stop the process)
        self.tokenizer, self.info = None, {}
        self.context_len = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.free: asyncio.Queue | None = None
        self.thread_prefix = f"nanochat-gen-{secrets.token_hex(3)}"  # this app's worker threads, by name
        self.executor = ThreadPoolExecutor(max_workers=len(devices) * batch_rows, thread_name_prefix=self.thread_prefix)
        self.replicas: list[Replica] = []
        self.waiting = self.in_flight = 0
        self.metrics.queue_depth.set_function(self.queued)
        self.jobs: set[Job] = set()
        self.created = int(time.time())

    # -- loading (a background thread at startup) ----------------------------------------------

    def load(self):
        try:
            replicas, self.info = self.loader(self.devices)
            self.tokenizer = replicas[0].tokenizer
            self.context_len = replicas[0].model.config.sequence_len
            if self.batch_rows > 1 and not all(batchable(r.engine) for r in replicas):
                log.warning("continuous batching needs a nanochat GPT: one request at a time per replica instead")
                self.batch_rows = 1
            if self.batch_rows > 1:
                for r in replicas:
                    r.batcher = Batcher(r.engine, self.batch_rows)
                    warm_up(r.batcher, r.tokenizer)
                self.metrics.batch_rows.set_function(lambda: sum(r.batcher.rows_in_use for r in self.replicas))
            self.replicas = replicas
            for r in replicas:
                for _ in range(r.slots):
                    self.release_threadsafe(r)
            self.metrics.checkpoint.info({k: str(v) for k, v in self.info.items()})
            self.ready = True
            self.metrics.ready.set(1)
            log.info("serving %s (%d replica(s) on %s, %d row(s) each)", self.info.get("checkpoint"), len(replicas),
                     ", ".join(self.devices), self.batch_rows)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            if isinstance(e, (StoreError, ValueError)):  # a known cause says it all; anything else needs its traceback
                log.error("loading the model failed: %s", self.load_error)
            else:
                log.exception("loading the model failed")
            if self.on_load_error:
                self.on_load_error()

    def queued(self) -> int:
        """Requests admitted but not decoding yet: waiting for a replica, or inside one for rows of its batch (a request
        of n samples waits there until n rows are free)."""
        return self.waiting + sum(len(r.batcher.pending) for r in self.replicas if r.batcher)

    def release_threadsafe(self, replica: Replica):
        try:
            self.loop.call_soon_threadsafe(self.free.put_nowait, replica)
        except RuntimeError:
            pass

    # -- per request ---------------------------------------------------------------------------

    def check_auth(self, request: Request):
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_ready(self):
        if not self.ready:
            detail = f"loading the model failed: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, detail, code="model_not_ready", headers={"Retry-After": "5"})

    def prompt_and_sampling(self, req: ChatRequest) -> tuple[list[int], Sampling]:
        conversation = to_conversation(req.messages, self.limits)
        try:
            prompt = self.tokenizer.render_for_completion(conversation)
        except ValueError as e:
            raise invalid(str(e), "messages")
        room = self.context_len - len(prompt)
        if room < 1:
            raise invalid(f"the prompt is {len(prompt)} tokens; this model's context is {self.context_len} tokens",
                          "messages", "context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > room:
            raise invalid(f"the prompt is {len(prompt)} tokens and max_tokens is {asked}: more than this model's context "
                          f"of {self.context_len} tokens", "max_tokens", "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return prompt, Sampling(
            max_tokens=asked or min(room, self.limits.max_tokens),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k, top_p=1.0 if req.top_p is None else req.top_p, n=self.check_n(req.n or 1),
            seed=secrets.randbits(63) if req.seed is None else req.seed % 2**64, stop=stops)

    def check_n(self, n: int) -> int:
        if self.batch_rows > 1 and n > self.batch_rows:
            raise invalid(f"n is {n}; this server decodes {self.batch_rows} rows per batch (--batch-rows)", "n")
        return n

    def admit(self, prompt: list[int], sampling: Sampling) -> Job:
        """A queued job, or 429 when every replica is busy and max_queue requests already wait."""
        if self.waiting >= self.max_queue + self.free.qsize():  # admitted jobs not started yet count as waiting
            raise APIError(429, f"the server is busy: {self.waiting} requests are already waiting", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        job = Job(self, prompt, sampling)
        self.waiting += 1
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.jobs.add(job)
        return job

    def shutdown(self):
        for job in list(self.jobs):
            job.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for r in self.replicas:
            if r.batcher:
                r.batcher.close()


# -----------------------------------------------------------------------------
# responses

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(job: Job) -> dict:
    completion = sum(job.tokens)
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion, "total_tokens": len(job.prompt) + completion}


class EventStream(StreamingResponse):
    """SSE response that closes its job however the stream ends: done, error, or the client leaving
    (even before the first byte, when the body iterator never starts)."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def stream_chunks(job: Job, head: dict, include_usage: bool):
    n = job.sampling.n
    yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)]})
    try:
        await job.start()
        while True:
            kind, deltas = await job.next_event()
            choices = [{"index": i, "delta": {"content": d[0]} if d[0] else {}, "finish_reason": d[1]}
                       for i, d in enumerate(deltas) if d is not None and (d[0] or d[1])]
            if choices:
                yield _sse({**head, "choices": choices})
            if kind == "end":
                break
    except APIError as e:
        yield _sse(e.body())
        return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(job)})
    yield "data: [DONE]\n\n"


async def _client_gone(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def complete(job: Job, request: Request, head: dict) -> Response:
    """Non-streaming: collect the whole answer, unless the client disconnects first (that frees the slot)."""
    texts, finishes = [""] * job.sampling.n, [None] * job.sampling.n

    async def collect():
        await job.start()
        while True:
            kind, deltas = await job.next_event()
            for i, d in enumerate(deltas):
                if d is not None:
                    texts[i] += d[0]
                    finishes[i] = d[1] or finishes[i]
            if kind == "end":
                return
    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(_client_gone(request.receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the metric does
        work.result()  # raises the APIError of a failed generation
    finally:
        job.close()
        for task in (work, watch):
            task.cancel()
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
               for i, (t, f) in enumerate(zip(texts, finishes))]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage(job)})


# -----------------------------------------------------------------------------
# the app

def checkpoint_loader(store_uri: str, source: str | None = None, step: int | None = None):
    """A loader for create_app: tokenizer + one model per distinct device from the store."""
    def load(devices):
        from nanochat.checkpoint import load_model, newest_source
        from nanochat.store import open_store
        from nanochat.tokenizer import get_tokenizer
        store = open_store(store_uri)
        tokenizer = get_tokenizer(store)
        src = source or newest_source(store)
        models = {}
        for d in dict.fromkeys(devices):
            models[d], got_step, meta = load_model(store, src, device=d, step=step)
        replicas = [Replica(models[d], tokenizer, Engine(models[d], tokenizer), d) for d in devices]
        info = {"checkpoint": f"{src}/{got_step:06d}", "source": src, "step": got_step, "store": store.root,
                "config_hash": meta.get("config_hash", "")}
        return replicas, info
    return load


def model_loader(model, tokenizer, checkpoint: str = "custom"):
    """A loader for create_app serving an in-memory model (tests, benchmarks): replicas share it."""
    def load(devices):
        return [Replica(model, tokenizer, Engine(model, tokenizer), d) for d in devices], \
            {"checkpoint": checkpoint, "source": checkpoint, "step": 0}
    return load


def create_app(store_uri: str | None = None, *, source: str | None = None, step: int | None = None,
               model=None, tokenizer=None, loader=None, devices: list[str] | None = None, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, limits: Limits | None = None, model_name: str = MODEL_NAME,
               batch_rows: int = DEFAULT_BATCH_ROWS) -> FastAPI:
    """The FastAPI app, serving one of: a store's checkpoint, an in-memory model + tokenizer, or what
    `loader(devices) -> (replicas, info)` returns. Loading runs in the background at startup.
    `devices`: one engine replica each (default: every GPU, else one on CPU). `batch_rows` > 1: each replica decodes
    that many rows at once, the requests of its slots together (continuous batching; needs a nanochat GPT)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if sum(x is not None for x in (store_uri, model, loader)) != 1:
        raise ValueError("create_app needs exactly one of store_uri, model (+ tokenizer), loader")
    if model is not None:
        devices = devices or [str(model.get_device())]
        loader = model_loader(model, tokenizer)
    elif store_uri is not None:
        devices = devices or pick_devices()
        loader = checkpoint_loader(store_uri, source, step)
    devices = devices or ["cpu"]
    state = ServeState(loader, devices, api_key, max_queue, limits or Limits(), model_name, batch_rows)

    @asynccontextmanager
    async def lifespan(app):
        state.loop, state.free = asyncio.get_running_loop(), asyncio.Queue()
        threading.Thread(target=state.load, name="nanochat-load", daemon=True).start()
        yield
        state.shutdown()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(StatusCounter, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.get("/healthz")
    async def healthz():
        # a failed load is fatal: `nanochat serve` exits; an app embedded elsewhere fails its liveness probe instead
        if state.load_error:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=500)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state.ready:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return {"status": "ready", **state.info, "replicas": len(state.devices), "batch_rows": state.batch_rows}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_auth(request)
        state.check_ready()
        entry = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nanochat",
                 "context_length": state.context_len, **state.info}
        return {"object": "list", "data": [entry]}

    body_schema = {"required": True, "content": {"application/json": {"schema": chat_request_schema(state.limits)}}}

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": body_schema})
    async def chat_completions(request: Request):
        state.check_auth(request)
        req = parse_request(await read_body(request, state.limits.max_body_bytes), state.limits)
        state.check_ready()
        prompt, sampling = state.prompt_and_sampling(req)
        job = state.admit(prompt, sampling)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": state.model_name, "system_fingerprint": state.info.get("checkpoint")}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return EventStream(job, stream_chunks(job, head, include_usage))
        return await complete(job, request, head)

    return app


def pick_devices(device: str | None = None, num_workers: int | None = None) -> list[str]:
    """One replica per GPU by default; on CPU (or one named device) `num_workers` replicas share one model."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("--device cuda: no CUDA device is available")
        n = num_workers or count
        if not 1 <= n <= count:
            raise ValueError(f"--num-workers {n}: this machine has {count} GPU(s)")
        return [f"cuda:{i}" for i in range(n)]
    from nanochat.checkpoint import check_device
    check_device(device)  # a usage error now, not a load failure after startup
    return [device] * (num_workers or 1)


# -----------------------------------------------------------------------------
# running it

class BackgroundServer:
    """uvicorn in a thread (tests, benchmarks): `with BackgroundServer(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = DRAIN_TIMEOUT_S, **config):
        import uvicorn
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=drain_timeout, **config))
        self.host, self.thread = host, None

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def wait_ready(self, timeout: float = 60.0):
        state = self.app.state.serve
        deadline = time.monotonic() + timeout
        while not state.ready:
            if state.load_error or time.monotonic() > deadline:
                raise RuntimeError(f"model not ready: {state.load_error or 'timeout'}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0):
        """Graceful: stop accepting, let in-flight streams finish (up to drain_timeout), run the lifespan shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start().wait_ready()

    def __exit__(self, *exc):
        self.stop()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from nanochat.cli import HelpFormatter, add_store_flags
    p = argparse.ArgumentParser(prog="nanochat serve", description="Web chat UI and OpenAI-compatible API for a trained model.",
                                formatter_class=HelpFormatter)
    add_store_flags(p)
    p.add_argument("-i", "--source", choices=["sft", "rl", "mid", "base"], help="which model (default: the most trained one: rl → sft → mid → base)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 in a container")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", help="cuda, cpu, mps, cuda:1... (default: cuda if available)")
    p.add_argument("--num-workers", type=int, help="engine replicas (default: one per GPU, or one on CPU)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"), metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (default: env NANOCHAT_API_KEY)")  # never print the key
    p.add_argument("--batch-rows", type=positive_int, default=DEFAULT_BATCH_ROWS, metavar="N",
                   help="continuous batching: each replica decodes N rows at once, one per request (n samples take n), "
                        "new requests joining at the next token; each replica holds an N-row KV cache as long as the context "
                        "(default: %(default)s; 1: one request at a time, no batching)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests that may wait for a replica; more get 429")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, help="seconds in-flight streams get to finish on shutdown")
    for name, value in asdict(Limits()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, metavar="N", help="per-request limit")
    p.add_argument("--log-level", default="info", type=str.lower, choices=["critical", "error", "warning", "info", "debug"],
                   help="server log verbosity")
    return p


def main(argv=None) -> int:
    import uvicorn
    from nanochat.checkpoint import SOURCES, CheckpointManager, newest_source
    from nanochat.cli import error, store_uri
    from nanochat.store import open_store
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uri = store_uri(args)
    try:
        devices = pick_devices(args.device, args.num_workers)
        requested_decode()  # a bad NANOCHAT_DECODE is a usage error now, not a failed load later
    except ValueError as e:
        error(str(e))  # a usage error, as `nanochat chat --device` reports it
    try:  # fail fast on a store without the model asked for; the weights themselves load in the background
        store = open_store(uri)
        source = args.source or newest_source(store)
        checkpoints = CheckpointManager(store, SOURCES[source])
        if checkpoints.latest() is None:
            error(f"no {source} checkpoint in {store.root}; run `nanochat speedrun --store {store.root}` first", 1)
        if args.step is not None and args.step not in checkpoints.steps():
            raise checkpoints.no_such_step(args.step)
    except (StoreError, ValueError) as e:
        error(str(e), 1)
    from nanochat.common import fit_threads_to_cpu_limit
    if threads := fit_threads_to_cpu_limit():
        print(f"nanochat serve: {threads} torch thread(s), from this container's CPU limit", file=sys.stderr)
    limits = Limits(**{k: getattr(args, k) for k in asdict(Limits())})
    app = create_app(uri, source=source, step=args.step, devices=devices, api_key=args.api_key or None,
                     max_queue=args.max_queue, limits=limits, batch_rows=args.batch_rows)
    print(f"nanochat serve: {source} model from {store.root} on {', '.join(devices)}; "
          f"open http://{args.host}:{args.port}/", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout))
    state = app.state.serve
    state.on_load_error = lambda: setattr(server, "should_exit", True)  # no model, no server: exit, Kubernetes restarts it
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raised the Ctrl-C
        pass
    if state.load_error:
        error(f"the model did not load: {state.load_error}", 1)
    return 0 if server.started else 3  # 3: uvicorn's "startup failed" (the port is taken...)


if __name__ == "__main__":
    sys.exit(main())
