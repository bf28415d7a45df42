"""The NanochatRun reconcile as a pure function: a table of scenarios over (run, observed jobs, store markers, time)."""
from __future__ import annotations

import copy

import pytest

from nanochat.pipeline import Step
from operators import children, crd, reconcile as rc, validate
from operators.children import rfc3339
from operators.pytorchjob import ANN_TEMPLATE_HASH, new_run, plan_steps, render_stage_job

ECHO = "tests.fake_stages.echo"
T0 = 1_800_000_000.0
CANDIDATES = [
    Step("a", ECHO, args=("--label=a",)),
    Step("b", ECHO, args=("--label=b",), depends_on=("a",)),
    Step("c", ECHO, args=("--label=c",), depends_on=("b",)),
]
GPU_CANDIDATES = [
    Step("prep", ECHO, args=("--label=prep",)),
    Step("train", ECHO, args=("--label=train",), depends_on=("prep",), gpu=True),
    Step("eval1", ECHO, args=("--label=eval1",), depends_on=("train",), gpu=True),
    Step("eval2", ECHO, args=("--label=eval2",), depends_on=("train",), gpu=True),
]
SPEC = {"profile": "tiny", "image": "img:1", "store": {"uri": "s3://bucket/run"},
        "retries": {"limit": 2, "backoffSeconds": 60, "maxBackoffSeconds": 600,
                    "restartingTimeoutSeconds": 300, "pendingTimeoutSeconds": 900}}


def make_run(spec=None, status=None, generation=1, deleting=False):
    run = new_run("r1", copy.deepcopy(spec or SPEC), namespace="ns", uid="uid-1", generation=generation)
    if status is not None:
        run["status"] = copy.deepcopy(status)
    if deleting:
        run["metadata"]["deletionTimestamp"] = rfc3339(T0)
    return run


def steps_of(run, candidates=CANDIDATES):
    return plan_steps(run["spec"], candidates)


def cond(type_, status="True", t=T0, message=""):
    return {"type": type_, "status": status, "lastTransitionTime": rfc3339(t), "reason": type_, "message": message}


def observed_job(create_action: rc.CreateJob, *conditions) -> dict:
    """The job as the API server returns it after the training operator moved it along."""
    job = copy.deepcopy(create_action.job)
    job["metadata"]["creationTimestamp"] = rfc3339(T0)
    job["status"] = {"conditions": list(conditions)}
    return job


def marker(name, chash="h", started=T0, ended=T0 + 30, **metrics):
    return {"name": name, "config_hash": chash, "started": started, "ended": ended, "duration_s": ended - started,
            "metrics": metrics or {"final_loss": 0.5}}


def kinds(actions):
    return [type(a).__name__ for a in actions]


def status_of(actions) -> dict:
    patches = [a for a in actions if isinstance(a, rc.PatchStatus)]
    assert len(patches) == 1, kinds(actions)
    return patches[0].status


def row(status, name):
    return next(r for r in status["stages"] if r["name"] == name)


def step_once(run, obs, now, candidates=CANDIDATES):
    """One reconcile pass; returns (actions, run with the patched status, as the API server merges it)."""
    actions = rc.reconcile(run, steps_of(run, candidates), obs, now)
    new = copy.deepcopy(run)
    patches = [a for a in actions if isinstance(a, rc.PatchStatus)]
    if patches:
        new["status"] = {**(run.get("status") or {}), **{k: v for k, v in patches[0].status.items() if v is not None}}
        for k, v in patches[0].status.items():
            if v is None:
                new["status"].pop(k, None)
        # what the operator writes must fit the CRD's status schema (the API server would prune the rest)
        schema = crd.status_schema()
        assert validate.schema_errors(schema, new["status"]) == [] and validate.unknown_fields(schema, new["status"]) == []
    for a in actions:
        if isinstance(a, rc.CreateJob):
            assert validate.pytorchjob_errors(a.job, strict=False) == []
    return actions, new


def first_create(actions, step=None) -> rc.CreateJob:
    return next(a for a in actions if isinstance(a, rc.CreateJob) and (step is None or a.step == step))


# ----------------------------------------------------------------------------- conditions read by type

def test_job_state_reads_conditions_by_type_not_position():
    job = {"status": {"conditions": [cond("Created"), cond("Running", "False"), cond("Succeeded")]}}
    assert rc.job_state(job) == "Succeeded"
    job = {"status": {"conditions": [cond("Failed"), cond("Created"), cond("Running", "False")]}}
    assert rc.job_state(job) == "Failed"  # terminal even though it is not the last entry
    job = {"status": {"conditions": [cond("Created"), cond("Running", "False"), cond("Restarting")]}}
    assert rc.job_state(job) == "Restarting"
    assert rc.job_state({"status": {"conditions": [cond("Created"), cond("Running")]}}) == "Running"
    assert rc.job_state({"status": {"conditions": [cond("Created"), cond("Succeeded", "False")]}}) == "Created"
    assert rc.job_state({}) == "Unknown"


# ----------------------------------------------------------------------------- scenario table

def test_fresh_run_creates_only_the_first_step_and_starts_the_report():
    run = make_run()
    actions, after = step_once(run, rc.Observed(report_header=False), T0)
    creates = [a for a in actions if isinstance(a, rc.CreateJob)]
    assert [(c.step, c.attempt, c.name) for c in creates] == [("a", 1, "r1-a-a1")]
    assert isinstance(actions[0], rc.InitReport) and actions[0].extra["profile"] == "tiny"
    st = status_of(actions)
    assert st["phase"] == "Running" and st["progress"] == "0/3" and st["currentStage"] == "a"
    assert row(st, "a")["state"] == "Pending" and row(st, "a")["jobName"] == "r1-a-a1"
    assert row(st, "b") == {**row(st, "b"), "state": "Pending", "message": "waiting for a"}
    assert "jobName" not in row(st, "b")
    assert any(isinstance(a, rc.Event) and a.reason == "JobCreated" for a in actions)
    job = creates[0].job
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["labels"]["nanochat.dev/stage"] == "a"


def test_same_observation_twice_is_a_no_op():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    job = observed_job(first_create(actions), cond("Created"), cond("Running"))
    actions, after = step_once(after, rc.Observed(jobs=[job]), T0 + 5)
    assert not any(isinstance(a, (rc.CreateJob, rc.DeleteJob)) for a in actions)
    actions, _ = step_once(after, rc.Observed(jobs=[job]), T0 + 10)
    assert actions == []  # nothing changed: no status patch, no events


def test_stage_succeeded_starts_the_next_one():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    job = observed_job(first_create(actions), cond("Created"), cond("Running", "False"), cond("Succeeded"))
    obs = rc.Observed(jobs=[job], done={"a": marker("a", chash="ha", final_loss=0.25)}, hashes={"a": "ha"})
    actions, after = step_once(after, obs, T0 + 40)
    assert [c.step for c in actions if isinstance(c, rc.CreateJob)] == ["b"]
    st = status_of(actions)
    a = row(st, "a")
    assert a["state"] == "Succeeded" and a["metrics"] == {"final_loss": 0.25} and a["durationSeconds"] == 30
    assert a["startTime"] == rfc3339(T0) and a["endTime"] == rfc3339(T0 + 30)
    assert st["progress"] == "1/3" and st["currentStage"] == "b"
    assert any(isinstance(e, rc.Event) and e.reason == "StageSucceeded" for e in actions)


def test_marker_with_another_config_hash_is_not_done():
    run = make_run()
    obs = rc.Observed(done={"a": marker("a", chash="old")}, hashes={"a": "new"})
    actions, _ = step_once(run, obs, T0)
    assert [c.step for c in actions if isinstance(c, rc.CreateJob)] == ["a"]
    obs = rc.Observed(done={"a": marker("a", chash="new")}, hashes={"a": "new"})
    actions, _ = step_once(run, obs, T0)
    assert [c.step for c in actions if isinstance(c, rc.CreateJob)] == ["b"]  # a was already done in the store


def test_failed_with_retries_left_waits_for_the_backoff_then_creates_attempt_2():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    failed = observed_job(first_create(actions), cond("Created"), cond("Running", "False"), cond("Failed", t=T0 + 100, message="exit 1"))
    actions, after = step_once(after, rc.Observed(jobs=[failed]), T0 + 110)
    st = status_of(actions)
    assert not any(isinstance(a, rc.CreateJob) for a in actions)
    assert row(st, "a")["state"] == "Retrying" and row(st, "a")["failures"] == 1
    assert row(st, "a")["nextRetryTime"] == rfc3339(T0 + 160)
    assert any(isinstance(e, rc.Event) and e.reason == "StageRetrying" and e.type == "Warning" for e in actions)
    actions, after = step_once(after, rc.Observed(jobs=[failed]), T0 + 150)
    assert not any(isinstance(a, rc.CreateJob) for a in actions)
    actions, after = step_once(after, rc.Observed(jobs=[failed]), T0 + 161)
    create = first_create(actions)
    assert (create.step, create.attempt, create.name) == ("a", 2, "r1-a-a2")
    st = status_of(actions)
    assert row(st, "a")["attempts"] == 2 and row(st, "a")["failures"] == 1 and row(st, "a")["state"] == "Pending"
    # the second failure doubles the backoff
    failed2 = observed_job(create, cond("Created"), cond("Failed", t=T0 + 200))
    actions, after = step_once(after, rc.Observed(jobs=[failed, failed2]), T0 + 201)
    assert row(status_of(actions), "a")["nextRetryTime"] == rfc3339(T0 + 320)


def test_failed_with_retries_exhausted_fails_the_run():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    jobs = []
    create = first_create(actions)
    for attempt in (1, 2, 3):
        jobs.append(observed_job(create, cond("Created"), cond("Failed", t=T0 + attempt * 1000, message=f"boom {attempt}")))
        actions, after = step_once(after, rc.Observed(jobs=list(jobs)), T0 + attempt * 1000 + 700)
        creates = [a for a in actions if isinstance(a, rc.CreateJob)]
        if attempt < 3:
            assert [c.attempt for c in creates] == [attempt + 1]
            create = creates[0]
        else:
            assert creates == []
    st = status_of(actions)
    assert st["phase"] == "Failed" and row(st, "a")["state"] == "Failed" and row(st, "a")["failures"] == 3
    assert "boom 3" in st["message"]
    assert [c for c in st["conditions"] if c["type"] == "Failed"][0]["status"] == "True"
    assert {e.reason for e in actions if isinstance(e, rc.Event)} >= {"StageFailed", "RunFailed"}
    assert row(st, "b")["state"] == "Pending"
    # raising the limit in the spec lets it continue (failures are kept, the limit is read fresh)
    bumped = copy.deepcopy(after)
    bumped["spec"]["retries"]["limit"] = 5
    bumped["metadata"]["generation"] = 2
    actions, _ = step_once(bumped, rc.Observed(jobs=jobs), T0 + 10_000)
    assert [c.attempt for c in actions if isinstance(c, rc.CreateJob)] == [4]


def test_operator_restart_mid_stage_adopts_instead_of_duplicating():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    running = observed_job(first_create(actions), cond("Created"), cond("Running", t=T0 + 5))
    # the restarted operator lost its status patch (or never wrote it): the job alone says what runs
    actions, _ = step_once(make_run(), rc.Observed(jobs=[running]), T0 + 50)
    assert not any(isinstance(a, rc.CreateJob) for a in actions)
    st = status_of(actions)
    assert row(st, "a")["state"] == "Running" and row(st, "a")["jobName"] == "r1-a-a1" and row(st, "a")["attempts"] == 1
    # with its status intact: nothing to do at all
    actions, after = step_once(after, rc.Observed(jobs=[running]), T0 + 50)
    actions, _ = step_once(after, rc.Observed(jobs=[running]), T0 + 60)
    assert actions == []


def test_a_vanished_job_gets_a_new_attempt_name():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    assert row(after["status"], "a")["jobName"] == "r1-a-a1"
    actions, _ = step_once(after, rc.Observed(jobs=[]), T0 + 30)  # someone deleted r1-a-a1
    assert [c.name for c in actions if isinstance(c, rc.CreateJob)] == ["r1-a-a2"]


@pytest.mark.parametrize("conditions, age, reason", [
    ([cond("Created", t=T0), cond("Running", "False", t=T0 + 10), cond("Restarting", t=T0 + 10)], 400, "Restarting"),
    ([cond("Created", t=T0)], 1000, "never ran"),
])
def test_stuck_job_is_deleted_and_recreated_whole(conditions, age, reason):
    spec = copy.deepcopy(SPEC)
    spec["retries"]["backoffSeconds"] = 0
    run = make_run(spec)
    actions, after = step_once(run, rc.Observed(), T0)
    stuck = observed_job(first_create(actions), *conditions)
    actions, _ = step_once(after, rc.Observed(jobs=[stuck]), T0 + age - 200)  # not yet past the timeout
    assert not any(isinstance(a, (rc.DeleteJob, rc.CreateJob)) for a in actions)
    actions, after = step_once(after, rc.Observed(jobs=[stuck]), T0 + age)
    deletes = [a for a in actions if isinstance(a, rc.DeleteJob)]
    assert [d.name for d in deletes] == ["r1-a-a1"] and reason in deletes[0].reason
    assert [c.name for c in actions if isinstance(c, rc.CreateJob)] == ["r1-a-a2"]
    assert any(isinstance(e, rc.Event) and e.reason == "StageStuck" for e in actions)
    assert row(status_of(actions), "a")["failures"] == 1 and row(status_of(actions), "a")["failedAttempts"] == [1]
    # next pass: a1 is gone, a2 was created: the deleted attempt still counts, nothing new is created
    a2 = observed_job(first_create(actions), cond("Created", t=T0 + age))
    actions, _ = step_once(after, rc.Observed(jobs=[a2]), T0 + age + 1)
    assert not any(isinstance(a, (rc.CreateJob, rc.DeleteJob)) for a in actions)


def test_spec_change_that_alters_the_job_replaces_it_and_resets_failures():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    failed = observed_job(first_create(actions), cond("Created"), cond("Failed", t=T0 + 10))
    actions, after = step_once(after, rc.Observed(jobs=[failed]), T0 + 100)
    a2 = observed_job(first_create(actions), cond("Created"), cond("Running", t=T0 + 101))
    actions, after = step_once(after, rc.Observed(jobs=[failed, a2]), T0 + 110)
    assert row(after["status"], "a")["failures"] == 1
    changed = copy.deepcopy(after)
    changed["spec"]["overrides"] = ["value=7"]
    changed["metadata"]["generation"] = 2
    actions, after = step_once(changed, rc.Observed(jobs=[failed, a2]), T0 + 120)
    assert [d.name for d in actions if isinstance(d, rc.DeleteJob)] == ["r1-a-a2"]
    create = first_create(actions)
    assert create.name == "r1-a-a3" and "--value=7" in create.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert create.job["metadata"]["labels"]["nanochat.dev/generation"] == "2"
    st = status_of(actions)
    assert st["observedGeneration"] == 2 and row(st, "a")["failures"] == 0
    assert any(isinstance(e, rc.Event) and e.reason == "SpecChanged" for e in actions)


def test_a_spec_changed_and_changed_back_reruns_the_step_without_counting_a_failure():
    spec = copy.deepcopy(SPEC)
    spec["retries"]["limit"] = 0  # one failure would fail the run
    run = make_run(spec)
    actions, after = step_once(run, rc.Observed(), T0)
    a1 = observed_job(first_create(actions), cond("Created"), cond("Succeeded", t=T0 + 30))
    actions, after = step_once(after, rc.Observed(jobs=[a1], done={"a": marker("a", chash="h0")}, hashes={"a": "h0"}), T0 + 40)
    changed = copy.deepcopy(after)
    changed["spec"]["overrides"], changed["metadata"]["generation"] = ["value=7"], 2
    actions, after = step_once(changed, rc.Observed(jobs=[a1], done={"a": marker("a", chash="h0")}, hashes={"a": "h7"}), T0 + 50)
    a2 = observed_job(first_create(actions, "a"), cond("Created"), cond("Succeeded", t=T0 + 80))
    # a2 wrote its marker over a1's; the spec goes back: a must run again, and a1's success is no failure
    back = copy.deepcopy(after)
    back["spec"]["overrides"], back["metadata"]["generation"] = [], 3
    obs = rc.Observed(jobs=[a1, a2], done={"a": marker("a", chash="h7", ended=T0 + 78)}, hashes={"a": "h0"})
    actions, _ = step_once(back, obs, T0 + 90)
    assert [c.name for c in actions if isinstance(c, rc.CreateJob)] == ["r1-a-a3"]
    st = status_of(actions)
    assert st["phase"] == "Running" and row(st, "a")["failures"] == 0


def test_spec_change_that_does_not_alter_the_job_keeps_it_running():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    running = observed_job(first_create(actions), cond("Created"), cond("Running"))
    actions, after = step_once(after, rc.Observed(jobs=[running]), T0 + 5)
    changed = copy.deepcopy(after)
    changed["spec"]["retries"]["limit"] = 7
    changed["metadata"]["generation"] = 2
    actions, _ = step_once(changed, rc.Observed(jobs=[running]), T0 + 10)
    assert not any(isinstance(a, (rc.CreateJob, rc.DeleteJob)) for a in actions)
    assert status_of(actions)["observedGeneration"] == 2


def test_operator_upgrade_that_renders_differently_does_not_kill_running_jobs():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    running = observed_job(first_create(actions), cond("Created"), cond("Running"))
    running["metadata"]["annotations"][ANN_TEMPLATE_HASH] = "rendered-by-an-older-operator"
    actions, _ = step_once(after, rc.Observed(jobs=[running]), T0 + 10)
    assert not any(isinstance(a, (rc.CreateJob, rc.DeleteJob)) for a in actions)


def test_deleted_run_deletes_every_job_and_creates_nothing():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    running = observed_job(first_create(actions), cond("Created"), cond("Running"))
    old = copy.deepcopy(running)
    old["metadata"]["name"] = "r1-a-a0"
    deleting = copy.deepcopy(after)
    deleting["metadata"]["deletionTimestamp"] = rfc3339(T0 + 20)
    actions = rc.reconcile(deleting, steps_of(deleting), rc.Observed(jobs=[running, old]), T0 + 20)
    assert sorted(a.name for a in actions if isinstance(a, rc.DeleteJob)) == ["r1-a-a0", "r1-a-a1"]
    assert not any(isinstance(a, rc.CreateJob) for a in actions)
    assert status_of(actions)["phase"] == "Deleting"


def test_invalid_spec_fails_before_any_job():
    actions, after = step_once(make_run(), rc.Observed(error="stage a: --bogus: unknown key"), T0)
    assert not any(isinstance(a, rc.CreateJob) for a in actions)
    st = status_of(actions)
    assert st["phase"] == "Failed" and "--bogus" in st["message"]
    assert any(isinstance(e, rc.Event) and e.reason == "InvalidSpec" for e in actions)
    actions, _ = step_once(after, rc.Observed(error="stage a: --bogus: unknown key"), T0 + 10)
    assert actions == []  # reported once


def test_job_succeeded_without_done_marker_counts_as_a_failure():
    run = make_run()
    actions, after = step_once(run, rc.Observed(), T0)
    job = observed_job(first_create(actions), cond("Created"), cond("Succeeded", t=T0 + 20))
    actions, _ = step_once(after, rc.Observed(jobs=[job], hashes={"a": "h"}), T0 + 30)
    st = status_of(actions)
    assert row(st, "a")["state"] == "Retrying" and row(st, "a")["failures"] == 1


def test_all_done_writes_report_and_rolls_serving_once():
    spec = copy.deepcopy(SPEC)
    spec["serving"] = {"enabled": True, "ingressHost": "chat.example.com"}
    run = make_run(spec)
    done = {n: marker(n, chash=f"h{n}") for n in "abc"}
    obs = rc.Observed(done=done, hashes={n: f"h{n}" for n in "abc"}, checkpoint="chat_sft/000700")
    actions, after = step_once(run, obs, T0)
    report = [a for a in actions if isinstance(a, rc.WriteReport)]
    roll = [a for a in actions if isinstance(a, rc.RollServing)]
    assert len(report) == 1 and report[0].stage_order == ("a", "b", "c")
    assert len(roll) == 1 and roll[0].checkpoint == "chat_sft/000700"
    assert [o["kind"] for o in roll[0].objects] == ["Deployment", "Service", "Ingress"]
    st = status_of(actions)
    assert st["phase"] == "Succeeded" and st["progress"] == "3/3" and st["report"]["uri"] == "s3://bucket/run/report/report.md"
    assert st["serving"]["checkpoint"] == "chat_sft/000700"
    assert any(isinstance(e, rc.Event) and e.reason == "RunSucceeded" for e in actions)
    # the cluster now has the ConfigMap and the Deployment at that checkpoint: nothing more to do
    cm = children.report_configmap(run, "# report", report[0].digest, "s3://bucket/run/report/report.md")
    obs.report, obs.deployment = cm, roll[0].objects[0]
    actions, after = step_once(after, obs, T0 + 10)
    assert actions == []
    # a newer checkpoint (e.g. RL re-run) rolls the Deployment again
    obs.checkpoint = "chat_rl/000100"
    actions, _ = step_once(after, obs, T0 + 20)
    assert [a.checkpoint for a in actions if isinstance(a, rc.RollServing)] == ["chat_rl/000100"]


def test_gpu_steps_take_turns_cpu_steps_do_not():
    spec = {**SPEC, "profile": "d20"}
    run = make_run(spec)
    obs = rc.Observed(done={"prep": marker("prep")})
    actions, after = step_once(run, obs, T0, GPU_CANDIDATES)
    assert [c.step for c in actions if isinstance(c, rc.CreateJob)] == ["train"]
    train = observed_job(first_create(actions), cond("Created"), cond("Succeeded"))
    obs = rc.Observed(jobs=[train], done={"prep": marker("prep"), "train": marker("train")})
    actions, after = step_once(after, obs, T0 + 10, GPU_CANDIDATES)
    creates = [c for c in actions if isinstance(c, rc.CreateJob)]
    assert [c.step for c in creates] == ["eval1"]  # eval2 is ready too, but waits for the GPUs
    assert row(status_of(actions), "eval2")["message"] == "waiting for GPU step eval1"
    job = creates[0].job
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and job["spec"]["nprocPerNode"] == "8"


def test_two_gpu_steps_waiting_to_retry_do_not_wait_for_each_other():
    spec = {**SPEC, "profile": "d20"}
    run = make_run(spec)
    done = {"prep": marker("prep"), "train": marker("train")}
    actions, after = step_once(run, rc.Observed(done=done), T0, GPU_CANDIDATES)
    eval1 = first_create(actions, "eval1")
    # both evals failed at once (their jobs overlapped: say a resources edit made them GPU steps mid-run)
    eval2 = rc.CreateJob("eval2", 1, render_stage_job(after, GPU_CANDIDATES[3], 1, {}))
    failed = [observed_job(c, cond("Created"), cond("Failed", t=T0 + 10)) for c in (eval1, eval2)]
    actions, after = step_once(after, rc.Observed(jobs=failed, done=done), T0 + 20, GPU_CANDIDATES)
    assert [row(after["status"], n)["state"] for n in ("eval1", "eval2")] == ["Retrying", "Retrying"]
    # past the backoff the first in pipeline order takes the turn; the other waits for it, not forever
    actions, after = step_once(after, rc.Observed(jobs=failed, done=done), T0 + 100, GPU_CANDIDATES)
    assert [c.name for c in actions if isinstance(c, rc.CreateJob)] == ["r1-eval1-a2"]
    retry = observed_job(first_create(actions), cond("Created"), cond("Succeeded", t=T0 + 200))
    done = {**done, "eval1": marker("eval1")}
    actions, _ = step_once(after, rc.Observed(jobs=[*failed, retry], done=done), T0 + 210, GPU_CANDIDATES)
    assert [c.name for c in actions if isinstance(c, rc.CreateJob)] == ["r1-eval2-a2"]


def test_template_hash_annotation_is_what_reconcile_compares():
    run = make_run()
    actions, _ = step_once(run, rc.Observed(), T0)
    job = first_create(actions).job
    assert job["metadata"]["annotations"][ANN_TEMPLATE_HASH] == row(status_of(actions), "a")["templateHash"]


def test_created_jobs_and_serving_carry_pull_secrets_and_the_security_context():
    spec = copy.deepcopy(SPEC)
    spec["serving"] = {"enabled": True}
    run = make_run(spec)
    actions, after = step_once(run, rc.Observed(), T0)
    pod = first_create(actions).job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "imagePullSecrets" not in pod and pod["securityContext"]["runAsUser"] == 10001
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # the registry turns private mid-run: adding a pull secret changes what the job runs, so the
    # ImagePullBackOff job is replaced by one that can pull
    pulling = observed_job(first_create(actions), cond("Created"))
    changed = copy.deepcopy(after)
    changed["spec"]["imagePullSecrets"] = [{"name": "regcred"}]
    changed["metadata"]["generation"] = 2
    assert validate.nanochatrun_errors(changed) == []
    actions, after = step_once(changed, rc.Observed(jobs=[pulling]), T0 + 30)
    assert [d.name for d in actions if isinstance(d, rc.DeleteJob)] == ["r1-a-a1"]
    new_pod = first_create(actions).job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert new_pod["imagePullSecrets"] == [{"name": "regcred"}]
    # serving, once everything is done, uses the same secrets and security settings
    done = {n: marker(n, chash=f"h{n}") for n in "abc"}
    obs = rc.Observed(done=done, hashes={n: f"h{n}" for n in "abc"}, checkpoint="chat_sft/000700")
    actions, _ = step_once(after, obs, T0 + 60)
    (roll,) = [a for a in actions if isinstance(a, rc.RollServing)]
    serving_pod = roll.objects[0]["spec"]["template"]["spec"]
    assert serving_pod["imagePullSecrets"] == [{"name": "regcred"}] and serving_pod["securityContext"] == pod["securityContext"]
    assert validate.builtin_errors(roll.objects[0]) == []
