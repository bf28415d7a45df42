"""
The fused decode step: DecodeWeights.step's arithmetic in 6 to 8 kernels per layer instead of ~21, for the CUDA graph.

A batch-1 d20 step on the H100 is bound by how many kernels it launches (~2 us each even inside a CUDA graph;
bench/RESULTS.md run 2), not by the bytes it reads. The step starts with one kernel for the embedding (its norm and
every layer's x0 mix: embed); then per layer it runs:

    addcmul     x = resid * x + x0_lambda * x0                      (torch)
    linear      qkv = x @ Wqkv                                     (cuBLAS, on the un-normed x)
    prepare     norm scale, value embedding + gate, rotary, QK-norm; K/V written at the position   (Triton)
    attend      attention over one split of the cache (flash-decoding: online softmax per split); the last
                program of each (row, kv head) to finish combines the splits' partial softmaxes -> y  (Triton)
    addmm       x = x + y @ Wproj                                  (cuBLAS: the residual add rides in the GEMV)
    linear      h = x @ Wfc                                        (cuBLAS, on the un-normed x)
    relu2       h = relu(h * rms(x)^-1)^2                                                    (Triton)
    addmm       x = x + h @ Wmlp_proj                              (cuBLAS)

The pre-attention and pre-MLP norms are parameter-free, so norm(x) @ W == (x @ W) * rsqrt(mean(x^2) + eps): the
scale is applied after the matmul, inside the next kernel, and no norm kernel runs. The attention programs loop over
the visible slots of their split only (sliding-window layers skip the rest), and the split grows with the batch
(split_slots). prepare is its own kernel so that the attention programs, thousands at batch 32, do not each redo it
(run 3: one kernel doing both held 255 registers per thread and was latency-bound). No combine kernel follows the
attention: each program counts itself in on an arrival counter per (row, kv head) once its partials are stored, and
the last one combines them (NANOCHAT_FUSED_COMBINE=kernel: a combine kernel after the attention instead).

A lone row (batch 1: auto's use of this step) runs its products in _gemv_kernel instead of cuBLAS (run 3: ~1.45 TB/s,
~0.6 of the step's 1.15 ms), each weight streamed in 128-bit loads with the elementwise work in the epilogue: the
residual add, the MLP norm and ReLU^2 (no relu2 kernel), the next layer's x0 mix (no addcmul), and the lm_head's final
norm and softcap, so 6 kernels per layer: gemv qkv, prepare, attend, gemv proj, gemv fc, gemv mlp proj
(NANOCHAT_FUSED_GEMV=cublas: the cuBLAS path above at one row too); layer 0's x0 mix rides in the embed kernel.

On Hopper every Triton kernel here is launched with programmatic dependent launch (PDL): it may start while the kernel
before it is still running, lets the next one start too, and waits for its predecessor (griddepcontrol.wait) before it
reads anything that predecessor chain wrote or writes anything itself. Before that wait each kernel loads what no
kernel of the step writes: a GEMV its weights, prepare the rotary angles and value embedding, attend the first block of
the older K/V. So a step of ~123 small kernels streams each kernel's inputs during the previous kernel's tail instead
of after its end (NANOCHAT_FUSED_PDL=0: one after another).

Same results as DecodeWeights.step up to bf16 rounding (tests/test_fused_decode.py runs the kernels in Triton's
interpreter on the CPU; bench/gpu.py checks them on a GPU).

Needs Triton and a CUDA device, or TRITON_INTERPRET=1 (set before this module is imported) for CPU tensors.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # an install without triton: unavailable_reason() says why
    triton = tl = None

# cache slots per attention program: the fewest (MIN_SPLIT_SLOTS) that keep the (row, kv head, split) programs within
# PROGRAMS_PER_SM per SM, so a batch-1 step gets many short programs and a batch-32 one a program per (row, head)
# (bench/RESULTS.md run 3: batch 1 618 tok/s at 256 slots, 788 at 64; batch 32 8.9 ms per step at 256).
# NANOCHAT_FUSED_SPLIT fixes it instead (bench/gpu.py's split rows).
SPLIT_SLOTS = int(os.environ["NANOCHAT_FUSED_SPLIT"]) if os.environ.get("NANOCHAT_FUSED_SPLIT") else None
MIN_SPLIT_SLOTS = 64
PROGRAMS_PER_SM = 4
# cache slots per loop iteration of an attention program (divided by the query heads per K/V head) and its warps:
# <= 128 registers on sm_90, 4 programs per SM; NANOCHAT_FUSED_ATTEND="BLOCK,WARPS" instead (bench/gpu.py's tiling row)
ATTEND_BLOCK, ATTEND_WARPS = (int(v) for v in (os.environ.get("NANOCHAT_FUSED_ATTEND") or "32,4").split(","))
# the prepare kernel's warps: one keeps its norms' reductions in a warp (no CTA barriers); on the H200 (run 4) that
# took 11 µs off a d20 step's attention and gave 1,623 tok/s at batch 1 against 1,608 on 4 warps (bench/RESULTS.md)
PREPARE_WARPS = int(os.environ.get("NANOCHAT_FUSED_PREPARE_WARPS") or 1)
# the attention kernel for one query head per K/V head: "split" (_attend_split_kernel) or "lanes" (_attend_lanes_kernel:
# its softmax per row of lanes, reducing within warps; unmeasured on a GPU: bench/gpu.py's tiling row times both)
ATTEND_KERNEL = os.environ.get("NANOCHAT_FUSED_ATTEND_KERNEL", "split")
LANE_PAIR = 2  # slots per row of lanes per iteration: the (ROWS, 2, D) tile keeps Triton's warps along the rows
RELU2_BLOCK = 1024
# a lone row's matrix-vector products: "triton" (_gemv_kernel, the epilogues fused) or "cublas" (torch's addmm, the
# path of 2+ rows); run 3 measured cuBLAS at ~1.45 TB/s on the d20 batch-1 GEMVs, ~0.6 of the step's 1.15 ms
GEMV = os.environ.get("NANOCHAT_FUSED_GEMV", "triton")
# programmatic dependent launch (Hopper+): each kernel here starts while the one before it finishes, loading what does
# not depend on it (a GEMV's weights) before waiting for it; NANOCHAT_FUSED_PDL=0 launches them one after another
PDL = os.environ.get("NANOCHAT_FUSED_PDL", "1") != "0"
# who combines a (row, head)'s attention splits: "last", the last of its attention programs to finish (no combine
# kernel: 20 kernels less per d20 step), or "kernel", a combine kernel after the attention (NANOCHAT_FUSED_COMBINE)
COMBINE = os.environ.get("NANOCHAT_FUSED_COMBINE", "last")
# the parameter-free RMSNorm's epsilon: F.rms_norm's default for fp32 and bf16 alike (its fp32 compute type's), not
# bf16's 2^-7, which shifts a norm by ~0.4% at a mean square of 1 and more below
NORM_EPS = torch.finfo(torch.float32).eps


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
    def _after_previous_kernel(PDL: tl.constexpr):
        """Under programmatic dependent launch (launch_pdl: this kernel may start while the previous one runs): let the
        next kernel start too (it waits the same way), then wait until the previous kernel has finished and its writes
        are visible. Every kernel launched so calls it before reading what an earlier kernel wrote or writing anything,
        so each kernel's completion implies its predecessors'. A no-op without PDL."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _prepare_kernel(qkv_ptr, x_ptr, ids_ptr, ve_ptr, gate_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, q_ptr,
                        max_len, eps, scale,
                        C: tl.constexpr, C_P2: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                        G_P2: tl.constexpr, D: tl.constexpr, GATE: tl.constexpr, GATE_P2: tl.constexpr, HAS_VE: tl.constexpr,
                        PDL: tl.constexpr):
        """One (row, kv head): the new token's k and v from the un-normed qkv, written into the cache at the row's
        position, and its G query heads (norm scale, rotary, QK-norm, softmax scale) as fp32 for the attention.
        Before waiting for the previous kernel it loads what no kernel of this step writes: the position (it moves at
        the step's end, cache.advance), the rotary angles, the token and its value embedding, the gate's weights."""
        bh = tl.program_id(0)
        b, hk = bh // HKV, bh % HKV
        pos = tl.load(pos_ptr + b)  # rows may stand at different positions (nanochat.batching)
        od = tl.arange(0, D)
        swapped = (od + D // 2) % D  # rotary with doubled tables: x * [cos, cos] + halves_swapped(x) * [sin, -sin]
        cos = tl.load(cos_ptr + pos * D + od).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + od).to(tl.float32)
        if HAS_VE:
            og = tl.arange(0, GATE_P2)
            wg = tl.load(gate_ptr + hk * GATE + og, mask=og < GATE, other=0.0).to(tl.float32)
            ve = tl.load(ve_ptr + tl.load(ids_ptr + b) * (HKV * D) + hk * D + od).to(tl.float32)
        _after_previous_kernel(PDL)
        r = _rsqrt_mean_square(x_ptr + b * C, C, C_P2, eps)  # the attention input's norm, applied after the matmul
        row = qkv_ptr + b * (H + 2 * HKV) * D

        k = tl.load(row + (H + hk) * D + od).to(tl.float32) * cos + tl.load(row + (H + hk) * D + swapped).to(tl.float32) * sin
        k = k * r
        k = k / tl.sqrt(tl.sum(k * k, 0) / D + eps)
        v = tl.load(row + (H + HKV + hk) * D + od).to(tl.float32) * r
        if HAS_VE:  # value residual: v += 2 * sigmoid(norm(x)[:GATE] @ gate[hk]) * ve[token]
            xg = tl.load(x_ptr + b * C + og, mask=og < GATE, other=0.0).to(tl.float32) * r
            gate = 2.0 / (1.0 + tl.exp(-tl.sum(xg * wg, 0)))
            v += gate * ve
        cache = (b * HKV + hk).to(tl.int64) * max_len * D + pos * D
        tl.store(k_ptr + cache + od, k.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + cache + od, v.to(v_ptr.dtype.element_ty))

        oq = tl.arange(0, G_P2)
        q_rows = (hk * G + oq)[:, None] * D
        q_mask = (oq < G)[:, None]
        q = tl.load(row + q_rows + od[None, :], mask=q_mask, other=0.0).to(tl.float32) * cos[None, :] \
            + tl.load(row + q_rows + swapped[None, :], mask=q_mask, other=0.0).to(tl.float32) * sin[None, :]
        q = q * r
        q = q / tl.sqrt(tl.sum(q * q, 1) / D + eps)[:, None] * scale
        tl.store(q_ptr + (b * H + hk * G + oq[:, None]) * D + od[None, :], q, mask=q_mask)

    @triton.jit
    def _attend_split_kernel(q_ptr, pos_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr, arrivals_ptr, y_ptr, max_len, window,
                             split_len, nsplit, H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
                             D: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, NSPLIT_P2: tl.constexpr,
                             COMBINE: tl.constexpr, PDL: tl.constexpr):
        """One (row, kv head, split): flash-decoding of its G query heads over the split's visible cache slots (the new
        token's included: _prepare_kernel wrote it); partial (acc, max, sum) per query head and split. The loop starts
        at the first visible slot and runs ITERS blocks, enough for the most slots a split can see (an iteration
        past the visible ones loads nothing). The first block's older slots are loaded before waiting for the previous
        kernel (earlier steps wrote them; the position moves only at the step's end), the new token's slot after.
        COMBINE: the last of the (row, kv head)'s programs to finish (an arrival counter, left at 0 for the next layer)
        combines the splits into y, so no combine kernel runs: every program's partials are published before it
        arrives (a barrier, then a release atomic) and read by the last one after (acquire, loads past L1)."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, hk = bh // HKV, bh % HKV
        pos = tl.load(pos_ptr + b)
        start = split * split_len
        lo = tl.maximum(start, pos - window)  # the visible slots: [pos - window, pos] (window = max_len: unlimited)
        hi = tl.minimum(start + split_len, pos + 1)
        cache = (b * HKV + hk).to(tl.int64) * max_len * D
        od = tl.arange(0, D)
        slots = lo + tl.arange(0, BLOCK)
        offs = cache + slots[:, None] * D + od[None, :]
        older = (slots < tl.minimum(hi, pos))[:, None]
        k = tl.load(k_ptr + offs, mask=older, other=0.0)
        v = tl.load(v_ptr + offs, mask=older, other=0.0)
        _after_previous_kernel(PDL)
        new = (slots == pos)[:, None]  # at most one slot, and visible wherever it lies in this block
        k = tl.where(new, tl.load(k_ptr + cache + pos * D + od)[None, :], k).to(tl.float32)
        v = tl.where(new, tl.load(v_ptr + cache + pos * D + od)[None, :], v).to(tl.float32)
        head = b * H + hk * G  # the group's first query head
        if G == 1:  # one query head per K/V head (nanochat's default): 2-D tiles, scalar softmax state
            q = tl.load(q_ptr + head * D + od)
            m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
            l = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
            acc = tl.zeros([D], tl.float32)
            m, l, acc = _softmax_block(q, k, v, slots < hi, m, l, acc)
            for i in range(1, ITERS):  # a constant: Triton's interpreter loops to nothing else
                slots = lo + i * BLOCK + tl.arange(0, BLOCK)
                valid = slots < hi
                offs = cache + slots[:, None] * D + od[None, :]
                k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                m, l, acc = _softmax_block(q, k, v, valid, m, l, acc)
            tl.store(acc_ptr + (head * nsplit + split) * D + od, acc)
            tl.store(m_ptr + head * nsplit + split, m)
            tl.store(l_ptr + head * nsplit + split, l)
        else:  # a group of query heads shares each K/V tile
            oq = tl.arange(0, G_P2)
            heads = head + oq
            q_mask = (oq < G)[:, None]
            q = tl.load(q_ptr + heads[:, None] * D + od[None, :], mask=q_mask, other=0.0)
            m = tl.full([G_P2], float("-inf"), tl.float32)
            l = tl.zeros([G_P2], tl.float32)
            acc = tl.zeros([G_P2, D], tl.float32)
            m, l, acc = _softmax_group_block(q, k, v, slots < hi, m, l, acc)
            for i in range(1, ITERS):
                slots = lo + i * BLOCK + tl.arange(0, BLOCK)
                valid = slots < hi
                offs = cache + slots[:, None] * D + od[None, :]
                k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                m, l, acc = _softmax_group_block(q, k, v, valid, m, l, acc)
            tl.store(acc_ptr + (heads[:, None] * nsplit + split) * D + od[None, :], acc, mask=q_mask)
            tl.store(m_ptr + heads * nsplit + split, m, mask=oq < G)
            tl.store(l_ptr + heads * nsplit + split, l, mask=oq < G)
        if COMBINE:
            _combine_if_last(acc_ptr, m_ptr, l_ptr, y_ptr, arrivals_ptr, bh, head, nsplit, G, D, NSPLIT_P2)

    @triton.jit
    def _combine_if_last(acc_ptr, m_ptr, l_ptr, y_ptr, arrivals_ptr, bh, head, nsplit, G: tl.constexpr, D: tl.constexpr,
                         NSPLIT_P2: tl.constexpr):
        """An attention program's arrival after storing its partials: the last of the (row, kv head)'s nsplit
        programs combines the G query heads from `head` on, and sets the counter back to 0 for the next layer."""
        tl.debug_barrier()  # every thread's partials stored before the arrival below publishes them
        if tl.atomic_add(arrivals_ptr + bh, 1, sem="acq_rel", scope="gpu") == nsplit - 1:
            for g in tl.static_range(G):
                _combine_head(acc_ptr, m_ptr, l_ptr, y_ptr, head + g, nsplit, D, NSPLIT_P2)
            tl.atomic_xchg(arrivals_ptr + bh, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _attend_lanes_kernel(q_ptr, pos_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr, arrivals_ptr, y_ptr, max_len, window,
                             split_len, nsplit, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                             PAIR: tl.constexpr, ITERS: tl.constexpr, NSPLIT_P2: tl.constexpr, COMBINE: tl.constexpr,
                             PDL: tl.constexpr):
        """_attend_split_kernel for one query head per K/V head (G = 1), its online softmax kept per row of lanes:
        each loop iteration takes ROWS * PAIR slots as a (ROWS, PAIR, D) tile whose ROWS rows are independent softmax
        states (PAIR slots each), so the slots reduce within a thread and the dot products within a warp (Triton lays
        the warps along the rows); the rows merge once, at the end. sm_90 PTX: 16 CTA barriers a program without the
        combine, against the split kernel's 25. Same partials, same combine, same PDL order."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, hk = bh // HKV, bh % HKV
        pos = tl.load(pos_ptr + b)
        start = split * split_len
        lo = tl.maximum(start, pos - window)
        hi = tl.minimum(start + split_len, pos + 1)
        cache = (b * HKV + hk).to(tl.int64) * max_len * D
        od = tl.arange(0, D)
        lanes = (tl.arange(0, ROWS) * PAIR)[:, None] + tl.arange(0, PAIR)[None, :]  # (ROWS, PAIR): slot offsets
        slots = lo + lanes
        offs = cache + slots[:, :, None] * D + od[None, None, :]
        older = (slots < tl.minimum(hi, pos))[:, :, None]
        k = tl.load(k_ptr + offs, mask=older, other=0.0)
        v = tl.load(v_ptr + offs, mask=older, other=0.0)
        _after_previous_kernel(PDL)
        new = (slots == pos)[:, :, None]
        k = tl.where(new, tl.load(k_ptr + cache + pos * D + od)[None, None, :], k).to(tl.float32)
        v = tl.where(new, tl.load(v_ptr + cache + pos * D + od)[None, None, :], v).to(tl.float32)
        head = b * H + hk
        q = tl.load(q_ptr + head * D + od)[None, None, :]
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        m, l, acc = _softmax_rows_block(q, k, v, slots < hi, m, l, acc)
        for i in range(1, ITERS):
            slots = lo + i * (ROWS * PAIR) + lanes
            valid = slots < hi
            offs = cache + slots[:, :, None] * D + od[None, None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, :, None], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=valid[:, :, None], other=0.0).to(tl.float32)
            m, l, acc = _softmax_rows_block(q, k, v, valid, m, l, acc)
        m_all = tl.max(m, 0)  # the rows merged: the max, then the sums, across warps
        w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # a row that saw nothing: weight 0
        tl.store(acc_ptr + (head * nsplit + split) * D + od, tl.sum(w[:, None] * acc, 0))
        tl.store(m_ptr + head * nsplit + split, m_all)
        tl.store(l_ptr + head * nsplit + split, tl.sum(w * l, 0))
        if COMBINE:
            _combine_if_last(acc_ptr, m_ptr, l_ptr, y_ptr, arrivals_ptr, bh, head, nsplit, 1, D, NSPLIT_P2)

    @triton.jit
    def _softmax_rows_block(q, k, v, valid, m, l, acc):
        """One block of _attend_lanes_kernel's online softmax: q (1, 1, D), k, v (ROWS, PAIR, D), valid (ROWS, PAIR);
        per row the new (max, sum) (ROWS,) and acc (ROWS, D)."""
        s = tl.where(valid, tl.sum(q * k, 2), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(s - shift[:, None])
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 1)

    @triton.jit
    def _softmax_block(q, k, v, valid, m, l, acc):
        """One block of the online softmax for one query head q (D,) over k, v (BLOCK, D): the new (max, sum, acc)."""
        s = tl.where(valid, tl.sum(q[None, :] * k, 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no exp(-inf - -inf)
        alpha = tl.exp(m - shift)
        p = tl.exp(s - shift)
        return m_new, l * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * v, 0)

    @triton.jit
    def _softmax_group_block(q, k, v, valid, m, l, acc):
        """_softmax_block for G_P2 query heads q (G_P2, D) sharing the block: (max, sum) (G_P2,), acc (G_P2, D)."""
        s = tl.where(valid[None, :], tl.sum(q[:, None, :] * k[None, :, :], 2), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(s - shift[:, None])
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)

    @triton.jit
    def _combine_head(acc_ptr, m_ptr, l_ptr, y_ptr, head, nsplit, D: tl.constexpr, NSPLIT_P2: tl.constexpr):
        """y of one (row, query head): the softmax over all splits from their partial maxima, sums and outputs (loaded
        from L2: other programs of the same kernel may have written them)."""
        osp, od = tl.arange(0, NSPLIT_P2), tl.arange(0, D)
        m = tl.load(m_ptr + head * nsplit + osp, mask=osp < nsplit, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + head * nsplit + osp, mask=osp < nsplit, other=0.0, cache_modifier=".cg")
        w = tl.exp(m - tl.max(m, 0))  # an empty split has max -inf: weight 0
        acc = tl.load(acc_ptr + (head * nsplit + osp[:, None]) * D + od[None, :], mask=(osp < nsplit)[:, None], other=0.0,
                      cache_modifier=".cg")
        y = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
        tl.store(y_ptr + head * D + od, y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, y_ptr, D: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr,
                        PDL: tl.constexpr):
        """One (row, query head): the splits combined into y (COMBINE="kernel")."""
        _after_previous_kernel(PDL)
        _combine_head(acc_ptr, m_ptr, l_ptr, y_ptr, tl.program_id(0), NSPLIT, D, NSPLIT_P2)

    @triton.jit
    def _relu2_kernel(h_ptr, x_ptr, N, eps, C: tl.constexpr, C_P2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """h = relu(h * rsqrt(mean(x^2) + eps))^2 in place: the MLP's input norm applied after its first matmul."""
        _after_previous_kernel(PDL)
        b, blk = tl.program_id(0), tl.program_id(1)
        r = _rsqrt_mean_square(x_ptr + b * C, C, C_P2, eps)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        h = tl.load(h_ptr + b * N + offs, mask=offs < N, other=0.0).to(tl.float32) * r
        h = tl.maximum(h, 0.0)
        tl.store(h_ptr + b * N + offs, (h * h).to(h_ptr.dtype.element_ty), mask=offs < N)

    @triton.jit
    def _embed_kernel(ids_ptr, wte_ptr, x0_ptr, resid_ptr, x_ptr, mix_ptr, B, stride_ids, stride_wte, eps,
                      C: tl.constexpr, C_P2: tl.constexpr, L: tl.constexpr, MIX_FIRST: tl.constexpr, PDL: tl.constexpr):
        """One row b: x = norm(wte[token]) and every layer's x0 mix x0_lambda[i] * x into mix (L, B, C), each rounded
        to x's dtype as DecodeWeights.embed's kernels round them; MIX_FIRST: x is layer 0's input instead,
        resid_lambda[0] * x + mix[0] (the lone row's step has no addcmul). The token's row and the lambdas are loaded
        before waiting for the previous kernel: no kernel of the step writes them."""
        b = tl.program_id(0)
        offs = tl.arange(0, C_P2)
        inside = offs < C
        e = tl.load(wte_ptr + tl.load(ids_ptr + b * stride_ids) * stride_wte + offs, mask=inside, other=0.0).to(tl.float32)
        first = tl.load(x0_ptr).to(tl.float32)
        resid = tl.load(resid_ptr).to(tl.float32)
        _after_previous_kernel(PDL)
        x = (e * (1.0 / tl.sqrt(tl.sum(e * e, 0) / C + eps))).to(x_ptr.dtype.element_ty).to(tl.float32)
        for i in range(L):
            mix = (tl.load(x0_ptr + i).to(tl.float32) * x).to(mix_ptr.dtype.element_ty)
            tl.store(mix_ptr + (i * B + b) * C + offs, mix, mask=inside)
        if MIX_FIRST:
            x = resid * x + (first * x).to(mix_ptr.dtype.element_ty).to(tl.float32)
        tl.store(x_ptr + b * C + offs, x.to(x_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, add_ptr, resid_ptr, mix_ptr, N, eps, cap,
                     K: tl.constexpr, K_P2: tl.constexpr, STRIDE_N: tl.constexpr, STRIDE_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, NORM: tl.constexpr, RELU2: tl.constexpr, ADD: tl.constexpr,
                     MIX: tl.constexpr, SOFTCAP: tl.constexpr, PDL: tl.constexpr):
        """BLOCK_N outputs of y = x @ W.T for one row x (K,), W (N, K). Each program loads its BLOCK_N rows of W whole,
        in one go (every load in flight at once), before it waits for the previous kernel: the weights do not depend on
        it, so under programmatic dependent launch they stream while that kernel finishes. Then x, the products, and the
        epilogue in fp32:
            NORM     * rsqrt(mean(x^2) + eps): the parameter-free RMSNorm of x, applied after the matmul
            RELU2    relu(y)^2
            ADD      + add[n] (the residual), rounded to y's dtype (as addmm would) before MIX
            MIX      resid * y + mix[n] (the next layer's x0 mix)
            SOFTCAP  cap * tanh(y / cap), as gpt.softcap computes it"""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        cols = tl.arange(0, K_P2)
        inside = cols < K
        w = tl.load(w_ptr + rows[:, None] * STRIDE_N + cols[None, :] * STRIDE_K, mask=live[:, None] & inside[None, :],
                    other=0.0)
        _after_previous_kernel(PDL)
        x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], 1)
        if NORM:
            y = y / tl.sqrt(tl.sum(x * x, 0) / K + eps)
        if RELU2:
            y = tl.maximum(y, 0.0)
            y = y * y
        if ADD:
            y = (y + tl.load(add_ptr + rows, mask=live, other=0.0).to(tl.float32)).to(y_ptr.dtype.element_ty).to(tl.float32)
        if MIX:
            y = tl.load(resid_ptr).to(tl.float32) * y + tl.load(mix_ptr + rows, mask=live, other=0.0).to(tl.float32)
        if SOFTCAP:
            y = tl.sigmoid(y * (2.0 / cap)) * (2.0 * cap) - cap
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _noop_kernel(x_ptr, PDL: tl.constexpr):
        """A kernel that waits for its predecessor and does next to nothing: the floor of one kernel in the step's
        chain (bench/gpu.py's anatomy row)."""
        _after_previous_kernel(PDL)
        if tl.program_id(0) == 0:
            tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def gemv_blocks(n, k):
    """(BLOCK_N, num_warps) of _gemv_kernel for an (n, k) weight: inputs 2,048 to 4,096 wide (padded) on 8 warps at 32
    weight values per thread, so d20's 1,280-wide products take 4 rows a program; narrower ones on 4 warps and wider
    ones on more warps, at 64 values (32 registers) per thread (the MLP's 5,120-wide input: 2 rows, 8 warps). On the
    H200 (bench/RESULTS.md, run 4) 4 rows × 8 warps was the fastest tiling of the qkv and lm_head products and within
    0.25 µs of it for proj and fc, where run 3's 4 rows × 4 warps lost 0.3 to 2.9 µs; ptxas: no spills
    (tests/test_fused_decode.py)."""
    k_p2 = _pow2(k)
    if interpreted():  # one program at a time in numpy: the fewest (tests check ragged tiles with blocks=)
        return min(_pow2(n), 128), 4
    warps = max(4, min(16, k_p2 // 1024))
    per_thread = 64
    if 2048 <= k_p2 <= 4096:
        warps, per_thread = 8, 32
    return max(1, min(16, per_thread * 32 * warps // k_p2, _pow2(n))), warps


def gemv(x, w, add=None, mix=None, norm=False, relu2=False, cap=None, n=None, out_dtype=None, blocks=None, pdl=None):
    """One row's epilogue(x @ w), (1, n): x (1, K), w a DecodeMatrix's (K, N) view of its weight (any strides).
    add (1, N): plus the residual; mix (resid, x0_mix): then resid * y + x0_mix (the next layer's input); norm: the
    parameter-free RMSNorm of x applied after the product; relu2: relu(y)^2; cap: the logit softcap; n: the first n
    outputs only (the lm_head's unpadded vocabulary); out_dtype: x's unless given (fp32 logits); blocks: (BLOCK_N,
    num_warps) instead of gemv_blocks'; pdl: programmatic dependent launch (default: where the device has it)."""
    weight = w.t()  # (N, K): W as the Linear holds it, rows of K contiguous on CUDA
    N, K = n or weight.size(0), weight.size(1)
    y = torch.empty(1, N, device=x.device, dtype=out_dtype or x.dtype)
    block_n, warps = blocks or gemv_blocks(N, K)
    resid, mix_rows = mix if mix is not None else (x, x)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, y, add if add is not None else x, resid, mix_rows, N, NORM_EPS, float(cap or 1.0),
        K=K, K_P2=_pow2(K), STRIDE_N=weight.stride(0), STRIDE_K=weight.stride(1), BLOCK_N=block_n, NORM=norm,
        RELU2=relu2, ADD=add is not None, MIX=mix is not None, SOFTCAP=cap is not None, num_warps=warps,
        **_launch(x.device, pdl))
    return y


def pdl_available(device):
    """Programmatic dependent launch: Hopper and later (griddepcontrol), not in the interpreter."""
    return device.type == "cuda" and _capability(_index(device)) >= 9


def pdl_on(device):
    """Whether this step's kernels launch with PDL here: available, and not turned off (NANOCHAT_FUSED_PDL=0, or a
    capture that refused it: engine.capture_step)."""
    return PDL and pdl_available(device)


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index):
    return torch.cuda.get_device_capability(index)[0]


def _launch(device, pdl=None):
    """The launch options every kernel here takes: PDL and launch_pdl (the kernel waits for its predecessor itself)."""
    on = pdl_on(device) if pdl is None else bool(pdl)
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


def split_slots(programs, max_len, device):
    """Cache slots per attention program for `programs` (row, kv head) pairs (see SPLIT_SLOTS)."""
    if SPLIT_SLOTS:
        return SPLIT_SLOTS
    if device.type != "cuda":  # the interpreter: the smallest, so short tests cross split boundaries
        return MIN_SPLIT_SLOTS
    most = PROGRAMS_PER_SM * _sm_count(_index(device))
    split = MIN_SPLIT_SLOTS
    while split < max_len and programs * triton.cdiv(max_len, split) > most:
        split *= 2
    return split


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def attend(x, qkv, ids, k_cache, v_cache, pos, cos, sin, window, config, ve=None, gate=None, arrivals=None):
    """y (B, H * D): the attention of one new token per row, from the un-normed attention input x (B, C) and
    qkv = x @ Wqkv (B, (H + 2 Hkv) D); writes the token's K/V into the (B, Hkv, max_len, D) caches at each row's
    position pos[b]. arrivals: B * Hkv int32 zeros (StaticKVCache.arrivals), left zero: the attention programs combine
    the splits themselves (COMBINE "last"), else a combine kernel does."""
    B, C = x.shape
    H, HKV, D = config.n_head, config.n_kv_head, config.head_dim
    G, g_p2 = H // HKV, _pow2(H // HKV)
    max_len = k_cache.size(2)
    split = split_slots(B * HKV, max_len, x.device)
    nsplit = triton.cdiv(max_len, split)
    q = torch.empty(B * H, D, device=x.device, dtype=torch.float32)
    gate_channels = gate.size(1) if gate is not None else 1
    _prepare_kernel[(B * HKV,)](
        qkv, x, ids, ve if ve is not None else qkv, gate if gate is not None else qkv, cos, sin, pos, k_cache, v_cache, q,
        max_len, NORM_EPS, D ** -0.5, C=C, C_P2=_pow2(C), H=H, HKV=HKV, G=G, G_P2=g_p2, D=D,
        GATE=gate_channels, GATE_P2=_pow2(gate_channels), HAS_VE=ve is not None, num_warps=PREPARE_WARPS,
        **_launch(x.device))
    acc = torch.empty(B * H, nsplit, D, device=x.device, dtype=torch.float32)
    m = torch.empty(B * H, nsplit, device=x.device, dtype=torch.float32)
    l = torch.empty_like(m)
    window = window if window >= 0 else max_len
    block = max(16, ATTEND_BLOCK // g_p2)
    iters = triton.cdiv(min(split, window + 1, max_len), block)  # the most visible slots one split holds, in blocks
    y = torch.empty(B, H * D, device=x.device, dtype=x.dtype)
    last = COMBINE == "last" and arrivals is not None
    if ATTEND_KERNEL == "lanes" and G == 1:
        _attend_lanes_kernel[(B * HKV, nsplit)](
            q, pos, k_cache, v_cache, acc, m, l, arrivals if last else pos, y, max_len, window, split, nsplit,
            H=H, HKV=HKV, D=D, ROWS=block // LANE_PAIR, PAIR=LANE_PAIR, ITERS=iters, NSPLIT_P2=_pow2(nsplit),
            COMBINE=last, num_warps=ATTEND_WARPS, **_launch(x.device))
    else:
        _attend_split_kernel[(B * HKV, nsplit)](
            q, pos, k_cache, v_cache, acc, m, l, arrivals if last else pos, y, max_len, window, split, nsplit,
            H=H, HKV=HKV, G=G, G_P2=g_p2, D=D, BLOCK=block, ITERS=iters, NSPLIT_P2=_pow2(nsplit), COMBINE=last,
            num_warps=ATTEND_WARPS, **_launch(x.device))
    if not last:
        _combine_kernel[(B * H,)](acc, m, l, y, D=D, NSPLIT=nsplit, NSPLIT_P2=_pow2(nsplit), **_launch(x.device))
    return y


def relu2_normed(h, x):
    """relu(norm(x) @ W)^2 from h = x @ W (B, N), in place."""
    B, N = h.shape
    _relu2_kernel[(B, triton.cdiv(N, RELU2_BLOCK))](h, x, N, NORM_EPS, C=x.size(1), C_P2=_pow2(x.size(1)),
                                                   BLOCK=RELU2_BLOCK, **_launch(x.device))
    return h


def embed(weights, idx, mix_first=False):
    """DecodeWeights.embed in one kernel: x (B, C) and the x0 mixes (n_layer, B, C) for idx (B, 1); mix_first: x is
    layer 0's input, resid_lambda[0] * x + x0_lambda[0] * x (one addcmul less)."""
    B, C, L = idx.size(0), weights.config.n_embd, len(weights.layers)
    x = torch.empty(B, C, device=idx.device, dtype=weights.dtype)
    x0_mix = torch.empty(L, B, C, device=idx.device, dtype=weights.dtype)
    _embed_kernel[(B,)](idx, weights.wte, weights.x0, weights.resid, x, x0_mix, B, idx.stride(0), weights.wte.stride(0),
                        NORM_EPS, C=C, C_P2=_pow2(C), L=L, MIX_FIRST=mix_first, **_launch(idx.device))
    return x, x0_mix


def fused_step(weights, idx, cache, cos, sin):
    """DecodeWeights.step (same arguments, same fp32 logits (B, vocab), same cache writes) in fused kernels."""
    if idx.size(0) == 1 and GEMV == "triton":
        return _lone_row_step(weights, idx, cache, cos, sin)
    c = weights.config
    ids = idx[:, 0].contiguous()  # the attention kernel reads row b's token at ids + b
    x, x0_mix = embed(weights, idx)
    for i, layer in enumerate(weights.layers):
        x = torch.addcmul(x0_mix[i], weights.resid[i], x)
        y = attend(x, layer.qkv(x), ids, cache.k[i], cache.v[i], cache.pos, cos, sin, weights.windows[i], c,
                   ve=layer.ve, gate=layer.ve_gate, arrivals=cache.arrivals)
        x = layer.proj(y, add=x)
        x = layer.mlp_proj(relu2_normed(layer.fc(x), x), add=x)
    cache.advance()
    return weights.logits(x)


def _lone_row_step(weights, idx, cache, cos, sin):
    """fused_step for one row, its matrix products in _gemv_kernel with the elementwise work in their epilogues: per
    layer qkv, prepare, attend (+ combine), proj (+ residual), fc (norm, ReLU^2), mlp proj (+ residual, the next layer's
    x0 mix); then the lm_head with the final norm and the softcap. 6 kernels per layer instead of 8."""
    c, last = weights.config, len(weights.layers) - 1
    x, x0_mix = embed(weights, idx, mix_first=True)
    for i, layer in enumerate(weights.layers):
        y = attend(x, gemv(x, layer.qkv.w), idx[:, 0], cache.k[i], cache.v[i], cache.pos, cos, sin, weights.windows[i], c,
                   ve=layer.ve, gate=layer.ve_gate, arrivals=cache.arrivals)
        x = gemv(y, layer.proj.w, add=x)
        h = gemv(x, layer.fc.w, norm=True, relu2=True)
        x = gemv(h, layer.mlp_proj.w, add=x, mix=None if i == last else (weights.resid[i + 1:i + 2], x0_mix[i + 1]))
    logits = gemv(x, weights.lm_head.w, norm=True, cap=c.softcap, n=c.vocab_size, out_dtype=torch.float32)
    cache.advance()  # after the lm_head, which then follows the last GEMV directly (its weights stream early under PDL)
    return logits

