"""Score a HuggingFace GPT-2 checkpoint from local files, so reference CORE numbers can be reproduced.

    model, tokenizer = load_hf_gpt2("/models/gpt2", device="cuda")
    evaluate_core(model, tokenizer, store, device)            # the same protocol as for our models
    python -m nanochat.hf_gpt2 --path /models/gpt2 --store URI [--max-per-task N]   (torchrun-able)

A folder as the Hub ships it: config.json + model.safetensors (GPT2Model or GPT2LMHeadModel keys,
lm_head tied to wte), and tokenizer.json or vocab.json + merges.txt. Nothing is downloaded.
The module keeps HF's parameter names and Conv1D layout (weights stored in x out), so the file loads as is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.tokenizer import HuggingFaceTokenizer

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's own
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers saved by old transformers


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_json(cls, d: dict):
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})
        if cfg.activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {cfg.activation_function!r}; known: {', '.join(ACTIVATIONS)}")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        return cfg


class Conv1D(nn.Module):
    """HF's linear layer with the weight stored (in, out)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Conv1D(cfg.n_embd, inner)
        self.c_proj = Conv1D(inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 with our model interface: model(idx) -> fp32 logits (B, T, vocab)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.max_seq_len = cfg.n_positions  # learned positions: core_eval crops prompts to this
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        B, T = idx.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds GPT-2's {self.max_seq_len} positions")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = (self.ln_f(x) @ self.wte.weight.t()).float()  # lm_head is tied to wte
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    raw = load_file(str(path))
    out = {}
    for k, v in raw.items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight" or k.endswith(IGNORED_SUFFIXES):
            continue
        out[k] = v
    return out


def load_gpt2_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> GPT2:
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: a local GPT-2 folder needs config.json and model.safetensors")
    cfg = GPT2Config.from_json(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = GPT2(cfg)
    state = _state_dict_from(path / "model.safetensors")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


class GPT2Tokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE behind our tokenizer interface; <|endoftext|> plays BOS."""

    bos_token = "<|endoftext|>"


def load_gpt2_tokenizer(path: str | os.PathLike) -> GPT2Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = Tokenizer(BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(GPT2Tokenizer.bos_token) is not None:
            tok.add_special_tokens([AddedToken(GPT2Tokenizer.bos_token, special=True)])
    else:
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json, or vocab.json + merges.txt")
    tok.post_processor = None
    return GPT2Tokenizer(tok)


def load_hf_gpt2(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local GPT-2 folder."""
    return load_gpt2_model(path, device, dtype), load_gpt2_tokenizer(path)


def main(argv=None):
    """CORE of a local GPT-2 checkpoint over the eval bundle in a store (torchrun splits the examples)."""
    import argparse
    from nanochat import common
    from nanochat.core_eval import evaluate_core
    from nanochat.store import open_store
    parser = argparse.ArgumentParser(prog="python -m nanochat.hf_gpt2", description=__doc__.split("\n")[0])
    parser.add_argument("--path", required=True, help="local folder: config.json, model.safetensors, tokenizer.json or vocab.json+merges.txt")
    parser.add_argument("--store", default=None, help="store holding data/eval_bundle (fetch: nanochat stage eval_bundle)")
    parser.add_argument("--max-per-task", type=int, default=-1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    common.setup_logging()
    device = common.autodetect_device(args.device)
    rank, local_rank, _ = common.init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    try:
        model, tokenizer = load_hf_gpt2(args.path, device, getattr(torch, args.dtype))
        out = evaluate_core(model, tokenizer, open_store(args.store), device, max_per_task=args.max_per_task)
        if rank == 0:
            for label, r in out["tasks"].items():
                print(f"{label:40s} accuracy {r['accuracy']:.4f}  centered {r['centered']:+.4f}")
            print(f"CORE {out['core']:.4f}")
    finally:
        common.cleanup_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
