"""
KV cache for incremental (autoregressive) inference with nanochat.gpt.GPT.

One tensor per K and V holds every layer: (num_layers, batch, num_kv_heads, max_len, head_dim),
the (B, H, T, D) layout scaled_dot_product_attention consumes directly. The cache keeps every
position (no ring buffer): sliding-window layers mask by position instead, so one cache serves
layers of any window and `replicate()` / growth stay simple copies.

Protocol with the model: each layer calls `k_all, v_all = cache.insert_kv(layer_idx, k, v)` with
its new (B, H_kv, T, D) keys/values and attends over the returned views; after the last layer the
model calls `cache.advance(T)`. `cache.pos` is the number of positions already stored.

StaticKVCache is the fixed-size variant the static decode step (and its CUDA graph) uses: one tensor per layer,
a position per row on the device. Its prompt is prefilled through a KVCache over a row's views (`KVCache.over`).
"""

import torch


def device_index(values, device):
    """A long tensor of `values` on the device, copied without waiting for the GPU (pinned memory, non-blocking): a
    batch that gains or loses a request must not stall the step already queued."""
    index = torch.tensor(list(values), dtype=torch.long, pin_memory=device.type == "cuda")
    return index.to(device, non_blocking=True)


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
        return self.k[0].size(2)

    @property
    def device(self):
        return self.k[0].device

    @property
    def dtype(self):
        return self.k[0].dtype

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
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]  # (B, H, max_len, D): a tensor's slice or a list's entry
        k_all[:, :, self.pos:end] = k
        v_all[:, :, self.pos:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]

    def advance(self, num_tokens):
        self.pos += num_tokens

    def _grow(self, needed):
        # double (at least) so a long generation reallocates O(log n) times
        new_len = max(needed, 2 * self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            B, H, L, D = old[0].shape
            new = old[0].new_zeros((self.num_layers, B, H, new_len, D))
            for i in range(self.num_layers):  # layer by layer: `old` may be a list of per-layer tensors (StaticKVCache)
                new[i, :, :, :L] = old[i]
            setattr(self, name, new)

    def replicate(self, num_samples):
        """Turn a batch-1 cache (one prefilled prompt) into num_samples identical rows, in place."""
        assert self.batch_size == 1, "replicate() expects a batch-1 prefill cache"
        self.k = self.k.expand(-1, num_samples, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, num_samples, -1, -1, -1).contiguous()
        self.batch_size = num_samples
        return self

    @classmethod
    def over(cls, k, v, pos=0):
        """A cache at `pos` over existing per-layer (batch, heads, max_len, head_dim) tensors: lists, or views of a
        StaticKVCache's. Writes go straight into them until the cache grows (into new tensors)."""
        cache = cls.__new__(cls)
        cache.num_layers = len(k)
        cache.batch_size, cache.num_kv_heads, _, cache.head_dim = k[0].shape
        cache.k, cache.v, cache.pos = k, v, pos
        return cache


class StaticKVCache:
    """A fixed-size cache for the static decode step (nanochat.gpt.DecodeWeights.step), which a CUDA graph can capture.

    Nothing changes shape: each row's position is an entry of a device tensor, each step writes a row's K/V at its
    position and attends over all max_len slots through a mask (slots past the position hold stale values and are
    masked out). Rows may stand at different positions (nanochat.batching: one request per row), and a step advances
    only the live rows (`live`, 1 or 0 per row). One tensor per layer, not one for all: torch.compile writes into a
    whole input in place, but copies a tensor whose view is written. A prompt is prefilled by the ordinary forward into
    one row (`prefill_cache(row)`), then copied to the rows that sample from it (`start()`, `place()`).
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, num_layers, max_len, device=None, dtype=torch.float32):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # the slot each row's next token goes to
        self.live = torch.ones(batch_size, dtype=torch.long, device=device)  # what a step adds to each row's position
        self.rows = torch.arange(batch_size, device=device)
        self.slots = torch.arange(max_len, device=device)
        # scratch of the fused step's attention (nanochat.fused_decode): arrivals per (row, kv head), zero between layers
        self.arrivals = torch.zeros(batch_size * num_kv_heads, dtype=torch.int32, device=device)

    @property
    def batch_size(self):
        return self.k[0].size(0)

    @property
    def max_len(self):
        return self.k[0].size(2)

    def prefill_cache(self, row=0):
        """A KVCache over one row at position 0: a batch-1 prefill writes its prompt straight into this cache."""
        return KVCache.over([t[row:row + 1] for t in self.k], [t[row:row + 1] for t in self.v])

    def start(self, num_tokens):
        """After a prefill of num_tokens into row 0: copy them to every row and set every position."""
        self.place(range(self.batch_size), num_tokens)

    def place(self, rows, num_tokens):
        """After a prefill of num_tokens into rows[0]: copy them to the other rows, set the rows' positions to
        num_tokens and make them live."""
        rows = list(rows)
        if len(rows) > 1:
            others = device_index(rows[1:], self.pos.device)
            for t in self.k + self.v:  # one copy per tensor, whatever the number of rows
                t[others, :, :num_tokens] = t[rows[0]:rows[0] + 1, :, :num_tokens]
        index = device_index(rows, self.pos.device)
        self.pos.index_fill_(0, index, num_tokens)
        self.live.index_fill_(0, index, 1)

    def retire(self, rows):
        """Rows nobody reads any more: their position goes back to 0 and stays there (a step may still compute them)."""
        index = device_index(rows, self.pos.device)
        self.pos.index_fill_(0, index, 0)
        self.live.index_fill_(0, index, 0)

    def write(self, layer_idx, k, v):
        """Store one step's (B, H_kv, 1, D) keys/values at each row's position; returns the layer's whole
        (B, H_kv, max_len, D)."""
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]
        k_all[self.rows, :, self.pos] = k[:, :, 0]
        v_all[self.rows, :, self.pos] = v[:, :, 0]
        return k_all, v_all

    def write_at(self, layer_idx, k, v, at):
        """write() when every row is at position `at`, which the host knows: k, v (B, H_kv, D) for the first B rows;
        returns those rows of the layer's (B, H_kv, max_len, D)."""
        B = k.size(0)
        k_all, v_all = self.k[layer_idx][:B], self.v[layer_idx][:B]
        k_all[:, :, at] = k
        v_all[:, :, at] = v
        return k_all, v_all

    def visible(self, window):
        """Boolean (B, max_len) mask of the slots each row's query attends to (window -1 = unlimited)."""
        pos = self.pos[:, None]
        seen = self.slots <= pos
        if window >= 0:
            seen = seen & (pos - self.slots <= window)
        return seen

    def advance(self):
        self.pos.add_(self.live)

    def retreat(self):
        """Undo the last advance(): a step started ahead of the host is taken back and rerun."""
        self.pos.sub_(self.live)

    def window(self, rows, slots):
        """This cache's first `rows` rows and `slots` slots, sharing its storage: an eagerly run step (no CUDA graph)
        computes only the rows in use and attends only the slots they have reached (nanochat.batching)."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.k, view.v = [t[:rows, :, :slots] for t in self.k], [t[:rows, :, :slots] for t in self.v]
        view.pos, view.live, view.rows, view.slots = self.pos[:rows], self.live[:rows], self.rows[:rows], self.slots[:slots]
        view.arrivals = self.arrivals[:rows * self.k[0].size(1)]
        return view

    def to_kv_cache(self):
        """The full cache as an ordinary KVCache at position max_len, for the eager path to go on: its next insert
        grows it into new tensors (a copy), so these buffers are never written through it. Rows at one position only."""
        return KVCache.over(self.k, self.v, pos=self.max_len)
