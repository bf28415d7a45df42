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
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.s3util import MotoServer, FaultProxy, free_port  # noqa: E402

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
        if name in ("meta.json", "manifest.json") and key.startswith(("checkpoints/", "tokenizer/", "data/", "models/")) or name == "manifest.json":
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
    """FaultProxy, plus: HEAD keeps the upstream Content-Length (pyarrow sizes files by it), the policy may
    return ("delay", seconds) or "delay" to slow a request, and `gate(match)` holds one request until released."""

    def __init__(self, upstream_port: int, policy=None):
        super().__init__(upstream_port, None)
        self.user_policy = policy or (lambda method, path, n: None)
        self.gates: list[Gate] = []
        self.policy = self._decide
        base, proxy = self.httpd.RequestHandlerClass, self

        class Handler(base):
            def do_HEAD(self):
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                action = proxy.policy(self.command, self.path, n)
                if action is not None:
                    proxy.injected.append((self.command, self.path, action))
                if action in ("reset", "truncate"):  # a HEAD has no body to cut: drop it
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if isinstance(action, tuple) and action[0] == "status":
                    self.send_response(action[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                conn.request("HEAD", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                resp = conn.getresponse()
                resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.end_headers()
                conn.close()

        self.httpd.RequestHandlerClass = Handler

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
    """base_train as a subprocess: one process, or torchrun with `nproc` gloo ranks; output in a log file."""

    def __init__(self, uri: str, workdir: Path, *extra: str, nproc: int = 1, env: dict | None = None, prefix: list[str] | None = None):
        self.uri, self.workdir, self.nproc = uri, Path(workdir), nproc
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.workdir.glob("train.*.log")))
        self.log_path = self.workdir / f"train.{n}.log"
        launch = prefix or ([sys.executable] if nproc == 1 else
                            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
        # flags after FLAGS win (argparse keeps the last value)
        self.argv = [*launch, "-m", "nanochat.stages.base_train", f"--store={uri}", *FLAGS, *extra] if not prefix else [*prefix, f"--store={uri}", *FLAGS, *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=subprocess_env(self.workdir, env), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

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
    fault: str
    injected: str
    survived: str          # "yes" (finished equal to an uninterrupted run) | "clear error" | "detected" | "NO: why"
    data_lost: str         # "none" or what was lost
    steps_redone: str      # steps trained twice because of the fault ("-" when training did not resume)
    ok: bool = True        # every expectation held
    notes: list[str] = dataclasses.field(default_factory=list)

    def expect(self, cond: bool, what: str) -> bool:
        if not cond:
            self.ok = False
            self.notes.append(what)
        return cond


class Lab:
    """Shared pieces of the scenarios: the prepared store, reference (uninterrupted) weights per world size,
    S3 on loopback, a folder per scenario."""

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
        """Final weights of an uninterrupted run with `nproc` ranks (computed once)."""
        if nproc not in self._refs:
            from nanochat.store import open_store
            uri, work = self.file_store(f"reference-{nproc}")
            Train(uri, work, nproc=nproc).finish()
            step, self._refs[nproc] = final_state(open_store(uri))
            assert step == N
        return self._refs[nproc]

    def check_resumed(self, r: Result, store, ref: dict, log: str, stopped_at: int, allowed_redo: int = SAVE_EVERY):
        """The re-run resumed (not restarted), redid at most `allowed_redo` steps, ended equal to the reference."""
        start = resumed_step(log)
        if not r.expect(start is not None, "the re-run did not resume from a checkpoint"):
            start = 0
        redone = max(0, stopped_at - start)
        r.steps_redone = str(redone)
        r.expect(redone <= allowed_redo, f"{redone} steps redone > {allowed_redo}")
        step, state = final_state(store)
        equal = step == N and same_weights(state, ref)
        r.expect(equal, "final weights differ from the uninterrupted run")
        problems = audit(store)
        r.expect(not problems, "audit: " + "; ".join(problems[:3]))
        r.expect(store.exists("stages/base_train/done.json"), "no done.json after the re-run")
        r.data_lost = "none" if equal and not problems else "final weights differ" if not equal else "partial objects visible"
        r.survived = "yes" if r.ok else "NO: " + "; ".join(r.notes)

    def close(self):
        if self._s3 is not None:
            self._s3.close()


def meta_key(step: int) -> str:
    return f"{CKPT}/{step:06d}/meta.json"


def p_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def sigkill_one_rank(lab: Lab, rank: int, seed: int = 0) -> Result:
    """torchrun --nproc_per_node=2: SIGKILL one rank mid-step. torchrun tears the job down (non-zero exit, the
    other rank gone, no done.json, nothing half-visible); the re-run resumes and ends equal to an uninterrupted
    2-rank run."""
    from nanochat.store import open_store
    r = Result(f"SIGKILL rank {rank} of 2 mid-step (torchrun)", "1 SIGKILL", "", "", "-")
    ref = lab.reference(2)
    uri, work = lab.file_store(f"sigkill-rank{rank}")
    store = open_store(uri)
    run = Train(uri, work, nproc=2)
    run.wait_for(lambda: store.exists(meta_key(2 * SAVE_EVERY)), f"checkpoint {2 * SAVE_EVERY}")
    time.sleep(random.Random(seed).uniform(0.0, 0.1))  # somewhere inside a later step
    pids = run.rank_pids()
    if not r.expect(set(pids) == {0, 1}, f"rank pids {pids}"):
        run.kill_all()
        r.survived = "NO: " + "; ".join(r.notes)
        return r
    os.kill(pids[rank], signal.SIGKILL)
    code = run.wait()
    stopped = last_logged_step(run.log)
    r.expect(code != 0, f"torchrun exited {code} after a rank was killed")
    r.expect(stopped < N, "the run finished before the kill landed")
    r.expect(not any(p_alive(p) for p in pids.values()), "a rank outlived torchrun")
    r.expect(not store.exists("stages/base_train/done.json"), "done.json written by a failed job")
    problems = audit(store)
    r.expect(not problems, "after the kill: " + "; ".join(problems[:3]))
    log = Train(uri, work, nproc=2).finish()
    lab.check_resumed(r, store, ref, log, stopped)
    return r


def _gated_s3_run(lab: Lab, name: str, step: int):
    """base_train on S3 whose PUT of checkpoint `step`'s model.pt is held at the proxy (the write is in flight)."""
    uri, work = lab.s3_store(name)
    proxy = lab.s3.proxy()
    gate = proxy.gate("PUT", f"{CKPT}/{step:06d}/model.pt")
    run = Train(uri, work, env=lab.s3.env(proxy.url))
    if not gate.arrived.wait(RUN_TIMEOUT_S):
        run.kill_all()
        raise AssertionError(f"the checkpoint write never came:\n{run.log[-3000:]}")
    return uri, work, proxy, gate, run


def sigterm_during_checkpoint_write(lab: Lab, step: int = 2 * SAVE_EVERY) -> Result:
    """Pod preemption (SIGTERM) while a checkpoint is being uploaded: the upload finishes (saves are shielded
    from the signal), the stage exits 143 at that step, and the re-run redoes nothing."""
    r = Result("SIGTERM during a checkpoint write (S3)", "1 SIGTERM", "", "", "-")
    ref = lab.reference(1)
    uri, work, proxy, gate, run = _gated_s3_run(lab, "sigterm-ckpt", step)
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the handler has run while the upload is still held
    gate.release()
    code = run.wait()
    store = lab.s3.store(uri)
    r.expect(code == 143, f"exit {code}, expected 143")
    r.expect(f"stopped at step {step}; checkpoint saved" in run.log, "no 'stopped at step' line")
    r.expect(store.exists(meta_key(step)), f"checkpoint {step} (in flight at SIGTERM) is not complete")
    r.expect(not store.exists("stages/base_train/done.json"), "done.json written by an interrupted run")
    log = Train(uri, work, env=lab.s3.env(lab.s3.moto.url)).finish()
    lab.check_resumed(r, store, ref, log, last_logged_step(run.log), allowed_redo=0)
    return r


def sigkill_during_checkpoint_write(lab: Lab, step: int = 2 * SAVE_EVERY) -> Result:
    """SIGTERM during a checkpoint upload, then SIGKILL before it lands (the grace period ran out): the torn
    checkpoint is never visible, the re-run resumes from the previous one (redoing <= save_every steps)."""
    r = Result("SIGTERM then SIGKILL during a checkpoint write (S3)", "SIGTERM + SIGKILL", "", "", "-")
    ref = lab.reference(1)
    uri, work, proxy, gate, run = _gated_s3_run(lab, "sigkill-ckpt", step)
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    gate.release("reset")  # the upload never completes
    store = lab.s3.store(uri)
    from nanochat.checkpoint import CheckpointManager
    latest = CheckpointManager(store, "base_train").latest()
    r.expect(latest == step - SAVE_EVERY, f"newest complete checkpoint is {latest}, expected {step - SAVE_EVERY}")
    r.expect(not store.exists(meta_key(step)), f"torn checkpoint {step} is visible")
    r.expect(not audit(store), "audit after the kill: " + "; ".join(audit(store)[:3]))
    log = Train(uri, work, env=lab.s3.env(lab.s3.moto.url)).finish()
    lab.check_resumed(r, store, ref, log, last_logged_step(run.log))
    return r


def s3_chaos(lab: Lab, seed: int, rate: float = 0.1) -> Result:
    """base_train through the proxy with seeded random 500/503/SlowDown, delays, resets and truncated bodies
    on every request (shard reads by pyarrow, checkpoint writes by boto3): it completes, equal to a clean run."""
    r = Result(f"S3 chaos: {rate:.0%} of requests fail or stall (seed {seed})", "", "", "", "0")
    ref = lab.reference(1)
    uri, work = lab.s3_store(f"chaos-{seed}")
    policy = chaos_policy(seed, rate)
    # the first shard read and the first checkpoint write always fail once, so both paths are exercised
    firsts = {"data/shards/shard_": ("status", 503, "SlowDown"), f"{CKPT}/": ("status", 500, "InternalError")}

    def scripted(method, path, n):
        for part, action in list(firsts.items()):
            if part in path and (method == "PUT") == part.startswith("checkpoints"):
                del firsts[part]
                return action
        return policy(method, path, n)
    proxy = lab.s3.proxy(scripted)
    run = Train(uri, work, env=lab.s3.env(proxy.url))
    code = run.wait()
    injected = list(proxy.injected)
    r.injected = f"{len(injected)} faults in {proxy.count} requests"
    r.expect(code == 0, f"exit {code}: " + " | ".join(error_lines(run.log)[-2:]))
    r.expect(any("data/shards/" in p for _, p, _ in injected), "no fault hit a shard read")
    r.expect(any(m == "PUT" and CKPT in p for m, p, _ in injected), "no fault hit a checkpoint write")
    store = lab.s3.store(uri)
    if code == 0:
        step, state = final_state(store)
        equal = step == N and same_weights(state, ref)
        r.expect(equal, "final weights differ from a fault-free run")
        problems = audit(store)
        r.expect(not problems, "audit: " + "; ".join(problems[:3]))
        r.data_lost = "none" if equal and not problems else "yes"
    else:
        r.data_lost = "-"
    r.survived = "yes" if r.ok else "NO: " + "; ".join(r.notes)
    r.log = run.log  # for debugging a failure
    return r


# ----------------------------------------------------------------------------- one clear error

def expect_clear_error(r: Result, run: Train, names: str | None, code_ok=lambda c: c != 0) -> Result:
    """A fatal store problem ends the stage with ONE error line (naming the object/bucket), no traceback."""
    code = run.wait()
    log = run.log
    errors = error_lines(log)
    r.expect(code_ok(code), f"exit code {code}")
    r.expect("Traceback" not in log, "a traceback was printed:\n" + log[log.find("Traceback"):][:1500])
    r.expect(len(errors) == 1, f"{len(errors)} error lines: {errors[:3]}")
    if names:
        r.expect(any(names in e for e in errors), f"the error does not name {names}: {errors[:1]}")
    r.survived = "clear error" if r.ok else "NO: " + "; ".join(r.notes)
    r.data_lost = "none"
    r.steps_redone = "-"
    r.message = errors[0] if errors else ""
    r.exit_code = code
    return r


def missing_bucket(lab: Lab) -> Result:
    r = Result("S3 bucket does not exist", "1 missing bucket", "", "", "-")
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    run = Train(f"s3://{bucket}/run", lab.folder("missing-bucket"), env=lab.s3.env(lab.s3.moto.url))
    return expect_clear_error(r, run, f"s3://{bucket}")


def access_denied(lab: Lab, where: str = "everywhere") -> Result:
    """403 from S3: wrong credentials (every request) or a bucket policy that denies checkpoint writes mid-run."""
    uri, work = lab.s3_store(f"denied-{where}")
    if where == "everywhere":
        r = Result("S3 access denied (bad credentials)", "403 on every request", "", "", "-")
        proxy = lab.s3.proxy(lambda m, p, n: ("status", 403, "InvalidAccessKeyId"))
        names = uri
    else:
        r = Result("S3 access denied mid-run (policy forbids checkpoint writes)", "403 on checkpoint PUTs", "", "", "-")
        proxy = lab.s3.proxy(lambda m, p, n: ("status", 403, "AccessDenied") if m == "PUT" and f"/{CKPT}/" in p else None)
        names = f"{uri}/{CKPT}/"
    run = Train(uri, work, env=lab.s3.env(proxy.url))
    r = expect_clear_error(r, run, names)
    r.injected = f"{len(proxy.injected)} x 403"
    if where != "everywhere":
        from nanochat.checkpoint import CheckpointManager
        store = lab.s3.store(uri)
        r.expect(CheckpointManager(store, "base_train").latest() is None, "a checkpoint became visible")
        r.expect(not audit(store), "audit: " + "; ".join(audit(store)[:3]))
    return r


def endpoint_unreachable(lab: Lab) -> Result:
    r = Result("S3 endpoint unreachable", "connection refused", "", "", "-")
    port = free_port()
    run = Train("s3://bucket/run", lab.folder("unreachable"), env=lab.s3.env(f"http://127.0.0.1:{port}"))
    return expect_clear_error(r, run, "s3://bucket/run")


ENOSPC_BOOT = """
import errno, os, sys
store_dir, match = sys.argv[1], sys.argv[2]
real_fsync = os.fsync
def fsync(fd):  # a full disk: the data never reaches it, the write fails
    path = os.readlink(f"/proc/self/fd/{fd}")
    if path.startswith(store_dir) and match in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_fsync(fd)
os.fsync = fsync
sys.argv = ["base_train", *sys.argv[3:]]
from nanochat.stages.base_train import main
sys.exit(main(sys.argv[1:]))
"""


def disk_full(lab: Lab) -> Result:
    """The store's disk fills up when the first checkpoint is written: one clear error, no partial checkpoint."""
    from nanochat.store import open_store
    r = Result("disk full (file store, ENOSPC on checkpoint write)", "ENOSPC", "", "", "-")
    uri, work = lab.file_store("disk-full")
    store_dir = uri[len("file://"):]
    run = Train(uri, work, prefix=[sys.executable, "-c", ENOSPC_BOOT, store_dir, f"/{CKPT}/"])
    r = expect_clear_error(r, run, f"{uri}/{CKPT}/")
    store = open_store(uri)
    r.expect(not list(Path(store_dir).rglob("*.tmp")), "temp files left in the store")
    r.expect(not store.list(f"{CKPT}/"), f"checkpoint objects visible: {store.list(CKPT + '/')[:3]}")
    return r


def file_too_large(lab: Lab, limit_bytes: int = 1 << 20) -> Result:
    """ulimit -f (RLIMIT_FSIZE): every file write past 1 MiB fails with EFBIG, scratch space included."""
    import resource
    r = Result("file size limit (ulimit -f, EFBIG)", "EFBIG", "", "", "-")
    uri, work = lab.file_store("efbig")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    run = Train.__new__(Train)
    run.uri, run.workdir, run.nproc = uri, work, 1
    run.log_path = work / "train.0.log"
    with open(run.log_path, "w") as log:
        run.proc = subprocess.Popen([sys.executable, "-m", "nanochat.stages.base_train", f"--store={uri}", *FLAGS], cwd=REPO,
                                    env=subprocess_env(work), stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    return expect_clear_error(r, run, None)
