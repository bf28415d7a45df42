"""base_train as a real process: kill-and-resume (SIGTERM and SIGKILL, 1 and 2 ranks) ends bit-exact with
an uninterrupted run, a corrupted newest checkpoint falls back to the previous one, checkpoints of another
config never leak into a fresh start, and periodic CORE runs on the fixture bundle."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import CheckpointManager, load_model_state
from nanochat.dataset import ShardWriter
from nanochat.report import load_history
from nanochat.store import open_store
from tests.fixtures import make_tokenizer, small_texts
from tests.test_core_eval import put_bundle

REPO = Path(__file__).resolve().parents[1]
N, SAVE_EVERY = 60, 5
FLAGS = ["--depth=2", "--head-dim=64", "--window-pattern=L", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=-1",
         f"--num-iterations={N}", "--eval-every=0", "--eval-tokens=512", f"--save-every={SAVE_EVERY}", "--log-every=1",
         "--compile=false", "--device=cpu", "--dtype=float32", "--tokenizer-threads=1", "--seed=7"]
CKPT = "checkpoints/base_train"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A store folder with a trained tokenizer and text shards (8 train + 1 val), copied by each test."""
    root = tmp_path_factory.mktemp("prepared") / "store"
    store = open_store(f"file://{root}")
    texts = small_texts(400)
    make_tokenizer(store, vocab_size=512, texts=texts)
    writer = ShardWriter(store, "test", shard_chars=60_000, row_group_rows=32)
    for text in texts:
        writer.add(text)
    writer.finish()
    return root


def fresh(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


class Run:
    """base_train as a subprocess (1 process, or torchrun with `nproc` gloo ranks), log in a file."""

    def __init__(self, store_dir: Path, *extra: str, nproc: int = 1):
        self.store_dir, self.uri = store_dir, f"file://{store_dir}"
        n = len(list(store_dir.parent.glob(f"{store_dir.name}.*.log")))
        self.log_path = store_dir.parent / f"{store_dir.name}.{n}.log"
        tmp = store_dir.parent / "tmp"
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([*launch, "-m", "nanochat.stages.base_train", f"--store={self.uri}", *FLAGS, *extra],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_checkpoint(self, step: int, timeout: float = 240):
        """Block until the checkpoint of `step` is complete (its meta.json is written last)."""
        meta = self.store_dir / CKPT / f"{step:06d}" / "meta.json"
        deadline = time.time() + timeout
        while not meta.exists():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before checkpoint {step}:\n{self.log[-3000:]}"
            assert time.time() < deadline, f"no checkpoint {step} after {timeout}s:\n{self.log[-3000:]}"
            time.sleep(0.005)

    def finish(self) -> str:
        code = self.wait()
        assert code == 0, self.log[-4000:]
        return self.log


def final_weights(store_dir: Path) -> dict:
    step, state, _ = load_model_state(open_store(f"file://{store_dir}"), "base")
    assert step == N
    return state


def assert_bit_exact(state: dict, reference: dict):
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def losses(store_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in load_history(open_store(f"file://{store_dir}"), "base_train") if "loss" in r}


def last_logged_step(log: str) -> int:
    return max(int(m) for m in re.findall(rf"step (\d+)/{N} loss", log))


def resumed_step(log: str) -> int:
    m = re.search(r"resumed from checkpoint \S+ \(step (\d+)\)", log)
    assert m, log[-3000:]
    return int(m.group(1))


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> tuple[dict, dict[int, float], str]:
    """W1: final weights, per-step losses and log of a run nobody stopped."""
    store_dir = fresh(prepared, tmp_path_factory.mktemp("w1") / "store")
    log = Run(store_dir).finish()
    return final_weights(store_dir), losses(store_dir), log


def test_uninterrupted_run_trains_and_skips_core_without_a_bundle(uninterrupted):
    _, loss, log = uninterrupted
    assert sorted(loss) == list(range(1, N + 1))
    assert sum(loss[s] for s in range(N - 9, N + 1)) < sum(loss[s] for s in range(1, 11))  # it learns
    assert log.count("CORE during training skipped: no eval bundle") == 1  # default cadence on, no bundle: once, not fatal
    assert "resumed" not in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kill_and_resume_is_bit_exact(prepared, tmp_path, uninterrupted, sig):
    reference, reference_losses, _ = uninterrupted
    store_dir = fresh(prepared, tmp_path / "store")
    run = Run(store_dir)
    run.wait_for_checkpoint(SAVE_EVERY)
    run.proc.send_signal(sig)
    code = run.wait()
    killed_log = run.log
    if sig == signal.SIGTERM:
        assert code == 143, killed_log[-3000:]
        stopped = int(re.search(r"stopped at step (\d+); checkpoint saved", killed_log).group(1))
        assert SAVE_EVERY <= stopped < N and CheckpointManager(open_store(run.uri), "base_train").latest() == stopped
    else:
        assert code == -signal.SIGKILL
        stopped = last_logged_step(killed_log)
    assert not (store_dir / "stages/base_train/done.json").exists()

    log = Run(store_dir).finish()
    start = resumed_step(log)
    redone = stopped - start
    assert 0 <= redone <= SAVE_EVERY and (sig != signal.SIGTERM or redone == 0)
    assert "step 0: val bpb" not in log  # a resumed run does not re-evaluate the starting model
    assert_bit_exact(final_weights(store_dir), reference)
    resumed_losses = {s: v for s, v in losses(store_dir).items() if s > start}
    assert resumed_losses == {s: v for s, v in reference_losses.items() if s > start}


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(prepared, tmp_path, uninterrupted):
    """A run stopped after step 20 whose newest checkpoint (20) is then truncated: the re-run names it,
    resumes from 15 and still ends bit-exact."""
    store_dir = fresh(prepared, tmp_path / "store")
    run = Run(store_dir, "--keep-checkpoints=3")
    run.wait_for_checkpoint(4 * SAVE_EVERY)
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    store = open_store(run.uri)
    newest = CheckpointManager(store, "base_train").latest()
    assert newest >= 4 * SAVE_EVERY
    model_file = store_dir / CKPT / f"{newest:06d}" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])

    log = Run(store_dir, "--keep-checkpoints=3").finish()
    assert f"checkpoint {store.uri(f'{CKPT}/{newest:06d}')} unusable" in log
    assert resumed_step(log) == newest - SAVE_EVERY
    assert_bit_exact(final_weights(store_dir), uninterrupted[0])


def test_checkpoints_of_another_config_are_deleted_not_resumed(prepared, tmp_path, uninterrupted):
    """Depth-3 checkpoints (another config hash), newer than anything this run writes: a fresh start
    deletes them, trains from step 0, and the base model downstream stages load is this run's."""
    from nanochat.gpt import GPT, GPTConfig
    store_dir = fresh(prepared, tmp_path / "store")
    store = open_store(f"file://{store_dir}")
    config = GPTConfig.from_depth(3, 512, 64, head_dim=64, window_pattern="L")
    other = GPT.create(config)
    for step in (N + 5, N + 10):
        CheckpointManager(store, "base_train").save(step, other.state_dict(), {}, {"model_config": config.to_dict(), "config_hash": "0123456789abcdef"})

    log = Run(store_dir).finish()
    assert log.count("deleted stale checkpoint") == 2 and "written by config 0123456789abcdef" in log
    assert "resumed" not in log and "step 0: val bpb" in log
    assert CheckpointManager(store, "base_train").steps()[-1] == N
    assert_bit_exact(final_weights(store_dir), uninterrupted[0])


def test_periodic_core_on_the_fixture_bundle(prepared, tmp_path):
    store_dir = fresh(prepared, tmp_path / "store")
    store = open_store(f"file://{store_dir}")
    put_bundle(store)
    log = Run(store_dir, "--num-iterations=10", "--core-metric-every=4", "--core-metric-max-per-task=3").finish()
    core = {r["step"]: r["core_metric"] for r in load_history(store, "base_train") if "core_metric" in r}
    assert sorted(core) == [4, 8, 10]  # every 4 steps and at the end, never before training
    assert all(-1.0 <= v <= 1.0 for v in core.values())
    assert len(re.findall(r"step \d+: CORE -?\d\.\d{4} \(4 tasks", log)) == 3
    done = store.get_json("stages/base_train/done.json")
    assert done["metrics"]["core_metric"] == core[10]
    assert "final CORE (3 per task)" in store.get_bytes("report/base_train.md").decode()


def test_two_ranks_sigterm_and_resume_is_bit_exact(prepared, tmp_path):
    """torchrun, 2 gloo ranks, fp32: SIGTERM to the launcher stops both ranks at one step with both
    optimizer shards saved; the re-run ends equal to an uninterrupted 2-rank run."""
    flags = [f"--num-iterations={N // 2}"]
    straight_dir = fresh(prepared, tmp_path / "straight")
    Run(straight_dir, *flags, nproc=2).finish()
    _, reference, _ = load_model_state(open_store(f"file://{straight_dir}"), "base")

    store_dir = fresh(prepared, tmp_path / "store")
    run = Run(store_dir, *flags, nproc=2)
    run.wait_for_checkpoint(SAVE_EVERY)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() != 0
    stopped = int(re.search(r"stopped at step (\d+); checkpoint saved", run.log).group(1))
    store = open_store(run.uri)
    doc = store.get_json(f"{CKPT}/{stopped:06d}/meta.json")
    assert doc["world_size"] == 2 and {"optim_rank0.pt", "optim_rank1.pt", "model.pt"} <= set(doc["files"])

    log = Run(store_dir, *flags, nproc=2).finish()
    assert resumed_step(log) == stopped
    step, state, _ = load_model_state(store, "base")
    assert step == N // 2
    assert_bit_exact(state, reference)
