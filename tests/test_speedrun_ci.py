"""The main job end to end on the `ci` profile, the way a user meets it: Ctrl-C in the middle of base_train,
`nanochat speedrun` again resumes from the checkpoint and finishes every stage and the report card, and a
third run does nothing. One pipeline run covers all three (the suite runs the whole pipeline once), on S3 (moto on
127.0.0.1) as on a cluster: every stage reads and writes through boto3/pyarrow; the stage tests cover file://."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nanochat.checkpoint import CheckpointManager
from nanochat.pipeline import steps_for
from nanochat.report import load_history
from nanochat.store import open_store

ITERATIONS = 150  # 130 steps of margin for the SIGINT after the first checkpoint (step 20)
SETS = [f"base_train.num_iterations={ITERATIONS}", "base_train.save_every=20"]


def start_speedrun(uri, tmp_path, log_name) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    cmd = [sys.executable, "-m", "nanochat.cli", "speedrun", "--profile", "ci", "--store", uri]
    for s in SETS:
        cmd += ["--set", s]
    log = open(tmp_path / log_name, "w")
    # its own process group, so SIGINT reaches runner and stage together, like Ctrl-C in a terminal
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)


def finish(proc: subprocess.Popen, tmp_path, log_name, timeout=600) -> str:
    log = (tmp_path / log_name)
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    return log.read_text()


def wait_for_checkpoint(store, proc, timeout=300) -> int:
    ckpt = CheckpointManager(store, "base_train")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "speedrun ended before base_train wrote a checkpoint"
        if ckpt.latest():
            return ckpt.latest()
        time.sleep(0.2)
    raise AssertionError("no base_train checkpoint appeared")


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


def test_ci_speedrun_interrupted_resumed_then_a_no_op(tmp_path, s3_uri):
    uri = s3_uri
    store = open_store(uri)

    # 1. Ctrl-C once base_train has a checkpoint: exit 130, base_train not done
    first = start_speedrun(uri, tmp_path, "first.log")
    try:
        saved = wait_for_checkpoint(store, first)
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    log1 = (tmp_path / "first.log").read_text()
    assert not store.exists("stages/base_train/done.json")
    stopped_at = CheckpointManager(store, "base_train").latest()
    assert saved <= stopped_at < ITERATIONS, log1[-2000:]

    # 2. run again: finished stages are skipped, base_train resumes, every stage and the card follow
    log2 = finish(start_speedrun(uri, tmp_path, "second.log"), tmp_path, "second.log")
    for stage in ("data", "tok_train", "tok_eval"):
        assert f"[runner] {stage}: done (config" in log2 and f"[runner] {stage}: started" not in log2
    assert f"resumed from checkpoint step {stopped_at}" in log2
    for step in steps_for("ci"):
        assert store.exists(f"stages/{step.name}/done.json"), step.name
    assert store.get_json("stages/base_train/done.json")["metrics"]["num_iterations"] == ITERATIONS
    history = [r for r in load_history(store, "base_train") if "val_bpb" in r]
    assert history[-1]["val_bpb"] < history[0]["val_bpb"]  # val bpb falls through base training
    report = store.get_bytes("report/report.md").decode()
    assert "| Metric | BASE | MID | SFT | RL |" in report and "ChatCORE" in report
    assert "nanochat chat --store" in log2
    answer_from_final_model(store)

    # 3. a third run finds everything done and re-runs nothing
    log3 = finish(start_speedrun(uri, tmp_path, "third.log"), tmp_path, "third.log")
    assert "started (attempt" not in log3
    assert log3.count("skipping") == len(steps_for("ci"))
