"""The local runner against simulated stage processes: random histories of invocations (plain, --only, --from), config
edits, stage failures, Ctrl-C, runners killed while a stage runs (the stage lives on, to be adopted by the next runner
or to end alone), and runners suspended while a stage runs until another runner takes the run over (the suspended one
must stop driving it when it wakes), with the runner's promises checked at every launch and after every invocation,
and, at the end, a plain run on a machine where every stage succeeds must bring the whole pipeline up to date."""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import example, given, note, strategies as st

from nanochat.config import config_hash, parse_config
from nanochat.pipeline import Step
from nanochat.runner import STATE_KEY, Handle, PipelineError, Runner, stage_module
from nanochat.store import open_store
from tests.fixtures import fuzz

ECHO = "tests.fake_stages.echo"
GRAPH = {"a": (), "b": ("a",), "c": (), "d": ("b", "c")}  # d joins two chains
NAMES = [f"echo_{n}" for n in GRAPH]
# what a launched stage does: succeed; exit 1 before done.json; write done.json then exit 1; outlive a runner killed
# while it runs, to succeed or fail later; be stopped by Ctrl-C on the runner; run while its runner is suspended past
# STALE_LOCK_S and another runner takes the run over, adopts the stage (which then succeeds or fails) and runs on
OUTCOMES = ("ok", "fail", "crash_after_done", "kill_ok", "kill_fail", "interrupt", "takeover_ok", "takeover_fail")
PLAIN = ("plain",)  # a run with neither --only nor --from


class RunnerKilled(BaseException):
    """SIGKILL of the runner: nothing of it runs after this (its stage processes live on)."""


@dataclass
class Proc:
    pid: int
    step: str
    args: list
    outcome: str
    alive: bool = True


class Machine:
    """The host: stage processes (fake pids, the stage contract emulated on the store), a clock for done.json, and
    the record of one invocation that the invariants read."""

    def __init__(self, root: Path, max_retries: int):
        self.root = root
        self.store = open_store(f"file://{root}/st")
        self.max_retries = max_retries
        self.values = dict.fromkeys(NAMES, 1)
        self.clock = 1000.0
        self.procs: dict[int, Proc] = {}
        self.script: dict[str, list] = {}
        self.runner: Runner | None = None
        self.mode: tuple = PLAIN
        self.tries: Counter = Counter()          # this invocation: launches + adoptions per step
        self.failures: Counter = Counter()       # this invocation: tries that did not succeed
        self.order: list[str] = []               # this invocation: steps tried, in order
        self.taken_over: dict | None = None      # state.json as the runner that took this invocation over left it
        self.tried_at_takeover = 0               # len(order) when that runner started

    def steps(self) -> list[Step]:
        return [Step(f"echo_{n}", ECHO, args=(f"--label={n}", f"--value={self.values[f'echo_{n}']}"),
                     depends_on=tuple(f"echo_{d}" for d in deps)) for n, deps in GRAPH.items()]

    def current_hash(self, name: str) -> str:
        step = next(s for s in self.steps() if s.name == name)
        mod = stage_module(step)
        return config_hash(parse_config(mod.Config, [f"--store={self.store.root}", "--profile=tiny", *step.args], mod.STAGE))

    def done(self, name: str) -> dict | None:
        return self.store.get_json_or(f"stages/{name}/done.json")

    def current(self, name: str) -> bool:
        done = self.done(name)
        return bool(done) and done["config_hash"] == self.current_hash(name)

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.alive]

    def ancestors(self, name: str) -> set[str]:
        deps = {f"echo_{d}" for d in GRAPH[name.removeprefix("echo_")]}
        return deps.union(*(self.ancestors(d) for d in deps)) if deps else set()

    # --- a stage process
    def execute(self, proc: Proc) -> bool:
        """The stage contract: skip when done with this config and not forced, else run and write done.json."""
        mod = stage_module(Step(proc.step, ECHO))
        cfg = parse_config(mod.Config, proc.args, mod.STAGE)
        name, chash = cfg.instance_name(mod.STAGE), config_hash(cfg)
        done = self.done(name)
        if done and done["config_hash"] == chash and not cfg.force:
            return False
        self.clock = max(self.clock + 1e-6, time.time())  # the runner times attempts against done.json
        self.store.put_json(f"stages/{name}/done.json", {"config_hash": chash, "started": self.clock, "ended": self.clock})
        return True

    def end(self, proc: Proc, ok: bool) -> bool:
        """The process exits (successfully if ok); whether it wrote done.json."""
        proc.alive = False
        return ok and self.execute(proc)

    def take_over(self):
        """This invocation's runner is suspended: a plain run starts meanwhile, takes its lock, and runs to its end."""
        saved = (self.runner, self.mode, self.script, self.tries, self.failures, self.order)
        invoke(self, PLAIN, {})
        self.runner, self.mode, self.script, self.tries, self.failures, self.order = saved
        self.taken_over, self.tried_at_takeover = self.store.get_json(STATE_KEY), len(self.order)

    def end_orphans(self):
        """Processes of killed runners end on their own, as they were going to."""
        for proc in self.live():
            self.end(proc, proc.outcome == "ok")


class FakeExecutor:
    """LocalExecutor's interface over the Machine's processes; checks the launch invariants."""

    def __init__(self, machine: Machine):
        self.m = machine
        self.mine: set[int] = set()  # pids this runner launched (the others it adopted)

    def launch(self, step, args, nproc, attempt) -> Handle:
        m = self.m
        assert not any(p.step == step.name for p in m.live()), f"{step.name}: launched while its process still runs"
        if m.mode == PLAIN:
            busy = [p.step for p in m.live() if p.step in m.ancestors(step.name)]
            assert not busy, f"{step.name}: launched while its upstream {busy} still runs"
            stale = [d for d in m.ancestors(step.name) if not m.current(d)]
            assert not stale, f"{step.name}: launched before its upstream {stale} is done with its current config"
        m.tries[step.name] += 1
        m.order.append(step.name)
        assert m.tries[step.name] <= m.max_retries + 1, f"{step.name}: tried {m.tries[step.name]} times in one invocation"
        script = m.script.get(step.name, [])
        proc = Proc(1_000_000 + len(m.procs), step.name, list(args), script.pop(0) if script else "ok")
        m.procs[proc.pid] = proc
        self.mine.add(proc.pid)
        log = m.root / f"{step.name}.attempt{attempt}.log"
        log.write_text(f"pid {proc.pid}\n")
        return Handle(proc.pid, str(log))

    def adopt(self, pid, log_path, step) -> Handle | None:
        proc = self.m.procs.get(pid)
        if proc is None or not proc.alive or proc.step != step.name:
            return None
        return Handle(pid, log_path)  # the runner also asks to see if a step has a live process: counted when waited on

    def wait(self, handle, stop, on_line=None) -> int | None:
        m, proc = self.m, self.m.procs[handle.pid]
        if handle.pid not in self.mine:  # adopted: its exit code is unknown, as LocalExecutor's is
            m.tries[proc.step] += 1
            m.order.append(proc.step)
            wrote = m.end(proc, proc.outcome in ("ok", "kill_ok"))  # one that skips (done, not forced) cannot tell
            m.failures[proc.step] += not (wrote and m.current(proc.step))
            return -1
        if proc.outcome in ("kill_ok", "kill_fail"):
            proc.outcome = proc.outcome.removeprefix("kill_")
            raise RunnerKilled
        if proc.outcome.startswith("takeover_"):
            proc.outcome = proc.outcome.removeprefix("takeover_")
            m.take_over()  # which adopts this stage: it has ended when this runner wakes up
            return 0 if proc.outcome == "ok" else 1
        if proc.outcome == "interrupt":
            m.runner.interrupted = True
            stop.set()
            return None
        m.end(proc, proc.outcome in ("ok", "crash_after_done"))
        code = 0 if proc.outcome == "ok" else 1
        m.failures[proc.step] += code != 0 or not m.current(proc.step)
        return code

    def terminate(self, handle, grace_s=0, hurry=None):
        self.m.procs[handle.pid].alive = False  # Ctrl-C: the stage checkpoints and exits, done.json unwritten


def make_runner(m: Machine) -> Runner:
    runner = Runner(m.store, m.steps(), "tiny", executor=FakeExecutor(m), max_retries=m.max_retries, backoff_s=0.0,
                    on_event=lambda msg: None)
    m.runner = runner
    return runner


def expected_reruns(m: Machine) -> set[str]:
    """What a plain run must start (make's rule): never run, config changed, an upstream that re-runs or finished
    after it, or a process of it still running from a killed runner."""
    out: set[str] = set()
    for name in NAMES:
        done, deps = m.done(name), [f"echo_{d}" for d in GRAPH[name.removeprefix("echo_")]]
        if (not m.current(name) or any(d in out for d in deps) or any(p.step == name for p in m.live())
                or any((m.done(d) or {}).get("ended", 0) > done["ended"] for d in deps)):
            out.add(name)
    return out


def invoke(m: Machine, mode: tuple, script: dict):
    runner = make_runner(m)
    m.mode, m.script = mode, {k: list(v) for k, v in script.items()}
    m.tries, m.failures, m.order, m.taken_over = Counter(), Counter(), [], None
    started_at = m.clock
    kwargs = {"only": list(mode[1])} if mode[0] == "only" else {"from_step": mode[1]} if mode[0] == "from" else {}
    plan = runner.plan(**kwargs)
    preview = {s.name for s, _, why in runner.preview(plan) if why}
    planned = {s.name for s, *_ in plan}
    if mode == PLAIN:
        assert preview == expected_reruns(m), "the dry run's list is not what a plain run has to start"
    else:
        assert preview == planned, "--only/--from must start every step they name"
    try:
        ok = runner.run(**kwargs)
    except RunnerKilled:
        return None
    except PipelineError as e:  # suspended, then taken over: it must stop driving the run the moment it wakes
        assert m.taken_over is not None and "took over" in str(e), str(e)
        assert m.store.get_json(STATE_KEY) == m.taken_over, "a runner taken over wrote state.json over the new one's"
        assert len(m.order) == m.tried_at_takeover, f"a runner taken over went on to {m.order[m.tried_at_takeover:]}"
        return None
    assert m.taken_over is None, "a runner taken over carried on as if it still drove the run"
    mine = runner.executor.mine
    assert not any(p.alive for pid, p in m.procs.items() if pid in mine), "a returning runner left its stage running"
    state = m.store.get_json(STATE_KEY)["steps"]
    for name, row in state.items():
        if row["state"] == "succeeded" and name in m.tries:  # rows of steps this run did not reach keep their last run
            assert m.current(name), f"{name}: state says succeeded, done.json is not its current config"
    assert set(m.tries) <= preview, f"started {set(m.tries) - preview}, which the dry run did not list"
    failed = [n for n, row in state.items() if row["state"] == "failed" and n in m.tries]
    if runner.interrupted:
        assert not ok
        return ok
    if not ok:
        assert len(failed) == 1, f"a failed run names one failed step, got {failed}"
        [bad] = failed
        assert m.failures[bad] == m.max_retries + 1, f"{bad}: failed after {m.failures[bad]} tries, not {m.max_retries + 1}"
        assert m.order[-1] == bad, f"the run went on to {m.order[m.order.index(bad) + 1:]} after {bad} failed"
        return ok
    assert not failed
    assert set(m.tries) == preview, "the run started less than the dry run listed"
    for name in planned:
        assert m.current(name), f"{name}: the run succeeded without it done with its current config"
        if mode != PLAIN:
            assert m.done(name)["ended"] > started_at, f"{name}: forced by {mode[0]} but not re-run"
    if mode == PLAIN:
        assert not m.live(), "a successful run left a stage process running"
        for name in NAMES:
            for dep in m.ancestors(name):
                assert m.done(dep)["ended"] <= m.done(name)["ended"], f"{name} is older than its upstream {dep}"
        assert all(why is None for _, _, why in make_runner(m).preview(make_runner(m).plan())), "nothing left to do"
    return ok


outcomes = st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=3)
modes = st.one_of(st.just(PLAIN), st.tuples(st.just("from"), st.sampled_from(NAMES)),
                  st.tuples(st.just("only"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True)))
ops = st.one_of(
    st.tuples(st.just("run"), modes, st.dictionaries(st.sampled_from(NAMES), outcomes, max_size=3)),
    st.tuples(st.just("edit"), st.sampled_from(NAMES), st.integers(1, 3)),
    st.tuples(st.just("orphans_end")),
)

@fuzz(150)
@given(max_retries=st.integers(0, 2), history=st.lists(ops, min_size=1, max_size=8))
# a re-run after a failure (or after earlier runs) gets every retry, not what the step's attempt count left over
@example(max_retries=1, history=[("run", PLAIN, {}), ("run", ("only", ["echo_a"]), {"echo_a": ["fail"]})])
# a killed runner's stage that then fails is adopted: an older done.json with the same config is no success for it
@example(max_retries=0, history=[("run", ("only", ["echo_b"]), {}), ("run", PLAIN, {"echo_b": ["kill_fail"]}),
                                 ("run", PLAIN, {})])
# and its retry runs the stage for real (--force), not a stage that skips as done and leaves it older than its upstream
@example(max_retries=1, history=[("run", ("only", ["echo_d"]), {}), ("run", PLAIN, {"echo_d": ["kill_fail"]}),
                                 ("run", PLAIN, {})])
# a forced re-run's stage outlives its runner: the next plain run waits for it before starting what depends on it
@example(max_retries=1, history=[("run", PLAIN, {}), ("run", ("only", ["echo_a"]), {"echo_a": ["kill_ok"]}), ("run", PLAIN, {})])
def test_any_history_of_invocations_keeps_the_runners_promises(tmp_path, max_retries, history):
    note(f"max_retries={max_retries} history={history!r}")
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        m = Machine(Path(root), max_retries)
        for op in history:
            if op[0] == "run":
                invoke(m, op[1], op[2])
            elif op[0] == "edit":
                m.values[op[1]] = op[2]
            else:
                m.end_orphans()
        m.end_orphans()
        assert invoke(m, PLAIN, {}) is True, "a plain run where every stage succeeds must succeed"
        assert all(m.current(n) for n in NAMES), "a cooperative plain run must finish the pipeline"
