"""tok_train → tok_eval through the store (file:// and S3), as stages."""
from __future__ import annotations

from nanochat.stage import stage_main
from nanochat.stages import tok_eval, tok_train
from nanochat.store import open_store
from nanochat.tokenizer import get_tokenizer
from tests.fixtures import small_texts, write_shards


def test_tok_train_then_eval(store_uri):
    store = open_store(store_uri)
    write_shards(store, small_texts(300))
    assert stage_main("tok_train", tok_train.Config, tok_train.run, [f"--store={store_uri}", "--vocab-size=600", "--max-chars=200000"]) == 0
    tok = get_tokenizer(store)
    assert tok.get_vocab_size() == 600
    for text in ["Hello world! 12 + 30 = 42", "naïve café 🦊", "<|bos|> is text here"]:
        assert tok.decode(tok.encode(text)) == text
    done = store.get_json("stages/tok_train/done.json")
    assert done["metrics"]["vocab_size"] == 600 and 0 < done["metrics"]["train_chars"] <= 200000 + 10000
    assert set(done["artifacts"]) == {"tokenizer/tokenizer.json", "tokenizer/token_bytes.pt"}
    assert stage_main("tok_eval", tok_eval.Config, tok_eval.run, [f"--store={store_uri}", "--sample-docs=50", "--references=gpt2,/nope/tokenizer.json"]) == 0
    metrics = store.get_json("stages/tok_eval/done.json")["metrics"]
    for kind in ("prose", "code", "math", "non_english", "train_shard", "val_shard"):
        assert metrics[f"bytes_per_token_{kind}"] > 1.0
    assert metrics["bytes_per_token_prose"] > metrics["bytes_per_token_non_english"]  # trained on English
    section = store.get_bytes("report/tok_eval.md").decode()
    assert "bytes/token (ours)" in section and "Longest tokens" in section and "token_lengths.png" in section


def test_tok_train_reports_missing_shards(tmp_path, capsys):
    uri = f"file://{tmp_path}/empty"
    assert stage_main("tok_train", tok_train.Config, tok_train.run, [f"--store={uri}", "--vocab-size=600"]) == 1
    err = capsys.readouterr().err
    assert "missing input" in err and "data/shards/index.json" in err and "stage data" in err


def test_tok_train_rejects_tiny_vocab(tmp_path, capsys):
    assert stage_main("tok_train", tok_train.Config, tok_train.run, [f"--store=file://{tmp_path}/s", "--vocab-size=100"]) == 2
    assert "--vocab-size must exceed 265" in capsys.readouterr().err
