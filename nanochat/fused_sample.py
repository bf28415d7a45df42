"""
Top-k sampling in two Triton kernels, for the decode loop on a GPU (engine.sample_with takes it when it can).

torch samples one token with top-k in ~15 small kernels: topk's radix-select passes over the vocabulary, a sort of the
k survivors, the division by the temperature, softmax, cumsum, the scaled uniform, searchsorted, clamp and gather. At
batch 1 each costs a few microseconds of GPU time per token, outside the decode step's CUDA graph, against a fused
step of ~0.65 ms at 50% of HBM. Here:

    block top-k   one program per (row, block of the vocabulary): the block's k likeliest, packed (logit, index)
    sample        one program per row: the k likeliest of those candidates, softmax at the temperature, the
                  inverse CDF at the row's uniform -> the token

Each logit and its index travel as one int64 key (the float's bits mapped to an order-preserving integer in the high
half, the index in the low half, lower index first among equal logits), so tl.topk's bitonic network sorts both.
Same draws as engine.sample_with's torch path for the same uniforms, except where a uniform falls within rounding of
the boundary between two tokens (tests/fused_decode_check.py counts both).
On first use per device and kernel shape the kernels draw from logits whose tokens are known (verified): a compile
error or a wrong token leaves torch's kernels to that shape, with a warning.

Needs Triton and a CUDA device, or TRITON_INTERPRET=1 (set before this module is imported) for CPU tensors.
"""

import math
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # an install without triton: sample_with keeps torch's path
    triton = tl = None

MAX_TOP_K = 64  # the candidates one program keeps per block (k rounded up to a power of two) stay in registers
# "0": engine.sample_with keeps torch's kernels (bench/gpu.py's A/B row)
ENABLED = os.environ.get("NANOCHAT_FUSED_SAMPLE", "1") != "0"
# vocabulary entries per block-top-k program; None: the power of two nearest sqrt(vocab * k), so both kernels sort
# about as many keys (bench/gpu.py's sampling row times the alternatives)
BLOCK = int(os.environ["NANOCHAT_FUSED_SAMPLE_BLOCK"]) if os.environ.get("NANOCHAT_FUSED_SAMPLE_BLOCK") else None


def serves(logits, top_k, top_p=None):
    """Whether sample_top_k takes this call: top-k (1..MAX_TOP_K, under the vocabulary) without top-p, rows of logits
    on CUDA (or on the CPU under TRITON_INTERPRET=1), not turned off (NANOCHAT_FUSED_SAMPLE=0)."""
    if not ENABLED or triton is None or top_k is None or (top_p is not None and top_p < 1):
        return False
    on_device = logits.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and logits.device.type == "cpu")
    return on_device and logits.dim() == 2 and 1 <= top_k <= min(MAX_TOP_K, logits.size(1) - 1)


_verdicts = {}  # (device, logits dtype, vocabulary, k rounded up): whether the kernels drew right there (check_draws)


def verified(logits, top_k):
    """Whether sample_top_k may take these logits: on first use per device and kernel shape (dtype, vocabulary, k
    rounded up to a power of two) check_draws runs, and kernels that fail it (a compile error, a wrong token) leave
    torch's kernels to that shape for the rest of the process, with a warning."""
    key = (str(logits.device), logits.dtype, logits.size(1), max(4, _pow2(top_k)))
    if key not in _verdicts:
        why = check_draws(logits.device, logits.dtype, logits.size(1), top_k)
        if why:
            warnings.warn(f"the top-k sampling kernels failed their check on {logits.device} (vocabulary "
                          f"{logits.size(1)}, top_k {top_k}): {why}; sampling with torch's kernels instead")
        _verdicts[key] = why is None
    return _verdicts[key]


def check_draws(device, dtype, vocab, top_k, rows=4):
    """None if sample_top_k draws the token each row's uniform must give, else why not. Each row's top_k logits are
    0, -1/8, -2/8, ... (exact in bf16 too: no ties) at random places of the vocabulary, the rest far below; its
    uniform sits mid-way in one token's interval of the CDF, far from any rounding."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.full((rows, vocab), -40.0, device=device)
    places = torch.stack([torch.randperm(vocab, device=device, generator=g)[:top_k] for _ in range(rows)])
    logits.scatter_(1, places, -torch.arange(top_k, device=device, dtype=torch.float32).expand(rows, -1) / 8)
    cdf = torch.softmax(-torch.arange(top_k, device=device, dtype=torch.float32) / 8, 0).cumsum(0)
    pick = torch.arange(rows, device=device) * (top_k // 2 + 1) % top_k  # first, middle and last of the k
    below = torch.where(pick > 0, cdf[(pick - 1).clamp(min=0)], 0.0)
    u = ((below + cdf[pick]) / 2 / cdf[-1]).unsqueeze(1)
    want = places.gather(1, pick.unsqueeze(1))
    try:
        got = sample_top_k(logits.to(dtype), u, 1.0, top_k)
    except Exception as e:  # noqa: BLE001 - any failure to compile or launch: torch's kernels serve instead
        return f"{type(e).__name__}: {e}"
    if not torch.equal(got, want):
        return f"drew tokens {got.flatten().tolist()} where the uniforms give {want.flatten().tolist()}"
    return None


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def block_size(vocab, k_p2):
    """Vocabulary entries per block-top-k program (see BLOCK)."""
    if BLOCK:
        return BLOCK
    return max(k_p2, min(_pow2(vocab), 1 << round(math.log2(math.sqrt(vocab * k_p2)))))


def _warps(keys):
    """Warps for a program sorting `keys` int64 keys: no spills on sm_90 (ptxas: 2,048 at 4 warps spill)."""
    return 4 if keys <= 1024 else 8


if triton is not None:
    LOWEST_KEY = tl.constexpr(-(2 ** 63))  # below every packed key: the padding of a ragged last block

    @triton.jit
    def _pack(x, idx):
        """int64 keys ordered as the fp32 values x, ties by lower index idx (int32) first."""
        bits = x.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger magnitude, smaller integer
        return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)

    @triton.jit
    def _unpack(key):
        """(fp32 value, int32 index) of packed keys."""
        ordered = (key >> 32).to(tl.int32)
        bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)

    @triton.jit
    def _block_top_k_kernel(logits_ptr, keys_ptr, V, stride_row, NBLOCKS, BLOCK: tl.constexpr, K_P2: tl.constexpr):
        """Program (row, block): the K_P2 largest packed keys of the row's BLOCK logits, descending, to keys_ptr."""
        row, blk = tl.program_id(0), tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=valid, other=0.0).to(tl.float32)
        keys = tl.where(valid, _pack(x, offs), LOWEST_KEY)
        top = tl.topk(keys, K_P2)
        tl.store(keys_ptr + (row * NBLOCKS + blk) * K_P2 + tl.arange(0, K_P2), top)

    @triton.jit
    def _sample_kernel(keys_ptr, u_ptr, out_ptr, top_k, inv_temperature, N: tl.constexpr, N_P2: tl.constexpr,
                       K_P2: tl.constexpr):
        """Program row: its top_k largest of the N candidate keys, softmax(logit / temperature) over them, and the token
        at the row's uniform u: the first whose cumulative probability exceeds u * total (searchsorted, right=True)."""
        row = tl.program_id(0)
        offs = tl.arange(0, N_P2)
        keys = tl.load(keys_ptr + row * N + offs, mask=offs < N, other=LOWEST_KEY)
        value, index = _unpack(tl.topk(keys, K_P2))
        j = tl.arange(0, K_P2)
        kept = j < top_k
        weight = tl.where(kept, tl.exp((value - tl.max(tl.where(kept, value, -float("inf")), 0)) * inv_temperature), 0.0)
        cdf = tl.cumsum(weight, 0)
        threshold = tl.load(u_ptr + row) * tl.sum(tl.where(j == top_k - 1, cdf, 0.0), 0)
        pick = tl.minimum(tl.sum((kept & (cdf <= threshold)).to(tl.int32), 0), top_k - 1)
        tl.store(out_ptr + row, tl.sum(tl.where(j == pick, index, 0), 0).to(tl.int64))


def sample_top_k(logits, u, temperature, top_k):
    """One token per row (B, 1) int64 from logits (B, V), as engine.sample_with with top_k (1..MAX_TOP_K) and no top-p:
    the row's uniform u (B, 1) picks from softmax(logits / temperature) over its top_k likeliest tokens."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    k_p2 = max(4, _pow2(top_k))  # a 1-wide sort is not a shape tl.topk takes
    block = block_size(V, k_p2)
    nblocks = triton.cdiv(V, block)
    keys = torch.empty(B, nblocks * k_p2, device=logits.device, dtype=torch.int64)
    _block_top_k_kernel[(B, nblocks)](logits, keys, V, logits.stride(0), nblocks, BLOCK=block, K_P2=k_p2,
                                      num_warps=_warps(block))
    out = torch.empty(B, 1, device=logits.device, dtype=torch.int64)
    n = nblocks * k_p2
    _sample_kernel[(B,)](keys, u.contiguous(), out, top_k, 1.0 / temperature, N=n, N_P2=_pow2(n), K_P2=k_p2,
                         num_warps=_warps(n))
    return out
