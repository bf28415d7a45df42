"""
GPT model, the modern nanochat recipe. One dial: depth (see GPTConfig.from_depth).

- rotary embeddings (no positional embeddings), precomputed cos/sin cache, QK-norm
- parameter-free RMSNorm, pre-norm blocks, ReLU² MLP, no biases
- untied token embedding / lm_head, logit softcap, fp32 logits for the loss
- grouped-query attention (n_kv_head <= n_head)
- sliding-window attention by layer pattern ("SSSL": short, short, short, long; last layer long)
- value embeddings (ResFormer-style) on alternating layers, mixed into v by a learned gate
- per-layer residual / x0 scalars (resid_lambdas, x0_lambdas)
- explicit compute dtype instead of autocast: fp32 master weights, matmuls in bf16 on SM80+ GPUs
- FlashAttention-3 for training on Hopper when importable, SDPA everywhere else
- optional fp8 Linear matmuls (Hopper)

Build it as: `with torch.device("meta"): model = GPT(config)`, then `model.to_empty(device=...)`,
then `model.init_weights()` (or just `GPT.create(config, device)`).
"""

import contextlib
import functools
import math
import threading
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.kv_cache import KVCache

PAD_VOCAB_TO = 64  # pad embedding/lm_head rows for efficient matmuls and sharding; logits are cropped
ROTARY_OVERCOMPUTE = 10  # rotary cache covers 10x sequence_len; inference beyond that extends it
VE_GATE_CHANNELS = 32  # the value-embedding gate looks at this many leading channels of x
MAX_DEPTH = 128  # layers a config may ask for (GPT-3 175B had 96): 10**40 built layers until memory ran out
LOSS_CHUNK_ELEMENTS = 2**22  # CPU loss: logits per chunk (16 MB in fp32, about L3-sized)
# SDPA backends for forwards without grad (generation, evaluation), whose sequence lengths vary call to call: cuDNN
# attention builds a graph per new shape (bench/gpu.py 2026-11-26, H100: 40.7 vs 1.8 ms per cold decode step)
VARYING_SHAPE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA)
    n_embd: int = 768
    # tiled across layers, last layer always L. L = full context, S = short window
    window_pattern: str = "SSSL"
    short_window: int = 0  # tokens to the left an S layer sees; 0 = sequence_len // 2
    softcap: float = 15.0
    rope_base: float = 10000.0
    fp8: bool = False  # fp8 matmuls in the blocks' Linear layers (Hopper only)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, model_dim=None, **overrides):
        """Everything from depth: width = depth*aspect_ratio rounded up to a multiple of head_dim."""
        if model_dim is None:
            model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        assert model_dim % head_dim == 0, f"model_dim {model_dim} is not a multiple of head_dim {head_dim}"
        n_head = model_dim // head_dim
        overrides.setdefault("n_kv_head", n_head)
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_embd=model_dim, **overrides)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# compute dtype and attention kernels

def compute_dtype_for(device, requested=None):
    """bf16 on SM80+ GPUs, fp32 elsewhere; `requested` (a torch.dtype or name, e.g. the stage's --dtype), else
    NANOCHAT_DTYPE=float32|bfloat16|bf16-mixed (fp32 here: its bf16 is autocast's), overrides. Same rules as
    common.compute_dtype (float16 refused)."""
    from nanochat.common import DTYPES, compute_dtype
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise ValueError(f"compute dtype {requested} is not supported; use torch.float32 or torch.bfloat16")
        return requested
    return compute_dtype(torch.device(device), requested or "auto")


_FA3 = None  # the flash_attn_interface module, once a model lands on a Hopper GPU that has it


def load_flash_attn_3(device):
    """FlashAttention-3 (training attention) on a Hopper GPU if its package is installed, else None."""
    global _FA3
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        import flash_attn_interface
    except ImportError:
        return None
    _FA3 = flash_attn_interface
    return _FA3


class _SharedSDPA:
    """sdpa_kernel(VARYING_SHAPE_SDPA) for any number of threads at once (serve's replicas decode concurrently).
    torch's backend flags are process-wide, and nested sdpa_kernel contexts in two threads restore each other's
    flags out of order; here the first thread in sets them and the last one out restores them."""

    def __init__(self):
        self.lock, self.users, self.context = threading.Lock(), 0, None

    @contextlib.contextmanager
    def __call__(self):
        with self.lock:
            if self.users == 0:
                self.context = sdpa_kernel(VARYING_SHAPE_SDPA)
                self.context.__enter__()
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    self.context.__exit__(None, None, None)


varying_shape_sdpa = _SharedSDPA()


def norm(x):
    # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits, cap):
    """cap * tanh(logits / cap), computed as 2 * cap * sigmoid(2 * logits / cap) - cap: the same values to fp32
    rounding, and CPU torch's sigmoid is vectorized where its tanh is not (0.5 vs 2.6 ns per element on Zen 5)."""
    return torch.sigmoid(logits * (2.0 / cap)) * (2.0 * cap) - cap


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with a two-pass backward, grad * 2 * relu(x) (autograd's pow and threshold backward take four)."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * (r + r)


def relu_squared(x):
    """The MLP's activation. Eager CPU training takes ReluSquared (d4's (8, 256, 1024) activation: 2.4 ms forward and
    backward instead of 5, the tiny training step ~1.5% faster); GPUs compile the step, and inductor fuses the plain ops."""
    if x.requires_grad and not x.is_cuda and not torch.compiler.is_compiling():
        return ReluSquared.apply(x)
    return F.relu(x).square()


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def layer_windows(config):
    """Left-context window per layer (tokens before the query it may see); -1 = unlimited."""
    pattern = config.window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"window_pattern={config.window_pattern!r}: use only the letters S and L")
    short = config.short_window or config.sequence_len // 2
    windows = [short if pattern[i % len(pattern)] == "S" else -1 for i in range(config.n_layer)]
    windows[-1] = -1
    return windows


def apply_rotary_emb(x, cos, sin):
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], 3)


def attention_mask(Tq, Tk, window, device):
    """Boolean (Tq, Tk) mask, True = attend: the queries are the last Tq of the Tk positions."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    mask = k_pos <= q_pos
    if window >= 0:
        mask = mask & (q_pos - k_pos <= window)
    return mask


def attention(q, k, v, window):
    """Causal (sliding-window) attention. q (B, H, Tq, D); k, v (B, H_kv, Tk, D), Tk >= Tq."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    full = window < 0 or window >= Tk - 1
    if full and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:  # one decode step: the window is a slice of the cache
        if not full:
            k, v = k[:, :, -(window + 1):], v[:, :, -(window + 1):]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = attention_mask(Tq, Tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def decode_attention(q, k, v, bias):
    """One query per row over a fixed-size cache: q (B, H, 1, D); k, v (B, H_kv, max_len, D); bias in q's dtype, 0
    where a slot is visible and -inf where not (visible_bias), (max_len,) for every row or (B * H_kv, 1, max_len).

    Two batched matmuls and a softmax rather than SDPA: no kernel choice that depends on the shape, nothing a CUDA
    graph cannot capture. The scale and the mask ride in the first matmul (baddbmm), and the softmax of a bf16 input
    accumulates in fp32: three kernels, where scale, cast and mask as separate ops were eight."""
    B, H, _, D = q.shape
    Hkv, L = k.size(1), k.size(2)
    q = q.reshape(B * Hkv, H // Hkv, D)  # GQA: the query heads sharing a kv head become its query rows
    scores = torch.baddbmm(bias, q, k.reshape(B * Hkv, L, D).transpose(1, 2), alpha=D**-0.5)
    probs = scores.softmax(-1)
    return (probs @ v.reshape(B * Hkv, L, D)).reshape(B, H, 1, D)


def visible_bias(visible, dtype):
    """decode_attention's additive mask from a boolean visible mask (any shape)."""
    return torch.full_like(visible, float("-inf"), dtype=dtype).masked_fill_(visible, 0.0)


# -----------------------------------------------------------------------------
# modules

class Linear(nn.Linear):
    """Bias-free Linear: the (fp32) weight is cast to the input's compute dtype, or run in fp8."""

    def __init__(self, in_features, out_features, fp8=False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8

    def forward(self, x):
        if self.fp8 and self.training:  # fp8 is a training speedup; inference (any shape) stays in bf16
            from nanochat.fp8 import fp8_linear
            return fp8_linear(x, self.weight)
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert config.n_embd % config.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        fp8 = config.fp8
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim, fp8)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim, fp8)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim, fp8)
        self.c_proj = Linear(config.n_embd, config.n_embd, fp8)
        self.ve_gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: per-head, input-dependent gate in (0, 2), 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        if _FA3 is not None and kv_cache is None and q.is_cuda and q.dtype == torch.bfloat16:  # FA3 works in (B, T, H, D)
            y = _FA3.flash_attn_func(q, k, v, causal=True, window_size=(self.window, 0))
            y = y[0] if isinstance(y, tuple) else y
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if kv_cache is not None:
                k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            y = attention(q, k, v, self.window).transpose(1, 2)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, config.fp8)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, config.fp8)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding without its default init: init_weights() sets the values, and the default
    reset_parameters() imports torch._dynamo (~1 s per process start)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class GPT(nn.Module):
    def __init__(self, config):
        """Runs under torch.device("meta") in the normal flow: shapes only, real values in init_weights()."""
        super().__init__()
        self.config = config
        self.windows = layer_windows(config)
        self.padded_vocab_size = math.ceil(config.vocab_size / PAD_VOCAB_TO) * PAD_VOCAB_TO
        self.transformer = nn.ModuleDict({
            "wte": embedding(self.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, w) for i, w in enumerate(self.windows)]),
        })
        self.lm_head = Linear(config.n_embd, self.padded_vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scales the residual stream per layer
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # mixes the input embedding back in per layer
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): embedding(self.padded_vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        cos, sin = self._rotary(ROTARY_OVERCOMPUTE * config.sequence_len, device=self.get_device())
        self.register_buffer("cos", cos, persistent=False)  # derived, not saved in checkpoints
        self.register_buffer("sin", sin, persistent=False)
        self.compute_dtype = torch.float32
        self.requested_dtype = None  # None: auto per device (compute_dtype_for); set by create(dtype=...)

    @classmethod
    def create(cls, config, device="cpu", dtype=None):
        """Meta-device build, allocation on `device`, init_weights(). `dtype` (e.g. a stage's ctx.dtype)
        fixes the compute dtype; None picks it per device."""
        with torch.device("meta"):
            model = cls(config)
        model.requested_dtype = dtype
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self):
        device = self.get_device()
        if self.config.fp8:
            from nanochat.fp8 import fp8_supported
            if not fp8_supported(device):
                raise RuntimeError(f"GPTConfig(fp8=True) needs an NVIDIA GPU with fp8 tensor cores (Hopper SM90, or Ada SM89); the model is on {device}")
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(n_embd) without normal's outliers
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2*sigmoid(0) = 1
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        self.cos, self.sin = self._rotary(self.cos.size(1), device)
        self.compute_dtype = compute_dtype_for(device, self.requested_dtype)
        if device.type == "cuda" and self.compute_dtype == torch.bfloat16:
            # embeddings are only gathered, never multiplied: bf16 storage halves their memory
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def _apply(self, fn, recurse=True):
        # keep the compute dtype in step with the device after .to() / .cuda() / .to_empty()
        super()._apply(fn, recurse)
        device = self.get_device()
        self.compute_dtype = compute_dtype_for(device, self.requested_dtype) if device.type != "meta" else torch.float32
        load_flash_attn_3(device)
        return self

    def _rotary(self, seq_len, device):
        if torch.device(device).type == "meta":  # shapes only; arange on meta imports torch._dynamo (~1 s)
            shape = (1, seq_len, 1, self.config.head_dim // 2)
            return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
        half = torch.arange(0, self.config.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rope_base ** (half / self.config.head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    def get_device(self):
        return self.transformer.wte.weight.device

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention scores.

        Embedding lookups and scalars do no matmul. Attention adds 12 * heads * head_dim * keys seen
        per layer, where a sliding window caps the keys at window + 1.
        """
        nparams = sum(p.numel() for p in self.parameters())
        no_matmul = (self.transformer.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
                     + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h, d, t = self.config.n_head, self.config.head_dim, self.config.sequence_len
        attn = sum(12 * h * d * (t if w < 0 else min(w + 1, t)) for w in self.windows)
        return 6 * (nparams - no_matmul) + attn

    def num_scaling_params(self):
        """Parameter counts by group (different scaling-law papers count different subsets)."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        return counts

    def setup_optimizer(self, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), compile=None, ortho_dtype=None):
        """One MuonAdamW: Muon for block matrices (grouped by shape), AdamW for everything else.

        AdamW learning rates were tuned at width 768 and scale as 1/sqrt(width/768). Muon orthogonalizes in bf16 on
        GPUs and on CPUs where bf16 matmuls pay (common.fast_bf16_cpu), else in fp32.
        """
        from nanochat.optim import MuonAdamW
        matrices = list(self.transformer.h.parameters())
        assert all(p.ndim == 2 for p in matrices)
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(adamw, params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(adamw, params=[self.transformer.wte.weight], lr=embedding_lr * scale),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=embedding_lr * scale),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        groups = [g for g in groups if g["params"]]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters()))
        if compile is None:
            compile = self.get_device().type == "cuda"
        if ortho_dtype is None:
            from nanochat.common import fast_bf16_cpu
            ortho_dtype = torch.bfloat16 if self.get_device().type == "cuda" or fast_bf16_cpu() else torch.float32
        optimizer = MuonAdamW(groups, compile=compile, ortho_dtype=ortho_dtype)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def rotary_tables(self, length):
        """The static step's rotary tables for positions [0, length), (1, length, 1, head_dim) in the compute dtype:
        [cos, cos] and [sin, -sin], so that rotary is x * cos + halves_swapped(x) * sin (DecodeWeights.step)."""
        cos, sin = self._rotary(length, self.get_device())
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)
        return cos.to(self.compute_dtype), sin.to(self.compute_dtype)

    def new_kv_cache(self, batch_size, max_len=None):
        """An empty KVCache shaped for this model (max_len defaults to sequence_len; it grows)."""
        c = self.config
        return KVCache(batch_size, c.n_kv_head, c.head_dim, c.n_layer, max_len or c.sequence_len,
                       device=self.get_device(), dtype=self.compute_dtype)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_at=None):
        """Without targets, fp32 logits: (B, T, vocab); with logits_at="last", the last position's, (B, 1, vocab) (all a
        prefill needs); with logits_at a (B, T) bool mask, those at its True positions in row-major order, (N, vocab)
        (the positions an eval scores). The lm_head then runs on those positions only: it is a fifth of a d20 forward's
        FLOPs, and its (B, T, vocab) fp32 output the largest tensor. With targets: the cross-entropy loss (targets -1
        ignored), a scalar for "mean"/"sum" and (B, T) for "none"."""
        varying = idx.is_cuda and not torch.is_grad_enabled()  # training shapes are fixed: cuDNN's graph pays off there
        with varying_shape_sdpa() if varying else contextlib.nullcontext():
            return self._forward(idx, targets, kv_cache, loss_reduction, logits_at)

    def _forward(self, idx, targets, kv_cache, loss_reduction, logits_at=None):
        T = idx.size(1)
        dtype = self.compute_dtype
        T0 = 0 if kv_cache is None else kv_cache.pos
        if T0 + T > self.cos.size(1):  # inference past the precomputed rotary cache
            self.cos, self.sin = self._rotary(2 * (T0 + T), idx.device)
        cos, sin = self.cos[:, T0:T0 + T].to(dtype), self.sin[:, T0:T0 + T].to(dtype)

        x = norm(self.transformer.wte(idx).to(dtype))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None:
            if isinstance(logits_at, str) and logits_at != "last":
                raise ValueError(f"logits_at must be None, 'last' or a (B, T) bool mask, not {logits_at!r}")
            return self._logits(norm(x if logits_at is None else x[:, -1:] if isinstance(logits_at, str) else x[logits_at]))
        return self._loss(norm(x), targets, loss_reduction)

    def _logits(self, x):
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        return softcap(logits, self.config.softcap)  # smoothly capped to ±softcap

    def _shifted_logits(self):
        """x -> _logits(x) + cap: the same softmax and loss in two passes fewer over the logits and their gradient, for
        the CPU loss (~10 ms of a ~420 ms tiny step): the softcap's -cap cancels in the softmax and its 2/cap scale rides
        in the lm_head's weight, scaled once per loss."""
        cap = self.config.softcap
        weight = self.lm_head.weight[:self.config.vocab_size] * (2.0 / cap)
        return lambda x: torch.sigmoid(F.linear(x, weight.to(x.dtype)).float()) * (2.0 * cap)

    def _loss(self, x, targets, reduction):
        # On CPU the positions whose target is ignored (SFT's and RL's prompt tokens) skip the lm_head, and the rest
        # run in row chunks whose logits stay in cache (softcap, softmax and their backward each pass over them).
        # GPUs, and torch.compile anywhere, take every position in one piece: a data-dependent shape would cost a sync
        # and a graph break (a recompile per count of kept positions).
        B, T, C = x.shape
        x, targets = x.reshape(-1, C), targets.reshape(-1)
        kept = None if x.is_cuda or torch.compiler.is_compiling() else (targets != -1).nonzero().squeeze(1)
        if kept is not None:
            x, targets = x[kept], targets[kept]
        n_chunks = 1 if x.is_cuda else max(1, x.size(0) * self.config.vocab_size // LOSS_CHUNK_ELEMENTS)
        logits = self._logits if x.is_cuda else self._shifted_logits()
        losses = [F.cross_entropy(logits(xc), tc, ignore_index=-1, reduction="none" if reduction == "none" else "sum")
                  for xc, tc in zip(x.chunk(n_chunks), targets.chunk(n_chunks))]
        if reduction == "none":
            loss = torch.cat(losses)
            if kept is not None:  # 0 at the ignored positions, as cross_entropy gives them
                loss = loss.new_zeros(B * T).index_copy(0, kept, loss)
            return loss.view(B, T)
        loss = sum(losses)
        return loss / (targets != -1).sum() if reduction == "mean" else loss


def as_gpt(model):
    """The nanochat GPT behind `model` (itself, or under torch.compile's wrapper), else None (HF GPT-2, test doubles)."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, GPT) else None


def logits_at(model, idx, at, kv_cache=None):
    """fp32 logits of model(idx) at `at`: "last" gives (B, 1, vocab), a (B, T) bool mask (N, vocab) in row-major order.
    A nanochat GPT (or its torch.compile wrapper) runs its lm_head at those positions only; other models with the same
    interface (HF GPT-2, the tests' doubles) give every position's, and these are picked out."""
    if as_gpt(model) is not None:
        return model(idx, kv_cache=kv_cache, logits_at=at)
    logits = (model(idx) if kv_cache is None else model(idx, kv_cache=kv_cache)).float()
    return logits[:, -1:] if isinstance(at, str) else logits[at]


# -----------------------------------------------------------------------------
# static decode step: one token per row at a position held on the device (CUDA-graph capturable)

PACK_MIN_ELEMENTS = 1 << 17  # smaller matrices lose to oneDNN's call overhead (~12 us) what its packing saves them
PACK_ROWS = 8  # the batch size oneDNN's weight packing is chosen for (4 to 32 rows run equally fast on it)
PACK_MIN_SPEEDUP = 1.1  # steps of 2+ rows use the packed copies only where they measured at least this much faster


def input_major(device, out_features, in_features):
    """Whether the static step stores a weight as W.T contiguous, (in, out), rather than as its parameter, (out, in).
    On CPU a one-row decode matmul is a GEMV that streams the weight from memory, and MKL reads (in, out) at DRAM speed
    where (out, in) runs 1.7-2.7x slower when out >= in (qkv, fc, lm_head; bench/decode_matmul.py); a wider input
    (mlp_proj) reads faster as it is. GPUs keep the parameter's layout (cuBLAS takes the transposed view as it is)."""
    return torch.device(device).type == "cpu" and out_features >= in_features


def cpu_packing(device, dtype, out_features, in_features):
    """Whether the static step also keeps a oneDNN-packed copy of an fp32 CPU weight for steps of 2+ rows: MKL's
    small-batch GEMM runs 2-4x slower there than oneDNN on a prepacked weight (bench/decode_matmul.py)."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and out_features * in_features >= PACK_MIN_ELEMENTS
            and onednn_packing_available())


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def cpu_packing_speedup() -> float:
    """How much faster an 8-row decode matmul runs on oneDNN's packed weight than on MKL's (in, out) copy on this CPU
    (1024x256 fp32 weights cycled through 8 MB, past the L2 as in a step through a whole model; best of 5 passes,
    interleaved), measured once per process at the first step of 2+ rows, under decoding's thread count (~35 ms).
    Measured, not assumed: packing made such steps 1.3-3x faster on the Zen 5 host it was chosen on, but a 2-core Xeon
    ran them 1.5-1.8x slower on it (bench/decode_matmul.py)."""
    from nanochat.common import fastest
    if not onednn_packing_available():
        return 0.0
    rng = torch.Generator().manual_seed(0)  # its own: it runs mid-decode, where a seeded sampler may use the global one
    weights = [torch.randn(1024, 256, generator=rng) for _ in range(8)]
    copies, packed = [w.t().contiguous() for w in weights], [pack_for_cpu(w) for w in weights]
    x = torch.randn(PACK_ROWS, 256, generator=rng)
    best = fastest({"T": lambda: [x @ w for w in copies],
                    "packed": lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in packed]}, rounds=5)
    return best["T"] / best["packed"]


def cpu_packing_pays() -> bool:
    """Whether steps of 2+ rows run on the packed copies that cpu_packing() keeps (else on the (in, out) copy)."""
    return cpu_packing_speedup() >= PACK_MIN_SPEEDUP


def pack_for_cpu(w):
    """oneDNN's prepacked form of an (out, in) fp32 weight (an opaque tensor for mkldnn._linear_pointwise)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)


class DecodeMatrix:
    """A Linear's weight W (out, in) as the static step applies it: matrix(x, add) = add + x @ W.T.
    w is W.T, (in, out): a view of the parameter, or a copy laid out (in, out) where input_major() says so. Where
    cpu_packing() says so, `source` gives W and, on a CPU where packing measured faster (cpu_packing_pays), steps of 2+
    rows run on oneDNN's packing of it, made at the first such step after each refresh (one-row decoding never pays
    for it; torch.compile traces the w path)."""

    def __init__(self, w, source=None):
        self.w, self.source, self.packed = w, source, None

    def __call__(self, x, add=None):
        if self.source is not None and x.size(0) > 1 and not torch.compiler.is_compiling() and cpu_packing_pays():
            packed = self.packed  # one read: a refresh in another thread may reset it meanwhile
            if packed is None:
                with torch.no_grad():
                    packed = self.packed = pack_for_cpu(self.source())
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return y if add is None else y.add_(add)
        return x @ self.w if add is None else torch.addmm(add, x, self.w)


@dataclass
class DecodeLayer:
    qkv: DecodeMatrix       # c_q, c_k, c_v stacked: one matmul instead of three
    proj: DecodeMatrix
    fc: DecodeMatrix
    mlp_proj: DecodeMatrix
    ve: torch.Tensor | None = None
    ve_gate: torch.Tensor | None = None  # (n_kv_head, gate channels), as the parameter: the fused kernel reads it


class DecodeWeights:
    """The weights of a GPT in its compute dtype, laid out for `step`, the static-shape decode step.

    `step` computes what GPT.forward does for one token per row with a KVCache, but with nothing that changes shape
    and no host sync: the position is a device tensor (StaticKVCache.pos), the rotary angles are gathered by it, K/V
    are written at it with index_copy_, and attention covers the whole fixed-size cache through a position/window
    mask. So one CUDA graph per (batch, max_len) replays every step.
    """

    def __init__(self, model):
        self.config, self.windows, self.dtype = model.config, list(model.windows), model.compute_dtype
        # Tensors already in the compute dtype and layout are used as they are; the rest (fp32 master weights, the
        # stacked qkv, the input-major and packed matrices) are copies that refresh() renews from the parameters at
        # every request: the model's parameters are never cast, and a model being trained (chat_rl samples from it) is
        # decoded with its current weights.
        self._copies, self._matrices = [], []
        self.params = list(model.parameters())
        self._storage = [p.data_ptr() for p in self.params]  # .to() / .cuda() swap a parameter's data, not the object
        h = model.transformer.h
        self.wte = self._use(model.transformer.wte.weight)
        self.lm_head = self._matrix(model.lm_head.weight)
        self.resid = self._use(model.resid_lambdas)
        self.x0 = self._use(model.x0_lambdas)
        self.layers = []
        for i, block in enumerate(h):
            a, m = block.attn, block.mlp
            ve = model.value_embeds[str(i)].weight if str(i) in model.value_embeds else None
            self.layers.append(DecodeLayer(
                qkv=self._matrix(a.c_q.weight, a.c_k.weight, a.c_v.weight), proj=self._matrix(a.c_proj.weight),
                fc=self._matrix(m.c_fc.weight), mlp_proj=self._matrix(m.c_proj.weight),
                ve=None if ve is None else self._use(ve), ve_gate=None if a.ve_gate is None else self._use(a.ve_gate.weight)))
        self.gate_channels = h[0].attn.ve_gate_channels
        self._seen = self._versions()  # the versions the copies were made at (refresh)

    def _value(self, params):
        """The parameters stacked along dim 0 in the compute dtype (a lone one already in it: itself, detached)."""
        return (params[0] if len(params) == 1 else torch.cat(params)).detach().to(self.dtype)

    @torch.no_grad()
    def _tracked(self, fresh, layout=None):
        """A tensor the step reads, made from the parameters by fresh() (then laid out by layout(), e.g. contiguous),
        which refresh() renews in place from fresh() (copy_ lays the values out as the copy is)."""
        copy = fresh() if layout is None else layout(fresh())
        self._copies.append((copy, fresh))
        return copy

    def _use(self, *params):
        """What the step reads for these parameters: the parameter itself, or a tracked copy (cast, stacked)."""
        if len(params) == 1 and params[0].dtype == self.dtype:
            return params[0].detach()
        return self._tracked(lambda: self._value(params))

    def _matrix(self, *params):
        """A DecodeMatrix for these Linear weights (stacked along dim 0 if several), laid out for the device."""
        out, inn, device = sum(p.size(0) for p in params), params[0].size(1), params[0].device
        value = lambda: self._value(params)  # noqa: E731
        if input_major(device, out, inn):
            w = self._tracked(lambda: value().t(), lambda t: t.contiguous())
        else:
            w = self._use(*params).t()
        matrix = DecodeMatrix(w, value if cpu_packing(device, self.dtype, out, inn) else None)
        self._matrices.append(matrix)
        return matrix

    def matches(self, model):
        """Whether these weights still point at the model's parameters (not replaced by .to() or a load with assign)."""
        params = list(model.parameters())
        return model.compute_dtype == self.dtype and len(params) == len(self.params) and all(
            p is q and p.data_ptr() == ptr for p, q, ptr in zip(params, self.params, self._storage))

    def _versions(self):
        """The parameters' version counters (None for inference tensors, which have none)."""
        try:
            return [p._version for p in self.params]
        except RuntimeError:
            return None

    @torch.no_grad()
    def refresh(self, force=False):
        """Copy the current parameter values into the copies (in place: captured graphs stay valid), unless no
        parameter changed since they were made: every in-place torch op bumps a tensor's version counter (optimizer
        steps, all_gather_into_tensor, load_state_dict), so a model only decoded pays nothing per request (d6 on CPU:
        ~25 ms). c10d's broadcast and all_reduce do not bump it: after writing parameters with those, force=True."""
        versions = self._versions()
        if not force and versions is not None and versions == self._seen:
            return
        for copy, fresh in self._copies:
            copy.copy_(fresh())
        for matrix in self._matrices:
            matrix.packed = None  # packed again from the new values when a step needs it
        self._seen = versions

    def step(self, idx, cache, cos, sin, at=None):
        """fp32 logits (B, vocab) for idx (B, 1), each row at its position cache.pos[b]; writes this step's K/V and
        advances the live rows' positions.
        cos, sin: rotary tables covering the cache (GPT.rotary_tables(cache.max_len)).
        at: every row's position, when the host knows it and all rows share it (Engine.generate's uncaptured step):
        angles, K/V slot and visible slots are then slices, and attention is SDPA over those, with no mask (on the
        2-core Xeon, a d2 batch-1 step 714 -> 570 us).

        Same arithmetic as GPT.forward, in fewer kernels (each costs ~2 us even inside a CUDA graph, and a d20 step was
        929 of them on the H100): q and k get their rotary and norm together, the x0 mix and the value-embedding gate
        are one addcmul each, the residual adds ride in the projections' GEMMs (addmm), and the attention is three
        kernels (decode_attention). nanochat.fused_decode does the same in fewer still."""
        if at is None:
            cos, sin = cos[0, cache.pos].unsqueeze(1), sin[0, cache.pos].unsqueeze(1)  # (B, 1, 1, D): each row's angles
            visible = {w: self.bias(cache, w) for w in sorted(set(self.windows))}  # once per window
        else:
            cos, sin = cos[:, at:at + 1], sin[:, at:at + 1]  # (1, 1, 1, D)
            visible = {w: slice(0 if w < 0 else max(0, at - w), at + 1) for w in set(self.windows)}
        x, x0_mix = self.embed(idx)
        for i, layer in enumerate(self.layers):
            x = torch.addcmul(x0_mix[i], self.resid[i], x)
            x = layer.proj(self._attention(i, layer, norm(x), idx, cos, sin, cache, visible[self.windows[i]]), add=x)
            x = layer.mlp_proj(F.relu(layer.fc(norm(x))).square(), add=x)  # residual add in the GEMM
        cache.advance()
        return self.logits(x)

    def bias(self, cache, window):
        """decode_attention's mask for this window, (B * H_kv, 1, max_len): each row's, repeated per kv head."""
        bias = visible_bias(cache.visible(window), self.dtype)  # (B, max_len); expand + reshape: no host sync
        return bias[:, None, None, :].expand(-1, self.config.n_kv_head, 1, -1).reshape(-1, 1, bias.size(-1))

    def embed(self, idx):
        """x (B, C) for idx (B, 1), and every layer's x0_lambda * x (n_layer, B, C) in one kernel (x is x0 here)."""
        x = norm(F.embedding(idx[:, 0], self.wte).to(self.dtype))
        return x, self.x0.view(-1, 1, 1) * x

    def logits(self, x):
        """The final norm, lm_head and softcap: fp32 logits (B, vocab) for the last layer's x (B, C)."""
        logits = self.lm_head(norm(x))[:, :self.config.vocab_size].float()
        return softcap(logits, self.config.softcap)

    def _attention(self, i, layer, x, idx, cos, sin, cache, visible):
        """The attention's output before its projection, (B, H * D), for the normed input x (B, C). visible: the
        mask (bias) of the slots each row sees, or the slice of them all rows share (step's `at`)."""
        c = self.config
        B, H, Hkv, D = x.size(0), c.n_head, c.n_kv_head, c.head_dim
        qkv = layer.qkv(x)
        qk = qkv[:, :(H + Hkv) * D].view(B, 1, H + Hkv, D)  # q and k side by side: one rotary and one norm for both
        v = qkv[:, (H + Hkv) * D:].view(B, 1, Hkv, D)
        if layer.ve is not None:
            gate = torch.sigmoid(F.linear(x[:, :self.gate_channels], layer.ve_gate)).view(B, 1, Hkv, 1)
            v = torch.addcmul(v, gate, F.embedding(idx, layer.ve).to(self.dtype).view(B, 1, Hkv, D), value=2.0)
        half = D // 2
        qk = norm(torch.addcmul(qk * cos, torch.cat([qk[..., half:], qk[..., :half]], -1), sin))
        q, k = qk[:, :, :H], qk[:, :, H:]
        if isinstance(visible, slice):  # one op over exactly the visible slots (SDPA: 12 us vs 20 at d2 batch 1)
            k_all, v_all = cache.write_at(i, k[:, 0], v[:, 0], visible.stop - 1)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k_all[:, :, visible], v_all[:, :, visible],
                                               enable_gqa=H != Hkv)
        else:
            k_all, v_all = cache.write(i, k.transpose(1, 2), v.transpose(1, 2))
            y = decode_attention(q.transpose(1, 2), k_all, v_all, visible)
        return y.reshape(B, H * D)
