"""rustbpe (our Rust BPE trainer): merges equal the pure-Python reference's, split equals the
regex, tiktoken built from the ranks round-trips text, errors are clear, memory stays bounded."""

import subprocess
import sys
import textwrap

import pytest
import regex
import rustbpe
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import bpe_reference as ref

PATTERN = rustbpe.SPLIT_PATTERN
GPT4_PATTERN = PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")

CORPORA = {
    "english": [
        "It's a truth universally acknowledged, that a single man in possession of a good fortune "
        "must be in want of a wife. They'll say we're right; I'd think you've seen THEY'RE and I'M.",
        "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs. " * 3,
        "Call me Ishmael. Some years ago - never mind how long precisely - having little money...",
    ],
    "unicode": [
        "Voilà l'été à Zürich: naïve café, façade, crème brûlée. Ελληνικά κείμενα. Русский текст тут.",
        "日本語のテキストと中文文本，还有한국어 텍스트。東京は晴れ。東京は雨。",
        "emoji 😀😀😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨ a😀b 😀a 😀😀 combining e\u0301e\u0301 \u00a0nbsp\u3000ideographic",
        "Ελληνικά Русский 日本語 😀 l'été été ÉTÉ",
    ],
    "digits": [
        "1 12 123 1234 12345 123456 3.14159 2024-01-01 10,000,000 0x1F 1e10 ١٢٣٤ ²³ ½ Ⅻ",
        "room 101, floor 12, 99 bottles, 1234567890 and 0987654321; 3rd 21st 42nd",
    ],
    "whitespace": [
        "a  b   c    d\t\te\n\nf\r\n\r\ng   \n   h\t \t i \n\n\n   ",
        "    indented\n        more\n\t\ttabs\n  \n  \n trailing   ",
        "\n\n\n\n  x  \r\r\n\n y",
    ],
    "repeats": [
        "aaaaaaaaaaaaaaaaaaaaaaaaaaa aaaa aaa aa a",
        "abababababababababab abab ab zzzzzzz zz zzzz",
        "!!!!!!! ????? ...... ------ ====== ++++",
        "lololololol lolol lol ohohohoh",
    ],
    "code": [
        textwrap.dedent('''
        def fib(n: int) -> int:
            """Return the n-th Fibonacci number."""
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a

        if __name__ == "__main__":
            print({i: fib(i) for i in range(10)})  # {0: 0, 1: 1, ...}
        '''),
        "x=[1,2,3];y={'k':'v'};z=(a||b)&&c!=d<=e>=f->g::h",
    ],
}
MIXED = [text for texts in CORPORA.values() for text in texts]


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def max_vocab(texts, pattern=PATTERN):
    """Tokens the corpus can give at most (the reference trains until no pair is left)."""
    with pytest.raises(ValueError, match=r"only (\d+) tokens") as e:
        ref.train(texts, 10**6, pattern)
    return int(regex.search(r"only (\d+) tokens", str(e.value)).group(1))


# ----------------------------------------------------------------------------- merges vs reference


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_merges_equal_reference_until_exhausted(name):
    texts = CORPORA[name]
    top = max_vocab(texts)
    assert top > 256 + 10
    assert train(texts, top).get_merges() == ref.train(texts, top, PATTERN)
    with pytest.raises(ValueError, match="more than this corpus can give"):
        train(texts, top + 1)


def test_merges_equal_reference_mixed_corpus():
    assert train(MIXED, 700).get_merges() == ref.train(MIXED, 700, PATTERN)


def test_merges_equal_reference_medium_corpus():
    # ~60 KB with a long Zipf-like tail: exercises stale heap entries and count refreshes
    words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on"]
    words += [f"{a}{b}" for a in ("pre", "un", "re", "in", "dis") for b in ("form", "act", "cover", "stand")]
    rng = __import__("random").Random(0)
    texts = [" ".join(rng.choice(words[: rng.randint(3, len(words))]) for _ in range(300)) + ".\n" for _ in range(40)]
    texts += MIXED
    assert train(texts, 420).get_merges() == ref.train(texts, 420, PATTERN)


alphabet = st.sampled_from(list("aab  \n\t'sS1234!?.é日😀") + ["\r\n", "  ", "ab"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(alphabet, max_size=40).map("".join), min_size=1, max_size=6), st.integers(1, 40))
def test_merges_equal_reference_random(texts, extra):
    top = max_vocab(texts)
    vocab = min(256 + extra, top)
    assert train(texts, vocab).get_merges() == ref.train(texts, vocab, PATTERN)
    with pytest.raises(ValueError, match="more than this corpus can give"):
        train(texts, top + 1)


def test_parallel_merge_steps_match_reference():
    # ~3000 unique words sharing few letters: merge steps touch hundreds of words, which the
    # trainer splits across threads (forced here for every step, with 2 threads).
    rng = __import__("random").Random(1)
    vocab = ["".join(rng.choice("abcde") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(400)) for _ in range(40)]
    expected = ref.train(texts, 256 + 60, PATTERN)
    script = textwrap.dedent("""
        import json, sys, rustbpe
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(json.load(sys.stdin), 256 + 60)
        print(json.dumps(tok.get_merges()))
    """)
    import json, os

    for env in ({"RUSTBPE_PARALLEL_MIN_WORDS": "1", "RAYON_NUM_THREADS": "2"}, {"RAYON_NUM_THREADS": "1"}):
        out = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True,
                             text=True, check=True, env={**os.environ, **env})
        assert [tuple(m) for m in json.loads(out.stdout)] == expected, env


def test_custom_pattern_uses_regex_path_and_matches_reference():
    pattern = r"\S+|\s+"
    assert not rustbpe.has_fast_splitter(pattern)
    tok = train(MIXED, 500, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == ref.train(MIXED, 500, pattern)


def test_gpt4_pattern_variant_matches_reference():
    assert rustbpe.has_fast_splitter(GPT4_PATTERN)
    assert train(MIXED, 500, pattern=GPT4_PATTERN).get_merges() == ref.train(MIXED, 500, GPT4_PATTERN)


def test_buffer_size_does_not_change_merges():
    base = train(MIXED, 600).get_merges()
    for buffer_size in (1, 2, 3, 7, 10_000):
        assert train(MIXED, 600, buffer_size=buffer_size).get_merges() == base


def test_training_is_deterministic_and_order_independent():
    base = train(MIXED, 600).get_merges()
    assert train(MIXED, 600).get_merges() == base
    assert train(list(reversed(MIXED)), 600).get_merges() == base
    assert train((t for t in MIXED), 600).get_merges() == base  # a generator works too


# ----------------------------------------------------------------------------- errors


def test_vocab_size_below_256_is_an_error():
    with pytest.raises(ValueError, match="at least 256"):
        train(MIXED, 255)
    assert train(MIXED, 256).get_merges() == []


def test_vocab_size_beyond_corpus_names_the_limit():
    # chunks "ab", " ab", " ab": merges (a, b) then (" ", ab), then no pair is left
    assert train(["ab ab ab"], 258).get_merges() == [(97, 98), (32, 256)]
    with pytest.raises(ValueError, match=r"vocab_size 259 .*at most 258 tokens"):
        train(["ab ab ab"], 259)


def test_non_str_documents_are_a_type_error():
    with pytest.raises(TypeError, match="expected str"):
        train(["fine", b"bytes"], 300)


def test_unencodable_text_and_empty_corpus():
    with pytest.raises(UnicodeEncodeError):
        train(["fine", "lone surrogate \ud800"], 300)
    assert train([], 256).get_merges() == []
    with pytest.raises(ValueError, match="at most 256 tokens"):
        train([], 257)


def test_iterator_errors_propagate():
    def broken():
        yield "some text"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        train(broken(), 300)


def test_invalid_pattern_is_a_value_error():
    with pytest.raises(ValueError, match="invalid split pattern"):
        train(MIXED, 300, pattern="(unclosed")


# ----------------------------------------------------------------------------- split


def test_split_examples():
    assert rustbpe.split_text("Hello world's  end\n\n") == ["Hello", " world", "'s", " ", " end", "\n\n"]
    assert rustbpe.split_text("12345") == ["12", "34", "5"]
    assert rustbpe.split_text("12345", GPT4_PATTERN) == ["123", "45"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_fast_split_equals_fancy_regex_on_any_text(text):
    for pattern in (PATTERN, GPT4_PATTERN):
        chunks = rustbpe.split_text(text, pattern)
        assert chunks == rustbpe.split_text(text, pattern, fast=False)
        assert "".join(chunks) == text


def _assigned(c):
    # Python's regex module may know a newer Unicode than the Rust tables: compare on characters
    # both agree exist (assigned in this Python's unicodedata).
    import unicodedata

    return unicodedata.category(c) not in ("Cn", "Co", "Cs")


tricky = st.sampled_from(list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000'sSdDmMtTlLvVeErRſ1١²½Ⅻa日é\u0301😀!?.-_,") + ["'ll", "'LL", "'Ve", "'re", "\r\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(tricky, st.characters().filter(_assigned)), max_size=40).map("".join))
def test_fast_split_equals_python_regex(text):
    assert rustbpe.split_text(text) == regex.findall(PATTERN, text)


# ----------------------------------------------------------------------------- ranks, encode, tiktoken


@pytest.fixture(scope="module")
def trained():
    tok = train(MIXED * 2, 800)
    ranks = {bytes(t): r for t, r in tok.get_mergeable_ranks()}
    enc = tiktoken.Encoding("test", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={"<|bos|>": len(ranks)})
    return tok, ranks, enc


def test_mergeable_ranks_layout(trained):
    tok, ranks, _ = trained
    listed = tok.get_mergeable_ranks()
    assert [r for _, r in listed] == list(range(800))
    assert [t for t, _ in listed[:256]] == [bytes([b]) for b in range(256)]
    assert len(ranks) == 800  # token bytes are unique
    by_id = [t for t, _ in listed]
    for i, (a, b) in enumerate(tok.get_merges()):
        assert by_id[256 + i] == by_id[a] + by_id[b]
    assert tok.vocab_size == 800


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tiktoken_round_trips_any_text(trained, text):
    tok, _, enc = trained
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_special_tokens_never_come_from_plain_text(trained):
    tok, _, enc = trained
    text = "before <|bos|> after <|bos|><|bos|>"
    ids = enc.encode_ordinary(text)
    assert enc.encode_single_token("<|bos|>") not in ids
    assert max(ids) < 800 and max(tok.encode(text)) < 800
    assert enc.decode(ids) == text


def test_reference_encode_matches_tiktoken_and_python(trained):
    tok, _, enc = trained
    texts = MIXED + ["a fresh sentence, never seen: Zürich 1234567 日本 😀!!\n\n  end"]
    merges = tok.get_merges()
    for text in texts:
        assert tok.encode(text) == enc.encode_ordinary(text) == ref.encode(text, merges, PATTERN)


def test_batch_encode_equals_encode(trained):
    tok, _, _ = trained
    texts = MIXED + ["", "x", "日本"] * 5
    assert tok.batch_encode(texts) == [tok.encode(t) for t in texts]


def test_compression_on_training_text(trained):
    tok, _, enc = trained
    text = "".join(MIXED)
    assert len(text.encode()) / len(enc.encode_ordinary(text)) > 2.5  # merges are actually used


# ----------------------------------------------------------------------------- memory


def test_documents_are_counted_not_kept(tmp_path):
    # ~110 MB of distinct documents streamed from a generator: peak RSS must stay far below that.
    script = textwrap.dedent("""
        import resource, rustbpe
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        words = [f"w{i} " for i in range(2000)]
        def docs():
            for i in range(20_000):
                yield (words[i % 2000] * 1000) + str(i)   # 10 KB, a fresh string each time
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(docs(), 300, buffer_size=256)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown_mb = int(out.stdout.strip())
    assert grown_mb < 60, f"RSS grew by {grown_mb} MB while streaming ~110 MB of documents"
