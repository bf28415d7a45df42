"""Corruption: a damaged checkpoint is detected and the previous complete one is used (file:// and S3); damaged
text shards (a flipped bit, truncation, garbage, bad UTF-8, a missing file) are errors naming the object's URI,
never silently different training text."""
from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.checkpoint import load_model, load_model_state
from nanochat.dataloader import DataLoader
from nanochat.dataset import iter_documents
from nanochat.store import CorruptObject, ObjectNotFound, open_store
from nanochat.text_shards import iter_texts
from nanochat.tokenizer import get_tokenizer
from tests.faults import harness as h


@pytest.mark.parametrize("how", list(h.CORRUPTIONS))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(lab, store_uri, how):
    r = h.corrupt_checkpoint(lab, how, store=open_store(store_uri))
    assert r.ok, r.explain()


def test_serving_and_chat_load_the_previous_checkpoint_when_the_newest_is_tampered(store_uri, caplog):
    store = open_store(store_uri)
    ckpt, states = h.tiny_checkpoints(store, stage="base_train")
    store.put_bytes(f"{ckpt.step_prefix(3)}/model.pt", h._flip_byte(store.get_bytes(f"{ckpt.step_prefix(3)}/model.pt"), 500))
    with caplog.at_level(logging.WARNING, logger="nanochat.checkpoint"):
        model, step, _ = load_model(store, "base")
    assert step == 2 and h.same_weights(model.state_dict(), states[2])
    assert f"digest mismatch for {store.uri(ckpt.step_prefix(3))}/model.pt" in caplog.text


def test_when_every_checkpoint_is_damaged_the_error_names_where_it_looked(store_uri):
    store = open_store(store_uri)
    ckpt, _ = h.tiny_checkpoints(store, steps=(1, 2), stage="base_train")
    for s in (1, 2):
        store.put_bytes(f"{ckpt.step_prefix(s)}/model.pt", b"not a checkpoint")
    with pytest.raises(ObjectNotFound, match=f"no complete checkpoint under {store.uri('checkpoints/base_train/')}"):
        load_model_state(store, "base")


def test_a_torn_checkpoint_is_invisible_and_cleaned_up_by_the_next_save(store_uri):
    """Files of step 4 without meta.json (a writer died): not a checkpoint; the next complete save removes them."""
    store = open_store(store_uri)
    ckpt, states = h.tiny_checkpoints(store, steps=(1, 2, 3), stage="base_train")
    store.put_bytes(f"{ckpt.step_prefix(4)}/optim_rank0.pt", b"half")
    assert ckpt.steps() == [1, 2, 3] and ckpt.load()[0] == 3
    assert h.torn_checkpoints(store) == ["000004"] and h.audit(store) == []  # invisible, so not partial
    ckpt.save(5, states[3], {}, {"config_hash": "x"})
    assert h.torn_checkpoints(store) == [] and ckpt.steps() == [2, 3, 5]


def test_bit_flip_in_a_checksummed_shard_is_detected_naming_the_shard(lab):
    r = h.shard_row_group_corruption(lab, seeds=range(3), checksummed=True)
    assert r.ok, r.explain()
    assert "row group 1" in r.message and "shard_00007.parquet" in r.message


def test_bit_flip_in_a_shard_written_by_the_data_stage_is_detected(lab):
    r = h.shard_row_group_corruption(lab, seeds=range(3), checksummed=False)
    assert r.ok, r.explain()


def _table_bytes(table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


SHARD = "data/shards/shard_00000.parquet"
GOOD = _table_bytes(pa.table({"text": [f"document {i} " * 20 for i in range(64)]}), row_group_size=16, write_page_checksum=True)
DAMAGE = {
    "empty file": (b"", CorruptObject),
    "not parquet": (b"<html>503 Service Unavailable</html>" * 20, CorruptObject),
    "truncated": (GOOD[: len(GOOD) // 2], CorruptObject),
    "footer only": (GOOD[-200:], CorruptObject),
    "invalid UTF-8 in the text column": (_table_bytes(pa.table({"text": pa.array([b"ok", b"\xff\xfe bad"], pa.binary()).view(pa.string())})), CorruptObject),
    "binary text column": (_table_bytes(pa.table({"text": pa.array([b"a"], pa.binary())})), CorruptObject),
    "no text column": (_table_bytes(pa.table({"body": ["a", "b"]})), CorruptObject),
    "missing file": (None, ObjectNotFound),
}


def _damaged_store(uri: str, damage: str):
    """Two shards (train + val) and their index, then shard 0 replaced by the damage (the index still lists it)."""
    store = open_store(uri)
    from tests.fixtures import make_tokenizer
    make_tokenizer(store, vocab_size=300, texts=[f"document {i} " * 20 for i in range(64)])
    index = []
    for i in range(2):
        key = f"data/shards/shard_{i:05d}.parquet"
        digest = store.put_bytes(key, GOOD)
        index.append({"name": key.rsplit("/", 1)[1], "key": key, "sha256": digest, "size": len(GOOD), "rows": 64, "row_groups": 4,
                      "chars": 1, "split": "train" if i == 0 else "val"})
    store.put_json("data/shards/index.json", {"version": 1, "shards": index})
    data, _ = DAMAGE[damage]
    if data is None:
        store.delete(SHARD)
    else:
        store.put_bytes(SHARD, data)
    return store


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_files_are_errors_naming_the_shard(store_uri, damage):
    store = _damaged_store(store_uri, damage)
    expected = DAMAGE[damage][1]
    loader = DataLoader(store, get_tokenizer(store), "train", 2, 32, tokenizer_threads=1)
    with pytest.raises(expected) as info:
        for _ in range(200):
            next(loader)
    loader.close()
    assert store.uri(SHARD) in str(info.value)
    with pytest.raises(expected, match=SHARD):
        list(iter_texts(store, "train"))  # the tokenizer stages' reader
    with pytest.raises(expected, match=SHARD):
        list(iter_documents(store, "train"))  # the data stage's reader (tokenizer training, eval)


def test_base_train_on_a_damaged_shard_exits_with_one_clear_error_naming_it(lab):
    uri, work = lab.file_store("damaged-shard")
    store = open_store(uri)
    key = "data/shards/shard_00003.parquet"
    store.put_bytes(key, store.get_bytes(key)[:-100])  # the footer is gone
    r = h.expect_clear_error(h.Result("damaged shard"), h.Train(uri, work), store.uri(key))
    assert r.ok, r.explain()
    assert r.exit_code == 1 and "corrupt parquet shard" in r.message


def test_damaged_tokenizer_is_an_error_naming_it(store_uri):
    from tests.fixtures import make_tokenizer
    store = open_store(store_uri)
    make_tokenizer(store, vocab_size=300, texts=[f"document {i} " * 20 for i in range(64)])
    store.put_bytes("tokenizer/tokenizer.json", store.get_bytes("tokenizer/tokenizer.json")[:100])
    with pytest.raises(CorruptObject, match=r"damaged tokenizer .*tokenizer/tokenizer.json.*tok_train"):
        get_tokenizer(store)
