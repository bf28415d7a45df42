"""The NanochatRun reconcile against a simulated cluster: random histories of job transitions, clock jumps, spec edits,
lost status patches and deleted jobs, with the operator's invariants checked after every pass and, at the end, a
cooperative cluster that must carry the run to Succeeded or Failed."""
from __future__ import annotations

import copy
import json
from collections import Counter

from hypothesis import example, given, strategies as st

from operators import reconcile as rc
from operators.children import ANN_CHECKPOINT, ANN_REPORT_DIGEST, rfc3339
from operators.pytorchjob import ANN_TEMPLATE_HASH, LABEL_STAGE, plan_steps
from tests.fixtures import fuzz
from tests.test_k8s_reconcile import CANDIDATES, GPU_CANDIDATES, SPEC, T0, make_run, step_once

GPU_SPEC = {**SPEC, "profile": "d20"}
SERVING_SPEC = {**SPEC, "serving": {"enabled": True}}
TERMINAL = ("Succeeded", "Failed")


def set_condition(job: dict, type_: str, status: str, now: float, message: str = ""):
    conditions = job.setdefault("status", {}).setdefault("conditions", [])
    new = {"type": type_, "status": status, "reason": type_, "message": message, "lastTransitionTime": rfc3339(now)}
    for i, c in enumerate(conditions):
        if c["type"] == type_:
            if c["status"] != status:
                conditions[i] = new
            return
    conditions.append(new)


def key_of(job: dict) -> tuple[str, str]:
    return job["metadata"]["labels"][LABEL_STAGE], job["metadata"]["annotations"][ANN_TEMPLATE_HASH]


class Cluster:
    """The API server, the training operator and the store, as the reconcile sees them; applies actions the way
    `Operator.execute` does (deletes, then creates adopting 409s, then the status patch)."""

    def __init__(self, candidates, spec):
        self.candidates = candidates
        self.run = make_run(spec)
        self.now = T0
        self.jobs: dict[str, dict] = {}
        self.config_of: dict[str, str] = {}       # job name → config hash its stage writes into done.json
        self.markers: dict[str, dict] = {}
        self.report_digest: str | None = None
        self.deployment: dict | None = None      # the serving Deployment, once rolled
        self.created: Counter = Counter()        # (step, template hash) → jobs created
        self.names: set[str] = set()            # every job name ever created
        # (step, template hash) → its failed attempts, each [time, kind, kept]: a Failed job still listed always counts;
        # a stuck one (deleted) or a Succeeded one without its marker is forgotten once the spec changes what runs
        self.failures: dict[tuple, list] = {}
        self.replaced: Counter = Counter()       # (step, template hash) → its jobs deleted for a spec change
        self.finished: Counter = Counter()       # (step, template hash) → its jobs that wrote done.json
        self.max_limit = self.run["spec"]["retries"]["limit"]
        self.lossy = False                       # the operator crashed mid-pass or someone deleted a job: counts may restart
        self.failed_generation = None            # the generation at which the run went Failed

    # --- what the operator observes
    def steps(self):
        return plan_steps(self.run["spec"], self.candidates)

    def expected_hash(self, name: str) -> str:
        return f"{name}:{json.dumps(self.run['spec'].get('overrides') or [])}"

    def observed(self) -> rc.Observed:
        steps = self.steps()
        report = None
        if self.report_digest:
            report = {"metadata": {"annotations": {ANN_REPORT_DIGEST: self.report_digest}}}
        obs = rc.Observed(jobs=[copy.deepcopy(self.jobs[n]) for n in sorted(self.jobs)], done=dict(self.markers),
                          hashes={s.name: self.expected_hash(s.name) for s in steps}, report=report)
        if self.run["spec"].get("serving", {}).get("enabled") and all(self.done(s.name) for s in steps):
            obs.deployment, obs.checkpoint = self.deployment, self.checkpoint()
        return obs

    def checkpoint(self) -> str:
        """The final model's newest checkpoint: one per completion of the last step."""
        last = self.steps()[-1].name
        return f"{last}/{int(self.markers[last]['ended']):06d}"

    def done(self, name: str) -> bool:
        return self.markers.get(name, {}).get("config_hash") == self.expected_hash(name)

    def active(self, step_name: str) -> list[str]:
        return [n for n, j in self.jobs.items() if j["metadata"]["labels"][LABEL_STAGE] == step_name
                and rc.job_state(j) not in TERMINAL]

    # --- one operator pass
    def reconcile(self, crash: str | None = None) -> list:
        """One pass; crash: the operator dies "before_create" (after its deletes) or "before_patch" (after its creates)."""
        steps = {s.name: s for s in self.steps()}
        obs = self.observed()
        status = self.run.get("status") or {}
        actions, after = step_once(self.run, obs, self.now, self.candidates)
        for a in actions:
            if isinstance(a, rc.CreateJob):
                step = steps[a.step]
                assert not self.done(step.name), f"{a.name}: the step is already done"
                assert all(self.done(d) for d in step.depends_on), f"{a.name}: created before {step.depends_on} were done"
                assert not (status.get("phase") == "Failed" and self.failed_generation == self.run["metadata"]["generation"]), \
                    f"{a.name}: created for a Failed run whose spec did not change"
                assert after["status"]["phase"] != "Failed", f"{a.name}: created in the pass that failed the run"
        for a in actions:
            if isinstance(a, rc.DeleteJob):
                if a.name in self.jobs:
                    if "the spec changed" in a.reason:
                        self.replaced[key_of(self.jobs[a.name])] += 1
                    else:
                        self.fail(self.jobs[a.name], "stuck")
                self.jobs.pop(a.name, None)
        for a in actions if crash != "before_create" else []:
            if isinstance(a, rc.CreateJob) and a.name not in self.jobs:  # else: 409, adopted
                assert self.lossy or a.name not in self.names, f"job name {a.name} reused"
                job = copy.deepcopy(a.job)
                job["metadata"]["creationTimestamp"] = rfc3339(self.now)
                job["status"] = {}
                self.check_backoff(key_of(job))
                self.jobs[a.name], self.config_of[a.name] = job, self.expected_hash(a.step)
                self.names.add(a.name)
                self.created[key_of(job)] += 1
            if isinstance(a, rc.WriteReport):
                self.report_digest = a.digest
            if isinstance(a, rc.RollServing):
                assert after["status"]["phase"] == "Succeeded", "serving rolled before the run succeeded"
                self.deployment = a.objects[0]
        if crash:
            self.lossy = True
        else:
            self.run = after
            self.check_status()
        self.check_jobs()
        return actions

    def check_jobs(self):
        steps = self.steps()
        for s in steps:
            assert len(self.active(s.name)) <= 1, f"{s.name}: two active jobs {self.active(s.name)}"
        gpu_busy = [s.name for s in steps if s.gpu and self.active(s.name) and not self.done(s.name)]
        assert len(gpu_busy) <= 1, f"GPU steps running at once: {gpu_busy}"
        if not self.lossy:
            # each template gets limit + 1 attempts, plus one for each of its jobs replaced, forgotten failures and
            # successes undone by a spec changed and changed back
            over = {k: n for k, n in self.created.items() if n > self.max_limit + 1 + self.replaced[k] + self.finished[k]
                    + len(self.failed(k)) - len(self.failed(k, kept=True))}
            assert not over, f"more attempts than retries.limit={self.max_limit} allows: {over}"

    def check_backoff(self, key):
        """A retry waits backoffSeconds × 2^(failures-1) (at most maxBackoffSeconds) after the last failure."""
        failed = self.failed(key, kept=True)
        if failed and not self.lossy:
            r = self.run["spec"]["retries"]
            wait = min(r["backoffSeconds"] * 2 ** (len(failed) - 1), r["maxBackoffSeconds"])
            assert self.now >= failed[-1] + wait, f"{key[0]}: retried {self.now - failed[-1]:.0f}s after failure {len(failed)}"

    def fail(self, job: dict, kind: str):
        self.failures.setdefault(key_of(job), []).append([self.now, kind, True])

    def failed(self, key, kept=False) -> list[float]:
        return [t for t, _, keep in self.failures.get(key, []) if keep or not kept]

    def check_status(self):
        steps, status = self.steps(), self.run["status"]
        for row in status["stages"]:
            key, limit, counted = (row["name"], row["templateHash"]), self.run["spec"]["retries"]["limit"], row.get("failures", 0)
            if not self.lossy:
                must, may = len(self.failed(key, kept=True)), len(self.failed(key))
                assert must <= counted <= may, f"{row['name']}: status counts {counted} failures; {must} must count, {may} may"
                assert row["state"] != "Failed" or counted > limit, row
                assert must <= limit or self.active(row["name"]) or self.done(row["name"]) or row["state"] == "Failed", row
        if status.get("phase") == "Succeeded":
            assert all(self.done(s.name) for s in steps), "Succeeded with a step not done"
        if status.get("phase") == "Failed":
            assert any(r.get("failures", 0) > self.run["spec"]["retries"]["limit"] for r in status["stages"]), status
            if self.failed_generation is None:
                self.failed_generation = self.run["metadata"]["generation"]
        else:
            self.failed_generation = None

    # --- the world moves
    def transition(self, index: int, what: str):
        live = sorted(n for n, j in self.jobs.items() if what == "vanish" or rc.job_state(j) not in TERMINAL)
        if not live:
            return
        self.move(live[index % len(live)], what)

    def move(self, name: str, what: str):
        self.now += 1  # no two job events in the same second, as on a real cluster
        job, step = self.jobs[name], self.jobs[name]["metadata"]["labels"][LABEL_STAGE]
        if what == "vanish":  # someone ran kubectl delete
            del self.jobs[name]
            self.lossy = True
            return
        set_condition(job, "Created", "True", self.now)
        if what == "running":
            set_condition(job, "Restarting", "False", self.now)
            set_condition(job, "Running", "True", self.now)
        elif what == "restarting":
            set_condition(job, "Running", "False", self.now)
            set_condition(job, "Restarting", "True", self.now, "pod worker-0 exited 137")
        elif what in ("succeeded", "succeeded_without_marker", "failed"):
            set_condition(job, "Running", "False", self.now)
            set_condition(job, "Restarting", "False", self.now)
            set_condition(job, "Failed" if what == "failed" else "Succeeded", "True", self.now, f"{name} {what}")
            if what == "failed" or (what == "succeeded_without_marker" and not self.done(step)):
                self.fail(job, what)
        if what in ("succeeded", "marker_then_exit"):  # the stage writes done.json before its pod exits
            self.finished[key_of(job)] += 1
            self.markers[step] = {"name": step, "config_hash": self.config_of[name], "started": self.now - 10,
                                  "ended": self.now, "duration_s": 10.0, "metrics": {"final_loss": 0.5}}

    def edit_spec(self, what: str, value: int):
        spec = copy.deepcopy(self.run["spec"])
        if what == "override":
            spec["overrides"] = [f"value={value}"] if value else []
            if spec["overrides"] != self.run["spec"].get("overrides", []):
                for entries in self.failures.values():
                    for entry in entries:
                        entry[2] = entry[2] and entry[1] == "failed"
        else:
            spec["retries"]["limit"] = value
            self.max_limit = max(self.max_limit, value)
        if spec != self.run["spec"]:
            self.run["spec"] = spec
            self.run["metadata"]["generation"] += 1

    def all_succeed(self):
        for name, job in list(self.jobs.items()):
            if rc.job_state(job) not in TERMINAL:
                self.move(name, "succeeded")

    # --- the end: every job runs and succeeds, the clock passes every backoff
    def cooperate(self) -> str:
        for _ in range(4 * len(self.steps()) * (self.max_limit + 2)):
            self.now += self.run["spec"]["retries"]["maxBackoffSeconds"] + 1
            self.all_succeed()
            self.reconcile()
            phase = self.run["status"]["phase"]
            if phase in ("Succeeded", "Failed"):
                return phase
        raise AssertionError(f"the run never finished: {self.run['status']}")


TRANSITIONS = ["created", "running", "restarting", "succeeded", "succeeded_without_marker", "failed", "marker_then_exit",
               "vanish"]
OPS = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.sampled_from([1, 30, 61, 121, 241, 301, 901, 3000])),
    st.tuples(st.just("reconcile"), st.sampled_from([None, None, None, None, "before_create", "before_patch"])),
    st.tuples(st.just("job"), st.integers(0, 3), st.sampled_from(TRANSITIONS)),
    st.tuples(st.just("job"), st.integers(0, 3), st.sampled_from(["running", "failed"])),
    st.tuples(st.just("spec"), st.sampled_from(["override", "limit"]), st.integers(0, 3)),
    st.just(("all_succeed",)),  # reach the later steps often
    st.just(("cooperate",)),    # and the end, then go on (spec edits re-run steps, roll serving again)
), min_size=15, max_size=60)


def play(cluster: Cluster, ops):
    cluster.reconcile()
    for op in ops:
        if op[0] == "tick":
            cluster.now += op[1]
        elif op[0] == "reconcile":
            cluster.reconcile(crash=op[1])
        elif op[0] == "job":
            cluster.transition(op[1], op[2])
        elif op[0] == "all_succeed":
            cluster.all_succeed()
        elif op[0] == "cooperate":
            cluster.cooperate()
        else:
            cluster.edit_spec(op[1], op[2])
    cluster.reconcile()
    phase = cluster.cooperate()
    status = cluster.run["status"]
    if phase == "Failed":
        return
    # done: the report was written for what the store holds, and one more pass has nothing to do
    assert cluster.report_digest == status["report"]["digest"]
    if cluster.run["spec"].get("serving", {}).get("enabled"):  # and serving runs the newest final checkpoint
        rolled = cluster.deployment["metadata"]["annotations"][ANN_CHECKPOINT]
        assert rolled == cluster.checkpoint() == status["serving"]["checkpoint"]
    cluster.now += 10
    assert cluster.reconcile() == []


@fuzz(100)
@given(OPS)
# the second failure doubles the backoff
@example([("job", 0, "failed"), ("tick", 61), ("reconcile", None), ("job", 0, "failed"), ("tick", 61), ("reconcile", None)])
# a spec changed and changed back: the first attempt's success (its marker since overwritten) is no failure
@example([("job", 0, "succeeded"), ("spec", "override", 1), ("reconcile", None), ("job", 0, "succeeded"),
          ("spec", "override", 0)])
# a job that exits 0 without its done.json failed; a stuck job deleted still used up its attempt's name
@example([("job", 0, "succeeded_without_marker"), ("tick", 1), ("reconcile", None), ("tick", 901), ("reconcile", None),
          ("tick", 241), ("reconcile", None)])
def test_any_history_keeps_the_invariants_and_finishes(ops):
    play(Cluster(CANDIDATES, SERVING_SPEC), ops)


@fuzz(100)
@given(OPS)
@example([("job", 0, "succeeded"), ("reconcile", None), ("job", 0, "marker_then_exit"), ("reconcile", None)])
# eval1 fails for good: eval2, ready and next in line for the GPUs, must not start
@example([("spec", "limit", 0), ("job", 0, "succeeded"), ("reconcile", None), ("job", 0, "succeeded"), ("reconcile", None),
          ("job", 0, "failed"), ("reconcile", None)])
# changed back, train's old failure fails the run again: prep, before it and not done, must not start a job either
@example([("spec", "override", 3), ("reconcile", None), ("all_succeed",), ("reconcile", None), ("spec", "limit", 0),
          ("spec", "override", 0), ("job", 0, "failed"), ("reconcile", None), ("spec", "override", 3), ("cooperate",)])
def test_gpu_steps_under_any_history_take_turns_and_finish(ops):
    play(Cluster(GPU_CANDIDATES, GPU_SPEC), ops)
