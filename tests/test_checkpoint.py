"""Checkpoints in the store: atomic visibility, digest verification, fallback, retention, 2 ranks."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import uuid

import pytest
import torch
from hypothesis import example, given, strategies as st

from nanochat.checkpoint import CheckpointManager, load_model_state, rng_state, set_rng_state
from nanochat.store import ObjectNotFound, StoreError, open_store
from tests.conftest import make_bucket
from tests.fixtures import fuzz


def small_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_exact(store_uri):
    store = open_store(store_uri)
    mgr = CheckpointManager(store, "base_train")
    model, opt = small_state(0)
    torch.manual_seed(123)
    rng = rng_state()
    mgr.save(5, model.state_dict(), {"optimizer": opt.state_dict(), "rng": rng, "loader": {"shard": 1, "rg": 3}}, {"config": {"depth": 2}})
    expected_next = torch.rand(3)
    step, model_state, rank_state, meta = mgr.load()
    assert step == 5 and meta == {"config": {"depth": 2}} and rank_state["loader"] == {"shard": 1, "rg": 3}
    fresh, fresh_opt = small_state(1)
    fresh.load_state_dict(model_state)
    fresh_opt.load_state_dict(rank_state["optimizer"])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    set_rng_state(rank_state["rng"])
    assert torch.equal(torch.rand(3), expected_next)
    s, state, m = load_model_state(store, "base")
    assert s == 5 and set(state) == set(model.state_dict())


def test_torn_and_tampered_checkpoints_fall_back(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    mgr = CheckpointManager(store, "base_train", keep=5)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((4,), float(step))}, {"s": step}, {"step": step})
    # step 4 was torn: files without meta.json are invisible
    store.put_bytes("checkpoints/base_train/000004/model.pt", b"partial")
    assert mgr.steps() == [1, 2, 3]
    # step 3 truncated: digest fails -> step 2
    data = store.get_bytes("checkpoints/base_train/000003/model.pt")
    store.put_bytes("checkpoints/base_train/000003/model.pt", data[: len(data) // 2])
    step, model_state, _, _ = mgr.load()
    assert step == 2 and torch.equal(model_state["w"], torch.full((4,), 2.0))
    # step 2's meta missing: it never existed as far as readers are concerned
    store.delete("checkpoints/base_train/000002/meta.json")
    assert mgr.load()[0] == 1
    assert mgr.load(step=3) is None


def test_retention_and_torn_cleanup(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    mgr = CheckpointManager(store, "mid_train", keep=2)
    store.put_bytes("checkpoints/mid_train/000001/model.pt", b"torn")
    for step in (2, 4, 6):
        mgr.save(step, {"w": torch.zeros(1)}, {}, {})
    assert mgr.steps() == [4, 6]
    assert not store.list("checkpoints/mid_train/000001/") and not store.list("checkpoints/mid_train/000002/")
    folders = sorted(p.name for p in (tmp_path / "st" / "checkpoints" / "mid_train").iterdir())
    assert folders == ["000004", "000006"]  # pruned and torn steps leave no empty folders behind (as on S3)


def test_missing_model_source_names_the_producer(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    with pytest.raises(ObjectNotFound, match="produced by stage chat_sft"):
        load_model_state(store, "sft")


def test_two_ranks_save_and_fall_back_together(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "tests/dist_ckpt_check.py", f"file://{tmp_path}/st"], capture_output=True, text=True, env=env, timeout=180,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout


def test_delete_other_configs_leaves_only_this_configs_checkpoints(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    mgr = CheckpointManager(store, "base_train", keep=5)
    for step, theirs in ((1, "mine"), (2, "other"), (3, "mine"), (4, None)):
        mgr.save(step, {"w": torch.full((2,), float(step))}, {}, {"config_hash": theirs} if theirs else {})
    store.put_bytes("checkpoints/base_train/000005/model.pt", b"torn")  # no meta.json: not a checkpoint, left to retention
    assert mgr.delete_other_configs("mine") == [(2, "other"), (4, None)]
    assert mgr.steps() == [1, 3]
    assert not store.list("checkpoints/base_train/000002/") and not store.list("checkpoints/base_train/000004/")
    assert store.exists("checkpoints/base_train/000005/model.pt")
    step, model_state, _, meta = mgr.load()
    assert step == 3 and meta == {"config_hash": "mine"} and torch.equal(model_state["w"], torch.full((2,), 3.0))
    assert mgr.delete_other_configs("mine") == []


def test_a_missing_step_names_the_steps_there_are_and_warns_of_nothing(tmp_path, caplog):
    store = open_store(f"file://{tmp_path}/st")
    mgr = CheckpointManager(store, "chat_rl", keep=5)
    for step in (20, 40):
        mgr.save(step, {"w": torch.full((2,), float(step))}, {}, {})
    with pytest.raises(ObjectNotFound) as e:
        load_model_state(store, "rl", step=99999)
    assert str(e.value) == f"no checkpoint step 99999 under file://{tmp_path}/st/checkpoints/chat_rl/: available steps 20, 40"
    assert not caplog.records  # nothing is corrupt: no "unusable ... trying an older one"
    # a step that is there but corrupted: named as such, no fallback to an older one, no advice to re-train
    data = store.get_bytes("checkpoints/chat_rl/000040/model.pt")
    store.put_bytes("checkpoints/chat_rl/000040/model.pt", data[:100])
    with pytest.raises(StoreError, match=r"chat_rl/000040 is torn or corrupted .*other steps: 20$"):
        load_model_state(store, "rl", step=40)
    assert "unusable" in caplog.text and "older" not in caplog.text
    assert load_model_state(store, "rl")[0] == 20  # the newest usable one, as before


@pytest.mark.parametrize("device, says", [("foo", "unknown device 'foo'"), ("cuda:99", "cuda:99")])
def test_an_unusable_device_is_a_usage_error_not_a_corrupt_checkpoint(tmp_path, caplog, device, says):
    store = open_store(f"file://{tmp_path}/st")
    CheckpointManager(store, "base_train").save(1, {"w": torch.zeros(2)}, {}, {})
    with pytest.raises(ValueError, match=re.escape(says)):
        load_model_state(store, "base", map_location=device)
    assert not caplog.records
    assert load_model_state(store, "base")[0] == 1


def test_resuming_with_another_number_of_processes_is_refused_not_restarted(tmp_path):
    """Checkpoints written by 8 processes hold 8 optimizer and data-loader shards; a run with 1 used to find none usable
    and start over from step 0 (its new checkpoints then pruned under the old, newer ones). Now it stops and says how."""
    from nanochat.config import ConfigError
    store = open_store(f"file://{tmp_path}/st")
    mgr = CheckpointManager(store, "base_train", keep=5)
    for step in (10, 20):
        mgr.save(step, {"w": torch.full((4,), float(step))}, {"s": step}, {"step": step})
    assert mgr.load()[0] == 20
    for step in (10, 20):  # as if 8 ranks had written them
        key = f"checkpoints/base_train/{step:06d}/meta.json"
        store.put_json(key, {**store.get_json(key), "world_size": 8})
    with pytest.raises(ConfigError, match=r"000020 was written by 8 process\(es\) and this run has 1; .* resume with 8 "
                                          r"\(`nanochat speedrun --nproc 8`.*or delete file://.*/checkpoints/base_train/ "):
        mgr.load()
    assert mgr.steps() == [10, 20]
    assert mgr.load(load_rank_state=False)[0] == 20  # the weights alone (a later stage's input) load whoever wrote them


# ----------------------------------------------------------------------------- model test

STEPS = st.integers(1, 6)
DAMAGE = ["truncate model.pt", "bump a byte of optim_rank0.pt", "delete model.pt", "garble meta.json", "delete meta.json"]
SAVE = st.tuples(st.just("save"), STEPS, st.integers(0, 99), st.sampled_from(["h1", "h2"]))
CKPT_OPS = st.lists(st.one_of(
    SAVE, SAVE, SAVE,
    st.tuples(st.just("torn"), STEPS),
    st.tuples(st.just("damage"), st.integers(0, 5), st.sampled_from(DAMAGE)),
    st.tuples(st.just("load"), st.one_of(st.none(), STEPS)),
    st.tuples(st.just("load"), st.none()),
    st.tuples(st.just("delete_other_configs"), st.sampled_from(["h1", "h2"])),
), min_size=4, max_size=24)


def apply_ckpt(mgr, model: dict, keep: int, op):
    """One operation on a CheckpointManager and on the dict it should behave as: step → {meta: ok|garbled|None,
    files_ok, payload, config}. A checkpoint exists while its meta.json does; it loads while that parses and every
    file matches its digest; a save keeps the newest `keep` checkpoints up to its step and removes older torn ones."""
    store, prefix = mgr.store, mgr.prefix
    kind, *args = op
    if kind == "save":
        step, payload, config = args
        mgr.save(step, {"w": torch.full((2,), float(payload))}, {"payload": payload}, {"config_hash": config})
        model[step] = {"meta": "ok", "files_ok": True, "payload": payload, "config": config}
        complete = sorted(s for s, c in model.items() if c["meta"] and s <= step)
        for s in complete[:-keep] if keep > 0 else []:
            del model[s]
        for s in [s for s, c in model.items() if s < step and not c["meta"]]:
            del model[s]
    elif kind == "torn":  # a save that died before its meta.json: a whole new model.pt, over whatever was there
        (step,) = args
        buf = io.BytesIO()
        torch.save({"w": torch.full((2,), -1.0)}, buf)
        store.put_bytes(f"{mgr.step_prefix(step)}/model.pt", buf.getvalue())
        model.setdefault(step, {"meta": None, "payload": None, "config": None})["files_ok"] = False
    elif kind == "damage" and model:
        index, how = args
        step = sorted(model)[index % len(model)]
        what, name = how.rsplit(" ", 1)
        key = f"{mgr.step_prefix(step)}/{name}"
        if name == "meta.json" and not model[step]["meta"]:
            return
        if what == "delete":
            store.delete(key)
        elif not store.exists(key):
            return
        elif what == "garble":
            store.put_bytes(key, b"{not json")
        else:
            data = store.get_bytes(key)
            mid = len(data) // 2
            store.put_bytes(key, data[:mid] if what == "truncate" else data[:mid] + bytes([(data[mid] + 1) % 256]) + data[mid + 1:])
        if name == "meta.json":
            model[step]["meta"] = None if what == "delete" else "garbled"
        else:
            model[step]["files_ok"] = False
    elif kind == "load":
        (step,) = args
        complete = sorted((s for s, c in model.items() if c["meta"]), reverse=True)
        candidates = complete if step is None else [step] if step in complete else []
        usable = [s for s in candidates if model[s]["meta"] == "ok" and model[s]["files_ok"]]
        got = mgr.load(step)
        if not usable or (step is not None and usable[0] != step):
            assert got is None
        else:
            s, model_state, rank_state, meta = got
            assert (s, rank_state["payload"], meta["config_hash"]) == (usable[0], model[s]["payload"], model[s]["config"])
            assert torch.equal(model_state["w"], torch.full((2,), float(model[s]["payload"])))
    elif kind == "delete_other_configs":
        (config,) = args
        stale = sorted((s, c["config"]) for s, c in model.items() if c["meta"] == "ok" and c["config"] != config)
        assert sorted(mgr.delete_other_configs(config)) == stale
        for s, _ in stale:
            del model[s]
    assert mgr.steps() == sorted(s for s, c in model.items() if c["meta"])
    assert mgr.latest() == max((s for s, c in model.items() if c["meta"]), default=None)
    if kind in ("save", "delete_other_configs"):  # what they remove, they remove whole (no orphan files)
        on_disk = {int(k[len(prefix) + 1:].split("/")[0]) for k in store.list(prefix + "/")}
        assert on_disk <= set(model), f"{sorted(on_disk - set(model))} left behind"


def test_checkpoints_behave_as_one_model(tmp_path, s3_env, caplog):
    """Random saves, torn saves, damaged files, loads and config purges on a local store and on S3 (moto on 127.0.0.1),
    each checked against a dict: load() always returns the newest intact checkpoint, retention keeps what it says."""
    bucket = make_bucket(s3_env.url)
    caplog.set_level(logging.ERROR, logger="nanochat.checkpoint")  # every damaged load warns; restored after the test

    @fuzz(40)
    @given(st.integers(0, 3), CKPT_OPS)
    @example(0, [("save", 1, 7, "h1"), ("save", 2, 8, "h1"), ("damage", 1, "truncate model.pt"), ("load", None)])
    @example(0, [("save", 1, 7, "h1"), ("save", 2, 8, "h1"), ("torn", 2), ("load", None)])  # well-formed, wrong digest
    def check(keep, ops):
        run = uuid.uuid4().hex[:8]
        for uri in (f"file://{tmp_path}/{run}", f"s3://{bucket}/{run}"):
            mgr, model = CheckpointManager(open_store(uri), "base_train", keep=keep), {}
            for op in ops:
                apply_ckpt(mgr, model, keep, op)
    check()
