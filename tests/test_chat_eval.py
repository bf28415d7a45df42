"""chat_eval: exact accuracies with a scripted model (letters restricted, tool calls executed),
ChatCORE math, the stage contract through the store, 2 ranks = 1 process, a real GPT end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.chat_eval_lib import (categorical_outcomes, centered_accuracy, chatcore, evaluate_task, generative_outcomes,
                                    letter_token_ids, pass_at_k)
from nanochat.engine import Engine
from nanochat.stages import chat_eval
from nanochat.store import open_store
from nanochat.tasks import get_task
from tests import dist_chat_eval_check as oracle
from tests.fixtures import make_base_checkpoint, make_tokenizer

torch.set_num_threads(1)  # tiny models: threads only add contention on a 2-core box
REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_chat_eval_check.py"
TASKS = "synthetic_mc|synthetic_arithmetic|synthetic_spelling|synthetic_chat"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    store = open_store(f"file://{tmp_path_factory.mktemp('tok')}")
    return make_tokenizer(store)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, tokenizer):
    """A store with the tokenizer and a random-init GPT as the base checkpoint."""
    uri = f"file://{tmp_path_factory.mktemp('base')}/store"
    store = open_store(uri)
    tokenizer.save(store)
    model = make_base_checkpoint(store, tokenizer)
    return uri, model.eval()


def tasks_by_name(names, split="test"):
    return {n: get_task(n, split=split) for n in names}


# -----------------------------------------------------------------------------
# the library

def test_centered_accuracy_and_chatcore():
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.0, 0.25) == pytest.approx(-1 / 3)
    results = {"mc": {"accuracy": 0.5, "baseline": 0.25}, "gen": {"accuracy": 0.1, "baseline": 0.0}}
    assert chatcore(results) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.1) / 2)


def test_pass_at_k_counts_problems_with_a_hit_among_the_first_k():
    outcomes = [[0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert [pass_at_k(outcomes, k) for k in (1, 2, 3)] == [1, 2, 3]


def test_letter_tokens_are_what_the_assistant_writes(tokenizer):
    conv = get_task("synthetic_mc_letter", split="test")[0]
    ids, mask = tokenizer.render_conversation(conv)
    answer_pos = ids.index(tokenizer.encode_special("<|assistant_start|>")) + 1
    letters = conv["letters"]
    assert letter_token_ids(tokenizer, letters)[letters.index(conv["messages"][-1]["content"])] == ids[answer_pos]
    assert mask[answer_pos] == 1

    class Clash:
        def encode(self, text):
            return [7, ord(text)]
    with pytest.raises(ValueError, match="distinct"):
        letter_token_ids(Clash(), ["A", "B"])


def test_categorical_is_exact_and_restricted_to_the_letters(tokenizer):
    tasks = tasks_by_name(["synthetic_mc_letter"])
    model = oracle.build_model(tokenizer, tasks, max_problems=14)
    expected = oracle.expected_results(tasks, 14)["synthetic_mc_letter"]["accuracy"]
    # batches of 4 over 14 problems: right padding and a ragged last batch
    result = evaluate_task(tasks["synthetic_mc_letter"], tokenizer, model, max_problems=14, batch_size=4)
    assert result["total"] == 14 and result["accuracy"] == expected == 9 / 14
    assert result["centered"] == pytest.approx((9 / 14 - 0.25) / 0.75)
    # the model's unrestricted favourite is not a letter: an evaluator that ignored `letters` would score 0
    prompt = tokenizer.render_for_completion(tasks["synthetic_mc_letter"][1])
    assert model(torch.tensor([prompt]))[0, -1].argmax().item() == tokenizer.encode("Z")[0]


def test_generative_is_exact_and_executes_tool_calls(tokenizer):
    names = ["synthetic_arithmetic", "synthetic_spelling", "synthetic_mc", "synthetic_chat"]
    tasks = tasks_by_name(names)
    model = oracle.build_model(tokenizer, tasks, max_problems=7)
    expected = oracle.expected_results(tasks, 7)
    engine = Engine(model, tokenizer)
    for name in names:
        result = evaluate_task(tasks[name], tokenizer, model, engine, max_problems=7, max_new_tokens=64)
        # arithmetic, spelling and multiple-choice answers are copied from the tool's printed output:
        # they are right only because the engine ran the call the model wrote
        assert (result["accuracy"], result["total"]) == (expected[name]["accuracy"], 7) == (4 / 7, 7), name


def test_categorical_batching_matches_one_prompt_at_a_time(base_store, tokenizer):
    """A real (random) GPT: padded batches give the same predictions as unpadded single prompts."""
    model = base_store[1]
    task = get_task("synthetic_mc_letter", split="test")
    batched = categorical_outcomes(task, tokenizer, model, list(range(10)), batch_size=4)
    single = categorical_outcomes(task, tokenizer, model, list(range(10)), batch_size=1)
    assert batched == single and len(batched) == 10


class Recording:
    """A task that remembers every completion it grades."""

    def __init__(self, task):
        self.task, self.seen = task, []

    def __getitem__(self, i):
        return self.task[i]

    def evaluate(self, conversation, completion):
        self.seen.append(completion)
        return self.task.evaluate(conversation, completion)


def test_generative_problems_decode_together_with_their_own_completions(base_store, tokenizer, monkeypatch):
    """A real (random) GPT: problems in a continuous batch (6 rows, 2 samples each: 3 problems at once) get the
    completions each gets alone, in order."""
    engine = Engine(base_store[1], tokenizer)
    alone = []
    monkeypatch.setattr(engine, "generate", lambda *a, **k: alone.append(1) or Engine.generate(engine, *a, **k))
    task = get_task("synthetic_arithmetic", split="test")
    runs = {}
    for rows in (1, 6):
        recording = Recording(task)
        outcomes = list(generative_outcomes(recording, tokenizer, engine, range(9), num_samples=2, max_new_tokens=24,
                                            temperature=1.0, seed=3, rows=rows))
        runs[rows] = outcomes, recording.seen
    assert runs[6] == runs[1] and len(runs[6][1]) == 18 and len(set(runs[6][1])) > 9
    assert len(alone) == 9  # rows=1: one Engine.generate per problem; rows=6: none, the batch decoded them


# -----------------------------------------------------------------------------
# the stage

def done(store, name):
    return store.get_json(f"stages/{name}/done.json")


def test_stage_scripted_model_exact_metrics_report_and_card(store_uri, tokenizer, capsys):
    store = open_store(store_uri)
    tokenizer.save(store)
    flags = [f"--tasks={TASKS}", "--max-problems=7", "--batch-size=3", "--max-new-tokens=64", "--source=sft", "--profile=tiny"]
    assert oracle.main(store_uri, flags) == 0
    d = done(store, "chat_eval_sft")
    expected = oracle.expected_results(tasks_by_name(TASKS.split("|")), 7)
    for name, e in expected.items():
        assert d["metrics"][name] == e["accuracy"] and d["metrics"]["tasks"][name]["total"] == 7
    core = sum((e["accuracy"] - e["baseline"]) / (1 - e["baseline"]) for e in expected.values()) / len(expected)
    assert d["metrics"]["ChatCORE"] == pytest.approx(core)
    assert d["card"]["column"] == "SFT" and d["card"]["values"]["ChatCORE"] == pytest.approx(core)
    assert d["card"]["values"]["synthetic_mc"] == expected["synthetic_mc"]["accuracy"]
    section = store.get_bytes("report/chat_eval_sft.md").decode()
    assert "| synthetic_spelling | 0.5714 |" in section and "ChatCORE" in section
    # same config again: a no-op; the done marker is untouched
    capsys.readouterr()
    assert oracle.main(store_uri, flags) == 0
    assert "already done" in capsys.readouterr().out
    assert done(store, "chat_eval_sft")["ended"] == d["ended"]


def run_worker(store_uri, nproc, flags, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launch, str(WORKER), store_uri, *flags], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_ranks_give_the_same_numbers_as_one_process(tmp_path, tokenizer):
    # 11 problems: the ranks get 6 and 5; categorical batches of 4 are ragged on both
    flags = [f"--tasks={TASKS}", "--max-problems=11", "--batch-size=4", "--max-new-tokens=64", "--source=mid"]
    metrics = {}
    for nproc in (1, 2):
        uri = f"file://{tmp_path}/store{nproc}"
        tokenizer.save(open_store(uri))
        run_worker(uri, nproc, flags, tmp_path)
        d = done(open_store(uri), "chat_eval_mid")
        assert d["world_size"] == nproc
        metrics[nproc] = d["metrics"]
    assert metrics[1] == metrics[2]
    expected = oracle.expected_results(tasks_by_name(TASKS.split("|")), 11)
    assert {n: metrics[2][n] for n in expected} == {n: e["accuracy"] for n, e in expected.items()}
    assert all(metrics[2]["tasks"][n]["total"] == 11 for n in expected)


def test_stage_real_model_end_to_end_with_nanochat_flags(base_store):
    uri = base_store[0]
    store = open_store(uri)
    code = chat_eval.main([f"--store={uri}", "-i", "base", "-a", "synthetic_mc|synthetic_arithmetic", "--max-problems=6", "--max-new-tokens=6"])
    assert code == 0
    d = done(store, "chat_eval_base")
    assert d["config"]["source"] == "base" and d["config"]["tasks"] == "synthetic_mc|synthetic_arithmetic"
    tasks = d["metrics"]["tasks"]
    assert set(tasks) == {"synthetic_mc", "synthetic_arithmetic"} and all(t["total"] == 6 for t in tasks.values())
    assert d["metrics"]["ChatCORE"] == pytest.approx(chatcore(tasks))
    assert d["card"]["column"] == "BASE" and d["metrics"]["checkpoint_step"] == 1


def test_config_and_input_errors_are_one_line(tmp_path, tokenizer, capsys):
    uri = f"file://{tmp_path}/store"
    tokenizer.save(open_store(uri))
    assert chat_eval.main([f"--store={uri}", "--tasks=synthetic_mc|nope"]) == 2
    assert "--tasks: unknown task 'nope'" in capsys.readouterr().err
    assert chat_eval.main([f"--store={uri}", "--source=rl", "--tasks=synthetic_mc"]) == 1
    assert "produced by stage chat_rl" in capsys.readouterr().err
    assert chat_eval.main([f"--store={uri}", "--source=base", "--tasks=GSM8K"]) == 1
    assert "nanochat.tasks.download" in capsys.readouterr().err
    assert chat_eval.expand_short_flags(["-i", "mid", "-aGSM8K", "--x=1"]) == ["--source=mid", "--tasks=GSM8K", "--x=1"]
