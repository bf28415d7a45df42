"""The runner's state machine through the real local executor: retries, resume, adoption, torchrun, signals."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from nanochat import profiles
from nanochat.config import ConfigError
from nanochat.pipeline import Step
from nanochat.runner import (LOCK_KEY, STATE_KEY, LocalExecutor, PipelineError, Runner, failure_notes, last_error,
                             parse_overrides, runner_status, status_rows)
from nanochat.store import open_store

ECHO = "tests.fake_stages.echo"


def executions(store, name) -> int:
    return len(store.list(f"test/{name}/executions/"))


def make_runner(store, steps, tmp_path, **kw):
    kw.setdefault("backoff_s", 0.1)
    return Runner(store, steps, "tiny", executor=LocalExecutor(tmp_path / "logs", echo=False), on_event=lambda m: None, **kw)


def test_pipeline_retries_then_skips_when_done(store_uri, tmp_path):
    store = open_store(store_uri)
    steps = [Step("echo_a", ECHO, args=("--label=a", "--value=3")),
             Step("echo_b", ECHO, args=("--label=b", "--fail-times=1"), depends_on=("echo_a",))]
    assert make_runner(store, steps, tmp_path, max_retries=1).run()
    assert executions(store, "echo_a") == 1 and executions(store, "echo_b") == 2
    state = store.get_json(STATE_KEY)["steps"]
    assert state["echo_b"]["state"] == "succeeded" and state["echo_b"]["attempts"] == 2
    assert store.get_bytes("outputs/echo_a.txt") == b"3"
    done = store.get_json("stages/echo_b/done.json")
    assert done["metrics"]["value"] == 1 and done["artifacts"]["outputs/echo_b.txt"]
    assert len(store.list("logs/")) == 3  # one log per attempt, uploaded to the store
    # a second run is a no-op: nothing is executed again
    assert make_runner(store, steps, tmp_path).run()
    assert executions(store, "echo_a") == 1 and executions(store, "echo_b") == 2
    # a changed config re-runs the changed stage, and its dependents because their input changed
    steps[0] = Step("echo_a", ECHO, args=("--label=a", "--value=4"))
    assert make_runner(store, steps, tmp_path).run()
    assert executions(store, "echo_a") == 2 and executions(store, "echo_b") == 3
    rows = {r["stage"]: r for r in status_rows(store, steps)}
    assert rows["echo_a"]["state"] == "succeeded" and "value=4" in rows["echo_a"]["metrics"]


def test_retries_exhausted_stops_the_pipeline(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    steps = [Step("echo_x", ECHO, args=("--label=x", "--fail-times=9")), Step("echo_y", ECHO, args=("--label=y",), depends_on=("echo_x",))]
    assert not make_runner(store, steps, tmp_path, max_retries=2).run()
    state = store.get_json(STATE_KEY)["steps"]
    assert state["echo_x"]["state"] == "failed" and state["echo_x"]["attempts"] == 3
    assert "echo_y" not in state and executions(store, "echo_y") == 0
    # running it again is a new try with every retry, not the one attempt the step's count would leave
    assert not make_runner(store, steps, tmp_path, max_retries=2).run()
    assert executions(store, "echo_x") == 6 and store.get_json(STATE_KEY)["steps"]["echo_x"]["attempts"] == 6


def test_only_and_from_force_reruns(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    steps = [Step("echo_a", ECHO, args=("--label=a",)), Step("echo_b", ECHO, args=("--label=b",)), Step("echo_c", ECHO, args=("--label=c",))]
    assert make_runner(store, steps, tmp_path).run()
    assert make_runner(store, steps, tmp_path).run(only=["echo_b"])
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [1, 2, 1]
    assert make_runner(store, steps, tmp_path).run(from_step="echo_b")
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [1, 3, 2]
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        make_runner(store, steps, tmp_path).run(only=["nope"])


def test_upstream_rerun_makes_dependents_stale_across_invocations(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    steps = [Step("echo_a", ECHO, args=("--label=a",)), Step("echo_b", ECHO, args=("--label=b",), depends_on=("echo_a",)),
             Step("echo_c", ECHO, args=("--label=c",))]
    events = []
    assert make_runner(store, steps, tmp_path).run()
    assert make_runner(store, steps, tmp_path).run(only=["echo_a"])  # e.g. the user re-trained the base model alone
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [2, 1, 1]
    runner = make_runner(store, steps, tmp_path)
    runner.on_event = events.append
    assert runner.run()  # the next plain run brings echo_b up to date, leaves the independent echo_c alone
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [2, 2, 1]
    assert any("echo_b: echo_a finished after it last ran" in e for e in events)
    assert make_runner(store, steps, tmp_path).run()  # and then everything is current
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [2, 2, 1]


def fabricate_done(store, runner):
    """Mark every planned step done with its current config, finished in pipeline order (as a real run leaves them)."""
    for i, (_, _, name, h, _) in enumerate(runner.plan()):
        store.put_json(f"stages/{name}/done.json", {"config_hash": h, "started": 1000.0 + i, "ended": 1000.5 + i})


def test_dry_run_preview_lists_exactly_what_the_run_starts(tmp_path):
    """A changed upstream config: the preview (what `speedrun --dry-run` prints) lists it and every dependent,
    with the reason, and the real run then starts exactly those steps and no other."""
    store = open_store(f"file://{tmp_path}/st")

    def pipeline(value):
        return [Step("echo_a", ECHO, args=("--label=a", f"--value={value}")),
                Step("echo_b", ECHO, args=("--label=b",), depends_on=("echo_a",)),
                Step("echo_c", ECHO, args=("--label=c",), depends_on=("echo_b",)),
                Step("echo_d", ECHO, args=("--label=d",)),
                Step("echo_e", ECHO, args=("--label=e",), depends_on=("echo_d",)),
                Step("echo_f", ECHO, args=("--label=f",), depends_on=("echo_c", "echo_e"))]
    fabricate_done(store, make_runner(store, pipeline(1), tmp_path))
    unchanged = make_runner(store, pipeline(1), tmp_path)
    assert [why for _, _, why in unchanged.preview(unchanged.plan())] == [None] * 6

    runner = make_runner(store, pipeline(2), tmp_path)
    preview = {s.name: why for s, _, why in runner.preview(runner.plan())}
    assert preview == {"echo_a": "config changed", "echo_b": "upstream echo_a re-runs", "echo_c": "upstream echo_b re-runs",
                       "echo_d": None, "echo_e": None, "echo_f": "upstream echo_c re-runs"}
    events = []
    runner.on_event = events.append
    assert runner.run()
    started = [e.split(":")[0] for e in events if ": started (attempt" in e]
    assert started == [name for name, why in preview.items() if why]
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c", "echo_d", "echo_e", "echo_f")] == [1, 1, 1, 0, 0, 1]
    after = make_runner(store, pipeline(2), tmp_path)
    assert [why for _, _, why in after.preview(after.plan())] == [None] * 6  # and then everything is current


def test_bad_config_fails_before_any_work(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    steps = [Step("echo_a", ECHO, args=("--label=a",)), Step("echo_b", ECHO, args=("--label=b", "--steps=oops"))]
    with pytest.raises(ConfigError, match="stage echo_b: --steps: expected an integer"):
        make_runner(store, steps, tmp_path).run()
    assert executions(store, "echo_a") == 0
    with pytest.raises(ConfigError, match="unknown stage 'zzz'"):
        parse_overrides(["zzz.depth=3"], steps)
    assert parse_overrides(["tests.fake_stages.echo.value=3", "seed=1"], steps) == {ECHO: ["--value=3", "--seed=1"]}


def test_bare_set_key_goes_to_the_stages_that_have_it(tmp_path):
    steps = [Step("echo_a", ECHO, args=("--label=a",)), Step("allreduce", "tests.fake_stages.allreduce")]
    assert parse_overrides(["scale=3", "steps=2", "seed=1"], steps) == {
        "tests.fake_stages.allreduce": ["--scale=3", "--seed=1"], ECHO: ["--steps=2", "--seed=1"]}
    runner = make_runner(open_store(f"file://{tmp_path}/st"), steps, tmp_path, overrides=parse_overrides(["scale=3"], steps))
    assert [name for _, _, name, _, _ in runner.plan()] == ["echo_a", "allreduce"]  # echo_a is not handed --scale
    with pytest.raises(ConfigError, match=r"--set 'nosuch=1': no stage in this run has --nosuch; set it for one stage as STAGE.nosuch=1"):
        parse_overrides(["nosuch=1"], steps)


def test_background_step_and_dependency(tmp_path):
    store = open_store(f"file://{tmp_path}/st")
    steps = [Step("echo_bg", ECHO, args=("--label=bg", "--steps=4", "--step-s=0.3"), background=True),
             Step("echo_fg", ECHO, args=("--label=fg",)),
             Step("echo_after", ECHO, args=("--label=after",), depends_on=("echo_bg",))]
    assert make_runner(store, steps, tmp_path).run()
    fg = store.get_json("stages/echo_fg/done.json")
    bg = store.get_json("stages/echo_bg/done.json")
    after = store.get_json("stages/echo_after/done.json")
    assert fg["ended"] < bg["ended"]  # the foreground step did not wait for the background one
    assert after["started"] >= bg["ended"]  # the dependent did


PARALLEL_PIPELINE = [  # data_rest's shape on the GPU profiles: a background step, a foreground one beside it, a join
    {"name": "echo_bg", "module": ECHO, "args": ["--label=bg", "--steps=12", "--step-s=0.25", "--save-every=2"],
     "background": True},
    {"name": "echo_fg", "module": ECHO, "args": ["--label=fg", "--steps=12", "--step-s=0.25", "--save-every=2"]},
    {"name": "echo_join", "module": ECHO, "args": ["--label=join"], "depends_on": ["echo_bg", "echo_fg"]},
]


def both_running(store):
    return all(step_state(store, n) == "running" and store.exists(f"test/{n}/attempts") for n in ("echo_bg", "echo_fg"))


def test_a_killed_runner_with_a_background_step_running_beside_another_leaves_both_to_adopt(tmp_path):
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    r1 = spawn_runner(uri, PARALLEL_PIPELINE, tmp_path, "r1")
    wait_for(lambda: both_running(store))
    r1.send_signal(signal.SIGKILL)
    r1.wait()
    r2 = spawn_runner(uri, PARALLEL_PIPELINE, tmp_path, "r2")
    assert r2.wait(timeout=120) == 0, (tmp_path / "r2.log").read_text()
    log = (tmp_path / "r2.log").read_text()
    assert log.count("adopting running process") == 2, log
    assert [executions(store, n) for n in ("echo_bg", "echo_fg", "echo_join")] == [1, 1, 1]
    join = store.get_json("stages/echo_join/done.json")
    assert all(join["started"] >= store.get_json(f"stages/{n}/done.json")["ended"] for n in ("echo_bg", "echo_fg"))


def test_ctrl_c_stops_a_background_step_and_the_one_beside_it_and_the_rerun_resumes_both(tmp_path):
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    r1 = spawn_runner(uri, PARALLEL_PIPELINE, tmp_path, "r1")
    wait_for(lambda: both_running(store) and all(store.exists(f"test/{n}/ckpt.json") for n in ("echo_bg", "echo_fg")))
    r1.send_signal(signal.SIGINT)
    assert r1.wait(timeout=60) == 1
    assert step_state(store, "echo_bg") == step_state(store, "echo_fg") == "interrupted"
    assert not store.exists("stages/echo_join/done.json")
    saved = {n: store.get_json(f"test/{n}/ckpt.json")["step"] for n in ("echo_bg", "echo_fg")}
    assert all(0 < v < 12 for v in saved.values()), saved
    r2 = spawn_runner(uri, PARALLEL_PIPELINE, tmp_path, "r2")
    assert r2.wait(timeout=120) == 0, (tmp_path / "r2.log").read_text()
    for n, step in saved.items():
        log = spawned_stage_log(tmp_path, f"{n}.attempt2.log")
        assert f"resuming from step {step}" in log
        history = [json.loads(line)["step"] for line in store.get_bytes(f"stages/{n}/history.jsonl").decode().splitlines()]
        assert history == list(range(1, 13))  # continuous: nothing lost, nothing repeated
    assert store.exists("stages/echo_join/done.json")


def test_torchrun_two_process_stage(tmp_path, monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "tiny", {**profiles.PROFILES["tiny"], "nproc": {"tests.fake_stages.allreduce": 2}})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    store = open_store(f"file://{tmp_path}/st")
    steps = [Step("allreduce", "tests.fake_stages.allreduce", args=("--scale=5",), gpu=True)]
    assert make_runner(store, steps, tmp_path).run()
    # one thread per rank, as torchrun's default, but set by the runner so that torchrun's banner stays out of the log
    assert store.get_json("outputs/allreduce.json") == {"sum": 15.0, "world_size": 2, "threads": 1}
    assert "OMP_NUM_THREADS" not in (tmp_path / "logs" / "allreduce.attempt1.log").read_text()
    assert store.get_json("stages/allreduce/done.json")["world_size"] == 2


def spawn_runner(store_uri, steps, tmp_path, name="runner", only=None):
    spec = json.dumps({"steps": steps, "max_retries": 0, "only": only})
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "tests.fake_stages.pipeline_main", store_uri, spec], stdout=log, stderr=subprocess.STDOUT)


def spawned_stage_log(tmp_path, name: str) -> str:
    """A stage log a spawn_runner runner wrote (its executor logs under NANOCHAT_BASE_DIR, keyed by the store)."""
    return "".join(p.read_text() for p in (tmp_path / "nanochat-base" / "logs").rglob(name))


def wait_for(cond, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def step_state(store, name):
    return (store.get_json_or(STATE_KEY) or {}).get("steps", {}).get(name, {}).get("state")


SLOW_PIPELINE = [
    {"name": "echo_a", "module": ECHO, "args": ["--label=a"]},
    {"name": "echo_b", "module": ECHO, "args": ["--label=b", "--steps=12", "--step-s=0.25", "--save-every=2"]},
    {"name": "echo_c", "module": ECHO, "args": ["--label=c"]},
]


def test_killed_runner_restarts_and_adopts(tmp_path):
    """SIGKILL the runner while a stage runs: the restarted runner adopts the live stage, duplicates nothing."""
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    r1 = spawn_runner(uri, SLOW_PIPELINE, tmp_path, "r1")
    wait_for(lambda: step_state(store, "echo_b") == "running" and store.exists("test/echo_b/attempts"))
    assert f"runner: pid {r1.pid} on {socket.gethostname()} drives this run" in runner_status(store)  # `nanochat status`
    wait_for(lambda: store.exists("stages/echo_b/history.jsonl"))
    progress = next(r for r in status_rows(store) if r["stage"] == "echo_b")["metrics"]
    assert re.fullmatch(r"step \d+/12(, eta \d+m\d\ds)?", progress), progress
    r1.send_signal(signal.SIGKILL)
    r1.wait()
    stage_pid = store.get_json(STATE_KEY)["steps"]["echo_b"]["pid"]
    assert os.path.exists(f"/proc/{stage_pid}")  # the stage survived its runner
    line = runner_status(store)
    assert f"pid {r1.pid} on {socket.gethostname()} is gone" in line and f"echo_b still runs (pid {stage_pid})" in line
    r2 = spawn_runner(uri, SLOW_PIPELINE, tmp_path, "r2")
    assert r2.wait(timeout=120) == 0, (tmp_path / "r2.log").read_text()
    assert "adopting running process" in (tmp_path / "r2.log").read_text()
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [1, 1, 1]
    assert runner_status(store) is None  # nothing in flight


def test_status_shows_a_running_stages_progress_and_eta(tmp_path):
    """From the history the stage flushes: this attempt's rows only (a resumed stage's earlier ones have old times)."""
    store = open_store(f"file://{tmp_path}/st")
    now = time.time()
    store.put_json(STATE_KEY, {"steps": {"base_train": {"state": "running", "started": now - 100, "attempts": 2}}})
    rows = [{"step": s, "total": 400, "time": now - 5000 + s, "loss": 3.0} for s in range(1, 50)]  # the first attempt
    rows += [{"step": s, "total": 400, "time": now - 90 + (s - 50) * 0.5, "loss": 2.0} for s in range(50, 201, 10)]
    store.put_bytes("stages/base_train/history.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    [row] = status_rows(store)
    assert row["state"] == "running" and row["metrics"] == "step 200/400, eta 1m40s"  # 0.5 s a step, 200 to go
    assert 99 <= float(row["duration"].rstrip("s")) < 110


def test_status_shows_a_failed_steps_error_and_log(tmp_path, capsys):
    from nanochat.cli import main
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    steps = [Step("echo_x", ECHO, args=("--label=x", "--fail-times=9"))]
    assert not make_runner(store, steps, tmp_path, max_retries=0).run()
    log = tmp_path / "logs" / "echo_x.attempt1.log"
    assert main(["status", "--store", uri]) == 0
    out = capsys.readouterr().out
    assert f"echo_x: failed (exit 1): RuntimeError: injected failure 1/9; log: {log}" in out, out
    log.unlink()  # status on another machine: the copy the runner uploaded
    assert failure_notes(store) == [f"echo_x: failed (exit 1): RuntimeError: injected failure 1/9; "
                                    f"log: {store.uri('logs/echo_x.attempt1.log')}"]


def test_the_last_error_of_a_log_is_the_stages_not_torchruns_summary():
    torchrun = """[W socket] ignored warning
Traceback (most recent call last):
  File "x.py", line 3, in <module>
ValueError: shapes (3,) and (4,) do not match
E1129 21:40:00 elastic failed (exitcode: 1) local_rank: 0
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
"""
    assert last_error(torchrun) == "ValueError: shapes (3,) and (4,) do not match"
    ours = "[data] fetching\nnanochat stage data: error: download failed after 6 attempts: http://x/y: 503\n"
    assert last_error(ours + torchrun) == "nanochat stage data: error: download failed after 6 attempts: http://x/y: 503"
    assert last_error("Killed\n") == "Killed" and last_error("") == ""


def test_status_names_a_silent_runner_and_stages_left_running(tmp_path, capsys):
    from nanochat.cli import main
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    store.put_json(STATE_KEY, {"profile": "tiny", "steps": {"data": {"state": "running", "pid": 0, "host": socket.gethostname()}}})
    store.put_json(LOCK_KEY, {"host": "elsewhere", "pid": 7, "heartbeat": time.time() - 600})
    assert main(["status", "--store", uri]) == 0
    out = capsys.readouterr().out
    assert "runner: pid 7 on elsewhere has been silent for 10 min" in out and "data was cut short" in out
    store.delete(LOCK_KEY)
    assert runner_status(store).startswith("runner: none, but data shows running (its runner was killed)")
    store.put_json(LOCK_KEY, {"host": "elsewhere", "pid": 7, "heartbeat": time.time() - 3})
    assert runner_status(store) == "runner: pid 7 on elsewhere drives this run (heartbeat 3s ago)"


def test_a_plain_run_waits_for_a_killed_runners_rerun_of_a_done_step(tmp_path):
    """`--only echo_b` re-runs a done step; its runner is SIGKILLed. The next plain run must not skip echo_b as done
    (its done.json is from the run before, and the live process is rewriting its outputs): it adopts the process,
    waits for it, and then re-runs what depends on it."""
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    spec = [*SLOW_PIPELINE[:2], {**SLOW_PIPELINE[2], "depends_on": ["echo_b"]}]
    steps = [Step(**{**s, "args": tuple(s["args"]), "depends_on": tuple(s.get("depends_on", ()))}) for s in spec]
    assert make_runner(store, steps, tmp_path).run()
    r1 = spawn_runner(uri, spec, tmp_path, "r1", only=["echo_b"])
    wait_for(lambda: executions(store, "echo_b") == 2)
    r1.send_signal(signal.SIGKILL)
    r1.wait()
    events = []
    runner = make_runner(store, steps, tmp_path)
    runner.on_event = events.append
    assert runner.run(), events
    assert any("echo_b: adopting running process" in e for e in events), events
    assert [executions(store, n) for n in ("echo_a", "echo_b", "echo_c")] == [1, 2, 2]
    assert store.get_json("stages/echo_b/done.json")["ended"] <= store.get_json("stages/echo_c/done.json")["started"]


def test_second_runner_is_refused_while_first_runs(tmp_path):
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    r1 = spawn_runner(uri, SLOW_PIPELINE, tmp_path, "r1")
    try:
        wait_for(lambda: step_state(store, "echo_b") == "running")
        runner = make_runner(store, [Step(**{**s, "args": tuple(s["args"])}) for s in SLOW_PIPELINE], tmp_path)
        with pytest.raises(PipelineError, match="another runner"):
            runner.run()
    finally:
        r1.send_signal(signal.SIGINT)
        r1.wait(timeout=120)


def test_of_two_runners_starting_at_once_one_wins(tmp_path, monkeypatch):
    """Both read no lock before either writes one: the lock is a compare-and-swap, so the second write loses."""
    store = open_store(f"file://{tmp_path}/st")
    first, second = (make_runner(store, [Step("echo_a", ECHO)], tmp_path) for _ in range(2))
    real = store.get_json_versioned
    reads = [real(LOCK_KEY), real(LOCK_KEY)]
    monkeypatch.setattr(store, "get_json_versioned", lambda key: reads.pop(0) if reads else real(key))
    try:
        first.acquire_lock()
        with pytest.raises(PipelineError, match="another runner took .* just now"):
            second.acquire_lock()
    finally:
        first.stop.set()


def heartbeat_with(store, tmp_path, monkeypatch, put_json_if):
    """A locked runner beating every 50 ms through a store whose put_json_if is `put_json_if(real, *args)`."""
    import nanochat.runner as runner_mod
    monkeypatch.setattr(runner_mod, "HEARTBEAT_S", 0.05)
    events = []
    runner = make_runner(store, [Step("echo_a", ECHO)], tmp_path)
    runner.on_event = events.append
    runner.acquire_lock()
    real = store.put_json_if
    monkeypatch.setattr(store, "put_json_if", lambda *args: put_json_if(real, *args))
    return runner, events


@pytest.mark.parametrize("answer", ["lost", "error"])
def test_the_heartbeat_rides_out_a_store_error_and_a_lost_answer(tmp_path, monkeypatch, answer):
    """A failed lock write (a store blip) is retried at the next beat; a write that landed but whose answer was lost
    (botocore then retries it: 412) is recognised as this runner's own by its content, not taken for a takeover."""
    from nanochat.store import StoreError
    store = open_store(f"file://{tmp_path}/st")
    calls = []

    def flaky(real, *args):
        calls.append(args)
        if len(calls) == 1:
            if answer == "lost":
                real(*args)
            raise StoreError("S3 put failed for runner/lock.json: Connection reset by peer")
        return real(*args)
    runner, events = heartbeat_with(store, tmp_path, monkeypatch, flaky)
    try:
        wait_for(lambda: len(calls) >= 4, timeout=10)
        assert runner.owns_lock() and runner.lost_to is None, events
        assert not any("took over" in e for e in events)
        assert [e for e in events if "could not renew the runner lock" in e] == [events[0]]
        beat = store.get_json(LOCK_KEY)["heartbeat"]
        wait_for(lambda: store.get_json(LOCK_KEY)["heartbeat"] > beat, timeout=10)  # still beating
    finally:
        runner.stop.set()
    runner.release_lock()
    assert not store.exists(LOCK_KEY)


def usurp(store, lock: dict):
    """Take runner/lock.json as another runner does, by compare-and-swap: a plain write could be lost to a heartbeat's
    compare-and-swap in flight (it read the old version before this write and replaces it after)."""
    while store.put_json_if(LOCK_KEY, lock, store.get_json_versioned(LOCK_KEY)[1]) is None:
        pass


def run_in_thread(runner):
    """runner.run() in a thread: (thread, outcome) with outcome["ok"] or outcome["error"] once it returns."""
    import threading
    outcome = {}

    def go():
        try:
            outcome["ok"] = runner.run()
        except PipelineError as e:
            outcome["error"] = str(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, outcome


def take_over_while_echo_b_runs(store, tmp_path, host, heartbeat_s, monkeypatch):
    """A runner drives SLOW_PIPELINE; while echo_b runs another runner (on `host`) takes the lock and writes its own
    state. Returns what the first runner left: (outcome, events, echo_b's pid, the usurping lock, its state)."""
    import socket
    import nanochat.runner as runner_mod
    monkeypatch.setattr(runner_mod, "HEARTBEAT_S", heartbeat_s)
    steps = [Step(**{**s, "args": tuple(s["args"])}) for s in SLOW_PIPELINE]
    events = []
    runner = make_runner(store, steps, tmp_path)
    runner.on_event = events.append
    thread, outcome = run_in_thread(runner)
    wait_for(lambda: step_state(store, "echo_b") == "running" and store.exists("test/echo_b/attempts"))
    pid = store.get_json(STATE_KEY)["steps"]["echo_b"]["pid"]
    usurper = {"host": socket.gethostname() if host == "here" else host, "pid": 1, "heartbeat": time.time() + 1}
    theirs = {"steps": {}, "owner": "the runner that took over"}
    usurp(store, usurper)
    store.put_json(STATE_KEY, theirs)
    thread.join(timeout=60)
    assert not thread.is_alive()
    return outcome, events, pid, usurper, theirs


@pytest.mark.parametrize("heartbeat_s", [0.05, 600.0])
def test_a_runner_taken_over_on_this_host_stops_driving_and_leaves_its_stage_to_the_new_one(store_uri, tmp_path, monkeypatch,
                                                                                          heartbeat_s):
    """A runner silent past STALE_LOCK_S (a suspended laptop) finds its lock taken over, at its next heartbeat or at
    its next state write, whichever comes first: it launches nothing more, writes no state over the new owner's,
    never takes the lock back, and leaves its running stage for the new runner to adopt."""
    from nanochat.runner import pid_alive
    store = open_store(store_uri)
    outcome, events, pid, usurper, theirs = take_over_while_echo_b_runs(store, tmp_path, "here", heartbeat_s, monkeypatch)
    assert "another runner (pid 1 on" in outcome["error"] and "took over" in outcome["error"]
    assert any("another runner took over" in e for e in events)
    assert store.get_json(LOCK_KEY) == usurper and store.get_json(STATE_KEY) == theirs
    assert executions(store, "echo_c") == 0 and not (tmp_path / "logs" / "echo_c.attempt1.log").exists()
    if heartbeat_s < 1:  # seen by the heartbeat while echo_b runs: left running, the new runner adopts it
        assert pid_alive(pid) and any(f"left running (pid {pid})" in e for e in events)
        wait_for(lambda: not pid_alive(pid))
    assert store.get_json("stages/echo_b/done.json")["config_hash"]  # echo_b ran to its end


def test_a_runner_taken_over_while_it_waits_to_retry_does_not_launch_the_retry(tmp_path, monkeypatch):
    """Taken over during the back-off before a retry, long before its next heartbeat: the launch itself checks."""
    import nanochat.runner as runner_mod
    monkeypatch.setattr(runner_mod, "HEARTBEAT_S", 600.0)
    store = open_store(f"file://{tmp_path}/st")
    runner = make_runner(store, [Step("echo_x", ECHO, args=("--label=x", "--fail-times=1"))], tmp_path, max_retries=1,
                         backoff_s=2.0)
    thread, outcome = run_in_thread(runner)
    wait_for(lambda: step_state(store, "echo_x") == "retrying")
    usurp(store, {"host": "elsewhere", "pid": 7, "heartbeat": time.time()})
    thread.join(timeout=60)
    assert "took over" in outcome["error"] and executions(store, "echo_x") == 1
    assert not (tmp_path / "logs" / "echo_x.attempt2.log").exists()  # not launched (and stopped at once) either


def test_a_runner_taken_over_from_another_host_stops_its_stage(tmp_path, monkeypatch):
    """The new runner is elsewhere: it cannot adopt this host's process and starts its own, so this one stops it."""
    from nanochat.runner import pid_alive
    store = open_store(f"file://{tmp_path}/st")
    outcome, events, pid, usurper, theirs = take_over_while_echo_b_runs(store, tmp_path, "elsewhere", 0.05, monkeypatch)
    assert "on elsewhere) took over" in outcome["error"]
    assert not pid_alive(pid) and any(f"stopped (pid {pid})" in e and "elsewhere" in e for e in events)
    assert not store.exists("stages/echo_b/done.json") and executions(store, "echo_c") == 0
    assert store.get_json(LOCK_KEY) == usurper and store.get_json(STATE_KEY) == theirs


def test_sigint_checkpoints_and_rerun_resumes(tmp_path):
    """Ctrl-C the runner: the stage gets SIGTERM, saves its step, exits; the next run resumes from there."""
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    r1 = spawn_runner(uri, SLOW_PIPELINE, tmp_path, "r1")
    wait_for(lambda: store.exists("test/echo_b/ckpt.json"))
    r1.send_signal(signal.SIGINT)
    assert r1.wait(timeout=60) == 1
    assert step_state(store, "echo_b") == "interrupted"
    saved = store.get_json("test/echo_b/ckpt.json")["step"]
    assert 0 < saved < 12
    r2 = spawn_runner(uri, SLOW_PIPELINE, tmp_path, "r2")
    assert r2.wait(timeout=120) == 0, (tmp_path / "r2.log").read_text()
    log = spawned_stage_log(tmp_path, "echo_b.attempt2.log")
    assert f"resuming from step {saved}" in log
    history = [json.loads(line)["step"] for line in store.get_bytes("stages/echo_b/history.jsonl").decode().splitlines()]
    assert history == list(range(1, 13))  # continuous: nothing lost, nothing repeated
    assert executions(store, "echo_c") == 1


def test_a_second_ctrl_c_kills_a_stage_slow_to_checkpoint(tmp_path):
    """The first Ctrl-C asks the stage to checkpoint and waits (up to NANOCHAT_TERM_GRACE_S); a second one kills it
    now. The next run resumes from the last checkpoint the stage saved on its own."""
    uri = f"file://{tmp_path}/st"
    store = open_store(uri)
    spec = [{"name": "echo_b", "module": ECHO, "args": ["--label=b", "--steps=40", "--step-s=0.25", "--save-every=2",
                                                        "--stop-s=60"]}]
    r1 = spawn_runner(uri, spec, tmp_path, "r1")
    wait_for(lambda: store.exists("test/echo_b/ckpt.json"))
    r1.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl-C again to kill them now" in (tmp_path / "r1.log").read_text())
    stage_pid = store.get_json(STATE_KEY)["steps"]["echo_b"]["pid"]
    time.sleep(0.5)  # the stage is in its 60 s save
    assert r1.poll() is None and os.path.exists(f"/proc/{stage_pid}")
    r1.send_signal(signal.SIGINT)
    assert r1.wait(timeout=20) == 1, (tmp_path / "r1.log").read_text()
    assert "second SIGINT: killing the stages now" in (tmp_path / "r1.log").read_text()
    wait_for(lambda: not os.path.exists(f"/proc/{stage_pid}"), timeout=10)
    assert step_state(store, "echo_b") == "interrupted" and not store.exists(LOCK_KEY)
    saved = store.get_json("test/echo_b/ckpt.json")["step"]
    r2 = spawn_runner(uri, spec, tmp_path, "r2")
    assert r2.wait(timeout=120) == 0, (tmp_path / "r2.log").read_text()
    log = spawned_stage_log(tmp_path, "echo_b.attempt2.log")
    assert f"resuming from step {saved}" in log


def test_a_wiped_store_starts_its_stage_logs_afresh(tmp_path):
    """The log directory outlives the store it belongs to (it is keyed by the store's path): a run on a new store at the
    same path writes attempt 1's log anew instead of appending to the old run's, which the runner would replay."""
    import shutil
    steps = [Step("echo_a", ECHO, args=("--label=a",))]
    for _ in range(2):
        shutil.rmtree(tmp_path / "st", ignore_errors=True)
        assert make_runner(open_store(f"file://{tmp_path}/st"), steps, tmp_path).run()
    [log] = (tmp_path / "logs").rglob("echo_a.attempt1.log")
    assert log.read_text().count("[echo_a] start:") == 1
