"""GPT-4 style byte-level BPE tokenizer: trained by our Rust `rustbpe`, run by tiktoken.

Also: chat rendering (token ids + loss mask), save/load through the store as JSON, and a
HuggingFace `tokenizers` backend behind the same interface for users who want it.

    tok = train_tokenizer(texts, vocab_size=32768)      # rustbpe -> tiktoken
    tok.save(store)                                     # tokenizer/tokenizer.json + token_bytes.pt
    tok = get_tokenizer(store)
    ids, mask = tok.render_conversation(conversation)   # mask 1 = trained on
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from functools import lru_cache

from nanochat.store import CorruptObject

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; it delimits documents
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls a tool (nanochat.tools: calculator, choice)
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced back into the stream
]
BOS = "<|bos|>"

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3}: fewer vocab slots spent on numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# tiktoken's regex gives up (a Rust panic, uncatchable as Exception) on a whitespace run of ~1M characters: runs
# longer than this are cut into pieces of this many characters before encoding (ordinary text is never cut).
MAX_WHITESPACE_RUN = 100_000
_WHITESPACE_RUN = re.compile(r"\s+")

TOKENIZER_KEY = "tokenizer/tokenizer.json"
TOKEN_BYTES_KEY = "tokenizer/token_bytes.pt"
FORMAT = "nanochat-bpe"


def _as_store(store):
    if isinstance(store, str):
        from nanochat.store import open_store

        return open_store(store)
    return store


class _TokenizerBase:
    """Everything that only needs the primitives: encode/decode of plain text and special ids."""

    bos_token = BOS

    # --- primitives, per backend
    def _encode_one(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return [self._encode_one(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def id_to_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def encode_special(self, name: str) -> int:
        raise NotImplementedError

    def get_vocab_size(self) -> int:
        raise NotImplementedError

    def get_special_tokens(self) -> list[str]:
        raise NotImplementedError

    # --- shared
    def get_bos_token_id(self) -> int:
        return self.encode_special(self.bos_token)

    def _special_id(self, token):
        if token is None or isinstance(token, int):
            return token
        return self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Plain text -> ids (special-token text such as "<|bos|>" is encoded as ordinary text).
        `text`: str or list of str; `prepend`/`append`: a token id or a special token's name."""
        pre, post = self._special_id(prepend), self._special_id(append)
        if isinstance(text, str):
            rows, single = [self._encode_one(text)], True
        elif isinstance(text, (list, tuple)):
            rows, single = self._encode_batch(list(text), num_threads), False
        else:
            raise TypeError(f"encode expects str or list of str, got {type(text).__name__}")
        if pre is not None:
            rows = [[pre] + ids for ids in rows]
        if post is not None:
            for ids in rows:
                ids.append(post)
        return rows[0] if single else rows

    __call__ = encode

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.id_to_bytes(i) for i in ids)

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_bytes(self, device="cpu"):
        """LongTensor[vocab]: UTF-8 bytes per token, 0 for special tokens (for bits-per-byte)."""
        import torch

        special = {self.encode_special(s) for s in self.get_special_tokens()}
        lengths = [0 if i in special else len(self.id_to_bytes(i)) for i in range(self.get_vocab_size())]
        return torch.tensor(lengths, dtype=torch.long, device=device)

    # --- chat
    def render_conversation(self, conversation, max_tokens=2048):
        """Conversation -> (ids, mask), both truncated to `max_tokens`.
        mask 1 = trained on: assistant text, python calls and <|assistant_end|>;
        0 = everything else: <|bos|>, user turns, <|assistant_start|>, python outputs."""
        messages = _merge_system(conversation["messages"])
        s = self.encode_special
        ids, mask = [], []

        def add(tokens, trained):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([int(trained)] * len(tokens))

        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} is from {message['role']!r} but should be from {expected!r} "
                                 "(user and assistant must alternate, starting with user)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string")
                add(s("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(s("<|user_end|>"), 0)
                continue
            add(s("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
            for part in parts:
                kind, text_ids = part["type"], self.encode(part["text"])
                if kind == "text":
                    add(text_ids, 1)
                elif kind == "python":  # the tool call: the model must learn to write it
                    add(s("<|python_start|>"), 1)
                    add(text_ids, 1)
                    add(s("<|python_end|>"), 1)
                elif kind == "python_output":  # comes from the tool at inference: never trained
                    add(s("<|output_start|>"), 0)
                    add(text_ids, 0)
                    add(s("<|output_end|>"), 0)
                else:
                    raise ValueError(f"message {i}: unknown part type {kind!r}")
            add(s("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids for the assistant's next turn: drops a final assistant message (the one to be
        generated), then appends <|assistant_start|>. Not truncated."""
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise ValueError("render_for_completion needs at least one user message")
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]


def _merge_system(messages):
    """A leading system message is folded into the first user message (the model has no system role)."""
    if not messages:
        raise ValueError("conversation has no messages")
    if messages[0]["role"] != "system":
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("a system message must be followed by a user message")
    first = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
    return [first] + list(messages[2:])


# ----------------------------------------------------------------------------- rustbpe + tiktoken


def import_rustbpe():
    """The built extension; without it, `import rustbpe` from the repo root finds the Rust source folder rustbpe/
    as an empty namespace package, which would fail later as a puzzling AttributeError."""
    import rustbpe
    if not hasattr(rustbpe, "Tokenizer"):
        raise ModuleNotFoundError("rustbpe (the Rust BPE trainer) is not built: run `make setup`, or "
                                  "`pip install ./rustbpe` (needs cargo); or train with backend='huggingface'", name="rustbpe")
    return rustbpe


class Tokenizer(_TokenizerBase):
    """tiktoken encoding of our BPE ranks plus the special tokens (ids after the BPE tokens)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens=tuple(SPECIAL_TOKENS), bos_token: str = BOS):
        import tiktoken

        _check_ranks(mergeable_ranks)
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        self.special_tokens = {name: n + i for i, name in enumerate(special_tokens)}
        self.bos_token = bos_token
        self.enc = tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self._bytes = _bytes_by_id(self.enc)

    @classmethod
    def train(cls, text_iterator, vocab_size: int, buffer_size: int = 8192, pattern: str = SPLIT_PATTERN):
        """Train with rustbpe; `vocab_size` includes the special tokens."""
        rustbpe = import_rustbpe()
        bpe_vocab = vocab_size - len(SPECIAL_TOKENS)
        if bpe_vocab < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, bpe_vocab, buffer_size=buffer_size, pattern=pattern)
        return cls({bytes(t): r for t, r in bpe.get_mergeable_ranks()}, pattern=bpe.get_pattern())

    @classmethod
    def from_tiktoken(cls, enc, bos_token="<|endoftext|>"):
        """Wrap an existing tiktoken encoding (e.g. a locally cached GPT-2/GPT-4 one, for comparisons)."""
        self = cls.__new__(cls)
        self.enc, self.pattern, self.bos_token = enc, enc._pat_str, bos_token
        self.mergeable_ranks, self.special_tokens = enc._mergeable_ranks, enc._special_tokens
        self._bytes = _bytes_by_id(enc)
        return self

    # --- primitives
    def _encode_one(self, text):
        return [i for piece in bounded_pieces(text) for i in self.enc.encode_ordinary(piece)]

    def _encode_batch(self, texts, num_threads):
        split = [bounded_pieces(t) for t in texts]
        if all(len(p) == 1 for p in split):
            return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        flat = self.enc.encode_ordinary_batch([p for pieces in split for p in pieces], num_threads=num_threads)
        out, i = [], 0
        for pieces in split:
            out.append([t for ids in flat[i:i + len(pieces)] for t in ids])
            i += len(pieces)
        return out

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def id_to_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {list(self.special_tokens)}") from None

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    # --- persistence (JSON, never pickle: loading a pickle from a bucket would run its code)
    def to_json(self) -> dict:
        tokens = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {"format": FORMAT, "version": 1, "pattern": self.pattern, "bos_token": self.bos_token,
                "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t, _ in tokens],
                "special_tokens": self.special_tokens}

    @classmethod
    def from_json(cls, data: dict):
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} tokenizer file (format={data.get('format')!r})")
        ranks = {base64.b64decode(t): i for i, t in enumerate(data["mergeable_ranks"])}
        special = data["special_tokens"]
        if sorted(special.values()) != list(range(len(ranks), len(ranks) + len(special))):
            raise ValueError("special token ids must follow the BPE tokens")
        return cls(ranks, pattern=data["pattern"], special_tokens=sorted(special, key=special.get),
                   bos_token=data.get("bos_token", BOS))

    def save(self, store):
        """Writes tokenizer/tokenizer.json and tokenizer/token_bytes.pt."""
        _save(_as_store(store), json.dumps(self.to_json()).encode(), self.token_bytes())

    @classmethod
    def load(cls, store):
        return get_tokenizer(store)


RustBPETokenizer = Tokenizer  # nanochat's name for it


def bounded_pieces(text: str, limit: int = MAX_WHITESPACE_RUN) -> list[str]:
    """`text` cut inside whitespace runs longer than `limit` so that no piece holds a longer run; usually [text]."""
    if len(text) <= limit:
        return [text]
    long_run = re.compile(r"(?<!\s)\s{%d}" % (limit + 1))  # anchored at run starts: linear time (re caches it)
    pieces, start, pos = [], 0, 0
    while m := long_run.search(text, pos):
        end = _WHITESPACE_RUN.match(text, m.start()).end()
        for cut in range(m.start() + limit, end, limit):
            pieces.append(text[start:cut])
            start = cut
        pos = end
    pieces.append(text[start:])
    return pieces


def _bytes_by_id(enc) -> list[bytes]:
    out = [b""] * enc.n_vocab
    for token, rank in enc._mergeable_ranks.items():
        out[rank] = token
    for name, i in enc._special_tokens.items():
        out[i] = name.encode()
    return out


def _check_ranks(ranks: dict[bytes, int]):
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("mergeable ranks must be 0..N-1 without gaps or duplicates")
    if any(ranks.get(bytes([b])) != b for b in range(256)):
        raise ValueError("ranks 0..255 must be the single bytes in byte order")


def _save(store, tokenizer_json: bytes, token_bytes):
    import torch

    buf = io.BytesIO()
    torch.save(token_bytes.cpu(), buf)
    store.put_bytes(TOKEN_BYTES_KEY, buf.getvalue())
    store.put_bytes(TOKENIZER_KEY, tokenizer_json)  # last: its presence means the tokenizer is complete


class DamagedTokenizer(CorruptObject, ValueError):
    """tokenizer.json exists but cannot be used: a StoreError naming the object (and a ValueError, as before)."""


def get_tokenizer(store):
    """Load the tokenizer saved in `store` (a Store or a URI): ours or the HuggingFace one."""
    from nanochat.store import ObjectNotFound

    store = _as_store(store)
    uri = store.uri(TOKENIZER_KEY)
    if not store.exists(TOKENIZER_KEY):
        raise ObjectNotFound(f"no tokenizer at {uri}: run the tok_train stage first")
    raw = store.get_bytes(TOKENIZER_KEY)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") == FORMAT:
            return Tokenizer.from_json(data)
        if "model" in data:  # HuggingFace tokenizers' own JSON
            return HuggingFaceTokenizer.from_json_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - JSON, UTF-8, base64, ranks, missing keys, the HuggingFace loader's own errors
        raise DamagedTokenizer(f"damaged tokenizer {uri}: {_first_line(e)}; re-run the tok_train stage (--force)") from None
    raise DamagedTokenizer(f"{uri} is not a tokenizer file this version can read; re-run the tok_train stage (--force)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def get_token_bytes(store, device="cpu"):
    """The saved LongTensor[vocab] of bytes per token (for bits-per-byte evaluation)."""
    import torch

    data = _as_store(store).get_bytes(TOKEN_BYTES_KEY)
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def train_tokenizer(text_iterator, vocab_size: int, backend: str = "rustbpe", **kwargs):
    """Train a tokenizer of `vocab_size` tokens (special tokens included).
    backend: "rustbpe" (ours, -> tiktoken) or "huggingface" (tokenizers' BPE)."""
    if backend == "rustbpe":
        return Tokenizer.train(text_iterator, vocab_size, **kwargs)
    if backend in ("huggingface", "hf"):
        return HuggingFaceTokenizer.train_from_iterator(text_iterator, vocab_size)
    raise ValueError(f"unknown tokenizer backend {backend!r}: use 'rustbpe' or 'huggingface'")


# ----------------------------------------------------------------------------- HuggingFace backend


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """HF ByteLevel's printable stand-in character -> byte (GPT-2's bytes_to_unicode, inverted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HuggingFaceTokenizer(_TokenizerBase):
    """The same interface over a HuggingFace `tokenizers` BPE (same split pattern, byte-level)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "<|bos|>" in plain text stays plain text
        decoder = _byte_level_decoder()
        special = set(self.get_special_tokens())
        self._bytes = []
        for i in range(tokenizer.get_vocab_size()):
            token = tokenizer.id_to_token(i)
            self._bytes.append(token.encode() if token in special else bytes(decoder[c] for c in token))

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int, pattern: str = SPLIT_PATTERN):
        from tokenizers import Regex, decoders, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE
        from tokenizers.trainers import BpeTrainer

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        tok = HFTokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = None
        trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS)
        tok.train_from_iterator(text_iterator, trainer)
        return cls(tok)

    @classmethod
    def from_json_str(cls, text: str):
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))

    def _encode_one(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts, num_threads):
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def id_to_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def encode_special(self, name: str) -> int:
        token_id = self.tokenizer.token_to_id(name)
        if token_id is None or name not in self.get_special_tokens():
            raise ValueError(f"unknown special token {name!r}")
        return token_id

    def get_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def get_special_tokens(self) -> list[str]:
        added = self.tokenizer.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added)]

    def mergeable_ranks(self) -> dict[bytes, int]:
        """{token bytes: id} of the BPE tokens, e.g. to run this vocabulary with tiktoken."""
        special = {self.encode_special(s) for s in self.get_special_tokens()}
        return {b: i for i, b in enumerate(self._bytes) if i not in special}

    def save(self, store):
        _save(_as_store(store), self.tokenizer.to_str().encode(), self.token_bytes())

    @classmethod
    def load(cls, store):
        tok = get_tokenizer(store)
        if not isinstance(tok, cls):
            raise ValueError("the saved tokenizer is not a HuggingFace one")
        return tok
