"""mid_train and chat_sft: task specs, batch layouts and masks, determinism, exact resume, rank
splits; both stages end to end through the store (file and S3), each improving its own metric;
kill-and-resume equals an uninterrupted run; 2 ranks under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import tasks as tasks_module
from nanochat.chat_data import (PackedConversations, PaddedConversations, TaskSpec, build_mixture, collate, evaluate_loss,
                                parse_tasks)
from nanochat.checkpoint import CheckpointManager, load_model
from nanochat.report import load_history
from nanochat.stages import chat_sft, mid_train
from nanochat.store import open_store
from nanochat.tasks import Task, get_task
from tests.fixtures import make_base_checkpoint, make_tokenizer
from tests.test_tasks import store  # noqa: F401 - the real-format task data fixture

torch.set_num_threads(1)  # tiny models: threads only add contention on a 2-core box
REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = "synthetic_arithmetic,synthetic_spelling,synthetic_mc,synthetic_chat"
MID_FLAGS = ["--profile=ci", f"--tasks={SYNTHETIC}", "--val-tasks=" + ",".join(f"{t}@val" for t in SYNTHETIC.split(",")),
             "--max-seq-len=256", "--device-batch-size=4", "--total-batch-size=-1", "--num-iterations=20", "--eval-every=0",
             "--eval-tokens=4096", "--save-every=0", "--log-every=100", "--loss-tokens=all", "--compile=false"]
SFT_FLAGS = ["--profile=ci", f"--tasks={SYNTHETIC}", "--val-tasks=synthetic_mc@val", "--eval-tasks=synthetic_mc@val",
             "--max-seq-len=256", "--device-batch-size=8", "--target-examples-per-step=8", "--num-iterations=20", "--init-lr-frac=0.5",
             "--eval-every=0", "--eval-steps=8", "--eval-cat-examples=64", "--save-every=0", "--log-every=100"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(open_store(f"file://{tmp_path_factory.mktemp('tok')}"))


def base_store(uri, tokenizer):
    """The tokenizer and a random-init depth-2 GPT saved as the base_train checkpoint."""
    store = open_store(uri)
    tokenizer.save(store)
    make_base_checkpoint(store, tokenizer, depth=2, seq_len=256)
    return store


def renders(tokenizer, task, indices, max_tokens=2048):
    return [tokenizer.render_conversation(task[i], max_tokens=max_tokens) for i in indices]


class Recording(Task):
    """Wraps a task and records which examples were read."""

    def __init__(self, task):
        super().__init__()
        self.task, self.seen = task, []

    def num_examples(self):
        return len(self.task)

    def get_example(self, index):
        self.seen.append(index)
        return self.task[index]


# -----------------------------------------------------------------------------
# task specs and mixtures

def test_parse_tasks_syntax_and_errors():
    specs = parse_tasks("smoltalk, mmlu@test:5200,identity*2,ARC-Easy@train,simple_spelling:300*3")
    assert specs == [TaskSpec("smoltalk"), TaskSpec("mmlu", "test", 5200), TaskSpec("identity", repeat=2),
                     TaskSpec("arc_easy", "train"), TaskSpec("simple_spelling", None, 300, 3)]
    assert str(specs[1]) == "mmlu@test:5200" and str(specs[4]) == "simple_spelling:300*3"
    for bad, msg in [("", "empty"), ("nope", "unknown task"), ("gsm8k:abc", "bad task item"), ("gsm8k*0", ">= 1"), ("mmlu@", "bad task item")]:
        with pytest.raises(ValueError, match=msg):
            parse_tasks(bad)


def test_build_mixture_sizes_repeats_and_cycling(monkeypatch):
    class Toy(Task):
        def num_examples(self):
            return 3

        def get_example(self, i):
            return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    monkeypatch.setitem(tasks_module.TASKS, "toy", lambda store=None, split="train", **kw: Toy(**kw))
    mix = build_mixture("synthetic_mc:40,synthetic_chat:10*2,toy:7,toy:2", split="train", seed=1)
    assert len(mix) == 40 + 20 + 7 + 2
    assert mix.summary == {"synthetic_mc@train": 40, "synthetic_chat@train": 20, "toy@train": 9}
    questions = [mix[i]["messages"][0]["content"] for i in range(len(mix))]
    toys = sorted(q for q in questions if q in ("q0", "q1", "q2"))
    assert toys == sorted(["q0", "q1", "q2"] * 2 + ["q0"] + ["q0", "q1"])  # 7 = cycled, 2 = cut
    assert [mix[i] for i in range(10)] == [build_mixture("synthetic_mc:40,synthetic_chat:10*2,toy:7,toy:2", seed=1)[i] for i in range(10)]
    val = build_mixture("synthetic_mc:5", split="val")
    assert val[0] == get_task("synthetic_mc", split="val")[val.local_ids[0]]


def test_gpu_default_mixtures_build_from_real_format_data(store, tokenizer):
    """nanochat's mixtures (the d20 defaults) load through the real task loaders and batch."""
    from tests.test_tasks import ARC_ROWS, GSM8K_ROWS, SMOLTALK_ROWS, put_parquet
    put_parquet(store, "data/tasks/smoltalk/data/test-00000-of-00001.parquet", SMOLTALK_ROWS)
    put_parquet(store, "data/tasks/gsm8k/main/test-00000-of-00001.parquet", GSM8K_ROWS)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        put_parquet(store, f"data/tasks/arc/{subset}/train-00000-of-00001.parquet", ARC_ROWS)
    mid = build_mixture(mid_train.GPU_TASKS, store, split="train")
    assert mid.summary == {"smoltalk@train": 2, "mmlu_aux@train": 3, "gsm8k@train": 3, "identity@train": 4,
                           "simple_spelling@train": 200000, "spellingbee@train": 80000}
    # ":N" means exactly N: the real test sets are cut (14K MMLU rows -> 5200), these 3-row fixtures are cycled
    assert build_mixture(mid_train.GPU_VAL_TASKS, store, split="val").summary == {"smoltalk@test": 2, "mmlu@test": 5200, "gsm8k@test": 420}
    x, y = next(PackedConversations(tokenizer, mid, 2, 128))
    assert x.shape == (2, 128) and (y >= 0).all()
    sft = build_mixture(chat_sft.GPU_TASKS, store, split="train")
    assert len(sft) == 2 + 2 + 3 + 10000 + 2 + 300 + 300  # arc_easy, arc_challenge, gsm8k, smoltalk:10000, identity, spelling
    x, y = next(PaddedConversations(tokenizer, sft, 8, 512))
    assert x.shape[0] == 8 and (y >= 0).any(dim=1).all()
    assert [str(s) for s in parse_tasks(chat_sft.GPU_EVAL_TASKS)] == ["mmlu@test", "arc_easy@test"]


# -----------------------------------------------------------------------------
# midtraining stream

def test_packed_rows_are_the_concatenated_conversations(tokenizer):
    task = get_task("synthetic_arithmetic", split="val")
    B, T = 2, 64
    stream = PackedConversations(tokenizer, task, B, T)
    flat = [t for ids, _ in renders(tokenizer, task, range(20)) for t in ids]
    x1, y1 = next(stream)
    x2, y2 = next(stream)
    assert x1.shape == y1.shape == (B, T) and x1.dtype == torch.long
    assert x1.flatten().tolist() == flat[:B * T] and y1.flatten().tolist() == flat[1:B * T + 1]
    assert x2.flatten().tolist() == flat[B * T + 1:2 * B * T + 1]  # the next batch starts right after
    assert x1[0, 0].item() == tokenizer.get_bos_token_id()  # conversations start with <|bos|>
    assert (y1 >= 0).all()  # loss_tokens="all": every token is trained, as in nanochat's midtraining


def test_packed_assistant_only_masks_targets(tokenizer):
    task = get_task("synthetic_arithmetic", split="val")
    stream = PackedConversations(tokenizer, task, 2, 64, loss_tokens="assistant")
    rendered = renders(tokenizer, task, range(20))
    flat = [t for ids, _ in rendered for t in ids]
    mask = [m for _, ms in rendered for m in ms]
    x, y = next(stream)
    expected = [t if m else -1 for t, m in zip(flat[1:129], mask[1:129])]
    assert y.flatten().tolist() == expected
    assert 0 < (y >= 0).sum() < y.numel()  # user turns and tool outputs are not trained
    output_start = tokenizer.encode_special("<|output_start|>")
    assert output_start in x.flatten().tolist() and output_start not in y.flatten().tolist()


def test_packed_assistant_only_never_yields_a_batch_with_nothing_to_train(tokenizer):
    class LongQuestion(Task):
        def num_examples(self):
            return 2

        def get_example(self, i):
            return {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": f"answer {i}"}]}
    x, y = next(PackedConversations(tokenizer, LongQuestion(), 1, 32, loss_tokens="assistant"))
    assert (y >= 0).any()  # the all-user chunks before the answer were skipped (their mean loss would be NaN)
    assert tokenizer.encode_special("<|assistant_start|>") in x.flatten().tolist()


def test_packed_resume_is_exact_and_deterministic(tokenizer):
    task = build_mixture(SYNTHETIC, seed=3)
    a = PackedConversations(tokenizer, task, 2, 48, rank=1, world_size=2)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives serialization
    expected = [next(a) for _ in range(4)]
    b = PackedConversations(tokenizer, task, 2, 48, rank=1, world_size=2)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(b) for _ in range(4))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c, d = (PackedConversations(tokenizer, task, 2, 48, rank=1, world_size=2) for _ in range(2))
    assert all(torch.equal(next(c)[1], next(d)[1]) for _ in range(3))
    with pytest.raises(ValueError, match="world_size"):
        PackedConversations(tokenizer, task, 2, 48, rank=0, world_size=4).load_state_dict(state)


def test_packed_ranks_read_disjoint_conversations_across_epochs(tokenizer):
    base = get_task("synthetic_chat", split="val", size=21)  # odd size: epochs do not align with ranks
    seen = []
    for rank in range(2):
        rec = Recording(base)
        stream = PackedConversations(tokenizer, rec, 2, 64, rank=rank, world_size=2)
        while len(rec.seen) < 30:  # ~3 epochs of this rank's share
            next(stream)
        seen.append(rec.seen[:30])
    # rank r reads global positions r, r+2, r+4, ... of the endless mixture: never the same one twice
    assert seen[0] == [p % 21 for p in range(0, 60, 2)] and seen[1] == [p % 21 for p in range(1, 60, 2)]
    first_epoch = [set(p % 21 for p in range(r, 21, 2)) for r in range(2)]
    assert first_epoch[0].isdisjoint(first_epoch[1]) and first_epoch[0] | first_epoch[1] == set(range(21))


# -----------------------------------------------------------------------------
# SFT batches

def test_padded_rows_one_conversation_each_with_masks(tokenizer):
    task = build_mixture(SYNTHETIC, split="val", seed=0)
    batches = PaddedConversations(tokenizer, task, 4, 256, shuffle=False)
    x, y = next(batches)
    rows = renders(tokenizer, task, range(4), max_tokens=257)
    width = max(len(ids) for ids, _ in rows) - 1
    assert x.shape == y.shape == (4, width)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert x[i, 0].item() == tokenizer.get_bos_token_id()
        assert x[i, :n].tolist() == ids[:-1]
        assert y[i, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (y[i, n:] == -1).all()  # padding is never trained
        assert (y[i] >= 0).any()
    # only assistant tokens are targets: no user-turn special token is ever predicted
    targets = set(y[y >= 0].tolist())
    for name in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|bos|>", "<|output_start|>"):
        assert tokenizer.encode_special(name) not in targets
    assert tokenizer.encode_special("<|assistant_end|>") in targets


def test_padded_epochs_resume_and_rank_split(tokenizer):
    task = get_task("synthetic_mc", split="val", size=21)
    shares = []
    for rank in range(2):
        rec = Recording(task)
        b = PaddedConversations(tokenizer, rec, 5, 128, rank=rank, world_size=2, seed=7)
        next(b), next(b)  # 10 = this rank's whole share of an epoch (21 // 2)
        shares.append(rec.seen)
        assert b.epoch == 0 and b.pos == 10
    assert len(set(shares[0])) == 10 and set(shares[0]).isdisjoint(shares[1]) and len(set(shares[0]) | set(shares[1])) == 20
    # crossing epochs: a fresh order each epoch, same for every run; resume from a state is exact
    a = PaddedConversations(tokenizer, task, 3, 128, rank=0, world_size=2, seed=7)
    assert not (a.order(0) == a.order(1)).all()
    for _ in range(3):
        next(a)
    state = a.state_dict()
    assert state["epoch"] == 0 and state["pos"] == 9
    expected = [next(a) for _ in range(3)]  # crosses into epoch 1
    assert a.epoch == 1
    b = PaddedConversations(tokenizer, task, 3, 128, rank=0, world_size=2, seed=7)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(b) for _ in range(3))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_padded_skips_conversations_with_nothing_to_train(tokenizer):
    task = get_task("synthetic_arithmetic", split="val", size=4)
    with pytest.raises(ValueError, match="no conversation"):
        next(PaddedConversations(tokenizer, task, 2, 8))  # 9 tokens never reach the assistant's answer


def test_evaluate_loss_is_the_mean_over_trained_targets(tokenizer):
    torch.manual_seed(0)
    from nanochat.gpt import GPT, GPTConfig
    model = GPT.create(GPTConfig.from_depth(1, tokenizer.get_vocab_size(), 128, head_dim=64, window_pattern="L")).eval()
    rows = renders(tokenizer, get_task("synthetic_chat", split="val"), range(6), max_tokens=129)
    b1, b2 = collate(rows[:2], 0), collate(rows[2:], 0)
    count = sum((y >= 0).sum().item() for _, y in (b1, b2))
    with torch.no_grad():
        total = sum(model(x, y, loss_reduction="sum").item() for x, y in (b1, b2))
    assert evaluate_loss(model, [b1, b2]) == pytest.approx(total / count, rel=1e-6)


# -----------------------------------------------------------------------------
# the stages

def done(store, name):
    return store.get_json(f"stages/{name}/done.json")


def val_loss(store, source, tokenizer, task="synthetic_mc"):
    """Masked loss of a stored model on held-out conversations of a synthetic task (not the stage's own number)."""
    model, _, _ = load_model(store, source)
    batches = PaddedConversations(tokenizer, get_task(task, split="val", size=128), 16, 256, shuffle=False)
    return evaluate_loss(model, (next(batches) for _ in range(8)))


def test_mid_then_sft_end_to_end(store_uri, tokenizer, capsys):
    store = base_store(store_uri, tokenizer)
    assert mid_train.main([f"--store={store_uri}", *MID_FLAGS]) == 0
    d = done(store, "mid_train")
    m = d["metrics"]
    assert m["steps"] == 20 and d["config"]["tasks"] == SYNTHETIC
    assert m["val_bpb"] < 0.6 * m["initial_val_bpb"]  # random init -> knows the chat format
    meta = CheckpointManager(store, "mid_train").load(load_rank_state=False)[3]
    assert meta["model_config"]["n_layer"] == 2 and meta["source"] == "base" and meta["max_seq_len"] == 256
    assert d["card"] == {"column": "MID", "values": {"chat val bpb": m["val_bpb"]}}
    assert "## Midtraining" in store.get_bytes("report/mid_train.md").decode()
    loss_base, loss_mid = val_loss(store, "base", tokenizer), val_loss(store, "mid", tokenizer)
    assert loss_mid < 0.5 * loss_base

    assert chat_sft.main([f"--store={store_uri}", *SFT_FLAGS]) == 0
    s = done(store, "chat_sft")["metrics"]
    assert s["steps"] == 20 and 0 <= s["synthetic_mc_acc"] <= 1 and "initial_synthetic_mc_acc" in s
    assert s["val_loss"] < s["initial_val_loss"] - 0.1  # the mid model's masked loss on held-out MC, then SFT's
    loss_sft = val_loss(store, "sft", tokenizer)
    assert loss_sft < 0.85 * loss_mid
    report = store.get_bytes("report/chat_sft.md").decode()
    assert "## Chat SFT" in report and "synthetic_mc_acc before -> after" in report

    # the same config again: a no-op that leaves everything as it was (the CLI entry runs in the torchrun test)
    ended = [done(store, name)["ended"] for name in ("mid_train", "chat_sft")]
    capsys.readouterr()
    assert mid_train.main([f"--store={store_uri}", *MID_FLAGS]) == 0 and chat_sft.main([f"--store={store_uri}", *SFT_FLAGS]) == 0
    assert capsys.readouterr().out.count("already done") == 2
    assert [done(store, name)["ended"] for name in ("mid_train", "chat_sft")] == ended
    assert CheckpointManager(store, "chat_sft").steps() == [20]


def test_mid_train_kill_and_resume_equals_uninterrupted(tmp_path, tokenizer, monkeypatch):
    flags = [f for f in MID_FLAGS if not f.startswith(("--num-iterations", "--save-every"))] + ["--num-iterations=12", "--save-every=4"]
    base_store(f"file://{tmp_path}/a", tokenizer)
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    original = PackedConversations.__next__

    def sigterm_at_step_6(self):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 6:  # only the train stream gets this far (a val pass is 4 batches)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)
    monkeypatch.setattr(PackedConversations, "__next__", sigterm_at_step_6)
    assert mid_train.main([f"--store=file://{tmp_path}/a", *flags]) == 143
    store = open_store(f"file://{tmp_path}/a")
    assert not store.exists("stages/mid_train/done.json")
    assert CheckpointManager(store, "mid_train").steps() == [4, 6]  # periodic + the one taken on SIGTERM
    monkeypatch.setattr(PackedConversations, "__next__", original)
    assert mid_train.main([f"--store=file://{tmp_path}/a", *flags]) == 0
    assert mid_train.main([f"--store=file://{tmp_path}/b", *flags]) == 0

    def losses(name):
        return {r["step"]: r["loss"] for r in load_history(open_store(f"file://{tmp_path}/{name}"), "mid_train") if "loss" in r}
    resumed, straight = losses("a"), losses("b")
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == straight  # bit-identical on CPU fp32
    da, db = done(open_store(f"file://{tmp_path}/a"), "mid_train"), done(open_store(f"file://{tmp_path}/b"), "mid_train")
    assert da["metrics"]["val_bpb"] == db["metrics"]["val_bpb"]


def test_config_and_input_errors_are_one_line(tmp_path, capsys):
    uri = f"file://{tmp_path}/s"
    assert mid_train.main([f"--store={uri}", "--tasks=synthetic_mc,nope"]) == 2
    assert "--tasks: unknown task 'nope'" in capsys.readouterr().err
    assert chat_sft.main([f"--store={uri}", "--eval-tasks=synthetic_mc:x"]) == 2
    assert "--eval-tasks: bad task item" in capsys.readouterr().err
    assert mid_train.main([f"--store={uri}", "--source=foo"]) == 2
    assert "--source" in capsys.readouterr().err
    make_tokenizer(open_store(uri))
    assert mid_train.main([f"--store={uri}", *MID_FLAGS]) == 1
    assert "checkpoints/base_train" in capsys.readouterr().err


def test_two_ranks_under_torchrun(tmp_path, tokenizer):
    """mid_train and chat_sft on 2 gloo ranks; SFT's starting val loss and accuracy (examples split
    across ranks, sums all-reduced) equal a single process's with the same global batch."""
    base_store(f"file://{tmp_path}/two", tokenizer)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))

    def torchrun(module, flags):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *flags]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    mid = [f for f in MID_FLAGS if not f.startswith(("--num-iterations", "--device-batch-size"))] + ["--num-iterations=6", "--device-batch-size=2"]
    torchrun("nanochat.stages.mid_train", [f"--store=file://{tmp_path}/two", *mid])
    two = open_store(f"file://{tmp_path}/two")
    d = done(two, "mid_train")
    assert d["world_size"] == 2 and d["metrics"]["val_bpb"] < d["metrics"]["initial_val_bpb"]
    doc = two.get_json("checkpoints/mid_train/000006/meta.json")
    assert {"optim_rank0.pt", "optim_rank1.pt", "model.pt"} <= set(doc["files"])
    shutil.copytree(tmp_path / "two", tmp_path / "one")

    sft = [f for f in SFT_FLAGS if not f.startswith("--num-iterations")] + ["--num-iterations=3", "--eval-cat-examples=21"]
    assert chat_sft.main([f"--store=file://{tmp_path}/one", *sft]) == 0
    sft2 = [f for f in sft if not f.startswith("--device-batch-size")] + ["--device-batch-size=4"]
    torchrun("nanochat.stages.chat_sft", [f"--store=file://{tmp_path}/two", *sft2])
    one, two = done(open_store(f"file://{tmp_path}/one"), "chat_sft"), done(two, "chat_sft")
    assert two["world_size"] == 2 and two["metrics"]["grad_accum_steps"] == 1
    assert two["metrics"]["initial_val_loss"] == pytest.approx(one["metrics"]["initial_val_loss"], rel=1e-5)
    assert two["metrics"]["initial_synthetic_mc_acc"] == one["metrics"]["initial_synthetic_mc_acc"]
