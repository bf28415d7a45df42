"""
FP8 matmuls for Linear layers (tensorwise dynamic scaling) via torch._scaled_mm.

A Linear does three matmuls: y = x @ W.T (forward), dx = dy @ W and dW = dy.T @ x (backward).
Each operand is scaled so its absmax lands on the fp8 maximum, cast to fp8 (e4m3 for x and W,
e5m2 for the wider-ranged gradients), multiplied by _scaled_mm, and dequantized by the inverse
scales. _scaled_mm wants its first operand row-major and its second column-major; dims must be
multiples of 16. Weights stay in full precision; only the matmul runs in fp8.
"""

import torch

EPS = 1e-12  # keeps the scale finite for an all-zero tensor


def fp8_supported(device):
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def to_fp8(x, fp8_dtype):
    """Quantize to fp8 with one scale per tensor; returns (fp8 data, inverse scale for _scaled_mm)."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.detach().abs().amax().float()
    scale = fp8_max / amax.double().clamp(min=EPS)  # double: same rounding eager vs compiled
    scale = scale.float()
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)  # clamp: casts wrap, not saturate
    return x_fp8, scale.reciprocal()


def col_major(x):
    return x.t().contiguous().t()


@torch._dynamo.allow_in_graph
class _FP8Matmul(torch.autograd.Function):
    """y = x @ W.T for 2D x, with all three matmuls in fp8; compile sees one opaque node."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_inv = to_fp8(x, torch.float8_e4m3fn)
        w8, w_inv = to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        # w8 is (N, K) row-major, so w8.t() is already column-major
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad_out.contiguous(), torch.float8_e5m2)
        grad_x = torch._scaled_mm(g8, col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad_out.dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), col_major(x8), scale_a=g_inv, scale_b=x_inv, out_dtype=grad_out.dtype)
        return grad_x, grad_w.to(ctx.weight_dtype)


def fp8_linear(x, weight):
    """F.linear(x, weight) with fp8 matmuls; x (..., K) in the compute dtype, weight (N, K) any float dtype."""
    shape = x.shape
    y = _FP8Matmul.apply(x.reshape(-1, shape[-1]), weight)
    return y.view(*shape[:-1], y.size(-1))
