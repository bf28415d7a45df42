"""Fault-injection harness shared by tests/faults/ and bench/chaos.py.

- `prepare_store(dir)`: a trained tokenizer and text shards, copied into every scenario's store.
- `S3Lab`: moto on 127.0.0.1 behind a `ChaosProxy` (tests/s3util.FaultProxy plus delays, gates that
  hold one request until released, and HEAD answered with the real Content-Length so pyarrow works).
- `Train`: base_train as a process (one rank, or torchrun --nproc_per_node=N on gloo), CPU fp32.
- `audit(store)`: nothing partial is visible (checkpoints, manifests, shard index: files exist, digests match).
- `Lab` + the scenario functions: each injects one kind of fault and returns a `Result` row; the tests
  assert on it, bench/chaos.py prints the rows as a table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.s3util import FaultProxy, MotoServer, free_port  # noqa: E402

N, SAVE_EVERY = 30, 5   # base_train steps and checkpoint interval of every scenario
CKPT = "checkpoints/base_train"
FLAGS = ["--depth=2", "--head-dim=64", "--window-pattern=L", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=-1",
         f"--num-iterations={N}", "--eval-every=0", "--eval-tokens=512", f"--save-every={SAVE_EVERY}", "--log-every=1",
         "--core-metric-every=0", "--compile=false", "--device=cpu", "--dtype=float32", "--tokenizer-threads=1", "--seed=7"]
S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
RUN_TIMEOUT_S = 240.0
TRANSIENT = (("status", 503, "SlowDown"), ("status", 500, "InternalError"), ("status", 503, "ServiceUnavailable"), "reset", "truncate", "delay")


# ----------------------------------------------------------------------------- stores

def prepare_store(root: Path) -> Path:
    """A store folder with a small trained tokenizer and text shards (8 train + 1 val)."""
    from nanochat.dataset import ShardWriter
    from nanochat.store import open_store
    from tests.fixtures import make_tokenizer, small_texts
    store = open_store(f"file://{root}")
    texts = small_texts(400)
    make_tokenizer(store, vocab_size=512, texts=texts)
    writer = ShardWriter(store, "test", shard_chars=60_000, row_group_rows=32)
    for text in texts:
        writer.add(text)
    writer.finish()
    return root


def copy_into(src_dir: Path, store):
    """Upload every file of a prepared folder into any store (file:// or s3://)."""
    for path in sorted(p for p in Path(src_dir).rglob("*") if p.is_file()):
        store.put_file(path.relative_to(src_dir).as_posix(), path)


def audit(store) -> list[str]:
    """Everything a reader can see is whole: problems found (empty = clean).

    Every checkpoint step directory is either complete (meta.json present, every file it names present
    with that sha256) or invisible (no meta.json); manifests likewise; the shard index matches its shards."""
    from nanochat.store import StoreError
    problems = []
    keys = store.list("")
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if name.endswith((".tmp", ".part")):
            problems.append(f"temporary object visible: {store.uri(key)}")
        if name == "manifest.json" or (name == "meta.json" and key.startswith("checkpoints/")):
            prefix = key.rsplit("/", 1)[0]
            try:
                doc = store.get_json(key)
            except (StoreError, ValueError) as e:
                problems.append(f"unreadable {store.uri(key)}: {e}")
                continue
            for fname, entry in doc.get("files", {}).items():
                try:
                    store.get_bytes(f"{prefix}/{fname}", sha256=entry["sha256"])
                except StoreError as e:
                    problems.append(f"{store.uri(key)} names {fname}: {str(e).splitlines()[0]}")
    if "data/shards/index.json" in keys:
        for entry in store.get_json("data/shards/index.json")["shards"]:
            try:
                store.get_bytes(entry["key"], sha256=entry["sha256"])
            except StoreError as e:
                problems.append(f"shard index: {str(e).splitlines()[0]}")
    return problems


def torn_checkpoints(store) -> list[str]:
    """Checkpoint step directories without meta.json (invisible to readers, but left behind)."""
    steps = {}
    for key in store.list(CKPT + "/"):
        step, _, name = key[len(CKPT) + 1:].partition("/")
        steps.setdefault(step, set()).add(name)
    return sorted(s for s, names in steps.items() if "meta.json" not in names)


# ----------------------------------------------------------------------------- S3 on loopback

class ChaosProxy(FaultProxy):
    """FaultProxy, plus: the policy may return ("delay", seconds) or "delay" to slow a request, and `gate(match)`
    holds one request until released."""

    def __init__(self, upstream_port: int, policy=None):
        super().__init__(upstream_port, None)
        self.user_policy = policy or (lambda method, path, n: None)
        self.gates: list[Gate] = []
        self.policy = self._decide

    def _decide(self, method, path, n):
        for gate in self.gates:
            if gate.matches(method, path):
                return gate.hold()
        action = self.user_policy(method, path, n)
        if action == "delay" or (isinstance(action, tuple) and action[0] == "delay"):
            time.sleep(action[1] if isinstance(action, tuple) else 0.2)
            self.injected.append((method, path, action))
            return None
        return action

    def gate(self, method: str, path_suffix: str) -> "Gate":
        g = Gate(method, path_suffix)
        self.gates.append(g)
        return g

    @property
    def faults(self) -> int:
        return len(self.injected)


class Gate:
    """Holds the first request matching (method, path suffix) until `release(action)`; `arrived` is set when it comes."""

    def __init__(self, method: str, path_suffix: str):
        self.method, self.suffix = method, path_suffix
        self.arrived, self._released = threading.Event(), threading.Event()
        self.action = None
        self.used = False
        self._lock = threading.Lock()

    def matches(self, method, path) -> bool:
        with self._lock:
            if self.used or method != self.method or not path.split("?")[0].endswith(self.suffix):
                return False
            self.used = True
            return True

    def hold(self):
        self.arrived.set()
        self._released.wait(RUN_TIMEOUT_S)
        return self.action

    def release(self, action=None):
        """Let the held request go on: None forwards it, "reset" drops it (the upload never lands)."""
        self.action = action
        self._released.set()


def chaos_policy(seed: int, rate: float, actions=TRANSIENT, spare=(".nanochat-probe",)):
    """Seeded: a random transient fault on `rate` of the requests (never on the reachability probe,
    which fails fast by design)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def policy(method, path, n):
        if any(s in path for s in spare):
            return None
        with lock:
            if rng.random() >= rate:
                return None
            action = rng.choice(actions)
            return ("delay", round(rng.uniform(0.05, 0.5), 2)) if action == "delay" else action
    return policy


class S3Lab:
    """moto on 127.0.0.1 with a ChaosProxy in front; `env` points boto3/pyarrow at the proxy."""

    def __init__(self, moto: MotoServer | None = None):
        self.own_moto = moto is None
        self.moto = moto or MotoServer().start()
        self.proxies: list[ChaosProxy] = []

    def bucket(self) -> str:
        import boto3
        name = f"chaos-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return name

    def proxy(self, policy=None) -> ChaosProxy:
        p = ChaosProxy(self.moto.port, policy).start()
        self.proxies.append(p)
        return p

    def env(self, endpoint: str, creds: dict | None = None) -> dict:
        return {**(creds or S3_CREDS), "AWS_ENDPOINT_URL": endpoint}

    def store(self, uri: str, endpoint: str | None = None, creds: dict | None = None):
        """A Store in this process for uri (direct to moto unless an endpoint is given)."""
        from nanochat.store import open_store
        with patched_env(self.env(endpoint or self.moto.url, creds)):
            return open_store(uri)

    def close(self):
        for p in self.proxies:
            p.stop()
        if self.own_moto:
            self.moto.stop()


class patched_env:
    """os.environ with some keys set, restored on exit (boto3 clients read the environment when created)."""

    def __init__(self, values: dict):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- base_train as a process

def subprocess_env(workdir: Path, extra: dict | None = None) -> dict:
    """One thread, scratch and compile caches inside the scenario's folder, no stray AWS/NANOCHAT settings."""
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NANOCHAT_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TMPDIR=str(tmp),
               TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), NANOCHAT_BASE_DIR=str(workdir / "base"),
               AWS_CONFIG_FILE=str(workdir / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-aws-credentials"),
               NANOCHAT_STORE_RETRIES="6")
    env.update(extra or {})
    return env


class Train:
    """base_train as a subprocess: one process, or torchrun with `nproc` gloo ranks; output in a log file.
    `launcher` replaces `python -m nanochat.stages.base_train` (e.g. a bootstrap that injects a fault)."""

    def __init__(self, uri: str, workdir: Path, *extra: str, nproc: int = 1, env: dict | None = None,
                 launcher: list[str] | None = None, preexec_fn=None):
        self.uri, self.workdir, self.nproc = uri, Path(workdir), nproc
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"train.{len(list(self.workdir.glob('train.*.log')))}.log"
        if launcher is None:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            launcher = [*(torchrun if nproc > 1 else [sys.executable]), "-m", "nanochat.stages.base_train"]
        self.argv = [*launcher, f"--store={uri}", *FLAGS, *extra]  # later flags win
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=subprocess_env(self.workdir, env), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"base_train still running after {timeout}s:\n{self.log[-3000:]}") from None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self) -> str:
        code = self.wait()
        assert code == 0, f"exit {code}:\n{self.log[-4000:]}"
        return self.log

    def wait_for(self, predicate, what: str, timeout: float = RUN_TIMEOUT_S):
        deadline = time.time() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.log[-3000:]}"
            assert time.time() < deadline, f"no {what} after {timeout}s:\n{self.log[-3000:]}"
            time.sleep(0.005)

    def wait_for_step(self, step: int, timeout: float = RUN_TIMEOUT_S):
        self.wait_for(lambda: last_logged_step(self.log) >= step, f"step {step}", timeout)

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of torchrun's worker processes (read from their environment)."""
        out = {}
        for child in children(self.proc.pid):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    out[int(item[5:])] = child
        return out

    def kill_all(self):
        for pid in [*children(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def last_logged_step(log: str) -> int:
    steps = [int(m) for m in re.findall(rf"\] step (\d+)/{N} loss", log)]
    return max(steps, default=0)


def resumed_step(log: str) -> int | None:
    line = next((ln for ln in log.splitlines() if "resumed from checkpoint" in ln), None)
    m = re.search(r"step (\d+)", line or "")
    return int(m.group(1)) if m else None


def final_state(store) -> tuple[int, dict]:
    from nanochat.checkpoint import load_model_state
    step, state, _ = load_model_state(store, "base")
    return step, state


def same_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "error:" in line.lower()]


# ----------------------------------------------------------------------------- scenarios

@dataclasses.dataclass
class Result:
    """One row of the chaos table, plus whether every expectation of the scenario held."""
    fault: str
    injected: str = ""
    survived: str = ""     # "yes" (ended equal to an uninterrupted run) | "clear error" | "detected" | "NO: why"
    data_lost: str = "-"   # "none", or what was lost / visible when it should not be
    steps_redone: str = "-"  # steps trained twice because of the fault
    ok: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)
    message: str = ""      # the error line of the clear-error scenarios
    exit_code: int | None = None
    log: str = dataclasses.field(default="", repr=False)

    def expect(self, cond: bool, what: str) -> bool:
        if not cond:
            self.ok = False
            self.notes.append(what)
        return bool(cond)

    def conclude(self, success: str) -> "Result":
        self.survived = success if self.ok else "NO: " + "; ".join(self.notes)
        return self

    def explain(self) -> str:
        return "\n".join(self.notes) + (f"\n--- log tail ---\n{self.log[-3000:]}" if self.log else "")


def meta_key(step: int) -> str:
    return f"{CKPT}/{step:06d}/meta.json"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class Lab:
    """What scenarios share: the prepared store, reference weights of uninterrupted runs (per world size, computed
    once), S3 on loopback, one folder per scenario."""

    def __init__(self, workdir: Path, moto: MotoServer | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepared = prepare_store(self.workdir / "prepared")
        self._refs: dict[int, dict] = {}
        self._s3: S3Lab | None = None
        self._moto = moto

    @property
    def s3(self) -> S3Lab:
        if self._s3 is None:
            self._s3 = S3Lab(self._moto)
        return self._s3

    def folder(self, name: str) -> Path:
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def file_store(self, name: str) -> tuple[str, Path]:
        work = self.folder(name)
        shutil.copytree(self.prepared, work / "store")
        return f"file://{work / 'store'}", work

    def s3_store(self, name: str) -> tuple[str, Path]:
        uri = f"s3://{self.s3.bucket()}/run"
        copy_into(self.prepared, self.s3.store(uri))
        return uri, self.folder(name)

    def reference(self, nproc: int = 1) -> dict:
        if nproc not in self._refs:
            from nanochat.store import open_store
            uri, work = self.file_store(f"reference-{nproc}")
            Train(uri, work, nproc=nproc).finish()
            step, self._refs[nproc] = final_state(open_store(uri))
            assert step == N, step
        return self._refs[nproc]

    def check_resumed(self, r: Result, store, nproc: int, log: str, stopped_at: int, allowed_redo: int = SAVE_EVERY) -> Result:
        """The re-run resumed (did not restart), redid at most `allowed_redo` steps, ended with the uninterrupted
        run's weights (torch.equal), wrote done.json, and the store shows nothing partial."""
        start = resumed_step(log)
        r.expect(start is not None, "the re-run did not resume from a checkpoint")
        redone = max(0, stopped_at - (start or 0))
        r.steps_redone = str(redone)
        r.expect(redone <= allowed_redo, f"{redone} steps redone > {allowed_redo}")
        step, state = final_state(store)
        equal = step == N and same_weights(state, self.reference(nproc))
        r.expect(equal, "final weights differ from the uninterrupted run")
        problems = audit(store)
        r.expect(not problems, "audit: " + "; ".join(problems[:3]))
        r.expect(store.exists("stages/base_train/done.json"), "no done.json after the re-run")
        r.data_lost = "none" if equal and not problems else "final weights differ" if not equal else "partial objects visible"
        return r.conclude("yes")

    def close(self):
        if self._s3 is not None:
            self._s3.close()


# --- process faults

def sigkill_one_rank(lab: Lab, rank: int, seed: int = 0) -> Result:
    """torchrun --nproc_per_node=2: SIGKILL one rank mid-step. torchrun tears the job down (non-zero exit, no rank
    left, no done.json, nothing half-visible); the re-run resumes and ends equal to an uninterrupted 2-rank run."""
    from nanochat.store import open_store
    r = Result(f"SIGKILL rank {rank} of 2 mid-step (torchrun, gloo)", "1 SIGKILL")
    lab.reference(2)
    uri, work = lab.file_store(f"sigkill-rank{rank}")
    store = open_store(uri)
    run = Train(uri, work, nproc=2)
    run.wait_for(lambda: store.exists(meta_key(2 * SAVE_EVERY)), f"checkpoint {2 * SAVE_EVERY}")
    run.wait_for_step(2 * SAVE_EVERY + 1 + seed % 3)
    time.sleep(random.Random(seed).uniform(0.0, 0.05))  # somewhere inside the next step
    pids = run.rank_pids()
    if not r.expect(set(pids) == {0, 1}, f"rank pids {pids}"):
        run.kill_all()
        return r.conclude("yes")
    os.kill(pids[rank], signal.SIGKILL)
    code = run.wait()
    stopped = last_logged_step(run.log)
    r.log = run.log
    r.expect(code != 0, f"torchrun exited {code} after a rank was killed")
    # the surviving rank says "peer rank died; re-run to resume" (or stops on torchrun's SIGTERM), never a traceback
    r.expect(not re.search(r'File "[^"]*/nanochat/', run.log), "the surviving rank printed a traceback")
    r.expect(stopped < N, "the run finished before the kill landed")
    r.expect(not any(pid_alive(p) for p in pids.values()), "a rank outlived torchrun")
    r.expect(not store.exists("stages/base_train/done.json"), "done.json written by a failed job")
    problems = audit(store)
    r.expect(not problems, "after the kill: " + "; ".join(problems[:3]))
    log = Train(uri, work, nproc=2).finish()
    return lab.check_resumed(r, store, 2, log, stopped)


def sigterm_mid_step(lab: Lab) -> Result:
    """Pod preemption between checkpoints (1 rank): checkpoint at the current step, exit 143, nothing redone.
    (tests/test_base_train.py covers this with more detail; here it is a row of the chaos table.)"""
    from nanochat.store import open_store
    r = Result("SIGTERM mid-step (pod preemption)", "1 SIGTERM")
    uri, work = lab.file_store("sigterm")
    store = open_store(uri)
    run = Train(uri, work)
    run.wait_for_step(SAVE_EVERY + 2)
    run.proc.send_signal(signal.SIGTERM)
    code = run.wait()
    r.log = run.log
    r.expect(code == 143, f"exit {code}, expected 143")
    log = Train(uri, work).finish()
    return lab.check_resumed(r, store, 1, log, last_logged_step(run.log), allowed_redo=0)


def runner_killed(lab: Lab) -> Result:
    """The runner (`nanochat speedrun`'s driver) SIGKILLed while base_train runs: the stage survives in its own
    session; the restarted runner adopts it instead of starting a duplicate, and the run ends as if uninterrupted."""
    from nanochat.runner import STATE_KEY
    from nanochat.store import open_store
    r = Result("runner SIGKILLed mid-stage, restarted", "1 SIGKILL (runner)")
    uri, work = lab.file_store("runner-kill")
    store = open_store(uri)
    spec = json.dumps({"steps": [{"name": "base_train", "module": "base_train", "args": FLAGS}], "profile": "tiny"})

    def runner(name):
        with open(work / f"{name}.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", "tests.fake_stages.pipeline_main", uri, spec], cwd=REPO,
                                    env=subprocess_env(work), stdout=log, stderr=subprocess.STDOUT)
    first = runner("runner1")
    deadline = time.time() + RUN_TIMEOUT_S
    while not store.exists(meta_key(SAVE_EVERY)):
        assert first.poll() is None and time.time() < deadline, (work / "runner1.log").read_text()[-3000:]
        time.sleep(0.01)
    stage_pid = store.get_json(STATE_KEY)["steps"]["base_train"]["pid"]
    os.kill(stage_pid, signal.SIGSTOP)  # a long stage: still running when the new runner looks
    first.send_signal(signal.SIGKILL)
    first.wait()
    r.expect(pid_alive(stage_pid), "the stage died with its runner")
    second = runner("runner2")
    while "adopting running process" not in (work / "runner2.log").read_text() and second.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(stage_pid, signal.SIGCONT)
    code = second.wait(RUN_TIMEOUT_S)
    r.log = (work / "runner2.log").read_text()
    r.expect(code == 0, f"the restarted runner exited {code}")
    r.expect("adopting running process" in r.log, "the restarted runner did not adopt the running stage")
    state = store.get_json(STATE_KEY)["steps"]["base_train"]
    r.expect(state["attempts"] == 1, f"{state['attempts']} attempts: the stage was started again")
    step, weights = final_state(store)
    equal = step == N and same_weights(weights, lab.reference(1))
    r.expect(equal, "final weights differ from an uninterrupted run")
    problems = audit(store)
    r.expect(not problems, "audit: " + "; ".join(problems[:3]))
    r.data_lost, r.steps_redone = ("none" if equal and not problems else "yes"), "0"
    return r.conclude("yes")


def _gated_s3_run(lab: Lab, name: str, step: int):
    """base_train on S3 whose PUT of checkpoint `step`'s model.pt is held at the proxy: the write is in flight."""
    uri, work = lab.s3_store(name)
    proxy = lab.s3.proxy()
    gate = proxy.gate("PUT", f"{CKPT}/{step:06d}/model.pt")
    run = Train(uri, work, env=lab.s3.env(proxy.url))
    if not gate.arrived.wait(RUN_TIMEOUT_S):
        run.kill_all()
        raise AssertionError(f"the checkpoint write never came:\n{run.log[-3000:]}")
    return uri, work, gate, run


def sigterm_during_checkpoint_write(lab: Lab, step: int = 2 * SAVE_EVERY) -> Result:
    """SIGTERM while a checkpoint is uploading: the save is shielded from the signal, so that checkpoint completes,
    the stage exits 143 right after it, and the re-run redoes nothing."""
    r = Result("SIGTERM during a checkpoint write (S3)", "1 SIGTERM")
    uri, work, gate, run = _gated_s3_run(lab, "sigterm-ckpt", step)
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the handler has run while the upload is still held
    gate.release()
    code = run.wait()
    r.log = run.log
    store = lab.s3.store(uri)
    r.expect(code == 143, f"exit {code}, expected 143")
    r.expect(f"stopped at step {step}" in run.log, f"no 'stopped at step {step}' line")
    r.expect(store.exists(meta_key(step)), f"checkpoint {step} (in flight at SIGTERM) is not complete")
    r.expect(not store.exists("stages/base_train/done.json"), "done.json written by an interrupted run")
    log = Train(uri, work, env=lab.s3.env(lab.s3.moto.url)).finish()
    return lab.check_resumed(r, store, 1, log, last_logged_step(run.log), allowed_redo=0)


def sigkill_during_checkpoint_write(lab: Lab, step: int = 2 * SAVE_EVERY) -> Result:
    """SIGTERM during a checkpoint upload, then SIGKILL before it lands (the grace period ran out): the torn
    checkpoint never becomes visible, the re-run resumes from the previous one and redoes <= save_every steps."""
    from nanochat.checkpoint import CheckpointManager
    r = Result("SIGTERM, then SIGKILL during a checkpoint write (S3)", "SIGTERM + SIGKILL")
    uri, work, gate, run = _gated_s3_run(lab, "sigkill-ckpt", step)
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    gate.release("reset")  # the upload never completes
    r.log = run.log
    store = lab.s3.store(uri)
    latest = CheckpointManager(store, "base_train").latest()
    r.expect(latest == step - SAVE_EVERY, f"newest complete checkpoint is {latest}, expected {step - SAVE_EVERY}")
    r.expect(not store.exists(meta_key(step)), f"torn checkpoint {step} is visible")
    problems = audit(store)
    r.expect(not problems, "after the kill: " + "; ".join(problems[:3]))
    log = Train(uri, work, env=lab.s3.env(lab.s3.moto.url)).finish()
    return lab.check_resumed(r, store, 1, log, last_logged_step(run.log))


# --- storage faults

def s3_chaos(lab: Lab, seed: int, rate: float = 0.1) -> Result:
    """base_train through the proxy with seeded random 500/503/SlowDown, delays, resets and truncated bodies on
    every request (shard reads by pyarrow, checkpoint writes by boto3): it completes equal to a fault-free run."""
    r = Result(f"S3 chaos: {rate:.0%} of requests fail or stall (seed {seed})")
    uri, work = lab.s3_store(f"chaos-{seed}")
    policy = chaos_policy(seed, rate)
    # the first shard read and the first checkpoint write always fail once, so both paths are exercised
    firsts = {("GET", "/data/shards/shard_"): ("status", 503, "SlowDown"), ("PUT", f"/{CKPT}/"): ("status", 500, "InternalError")}

    def scripted(method, path, n):
        for (m, part), action in list(firsts.items()):
            if m == method and part in path and firsts.pop((m, part), None):
                return action
        return policy(method, path, n)
    proxy = lab.s3.proxy(scripted)
    run = Train(uri, work, env=lab.s3.env(proxy.url))
    code = run.wait()
    r.log, injected = run.log, list(proxy.injected)
    r.injected = f"{len(injected)} faults / {proxy.count} requests"
    r.expect(code == 0, f"exit {code}: " + " | ".join(error_lines(run.log)[-2:]))
    r.expect(any("/data/shards/" in p for _, p, _ in injected), "no fault hit a shard read")
    r.expect(any(m == "PUT" and f"/{CKPT}/" in p for m, p, _ in injected), "no fault hit a checkpoint write")
    if code == 0:
        store = lab.s3.store(uri)
        step, state = final_state(store)
        equal = step == N and same_weights(state, lab.reference(1))
        r.expect(equal, "final weights differ from a fault-free run")
        problems = audit(store)
        r.expect(not problems, "audit: " + "; ".join(problems[:3]))
        r.data_lost = "none" if equal and not problems else "yes"
        r.steps_redone = "0"
    return r.conclude("yes")


def expect_clear_error(r: Result, run: Train, names: str | None) -> Result:
    """A fatal problem ends the stage with ONE error line (naming the object or bucket), no traceback, exit != 0."""
    code = run.wait()
    log = run.log
    errors = error_lines(log)
    r.message, r.exit_code, r.log = (errors[0] if errors else ""), code, log
    r.expect(code != 0, f"exit code {code}")
    tb = log[log.find("Traceback"):].strip().splitlines() if "Traceback" in log else []
    r.expect(not tb, f"a traceback was printed, ending: {tb[-1][:160] if tb else ''}")
    r.expect(len(errors) == 1, f"{len(errors)} error lines: {errors[:3]}")
    if names:
        r.expect(any(names in e for e in errors), f"the error does not name {names}: {errors[:1]}")
    r.data_lost = "none"
    return r


def missing_bucket(lab: Lab) -> Result:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    r = Result("S3 bucket does not exist", "missing bucket")
    run = Train(f"s3://{bucket}/run", lab.folder("missing-bucket"), env=lab.s3.env(lab.s3.moto.url))
    return expect_clear_error(r, run, f"s3://{bucket}").conclude("clear error")


def endpoint_unreachable(lab: Lab) -> Result:
    r = Result("S3 endpoint unreachable", "connection refused")
    run = Train("s3://bucket/run", lab.folder("unreachable"), env=lab.s3.env(f"http://127.0.0.1:{free_port()}"))
    return expect_clear_error(r, run, "s3://bucket/run").conclude("clear error")


def access_denied(lab: Lab, mid_run: bool = False) -> Result:
    """403 from S3: bad credentials (every request), or a bucket policy that denies checkpoint writes mid-run."""
    from nanochat.checkpoint import CheckpointManager
    uri, work = lab.s3_store("denied")
    if mid_run:
        r = Result("S3 access denied mid-run (policy forbids checkpoint writes)")
        proxy = lab.s3.proxy(lambda m, p, n: ("status", 403, "AccessDenied") if m == "PUT" and f"/{CKPT}/" in p else None)
        names = f"{uri}/{CKPT}/"
    else:
        r = Result("S3 access denied (bad credentials)")
        proxy = lab.s3.proxy(lambda m, p, n: ("status", 403, "InvalidAccessKeyId"))
        names = uri
    expect_clear_error(r, Train(uri, work, env=lab.s3.env(proxy.url)), names)
    r.injected = f"{len(proxy.injected)} x 403"
    if mid_run:
        store = lab.s3.store(uri)
        r.expect(CheckpointManager(store, "base_train").latest() is None, "a checkpoint became visible")
        problems = audit(store)
        r.expect(not problems, "audit: " + "; ".join(problems[:3]))
    return r.conclude("clear error")


# a full disk under the store: the first fsync of a checkpoint file fails (writes reach the page cache, then ENOSPC)
ENOSPC_LAUNCHER = """
import errno, os, sys
store_dir, match = sys.argv[1], sys.argv[2]
real_fsync = os.fsync
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if path.startswith(store_dir) and match in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_fsync(fd)
os.fsync = fsync
from nanochat.stages.base_train import main
sys.exit(main(sys.argv[3:]))
"""


def disk_full(lab: Lab) -> Result:
    """The store's disk is full when the first checkpoint is written: one clear error, nothing partial left."""
    from nanochat.store import open_store
    r = Result("disk full under a file:// store (ENOSPC)", "ENOSPC on checkpoint write")
    uri, work = lab.file_store("disk-full")
    store_dir = uri[len("file://"):]
    run = Train(uri, work, launcher=[sys.executable, "-c", ENOSPC_LAUNCHER, store_dir, f"/{CKPT}/"])
    expect_clear_error(r, run, f"{uri}/{CKPT}/")
    r.expect(not list(Path(store_dir).rglob("*.tmp")), "temp files left in the store")
    r.expect(not open_store(uri).list(f"{CKPT}/"), "checkpoint objects visible after ENOSPC")
    return r.conclude("clear error")


def scratch_full(lab: Lab, limit_bytes: int = 1 << 20) -> Result:
    """Local scratch space runs out (ulimit -f: every write past 1 MiB fails with EFBIG, as a full emptyDir does)."""
    import resource
    r = Result("scratch disk full (ulimit -f, EFBIG)", "EFBIG")
    uri, work = lab.file_store("efbig")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    expect_clear_error(r, Train(uri, work, preexec_fn=limit), None)
    return r.conclude("clear error")


# --- corruption (in-process: checkpoints and shards in a store)

def tiny_checkpoints(store, steps=(1, 2, 3), stage: str = "corrupt_test") -> tuple:
    """Complete checkpoints of a tiny GPT at `steps` (each a different init), like a training stage writes them."""
    import torch
    from nanochat.checkpoint import CheckpointManager
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig.from_depth(1, 64, 16, head_dim=32, window_pattern="L")
    ckpt = CheckpointManager(store, stage, keep=len(steps))
    states = {}
    for s in steps:
        torch.manual_seed(s)
        states[s] = GPT.create(config).state_dict()
        ckpt.save(s, states[s], {"step": s}, {"model_config": config.to_dict(), "config_hash": "x"})
    return ckpt, states


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


CORRUPTIONS = {
    "truncated model file": lambda store, p: store.put_bytes(f"{p}/model.pt", store.get_bytes(f"{p}/model.pt")[:1000]),
    "missing meta.json": lambda store, p: store.delete(f"{p}/meta.json"),
    "digest mismatch (one byte flipped)": lambda store, p: store.put_bytes(
        f"{p}/optim_rank0.pt", _flip_byte(store.get_bytes(f"{p}/optim_rank0.pt"), 100)),
    "unparseable meta.json": lambda store, p: store.put_bytes(f"{p}/meta.json", b'{"files": {"model.pt"'),
    "file named in meta.json missing": lambda store, p: store.delete(f"{p}/model.pt"),
}


def corrupt_checkpoint(lab: Lab, how: str, store=None) -> Result:
    """Damage the newest checkpoint: loading falls back to the previous one, with a warning naming it."""
    import logging
    from nanochat.store import open_store
    store = store or open_store(lab.file_store("corrupt")[0])
    r = Result(f"checkpoint: {how}", "1 damaged checkpoint")
    ckpt, states = tiny_checkpoints(store)
    newest = ckpt.step_prefix(3)
    CORRUPTIONS[how](store, newest)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("nanochat.checkpoint").addHandler(handler)
    try:
        got = ckpt.load()
    finally:
        logging.getLogger("nanochat.checkpoint").removeHandler(handler)
    r.expect(got is not None and got[0] == 2, f"loaded step {got and got[0]}, expected the previous checkpoint 2")
    if got is not None:
        r.expect(same_weights(got[1], states[2]), "the fallback weights are not checkpoint 2's")
    if how != "missing meta.json":  # without meta.json the checkpoint simply does not exist yet: nothing to warn about
        r.expect(any(store.uri(newest) in w for w in warnings), f"no warning naming {store.uri(newest)}: {warnings}")
    r.data_lost = "none (previous checkpoint used)" if r.ok else "-"
    r.steps_redone = "<= save_every"
    return r.conclude("detected")


def rewrite_with_page_checksums(store, key: str) -> str:
    """Rewrite a shard with parquet page checksums (same rows and row groups), keeping index.json in step."""
    import io
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(io.BytesIO(store.get_bytes(key)))
    rows = pf.metadata.row_group(0).num_rows
    buf = io.BytesIO()
    pq.write_table(pf.read(), buf, row_group_size=rows, compression="zstd", use_dictionary=False, write_page_checksum=True)
    digest = store.put_bytes(key, buf.getvalue())
    index = store.get_json("data/shards/index.json")
    for entry in index["shards"]:
        if entry["key"] == key:
            entry.update(sha256=digest, size=len(buf.getvalue()))
    store.put_json("data/shards/index.json", index)
    return digest


def corrupt_row_group(store, key: str, rg: int, seed: int = 0) -> int:
    """Flip one bit inside row group `rg`'s page data, at a seeded position where it really damages the text
    (decoding fails or yields other text when checksums are not checked); returns the byte offset."""
    import io
    import pyarrow.parquet as pq
    data = store.get_bytes(key)
    original = pq.ParquetFile(io.BytesIO(data)).read_row_group(rg).column(0).to_pylist()
    col = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(rg).column(0)
    rng = random.Random(seed)
    for _ in range(1000):
        at = rng.randrange(col.data_page_offset, col.data_page_offset + col.total_compressed_size)
        damaged = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
        try:
            if pq.ParquetFile(io.BytesIO(damaged)).read_row_group(rg).column(0).to_pylist() == original:
                continue  # a header bit that changes nothing
        except Exception:  # noqa: BLE001 - undecodable is damaged too
            pass
        store.put_bytes(key, damaged)
        return at
    raise AssertionError("no damaging bit flip found")


def shard_row_group_corruption(lab: Lab, seeds=range(3), checksummed: bool = True) -> Result:
    """A bit flipped inside one row group of a train shard: the dataloader stops with a CorruptObject naming the
    shard's URI and the row group, never trains on silently different text. Needs shards with parquet page
    checksums (checksummed=False: the shards exactly as the data stage writes them)."""
    from nanochat.dataloader import DataLoader
    from nanochat.store import CorruptObject, open_store
    from nanochat.tokenizer import get_tokenizer
    what = "with page checksums" if checksummed else "as the data stage writes it"
    r = Result(f"text shard {what}: one bit flipped in a row group", f"{len(seeds)} bit flips")
    key = "data/shards/shard_00007.parquet"  # a train shard with 5 row groups
    for seed in seeds:
        store = open_store(lab.file_store(f"shard-rg-{seed}")[0])
        if checksummed:
            rewrite_with_page_checksums(store, key)
        corrupt_row_group(store, key, rg=1, seed=seed)
        loader = DataLoader(store, get_tokenizer(store), "train", 4, 64, tokenizer_threads=1)
        try:
            for _ in range(2_000):
                next(loader)
            r.expect(False, f"seed {seed}: the damaged row group was trained on without an error")
        except CorruptObject as e:
            r.expect(store.uri(key) in str(e) and "row group 1" in str(e), f"seed {seed}: the error does not name the shard: {e}")
            r.message = str(e)
        finally:
            loader.close()
    r.data_lost = "none (clear error)" if r.ok else "corrupted text trained on"
    return r.conclude("detected")
