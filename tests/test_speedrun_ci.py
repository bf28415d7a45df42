"""The main job end to end on the `ci` profile: every stage, the report card, and a no-op re-run."""
from __future__ import annotations

import os
import subprocess
import sys

from nanochat.pipeline import steps_for
from nanochat.store import open_store


def speedrun(uri, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanochat.cli", "speedrun", "--profile", "ci", "--store", uri],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)


def answer_from_final_model(store):
    """The newest chat checkpoint answers a user turn in the conversation format, through the engine."""
    from nanochat.checkpoint import load_model, newest_source
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    assert newest_source(store) == "rl"
    model, _, _ = load_model(store, "rl")
    tokenizer = get_tokenizer(store)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 3 + 4?"}]})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=48, temperature=0.0)
    completion = results[0][len(prompt):]
    assert 0 < len(completion) <= 48 and tokenizer.decode(completion).strip(), "the model produced no answer"


def test_ci_speedrun_end_to_end(tmp_path):
    uri = f"file://{tmp_path}/run"
    first = speedrun(uri, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    store = open_store(uri)
    for step in steps_for("ci"):
        assert store.exists(f"stages/{step.name}/done.json"), step.name
    base = store.get_json("stages/base_train/done.json")["metrics"]
    history = [r for r in __import__("nanochat.report", fromlist=["x"]).load_history(store, "base_train") if "val_bpb" in r]
    assert history[-1]["val_bpb"] < history[0]["val_bpb"]  # val bpb falls through base training
    assert base["num_iterations"] == 30
    report = store.get_bytes("report/report.md").decode()
    assert "| Metric | BASE | MID | SFT | RL |" in report and "ChatCORE" in report
    assert "nanochat chat --store" in first.stderr
    answer_from_final_model(store)
    second = speedrun(uri, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "started (attempt" not in second.stderr  # nothing re-ran
    assert second.stderr.count("skipping") == len(steps_for("ci"))
