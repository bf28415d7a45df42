"""Worker for tests/test_fused_decode.py: the fused decode step's Triton kernels in Triton's interpreter, on the CPU.

    TRITON_INTERPRET=1 python tests/fused_decode_check.py      prints one JSON object of measurements

The interpreter is chosen when the kernels are defined (at import), hence a process of its own. Cache splits of 16
or 32 slots, so that short prompts cross split boundaries and sliding windows straddle them, and loop blocks of 16 or
32 (the Engine checks, whose caches are 256 slots, use 64-slot splits: the interpreter runs one program at a time).
"""

import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import nanochat.engine as engine_mod  # noqa: E402
import nanochat.fused_decode as fd  # noqa: E402
import nanochat.fused_sample as fs  # noqa: E402
from nanochat.batching import Batcher  # noqa: E402
from nanochat.engine import Engine, sample_with  # noqa: E402
from nanochat.gpt import GPT, DecodeWeights, GPTConfig  # noqa: E402
from nanochat.kv_cache import StaticKVCache  # noqa: E402
from tests.test_engine import PROMPT, TOK, random_gpt, run  # noqa: E402
from tests.test_static_decode import ragged_decode  # noqa: E402



def round_bf16_to_nearest_even():
    """Triton's interpreter casts fp32 to bf16 by truncation (InterpreterBuilder.cast_impl passes no rounding mode);
    a GPU, like torch, rounds to nearest even. Cast as the GPU does, so the bf16 checks measure the kernels' arithmetic
    and not a rounding only the interpreter does (it shifted a third of the embedding's values by an ulp)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:  # the upper half, rounded (finite values)
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        return truncating(self, src, dst_type)
    interpreter.InterpreterBuilder.cast_impl = cast_impl


round_bf16_to_nearest_even()
VOCAB, PROMPT_LEN, STEPS, MAX_LEN = 80, 13, 6, 32  # positions 13..18 of a 32-slot cache: splits 0 and 1


def small_gpt(n_kv_head, pattern, dtype, seed=0, n_head=4):
    """2 layers (value embeddings on the second), heads of 16, a short window of 5; every weight random."""
    config = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=16 * n_head,
                       window_pattern=pattern, short_window=5)
    torch.manual_seed(seed)
    model = GPT.create(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.size(-1) ** -0.5) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def teacher_forced(model, step, prompt, forced):
    """Logits (B, N, vocab) of `step` fed forced (B, N) column by column (non-contiguous ids) after the prompt, and
    the cache it wrote."""
    weights, c = DecodeWeights(model), model.config
    cache = StaticKVCache(forced.size(0), c.n_kv_head, c.head_dim, c.n_layer, MAX_LEN, dtype=model.compute_dtype)
    model(prompt, kv_cache=cache.prefill_cache())
    cache.start(prompt.size(1))
    cos, sin = model.rotary_tables(MAX_LEN)
    logits = [step(weights, forced[:, t:t + 1], cache, cos, sin).clone() for t in range(forced.size(1))]
    return torch.stack(logits, 1), cache


def static_step(weights, *args):
    return weights.step(*args)


def step_checks():
    """fp32: fused vs the static step (same arithmetic: only the summation order differs), per GQA group size,
    window pattern and batch (3 heads: a width of 48 and a group of 3, both padded to a power of two in the kernel);
    bf16: both against an fp32 full forward."""
    out = {}
    cases = [(4, 2, "SL", 2, 16, 32, "last"), (4, 1, "SL", 1, 16, 32, "last"), (4, 4, "L", 1, 16, 32, "last"),
             (3, 1, "SL", 2, 16, 32, "last"), (4, 4, "SL", 2, 32, 16, "last"), (4, 2, "L", 1, 32, 16, "last"),
             (4, 2, "SL", 2, 16, 32, "kernel"), (4, 1, "SL", 1, 16, 32, "kernel")]  # split32 block16: several iterations
    cases = [case + ("split",) for case in cases]
    # the lanes kernel (one query head per K/V head): one iteration of 16 rows, then several of 8 over two rows' windows
    cases += [(4, 4, "L", 1, 16, 32, "last", "lanes"), (4, 4, "SL", 2, 32, 16, "last", "lanes")]
    for n_head, n_kv, pattern, batch, fd.SPLIT_SLOTS, fd.ATTEND_BLOCK, fd.COMBINE, fd.ATTEND_KERNEL in cases:
        model = small_gpt(n_kv, pattern, torch.float32, n_head=n_head)
        g = torch.Generator().manual_seed(n_kv)
        prompt, forced = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=g), torch.randint(0, VOCAB, (batch, STEPS), generator=g)
        want, want_cache = teacher_forced(model, static_step, prompt, forced)
        got, got_cache = teacher_forced(model, fd.fused_step, prompt, forced)
        name = (f"fp32 heads{n_head} kv{n_kv} {pattern} batch{batch} split{fd.SPLIT_SLOTS} block{fd.ATTEND_BLOCK} "
                f"combine {fd.COMBINE} {fd.ATTEND_KERNEL} kernel")
        out[name] = dict(logits_rel=rel(got, want), cache_max_abs=max((a - b).abs().max().item() for a, b in
                                                                      zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v)),
                         pos=[got_cache.pos.tolist(), want_cache.pos.tolist()], arrivals_left=int(got_cache.arrivals.abs().max()))
    fd.SPLIT_SLOTS, fd.ATTEND_BLOCK, fd.COMBINE, fd.ATTEND_KERNEL = 16, 32, "last", "split"
    model = small_gpt(2, "SL", torch.float32)  # one request per row: 3 prompts, 3 positions, the last row retired halfway
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (13, 3, 20)]
    forced = torch.randint(0, VOCAB, (3, STEPS), generator=g)
    (want, want_cache), (got, got_cache) = (ragged_decode(model, prompts, forced, MAX_LEN, step) for step in (static_step, fd.fused_step))
    live = STEPS // 2  # the last row's logits after it retired are nobody's
    out["fp32 ragged rows"] = dict(logits_rel=rel(torch.cat([got[:2].flatten(), got[2, :live].flatten()]),
                                                   torch.cat([want[:2].flatten(), want[2, :live].flatten()])),
                                   pos=[got_cache.pos.tolist(), want_cache.pos.tolist()])
    ref = small_gpt(2, "SL", torch.float32)
    model = small_gpt(2, "SL", torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=g)
    for rows, name in ((2, "bf16 vs fp32 forward"), (1, "bf16 vs fp32 forward, one row")):  # one row: the GEMV kernel
        forced = torch.randint(0, VOCAB, (rows, 6), generator=g)
        with torch.inference_mode():
            full = ref(torch.cat([prompt.expand(rows, -1), forced], 1))[:, PROMPT_LEN:]
        fused, static = (teacher_forced(model, step, prompt, forced)[0] for step in (fd.fused_step, static_step))
        out[name] = dict(fused_rel=rel(fused, full), static_rel=rel(static, full), fused_vs_static=rel(fused, static))
    return out


def gemv_checks():
    """fd.gemv against torch for each epilogue, with tiles that leave ragged edges (N and K not multiples of the
    blocks), on a weight stored (N, K) as on CUDA and (K, N) as the CPU's input-major copies: relative error in fp32,
    and in bf16 against fp32 arithmetic on the same bf16 values."""
    out = {}
    g = torch.Generator().manual_seed(1)
    N, K, cap = 75, 200, 15.0
    for dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(N, K, generator=g).mul(K ** -0.5).to(dtype)
        x, add, x0_mix = (torch.randn(1, size, generator=g).to(dtype) for size in (K, N, N))
        resid = torch.tensor([0.7], dtype=dtype)
        f = lambda t: t.float()  # noqa: E731
        normed = f(x) * torch.rsqrt(f(x).pow(2).mean() + torch.finfo(torch.float32).eps)  # F.rms_norm's, bf16 too
        added = (f(x) @ f(W).T + f(add)).to(dtype)
        want = {"plain": f(x) @ f(W).T, "add": added,
                "add mix": f(resid) * f(added) + f(x0_mix),
                "norm relu2": torch.relu(normed @ f(W).T).square(),
                "logits": (torch.sigmoid(normed @ f(W).T[:, :N - 5] * (2 / cap)) * 2 * cap - cap)}
        for layout, w in (("NK", W.t()), ("KN", W.t().contiguous())):
            for blocks in ((16, 4), (8, 2)):  # (BLOCK_N, warps): 75 rows end mid-block; K = 200 in a 256-wide tile
                got = {"plain": fd.gemv(x, w, blocks=blocks), "add": fd.gemv(x, w, add=add, blocks=blocks),
                       "add mix": fd.gemv(x, w, add=add, mix=(resid, x0_mix), blocks=blocks),
                       "norm relu2": fd.gemv(x, w, norm=True, relu2=True, blocks=blocks),
                       "logits": fd.gemv(x, w, norm=True, cap=cap, n=N - 5, out_dtype=torch.float32, blocks=blocks)}
                for name, y in got.items():
                    out[f"{str(dtype)[6:]} {layout} {blocks[0]} rows {name}"] = dict(
                        rel=rel(y, want[name]), shape=list(y.shape), dtype=str(y.dtype)[6:])
    return out


def engine_checks():
    """Engine(decode="fused") streams vs the eager path's (greedy) and the static path's (sampled), and a stream
    that outruns the static cache (the eager path takes over)."""
    fd.SPLIT_SLOTS = 64
    model = random_gpt(depth=2, window_pattern="SL")
    greedy = dict(num_samples=2, max_tokens=6, temperature=0.0)
    sampled = dict(max_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    fused = Engine(model, TOK, decode="fused")
    lone = dict(greedy, num_samples=1)  # one row: fused_step's GEMV-kernel path
    out = dict(mode=fused.decode_mode(),
               greedy_equal=run(fused.generate(PROMPT, **greedy)) == run(Engine(model, TOK, decode="eager").generate(PROMPT, **greedy)),
               lone_greedy_equal=run(fused.generate(PROMPT, **lone)) == run(Engine(model, TOK, decode="eager").generate(PROMPT, **lone)),
               sampled_equal=run(fused.generate(PROMPT, num_samples=2, **sampled)) == run(Engine(model, TOK, decode="static").generate(PROMPT, num_samples=2, **sampled)),
               decoders_kept=len(fused._idle))
    batcher = Batcher(fused, rows=3)  # continuous batching on the fused step: two requests at their own positions
    requests = [(PROMPT, dict(num_samples=1, max_tokens=5, temperature=0.0)), (PROMPT[:4], dict(num_samples=2, **sampled))]
    try:
        with batcher.cond:
            streams = [batcher.generate(p, **kw) for p, kw in requests]
        out["batched_equal"] = [run(s) == run(Engine(model, TOK, decode="static").generate(p, **kw))
                                for s, (p, kw) in zip(streams, requests)]
        out["batched_mode"] = batcher.mode
    finally:
        batcher.close()
    out.update(lone_row_checks(model, sampled))
    reserve, bucket = engine_mod.DECODE_RESERVE, engine_mod.CACHE_BUCKET
    engine_mod.DECODE_RESERVE, engine_mod.CACHE_BUCKET = 4, 8  # the static cache ends a few tokens in
    try:
        streams = [[col for col, _ in itertools.islice(Engine(model, TOK, decode=d).generate(PROMPT, num_samples=2, temperature=0.0), 8)]
                   for d in ("fused", "eager")]
    finally:
        engine_mod.DECODE_RESERVE, engine_mod.CACHE_BUCKET = reserve, bucket
    out["overflow_equal"] = streams[0] == streams[1]
    out["overflow_tokens"] = len(streams[0])
    return out


def sample_logits(kind, rows, V, dtype, seed):
    """(rows, V) logits: random, sorted either way (the likeliest all in the first or in the ragged last block), ties
    (integers in a small range), or with all but 70 of the vocabulary masked to -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g) * 3
    if kind == "descending":
        x = x.sort(dim=1, descending=True).values
    elif kind == "ascending":
        x = x.sort(dim=1).values
    elif kind == "ties":
        x = x.round().clamp(-4, 4)
    elif kind == "masked":
        x[:, torch.randperm(V, generator=g)[: V - 70]] = float("-inf")
    return x.to(dtype)


def sample_checks():
    """fused_sample.sample_top_k against engine.sample_with's torch path on the same logits and uniforms, each row
    with its own. A row that draws another token must be explained by rounding: its uniform within 1e-5 of the
    boundary between the two (adjacent) tokens in torch's CDF, or by a tie: equal logits drawn (which of equal logits
    topk keeps is unspecified). Few rows at the large k: the interpreter runs a sort network slowly."""
    out = {}
    cases = [("random", 12, 80, 1, 1.0, torch.float32), ("random", 12, 80, 5, 0.7, torch.float32),
             ("random", 6, 700, 16, 1.0, torch.float32), ("random", 4, 65, 64, 1.0, torch.float32),
             ("random", 2, 1200, 33, 0.6, torch.bfloat16), ("descending", 3, 1000, 20, 1.0, torch.float32),
             ("ascending", 3, 999, 20, 1.0, torch.float32), ("ties", 4, 600, 16, 1.0, torch.float32),
             ("masked", 2, 1500, 50, 0.8, torch.float32)]
    for seed, (kind, rows, V, k, T, dtype) in enumerate(cases):
        logits = sample_logits(kind, rows, V, dtype, seed)
        u = torch.rand(rows, 1, generator=torch.Generator().manual_seed(100 + seed))
        u[0], u[1] = 0.0, 1 - 2 ** -24  # the first and the last token of the CDF
        fused = fs.sample_top_k(logits, u, T, k)
        fs.ENABLED = False
        want = sample_with(logits.float(), u, T, k)  # bf16 logits too: the kernel computes in fp32
        fs.ENABLED = True
        vals, idx = torch.topk(logits.float(), k, dim=-1)
        cdf = torch.softmax(vals / T, dim=-1).cumsum(-1)
        differ, unexplained = 0, 0
        for r in range(rows):
            a, b = fused[r, 0].item(), want[r, 0].item()
            if a == b:
                continue
            differ += 1
            if logits[r, a].item() == logits[r, b].item():  # equal logits: the same draw up to which index topk kept
                continue
            if kind == "ties" or a not in idx[r].tolist():
                unexplained += 1
                continue
            i, j = sorted([idx[r].tolist().index(a), idx[r].tolist().index(b)])
            unexplained += j != i + 1 or abs(cdf[r, i].item() - u[r, 0].item() * cdf[r, -1].item()) > 1e-5
        out[f"{kind} V{V} k{k} T{T} {str(dtype)[6:]}"] = dict(rows=rows, differ=differ, unexplained=unexplained,
                                                              in_range=bool(((fused >= 0) & (fused < V)).all()),
                                                              shape=list(fused.shape), dtype=str(fused.dtype))
    out["engine"] = engine_sample_check()
    return out


def engine_sample_check():
    """Engine streams sampled with top-k only (no top-p): sample_with takes fused_sample here, and the stream equals
    the torch path's."""
    calls, sample_top_k = [], fs.sample_top_k
    fs.sample_top_k = lambda *args: calls.append(1) or sample_top_k(*args)
    fs._verdicts.clear()  # the first call checks the kernels (fused_sample.verified): one call more
    model = random_gpt(depth=2, window_pattern="SL")
    kw = dict(num_samples=3, max_tokens=8, temperature=0.8, top_k=20, seed=5)
    try:
        fused = run(Engine(model, TOK, decode="static").generate(PROMPT, **kw))
        fs.ENABLED = False
        torch_path = run(Engine(model, TOK, decode="static").generate(PROMPT, **kw))
    finally:
        fs.ENABLED, fs.sample_top_k = True, sample_top_k
    return dict(equal=fused == torch_path, fused_calls=len(calls), tokens=len(fused[0]), verdicts=list(fs._verdicts.values()))


def self_check_checks():
    """engine.check_fused_step on the real kernels: the errors it measures for healthy fp32 and bf16 steps (the
    verdicts the Engine checks above left), and for an attention whose output is wrong (refused)."""
    fd.SPLIT_SLOTS = 64  # 4 splits of the check's 256-slot cache
    out = dict(verdicts=list(engine_mod._fused_checked.values()))
    for name, model in (("fp32", random_gpt(depth=2, window_pattern="SL")), ("bf16", small_gpt(2, "SL", torch.bfloat16))):
        out[name] = engine_mod.fused_step_errors(model, DecodeWeights(model))
    attend = fd.attend
    fd.attend = lambda *args, **kw: attend(*args, **kw).flip(-1)  # every head's output, its channels reversed
    engine_mod._fused_checked.clear()
    try:
        engine_mod.check_fused_step(model, DecodeWeights(model))
        out["broken_refused"] = False
    except RuntimeError as e:
        out["broken_refused"] = str(e)
    finally:
        fd.attend = attend
        engine_mod._fused_checked.clear()
    return out


class UncapturedGraph:
    """engine.CudaGraphStep without CUDA: calls fn where a graph would replay it (warm-up and capture included)."""

    def __init__(self, fn, warmup=2):
        for _ in range(warmup):
            fn()
        self.fn = fn
        fn()

    def __call__(self):
        return self.fn()


def lone_row_checks(model, sampled):
    """auto as on CUDA (fused for a lone row, graph for more) in a 4-row batch: a request that shares the batch for its
    first steps (4-row static step) and is then alone in row 0 (1-row fused step) reads, on the fused step, the K/V the
    static one wrote: its stream must equal the static engine's, and so must its companion's."""
    calls = []
    fused_step = fd.fused_step
    saved = engine_mod.AUTO_DECODE["cpu"], engine_mod.CudaGraphStep, fd.fused_step
    engine_mod.AUTO_DECODE["cpu"], engine_mod.CudaGraphStep = ("fused", "graph"), UncapturedGraph
    fd.fused_step = lambda *args: calls.append(1) or fused_step(*args)
    engine = Engine(model, TOK)
    batcher = Batcher(engine, rows=4)
    requests = [(PROMPT, dict(num_samples=1, max_tokens=10, temperature=0.0)),  # row 0
                (PROMPT[:4], dict(sampled, num_samples=2, max_tokens=3))]         # rows 1-2, gone after 3 tokens
    try:
        with batcher.cond:
            streams = [batcher.generate(p, **kw) for p, kw in requests]
        got = [run(s) for s in streams]
        modes = [engine.decode_mode(1), engine.decode_mode(4), batcher.mode]
    finally:
        batcher.close()
        engine_mod.AUTO_DECODE["cpu"], engine_mod.CudaGraphStep, fd.fused_step = saved
    want = [run(Engine(model, TOK, decode="static").generate(p, **kw)) for p, kw in requests]
    return dict(lone_row_modes=modes, lone_row_equal=[g == w for g, w in zip(got, want)], lone_row_fused_calls=len(calls),
                lone_row_tokens=len(got[0][0]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(dict(prompt_len=PROMPT_LEN, n_steps=STEPS, steps=step_checks(), gemv=gemv_checks(), engine=engine_checks(),
                     self_check=self_check_checks(), sample=sample_checks())))
