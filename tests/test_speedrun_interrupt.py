"""Ctrl-C in the middle of base_train, then `nanochat speedrun` again: it resumes from the checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nanochat.checkpoint import CheckpointManager
from nanochat.store import open_store

SETS = ["base_train.num_iterations=150", "base_train.save_every=20", "chat_rl.num_iterations=2"]  # 130 steps of margin for the SIGINT


def start_speedrun(uri, tmp_path, log_name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    cmd = [sys.executable, "-m", "nanochat.cli", "speedrun", "--profile", "ci", "--store", uri]
    for s in SETS:
        cmd += ["--set", s]
    log = open(tmp_path / log_name, "w")
    # its own process group, so SIGINT reaches runner and stage together, like Ctrl-C in a terminal
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)


def wait_for_checkpoint(store, proc, timeout=300) -> int:
    ckpt = CheckpointManager(store, "base_train")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "speedrun ended before base_train wrote a checkpoint"
        if ckpt.latest():
            return ckpt.latest()
        time.sleep(0.2)
    raise AssertionError("no base_train checkpoint appeared")


def test_sigint_mid_base_train_then_rerun_resumes(tmp_path):
    uri = f"file://{tmp_path}/run"
    store = open_store(uri)
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
    assert saved <= stopped_at < 150, log1[-2000:]

    second = start_speedrun(uri, tmp_path, "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log2 = (tmp_path / "second.log").read_text()
    for stage in ("data", "tok_train", "tok_eval"):  # finished stages are not redone
        assert f"[runner] {stage}: done (config" in log2 and f"[runner] {stage}: started" not in log2
    assert f"resumed from checkpoint step {stopped_at}" in log2
    done = store.get_json("stages/base_train/done.json")
    assert done["metrics"]["num_iterations"] == 150
    assert store.exists("stages/chat_eval_rl/done.json")
