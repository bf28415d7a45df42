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

from nanochat import common
from nanochat.checkpoint import CheckpointManager, load_model_state
from nanochat.report import load_history
from nanochat.store import open_store
from tests.faults.harness import prepare_store
from tests.test_core_eval import put_bundle

REPO = Path(__file__).resolve().parents[1]
N, SAVE_EVERY = 40, 5
FLAGS = ["--depth=2", "--head-dim=64", "--window-pattern=L", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=-1",
         f"--num-iterations={N}", "--eval-every=0", "--eval-tokens=512", f"--save-every={SAVE_EVERY}", "--log-every=1",
         "--core-metric-every=2000",  # the module default (tiny turns it off): on, with no bundle in these stores
         "--compile=false", "--device=cpu", "--dtype=float32", "--tokenizer-threads=1", "--seed=7"]
CKPT = "checkpoints/base_train"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A store folder with a trained tokenizer and text shards (8 train + 1 val), copied by each test."""
    return prepare_store(tmp_path_factory.mktemp("prepared") / "store")


def fresh(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


class Run:
    """base_train as a subprocess (1 process, or torchrun with `nproc` gloo ranks), log in a file."""

    def __init__(self, store_dir: Path, *extra: str, nproc: int = 1, env: dict | None = None):
        self.store_dir, self.uri = store_dir, f"file://{store_dir}"
        n = len(list(store_dir.parent.glob(f"{store_dir.name}.*.log")))
        self.log_path = store_dir.parent / f"{store_dir.name}.{n}.log"
        tmp = store_dir.parent / "tmp"
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), **(env or {}))
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
    m = re.search(r"resumed from checkpoint step (\d+) ", log)
    assert m, log[-3000:]
    return int(m.group(1))


STALE_HASH = "0123456789abcdef"


def put_stale_checkpoints(store):
    """Depth-3 checkpoints of another config hash, at steps past anything our runs write."""
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig.from_depth(3, 512, 64, head_dim=64, window_pattern="L")
    other = GPT.create(config)
    for step in (N + 5, N + 10):
        CheckpointManager(store, "base_train").save(step, other.state_dict(), {}, {"model_config": config.to_dict(), "config_hash": STALE_HASH})


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> tuple[dict, dict[int, float], str]:
    """W1: final weights, per-step losses and log of a run nobody stopped. Its store starts with stale
    checkpoints of another config (see test_stale_checkpoints_...); every other run's store is clean,
    so runs that end equal to W1 also show that those never leaked into it."""
    store_dir = fresh(prepared, tmp_path_factory.mktemp("w1") / "store")
    put_stale_checkpoints(open_store(f"file://{store_dir}"))
    log = Run(store_dir).finish()
    return final_weights(store_dir), losses(store_dir), log


def test_uninterrupted_run_trains_and_skips_core_without_a_bundle(uninterrupted):
    _, loss, log = uninterrupted
    assert sorted(loss) == list(range(1, N + 1))
    assert sum(loss[s] for s in range(N - 9, N + 1)) < sum(loss[s] for s in range(1, 11))  # it learns
    assert log.count("CORE during training skipped: no eval bundle") == 1  # cadence on, no bundle: once, not fatal


def test_stale_checkpoints_of_another_config_are_deleted_not_resumed(uninterrupted):
    """A fresh start next to depth-3 checkpoints (newer steps, another config hash) deletes them, trains
    from step 0, and the base model that later stages load is this run's (final_weights checks step N)."""
    _, _, log = uninterrupted
    assert log.count("deleted stale checkpoint") == 2 and f"written by config {STALE_HASH}" in log
    assert "resumed" not in log and "step 0: val bpb" in log


def test_sigterm_then_resume_is_bit_exact(prepared, tmp_path, uninterrupted):
    """SIGTERM mid-run: checkpoint at the current step, exit 143; the re-run redoes nothing and ends
    with W1's weights and losses, bit for bit."""
    reference, reference_losses, _ = uninterrupted
    store_dir = fresh(prepared, tmp_path / "store")
    run = Run(store_dir)
    run.wait_for_checkpoint(SAVE_EVERY)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.log[-3000:]
    stopped = int(re.search(r"stopped at step (\d+); checkpoint saved", run.log).group(1))
    assert SAVE_EVERY <= stopped < N and CheckpointManager(open_store(run.uri), "base_train").latest() == stopped
    assert not (store_dir / "stages/base_train/done.json").exists()

    log = Run(store_dir).finish()
    assert resumed_step(log) == stopped  # steps redone: 0
    assert "step 0: val bpb" not in log  # a resumed run does not re-evaluate the starting model
    assert_bit_exact(final_weights(store_dir), reference)
    assert {s: v for s, v in losses(store_dir).items() if s > stopped} == {s: v for s, v in reference_losses.items() if s > stopped}


def test_sigkill_then_resume_is_bit_exact_even_with_the_newest_checkpoint_corrupted(prepared, tmp_path, uninterrupted):
    """SIGKILL (no graceful save): the re-run resumes from the newest checkpoint, at most save_every steps
    back, and ends bit-exact. Then the same once more with that newest checkpoint's model.pt truncated:
    the re-run names it, falls back to the previous checkpoint and still ends bit-exact."""
    reference, reference_losses, _ = uninterrupted
    for attempt, corrupt in enumerate((False, True)):
        store_dir = fresh(prepared, tmp_path / f"store{attempt}")
        store = open_store(f"file://{store_dir}")
        run = Run(store_dir)
        run.wait_for_checkpoint(2 * SAVE_EVERY)
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        stopped, newest = last_logged_step(run.log), CheckpointManager(store, "base_train").latest()
        assert 2 * SAVE_EVERY <= newest <= stopped < N
        if corrupt:
            model_file = store_dir / CKPT / f"{newest:06d}" / "model.pt"
            model_file.write_bytes(model_file.read_bytes()[:1000])

        log = Run(store_dir).finish()
        start = resumed_step(log)
        if corrupt:
            assert f"checkpoint {store.uri(f'{CKPT}/{newest:06d}')} unusable" in log
            assert start == newest - SAVE_EVERY
        else:
            assert start == newest and stopped - start <= SAVE_EVERY  # steps redone
        assert_bit_exact(final_weights(store_dir), reference)
        assert {s: v for s, v in losses(store_dir).items() if s > start} == {s: v for s, v in reference_losses.items() if s > start}


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
    optimizer shards saved; the re-run (with another --save-every, which is bookkeeping, not config)
    ends equal to an uninterrupted 2-rank run."""
    flags, env = ["--num-iterations=20"], {"NANOCHAT_PG_TIMEOUT_S": "300"}
    straight_dir = fresh(prepared, tmp_path / "straight")
    Run(straight_dir, *flags, nproc=2, env=env).finish()
    _, reference, _ = load_model_state(open_store(f"file://{straight_dir}"), "base")

    store_dir = fresh(prepared, tmp_path / "store")
    run = Run(store_dir, *flags, "--save-every=2", nproc=2, env=env)
    run.wait_for_checkpoint(2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() != 0
    stopped = int(re.search(r"stopped at step (\d+); checkpoint saved", run.log).group(1))
    assert 2 <= stopped < 20
    store = open_store(run.uri)
    doc = store.get_json(f"{CKPT}/{stopped:06d}/meta.json")
    assert doc["world_size"] == 2 and {"optim_rank0.pt", "optim_rank1.pt", "model.pt"} <= set(doc["files"])

    log = Run(store_dir, *flags, nproc=2, env=env).finish()
    assert resumed_step(log) == stopped
    step, state, _ = load_model_state(store, "base")
    assert step == 20
    assert_bit_exact(state, reference)


# ----------------------------------------------------------------------------- stage wiring: dtype, process group timeout

def test_compute_dtype_rules_are_shared_by_the_stage_and_the_model(monkeypatch):
    from nanochat.gpt import compute_dtype_for
    cpu = torch.device("cpu")
    assert common.compute_dtype(cpu) == compute_dtype_for(cpu) == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert common.compute_dtype(cpu) == compute_dtype_for(cpu) == torch.bfloat16
    assert common.compute_dtype(cpu, "float32") == compute_dtype_for(cpu, torch.float32) == torch.float32  # explicit wins
    for name in ("float16", "fp16"):
        monkeypatch.setenv("NANOCHAT_DTYPE", name)
        for resolve in (lambda: common.compute_dtype(cpu), lambda: compute_dtype_for(cpu)):
            with pytest.raises(ValueError, match=f"{name}.* not supported.*bfloat16"):
                resolve()
    with pytest.raises(ValueError, match="not supported"):
        compute_dtype_for(cpu, torch.float16)


def test_bf16_mixed_trains_fp32_weights_with_bf16_matmuls(prepared, tmp_path, uninterrupted):
    """--dtype=bf16-mixed: the start line says so, the checkpoint holds fp32 weights, and training follows the fp32
    run closely but not bit for bit (its matmuls round to bf16)."""
    reference, reference_loss, _ = uninterrupted
    store_dir = fresh(prepared, tmp_path / "store")
    log = Run(store_dir, "--dtype=bf16-mixed").finish()
    assert "dtype=bf16-mixed" in log
    state, loss = final_weights(store_dir), losses(store_dir)
    assert all(t.dtype == reference[name].dtype for name, t in state.items())
    assert any(not torch.equal(t, reference[name]) for name, t in state.items())
    early = [s for s in loss if s <= 5]  # before rounding compounds: step for step within 1%
    assert early and all(abs(loss[s] - reference_loss[s]) < 0.01 * reference_loss[s] for s in early), (loss, reference_loss)
    late = [s for s in loss if s > N - 10]  # 40 steps at this lr are chaotic: the two paths drift 5-8% apart on some CPUs
    mixed, fp32 = (sum(run[s] for s in late) / len(late) for run in (loss, reference_loss))
    assert abs(mixed - fp32) < 0.12 * fp32, (mixed, fp32)


def test_the_model_computes_in_the_stage_dtype(tmp_path, capsys):
    from nanochat.config import parse_config
    from nanochat.stages import base_train
    cfg = parse_config(base_train.Config, ["--depth=2", "--head-dim=64", "--max-seq-len=32"], "base_train")
    model, _ = base_train.build_model(cfg, 300, "cpu", torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    model.to("cpu")  # moving the model keeps the stage's choice instead of re-deriving it from the device
    assert model.compute_dtype == torch.bfloat16
    assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.float32  # logits stay fp32
    assert base_train.build_model(cfg, 300, "cpu")[0].compute_dtype == torch.float32
    assert base_train.main([f"--store=file://{tmp_path}/s", "--dtype=float16"]) == 2
    assert "float16" in capsys.readouterr().err


def test_process_group_timeout_comes_from_the_environment(monkeypatch):
    import datetime
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    common.init_distributed(torch.device("cpu"))
    monkeypatch.setenv("NANOCHAT_PG_TIMEOUT_S", "90")
    common.init_distributed(torch.device("cpu"))
    assert [c["timeout"] for c in calls] == [datetime.timedelta(seconds=1800), datetime.timedelta(seconds=90)]
    assert calls[0]["backend"] == "gloo"
    monkeypatch.setenv("NANOCHAT_PG_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="NANOCHAT_PG_TIMEOUT_S='soon'"):
        common.init_distributed(torch.device("cpu"))
