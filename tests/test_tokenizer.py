"""nanochat.tokenizer: tiktoken runtime over rustbpe ranks, the HuggingFace backend, chat
rendering with loss masks, save/load through file:// and S3 stores."""

import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.store import ObjectNotFound, open_store
from nanochat.tokenizer import (SPECIAL_TOKENS, TOKEN_BYTES_KEY, TOKENIZER_KEY, HuggingFaceTokenizer, Tokenizer,
                                get_token_bytes, get_tokenizer, train_tokenizer)
from tests.test_rustbpe import MIXED

CORPUS = MIXED * 3 + ["What is 12*7? Let me compute. The answer is 84. Hello there, how are you?"] * 20
VOCAB = 700


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(CORPUS), VOCAB)


@pytest.fixture(scope="module")
def hf_tok():
    return train_tokenizer(iter(CORPUS), VOCAB, backend="huggingface")


@pytest.fixture(params=["rustbpe", "huggingface"])
def any_tok(request, tok, hf_tok):
    return tok if request.param == "rustbpe" else hf_tok


# ----------------------------------------------------------------------------- basics


def test_vocab_layout(any_tok):
    assert any_tok.get_vocab_size() == VOCAB
    assert any_tok.get_special_tokens() == SPECIAL_TOKENS
    ids = [any_tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == 9 and all(0 <= i < VOCAB for i in ids)
    assert any_tok.get_bos_token_id() == any_tok.encode_special("<|bos|>")
    with pytest.raises(ValueError, match="unknown special token"):
        any_tok.encode_special("<|nope|>")


def test_rustbpe_tokenizer_puts_specials_last(tok):
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.id_to_bytes(65) == b"A"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120))
def test_round_trip_any_text(tok, hf_tok, text):
    for t in (tok, hf_tok):
        ids = t.encode(text)
        assert t.decode(ids) == text
        assert t.decode_bytes(ids) == text.encode("utf-8")


def test_special_tokens_never_come_from_plain_text(any_tok):
    text = "<|bos|>hi<|user_start|> <|assistant_end|>"
    ids = any_tok.encode(text)
    specials = {any_tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert any_tok.decode(ids) == text


def test_prepend_append_and_batch(any_tok):
    bos, end = any_tok.get_bos_token_id(), any_tok.encode_special("<|assistant_end|>")
    plain = any_tok.encode("hello world")
    assert any_tok.encode("hello world", prepend="<|bos|>") == [bos] + plain
    assert any_tok.encode("hello world", prepend=bos, append="<|assistant_end|>") == [bos] + plain + [end]
    texts = ["hello world", "", "日本 😀", "12345"]
    batch = any_tok.encode(texts, prepend="<|bos|>", append=end, num_threads=2)
    assert batch == [[bos] + any_tok.encode(t) + [end] for t in texts]
    with pytest.raises(TypeError):
        any_tok.encode(42)


def test_id_to_token_and_token_bytes(any_tok):
    tb = any_tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (VOCAB,)
    for s in SPECIAL_TOKENS:
        assert tb[any_tok.encode_special(s)] == 0
    text = "The quick brown fox, l'été 日本語 😀 12345"
    ids = any_tok.encode(text)
    assert int(tb[ids].sum()) == len(text.encode("utf-8"))  # bits-per-byte needs this exact
    assert "".join(any_tok.id_to_token(i) for i in any_tok.encode("hello world")) == "hello world"
    assert any_tok.id_to_token(any_tok.get_bos_token_id()) == "<|bos|>"


def test_compresses_training_text(tok):
    text = "".join(CORPUS)
    assert len(text.encode()) / len(tok.encode(text)) > 2.5  # vs 1.0 for raw bytes


def test_vocab_too_small_is_an_error():
    for backend in ("rustbpe", "huggingface"):
        with pytest.raises(ValueError, match="at least 265"):
            train_tokenizer(iter(CORPUS), 264, backend=backend)
    with pytest.raises(ValueError, match="unknown tokenizer backend"):
        train_tokenizer(iter(CORPUS), 300, backend="sentencepiece")


def test_rustbpe_and_tiktoken_agree(tok):
    import rustbpe

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(CORPUS), VOCAB - 9)
    for text in CORPUS[:8] + ["unseen: Zürich 987654 😀😀 ___"]:
        assert bpe.encode(text) == tok.encode(text)


# ----------------------------------------------------------------------------- save / load


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    return open_store(request.getfixturevalue("s3_uri"))


def test_save_load_round_trip(any_tok, store):
    any_tok.save(store)
    assert store.exists(TOKENIZER_KEY) and store.exists(TOKEN_BYTES_KEY)
    loaded = get_tokenizer(store)
    assert type(loaded) is type(any_tok)
    assert type(any_tok).load(store).get_vocab_size() == VOCAB
    text = "Round trip: l'été 日本語 😀 <|bos|> 12345\n\n  end"
    assert loaded.encode(text) == any_tok.encode(text)
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [any_tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert torch.equal(get_token_bytes(store), any_tok.token_bytes())
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert loaded.render_conversation(conv) == any_tok.render_conversation(conv)


def test_saved_file_is_plain_json(tok, tmp_path):
    store = open_store(f"file://{tmp_path}")
    tok.save(store)
    data = json.loads(store.get_bytes(TOKENIZER_KEY))
    assert data["format"] == "nanochat-bpe" and data["pattern"] == tok.pattern
    assert len(data["mergeable_ranks"]) == VOCAB - 9
    assert data["special_tokens"]["<|bos|>"] == VOCAB - 9
    get_tokenizer(f"file://{tmp_path}")  # a URI works as well as a Store


def test_load_errors(tmp_path, tok):
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(ObjectNotFound, match="tokenizer/tokenizer.json.*tok_train"):
        get_tokenizer(store)
    store.put_bytes(TOKENIZER_KEY, json.dumps({"format": "something-else"}).encode())
    with pytest.raises(ValueError, match="not a tokenizer file"):
        get_tokenizer(store)
    bad = tok.to_json()
    ranks = bad["mergeable_ranks"]
    ranks[0], ranks[1] = ranks[1], ranks[0]  # bytes 0 and 1 swapped
    store.put_bytes(TOKENIZER_KEY, json.dumps(bad).encode())
    with pytest.raises(ValueError, match="single bytes"):
        get_tokenizer(store)
    bad = tok.to_json()
    bad["mergeable_ranks"] = bad["mergeable_ranks"][:-1]  # one token lost: specials misplaced
    store.put_bytes(TOKENIZER_KEY, json.dumps(bad).encode())
    with pytest.raises(ValueError, match="special token ids must follow"):
        get_tokenizer(store)


# ----------------------------------------------------------------------------- chat rendering

CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "The answer is 84."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def expected_render(t):
    s, e = t.encode_special, t.encode
    parts = [
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")] + e("Be brief.\n\nWhat is 12*7?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Let me compute. "), 1),
        ([s("<|python_start|>")] + e("12*7") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + e("84") + [s("<|output_end|>")], 0),
        (e("The answer is 84."), 1),
        ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + e("Thanks!") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("You're welcome.") + [s("<|assistant_end|>")], 1),
    ]
    ids = [i for toks, _ in parts for i in toks]
    mask = [m for toks, m in parts for _ in toks]
    return ids, mask


def test_render_conversation_ids_and_mask(any_tok):
    ids, mask = any_tok.render_conversation(CONV)
    assert (ids, mask) == expected_render(any_tok)
    assert CONV["messages"][0]["role"] == "system"  # the input is not mutated
    trained = any_tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("Let me compute. <|python_start|>12*7<|python_end|>The answer is 84.<|assistant_end|>"
                       "You're welcome.<|assistant_end|>")


def test_system_message_is_merged_into_first_user_turn(any_tok):
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nWhat is 12*7?"}] + CONV["messages"][2:]}
    assert any_tok.render_conversation(CONV) == any_tok.render_conversation(merged)


def test_render_truncates(any_tok):
    ids, mask = any_tok.render_conversation(CONV)
    short_ids, short_mask = any_tok.render_conversation(CONV, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "hi"}], "should be from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "should be from 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown part type"),
    ([{"role": "user", "content": ["not", "a string"]}], "user content must be a string"),
    ([], "no messages"),
])
def test_render_errors(any_tok, messages, error):
    with pytest.raises(ValueError, match=error):
        any_tok.render_conversation({"messages": messages})


def test_render_for_completion(any_tok):
    ids = any_tok.render_for_completion(CONV)
    without_last = {"messages": CONV["messages"][:-1]}
    full, _ = any_tok.render_conversation(without_last, max_tokens=10**6)
    assert ids == full + [any_tok.encode_special("<|assistant_start|>")]
    assert len(CONV["messages"]) == 5  # not mutated
    # a conversation ending with the user's turn is prompted as is
    assert any_tok.render_for_completion(without_last) == ids
    # never truncated: a long prompt keeps its end
    long = {"messages": [{"role": "user", "content": "word " * 3000}]}
    assert any_tok.render_for_completion(long)[-2:] == [any_tok.encode_special("<|user_end|>"),
                                                          any_tok.encode_special("<|assistant_start|>")]


def test_hf_tokenizer_is_the_hf_class(hf_tok):
    assert isinstance(hf_tok, HuggingFaceTokenizer)
    ranks = hf_tok.mergeable_ranks()
    assert len(ranks) == VOCAB - 9 and all(len(bytes([b])) == 1 for b in range(256))
    assert {bytes([b]) for b in range(256)} <= set(ranks)


def test_from_tiktoken_wraps_an_encoding(tok):
    import tiktoken

    enc = tiktoken.Encoding("tiny", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                            special_tokens={"<|endoftext|>": VOCAB - 9})
    wrapped = Tokenizer.from_tiktoken(enc)
    assert wrapped.get_bos_token_id() == VOCAB - 9
    assert wrapped.encode("hello", prepend="<|endoftext|>") == [VOCAB - 9] + tok.encode("hello")


def test_unbuilt_rustbpe_is_a_clear_error(monkeypatch):
    """From the repo root without the extension, `import rustbpe` finds the Rust source folder (an empty namespace package)."""
    import types
    monkeypatch.setitem(sys.modules, "rustbpe", types.ModuleType("rustbpe"))
    with pytest.raises(ModuleNotFoundError, match="rustbpe .* is not built"):
        train_tokenizer(iter(["hello world"] * 10), 300)
