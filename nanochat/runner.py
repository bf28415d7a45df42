"""Backend-agnostic pipeline state machine and the local executor.

Each step goes pending → running → succeeded | failed, with retries (each invocation gets all of them) and
exponential backoff. State lives in the store (runner/state.json), so a runner that is killed and restarted adopts a
still-running stage process instead of starting a duplicate (before its dependents start, even when an earlier
done.json says the step is current: the process will rewrite its outputs), and never redoes finished stages.
"Finished" is decided by the stage's own done.json marker and config hash, not by runner memory; an adopted process,
whose exit code is unknown, succeeded only if it wrote done.json after its attempt started.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.config import ConfigError, config_hash, parse_config
from nanochat.pipeline import Step
from nanochat.store import Store

STATE_KEY = "runner/state.json"
LOCK_KEY = "runner/lock.json"
RAISED = re.compile(r"[\w.]*(Error|Exception|Interrupted)\b.*")  # a traceback's last line: "ValueError: ..."
HEARTBEAT_S = 20.0
STALE_LOCK_S = 120.0
TERM_GRACE_S = float(os.environ.get("NANOCHAT_TERM_GRACE_S", "120"))


class PipelineError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- planning

def stage_module(step: Step):
    return importlib.import_module(step.module_path)


def step_args(step: Step, store: Store, profile: str, overrides: dict[str, list[str]]) -> list[str]:
    """Flags for one step: store + profile, the step's own args, then user overrides for its module."""
    return [f"--store={store.root}", f"--profile={profile}", *step.args, *overrides.get(step.module, []), *overrides.get("*", [])]


def plan_step(step: Step, args: list[str], env=None, world_size: int = 1) -> tuple[str, str]:
    """(instance name, config hash) as the stage itself will compute them; raises ConfigError, also when the
    stage's batch does not split over `world_size` processes (found here, not after the stages before it ran)."""
    mod = stage_module(step)
    cfg = parse_config(mod.Config, args, mod.STAGE, env=env)
    cfg.check_world_size(world_size)
    return cfg.instance_name(mod.STAGE), config_hash(cfg)


def parse_overrides(items: list[str], steps: list[Step]) -> dict[str, list[str]]:
    """`--set base_train.depth=4` → {"base_train": ["--depth=4"]}; `--set compile=false` → every stage that has --compile."""
    out: dict[str, list[str]] = {}
    modules = {s.module: s for s in steps}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE or KEY=VALUE")
        key, value = item.split("=", 1)
        stage, _, key = key.rpartition(".")
        if stage and stage not in modules:
            raise ConfigError(f"--set {item!r}: unknown stage {stage!r}; stages in this run: {', '.join(sorted(modules))}")
        targets = [stage] if stage else [m for m, s in modules.items() if key.replace("-", "_") in config_keys(s)]
        if not targets:
            raise ConfigError(f"--set {item!r}: no stage in this run has --{key.replace('_', '-')}; "
                              f"set it for one stage as STAGE.{key}={value} (stages: {', '.join(modules)})")
        for m in targets:
            out.setdefault(m, []).append(f"--{key.replace('_', '-')}={value}")
    return out


def config_keys(step: Step) -> set[str]:
    return {f.name for f in dataclasses.fields(stage_module(step).Config)}


# ----------------------------------------------------------------------------- executor

@dataclass
class Handle:
    pid: int
    log_path: str
    popen: subprocess.Popen | None = None   # None when adopted from a previous runner

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if pid_alive(self.pid) else -1  # exit code of an adopted process is unknown


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0) would signal our own process group: no pid is no process
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LocalExecutor:
    """Launches each stage as `python -m MODULE` or `torchrun --standalone` for nproc > 1."""

    def __init__(self, log_dir: str | Path, env: dict | None = None, echo=True):
        self.log_dir = Path(log_dir)  # created at the first launch: a dry run creates nothing
        self.env = env
        self.echo = echo

    def command(self, step: Step, args: list[str], nproc: int) -> list[str]:
        if nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", step.module_path, *args]
        return [sys.executable, "-m", step.module_path, *args]

    def launch(self, step: Step, args: list[str], nproc: int, attempt: int) -> Handle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{step.name}.attempt{attempt}.log"
        env = dict(self.env if self.env is not None else os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if nproc > 1:  # torchrun's own default, set here so it does not print its banner about it in every stage's log
            env.setdefault("OMP_NUM_THREADS", "1")
        with open(log_path, "wb") as log:  # a new process: a log of its own, not appended to one a wiped store left
            # own session: survives a killed runner (to be adopted) and gets signals as a group
            p = subprocess.Popen(self.command(step, args, nproc), stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, stdin=subprocess.DEVNULL)
        return Handle(p.pid, str(log_path), p)

    def adopt(self, pid: int, log_path: str, step: Step) -> Handle | None:
        if pid and pid_alive(pid) and step.module_path in pid_cmdline(pid):
            return Handle(pid, log_path)
        return None

    def terminate(self, h: Handle, grace_s: float = TERM_GRACE_S, hurry: threading.Event | None = None):
        """SIGTERM the stage's process group (it checkpoints and exits), SIGKILL after the grace period or once hurry
        is set (a second Ctrl-C)."""
        try:
            os.killpg(h.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline and h.poll() is None and not (hurry and hurry.is_set()):
            time.sleep(0.2)
        if h.poll() is None:
            try:
                os.killpg(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if h.popen is not None:
            h.popen.wait()

    def wait(self, h: Handle, stop: threading.Event, on_line=None) -> int | None:
        """Follow the log until the process exits; returns its exit code (None if stopped/-1 if adopted)."""
        with open(h.log_path, "rb") as f:
            f.seek(0, os.SEEK_END) if h.popen is None else None
            while True:
                line = f.readline()
                if line:
                    text = line.decode(errors="replace")
                    if self.echo:
                        sys.stderr.write(text)
                        sys.stderr.flush()
                    if on_line:
                        on_line(text)
                    continue
                code = h.poll()
                if code is not None:
                    for rest in f.readlines():
                        if self.echo:
                            sys.stderr.write(rest.decode(errors="replace"))
                    return code
                if stop.is_set():
                    return None
                time.sleep(0.1)


# ----------------------------------------------------------------------------- runner

class Runner:
    def __init__(self, store: Store, steps: list[Step], profile: str, executor: LocalExecutor | None = None,
                 max_retries: int = 2, backoff_s: float = 5.0, overrides: dict | None = None, env=None,
                 on_event=None, nproc: int | None = None):
        self.store, self.steps, self.profile = store, steps, profile
        self.nproc = nproc  # processes per GPU-capable stage; None: the profile's
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.overrides = overrides or {}
        self.env = env
        self.executor = executor or LocalExecutor(default_log_dir(store), env=env)
        self.stop = threading.Event()
        self.hurry = threading.Event()  # a second Ctrl-C: kill the stages instead of waiting for their checkpoints
        self.interrupted = False
        self.handles: dict[str, Handle] = {}
        self.on_event = on_event or (lambda msg: print(f"[runner] {msg}", file=sys.stderr, flush=True))
        self.state: dict = {}
        self._lock = threading.Lock()
        self.lost_to: dict | None = None  # the lock as another runner rewrote it, once this one was taken over
        self._locked = False              # whether this runner took runner/lock.json (a dry run does not)
        self._lock_version = None         # runner/lock.json's version as this runner last wrote it
        self._unsure: dict | None = None  # a lock write whose answer was lost: it may have landed
        self._lock_io = threading.Lock()  # a heartbeat and an ownership check never interleave

    def nproc_for(self, step: Step) -> int:
        return self.nproc if self.nproc and step.gpu else step.nproc(self.profile)

    # --- persisted state
    def load_state(self) -> dict:
        return self.store.get_json_or(STATE_KEY) or {}

    def save_state(self):
        if not self.owns_lock():  # taken over: state.json is the new runner's now
            return
        with self._lock:
            self.store.put_json(STATE_KEY, self.state)

    def step_state(self, name: str) -> dict:
        return self.state.setdefault("steps", {}).setdefault(name, {"state": "pending", "attempts": 0})

    def set_state(self, name: str, **kw):
        self.step_state(name).update(kw)
        self.save_state()

    # --- locking: one runner per run
    def acquire_lock(self):
        """Take runner/lock.json, atomically (a compare-and-swap: of two runners started at once, one wins); a lock
        whose heartbeat is older than STALE_LOCK_S, or whose pid on this host is gone, is taken over."""
        lock, version = self.store.get_json_versioned(LOCK_KEY)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        if lock and (lock["host"], lock["pid"]) != (me["host"], me["pid"]):
            fresh = time.time() - lock.get("heartbeat", 0) < STALE_LOCK_S
            same_host_alive = lock["host"] == me["host"] and pid_alive(lock["pid"]) and fresh
            remote_fresh = lock["host"] != me["host"] and time.time() - lock.get("heartbeat", 0) < STALE_LOCK_S
            if same_host_alive or remote_fresh:
                raise PipelineError(f"another runner (pid {lock['pid']} on {lock['host']}) is driving {self.store.root}; "
                                    "wait for it or stop it first")
        self._lock_version = version
        if not self._write_lock(me)[0]:
            raise PipelineError(f"another runner took {self.store.root} just now; wait for it or stop it first")
        self._locked = True

        def beat():
            while not self.stop.wait(HEARTBEAT_S):
                with self._lock_io:
                    try:
                        renewed, lock = self._write_lock({**me, "heartbeat": time.time()})
                    except Exception as e:  # noqa: BLE001 - a store blip must not end the heartbeat: the next beat retries
                        self.on_event(f"could not renew the runner lock ({e}); trying again in {HEARTBEAT_S:.0f}s")
                        continue
                    if not renewed:  # silent past STALE_LOCK_S (a suspended machine): never take it back
                        return self._taken_over(lock, "this one's heartbeat was late")
        threading.Thread(target=beat, daemon=True).start()

    def _write_lock(self, body: dict) -> tuple[bool, dict | None]:
        """Compare-and-swap runner/lock.json from the version this runner holds to body: (written, the lock as it is).
        A write whose answer was lost may have landed (botocore retries it: 412); the content tells it was ours."""
        try:
            version = self.store.put_json_if(LOCK_KEY, body, self._lock_version)
        except Exception:
            self._unsure = body  # it may have landed
            raise
        if version is None:
            lock, version = self.store.get_json_versioned(LOCK_KEY)
            if lock != body:  # not this write landing after a lost answer
                if not self._holds(lock, version):  # nor an earlier one: another runner's
                    return False, lock
                return self._write_lock(body)  # the earlier write landed after all: swap from it
        self._lock_version, self._unsure = version, None
        return True, body

    def _holds(self, lock: dict | None, version: str | None) -> bool:
        """Whether the lock as read is this runner's: the version it wrote, or a write whose answer was lost."""
        if version is not None and (version == self._lock_version or lock == self._unsure):
            self._lock_version, self._unsure = version, None
            return True
        return False

    def owns_lock(self) -> bool:
        """Whether runner/lock.json is still the one this runner wrote (always, before it locked: a dry run); checked
        before each launch and state write, so a runner taken over stops at once, not at its next heartbeat."""
        with self._lock_io:
            if self._locked and self.lost_to is None:
                lock, version = self.store.get_json_versioned(LOCK_KEY)
                if not self._holds(lock, version):
                    self._taken_over(lock, "its lock changed hands")
        return self.lost_to is None

    def _taken_over(self, lock: dict | None, why: str):
        """Stop driving the run: launch nothing more, write no state; run() raises once its stages are let go."""
        self.lost_to = lock or {}
        self.on_event(f"another runner took over {self.store.root} ({why}); this one stops driving it")
        self.stop.set()

    def release_lock(self):
        with self._lock_io:
            if self._locked and self._holds(*self.store.get_json_versioned(LOCK_KEY)):  # not one another runner took
                self.store.delete(LOCK_KEY)

    # --- the state machine
    def plan(self, from_step: str | None = None, only: list[str] | None = None) -> list[tuple[Step, list[str], str, str, bool]]:
        """Validate every step's config before any work: (step, args, name, hash, forced)."""
        names = [s.name for s in self.steps]
        for n in [from_step, *(only or [])]:
            if n and n not in names:
                raise ConfigError(f"unknown stage {n!r}; stages in this run: {', '.join(names)}")
        start = names.index(from_step) if from_step else 0
        plan = []
        for i, s in enumerate(self.steps):
            if only and s.name not in only:
                continue
            args = step_args(s, self.store, self.profile, self.overrides)
            forced = bool(only) or (from_step is not None and i >= start)
            if forced:
                args.append("--force")
            if i < start and not only:
                continue
            try:
                name, h = plan_step(s, args, env=self.env, world_size=self.nproc_for(s))
            except ConfigError as e:
                raise ConfigError(f"stage {s.name}: {e}") from None
            plan.append((s, args, name, h, forced))
        return plan

    def succeeded(self, name: str, h: str, code: int, started: float) -> bool:
        """Whether an attempt succeeded: done.json holds this config, and the process exited 0, or, adopted (code -1:
        its exit code is unknown), wrote done.json after the attempt started (an earlier run's with the same config
        must not pass for its success)."""
        done = self.store.get_json_or(f"stages/{name}/done.json") or {}
        return done.get("config_hash") == h and (code == 0 or code == -1 and done.get("ended", 0) >= started)

    def reason_to_run(self, step: Step, args: list[str], name: str, h: str, forced: bool,
                      rerun: set[str]) -> tuple[str | None, list[str]]:
        """Why run() starts this step, with the args it starts it with; None when it is done and current.
        `rerun`: the steps this run started before it. The dry run asks the same question (preview)."""
        if (orphan := self.live_process(step)) is not None:  # a killed runner's stage: its outputs are changing, so
            # wait for it, and if it fails run the step again for real (the old done.json no longer describes them)
            why = f"still running from a previous runner (pid {orphan.pid}), adopting it"
            return why, args if "--force" in args else [*args, "--force"]
        if forced:
            return "forced by --from/--only", args
        done = self.store.get_json_or(f"stages/{name}/done.json")
        if not done:
            return "not run yet", args
        stale = next((f"upstream {d} re-runs" for d in step.depends_on if d in rerun), None)
        if not stale and (newer := self.newer_upstream(step, name)):
            stale = f"{newer} finished after it last ran"
        if stale:  # same config: the stage itself would skip, so force it
            return stale, [*args, "--force"]
        if done.get("config_hash") != h:
            return "config changed", args
        return None, args

    def preview(self, plan) -> list[tuple[Step, list[str], str | None]]:
        """What run() will do with this plan, running nothing: (step, args, why it runs or None if skipped)."""
        self.state = self.state or self.load_state()  # read once: live_process looks up every step in it
        rerun: set[str] = set()
        out = []
        for step, args, name, h, forced in plan:
            why, args = self.reason_to_run(step, args, name, h, forced, rerun)
            if why:
                rerun.add(step.name)
            out.append((step, args, why))
        return out

    def live_process(self, step: Step) -> Handle | None:
        """The stage process a killed runner left running for this step (this host only), or None."""
        st = self.state.get("steps", {}).get(step.name, {})  # loaded by _run or preview
        if st.get("state") != "running" or st.get("host") != socket.gethostname():
            return None
        return self.executor.adopt(st.get("pid"), st.get("log", ""), step)

    def newer_upstream(self, step: Step, name: str) -> str | None:
        """A dependency that finished after this step's last run (make's rule): its output is stale."""
        done = self.store.get_json_or(f"stages/{name}/done.json")
        if not done:
            return None
        for dep in step.depends_on:
            dep_done = self.store.get_json_or(f"stages/{dep}/done.json")
            if dep_done and dep_done.get("ended", 0) > done.get("ended", 0):
                return dep
        return None

    def run(self, from_step: str | None = None, only: list[str] | None = None) -> bool:
        plan = self.plan(from_step, only)
        self.acquire_lock()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
        try:
            ok = self._run(plan)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.stop.set()
            self.release_lock()
        if self.lost_to is not None:
            owner = self.lost_to
            raise PipelineError(f"another runner (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) took over "
                                f"{self.store.root}; this one stopped driving it. Follow that one with `nanochat status`")
        return ok

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.interrupted:
            self.on_event(f"second {name}: killing the stages now; a re-run resumes from their last checkpoint")
            self.hurry.set()
            return
        self.on_event(f"{name}: stopping stages (they checkpoint; Ctrl-C again to kill them now), re-run to resume")
        self.interrupted = True
        self.stop.set()

    def _run(self, plan) -> bool:
        self.state = self.load_state()
        self.state.update(profile=self.profile, store=self.store.root, runner_pid=os.getpid(), host=socket.gethostname())
        self.state.setdefault("created", time.time())
        self.save_state()
        background: dict[str, threading.Thread] = {}
        results: dict[str, bool] = {}
        started: set[str] = set()

        for step, args, name, h, forced in plan:
            for dep in step.depends_on:
                if dep in background:
                    background.pop(dep).join()
                if dep in results and not results[dep]:
                    self.on_event(f"{step.name}: not started, dependency {dep} failed")
                    results[step.name] = False
                    break
            else:
                if self.stop.is_set():
                    break
                why, args = self.reason_to_run(step, args, name, h, forced, started)
                if why is None:
                    st = self.step_state(step.name)
                    if st.get("state") != "succeeded":
                        self.set_state(step.name, state="succeeded", config_hash=h)
                    self.on_event(f"{step.name}: done (config {h}), skipping")
                    results[step.name] = True
                    continue
                if not forced and why != "not run yet" and not why.startswith("still running"):  # _run_step says adopting
                    self.on_event(f"{step.name}: {why}, re-running")
                started.add(step.name)
                if step.background:
                    t = threading.Thread(target=lambda s=step, a=args, n=name, hh=h: results.__setitem__(s.name, self._run_step(s, a, n, hh)), daemon=True)
                    t.start()
                    background[step.name] = t
                    continue
                results[step.name] = self._run_step(step, args, name, h)
                if not results[step.name]:
                    break
        for t in background.values():
            t.join()
        ok = all(results.get(s.name) for s, *_ in plan) and not self.stop.is_set()
        self.state["finished"] = time.time() if ok else None
        self.save_state()
        return ok

    def _run_step(self, step: Step, args: list[str], name: str, h: str) -> bool:
        st = self.step_state(step.name)
        nproc = self.nproc_for(step)
        failures = 0  # retries are per invocation: a re-run after a failure (or after many runs) gets all of them
        while True:
            handle = self.live_process(step)
            if handle:
                self.on_event(f"{step.name}: adopting running process {handle.pid} from a previous runner")
            else:
                if not self.owns_lock():
                    return False
                attempt = st.get("attempts", 0) + 1
                handle = self.executor.launch(step, args, nproc, attempt)
                self.set_state(step.name, state="running", attempts=attempt, pid=handle.pid, host=socket.gethostname(),
                               log=handle.log_path, started=time.time(), ended=None, config_hash=h, nproc=nproc)
                self.on_event(f"{step.name}: started (attempt {attempt}, {nproc} proc{'s' if nproc > 1 else ''}, pid {handle.pid})")
            self.handles[step.name] = handle
            code = self.executor.wait(handle, self.stop)
            if code is None and self.lost_to is not None:
                self.let_go(step, handle)
                return False
            if code is None:  # the runner was asked to stop
                self.executor.terminate(handle, hurry=self.hurry)
                self.set_state(step.name, state="interrupted", ended=time.time(), pid=None)
                return False
            ok = self.succeeded(name, h, code, st["started"])
            self._upload_log(step, handle)
            if ok:
                self.set_state(step.name, state="succeeded", exit_code=code, ended=time.time(), pid=None)
                self.on_event(f"{step.name}: succeeded in {time.time() - st['started']:.1f}s")
                return True
            failures += 1
            if failures > self.max_retries:
                self.set_state(step.name, state="failed", exit_code=code, ended=time.time(), pid=None)
                self.on_event(f"{step.name}: failed (exit {code}) after {failures} attempt(s); log: {handle.log_path}")
                return False
            delay = self.backoff_s * 2 ** (failures - 1)
            self.set_state(step.name, state="retrying", exit_code=code, ended=time.time(), pid=None)
            self.on_event(f"{step.name}: failed (exit {code}); retry {failures}/{self.max_retries} in {delay:.0f}s")
            if self.stop.wait(delay):
                self.set_state(step.name, state="interrupted")
                return False

    def let_go(self, step: Step, handle: Handle):
        """A stage of a run another runner took over: left running for it to adopt when it is on this host; else
        stopped, since that runner cannot adopt it and starts its own."""
        host = self.lost_to.get("host")
        if host == socket.gethostname():
            self.on_event(f"{step.name}: left running (pid {handle.pid}) for the runner that took over")
            return
        self.executor.terminate(handle, hurry=self.hurry)
        self.on_event(f"{step.name}: stopped (pid {handle.pid}): the runner that took over is on {host or 'another host'}")

    def _upload_log(self, step: Step, handle: Handle):
        try:
            self.store.put_file(f"logs/{Path(handle.log_path).name}", handle.log_path)
        except Exception as e:  # noqa: BLE001 - logs are best effort
            self.on_event(f"{step.name}: could not upload log: {e}")


def default_log_dir(store: Store) -> Path:
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return Path(base) / "logs" / hashlib.sha1(store.root.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- status

def runner_status(store: Store) -> str | None:
    """One line on who drives the run: a live runner, one gone silent or killed, or stages a killed runner left
    showing running; None when nothing is in flight."""
    lock, here = store.get_json_or(LOCK_KEY), socket.gethostname()
    steps = (store.get_json_or(STATE_KEY) or {}).get("steps", {})
    running = {n: st for n, st in steps.items() if st.get("state") == "running"}
    orphans = "".join(f"; {n} " + (f"still runs (pid {st.get('pid')}): the next run adopts it"
                                   if pid_alive(st.get("pid") or 0) else "was cut short: the next run starts it again")
                      for n, st in running.items() if st.get("host") == here)
    if lock:
        who, age = f"pid {lock.get('pid')} on {lock.get('host')}", time.time() - lock.get("heartbeat", 0)
        if lock.get("host") == here and not pid_alive(lock.get("pid") or 0):
            return f"runner: {who} is gone (killed?){orphans}; re-run the same `nanochat speedrun` to resume"
        if age < STALE_LOCK_S:
            return f"runner: {who} drives this run (heartbeat {age:.0f}s ago)"
        return (f"runner: {who} has been silent for {age / 60:.0f} min (killed, or its machine suspended){orphans}; "
                "the same `nanochat speedrun` takes over and resumes")
    if running:
        return f"runner: none, but {', '.join(running)} shows running (its runner was killed){orphans}; " \
               "re-run the same `nanochat speedrun` to resume"
    return None


def last_error(log: str) -> str:
    """The line of a stage's log that says why it failed: its own one-line error, else the last exception raised
    (not torchrun's ChildFailedError summary), else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("nanochat stage ") and ": error: " in line]
    raised = [line for line in lines if RAISED.match(line) and "ChildFailedError" not in line]
    return (ours or raised or lines or [""])[-1]


def failure_notes(store: Store) -> list[str]:
    """One line per failed step: its exit code, the last error its log shows, and where the log is (this machine's
    copy, else the one the runner uploaded to the store)."""
    out = []
    for name, st in (store.get_json_or(STATE_KEY) or {}).get("steps", {}).items():
        if st.get("state") != "failed":
            continue
        log = st.get("log") or ""
        local, copy = Path(log), f"logs/{Path(log).name}"
        if log and local.is_file():
            text, where = local.read_bytes()[-65536:], log
        elif log and store.exists(copy):
            text, where = store.get_bytes(copy)[-65536:], store.uri(copy)
        else:
            text, where = b"", "none"
        last = last_error(text.decode(errors="replace"))
        out.append(f"{name}: failed (exit {st.get('exit_code')})" + (f": {last[:200]}" if last else "") + f"; log: {where}")
    return out


def progress_note(store: Store, name: str, started: float) -> str:
    """A running stage's progress from its history.jsonl (flushed every ~10 s): "step 120/400, eta 3m20s", or ""."""
    from nanochat.report import human_duration, load_history
    rows = [r for r in load_history(store, name) if r.get("time", 0) >= started and "step" in r]  # this attempt's
    if not rows or not rows[-1].get("total"):
        return ""
    first, last = rows[0], rows[-1]
    note = f"step {last['step']}/{last['total']}"
    if last["step"] > first["step"]:
        rate = (last["time"] - first["time"]) / (last["step"] - first["step"])
        note += f", eta {human_duration(rate * max(0, last['total'] - last['step']))}"
    return note


def status_rows(store: Store, steps: list[Step] | None = None) -> list[dict]:
    """One row per step: state, attempts, duration and key metrics, from the store only."""
    from nanochat.report import load_done_markers
    state = (store.get_json_or(STATE_KEY) or {}).get("steps", {})
    dones = load_done_markers(store)
    names = list(dict.fromkeys([s.name for s in steps or []] + list(state) + list(dones)))
    rows = []
    for n in names:
        st, done = state.get(n, {}), dones.get(n)
        s = st.get("state") or ("succeeded" if done else "pending")
        if done and s not in ("running", "retrying"):
            s = "succeeded"
        running = st.get("state") == "running" and st.get("started")
        dur = time.time() - st["started"] if running else done.get("duration_s") if done else None
        metrics = (done or {}).get("metrics", {})
        key = progress_note(store, n, st["started"]) if running else ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:4]
            if isinstance(v, (int, float, str)) and not isinstance(v, bool))
        rows.append({"stage": n, "state": s, "attempts": st.get("attempts", 1 if done else 0),
                     "duration": f"{dur:.1f}s" if dur is not None else "-", "metrics": key or "-"})
    return rows
