"""The static-shape decode step (nanochat.gpt.DecodeWeights.step over a kv_cache.StaticKVCache) and the Engine's
static / graph / compile paths, on CPU: the step equals GPT.forward with a KVCache and a full forward (sliding
windows, GQA, value embeddings, replicated rows, positions past the rotary precompute); the Engine's streams equal
the eager path's (greedy, sampled, a calculator call, a cache overflow). The CUDA graph is replaced by a stand-in
that runs the step at every replay, so the Engine's capture / reuse logic runs here too."""
import pytest
import torch

import nanochat.engine as engine_mod
from nanochat.engine import Engine
import nanochat.gpt as gpt_module
from nanochat.gpt import GPT, DecodeWeights, GPTConfig, decode_attention, visible_bias
from nanochat.kv_cache import StaticKVCache
from tests.test_engine import A_END, OUT_END, OUT_START, PROMPT, PY_END, PY_START, TOK, one_thread, random_gpt, run, text  # noqa: F401 (one_thread: autouse)
from tests.test_gpt import make_model, tokens
from tests.fixtures import measure_leaving_rng



def static_cache(model, batch, max_len):
    c = model.config
    return StaticKVCache(batch, c.n_kv_head, c.head_dim, c.n_layer, max_len, dtype=model.compute_dtype)


@torch.inference_mode()
def static_decode(model, prompt, continuation, max_len, host_position=False):
    """Prefill prompt (1, P) into row 0, start every row, then step continuation (B, N) one column at a time:
    logits (B, N, vocab) of the static step (host_position: told each step's position, `at`, as Engine.generate's
    uncaptured steps are)."""
    weights, cache = DecodeWeights(model), static_cache(model, continuation.size(0), max_len)
    cos, sin = model.rotary_tables(max_len)
    model(prompt, kv_cache=cache.prefill_cache())
    P = prompt.size(1)
    cache.start(P)
    out = [weights.step(continuation[:, t:t + 1], cache, cos, sin, at=P + t if host_position else None)
           for t in range(continuation.size(1))]
    assert cache.pos.tolist() == [prompt.size(1) + continuation.size(1)] * continuation.size(0)
    return torch.stack(out, 1)


# -----------------------------------------------------------------------------
# the step against GPT.forward

@pytest.mark.parametrize("host_position", [False, True], ids=["masked", "at"])
@pytest.mark.parametrize("pattern,n_kv,seq", [("L", 8, 32), ("SSSL", 2, 32), ("SL", 1, 4)])
def test_static_step_matches_kv_cache_and_full_forward(pattern, n_kv, seq, host_position):
    """Windows of 3 tokens on S layers (the context reaches 25), GQA, value embeddings (every other layer), 3 rows
    after the batch-1 prefill; seq 4: the rotary precompute holds 40 positions and decoding reaches 55. at: the
    positions known to the host, so slices of the cache instead of a mask."""
    model = make_model(depth=4, seq=seq, window_pattern=pattern, short_window=3, n_kv_head=n_kv)
    assert model.config.n_head == 8 and len(model.value_embeds) == 2
    P, N = 7, 18 if seq > 4 else 48
    prompt, continuation = tokens(1, P), tokens(3, N, seed=3)
    assert P + N > model.cos.size(1) or seq > 4
    static = static_decode(model, prompt, continuation, max_len=P + N + 5, host_position=host_position)  # 5 stale slots
    with torch.inference_mode():
        cache = model.new_kv_cache(1, P + N)
        model(prompt, kv_cache=cache)
        cache = cache.replicate(3)
        eager = torch.cat([model(continuation[:, t:t + 1], kv_cache=cache) for t in range(N)], 1)
        full = model(torch.cat([prompt.expand(3, -1), continuation], 1))[:, P:]  # the step at column t is position P + t
    torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(static, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(static.argmax(-1), full.argmax(-1))
    assert (static[0] - static[1]).abs().max() > 0.1  # the rows decode different tokens: not one row copied


@torch.inference_mode()
def ragged_decode(model, prompts, continuation, max_len, step=DecodeWeights.step):
    """Prompts of different lengths prefilled into rows 0, 1, ... (row b at its own position), then continuation
    (B, N) stepped one column at a time, the last row retired (not live) halfway: logits (B, N, vocab)."""
    weights, cache = DecodeWeights(model), static_cache(model, len(prompts), max_len)
    cos, sin = model.rotary_tables(max_len)
    for row, prompt in enumerate(prompts):
        model(prompt, kv_cache=cache.prefill_cache(row))
        cache.place([row], prompt.size(1))
    out = []
    for t in range(continuation.size(1)):
        if t == continuation.size(1) // 2:
            cache.retire([len(prompts) - 1])
        out.append(step(weights, continuation[:, t:t + 1], cache, cos, sin))
    return torch.stack(out, 1), cache


def test_rows_at_their_own_positions_decode_as_if_alone():
    """One request per row (nanochat.batching): each row's logits equal its own sequence's full forward."""
    model = make_model(depth=4, window_pattern="SSSL", short_window=3, n_kv_head=2)
    prompts = [tokens(1, n, seed=n) for n in (7, 3, 12)]
    continuation = tokens(3, 10, seed=3)
    static, cache = ragged_decode(model, prompts, continuation, max_len=32)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation[row:row + 1]], 1))[0, prompt.size(1):]
            n = 5 if row == 2 else 10  # the retired row's later logits are nobody's
            torch.testing.assert_close(static[row, :n], full[:n], rtol=1e-4, atol=1e-4)
    assert cache.pos.tolist() == [17, 13, 0]  # retired: back to 0, and not advanced since


def test_a_window_one_token_too_wide_is_caught(monkeypatch):
    """The comparison above is not vacuous: the S-layer mask one slot too wide changes the logits."""
    model = make_model(depth=4, window_pattern="SSSL", short_window=3, n_kv_head=2)
    prompt, continuation = tokens(1, 7), tokens(2, 10, seed=3)
    right = static_decode(model, prompt, continuation, max_len=24)
    real = StaticKVCache.visible
    monkeypatch.setattr(StaticKVCache, "visible", lambda self, window: real(self, window + 1 if window >= 0 else window))
    wrong = static_decode(model, prompt, continuation, max_len=24)
    assert (right - wrong).abs().max() > 1e-2


def test_static_cache_mask_and_writes():
    cache = StaticKVCache(batch_size=2, num_kv_heads=1, head_dim=2, num_layers=1, max_len=8)
    cache.pos.copy_(torch.tensor([5, 2]))  # rows stand at their own positions
    assert cache.visible(-1).tolist() == [[True] * 6 + [False] * 2, [True] * 3 + [False] * 5]
    assert cache.visible(2).tolist()[0] == [False] * 3 + [True] * 3 + [False] * 2  # the query and 2 to its left
    assert cache.visible(0).tolist()[1] == [False] * 2 + [True] + [False] * 5
    k = torch.arange(1.0, 5.0).view(2, 1, 1, 2)
    k_all, _ = cache.write(0, k, -k)
    assert torch.equal(k_all[0, :, 5], k[0, :, 0]) and torch.equal(k_all[1, :, 2], k[1, :, 0])
    assert k_all.abs().sum() == k.abs().sum()  # nothing else written
    assert cache.pos.tolist() == [5, 2]  # the step advances the positions, not the write
    cache.live[1] = 0
    cache.advance()
    assert cache.pos.tolist() == [6, 2]  # a row that is not live stays where it is
    k_rows, v_rows = cache.write_at(0, torch.full((1, 1, 2), 9.0), torch.full((1, 1, 2), -9.0), at=7)
    assert k_rows.shape == (1, 1, 8, 2) and k_rows.data_ptr() == cache.k[0].data_ptr()  # row 0 of the cache, in place
    assert cache.k[0][0, 0, 7].tolist() == [9.0, 9.0] and cache.v[0][0, 0, 7].tolist() == [-9.0, -9.0]
    assert cache.k[0][1].abs().sum() == k[1].abs().sum()  # row 1 untouched


def test_start_copies_the_prefill_into_every_row():
    cache = StaticKVCache(batch_size=3, num_kv_heads=2, head_dim=4, num_layers=2, max_len=10)
    prefill = cache.prefill_cache()
    for layer in range(2):
        prefill.insert_kv(layer, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    prefill.advance(6)
    cache.start(6)
    assert cache.pos.tolist() == [6] * 3
    for t in cache.k + cache.v:
        assert t[0, :, :6].abs().sum() > 0 and torch.equal(t[1:, :, :6], t[:1, :, :6].expand(2, -1, -1, -1))


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_decode_attention_matches_sdpa(n_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, n_kv, 12, 16, generator=g), torch.randn(2, n_kv, 12, 16, generator=g)
    visible = torch.tensor([False] * 3 + [True] * 6 + [False] * 3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, 3:9], v[:, :, 3:9], enable_gqa=n_kv != 4)
    torch.testing.assert_close(decode_attention(q, k, v, visible_bias(visible, q.dtype)), ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_in_bf16_stays_close_to_fp32():
    """bf16 operands: the softmax still accumulates in fp32 (scores scaled inside the matmul, not after rounding)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 1, 32, generator=g)
    k, v = torch.randn(3, 2, 40, 32, generator=g), torch.randn(3, 2, 40, 32, generator=g)  # GQA: 2 query heads per kv head
    visible = torch.arange(40) < 29
    ref = decode_attention(q, k, v, visible_bias(visible, torch.float32))
    out = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), visible_bias(visible, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("host_position", [False, True], ids=["masked", "at"])
def test_the_step_in_bf16_stays_close_to_fp32(host_position):
    """A bf16 model (its K/V cache and every step's operands in bf16), told its position or not: the logits stay
    within bf16 rounding of the fp32 step's (measured ~0.7%), windows and GQA included."""
    fp32 = make_model(depth=4, window_pattern="SSSL", short_window=3, n_kv_head=2)
    bf16 = GPT.create(fp32.config, "cpu", dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    bf16.eval()
    prompt, continuation = tokens(1, 7), tokens(3, 18, seed=3)
    ref = static_decode(fp32, prompt, continuation, max_len=30)
    got = static_decode(bf16, prompt, continuation, max_len=30, host_position=host_position)
    assert bf16.compute_dtype == torch.bfloat16
    assert ((got.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_weights_are_copies_in_the_compute_dtype_and_follow_the_parameters(monkeypatch):
    """bf16 compute with fp32 parameters: the step reads bf16 copies, the parameters stay fp32 (a model being
    trained keeps its master weights), and refresh() picks up an in-place update (an optimizer step)."""
    model = GPT.create(make_model(depth=2).config, "cpu", dtype=torch.bfloat16)
    weights = DecodeWeights(model)
    assert weights.layers[0].fc.w.dtype == torch.bfloat16 and weights.wte.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.add_(1.0)
        model.transformer.h[1].mlp.c_proj.weight.add_(1.0)
        model.transformer.h[0].attn.c_k.weight.fill_(0.5)
    fc, mlp_proj = model.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_proj.weight
    assert not torch.equal(weights.layers[1].fc.w, fc.t().to(torch.bfloat16))
    weights.refresh()
    assert torch.equal(weights.layers[1].fc.w, fc.t().to(torch.bfloat16))  # (in, out): the step computes x @ w
    assert torch.equal(weights.layers[1].mlp_proj.w, mlp_proj.t().to(torch.bfloat16))
    D = model.config.n_embd
    assert torch.equal(weights.layers[0].qkv.w[:, D:2 * D], torch.full((D, D), 0.5, dtype=torch.bfloat16))
    assert weights.matches(model)
    model.to(torch.float64)  # replaces every parameter tensor
    assert not weights.matches(model)


def test_cpu_layout_reads_wide_outputs_input_major_and_uses_the_rest_in_place():
    """On CPU the matrices with out >= in (qkv, fc, lm_head) are (in, out) contiguous copies, which MKL's GEMV reads
    at memory speed; mlp_proj (a wider input) stays a view of its fp32 parameter. Copies follow refresh()."""
    model = make_model(depth=2)
    weights, C = DecodeWeights(model), model.config.n_embd
    fc, mlp_proj = weights.layers[1].fc.w, weights.layers[1].mlp_proj.w
    assert fc.shape == (C, 4 * C) and fc.is_contiguous() and weights.lm_head.w.is_contiguous()
    assert fc.data_ptr() != model.transformer.h[1].mlp.c_fc.weight.data_ptr()
    assert mlp_proj.shape == (4 * C, C) and mlp_proj.data_ptr() == model.transformer.h[1].mlp.c_proj.weight.data_ptr()
    assert weights.layers[1].qkv.w.shape == (C, 3 * C)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(2.0)
        model.lm_head.weight.add_(1.0)
    weights.refresh()
    assert torch.equal(fc, model.transformer.h[1].mlp.c_fc.weight.t())
    assert torch.equal(weights.lm_head.w, model.lm_head.weight.t())


def test_cpu_packed_matrices_run_steps_of_several_rows(monkeypatch):
    """Large enough fp32 CPU matrices also carry oneDNN's packed copy: a step of 2+ rows runs on it and gives the
    plain matmul's result (a single row takes the GEMV); refresh() repacks it from the parameters. bf16: none."""
    monkeypatch.setattr(gpt_module, "PACK_MIN_ELEMENTS", 0)
    monkeypatch.setattr(gpt_module, "cpu_packing_pays", lambda: True)
    model = make_model(depth=2)
    W, C = model.transformer.h[1].mlp.c_fc.weight, model.config.n_embd
    fc = DecodeWeights(model).layers[1].fc
    x, add = torch.randn(5, C), torch.randn(5, 4 * C)
    with torch.no_grad():
        torch.testing.assert_close(fc(x[:1]), x[:1] @ W.t(), rtol=1e-5, atol=1e-5)
        assert fc.source is not None and fc.packed is None  # packed at the first step of 2+ rows
        torch.testing.assert_close(fc(x), x @ W.t(), rtol=1e-5, atol=1e-5)
        assert fc.packed.is_mkldnn
        torch.testing.assert_close(fc(x, add=add), add + x @ W.t(), rtol=1e-5, atol=1e-5)
        weights = DecodeWeights(model)
        weights.layers[1].fc(x)
        W.mul_(-2.0)
        weights.refresh()
        assert weights.layers[1].fc.packed is None
        torch.testing.assert_close(weights.layers[1].fc(x), x @ W.t(), rtol=1e-5, atol=1e-5)
    bf16 = DecodeWeights(GPT.create(model.config, "cpu", dtype=torch.bfloat16))
    assert bf16.layers[1].fc.source is None


def test_refresh_copies_only_after_a_parameter_changed():
    """refresh() reads the parameters' version counters: untouched parameters cost nothing per request, an in-place
    update (an optimizer step) renews the copies, and force=True renews them whatever the counters say."""
    model = make_model(depth=2)
    weights = DecodeWeights(model)
    lm_head = weights.lm_head.w
    want = lm_head.clone()
    lm_head.fill_(7.0)  # stands in for stale values: only a real refresh overwrites it
    weights.refresh()
    assert (lm_head == 7.0).all()
    with torch.no_grad():
        model.transformer.h[0].attn.c_q.weight.mul_(1.0)  # any parameter: a new version
    weights.refresh()
    assert torch.equal(lm_head, want)
    lm_head.fill_(7.0)
    weights.refresh(force=True)
    assert torch.equal(lm_head, want)


def test_gpu_layout_keeps_every_parameter_as_it_is():
    """Elsewhere than the CPU every matrix is a transposed view (cuBLAS reads the parameter as it is)."""
    from nanochat.gpt import input_major
    assert input_major("cpu", 1024, 256) and not input_major("cpu", 256, 1024)
    assert not input_major("cuda", 1024, 256) and not input_major("meta", 1024, 256)


# -----------------------------------------------------------------------------
# the Engine

class FakeGraph:
    """Stands in for CudaGraphStep on CPU: runs fn for warm-up and "capture" (unlike a real capture, which runs
    nothing: both leave the cache written and the position advanced), and re-runs it at every replay into the
    same output tensor, as a graph replay overwrites its captured output."""
    captures = 0

    def __init__(self, fn, warmup=2):
        for _ in range(warmup):
            fn()
        self.fn, self.out = fn, fn()
        FakeGraph.captures += 1

    def __call__(self):
        self.out.copy_(self.fn())
        return self.out


@pytest.fixture
def fake_graph(monkeypatch):
    monkeypatch.setattr(engine_mod, "CudaGraphStep", FakeGraph)
    FakeGraph.captures = 0
    return FakeGraph


@pytest.mark.parametrize("mode", ["static", "graph"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_engine_streams_equal_the_eager_path(mode, num_samples, fake_graph):
    model = random_gpt(depth=4, window_pattern="SSSL")  # windows of 8 tokens, the context grows to 40
    eager = Engine(model, TOK, decode="eager")
    fast = Engine(model, TOK, decode=mode)
    assert fast.decode_mode() == mode and eager.decode_mode() == "eager"
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=5), dict(temperature=0.8, seed=9)):
        want = run(eager.generate(PROMPT, num_samples=num_samples, max_tokens=30, **kwargs))
        got = run(fast.generate(PROMPT, num_samples=num_samples, max_tokens=30, **kwargs))
        assert got == want
        assert len(want[0]) == 30 and len({tuple(c) for c in want[0]}) > 3
    # one decoder per (batch, cache length, mode), built once and reused by the later requests
    assert len(fast._idle) == 1 and fast._idle[0].key == (num_samples, engine_mod.CACHE_BUCKET, mode)
    assert fake_graph.captures == (1 if mode == "graph" else 0)


def test_packing_is_used_only_where_it_measured_faster(monkeypatch):
    """A CPU where oneDNN's packed weight measured slower than MKL on the (in, out) copy (cpu_packing_speedup below
    PACK_MIN_SPEEDUP) runs steps of 2+ rows on the copy: same result, nothing packed."""
    monkeypatch.setattr(gpt_module, "PACK_MIN_ELEMENTS", 0)
    model = make_model(depth=2)
    W, C = model.transformer.h[1].mlp.c_fc.weight, model.config.n_embd
    x = torch.randn(5, C)
    for speedup, packs in ((0.62, False), (1.5, True)):
        monkeypatch.setattr(gpt_module, "cpu_packing_speedup", lambda: speedup)
        fc = DecodeWeights(model).layers[1].fc
        with torch.no_grad():
            torch.testing.assert_close(fc(x), x @ W.t(), rtol=1e-5, atol=1e-5)
        assert fc.source is not None and (fc.packed is not None) == packs


def test_the_packing_probe_times_both_forms_once_per_process():
    speedup = measure_leaving_rng(gpt_module.cpu_packing_speedup)
    assert speedup == gpt_module.cpu_packing_speedup()  # cached
    assert (speedup > 0) == gpt_module.onednn_packing_available() and (speedup == 0 or 0.05 < speedup < 50)  # a ratio of two timings


def test_packed_matrices_stream_what_the_eager_path_streams(monkeypatch):
    """Every matrix packed for oneDNN (3 rows per step): the same streams as GPT.forward, greedy and sampled."""
    monkeypatch.setattr(gpt_module, "PACK_MIN_ELEMENTS", 0)
    monkeypatch.setattr(gpt_module, "cpu_packing_pays", lambda: True)
    model = random_gpt(depth=4, window_pattern="SSSL")
    eager, fast = Engine(model, TOK, decode="eager"), Engine(model, TOK, decode="static")
    assert fast.shared_weights().lm_head.source is not None
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=5)):
        assert run(fast.generate(PROMPT, num_samples=3, max_tokens=30, **kwargs)) == \
            run(eager.generate(PROMPT, num_samples=3, max_tokens=30, **kwargs))


def test_prompt_lengths_share_a_bucket_and_stale_slots_are_masked(fake_graph):
    """Requests of different lengths reuse one captured decoder; each starts from the previous one's leftovers."""
    model = random_gpt(depth=2, window_pattern="SL")
    eager, fast = Engine(model, TOK, decode="eager"), Engine(model, TOK, decode="graph")
    for prompt in (PROMPT, PROMPT[:5], PROMPT + text(" and more words here"), PROMPT[:3]):
        assert run(fast.generate(prompt, num_samples=2, max_tokens=20, temperature=0.0)) == \
            run(eager.generate(prompt, num_samples=2, max_tokens=20, temperature=0.0))
    assert fake_graph.captures == 1


def bigram_gpt(chain, width=384):
    """A GPT that (at temperature 0) writes `chain`: token chain[i] is followed by chain[i+1]. One-hot embeddings
    and an lm_head mapping each token to its successor give the bigram; the blocks add random (small) attention
    and MLP outputs, so both decode paths still compute everything."""
    torch.manual_seed(0)
    config = GPTConfig.from_depth(2, TOK.get_vocab_size(), 64, head_dim=32, model_dim=width, n_kv_head=4, window_pattern="SL",
                                  short_window=4)
    model = GPT.create(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02 * p.size(1) ** -0.5 if "proj" in name else p.size(1) ** -0.5)
        model.transformer.wte.weight.copy_(torch.eye(model.padded_vocab_size, width))
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b, a] = 10 * width**-0.5  # norm() scales the one-hot row to sqrt(width)
    return model.eval()


def test_calculator_call_streams_equal_the_eager_path(fake_graph):
    chain = [PROMPT[-1], *text("x"), PY_START, *text("2+3"), PY_END, OUT_END, *text("!"), A_END]
    model = bigram_gpt(chain)
    for num_samples in (1, 3):
        want = run(Engine(model, TOK, decode="eager").generate(PROMPT, num_samples=num_samples, max_tokens=40, temperature=0.0))
        got = run(Engine(model, TOK, decode="graph").generate(PROMPT, num_samples=num_samples, max_tokens=40, temperature=0.0))
        assert got == want
        columns, masks = got
        row = [c[0] for c in columns]
        forced = [OUT_START, *text("5"), OUT_END]
        assert row == [*text("x"), PY_START, *text("2+3"), PY_END, *forced, *text("!"), A_END]
        assert [m[0] for m in masks] == [1] * 6 + [0] * 3 + [1] * 2
    # sampled: the same seed draws the same tokens on both paths, tool outputs included
    kwargs = dict(num_samples=4, max_tokens=40, temperature=1.0, seed=1)
    sampled = run(Engine(model, TOK, decode="graph").generate(PROMPT, **kwargs))
    assert sampled == run(Engine(model, TOK, decode="eager").generate(PROMPT, **kwargs))


def test_graphed_steps_run_one_ahead_and_take_forced_tokens_back(monkeypatch, fake_graph):
    """On a graphed path every step is started before the host has seen the sampled token (the GPU works while
    Python samples, streams and runs tools); the three tool-output tokens the model did not predict are taken back
    and rerun. Without the step ahead the stream is the same."""
    chain = [PROMPT[-1], *text("x"), PY_START, *text("2+3"), PY_END, OUT_END, *text("!"), A_END]
    model = bigram_gpt(chain)
    counts = {"ahead": 0, "undo": 0}
    step_ahead, undo = engine_mod.StaticSteps.step_ahead, engine_mod.StaticSteps.undo

    def counting_step_ahead(self, ids):
        out = step_ahead(self, ids)
        counts["ahead"] += out is not None
        return out

    def counting_undo(self):
        counts["undo"] += 1
        undo(self)
    monkeypatch.setattr(engine_mod.StaticSteps, "step_ahead", counting_step_ahead)
    monkeypatch.setattr(engine_mod.StaticSteps, "undo", counting_undo)
    got = run(Engine(model, TOK, decode="graph").generate(PROMPT, max_tokens=40, temperature=0.0))
    assert len(got[0]) == 11 and counts == {"ahead": 11, "undo": 3}  # one ahead per token (the last one's is wasted)
    counts.update(ahead=0, undo=0)
    assert run(Engine(model, TOK, decode="static").generate(PROMPT, max_tokens=40, temperature=0.0)) == got
    assert counts == {"ahead": 0, "undo": 0}  # not graphed: nothing runs asynchronously, nothing to gain
    monkeypatch.setattr(engine_mod, "STEP_AHEAD", False)
    assert run(Engine(model, TOK, decode="graph").generate(PROMPT, max_tokens=40, temperature=0.0)) == got
    assert counts == {"ahead": 0, "undo": 0}
    monkeypatch.setattr(engine_mod, "STEP_AHEAD", True)
    got = run(Engine(model, TOK, decode="graph").generate(PROMPT, max_tokens=5, temperature=0.0))
    assert len(got[0]) == 5 and counts["ahead"] == 4  # none after the last token max_tokens allows


def test_past_the_cache_end_the_eager_path_takes_over(monkeypatch, fake_graph):
    """max_tokens None: the static cache holds prompt + DECODE_RESERVE rounded up; the answer runs longer."""
    monkeypatch.setattr(engine_mod, "DECODE_RESERVE", 4)
    monkeypatch.setattr(engine_mod, "CACHE_BUCKET", 16)
    model = random_gpt(depth=4, window_pattern="SSSL", logit_scale=0.5)  # flat logits: <|assistant_end|> comes in ~100s of steps
    fast = Engine(model, TOK, decode="graph")
    for seed in (0, 1):
        want = run(Engine(model, TOK, decode="eager").generate(PROMPT, num_samples=2, temperature=1.0, seed=seed))
        got = run(fast.generate(PROMPT, num_samples=2, temperature=1.0, seed=seed))
        assert got == want
        assert len(got[0]) > 16 + 10  # well past the 16-slot cache
    assert [d.cache.max_len for d in fast._idle] == [16]  # one decoder, reused by the second request


def test_interleaved_requests_get_their_own_decoders(fake_graph):
    model = random_gpt()
    engine = Engine(model, TOK, decode="graph")
    alone = [run(engine.generate(PROMPT, num_samples=2, max_tokens=12, seed=s))[0] for s in (1, 2)]
    s1, s2 = (engine.generate(PROMPT, num_samples=2, max_tokens=12, seed=s) for s in (1, 2))
    both = [(x[0], y[0]) for x, y in zip(s1, s2)]
    s1.close(), s2.close()  # a stream hands its decoder back when it ends
    assert [b[0] for b in both] == alone[0] and [b[1] for b in both] == alone[1]
    assert fake_graph.captures == 2 and len(engine._idle) == 2


def test_parameters_changed_between_requests_are_used(fake_graph):
    """chat_rl samples, steps the optimizer (in place), samples again: the static path sees the new weights."""
    model = random_gpt()
    fast, eager = Engine(model, TOK, decode="graph"), Engine(model, TOK, decode="eager")
    before = run(fast.generate(PROMPT, max_tokens=16, temperature=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    after = run(fast.generate(PROMPT, max_tokens=16, temperature=0.0))
    assert after == run(eager.generate(PROMPT, max_tokens=16, temperature=0.0)) and after != before
    assert fake_graph.captures == 1  # same parameter tensors: the captured decoder is reused


def test_decode_mode_choice(monkeypatch):
    model = random_gpt()
    assert Engine(model, TOK).decode_mode() == "static"  # auto on CPU
    monkeypatch.setenv("NANOCHAT_DECODE", "static")
    assert Engine(model, TOK).decode_mode() == "static"
    assert Engine(model, TOK, decode="eager").decode_mode() == "eager"
    assert Engine(torch.compile(model), TOK).decode_mode() == "static"  # the compiled wrapper's GPT
    from tests.test_engine import ScriptedModel
    assert Engine(ScriptedModel([[1]], len(PROMPT)), TOK).decode_mode() == "eager"  # not a GPT: eager
    with pytest.raises(ValueError):
        Engine(model, TOK, decode="fast")


def test_compiled_step_streams_equal_the_eager_path(fake_graph):
    """torch.compile(fullgraph=True, dynamic=False) of the step: no graph break, same stream."""
    model = random_gpt(depth=2, window_pattern="SL")
    kwargs = dict(num_samples=2, max_tokens=12, temperature=0.0)
    want = run(Engine(model, TOK, decode="eager").generate(PROMPT, **kwargs))
    fast = Engine(model, TOK, decode="compile")
    assert run(fast.generate(PROMPT, **kwargs)) == want
    assert run(fast.generate(PROMPT[:6], **kwargs)) == run(Engine(model, TOK, decode="eager").generate(PROMPT[:6], **kwargs))
    assert fake_graph.captures == 0  # on a CPU compiled, not captured


def test_a_failing_capture_falls_back_to_eager_under_auto(monkeypatch):
    """auto picks the graph path on CUDA; if building it fails, the request (and later ones) decode eagerly.
    An explicitly requested path raises instead."""
    def broken(fn, warmup=2):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(engine_mod, "CudaGraphStep", broken)
    monkeypatch.setitem(engine_mod.AUTO_DECODE, "cpu", ("graph", "graph"))  # as on CUDA for more than one row
    model = random_gpt()
    want = run(Engine(model, TOK, decode="eager").generate(PROMPT, num_samples=2, max_tokens=10, temperature=0.0))
    engine = Engine(model, TOK)
    with pytest.warns(UserWarning, match="capture failed"):
        assert run(engine.generate(PROMPT, num_samples=2, max_tokens=10, temperature=0.0)) == want
    assert engine.decode == "eager"
    with pytest.raises(RuntimeError, match="capture failed"):
        run(Engine(model, TOK, decode="graph").generate(PROMPT, max_tokens=3))


def test_a_fused_capture_refused_with_pdl_is_retried_without(monkeypatch):
    """A device or driver that refuses programmatic dependent launch: the fused step is captured again with it off
    (for the rest of the process, warned); other paths' failures, or a fused one without PDL, still raise."""
    from nanochat import fused_decode
    attempts = []

    class RefusesPDL:
        def __init__(self, fn, warmup=2):
            attempts.append(fused_decode.PDL)
            if fused_decode.PDL:
                raise RuntimeError("operation not supported")
            self.fn = fn

        def __call__(self):
            return self.fn()
    monkeypatch.setattr(engine_mod, "CudaGraphStep", RefusesPDL)
    monkeypatch.setattr(fused_decode, "PDL", True)
    with pytest.raises(RuntimeError, match="not supported"):
        engine_mod.capture_step(lambda: 7, "graph")
    assert fused_decode.PDL is True
    with pytest.warns(UserWarning, match="programmatic dependent launch"):
        step = engine_mod.capture_step(lambda: 7, "fused")
    assert step() == 7 and fused_decode.PDL is False and attempts == [True, True, False]
    monkeypatch.setattr(engine_mod, "CudaGraphStep", lambda fn, warmup=2: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # PDL already off: nothing else to try
        engine_mod.capture_step(lambda: 7, "fused")


def test_auto_picks_a_path_per_row_count(monkeypatch):
    """AUTO_DECODE gives a device a path for a lone row and one for more rows (on CUDA: fused, graph); a lone row's
    path that cannot run here (fused without a GPU or Triton's interpreter) is never picked."""
    model = random_gpt()
    engine = Engine(model, TOK)
    assert [engine.decode_mode(rows) for rows in (1, 2, None)] == ["static"] * 3  # CPU
    monkeypatch.setitem(engine_mod.AUTO_DECODE, "cpu", ("fused", "graph"))  # CUDA's pair
    assert [engine.decode_mode(rows) for rows in (1, 2, None)] == ["graph"] * 3  # no GPU here: not fused
    monkeypatch.setattr(engine_mod, "step_unavailable", lambda mode, device, config: None)  # as on a GPU
    assert [engine.decode_mode(rows) for rows in (1, 2, 8, None)] == ["fused", "graph", "graph", "graph"]
    assert Engine(model, TOK, decode="graph").decode_mode(1) == "graph"  # chosen, not auto


def test_a_lone_row_path_that_fails_falls_back_to_the_path_of_more_rows(monkeypatch, fake_graph):
    """Under auto, a one-sample request whose path (fused, as on CUDA) cannot be built warns once and decodes on the
    path of more rows (graph) from then on; the engine stays on auto (a failing graph would go eager)."""
    monkeypatch.setitem(engine_mod.AUTO_DECODE, "cpu", ("fused", "graph"))
    monkeypatch.setattr(engine_mod, "step_unavailable", lambda mode, device, config: None)
    real_step = engine_mod.static_step

    def static_step(mode, *args):
        if mode == "fused":
            raise RuntimeError("the kernels did not compile")  # as a capture or compile error would, at build
        return real_step(mode, *args)
    monkeypatch.setattr(engine_mod, "static_step", static_step)
    model = random_gpt(depth=2, window_pattern="SL")
    kwargs = dict(max_tokens=10, temperature=0.0)
    want = run(Engine(model, TOK, decode="eager").generate(PROMPT, **kwargs))
    engine = Engine(model, TOK)
    with pytest.warns(UserWarning, match=r"static decode \(fused\) failed, decoding on the graph path from now on: "
                                         r"RuntimeError: the kernels did not compile"):
        assert run(engine.generate(PROMPT, **kwargs)) == want
    assert engine.decode == "auto" and engine.decode_mode(1) == "graph"
    assert run(engine.generate(PROMPT, **kwargs)) == want  # no second try, no warning
    assert [d.key[2] for d in engine._idle] == ["graph"] and fake_graph.captures == 1
