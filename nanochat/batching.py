"""
Continuous batching: concurrent requests decode together in one static decoder, each in rows of its own.

    batcher = Batcher(engine, rows=16)
    for column, mask in batcher.generate(prompt_tokens, max_tokens=200, temperature=0.7, seed=1):
        ...

`generate` takes Engine.generate's arguments and streams the same (column, mask) per step; many threads may call it at
once (nanochat.serve: one per request). A scheduler thread, alive while there is work, owns a StaticDecoder of `rows`
rows whose cache is as long as the model's context (or max_len), and every step forwards one token in every row in use
(Engine.batcher keeps one batch per engine for chat_eval and chat_rl; each busy period starts by refreshing the
engine's DecodeWeights from the parameters, so a model trained between batches decodes with its current values):

- a request joins at the next step: its prompt is prefilled into a free row (GPT.forward at batch 1 over that row's
  cache) and copied to the rows of its other samples; the rows already decoding wait for that one prefill;
- it leaves when all its samples finish, its max_tokens run out or its reader closes the stream; its rows are
  retired (a step may still compute them, nobody reads them) and the next request in line takes them;
- rows stand at their own positions (StaticKVCache.pos per row), so nobody waits for a batch to fill or drain.

A request's tokens depend only on its prompt, sampling and seed: it has its own generator and samples from its own
rows' logits, as Engine.generate does. The step is the Engine's static step. On CUDA it is a CUDA graph (graph, the
default, or compile / fused) run one step ahead of the host and taken back when a tool forces a token, captured for
1, 2, 4, ... rows of the same cache: a step replays the smallest graph that holds every row in use (new requests take
the lowest free rows), so a lone request costs what it would unbatched. On a CPU the static step runs eagerly on just
the rows in use and the cache slots they have reached (the eager path cannot put rows at different positions).
"""

import atexit
import functools
import logging
import queue
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from nanochat import engine as engine_mod
from nanochat.engine import (RowState, StaticDecoder, check_request, decode_threads, prefill_logits, sample_with,
                             uniforms)
from nanochat.gpt import as_gpt
from nanochat.kv_cache import device_index

log = logging.getLogger("nanochat.batching")
_END = object()  # the scheduler's last word to a stream


def row_buckets(rows):
    """The row counts a graphed batch captures a step for: powers of two below `rows`, then `rows`."""
    return [1 << i for i in range(max(0, (rows - 1).bit_length())) if 1 << i < rows] + [rows]


def batchable(engine) -> bool:
    """Whether the engine's model can decode in a continuous batch (a nanochat GPT: the static decode step)."""
    return as_gpt(engine.model) is not None


@dataclass(eq=False)
class Request:
    tokens: list
    num_samples: int
    max_tokens: int
    sampling: dict
    seed: int
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # (column, mask) per step, then _END or an error
    cancelled: bool = False
    rows: list = field(default_factory=list)
    index: torch.Tensor | None = None  # rows, on the device
    states: list = field(default_factory=list)
    rng: torch.Generator | None = None
    logits: torch.Tensor | None = None  # its prompt's (num_samples, vocab) until its first tokens are sampled
    generated: int = 0


class Stream:
    """What Batcher.generate returns: iterate for (column, mask) per step; close() (or dropping it) ends the request."""

    def __init__(self, request):
        self.request = request

    def __iter__(self):
        return self

    def __next__(self):
        item = self.request.out.get()
        if item is _END:
            self.request.out.put(_END)  # iterating again keeps answering StopIteration
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.request.cancelled = True

    def __del__(self):
        self.close()


class Batcher:
    """Continuous batching over one Engine's model: `rows` sequences decode at once (see the module docstring)."""

    def __init__(self, engine, rows=8, max_len=None):
        """rows: sequences decoded at once (a request takes num_samples of them). max_len: cache slots per row, the
        longest prompt + max_tokens a request may have (default: the model's context, sequence_len)."""
        if not batchable(engine):
            raise TypeError("continuous batching needs a nanochat GPT: it runs the static decode step")
        gpt = as_gpt(engine.model)
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        mode = engine.decode_mode(rows)
        self.mode = mode if mode in engine_mod.STATIC_STEP_MODES else "static"
        self.engine, self.model, self.rows = engine, gpt, rows
        self.max_len = engine_mod.cache_len(max_len or gpt.config.sequence_len)
        self.cond = threading.Condition()  # guards pending and closed; held by a caller, it holds arrivals back
        self.pending: deque[Request] = deque()
        self.closed = False
        self.thread = None  # the scheduler, while there is work
        self.decoder, self.weights = None, None
        self.active: list[Request] = []  # the scheduler thread's own from here down
        self.free = list(range(rows))
        self.steps = 0  # decode steps run: one token for every live row

    @property
    def rows_in_use(self):
        return self.rows - len(self.free)

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """Engine.generate's stream, decoded in this batch. The request is queued now; close the stream to drop it."""
        check_request(tokens, num_samples, temperature, top_p, max_samples=self.rows)
        room = self.max_len - len(tokens)
        if max_tokens is None:
            max_tokens = room
        if not 1 <= max_tokens <= room:
            raise ValueError(f"a prompt of {len(tokens)} tokens leaves room for 1 to {room} new tokens in this batch's "
                             f"{self.max_len}-slot cache, not {max_tokens}")
        request = Request(list(tokens), num_samples, max_tokens, dict(temperature=temperature, top_k=top_k, top_p=top_p), seed)
        with self.cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.pending.append(request)
            if self.thread is None:  # the scheduler runs while there is work: an idle batch holds no thread
                self.thread = threading.Thread(target=self._run, name="nanochat-batcher", daemon=True)
                atexit.register(self.close)  # a torch thread still alive while the interpreter ends can abort it
                self.thread.start()
        return Stream(request)

    def close(self):
        """Stop the scheduler; requests still queued or decoding end with an error."""
        with self.cond:
            self.closed, thread = True, self.thread
        if thread is not None:
            thread.join()

    # -- the scheduler thread: one per busy period ---------------------------------------------

    @torch.inference_mode()
    def _run(self):
        fresh = finished = False
        try:
            with decode_threads(self.model):  # held while busy only: it limits the whole process's threads
                while self._more_work():
                    with self.cond:
                        arrivals = self._take_arrivals()
                    try:
                        if not fresh:
                            self._sync_weights()
                            fresh = True
                        self._iteration(arrivals)
                    except Exception as e:  # noqa: BLE001 - the batch's requests hear of it; the next ones retry
                        log.exception("batched decoding failed")
                        self._fail(list(dict.fromkeys(arrivals + self.active)),
                                   RuntimeError(f"batched decoding failed: {type(e).__name__}: {e}"))
            finished = True
        finally:  # closed, or the scheduler itself broke: nobody may wait on a stream that will never end
            with self.cond:
                if self.closed or not finished:
                    self.closed = True
                    self._fail(self.active + list(self.pending), RuntimeError("the batcher was closed"))
                    self.pending.clear()
                if self.thread is threading.current_thread():
                    self._end_thread()

    def _more_work(self):
        """Whether a request is decoding or queued; if none is, this thread ends (under the lock: the next generate()
        starts another)."""
        with self.cond:
            if (self.active or self.pending) and not self.closed:
                return True
            self._end_thread()
            return False

    def _end_thread(self):
        self.thread = None
        atexit.unregister(self.close)

    def _sync_weights(self):
        """At the start of a busy period: the engine's DecodeWeights refreshed from the parameters (chat_rl trains
        between batches), the decoder rebuilt if they are not the ones it was built over (parameters replaced)."""
        self.weights = self.engine.shared_weights()
        if self.decoder is not None and self.decoder.weights is not self.weights:
            self.decoder = None

    def _take_arrivals(self):
        """Queued requests that fit the free rows, first come first served, each given its rows."""
        arrivals = []
        while self.pending and (self.pending[0].cancelled or self.pending[0].num_samples <= len(self.free)):
            request = self.pending.popleft()
            if request.cancelled:
                request.out.put(_END)
                continue
            request.rows, self.free = self.free[:request.num_samples], self.free[request.num_samples:]
            arrivals.append(request)
        return arrivals

    def _iteration(self, arrivals):
        """Admit the arrivals, sample every request's next tokens, hand them out, and start the next step."""
        if self.decoder is None:
            self._build()
        for request in arrivals:
            self._prefill(request)
            self.active.append(request)
        self._sample()
        host = engine_mod.HostCopy(self.next_ids[:, 0])
        more = any(r.generated + 1 < r.max_tokens for r in self.active)
        ahead = self._step() if more and engine_mod.STEP_AHEAD and self.decoder.graphed else None
        sampled = host.tolist()
        fed, forced = list(sampled), False
        for request in list(self.active):
            proposed = [sampled[r] for r in request.rows]
            column, mask = self.engine.advance_rows(request.states, proposed)
            request.out.put((column, mask))
            request.generated += 1
            for r, token, guess, state in zip(request.rows, column, proposed, request.states):
                fed[r] = token
                forced |= token != guess and not state.completed
            if request.cancelled or request.generated >= request.max_tokens or all(s.completed for s in request.states):
                self._leave(request)
        if not self.active:
            return
        if ahead is None or forced:
            if ahead is not None:
                self.decoder.cache.retreat()  # take the guess back: rerun on the forced tokens
            if fed != sampled:
                self.next_ids.copy_(torch.tensor(fed, device=self.next_ids.device).unsqueeze(1))
            ahead = self._step()
        self.out = ahead  # the next step's replay overwrites it, but only after the sampling queued before it has read it

    def _sample(self):
        """Every request's next tokens into next_ids: one sampling call per distinct (temperature, top_k, top_p), over
        its requests' rows, each row with a uniform from its own request's generator (as Engine.generate draws it)."""
        groups = {}
        for request in self.active:
            groups.setdefault(tuple(request.sampling.values()), []).append(request)
        for requests in groups.values():
            stepped = [r for r in requests if r.logits is None]
            arrived = [r for r in requests if r.logits is not None]  # their logits come from their prefill
            parts = [self.out.index_select(0, torch.cat([r.index for r in stepped]))] if stepped else []
            logits = torch.cat(parts + [r.logits for r in arrived])
            index = torch.cat([r.index for r in stepped + arrived])
            s = requests[0].sampling
            if s["temperature"] == 0.0:
                self.next_ids[index] = torch.argmax(logits, dim=-1, keepdim=True)
            else:
                u = torch.cat([uniforms(r.num_samples, r.rng, logits.device) for r in stepped + arrived])
                self.next_ids[index] = sample_with(logits, u, **s)
            for r in arrived:
                r.logits = None

    def _build(self):
        """The decoder (its cache holds every row), and on a graphed path one CUDA graph per power-of-two row count:
        a step replays the smallest that holds every row in use, so a lone request costs a 1-row step. A path chosen
        by default (auto) that fails to build falls back to the next (fused -> graph -> the static step run eagerly)."""
        try:
            self._build_mode(self.mode)
        except Exception as e:  # noqa: BLE001 - auto must not stop decoding over a capture
            if self.engine.decode != "auto" or self.mode == "static":
                raise
            if self.mode != self.engine.decode_mode():  # a lone row's path: the engine warns and picks the next
                self.engine.auto_failed(self.mode, e, what="batched decode")
                self.mode = self.engine.decode_mode(self.rows)
            else:
                warnings.warn(f"batched decode ({self.mode}) failed, running the static step uncaptured: {type(e).__name__}: {e}")
                self.mode = "static"
            self.decoder = None
            self._build()

    def _build_mode(self, mode):
        d = self.decoder = StaticDecoder(self.model, self.weights, self.rows, self.max_len, mode)
        self.next_ids = torch.zeros_like(d.ids)
        self.graphs = {self.rows: d.run}
        if d.graphed:
            for k in row_buckets(self.rows)[:-1]:  # each captured on the first k rows of the same cache (views)
                self.graphs[k] = self._capture(k)
        d.cache.retire(range(self.rows))  # the captures' warm-up steps moved every row

    def _capture(self, k):
        """The CUDA graph of a k-row step: the decoder's path, or under auto the path auto picks for k rows (a lone
        row: fused), which falls back to the decoder's if it cannot be built."""
        d = self.decoder
        mode = self.engine.decode_mode(k) if self.engine.decode == "auto" else d.mode
        ids, cache = d.ids[:k], d.cache.window(k, self.max_len)
        if mode != d.mode and mode in engine_mod.STATIC_STEP_MODES:
            try:
                step = engine_mod.static_step(mode, self.weights, self.model)
                return engine_mod.capture_step(functools.partial(step, ids, cache, d.cos, d.sin), mode)
            except Exception as e:  # noqa: BLE001 - auto's pick for k rows: the batch's own step serves instead
                self.engine.auto_failed(mode, e, what=f"batched decode of {k} row(s)")
        return engine_mod.capture_step(functools.partial(d.step, ids, cache, d.cos, d.sin), d.mode)

    def _step(self):
        self.steps += 1
        rows = 1 + max(r for request in self.active for r in request.rows)  # rows past the highest in use are idle
        d = self.decoder
        if d.graphed:
            rows = next(k for k in sorted(self.graphs) if k >= rows)
            d.ids[:rows].copy_(self.next_ids[:rows])
            return self.graphs[rows]()
        if self.mode != "static":  # the fused kernels (interpreted) want the whole cache
            d.ids.copy_(self.next_ids)
            return d.run()
        # run eagerly, the step computes only those rows and the slots they have reached
        reached = {len(request.tokens) + request.generated for request in self.active}
        if len(reached) == 1:  # every row at one position (a lone request, say): slices of the cache, no mask
            return d.run_at(self.next_ids[:rows], reached.pop() - 1)
        return d.run_window(self.next_ids[:rows], max(reached))

    def _prefill(self, request):
        device = self.next_ids.device
        prompt = torch.tensor([request.tokens], dtype=torch.long, device=device)
        cache = self.decoder.cache
        logits = prefill_logits(self.model, prompt, cache.prefill_cache(request.rows[0]))
        cache.place(request.rows, len(request.tokens))
        request.index = device_index(request.rows, device)
        request.logits = logits.expand(request.num_samples, -1)
        request.rng = torch.Generator(device=device)
        request.rng.manual_seed(request.seed)
        context = functools.cache(lambda: self.engine.tokenizer.decode(request.tokens))
        request.states = [RowState(context=context) for _ in range(request.num_samples)]

    def _leave(self, request):
        self.active.remove(request)
        self.decoder.cache.retire(request.rows)
        self.free = sorted(self.free + request.rows)  # the lowest rows first: an eager step computes up to the highest
        request.out.put(_END)

    def _fail(self, requests, error):
        for request in requests:
            request.out.put(error)
            if request in self.active:
                self.active.remove(request)
            self.free += [r for r in request.rows if r not in self.free]
        if self.decoder is not None:
            self.decoder.cache.retire(range(self.rows))
