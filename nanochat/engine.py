"""
Inference engine: batched sampling with a KV cache, the calculator tool, streaming decode.

Everything here works on token ids. The prompt is prefilled once at batch 1, its KV cache is then
replicated into `num_samples` rows ("one prefix, many samples"), and every step forwards one token
per row. Each row runs a small state machine for tool use: when the model writes
<|python_start|> expr <|python_end|>, the calculator evaluates expr and
<|output_start|> result <|output_end|> is forced into that row, one token per step, with mask 0
(forced, not sampled).
"""

import codecs
import contextlib
import os
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.calculator import evaluate as use_calculator

DECODE_RESERVE = 256  # cache rows reserved for decoding when max_tokens is None (the cache grows beyond)
# Decoding a small model on CPU is latency-bound: a second intra-op thread only adds synchronisation,
# and on a busy 2-core machine it made decode 6x slower (measured). Training keeps all threads.
DECODE_CPU_THREADS = int(os.environ.get("NANOCHAT_DECODE_THREADS", "1"))
SMALL_MODEL_PARAMS = 100_000_000


@contextlib.contextmanager
def decode_threads(model):
    """Limit torch's intra-op threads while a small model decodes on CPU; restore them after."""
    before = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS if hasattr(model, "parameters") else True
    limit = model.get_device().type == "cpu" and small and 0 < DECODE_CPU_THREADS < before
    if limit:
        torch.set_num_threads(DECODE_CPU_THREADS)
    try:
        yield
    finally:
        if limit:
            torch.set_num_threads(before)


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """Sample one token per row from logits (B, V); returns (B, 1). temperature 0 = greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        return idx.gather(1, _sample(vals / temperature, rng))
    return _sample(logits / temperature, rng)


def _sample(logits, rng):
    """Inverse-CDF sampling with one uniform per row; torch.multinomial draws an exponential per
    vocab entry and is ~30x slower on CPU."""
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)
    u = torch.rand(logits.size(0), 1, device=logits.device, generator=rng) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.size(-1) - 1)


@dataclass
class RowState:
    """Tool-use and completion state of one sample row."""
    forced: deque = field(default_factory=deque)  # tokens to inject before sampling again
    expr_tokens: list | None = None               # collecting a python block when not None
    completed: bool = False
    terminal: int | None = None                   # the token that finished the row


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer  # for the special tokens and the calculator's text
        special = tokenizer.encode_special
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()

    # -- public API ---------------------------------------------------------------------------

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, mask_column) per step: one entry per row; mask 1 = sampled, 0 = forced.

        A finished row (it produced <|assistant_end|> or <|bos|>) repeats its terminal token with
        mask 0 until every row is finished or max_tokens steps have run.
        """
        return self._generate(tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache=True)

    def generate_naive(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Same stream as generate, but every step re-runs the whole sequence (no KV cache): the reference."""
        return self._generate(tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache=False)

    def generate_batch(self, tokens, num_samples=1, naive=False, **kwargs):
        """Run to completion; returns (sequences, masks) per row: prompt + generated tokens (without
        the terminal token), masks 0 over the prompt and forced tokens, 1 over sampled ones."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        stream = (self.generate_naive if naive else self.generate)(tokens, num_samples, **kwargs)
        for column, mask_column in stream:
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token == self.assistant_end or token == self.bos:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    # -- internals ----------------------------------------------------------------------------

    def _generate(self, tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache):
        # checked here, at the call, not at the first next() of the stream
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return self._stream(tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache)

    def _stream(self, tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache):
        with decode_threads(self.model):
            yield from self._decode(tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache)

    @torch.inference_mode()
    def _decode(self, tokens, num_samples, max_tokens, temperature, top_k, seed, use_cache):
        device = self.model.get_device()
        rng = torch.Generator(device=device)  # per request: reproducible and independent of other requests
        rng.manual_seed(seed)

        # 1) prefill the prompt once, at batch 1; every row samples its own first token from it
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        # the model allocates its cache in its compute dtype; sized for the whole answer when known
        cache = self.model.new_kv_cache(1, len(tokens) + (max_tokens or DECODE_RESERVE)) if use_cache else None
        logits = self.model(prompt, kv_cache=cache)[:, -1, :]
        logits = logits.expand(num_samples, -1)
        if use_cache and num_samples > 1:
            cache = cache.replicate(num_samples)
        sequences = prompt.expand(num_samples, -1) if not use_cache else None

        rows = [RowState() for _ in range(num_samples)]
        steps = 0
        while max_tokens is None or steps < max_tokens:
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, mask = self._advance_rows(rows, sampled)
            yield column, mask
            steps += 1
            if all(row.completed for row in rows) or (max_tokens is not None and steps >= max_tokens):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            if use_cache:
                logits = self.model(ids, kv_cache=cache)[:, -1, :]
            else:
                sequences = torch.cat([sequences, ids], dim=1)
                logits = self.model(sequences)[:, -1, :]

    def _advance_rows(self, rows, sampled):
        """Pick each row's next token (forced or sampled) and step its tool-use state machine."""
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
            result = use_calculator(expr)
            row.forced.append(self.output_start)
            row.forced.extend(self.tokenizer.encode(result))
            row.forced.append(self.output_end)
        elif row.expr_tokens is not None:
            row.expr_tokens.append(token)


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
