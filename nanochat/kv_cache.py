"""
KV cache for incremental (autoregressive) inference with nanochat.gpt.GPT.

One tensor per K and V holds every layer: (num_layers, batch, num_kv_heads, max_len, head_dim),
the (B, H, T, D) layout scaled_dot_product_attention consumes directly. The cache keeps every
position (no ring buffer): sliding-window layers mask by position instead, so one cache serves
layers of any window and `replicate()` / growth stay simple copies.

Protocol with the model: each layer calls `k_all, v_all = cache.insert_kv(layer_idx, k, v)` with
its new (B, H_kv, T, D) keys/values and attends over the returned views; after the last layer the
model calls `cache.advance(T)`. `cache.pos` is the number of positions already stored.
"""

import torch


class KVCache:
    def __init__(self, batch_size, num_kv_heads, head_dim, num_layers, max_len, device=None, dtype=torch.float32):
        assert batch_size >= 1 and max_len >= 1
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.pos = 0
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self):
        return self.k.size(3)

    @property
    def device(self):
        return self.k.device

    @property
    def dtype(self):
        return self.k.dtype

    def reset(self):
        # stale entries past pos are never read, so rewinding the position is enough
        self.pos = 0

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        """Store this layer's new keys/values at [pos, pos+T) and return views of [0, pos+T)."""
        B, H, T, D = k.shape
        assert (B, H, D) == (self.batch_size, self.num_kv_heads, self.head_dim), f"kv shape {tuple(k.shape)} does not fit the cache"
        end = self.pos + T
        if end > self.max_len:
            self._grow(end)
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, num_tokens):
        self.pos += num_tokens

    def _grow(self, needed):
        # double (at least) so a long generation reallocates O(log n) times
        new_len = max(needed, 2 * self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (new_len,) + old.shape[4:])
            new[:, :, :, :old.size(3)] = old
            setattr(self, name, new)

    def replicate(self, num_samples):
        """Turn a batch-1 cache (one prefilled prompt) into num_samples identical rows, in place."""
        assert self.batch_size == 1, "replicate() expects a batch-1 prefill cache"
        self.k = self.k.expand(-1, num_samples, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, num_samples, -1, -1, -1).contiguous()
        self.batch_size = num_samples
        return self
