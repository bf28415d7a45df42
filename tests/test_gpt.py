"""nanochat.gpt and nanochat.kv_cache: shapes, masking, windows, GQA, KV-cache decoding, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, attention, compute_dtype_for, layer_windows, logits_at
from nanochat.kv_cache import KVCache

VOCAB = 97  # not a multiple of 64: exercises the padded, cropped vocab


def make_model(depth=2, seq=32, seed=0, head_dim=32, scramble=True, **overrides):
    cfg = GPTConfig.from_depth(depth, VOCAB, seq, head_dim=head_dim, **overrides)
    torch.manual_seed(seed)
    model = GPT.create(cfg)
    if scramble:
        scramble_weights(model, seed)
    return model.eval()


@torch.no_grad()
def scramble_weights(model, seed):
    """The real init zeroes every c_proj (blocks start as identities), which would make attention
    invisible in the logits; random weights everywhere make the masking tests meaningful."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("lambdas"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif p.ndim == 2 and ("wte" in name or "value_embeds" in name):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(1)))


def tokens(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# config

def test_from_depth_derives_width_and_heads():
    cfg = GPTConfig.from_depth(20, 32768, 2048)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (20, 1280, 10, 10, 128)
    cfg = GPTConfig.from_depth(3, 1000, 64)  # 3*64 = 192 rounds up to 256
    assert (cfg.n_embd, cfg.n_head) == (256, 2)
    cfg = GPTConfig.from_depth(6, 8192, 512, head_dim=64, window_pattern="L")
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.window_pattern) == (384, 6, 64, "L")
    cfg = GPTConfig.from_depth(4, 100, 64, model_dim=512, n_kv_head=2)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (512, 4, 2)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_window_pattern_tiles_and_ends_long():
    cfg = GPTConfig.from_depth(6, 100, 64, window_pattern="SSSL")
    assert layer_windows(cfg) == [32, 32, 32, -1, 32, -1]
    assert layer_windows(GPTConfig.from_depth(3, 100, 64, window_pattern="S", short_window=5)) == [5, 5, -1]
    with pytest.raises(ValueError, match="window_pattern"):
        layer_windows(GPTConfig.from_depth(2, 100, 64, window_pattern="SX"))


# -----------------------------------------------------------------------------
# forward

def test_meta_init_materializes_every_tensor():
    cfg = GPTConfig.from_depth(2, VOCAB, 16, head_dim=32)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.get_device().type == "meta"
    model.to_empty(device="cpu")
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu" and torch.isfinite(t).all(), name
    assert model.compute_dtype == torch.float32
    assert model.transformer.wte.weight.shape == (128, 128)  # vocab 97 padded to a multiple of 64
    assert (model.transformer.h[0].mlp.c_proj.weight == 0).all()
    assert model.cos.shape[1] >= 10 * cfg.sequence_len


def test_shapes_and_loss():
    model = make_model(window_pattern="SL", short_window=5)
    idx, targets = tokens(3, 20), tokens(3, 20, seed=1)
    logits = model(idx)
    assert logits.shape == (3, 20, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap
    loss = model(idx, targets)
    assert loss.shape == () and torch.isclose(loss, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)))
    targets[0, :7] = -1  # ignored positions
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 20) and (per_token[0, :7] == 0).all() and (per_token[0, 7:] > 0).all()
    longhand = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction="none").view(3, 20)
    torch.testing.assert_close(per_token, longhand)  # the ignored positions skip the lm_head on CPU: same numbers
    assert torch.isclose(model(idx, targets), per_token.sum() / (targets != -1).sum())
    assert torch.isclose(model(idx, targets, loss_reduction="sum"), per_token.sum())


def test_a_loss_skipping_ignored_positions_has_the_longhand_gradients():
    model = make_model(window_pattern="SL", short_window=5)
    idx, targets = tokens(3, 20), tokens(3, 20, seed=1)
    targets[:, :12] = -1  # a prompt, as in SFT and RL
    targets[2] = -1  # a row with nothing to learn from
    grads = []
    for loss_of in (lambda: model(idx, targets),
                    lambda: F.cross_entropy(model(idx).view(-1, VOCAB), targets.view(-1), ignore_index=-1)):
        model.zero_grad()
        loss_of().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_cpu_loss_equals_one_piece(monkeypatch):
    import nanochat.gpt as gpt
    model = make_model()
    idx, targets = tokens(3, 20), tokens(3, 20, seed=1)
    targets[1, 3:9] = -1
    results = {}
    for chunk_elements in (10**9, VOCAB * 7):  # one piece; 60 rows as 7 chunks of 8 and one of 4
        monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", chunk_elements)
        model.zero_grad()
        mean = model(idx, targets)
        mean.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[chunk_elements] = (mean, model(idx, targets, loss_reduction="sum"), model(idx, targets, loss_reduction="none"), grads)
    (m1, s1, n1, g1), (m2, s2, n2, g2) = results.values()
    torch.testing.assert_close(m2, m1)
    torch.testing.assert_close(s2, s1)
    torch.testing.assert_close(n2, n1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", ["L", "SSSL"])
def test_future_tokens_cannot_change_past_logits(pattern):
    model = make_model(depth=4, window_pattern=pattern, short_window=4, n_kv_head=2)
    idx = tokens(2, 24)
    logits = model(idx)
    for t in (1, 9, 23):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(24 - t)) % VOCAB
        logits2 = model(changed)
        torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-5)
        assert (logits2[:, t] - logits[:, t]).abs().max() > 1e-3


def dense_reference_attention(q, k, v, window):
    """Plain softmax(QK^T/sqrt(d) + mask) V with repeated KV heads and explicit positions."""
    n_rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    Tq, Tk = q.size(2), k.size(2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    for r in range(Tq):
        i = Tk - Tq + r  # absolute position of this query
        for j in range(Tk):
            if j > i or (window >= 0 and i - j > window):
                scores[:, :, r, j] = float("-inf")
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("Tq,Tk,window", [
    (16, 16, -1), (16, 16, 4), (16, 16, 0), (16, 16, 15), (16, 16, 100),  # training / prefill
    (1, 20, -1), (1, 20, 5), (1, 20, 0), (1, 3, 5),                         # one decode step
    (5, 20, -1), (5, 20, 3), (5, 20, 7),                                    # chunk after a cached prefix
])
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_matches_dense_reference(Tq, Tk, window, n_kv):
    g = torch.Generator().manual_seed(Tq * 100 + Tk + window)
    q = torch.randn(2, 4, Tq, 8, generator=g)
    k, v = torch.randn(2, n_kv, Tk, 8, generator=g), torch.randn(2, n_kv, Tk, 8, generator=g)
    torch.testing.assert_close(attention(q, k, v, window), dense_reference_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_sliding_window_in_the_model():
    short = make_model(window_pattern="SL", short_window=3)
    wide = make_model(window_pattern="SL", short_window=100)
    full = make_model(window_pattern="L")
    idx = tokens(2, 16)
    torch.testing.assert_close(wide(idx), full(idx), rtol=0, atol=1e-6)  # a window wider than T is full attention
    torch.testing.assert_close(short(idx)[:, :4], full(idx)[:, :4], rtol=0, atol=1e-5)  # first 4 positions see everything anyway
    assert (short(idx)[:, 4:] - full(idx)[:, 4:]).abs().max() > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(depth=3, n_kv_head=3)  # 6 query heads share 3 kv heads
    mha = make_model(depth=3, n_kv_head=6, seed=5)
    n_rep, D = 2, gqa.config.head_dim
    state = {}
    for name, p in gqa.state_dict().items():
        if name.endswith(("attn.c_k.weight", "attn.c_v.weight")):  # (H_kv*D, C) -> (H*D, C)
            p = p.view(-1, D, p.size(1)).repeat_interleave(n_rep, 0).reshape(-1, p.size(1))
        elif name.endswith("ve_gate.weight"):  # (H_kv, 32) -> (H, 32)
            p = p.repeat_interleave(n_rep, 0)
        elif name.startswith("value_embeds"):  # (V, H_kv*D) -> (V, H*D)
            p = p.view(p.size(0), -1, D).repeat_interleave(n_rep, 1).reshape(p.size(0), -1)
        state[name] = p
    mha.load_state_dict(state)
    idx = tokens(2, 20)
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("pattern,n_kv", [("L", 4), ("SSSL", 2), ("SL", 1)])
def test_kv_cache_decode_matches_full_forward(pattern, n_kv):
    model = make_model(depth=4, window_pattern=pattern, short_window=3, n_kv_head=n_kv)
    idx = tokens(2, 26)
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2, max_len=6)  # grows 6 -> 12 -> 24 -> 48 along the way
    pieces, pos = [], 0
    for chunk in (5, 1, 1, 4, 1, 7, 1, 1, 5):
        pieces.append(model(idx[:, pos:pos + chunk], kv_cache=cache))
        pos += chunk
        assert cache.pos == pos
    assert cache.max_len == 48
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_cache_replicate_prefill_then_decode_rows():
    model = make_model(depth=3, window_pattern="SL", short_window=4, n_kv_head=2)
    prompt = tokens(1, 7)
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    prefill = model(prompt, kv_cache=cache)
    cache = cache.replicate(3)
    assert (cache.batch_size, cache.pos, cache.k.size(1)) == (3, 7, 3)
    continuations = tokens(3, 6, seed=3)
    decoded = [model(continuations[:, t:t + 1], kv_cache=cache) for t in range(6)]
    rows = torch.cat([prompt.expand(3, -1), continuations], 1)
    full = model(rows)
    torch.testing.assert_close(prefill[0], full[0, :7], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(decoded, 1), full[:, 7:], rtol=1e-4, atol=1e-4)


def test_logits_at_the_last_or_masked_positions_only():
    model = make_model(depth=3, window_pattern="SL", short_window=4, n_kv_head=2)
    prompt = tokens(2, 9)
    caches = [model.new_kv_cache(batch_size=2, max_len=16) for _ in range(2)]
    full, last = model(prompt, kv_cache=caches[0]), model(prompt, kv_cache=caches[1], logits_at="last")
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    assert caches[0].pos == caches[1].pos == 9
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=0)
    at = torch.zeros(2, 9, dtype=torch.bool)
    at[0, [2, 5]], at[1, 8] = True, True
    torch.testing.assert_close(model(prompt, logits_at=at), full[at], rtol=1e-5, atol=1e-5)  # (3, vocab), row-major
    with pytest.raises(ValueError, match="logits_at"):
        model(prompt, logits_at="first")


def test_logits_at_picks_the_same_positions_from_a_model_that_computes_them_all():
    model = make_model(depth=2, window_pattern="L")
    whole = lambda idx: model(idx)  # noqa: E731 - the interface of HF GPT-2 and the tests' doubles
    idx = tokens(2, 7)
    at = torch.rand(2, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    torch.testing.assert_close(logits_at(whole, idx, at), logits_at(model, idx, at), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_at(whole, idx, "last"), logits_at(model, idx, "last"), rtol=1e-5, atol=1e-5)


def test_kv_cache_reset_and_decode_past_the_rotary_cache():
    model = make_model(depth=2, seq=4, window_pattern="SL")  # rotary cache holds 40 positions
    idx = tokens(1, 50)
    full = model(idx)  # the full forward extends the rotary cache too
    cache = model.new_kv_cache(1)
    model(idx[:, :10], kv_cache=cache)
    cache.reset()
    pieces = [model(idx[:, :30], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(30, 50)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_cache_growth_keeps_layout():
    cache = KVCache(batch_size=2, num_kv_heads=3, head_dim=4, num_layers=2, max_len=3, dtype=torch.float32)
    k = torch.randn(2, 3, 5, 4)
    for layer in range(2):
        k_all, v_all = cache.insert_kv(layer, k[:, :, :2] + layer, -k[:, :, :2])
        assert k_all.shape == (2, 3, 2, 4)
    cache.advance(2)
    for layer in range(2):
        k_all, v_all = cache.insert_kv(layer, k[:, :, 2:] + layer, -k[:, :, 2:])
        torch.testing.assert_close(k_all, k + layer, rtol=0, atol=0)
        torch.testing.assert_close(v_all, -k, rtol=0, atol=0)
    cache.advance(3)
    assert (cache.pos, cache.max_len) == (5, 6)


# -----------------------------------------------------------------------------
# training, FLOPs, dtypes

def test_loss_decreases_on_a_repeated_batch():
    torch.manual_seed(0)
    model = GPT.create(GPTConfig.from_depth(2, VOCAB, 32, head_dim=32))
    opt = model.setup_optimizer()
    idx, targets = tokens(4, 32), tokens(4, 32, seed=1)
    losses = []
    for _ in range(25):
        loss = model(idx, targets)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.05)  # tiny lm_head init: uniform predictions
    assert losses[-1] < 0.2 * losses[0]


def test_relu_squared_matches_autograd():
    from nanochat.gpt import ReluSquared, relu_squared
    x = torch.cat([torch.tensor([-2.0, -0.0, 0.0, 0.5]), torch.randn(60, generator=torch.Generator().manual_seed(0))])
    x = x.double().requires_grad_()
    assert torch.autograd.gradcheck(ReluSquared.apply, (x,))
    grad = torch.randn_like(x)
    ours = torch.autograd.grad(relu_squared(x), x, grad)[0]
    torch.testing.assert_close(ours, torch.autograd.grad(F.relu(x).square(), x, grad)[0], rtol=0, atol=0)
    assert type(relu_squared(x).grad_fn).__name__ == "ReluSquaredBackward"  # CPU training takes it
    with torch.no_grad():
        torch.testing.assert_close(relu_squared(x), F.relu(x).square())  # inference: the plain ops


def test_torch_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = make_model(window_pattern="SL", short_window=5, n_kv_head=2)
    idx, targets = tokens(2, 32), tokens(2, 32, seed=1)
    loss = torch.compile(model, dynamic=False)(idx, targets)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(idx, targets)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for a, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-4)


def test_estimate_flops_and_param_counts():
    model = make_model(depth=4, seq=64, scramble=False, window_pattern="L", n_kv_head=2)
    c = model.config
    C, H, Hkv, D, L, T = c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.n_layer, c.sequence_len
    per_layer = C * H * D + 2 * C * Hkv * D + C * C + 8 * C * C
    ve_gates = sum(1 for i in range(L) if str(i) in model.value_embeds) * 32 * Hkv
    matmul_params = L * per_layer + ve_gates + 128 * C  # lm_head with padded vocab
    assert model.estimate_flops() == 6 * matmul_params + 12 * L * H * D * T
    windowed = make_model(depth=4, seq=64, scramble=False, window_pattern="SSSL", short_window=15, n_kv_head=2)
    assert model.estimate_flops() - windowed.estimate_flops() == 3 * 12 * H * D * (T - 16)
    counts = model.num_scaling_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["transformer_matrices"] == L * per_layer + ve_gates and counts["scalars"] == 2 * L


def test_bf16_compute_dtype_override(monkeypatch):
    fp32 = make_model()
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    bf16 = make_model()
    assert bf16.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # fp32 master weights
    idx, targets = tokens(2, 16), tokens(2, 16, seed=1)
    logits = bf16(idx)
    assert logits.dtype == torch.float32
    assert (logits - fp32(idx)).abs().max() < 0.25 and (logits - fp32(idx)).abs().max() > 0
    bf16(idx, targets).backward()
    assert all(p.grad.dtype == torch.float32 for p in bf16.parameters())
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        compute_dtype_for("cpu")


def test_fp8_refuses_to_run_on_cpu():
    cfg = GPTConfig.from_depth(2, VOCAB, 16, head_dim=32, fp8=True)
    with pytest.raises(RuntimeError, match="fp8"):
        GPT.create(cfg, "cpu")


def test_fp8_linear_numerics():
    # the fp8 matmul itself runs anywhere torch._scaled_mm does (the CPU build has it): check it
    # against a float matmul, forward and both gradients, to fp8 precision
    from nanochat.fp8 import fp8_linear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 64, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(48, 64, generator=g) / 8).requires_grad_()
    y = fp8_linear(x, w)
    (y.float() * torch.linspace(-1, 1, 48)).sum().backward()
    x2, w2 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = F.linear(x2, w2)
    (y2 * torch.linspace(-1, 1, 48)).sum().backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert y.shape == (2, 32, 48) and y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert rel(y, y2) < 0.1 and rel(x.grad, x2.grad) < 0.1 and rel(w.grad, w2.grad) < 0.1


def test_varying_shape_sdpa_is_shared_by_overlapping_callers():
    """Serve's replica threads generate at once. Their restricted-SDPA sections overlap and end out of order (A in,
    B in, A out, B out): the flags stay restricted until the last one leaves, then torch's defaults are back. Nested
    plain sdpa_kernel contexts would have restored the defaults under B and left the restriction on after both."""
    import threading
    from nanochat.gpt import varying_shape_sdpa
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default
    a, b = varying_shape_sdpa(), varying_shape_sdpa()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    b.__exit__(None, None, None)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    inside, release = threading.Barrier(3), threading.Event()

    def worker():
        with varying_shape_sdpa():
            inside.wait()
            release.wait()
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()  # both threads inside at once
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    release.set()
    for t in threads:
        t.join()
    assert torch.backends.cuda.cudnn_sdp_enabled()
