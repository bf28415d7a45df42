"""
The fused decode step: DecodeWeights.step's arithmetic in ~8 kernels per layer instead of ~21, for the CUDA graph.

A batch-1 d20 step on the H100 is bound by how many kernels it launches (~2 us each even inside a CUDA graph;
bench/RESULTS.md run 2), not by the bytes it reads. Per layer this step runs:

    addcmul     x = resid * x + x0_lambda * x0                      (torch)
    linear      qkv = x @ Wqkv                                     (cuBLAS, on the un-normed x)
    attend      norm scale, value embedding + gate, rotary, QK-norm, K/V written at the position, attention over
                one split of the cache (flash-decoding: online softmax per split)            (Triton)
    combine     the splits' partial softmaxes -> y                                           (Triton)
    addmm       x = x + y @ Wproj                                  (cuBLAS: the residual add rides in the GEMV)
    linear      h = x @ Wfc                                        (cuBLAS, on the un-normed x)
    relu2       h = relu(h * rms(x)^-1)^2                                                    (Triton)
    addmm       x = x + h @ Wmlp_proj                              (cuBLAS)

The pre-attention and pre-MLP norms are parameter-free, so norm(x) @ W == (x @ W) * rsqrt(mean(x^2) + eps): the
scale is applied after the matmul, inside the next kernel, and no norm kernel runs. Sliding-window layers read only
the splits their window reaches. Same results as DecodeWeights.step up to bf16 rounding (tests/test_fused_decode.py
runs the kernels in Triton's interpreter on the CPU; bench/gpu.py checks them on a GPU).

Needs Triton and a CUDA device, or TRITON_INTERPRET=1 (set before this module is imported) for CPU tensors.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # an install without triton: unavailable_reason() says why
    triton = tl = None

# cache slots per attention program: a d20 batch-1 step at 2,304 slots runs 10 heads x 9 splits (untuned: bench/gpu.py
# measures 64 and 128 too)
SPLIT_SLOTS = int(os.environ.get("NANOCHAT_FUSED_SPLIT", "256"))
RELU2_BLOCK = 1024


def interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device, head_dim):
    """Why the fused step cannot run here (None when it can)."""
    if triton is None:
        return "the fused decode step needs the triton package"
    if device.type != "cuda" and not interpreted():
        return f"the fused decode step runs on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {device.type}"
    if head_dim & (head_dim - 1):
        return f"the fused decode step needs a power-of-two head_dim, not {head_dim}"
    return None


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:
    @triton.jit
    def _rsqrt_mean_square(row_ptr, C: tl.constexpr, C_P2: tl.constexpr, eps):
        """1 / sqrt(mean(x^2) + eps) of one row of C values: what a parameter-free RMSNorm multiplies by."""
        offs = tl.arange(0, C_P2)
        x = tl.load(row_ptr + offs, mask=offs < C, other=0.0).to(tl.float32)
        return 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)

    @triton.jit
    def _attend_split_kernel(qkv_ptr, x_ptr, ids_ptr, ve_ptr, gate_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr,
                             acc_ptr, m_ptr, l_ptr, max_len, window, eps, scale,
                             C: tl.constexpr, C_P2: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
                             G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, GATE: tl.constexpr, GATE_P2: tl.constexpr,
                             HAS_VE: tl.constexpr, NSPLIT: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """One (row, kv head, split): the new token's q (its G query heads), k, v from the un-normed qkv, then the
        online softmax over the split's visible slots; partial (acc, max, sum) per query head and split."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, hk = bh // HKV, bh % HKV
        pos = tl.load(pos_ptr + b)  # rows may stand at different positions (nanochat.batching)
        r = _rsqrt_mean_square(x_ptr + b * C, C, C_P2, eps)  # the attention input's norm, applied after the matmul
        od = tl.arange(0, D)
        swapped = (od + D // 2) % D  # rotary with doubled tables: x * [cos, cos] + halves_swapped(x) * [sin, -sin]
        cos = tl.load(cos_ptr + pos * D + od).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + od).to(tl.float32)
        row = qkv_ptr + b * (H + 2 * HKV) * D

        k_new = tl.load(row + (H + hk) * D + od).to(tl.float32) * cos + tl.load(row + (H + hk) * D + swapped).to(tl.float32) * sin
        k_new = k_new * r
        k_new = k_new / tl.sqrt(tl.sum(k_new * k_new, 0) / D + eps)
        k_new = k_new.to(k_ptr.dtype.element_ty).to(tl.float32)  # as the cache holds it, for every later step too
        v_new = tl.load(row + (H + HKV + hk) * D + od).to(tl.float32) * r
        if HAS_VE:  # value residual: v += 2 * sigmoid(norm(x)[:GATE] @ gate[hk]) * ve[token]
            og = tl.arange(0, GATE_P2)
            xg = tl.load(x_ptr + b * C + og, mask=og < GATE, other=0.0).to(tl.float32) * r
            wg = tl.load(gate_ptr + hk * GATE + og, mask=og < GATE, other=0.0).to(tl.float32)
            gate = 2.0 / (1.0 + tl.exp(-tl.sum(xg * wg, 0)))
            token = tl.load(ids_ptr + b)
            v_new += gate * tl.load(ve_ptr + token * (HKV * D) + hk * D + od).to(tl.float32)
        v_new = v_new.to(v_ptr.dtype.element_ty).to(tl.float32)

        oq = tl.arange(0, G_P2)
        q_rows = (hk * G + oq)[:, None] * D
        q_mask = (oq < G)[:, None]
        q = tl.load(row + q_rows + od[None, :], mask=q_mask, other=0.0).to(tl.float32) * cos[None, :] \
            + tl.load(row + q_rows + swapped[None, :], mask=q_mask, other=0.0).to(tl.float32) * sin[None, :]
        q = q * r
        q = q / tl.sqrt(tl.sum(q * q, 1) / D + eps)[:, None] * scale

        start = split * SPLIT
        lo = tl.maximum(start, pos - window)  # the visible slots: [pos - window, pos] (window = max_len: unlimited)
        hi = tl.minimum(start + SPLIT, pos + 1)
        cache = (b * HKV + hk).to(tl.int64) * max_len * D
        m = tl.full([G_P2], float("-inf"), tl.float32)
        l = tl.zeros([G_P2], tl.float32)
        acc = tl.zeros([G_P2, D], tl.float32)
        for n0 in range(0, SPLIT, BLOCK):  # static bounds: an invisible block's masked loads read no memory
            slots = start + n0 + tl.arange(0, BLOCK)
            valid = (slots >= lo) & (slots < hi)
            offs = cache + slots[:, None] * D + od[None, :]
            is_new = (slots == pos)[:, None]  # the new token's slot is written below: use the registers, not memory
            k = tl.where(is_new, k_new[None, :], tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32))
            v = tl.where(is_new, v_new[None, :], tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32))
            s = tl.where(valid[None, :], tl.sum(q[:, None, :] * k[None, :, :], 2), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep exp() away from -inf - -inf
            alpha = tl.exp(m - shift)
            p = tl.exp(s - shift[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
            m = m_new

        heads = b * H + hk * G + oq
        tl.store(acc_ptr + (heads[:, None] * NSPLIT + split) * D + od[None, :], acc, mask=q_mask)
        tl.store(m_ptr + heads * NSPLIT + split, m, mask=oq < G)
        tl.store(l_ptr + heads * NSPLIT + split, l, mask=oq < G)
        at = pos + od * 0  # the one program whose split holds the position writes K/V
        mine = (at >= start) & (at < start + SPLIT)
        tl.store(k_ptr + cache + at * D + od, k_new.to(k_ptr.dtype.element_ty), mask=mine)
        tl.store(v_ptr + cache + at * D + od, v_new.to(v_ptr.dtype.element_ty), mask=mine)

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, y_ptr, D: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr):
        """One (row, query head): the softmax over all splits from their partial maxima, sums and outputs."""
        head = tl.program_id(0)
        osp, od = tl.arange(0, NSPLIT_P2), tl.arange(0, D)
        m = tl.load(m_ptr + head * NSPLIT + osp, mask=osp < NSPLIT, other=float("-inf"))
        l = tl.load(l_ptr + head * NSPLIT + osp, mask=osp < NSPLIT, other=0.0)
        w = tl.exp(m - tl.max(m, 0))  # an empty split has max -inf: weight 0
        acc = tl.load(acc_ptr + (head * NSPLIT + osp[:, None]) * D + od[None, :], mask=(osp < NSPLIT)[:, None], other=0.0)
        y = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
        tl.store(y_ptr + head * D + od, y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def _relu2_kernel(h_ptr, x_ptr, N, eps, C: tl.constexpr, C_P2: tl.constexpr, BLOCK: tl.constexpr):
        """h = relu(h * rsqrt(mean(x^2) + eps))^2 in place: the MLP's input norm applied after its first matmul."""
        b, blk = tl.program_id(0), tl.program_id(1)
        r = _rsqrt_mean_square(x_ptr + b * C, C, C_P2, eps)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        h = tl.load(h_ptr + b * N + offs, mask=offs < N, other=0.0).to(tl.float32) * r
        h = tl.maximum(h, 0.0)
        tl.store(h_ptr + b * N + offs, (h * h).to(h_ptr.dtype.element_ty), mask=offs < N)


def attend(x, qkv, ids, k_cache, v_cache, pos, cos, sin, window, config, ve=None, gate=None):
    """y (B, H * D): the attention of one new token per row, from the un-normed attention input x (B, C) and
    qkv = x @ Wqkv (B, (H + 2 Hkv) D); writes the token's K/V into the (B, Hkv, max_len, D) caches at each row's
    position pos[b]."""
    B, C = x.shape
    H, HKV, D = config.n_head, config.n_kv_head, config.head_dim
    max_len = k_cache.size(2)
    nsplit = triton.cdiv(max_len, SPLIT_SLOTS)
    g_p2 = _pow2(H // HKV)
    acc = torch.empty(B * H, nsplit, D, device=x.device, dtype=torch.float32)
    m = torch.empty(B * H, nsplit, device=x.device, dtype=torch.float32)
    l = torch.empty_like(m)
    gate_channels = gate.size(1) if gate is not None else 1
    _attend_split_kernel[(B * HKV, nsplit)](
        qkv, x, ids, ve if ve is not None else qkv, gate if gate is not None else qkv, cos, sin, pos, k_cache, v_cache,
        acc, m, l, max_len, window if window >= 0 else max_len, torch.finfo(x.dtype).eps, D ** -0.5,
        C=C, C_P2=_pow2(C), H=H, HKV=HKV, G=H // HKV, G_P2=g_p2, D=D, GATE=gate_channels, GATE_P2=_pow2(gate_channels),
        HAS_VE=ve is not None, NSPLIT=nsplit, SPLIT=SPLIT_SLOTS, BLOCK=min(SPLIT_SLOTS, max(16, 64 // g_p2)))
    y = torch.empty(B, H * D, device=x.device, dtype=x.dtype)
    _combine_kernel[(B * H,)](acc, m, l, y, D=D, NSPLIT=nsplit, NSPLIT_P2=_pow2(nsplit))
    return y


def relu2_normed(h, x):
    """relu(norm(x) @ W)^2 from h = x @ W (B, N), in place."""
    B, N = h.shape
    _relu2_kernel[(B, triton.cdiv(N, RELU2_BLOCK))](h, x, N, torch.finfo(x.dtype).eps, C=x.size(1), C_P2=_pow2(x.size(1)),
                                                   BLOCK=RELU2_BLOCK)
    return h


def fused_step(weights, idx, cache, cos, sin):
    """DecodeWeights.step (same arguments, same fp32 logits (B, vocab), same cache writes) in fused kernels."""
    c = weights.config
    ids = idx[:, 0].contiguous()  # the attention kernel reads row b's token at ids + b
    x, x0_mix = weights.embed(idx)
    for i, layer in enumerate(weights.layers):
        x = torch.addcmul(x0_mix[i], weights.resid[i], x)
        y = attend(x, layer.qkv(x), ids, cache.k[i], cache.v[i], cache.pos, cos, sin, weights.windows[i], c,
                   ve=layer.ve, gate=layer.ve_gate)
        x = layer.proj(y, add=x)
        x = layer.mlp_proj(relu2_normed(layer.fc(x), x), add=x)
    cache.advance()
    return weights.logits(x)

