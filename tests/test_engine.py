"""The inference engine: KV-cache generation equals naive recomputation, sampling is reproducible
and per-row, the tool-use state machine forces calculator results, streaming decode is UTF-8 safe."""
import contextlib

import pytest
import torch
import torch.nn as nn

from nanochat.engine import Engine, Utf8StreamDecoder, sample_next_token
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.tokenizer import SPECIAL_TOKENS as SPECIALS, Tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only add contention on a 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ByteTokenizer:
    """The tokenizer interface subset the engine uses: one token per byte, specials after 255."""

    def __init__(self):
        self.special_ids = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self.special_names = {i: name for name, i in self.special_ids.items()}

    def get_vocab_size(self):
        return 256 + len(SPECIALS)

    def encode_special(self, name):
        return self.special_ids[name]

    def get_bos_token_id(self):
        return self.special_ids["<|bos|>"]

    def encode(self, text, prepend=None, append=None):
        return list(text.encode("utf-8"))

    def id_to_bytes(self, token_id):
        name = self.special_names.get(token_id)
        return name.encode() if name else bytes([token_id])

    def decode(self, ids):
        return b"".join(self.id_to_bytes(i) for i in ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
SP = TOK.special_ids
BOS, A_END = SP["<|bos|>"], SP["<|assistant_end|>"]
PY_START, PY_END = SP["<|python_start|>"], SP["<|python_end|>"]
OUT_START, OUT_END = SP["<|output_start|>"], SP["<|output_end|>"]
PROMPT = [BOS, SP["<|user_start|>"], *TOK.encode("Hi there"), SP["<|user_end|>"], SP["<|assistant_start|>"]]


def random_gpt(depth=2, seed=0, logit_scale=3.0, sequence_len=64, window_pattern="L"):
    """A small GPT with every weight random (attention and MLP outputs non-zero, unlike at init).

    Byte logits spread with std ~logit_scale, special tokens' logits are 0: greedy never picks one
    and sampling rarely does, so rows do not end by chance."""
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(depth, TOK.get_vocab_size(), sequence_len, head_dim=32, n_kv_head=1,
                                  window_pattern=window_pattern, short_window=8)
    model = GPT.create(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.size(1) ** -0.5)
        model.lm_head.weight.mul_(logit_scale)
        model.lm_head.weight[256:] = 0
    return model.eval()


def run(stream):
    columns, masks = [], []
    for column, mask in stream:
        columns.append(column)
        masks.append(mask)
    return columns, masks


# -----------------------------------------------------------------------------
# engine vs naive, sampling

@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_equals_naive(num_samples):
    engine = Engine(random_gpt(), TOK)
    fast = run(engine.generate(PROMPT, num_samples=num_samples, max_tokens=24, temperature=0.0))
    slow = run(engine.generate_naive(PROMPT, num_samples=num_samples, max_tokens=24, temperature=0.0))
    assert fast == slow
    columns, masks = fast
    assert len(columns) == 24 and all(len(c) == num_samples for c in columns)
    assert all(m == [1] * num_samples for m in masks)
    assert len({tuple(c) for c in columns}) > 3  # a real sequence, not one token repeated
    if num_samples > 1:  # greedy: every row is the same
        assert all(len(set(c)) == 1 for c in columns)


def test_greedy_equals_naive_sliding_window_and_cache_growth(monkeypatch):
    # short windows (8 tokens) on 3 of 4 layers, and a cache that must grow mid-generation
    model = random_gpt(depth=4, window_pattern="SSSL")
    caches = []
    new_kv_cache = model.new_kv_cache

    def small_cache(batch_size, max_len=None):
        caches.append(new_kv_cache(batch_size, max_len=len(PROMPT) + 2))
        return caches[-1]

    engine = Engine(model, TOK, decode="eager")  # GPT.forward's growing KVCache (auto on CPU is the static step)
    slow = run(engine.generate_naive(PROMPT, num_samples=2, max_tokens=40, temperature=0.0))
    monkeypatch.setattr(model, "new_kv_cache", small_cache)
    fast = run(engine.generate(PROMPT, num_samples=2, max_tokens=40, temperature=0.0))
    assert fast == slow
    (cache,) = caches
    assert cache.batch_size == 2 and cache.pos == len(PROMPT) + 39  # the last token is never forwarded
    assert cache.max_len >= cache.pos > len(PROMPT) + 2  # it grew


def test_top_k_and_temperature_match_naive_stream():
    # with the same seed the two paths consume the generator identically
    engine = Engine(random_gpt(), TOK)
    kwargs = dict(num_samples=4, max_tokens=16, temperature=0.7, top_k=5, seed=3)
    assert run(engine.generate(PROMPT, **kwargs))[0] == run(engine.generate_naive(PROMPT, **kwargs))[0]


def test_cache_is_in_the_model_compute_dtype(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    model = random_gpt()
    assert model.compute_dtype == torch.bfloat16
    caches = []
    new_kv_cache = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda *a, **k: caches.append(new_kv_cache(*a, **k)) or caches[-1])
    columns, _ = run(Engine(model, TOK, decode="eager").generate(PROMPT, num_samples=2, max_tokens=5, temperature=0.0))
    assert len(columns) == 5
    assert caches[0].dtype == torch.bfloat16
    static = Engine(model, TOK, decode="static")
    run(static.generate(PROMPT, num_samples=2, max_tokens=5, temperature=0.0))
    assert static._idle[0].cache.k[0].dtype == torch.bfloat16


def test_same_seed_same_samples_different_seed_different_samples():
    engine = Engine(random_gpt(), TOK)
    a = run(engine.generate(PROMPT, num_samples=4, max_tokens=20, temperature=1.0, seed=7))
    b = run(engine.generate(PROMPT, num_samples=4, max_tokens=20, temperature=1.0, seed=7))
    torch.manual_seed(1234)  # the global RNG plays no part
    c = run(engine.generate(PROMPT, num_samples=4, max_tokens=20, temperature=1.0, seed=7))
    d = run(engine.generate(PROMPT, num_samples=4, max_tokens=20, temperature=1.0, seed=8))
    assert a == b == c
    assert a != d


def test_concurrent_requests_are_independent():
    engine = Engine(random_gpt(), TOK)
    alone_1 = run(engine.generate(PROMPT, num_samples=2, max_tokens=12, seed=1))
    alone_2 = run(engine.generate(PROMPT[:-2], num_samples=3, max_tokens=12, seed=2))
    s1 = engine.generate(PROMPT, num_samples=2, max_tokens=12, seed=1)
    s2 = engine.generate(PROMPT[:-2], num_samples=3, max_tokens=12, seed=2)
    interleaved_1, interleaved_2 = [], []
    for x, y in zip(s1, s2):  # step the two requests alternately
        interleaved_1.append(x[0])
        interleaved_2.append(y[0])
    assert interleaved_1 == alone_1[0] and interleaved_2 == alone_2[0]


def test_each_row_samples_its_own_first_token():
    # logit_scale small: the first-token distribution is spread over ~256 bytes
    engine = Engine(random_gpt(logit_scale=0.3), TOK)
    columns, _ = run(engine.generate(PROMPT, num_samples=16, max_tokens=1, temperature=1.0, seed=0))
    assert len(set(columns[0])) >= 8
    # and rows stay different afterwards
    columns, _ = run(engine.generate(PROMPT, num_samples=16, max_tokens=6, temperature=1.0, seed=0))
    rows = list(zip(*columns))
    assert len(set(rows)) == 16


def test_max_tokens_respected():
    engine = Engine(random_gpt(), TOK)
    for max_tokens in (1, 2, 7):
        columns, _ = run(engine.generate(PROMPT, num_samples=2, max_tokens=max_tokens, temperature=1.0))
        assert len(columns) == max_tokens
        seqs, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=max_tokens, temperature=1.0)
        assert [len(s) for s in seqs] == [len(PROMPT) + max_tokens] * 2
        assert [len(m) for m in masks] == [len(PROMPT) + max_tokens] * 2


def test_bad_arguments_fail_at_the_call():
    engine = Engine(random_gpt(), TOK)
    for kwargs in (dict(tokens=[]), dict(tokens=PROMPT, num_samples=0), dict(tokens=PROMPT, temperature=-0.5)):
        with pytest.raises(ValueError):
            engine.generate(**kwargs)  # no next(): the error is raised before the stream starts


def test_sample_next_token_rules():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]
    picks = {tuple(sample_next_token(logits, rng, temperature=5.0, top_k=2)[:, 0].tolist()) for _ in range(200)}
    assert {p[0] for p in picks} == {1, 3}  # only the two largest logits of row 0
    assert {p[1] for p in picks} <= {0, 1, 2, 3} and len({p[1] for p in picks}) == 2  # ties for second
    with pytest.raises(ValueError):
        sample_next_token(logits, rng, temperature=-1.0)


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_follows_the_softmax(top_k):
    probs = torch.tensor([0.05, 0.0, 0.25, 0.7, 0.0])  # zero-probability tokens are never drawn
    logits = probs.clamp_min(1e-30).log().expand(20_000, -1)
    rng = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, rng, temperature=1.0, top_k=top_k)[:, 0]
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.015), freq
    # temperature 2 flattens: p ~ sqrt(p)
    draws = sample_next_token(logits, rng, temperature=2.0, top_k=top_k)[:, 0]
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    flat = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(freq, flat, atol=0.015), freq


def test_top_p_keeps_the_nucleus_at_the_temperature():
    probs = torch.tensor([0.5, 0.05, 0.3, 0.15])
    logits = probs.log().expand(20_000, -1)
    rng = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, rng, temperature=1.0, top_p=0.8)[:, 0]  # 0.5 + 0.3 reach 0.8: tokens 0 and 2
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[1] == 0 and freq[3] == 0
    assert torch.allclose(freq[[0, 2]], torch.tensor([0.5, 0.3]) / 0.8, atol=0.015), freq
    # at temperature 4 the distribution flattens, so the nucleus needs three tokens to reach 0.8
    assert set(sample_next_token(logits, rng, temperature=4.0, top_p=0.8)[:, 0].tolist()) == {0, 2, 3}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=1e-6)[:, 0].tolist()) == {0}  # the argmax stays
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=0.8, top_k=1)[:, 0].tolist()) == {0}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            sample_next_token(logits, rng, top_p=bad)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generate_with_top_p(decode):
    """top_p reaches the sampler on every decode path: a tiny nucleus is greedy decoding."""
    engine = Engine(random_gpt(), TOK, decode=decode)
    greedy, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=12, temperature=0.0)
    nucleus, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus == greedy
    with pytest.raises(ValueError):
        engine.generate(PROMPT, top_p=0)


# -----------------------------------------------------------------------------
# tool use, with a scripted model

class ScriptedModel(nn.Module):
    """Writes scripts[row] one token per step, then <|assistant_end|> forever.

    It pauses while the engine forces a tool output into the row: tokens between <|output_start|>
    and <|output_end|> do not advance the script. Its logits put all mass on the scripted token, so
    every temperature samples it. Works with and without a KV cache, like the real model. The first
    token comes from the batch-1 prefill, so all scripts of one request share their first token."""

    def __init__(self, scripts, prompt_len, tokenizer=TOK):
        super().__init__()
        self.scripts, self.prompt_len = scripts, prompt_len
        self.vocab_size = tokenizer.get_vocab_size()
        sp = tokenizer.encode_special
        self.a_end, self.out_start, self.out_end = sp("<|assistant_end|>"), sp("<|output_start|>"), sp("<|output_end|>")
        self.anchor = nn.Parameter(torch.zeros(1))  # for get_device()
        self.rows = None

    def get_device(self):
        return self.anchor.device

    def new_kv_cache(self, batch_size, max_len=None):
        return KVCache(batch_size, 1, 1, 1, max_len or 16, device=self.get_device())

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        if kv_cache is None or kv_cache.pos == 0:  # full sequence, or a prefill
            self.rows = idx.tolist()
        else:
            if len(self.rows) != B:  # the prefill was replicated into B rows
                self.rows = [list(self.rows[0]) for _ in range(B)]
            for row, token in zip(self.rows, idx[:, -1].tolist()):
                row.append(token)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = torch.full((B, T, self.vocab_size), -50.0)
        for b, row in enumerate(self.rows):
            script = self.scripts[b % len(self.scripts)]
            n = len(self._without_tool_outputs(row[self.prompt_len:]))
            logits[b, -1, script[n] if n < len(script) else self.a_end] = 50.0
        return logits

    def _without_tool_outputs(self, tokens):
        out, inside = [], False
        for t in tokens:
            if t == self.out_start:
                inside = True
            elif t == self.out_end:
                inside = False
            elif not inside:
                out.append(t)
        return out


def text(s):
    return TOK.encode(s)


def scripted_engine(*scripts):
    return Engine(ScriptedModel(list(scripts), len(PROMPT)), TOK)


def test_tool_call_result_is_forced_with_mask_zero():
    script = [*text("So "), PY_START, *text("12*7"), PY_END, *text(" done.")]
    engine = scripted_engine(script)
    (seq,), (mask,) = engine.generate_batch(PROMPT, num_samples=1, max_tokens=100, temperature=1.0)
    generated, gen_mask = seq[len(PROMPT):], mask[len(PROMPT):]
    forced = [OUT_START, *text("84"), OUT_END]
    expected = [*text("So "), PY_START, *text("12*7"), PY_END, *forced, *text(" done.")]
    assert generated == expected
    i = expected.index(OUT_START)
    assert gen_mask == [1] * i + [0] * len(forced) + [1] * (len(expected) - i - len(forced))
    assert mask[:len(PROMPT)] == [0] * len(PROMPT)


def test_tool_errors_are_shown_to_the_model():
    engine = scripted_engine([PY_START, *text("1/0"), PY_END, *text("!")])
    (seq,), _ = engine.generate_batch(PROMPT, max_tokens=100)
    assert TOK.decode(seq[len(PROMPT):]) == (
        "<|python_start|>1/0<|python_end|><|output_start|>error: division by zero<|output_end|>!")
    engine = scripted_engine([PY_START, *text("__import__('os')"), PY_END])
    (seq,), _ = engine.generate_batch(PROMPT, max_tokens=100)
    assert "<|output_start|>error: unsupported syntax<|output_end|>" in TOK.decode(seq)


def test_two_tool_calls_in_one_answer_and_count():
    script = [PY_START, *text("3+4"), PY_END, *text(", "), PY_START, *text("'strawberry'.count('r')"), PY_END]
    engine = scripted_engine(script)
    (seq,), (mask,) = engine.generate_batch(PROMPT, max_tokens=200)
    out = TOK.decode(seq[len(PROMPT):])
    assert out == ("<|python_start|>3+4<|python_end|><|output_start|>7<|output_end|>, "
                   "<|python_start|>'strawberry'.count('r')<|python_end|><|output_start|>3<|output_end|>")
    assert mask.count(0) - len(PROMPT) == 2 + 1 + 2 + 1  # two forced blocks: start, result, end


def test_choice_reads_the_options_of_the_request_prompt():
    question = "Multiple Choice question: Which is a fruit?\n- chair=A\n- pear=B\n- 20=C\n- 7=D\n"
    prompt = [BOS, SP["<|user_start|>"], *TOK.encode(question), SP["<|user_end|>"], SP["<|assistant_start|>"]]
    script = [PY_START, *text("choice('pear')"), PY_END, PY_START, *text("choice(13 + 7)"), PY_END,
              PY_START, *text("choice('plum')"), PY_END]
    seqs, _ = Engine(ScriptedModel([script], len(prompt)), TOK).generate_batch(prompt, num_samples=2, max_tokens=200)
    for seq in seqs:  # every row reads the same prompt
        assert TOK.decode(seq[len(prompt):]) == (
            "<|python_start|>choice('pear')<|python_end|><|output_start|>B<|output_end|>"
            "<|python_start|>choice(13 + 7)<|python_end|><|output_start|>C<|output_end|>"
            "<|python_start|>choice('plum')<|python_end|><|output_start|>error: no option 'plum'<|output_end|>")
    (seq,), _ = scripted_engine(script).generate_batch(PROMPT, max_tokens=200)  # a prompt without options
    assert "<|output_start|>error: no options to choose from<|output_end|>" in TOK.decode(seq)


def test_nested_and_stray_markers():
    # a second <|python_start|> restarts the expression; a stray <|python_end|> is ignored
    script = [PY_END, PY_START, *text("9"), PY_START, *text("2+3"), PY_END]
    engine = scripted_engine(script)
    (seq,), (mask,) = engine.generate_batch(PROMPT, max_tokens=50)
    assert seq[len(PROMPT):] == [*script, OUT_START, *text("5"), OUT_END]
    assert mask[len(PROMPT):] == [1] * len(script) + [0, 0, 0]


def test_unclosed_block_ends_at_max_tokens_or_assistant_end():
    engine = scripted_engine([PY_START, *text("1+2+3+4")])
    columns, masks = run(engine.generate(PROMPT, max_tokens=5))
    assert [c[0] for c in columns] == [PY_START, *text("1+2+")] and all(m == [1] for m in masks)
    (seq,), _ = engine.generate_batch(PROMPT, max_tokens=100)  # script ends: <|assistant_end|> inside the block
    assert seq[len(PROMPT):] == [PY_START, *text("1+2+3+4")]


def test_rows_run_their_own_state_machines_and_finish_independently():
    with_tool = [*text("h"), PY_START, *text("6*7"), PY_END, *text("ok")]
    short = text("hi")
    engine = scripted_engine(with_tool, short)
    columns, masks = run(engine.generate(PROMPT, num_samples=2, max_tokens=100))
    # row 1 ends after 3 steps, then repeats its terminal token with mask 0 until row 0 ends
    row1 = [c[1] for c in columns]
    assert row1 == [*short, A_END] + [A_END] * (len(columns) - 3)
    assert [m[1] for m in masks] == [1, 1, 1] + [0] * (len(columns) - 3)
    assert columns[-1][0] == A_END  # the stream stops once every row is done
    seqs, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=100)
    assert TOK.decode(seqs[0][len(PROMPT):]) == (
        "h<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>ok")
    assert seqs[1][len(PROMPT):] == short


def test_bos_ends_a_row():
    engine = scripted_engine([*text("ab"), BOS, *text("cd")])
    (seq,), _ = engine.generate_batch(PROMPT, max_tokens=100)
    assert seq[len(PROMPT):] == text("ab")


def test_scripted_tool_use_same_with_and_without_cache():
    scripts = [[*text("x"), PY_START, *text("2**10"), PY_END], [*text("xy"), PY_START, *text("1/3"), PY_END]]
    fast = run(scripted_engine(*scripts).generate(PROMPT, num_samples=4, max_tokens=60))
    slow = run(scripted_engine(*scripts).generate_naive(PROMPT, num_samples=4, max_tokens=60))
    assert fast == slow
    assert "0.3333" in TOK.decode([c[1] for c in fast[0]])


def test_tool_use_with_the_real_tokenizer():
    tok = Tokenizer.train(iter([CORPUS]), 300)
    sp = tok.encode_special
    prompt = tok.encode("How many r in strawberry?", prepend="<|bos|>", append="<|assistant_start|>")
    script = [*tok.encode("Let me check. "), sp("<|python_start|>"), *tok.encode("'strawberry'.count('r')"),
              sp("<|python_end|>"), *tok.encode(" So 3 😀 世界.")]
    engine = Engine(ScriptedModel([script], len(prompt), tok), tok)
    (seq,), (mask,) = engine.generate_batch(prompt, max_tokens=200, temperature=0.0)
    assert tok.decode(seq[len(prompt):]) == ("Let me check. <|python_start|>'strawberry'.count('r')<|python_end|>"
                                            "<|output_start|>3<|output_end|> So 3 😀 世界.")
    forced = [i for i, m in enumerate(mask) if m == 0 and i >= len(prompt)]
    assert [seq[i] for i in forced] == [sp("<|output_start|>"), *tok.encode("3"), sp("<|output_end|>")]


# -----------------------------------------------------------------------------
# streaming decode

CORPUS = "Hello 😀 world 😃 世界 你好 世界 😀😀 héllo 🎉 日本語 the quick brown fox jumps over the lazy dog " * 50


def test_stream_decoder_with_a_trained_bpe_tokenizer():
    # BPE merges bytes, not characters: tokens start or end inside multi-byte characters
    tok = Tokenizer.train(iter([CORPUS]), 300)
    text_in = "世界 😀 héllo 🎉 日本語 😃"
    ids = tok.encode(text_in)
    assert any(_splits_a_character(tok.id_to_bytes(i)) for i in ids)
    chunks, tail = stream_text(tok, ids)
    assert "".join(chunks) == text_in and tail == ""
    assert all("\ufffd" not in c for c in chunks)


def _splits_a_character(b):
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


class ChunkTokenizer:
    """Tokens are arbitrary byte strings, so one token can hold part of a character."""

    def __init__(self, pieces):
        self.pieces = pieces

    def id_to_bytes(self, token_id):
        return self.pieces[token_id]


def stream_text(tokenizer, ids):
    decoder = Utf8StreamDecoder(tokenizer)
    chunks = [decoder.feed(i) for i in ids]
    return chunks, decoder.flush()


def test_stream_decoder_emits_only_whole_characters():
    text_in = "héllo 😀 世界!"
    ids = list(text_in.encode("utf-8"))  # byte-level: every multi-byte char is split across tokens
    chunks, tail = stream_text(TOK, ids)
    assert "".join(chunks) == text_in and tail == ""
    assert "\ufffd" not in "".join(chunks)
    emoji_start = text_in.encode().index("😀".encode())
    assert chunks[emoji_start:emoji_start + 4] == ["", "", "", "😀"]
    cjk_start = text_in.encode().index("世".encode())
    assert chunks[cjk_start:cjk_start + 3] == ["", "", "世"]


def test_stream_decoder_with_tokens_straddling_characters():
    e, c = "😀".encode(), "世".encode()
    tok = ChunkTokenizer([b"a" + e[:1], e[1:3], e[3:] + c[:2], c[2:] + b"b", b"<|assistant_end|>"])
    chunks, tail = stream_text(tok, [0, 1, 2, 3, 4])
    assert chunks == ["a", "", "😀", "世b", "<|assistant_end|>"] and tail == ""


def test_stream_decoder_invalid_and_truncated_bytes():
    tok = ChunkTokenizer([b"ok", b"\xff", "😀".encode()[:2]])
    chunks, tail = stream_text(tok, [0, 1, 0, 2])
    assert chunks == ["ok", "\ufffd", "ok", ""]
    assert tail == "\ufffd"  # an incomplete character at the end of the stream


def test_stream_decoder_over_engine_output():
    script = [*"¡Olé! 🎉 ".encode(), PY_START, *text("2*21"), PY_END]
    engine = scripted_engine(script)
    decoder = Utf8StreamDecoder(TOK)
    pieces = [decoder.feed(column[0]) for column, _ in engine.generate(PROMPT, max_tokens=100)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == ("¡Olé! 🎉 <|python_start|>2*21<|python_end|>"
                               "<|output_start|>42<|output_end|><|assistant_end|>")


def test_a_bad_decode_mode_names_where_it_came_from(monkeypatch):
    model = random_gpt()
    monkeypatch.setenv("NANOCHAT_DECODE", "foo")
    with pytest.raises(ValueError, match=r"^NANOCHAT_DECODE='foo': use one of auto, eager"):
        Engine(model, TOK)
    with pytest.raises(ValueError, match=r"^decode='bar': use one of"):
        Engine(model, TOK, decode="bar")


def test_decoding_makes_the_models_gpu_the_current_device(monkeypatch):
    """serve decodes on every GPU from threads whose current device is the first: while a model on cuda:1 decodes,
    cuda:1 is current (CUDA graphs capture and Triton launches there); a CPU model enters no CUDA device."""
    from nanochat import engine as engine_mod
    entered = []

    @contextlib.contextmanager
    def current(device):
        entered.append(str(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", current)

    class OnGPU1(nn.Module):
        def get_device(self):
            return torch.device("cuda", 1)
    with engine_mod.decode_threads(OnGPU1()):
        assert entered == ["cuda:1"]
    with engine_mod.decode_threads(random_gpt()):
        pass
    assert entered == ["cuda:1"]
