"""
Inference engine: batched sampling with a KV cache, the tools, streaming decode.

Everything here works on token ids. The prompt is prefilled once at batch 1, its KV cache is then
replicated into `num_samples` rows ("one prefix, many samples"), and every step forwards one token
per row. Each row runs a small state machine for tool use: when the model writes
<|python_start|> expr <|python_end|>, the tool (nanochat.tools: calculator or choice) evaluates expr and
<|output_start|> result <|output_end|> is forced into that row, one token per step, with mask 0
(forced, not sampled).

Decode paths (Engine(decode=...), else NANOCHAT_DECODE, else auto):
  eager    GPT.forward with a growing KVCache per step: the reference
  static   the static-shape step (nanochat.gpt.DecodeWeights.step over a StaticKVCache), run eagerly over the slots
           in use (a request's rows share one position, which the step takes from the host: slices, no mask): the
           default on CPU
  graph    that step captured in a CUDA graph per (batch, cache length), replayed per token: auto's choice on CUDA
           for more than one row
  compile  the same, torch.compile'd (fewer, fused kernels) before capture (on CPU: compiled, not captured); costs
           compile time per shape
  fused    the same arithmetic in hand-fused Triton kernels (nanochat.fused_decode, 6 per layer for one row, 8 for
           more), in a CUDA graph: auto's choice on CUDA for a lone row (one sample, or one row of a batch in use),
           checked against the static step on each device before its first use (check_fused_step)
The static paths need a nanochat GPT (any other model decodes eagerly); the prompt is prefilled by GPT.forward in
every path. The graphed paths run one step ahead: the next step starts on the sampled ids while the host reads them,
and is rerun when a tool forces another token (StaticSteps). Sampling (temperature, top-k, top-p) happens outside the
model, so every path supports all of it; on a GPU top-k sampling runs in two Triton kernels
(nanochat.fused_sample). Engine.generate decodes one request (its samples); nanochat.batching decodes
many requests together on the same static step, each in rows of its own.
"""

import codecs
import contextlib
import functools
import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from nanochat.gpt import DecodeWeights, as_gpt, logits_at
from nanochat.kv_cache import StaticKVCache
from nanochat.tools import run_tool

DECODE_RESERVE = 256  # cache rows reserved for decoding when max_tokens is None (the cache grows beyond)
# Decoding a small model on CPU is latency-bound: a second intra-op thread only adds synchronisation,
# and on a busy 2-core machine it made decode 6x slower (measured). Training keeps all threads.
DECODE_CPU_THREADS = int(os.environ.get("NANOCHAT_DECODE_THREADS", "1"))
SMALL_MODEL_PARAMS = 100_000_000
DECODE_MODES = ("eager", "static", "graph", "compile", "fused")
STATIC_STEP_MODES = ("static", "graph", "compile", "fused")
CACHE_BUCKET = 256  # static cache lengths round up to a multiple: one captured graph serves many prompt lengths
# auto: device type -> (the path of a lone row (Engine at one sample, a batch's 1-row step), the path of more rows).
# CUDA: the fused step for one row (bench/RESULTS.md run 3, H100, d20 batch 1: 788 tok/s against the graph's 563),
# the static step in a CUDA graph for more (run 3: 3,128 / 6,893 tok/s at batch 8 / 32, the fused step 2,560 / 3,606).
# CPU: the static step, uncaptured (bench/inference.py, 2 Zen 5 cores, d4 fp32: batch 1 ~1.6x eager; its weights laid
# out for the CPU's GEMV, nanochat.gpt.input_major).
AUTO_DECODE = {"cuda": ("fused", "graph"), "cpu": ("static", "static")}
STEP_AHEAD = True  # graphed paths start the next step before the host has seen the sampled ids (StaticSteps)
IDLE_DECODERS = 2  # static decoders (cache + graph) kept for reuse between requests, the oldest dropped first: each holds a cache


def requested_decode(decode=None):
    """The decode mode asked for (the argument, else $NANOCHAT_DECODE, else auto); ValueError naming its source if unknown."""
    mode = decode or os.environ.get("NANOCHAT_DECODE") or "auto"
    if mode not in ("auto",) + DECODE_MODES:
        given = f"decode={decode!r}" if decode else f"NANOCHAT_DECODE={mode!r}"
        raise ValueError(f"{given}: use one of auto, {', '.join(DECODE_MODES)}")
    return mode


@contextlib.contextmanager
def decode_threads(model):
    """While a model decodes: on CPU, torch's intra-op threads limited for a small model (restored after); on CUDA, the
    model's GPU made the thread's current device, since CUDA graphs capture and Triton kernels launch on the current
    device, not on their tensors' (serve decodes on every GPU from threads whose current device is the first)."""
    device = model.get_device()
    before = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS if hasattr(model, "parameters") else True
    limit = device.type == "cpu" and small and 0 < DECODE_CPU_THREADS < before
    if limit:
        torch.set_num_threads(DECODE_CPU_THREADS)
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        if limit:
            torch.set_num_threads(before)


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Sample one token per row from logits (B, V); returns (B, 1). temperature 0 = greedy. top_p keeps the smallest
    set of tokens whose probability (at this temperature) reaches top_p; top_k then keeps the k likeliest of those."""
    check_sampling(temperature, top_p)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    return sample_with(logits, uniforms(logits.size(0), rng, logits.device), temperature, top_k, top_p)


def cache_len(tokens):
    """Static cache slots for `tokens`: rounded up to CACHE_BUCKET, so one decoder (and its graph) serves many lengths."""
    return -(-tokens // CACHE_BUCKET) * CACHE_BUCKET


def uniforms(n, rng, device):
    """The n uniforms in [0, 1) that sampling n rows draws from rng: one per row."""
    return torch.rand(n, 1, device=device, generator=rng)


@torch.inference_mode()
def sample_with(logits, u, temperature, top_k=None, top_p=None):
    """sample_next_token (temperature > 0) with each row's uniform given, u (B, 1): rows of several requests, each
    drawing from its own generator, sample in one call (nanochat.batching)."""
    if top_p is not None and top_p < 1:
        logits = nucleus(logits, top_p, temperature)
    elif top_k is not None and (logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from nanochat import fused_sample  # two Triton kernels instead of ~15 torch ones per token
        if fused_sample.serves(logits, top_k) and fused_sample.verified(logits, top_k):  # checked on first use
            return fused_sample.sample_top_k(logits, u, temperature, top_k)
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        return idx.gather(1, _sample(vals / temperature, u))
    return _sample(logits / temperature, u)


def check_request(tokens, num_samples, temperature, top_p, max_samples=None):
    """A request's arguments, checked before any work (Engine.generate, Batcher.generate)."""
    if not tokens or not all(isinstance(t, int) for t in tokens):
        raise ValueError("tokens must be a non-empty list of ints")
    if num_samples < 1 or (max_samples is not None and num_samples > max_samples):
        limit = f"in [1, {max_samples}] (the batch's rows)" if max_samples is not None else ">= 1"
        raise ValueError(f"num_samples must be {limit}, got {num_samples}")
    check_sampling(temperature, top_p)


def check_sampling(temperature, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def nucleus(logits, top_p, temperature):
    """logits with every token outside the top-p nucleus at -inf (the likeliest token always stays)."""
    probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(dim=-1) - probs > top_p  # the tokens before it already cover top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _sample(logits, u):
    """Inverse-CDF sampling with one uniform per row (u, (B, 1)); torch.multinomial draws an exponential per
    vocab entry and is ~30x slower on CPU."""
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=logits.size(-1) - 1)


@dataclass
class RowState:
    """Tool-use and completion state of one sample row."""
    forced: deque = field(default_factory=deque)  # tokens to inject before sampling again
    expr_tokens: list | None = None               # collecting a python block when not None
    completed: bool = False
    terminal: int | None = None                   # the token that finished the row
    context: Callable[[], str] = str              # the request's prompt as text, where `choice` reads its options (str: none)


class Engine:

    def __init__(self, model, tokenizer, decode=None):
        """decode: eager | static | graph | compile | fused | auto (None: $NANOCHAT_DECODE, else auto: AUTO_DECODE's paths
        for a GPT on its device, eager for other models). See the module docstring."""
        self.model = model
        self.decode = requested_decode(decode)
        self._weights = None  # DecodeWeights of the static paths, built on first use
        self._idle = []       # StaticDecoders free for the next request, oldest first
        self._batcher = None  # the continuous batch batcher() hands out, kept for the next call
        self._auto_failed = set()  # paths auto picked that failed to build here: not picked again
        self.tokenizer = tokenizer  # for the special tokens and the tools' text
        special = tokenizer.encode_special
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()

    # -- public API ---------------------------------------------------------------------------

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """Stream (token_column, mask_column) per step: one entry per row; mask 1 = sampled, 0 = forced.

        A finished row (it produced <|assistant_end|> or <|bos|>) repeats its terminal token with
        mask 0 until every row is finished or max_tokens steps have run.
        """
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        return self._generate(tokens, num_samples, max_tokens, seed, sampling, use_cache=True)

    def generate_naive(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """Same stream as generate, but every step re-runs the whole sequence (no KV cache): the reference."""
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        return self._generate(tokens, num_samples, max_tokens, seed, sampling, use_cache=False)

    def generate_batch(self, tokens, num_samples=1, naive=False, **kwargs):
        """Run to completion; returns (sequences, masks) per row: prompt + generated tokens (without
        the terminal token), masks 0 over the prompt and forced tokens, 1 over sampled ones."""
        stream = (self.generate_naive if naive else self.generate)(tokens, num_samples, **kwargs)
        return self.collect(stream, tokens, num_samples)

    def collect(self, stream, tokens, num_samples, keep_terminal=False):
        """generate_batch's (sequences, masks) from a (column, mask) stream: Engine.generate's or a Batcher's. Each row
        ends at its terminal token (<|assistant_end|> or <|bos|>), which is kept only with keep_terminal (chat_rl:
        stopping is an action of the policy)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in stream:
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                done[i] = token == self.assistant_end or token == self.bos
                if keep_terminal or not done[i]:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    # -- internals ----------------------------------------------------------------------------

    def _generate(self, tokens, num_samples, max_tokens, seed, sampling, use_cache):
        """sampling: sample_next_token's temperature, top_k and top_p."""
        check_request(tokens, num_samples, sampling["temperature"], sampling["top_p"])  # at the call, not at the first next()
        return self._stream(tokens, num_samples, max_tokens, seed, use_cache, sampling)

    def _stream(self, tokens, num_samples, max_tokens, seed, use_cache, sampling):
        with decode_threads(self.model):
            yield from self._decode(tokens, num_samples, max_tokens, seed, use_cache, sampling)

    def decode_mode(self, rows=None):
        """The path a step of `rows` rows takes (see the module docstring; None: any number of rows)."""
        gpt = as_gpt(self.model)
        if gpt is None:
            return "eager"
        if self.decode != "auto":
            return self.decode
        device = gpt.get_device()
        one_row, more_rows = AUTO_DECODE.get(device.type, AUTO_DECODE["cpu"])
        if rows == 1 and one_row not in self._auto_failed and step_unavailable(one_row, device, gpt.config) is None:
            return one_row
        return more_rows

    def auto_failed(self, mode, error, what="static decode"):
        """A path auto picked could not be built: warn, and pick the next one from now on (a lone row's path -> the path
        of more rows -> eager)."""
        self._auto_failed.add(mode)
        if mode == self.decode_mode():  # the path of more rows: nothing static left
            self.decode = "eager"
        then = self.decode_mode(1)
        warnings.warn(f"{what} ({mode}) failed, decoding on the {then} path from now on: {type(error).__name__}: {error}")

    @torch.inference_mode()
    def _decode(self, tokens, num_samples, max_tokens, seed, use_cache, sampling):
        device = self.model.get_device()
        rng = torch.Generator(device=device)  # per request: reproducible and independent of other requests
        rng.manual_seed(seed)
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        steps = self._steps(prompt, num_samples, max_tokens, use_cache)
        try:
            # 1) prefill the prompt once, at batch 1; every row samples its own first token from it
            logits = steps.prefill(prompt).expand(num_samples, -1)
            context = functools.cache(lambda: self.tokenizer.decode(tokens))  # decoded once per request, on first use
            rows = [RowState(context=context) for _ in range(num_samples)]
            generated = 0
            while max_tokens is None or generated < max_tokens:
                sampled = sample_next_token(logits, rng, **sampling)
                host = HostCopy(sampled[:, 0])
                last = max_tokens is not None and generated + 1 >= max_tokens
                # 2) the next step starts on the sampled ids before the host has seen them (graphed paths); taken back
                # below if a row's next token is forced instead
                ahead = None if last else steps.step_ahead(sampled)
                sampled_list = host.tolist()
                column, mask = self.advance_rows(rows, sampled_list)
                yield column, mask
                generated += 1
                if all(row.completed for row in rows) or last:
                    break
                if ahead is not None and all(c == t or row.completed for c, t, row in zip(column, sampled_list, rows)):
                    logits = ahead
                    continue
                if ahead is not None:
                    steps.undo()
                # the sampled ids are already on the device unless a row was forced or finished
                ids = sampled if column == sampled_list else torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
                logits = steps.step(ids)
        finally:
            steps.close()

    def _steps(self, prompt, num_samples, max_tokens, use_cache):
        if not use_cache:
            return NaiveSteps(self.model, num_samples)
        mode = self.decode_mode(num_samples)
        if mode == "eager":
            # the model allocates its cache in its compute dtype; sized for the whole answer when known
            cache = self.model.new_kv_cache(1, prompt.size(1) + (max_tokens or DECODE_RESERVE))
            return CacheSteps(self.model, cache, num_samples)
        needed = prompt.size(1) + (max_tokens or DECODE_RESERVE)
        max_len = cache_len(needed)
        try:
            return StaticSteps(self, self._acquire(num_samples, max_len, mode))
        except Exception as e:  # noqa: BLE001 - chosen by default (auto): a capture that fails must not stop decoding
            if self.decode != "auto":
                raise
            self.auto_failed(mode, e)
            return self._steps(prompt, num_samples, max_tokens, use_cache)

    # -- static decoders: built once per (batch, cache length, mode), reused by later requests ---------------------

    def shared_weights(self):
        """The static paths' DecodeWeights (one set per engine: its decoders and batches share it), rebuilt if the
        parameters were replaced and refreshed from their current values (chat_rl trains between requests)."""
        gpt = as_gpt(self.model)
        if self._weights is None or not self._weights.matches(gpt):
            self._weights, self._idle = DecodeWeights(gpt), []
        self._weights.refresh()
        return self._weights

    def batcher(self, rows, max_len):
        """A continuous batch (nanochat.batching.Batcher) of `rows` rows whose cache holds max_len tokens per row, kept
        for the next call: chat_eval's tasks and chat_rl's steps reuse its cache and CUDA graphs instead of building
        them per call. A kept batch with up to twice the cache needed serves; otherwise a new one replaces it."""
        from nanochat.batching import Batcher
        kept, needed = self._batcher, cache_len(max_len)
        if kept is None or kept.closed or kept.rows != rows or not needed <= kept.max_len <= 2 * needed:
            self._batcher = Batcher(self, rows, needed)
        return self._batcher

    def _acquire(self, batch, max_len, mode):
        weights = self.shared_weights()
        for i, d in enumerate(self._idle):
            if d.key == (batch, max_len, mode):
                return self._idle.pop(i)
        return StaticDecoder(as_gpt(self.model), weights, batch, max_len, mode)

    def _release(self, decoder):
        if decoder.weights is self._weights:  # not from weights that were replaced meanwhile
            self._idle = (self._idle + [decoder])[-IDLE_DECODERS:]

    def advance_rows(self, rows, sampled):
        """Pick each row's next token (forced or sampled) and step its tool-use state machine (RowState per row):
        (column, mask), as generate streams them. nanochat.batching calls it per request."""
        column, mask = [], []
        for row, token in zip(rows, sampled):
            if row.completed:
                column.append(row.terminal)
                mask.append(0)
                continue
            if row.forced:
                token = row.forced.popleft()
                mask.append(0)
            else:
                mask.append(1)
            column.append(token)
            self._step_row(row, token)
        return column, mask

    def _step_row(self, row, token):
        if token == self.assistant_end or token == self.bos:
            row.completed, row.terminal = True, token
        elif token == self.python_start:
            row.expr_tokens = []  # a nested start restarts the expression
        elif token == self.python_end and row.expr_tokens is not None:
            expr = self.tokenizer.decode(row.expr_tokens)
            row.expr_tokens = None
            result = run_tool(expr, context=row.context)
            row.forced.append(self.output_start)
            row.forced.extend(self.tokenizer.encode(result))
            row.forced.append(self.output_end)
        elif row.expr_tokens is not None:
            row.expr_tokens.append(token)


class HostCopy:
    """A (B,) device tensor's values for the host, without waiting for GPU work queued after it (the step ahead):
    a non-blocking copy into pinned memory and an event. On a CPU, the tensor itself."""

    def __init__(self, t):
        self.host, self.event = t, None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def tolist(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Steps:
    """A decode path: prefill(prompt) -> logits (1, V), step(ids (B, 1)) -> logits (B, V), close(). Paths whose steps
    run asynchronously may start a step before its ids are confirmed (step_ahead) and take it back (undo)."""

    def step_ahead(self, ids):
        return None

    def undo(self):
        raise NotImplementedError


class NaiveSteps(Steps):
    """No cache: every step re-runs the whole sequence (generate_naive, the reference)."""

    def __init__(self, model, num_samples):
        self.model, self.num_samples, self.sequences = model, num_samples, None

    def prefill(self, prompt):
        self.sequences = prompt.expand(self.num_samples, -1)
        return logits_at(self.model, prompt, "last")[:, -1, :]

    def step(self, ids):
        self.sequences = torch.cat([self.sequences, ids], dim=1)
        return logits_at(self.model, self.sequences, "last")[:, -1, :]

    def close(self):
        pass


def prefill_logits(model, prompt, cache):
    """(B, vocab) logits of a prompt's last position, its keys/values written into cache (the lm_head runs for that
    position only)."""
    return logits_at(model, prompt, "last", cache)[:, -1, :]


class CacheSteps(Steps):
    """GPT.forward with a KVCache: batch-1 prefill, the cache replicated into the rows, one token per row per step."""

    def __init__(self, model, cache, num_samples):
        self.model, self.cache, self.num_samples = model, cache, num_samples

    def prefill(self, prompt):
        logits = prefill_logits(self.model, prompt, self.cache)
        if self.num_samples > 1:
            self.cache = self.cache.replicate(self.num_samples)
        return logits

    def step(self, ids):
        return self.model(ids, kv_cache=self.cache)[:, -1, :]

    def close(self):
        pass


class StaticSteps(Steps):
    """The static step: GPT.forward prefills row 0 of a StaticKVCache, the rows get copies, then every step is
    decoder.run() (a CUDA graph replay on CUDA). Past the cache's end (max_tokens None and a long answer) the
    eager path takes the cache over.

    A replayed graph runs while the host samples, streams and runs the tools, so the next step is started on the
    sampled ids before the host has looked at them (step_ahead): the GPU is never idle waiting for Python (run 2:
    0.34 of 2.49 ms per step). When a row's next token is forced (a tool's output) the step is taken back: the
    position moves back one and the step reruns on the right ids, overwriting what the guess wrote."""

    def __init__(self, engine, decoder):
        self.engine, self.decoder, self.pos, self.eager = engine, decoder, 0, None

    def prefill(self, prompt):
        logits = prefill_logits(self.engine.model, prompt, self.decoder.cache.prefill_cache())
        self.pos = prompt.size(1)
        self.decoder.cache.start(self.pos)
        return logits

    def step(self, ids):
        if self.eager is None and self.pos == self.decoder.cache.max_len:
            self.eager = CacheSteps(self.engine.model, self.decoder.cache.to_kv_cache(), ids.size(0))
        if self.eager is not None:
            return self.eager.step(ids)
        self.pos += 1
        if self.decoder.mode == "static":
            return self.decoder.run_at(ids, self.pos - 1)
        self.decoder.ids.copy_(ids)
        return self.decoder.run()

    def step_ahead(self, ids):
        if not (STEP_AHEAD and self.decoder.graphed) or self.eager is not None or self.pos >= self.decoder.cache.max_len:
            return None
        return self.step(ids)

    def undo(self):
        self.pos -= 1
        self.decoder.cache.retreat()

    def close(self):
        self.engine._release(self.decoder)


class StaticDecoder:
    """What one static step reads and writes, at fixed addresses: the weights, a StaticKVCache of (batch, max_len),
    the input ids and the rotary tables. run() = one step: the step itself (static), or a CUDA graph replay."""

    def __init__(self, model, weights, batch, max_len, mode):
        assert mode in STATIC_STEP_MODES, mode
        c, device = model.config, model.get_device()
        self.key, self.mode, self.weights = (batch, max_len, mode), mode, weights
        self.cache = StaticKVCache(batch, c.n_kv_head, c.head_dim, c.n_layer, max_len, device=device, dtype=model.compute_dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cos, self.sin = model.rotary_tables(max_len)
        step = static_step(mode, weights, model)
        self.step = step  # (ids, cache, cos, sin) -> logits: run() calls it on this decoder's own tensors
        ids, cache, cos, sin = self.ids, self.cache, self.cos, self.sin  # not self: no reference cycle keeps a dropped cache alive

        def run():
            return step(ids, cache, cos, sin)
        # a graph when asked for one; compile and fused capture theirs on CUDA only (on a CPU: compiled / interpreted)
        self.graphed = mode == "graph" or (mode != "static" and device.type == "cuda")
        self.run = capture_step(run, mode) if self.graphed else run

    def run_at(self, ids, at):
        """One uncaptured step with every row at position `at`, known to the host: attends exactly the visible slots,
        with no mask (DecodeWeights.step's `at`)."""
        return self.step(ids, self.cache, self.cos, self.sin, at=at)

    def run_window(self, ids, reached):
        """One uncaptured step for the first ids.size(0) rows (ids (rows, 1)), attending only the first `reached` slots:
        the work of the tokens present, not of the whole cache. Exactly those: uncaptured, a shape per step costs
        nothing (64-slot blocks made 32 rows at 4 positions, as chat_rl decodes, ~10% slower on a 2-core Xeon)."""
        return self.step(ids, self.cache.window(ids.size(0), min(self.cache.max_len, reached)), self.cos, self.sin)


def step_unavailable(mode, device, config):
    """Why `mode`'s step cannot run on this device (None when it can): only the fused one has conditions."""
    if mode != "fused":
        return None
    from nanochat import fused_decode
    return fused_decode.unavailable_reason(device, config.head_dim)


def static_step(mode, weights, model):
    """(ids, cache, cos, sin) -> fp32 logits: one decode step of a static path, over DecodeWeights `weights` of the
    GPT `model`. The fused step is checked against the static one first (check_fused_step)."""
    if mode == "compile":
        return torch.compile(weights.step, fullgraph=True, dynamic=False)
    if mode == "fused":
        why = step_unavailable(mode, model.get_device(), model.config)
        if why:
            raise RuntimeError(f"decode='fused': {why}")
        check_fused_step(model, weights)
        from nanochat import fused_decode
        return functools.partial(fused_decode.fused_step, weights)
    return weights.step


# The fused step's hand-written kernels (memory ordering between programs, PDL) are checked on each device they run on,
# before they decode for anyone: NANOCHAT_FUSED_CHECK=0 skips it.
FUSED_CHECK = os.environ.get("NANOCHAT_FUSED_CHECK", "1") != "0"
FUSED_CHECK_SLOTS = 200  # random keys/values in the cache: several attention splits (64+ slots each), past short windows
_fused_checked = {}  # (device, dtype, config) -> None once passed, else the failure's message


def check_fused_step(model, weights):
    """Before the fused step first decodes on a device (once per process, model shape and dtype): two steps of one row
    (the GEMV-kernel path) and two of two rows at different positions, in a CUDA graph as in use, over a cache of
    random keys/values, against the static step's logits. RuntimeError when they differ by more than rounding does
    (kernels miscompiled or misordered on this GPU and driver): auto then decodes on the graph path, with a warning."""
    if not FUSED_CHECK:
        return
    key = (str(model.get_device()), weights.dtype, repr(model.config))
    if key not in _fused_checked:  # an exception (out of memory, a compile error) leaves no verdict: checked again next time
        failure = fused_check_failure(fused_step_errors(model, weights), weights.dtype)
        _fused_checked[key] = failure and (f"the fused step's logits are off the static step's on this device: {failure} "
                                           "(NANOCHAT_FUSED_CHECK=0 skips this check)")
    if _fused_checked[key]:
        raise RuntimeError(f"decode='fused': {_fused_checked[key]}")


def fused_check_failure(errors, dtype):
    """Why fused_step_errors' `errors` fail the check in `dtype` (None: they pass). Allowed relative error: 1e-3 in
    fp32; 5e-2 below (the interpreter's bf16 fused step is 0.4-0.9e-2 off the static one, run 3's bf16 paths on the
    H100 ~1.1e-2 off fp32, a wrong attention output 0.3-0.4)."""
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    bad = {rows: err for rows, err in errors.items() if not err <= tol}  # NaN: bad
    return f"relative error {', '.join(f'{e:.3g} at {r} row(s)' for r, e in bad.items())} > {tol:g}" if bad else None


@torch.inference_mode()
def fused_step_errors(model, weights, steps=2):
    """{rows: the largest relative error of the fused step's logits vs the static step's over `steps` steps} for 1
    and 2 rows, from the same cache of random keys/values (check_fused_step)."""
    from nanochat import fused_decode
    c, device, dtype = model.config, model.get_device(), weights.dtype
    max_len = cache_len(FUSED_CHECK_SLOTS + steps + 2)  # + the capture's warm-up steps
    cos, sin = model.rotary_tables(max_len)
    g = torch.Generator(device=device).manual_seed(0)
    errors = {}
    for rows in (1, 2):
        cache = StaticKVCache(rows, c.n_kv_head, c.head_dim, c.n_layer, max_len, device=device, dtype=dtype)
        for t in cache.k + cache.v:
            t.normal_(generator=g)
        cache.pos.copy_(torch.tensor([FUSED_CHECK_SLOTS, FUSED_CHECK_SLOTS - 37][:rows], device=device))
        start = cache.pos.clone()
        reference = StaticKVCache(rows, c.n_kv_head, c.head_dim, c.n_layer, max_len, device=device, dtype=dtype)
        for a, b in zip(reference.k + reference.v + [reference.pos], cache.k + cache.v + [cache.pos]):
            a.copy_(b)
        ids = torch.randint(0, c.vocab_size, (rows, 1), device=device, generator=g)
        fused = functools.partial(fused_decode.fused_step, weights, ids, cache, cos, sin)
        if device.type == "cuda":
            fused = capture_step(fused, "fused")  # its warm-up steps move the positions: set back below
            cache.pos.copy_(start)
        worst = 0.0
        for _ in range(steps):
            got, want = fused().float(), weights.step(ids, reference, cos, sin).float()
            worst = max(worst, ((got - want).norm() / want.norm()).item())
        errors[rows] = worst
    return errors


def capture_step(fn, mode):
    """CudaGraphStep(fn) for a step of `mode`. A fused step that fails to capture with programmatic dependent launch
    on is captured once more with it off, for the rest of the process (a warning says so): a driver or device that
    refuses PDL still gets the fused kernels, one after another (bench/GPU.md, run 4's prediction)."""
    try:
        return CudaGraphStep(fn)
    except Exception as e:
        from nanochat import fused_decode
        if mode != "fused" or not fused_decode.PDL:
            raise
        fused_decode.PDL = False
        warnings.warn(f"the fused decode step failed with programmatic dependent launch ({type(e).__name__}: {e}); "
                      "capturing it without (NANOCHAT_FUSED_PDL=0 from now on in this process)")
        return CudaGraphStep(fn)


class CudaGraphStep:
    """fn (no arguments, fixed addresses) captured in a CUDA graph; calling it replays the graph and returns the
    captured output tensor, overwritten by the next replay. Per torch's docs the warm-up runs on a side stream
    (it also triggers torch.compile). The warm-up steps write K/V and advance the position: harmless, every
    request's prefill rewrites the cache and sets the position (StaticKVCache.start)."""

    def __init__(self, fn, warmup=2):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # serve's other threads may use other GPUs
            self.out = fn()

    def __call__(self):
        self.graph.replay()
        return self.out


class Utf8StreamDecoder:
    """Turn a stream of token ids into text, emitting only complete UTF-8 code points.

    A token can end in the middle of a multi-byte character (emoji, CJK); its bytes wait in the
    incremental decoder until the character completes. `flush()` ends the stream: leftover
    incomplete bytes become U+FFFD.
    """

    def __init__(self, tokenizer):
        self.token_bytes = tokenizer.id_to_bytes  # bytes of one token; special tokens give their name
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id) -> str:
        return self._decoder.decode(self.token_bytes(token_id))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
