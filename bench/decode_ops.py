"""
Ops per decode step, counted on the CPU: the kernel budget of GPU decoding, without a GPU.

    python bench/decode_ops.py                 # d20 shapes (vocab cut to 512: the count does not depend on it)
    python bench/decode_ops.py --depth 4 --top 5

On the H100 a batch-1 d20 decode step in a CUDA graph is bound by the number of kernels it launches, ~2 us each
(bench/RESULTS.md run 2: 929 kernels, 2.15 ms of GPU time per step), not by the bytes it reads. Each aten op that is
not a view is about one CUDA kernel, so this count predicts that term: it runs one step of each path under a
TorchDispatchMode that counts ops. F.rms_norm counts as one op, as CUDA runs it (aten::_fused_rms_norm); the CPU
decomposes it. Rows: the static step (DecodeWeights.step: the graph and compile paths, before inductor's fusion),
the fused step (nanochat.fused_decode: its Triton kernels are counted as launched, one each, not run: on the CPU they
need Triton's interpreter), at one row with its GEMV kernel and with cuBLAS (the path of 2+ rows), and the eager step
(GPT.forward with a KVCache, one token).
"""

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nanochat.fused_decode as fused_module  # noqa: E402
import nanochat.gpt as gpt_module  # noqa: E402
from nanochat.gpt import GPT, GPTConfig, DecodeWeights  # noqa: E402
from nanochat.kv_cache import StaticKVCache  # noqa: E402

# ops that return views (no kernel on a GPU)
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "slice", "split", "split_with_sizes",
            "select", "expand", "as_strided", "detach", "alias", "permute", "reshape", "_reshape_alias", "unbind",
            "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops run inside it; `opaque` hides the ops of one call that CUDA runs as one kernel."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.hidden = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEW_OPS and not self.hidden:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    def opaque(self, name, fn, *args):
        self.counts[name] += 1
        self.hidden = True
        try:
            return fn(*args)
        finally:
            self.hidden = False


def count(fn, counter_box):
    """Ops of one call of fn (after one call outside the counter, so lazy setup is not counted)."""
    fn()
    counter = OpCounter()
    counter_box[0] = counter
    try:
        with counter:
            fn()
    finally:
        counter_box[0] = None
    return counter.counts


def measure(depth, prompt=64, max_len=256, vocab=512, head_dim=128, window="SSSL"):
    """{path: Counter of ops} for one batch-1 decode step of a depth-`depth` GPT in bf16."""
    config = GPTConfig.from_depth(depth, vocab, max_len, head_dim=head_dim, window_pattern=window)
    model = GPT.create(config, "cpu", dtype=torch.bfloat16)
    box = [None]
    plain_norm = gpt_module.norm

    def one_kernel_norm(x):
        return plain_norm(x) if box[0] is None else box[0].opaque("rms_norm", plain_norm, x)

    def attend_launches(x, qkv, ids, k, v, pos, cos, sin, window, config, ve=None, gate=None, arrivals=None):
        out = lambda: torch.zeros(x.size(0), config.n_head * config.head_dim, dtype=x.dtype)  # noqa: E731
        if box[0] is None:
            return out()
        box[0].counts["triton prepare"] += 1
        if fused_module.COMBINE != "last" or arrivals is None:  # else the attention's last programs combine
            box[0].counts["triton combine"] += 1
        return box[0].opaque("triton attend", out)

    def relu2_launch(h, x):
        return h if box[0] is None else box[0].opaque("triton relu2", lambda: h)

    def gemv_launch(x, w, add=None, mix=None, norm=False, relu2=False, cap=None, n=None, out_dtype=None, blocks=None):
        out = lambda: torch.zeros(1, n or w.size(1), dtype=out_dtype or x.dtype)  # noqa: E731
        return out() if box[0] is None else box[0].opaque("triton gemv", out)

    def embed_launch(weights, idx, mix_first=False):
        B, C, L = idx.size(0), weights.config.n_embd, len(weights.layers)
        out = lambda: (torch.zeros(B, C, dtype=weights.dtype), torch.zeros(L, B, C, dtype=weights.dtype))  # noqa: E731
        return out() if box[0] is None else box[0].opaque("triton embed", out)

    plain = fused_module.attend, fused_module.relu2_normed, fused_module.gemv, fused_module.embed, fused_module.GEMV
    gpt_module.norm = one_kernel_norm
    fused_module.attend, fused_module.relu2_normed, fused_module.gemv, fused_module.embed = \
        attend_launches, relu2_launch, gemv_launch, embed_launch
    try:
        with torch.no_grad():
            tokens = torch.randint(0, vocab, (1, prompt))
            weights = DecodeWeights(model)
            cache = StaticKVCache(1, config.n_kv_head, config.head_dim, config.n_layer, max_len, dtype=weights.dtype)
            model(tokens, kv_cache=cache.prefill_cache())
            cache.start(prompt)
            cos, sin = model.rotary_tables(max_len)
            next_token = tokens[:, -1:]
            static = count(lambda: weights.step(next_token, cache, cos, sin), box)
            fused_module.GEMV = "triton"
            fused = count(lambda: fused_module.fused_step(weights, next_token, cache, cos, sin), box)
            fused_module.GEMV = "cublas"
            fused_cublas = count(lambda: fused_module.fused_step(weights, next_token, cache, cos, sin), box)
            kv = model.new_kv_cache(1, max_len)
            model(tokens, kv_cache=kv)
            eager = count(lambda: model(next_token, kv_cache=kv), box)
    finally:
        gpt_module.norm = plain_norm
        fused_module.attend, fused_module.relu2_normed, fused_module.gemv, fused_module.embed, fused_module.GEMV = plain
    return {"static step (graph, compile)": static, "fused step (Triton kernels, GEMVs included)": fused,
            "fused step, cuBLAS GEMVs (2+ rows' path)": fused_cublas, "eager step (GPT.forward + KVCache)": eager}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="model depth (default 20, the GPU benchmark's decode model)")
    p.add_argument("--top", type=int, default=8, help="most frequent ops listed per path (default 8)")
    args = p.parse_args()
    results = measure(args.depth)
    print(f"| path | ops per step | per layer (d{args.depth}) | most frequent |")
    print("|---|---|---|---|")
    for path, counts in results.items():
        total = sum(counts.values())
        top = ", ".join(f"{name} {n}" for name, n in counts.most_common(args.top))
        print(f"| {path} | {total} | {total / args.depth:.1f} | {top} |")


if __name__ == "__main__":
    main()
