"""The NanochatRun state machine as a pure function: observed state in, actions out.

`reconcile(run, steps, observed, now)` looks only at what the cluster and the store say right now:
the run object (spec, status, generation, deletion), the PyTorchJobs it owns, the stages' done.json
markers, the report ConfigMap and the serving Deployment. It never relies on operator memory, so a
restarted operator picks up exactly where the last one stopped:

- job names are deterministic (`<run>-<step>-a<attempt>`); a create answered 409 is adopted;
- a step is done when its done.json exists with the config hash this spec implies;
- job conditions are read by type (Created/Running/Restarting/Succeeded/Failed); a job is
  terminal when Succeeded or Failed is "True";
- a failed attempt is retried (a new job, which resumes from the store's checkpoint) after an
  exponential backoff, up to `retries.limit`; a job stuck Restarting, or Created but never Running,
  past its timeout is deleted and counted as failed (the training operator restarts only the dead
  pod, which leaves the NCCL peers hanging, so the whole job is recreated);
- failures are counted per job template: a spec change that alters what a step runs replaces its
  running job and resets its failure count (changed back, the Failed jobs of the old template still
  listed count again, and their backoff holds); a Succeeded job without its done.json is a failure,
  unless the store's done.json was written after it ended (a later run's, over the job's own);
- GPU steps run one at a time, in pipeline order (one node pool; no job waits Pending for GPUs
  another stage holds; of the steps waiting out a backoff, the first holds the turn); CPU steps
  run as soon as their dependencies are done.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from nanochat.pipeline import Step

from operators import children, crd
from operators.children import parse_time, rfc3339
from operators.pytorchjob import (ANN_TEMPLATE_HASH, LABEL_ATTEMPT, LABEL_GENERATION, LABEL_STAGE, SpecError, parse_overrides,
                                  render_stage_job, stage_resources)

FINAL_MODEL_STAGES = ("chat_rl", "chat_sft", "mid_train", "base_train")  # serve the first one that ran
ACTIVE = ("Created", "Running", "Restarting", "Unknown")


# ----------------------------------------------------------------------------- actions

@dataclass(frozen=True)
class CreateJob:
    step: str
    attempt: int
    job: dict = field(hash=False, compare=False)

    @property
    def name(self) -> str:
        return self.job["metadata"]["name"]


@dataclass(frozen=True)
class DeleteJob:
    name: str
    step: str
    reason: str


@dataclass(frozen=True)
class PatchStatus:
    status: dict = field(hash=False)


@dataclass(frozen=True)
class Event:
    type: str        # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class WriteReport:
    """Generate report/report.md in the store and put it in the report ConfigMap."""
    digest: str
    stage_order: tuple[str, ...]


@dataclass(frozen=True)
class InitReport:
    """A fresh store: start the report (header with the run's settings) before the first job."""
    extra: dict = field(hash=False)


@dataclass(frozen=True)
class RollServing:
    """Create the serving Deployment/Service/Ingress, or roll the Deployment to a new checkpoint."""
    checkpoint: str
    objects: tuple = field(hash=False, compare=False)


@dataclass
class Observed:
    jobs: list[dict] = field(default_factory=list)         # PyTorchJobs owned by the run
    done: dict[str, dict] = field(default_factory=dict)    # step name → stages/<name>/done.json
    hashes: dict[str, str] = field(default_factory=dict)   # step name → expected config hash (absent: any marker)
    report: dict | None = None                             # the report ConfigMap
    deployment: dict | None = None                         # the serving Deployment
    checkpoint: str | None = None                          # newest final-model checkpoint in the store, "<stage>/<step>"
    report_header: bool = True                             # the store has report/header.json
    error: str | None = None                               # the spec cannot run (bad override, unknown step)


# ----------------------------------------------------------------------------- job conditions

def condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def is_true(obj: dict, type_: str) -> bool:
    c = condition(obj, type_)
    return bool(c) and c.get("status") == "True"


def job_state(job: dict) -> str:
    """Succeeded | Failed (terminal), Restarting | Running | Created | Unknown (active)."""
    for t in ("Succeeded", "Failed", "Restarting", "Running", "Created"):
        if is_true(job, t):
            return t
    return "Unknown"


def job_attempt(job: dict) -> int:
    meta = job.get("metadata") or {}
    value = (meta.get("labels") or {}).get(LABEL_ATTEMPT)
    if value is None:
        value = meta.get("name", "").rsplit("-a", 1)[-1]
    try:
        return int(value)
    except ValueError:
        return 0


def since(job: dict, type_: str) -> float | None:
    c = condition(job, type_)
    return parse_time(c.get("lastTransitionTime")) if c else None


def condition_message(job: dict, type_: str) -> str:
    c = condition(job, type_) or {}
    return (c.get("message") or c.get("reason") or "").strip()


# ----------------------------------------------------------------------------- the reconcile

def backoff(spec: dict, failures: int) -> float:
    r = spec["retries"]
    return min(r["backoffSeconds"] * 2 ** max(failures - 1, 0), r["maxBackoffSeconds"])


def done_ok(step: Step, obs: Observed) -> bool:
    marker = obs.done.get(step.name)
    expected = obs.hashes.get(step.name)
    return bool(marker) and (expected is None or marker.get("config_hash") == expected)


def report_digest(steps: list[Step], obs: Observed) -> str:
    keys = [(s.name, (obs.done.get(s.name) or {}).get("config_hash"), (obs.done.get(s.name) or {}).get("ended")) for s in steps]
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reconcile(run: dict, steps: list[Step], obs: Observed, now: float) -> list:
    """Actions that move the cluster toward the run's spec, computed from observed state only."""
    meta = run["metadata"]
    if meta.get("deletionTimestamp"):
        return finalize(run, obs)
    spec = crd.apply_defaults(run.get("spec"))
    status = run.get("status") or {}
    gen = meta.get("generation", 1)
    try:
        overrides = parse_overrides(spec, steps)
    except SpecError as e:
        obs = dataclasses.replace(obs, error=obs.error or str(e))
    if obs.error:
        new = {**_base_status(status, gen, now), "phase": "Failed", "message": obs.error}
        new["conditions"] = _conditions(status, "Failed", obs.error, gen, now)
        acts = [] if status.get("message") == obs.error else [Event("Warning", "InvalidSpec", obs.error)]
        return acts + ([PatchStatus(new)] if _changed(status, new) else [])

    actions: list = []
    if status.get("observedGeneration") not in (None, gen):
        actions.append(Event("Normal", "SpecChanged", f"spec generation {status['observedGeneration']} → {gen}: re-planning"))
    prev_rows = {r["name"]: r for r in status.get("stages") or []}
    jobs_by_step = _jobs_by_step(obs.jobs)

    # GPU steps take turns: a step with an active job holds the turn, and so does the first (in pipeline order) that
    # waits to retry; one only (two steps that failed together would otherwise wait for each other forever)
    gpu_steps = [s for s in steps if _uses_gpu(spec, s) and not done_ok(s, obs)]
    gpu_holders = {s.name for s in gpu_steps if any(job_state(j) in ACTIVE for j in jobs_by_step.get(s.name, []))}
    gpu_holders |= set([s.name for s in gpu_steps if prev_rows.get(s.name, {}).get("state") == "Retrying"][:1])

    def plan_steps_once(halted: bool) -> tuple[list[dict], list]:
        states, holders, rows, acts = {}, set(gpu_holders), [], []
        for step in steps:
            row, step_acts = _reconcile_step(run, spec, step, jobs_by_step.get(step.name, []), prev_rows.get(step.name, {}),
                                             obs, now, overrides, states, holders, halted)
            states[step.name] = row["state"]
            halted = halted or row["state"] == "Failed"
            rows.append(row)
            acts += step_acts
        return rows, acts
    rows, step_actions = plan_steps_once(halted=False)
    if any(r["state"] == "Failed" for r in rows):  # a step out of retries halts the run: no new job anywhere
        rows, step_actions = plan_steps_once(halted=True)
    actions += step_actions

    if not obs.report_header and not obs.done and any(isinstance(a, CreateJob) for a in actions):
        gpus = max((stage_resources(spec, s)["nodes"] * stage_resources(spec, s)["gpusPerNode"] for s in steps), default=0)
        actions.insert(0, InitReport({"profile": spec["profile"], "store": spec["store"]["uri"], "image": spec["image"],
                                      "run": meta["name"], "executor": "kubernetes (nanochat-operator)", "gpus_for_cost": gpus}))
    new = {**_base_status(status, gen, now), "stages": rows, "progress": f"{sum(r['state'] == 'Succeeded' for r in rows)}/{len(rows)}"}
    active = [r["name"] for r in rows if r["state"] in ("Running", "Retrying") or (r["state"] == "Pending" and r.get("jobName"))]
    phase, message = _phase(rows, active)
    if phase == "Succeeded":
        actions += _finish(run, spec, steps, obs)
        new["report"] = {"uri": spec["store"]["uri"].rstrip("/") + "/report/report.md", "digest": report_digest(steps, obs),
                         "configMap": children.report_configmap_name(meta["name"])}
        if spec["serving"]["enabled"] and obs.checkpoint:
            new["serving"] = {"deployment": children.serving_name(meta["name"]), "checkpoint": obs.checkpoint}
    new.update(phase=phase, message=message or None, currentStage=",".join(active) or None)
    if phase in ("Succeeded", "Failed"):
        new["completionTime"] = status.get("completionTime") if status.get("phase") == phase else rfc3339(now)
    else:
        new["completionTime"] = None
    new["conditions"] = _conditions(status, phase, message, gen, now)
    if phase != status.get("phase") and phase in ("Succeeded", "Failed"):
        actions.append(Event("Normal" if phase == "Succeeded" else "Warning", f"Run{phase}", message))
    if _changed(status, new):
        actions.append(PatchStatus(new))
    return actions


def _jobs_by_step(jobs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for j in jobs:
        out.setdefault((j["metadata"].get("labels") or {}).get(LABEL_STAGE, ""), []).append(j)
    for js in out.values():
        js.sort(key=job_attempt)
    return out


def _phase(rows: list[dict], active: list[str]) -> tuple[str, str]:
    failed = [r for r in rows if r["state"] == "Failed"]
    if failed:
        r = failed[0]
        return "Failed", f"step {r['name']} failed after {r['failures']} attempt(s)" + (f": {r['message']}" if r.get("message") else "")
    if all(r["state"] == "Succeeded" for r in rows):
        return "Succeeded", f"all {len(rows)} steps succeeded"
    if active or any(r.get("jobName") for r in rows):
        return "Running", ""
    return "Pending", "waiting for the first job"


def _uses_gpu(spec: dict, step: Step) -> bool:
    return step.gpu and stage_resources(spec, step)["gpusPerNode"] > 0


def _reconcile_step(run, spec, step, jobs, prev, obs, now, overrides, states, gpu_holders, halted):
    limit = spec["retries"]["limit"]
    desired = render_stage_job(run, step, 1, overrides)
    template = desired["metadata"]["annotations"][ANN_TEMPLATE_HASH]
    same_template = prev.get("templateHash") == template
    failed_attempts = set(prev.get("failedAttempts") or []) if same_template else set()
    attempts = max([job_attempt(j) for j in jobs] + [prev.get("attempts", 0)])
    last_failure = parse_time(prev.get("lastFailureTime")) if same_template else None
    for j in jobs:  # failed jobs of this template count, even if the status never recorded them
        if _template(j) == template and (job_state(j) == "Failed" or _succeeded_without_marker(j, step, obs)):
            if job_attempt(j) not in failed_attempts:
                failed_attempts.add(job_attempt(j))
                last_failure = max(last_failure or 0, since(j, job_state(j)) or now)
    latest = jobs[-1] if jobs else None
    row = {"name": step.name, "attempts": attempts, "templateHash": template}
    if latest is not None:
        row["jobName"] = latest["metadata"]["name"]
    acts = []
    prev_state = prev.get("state")

    # 1. an active job: keep it, replace it (spec changed), or give up on it (stuck)
    if latest is not None and job_state(latest) in ACTIVE:
        state = job_state(latest)
        stuck = _stuck(spec, latest, now)
        # replace only for a spec change (a new generation), not because a newer operator renders differently
        if _template(latest) != template and _job_generation(latest) != run["metadata"].get("generation", 1):
            acts.append(DeleteJob(latest["metadata"]["name"], step.name, "the spec changed what this step runs"))
            acts.append(Event("Normal", "JobReplaced", f"{step.name}: spec changed; replacing {latest['metadata']['name']}"))
        elif stuck:
            failed_attempts.add(job_attempt(latest))
            last_failure = now
            acts.append(DeleteJob(latest["metadata"]["name"], step.name, stuck))
            acts.append(Event("Warning", "StageStuck", f"{step.name}: {latest['metadata']['name']} {stuck}; deleting it to recreate the whole job"))
        else:
            started = since(latest, "Running") if state in ("Running", "Restarting") else None
            row.update(state="Running" if state in ("Running", "Restarting") else "Pending",
                       startTime=prev.get("startTime") or (rfc3339(started) if started else None),
                       message=("restarting: " + condition_message(latest, "Restarting")) if state == "Restarting" else None)
            if row["state"] == "Running" and prev_state != "Running":
                acts.append(Event("Normal", "StageRunning", f"{step.name}: {latest['metadata']['name']} is running"))
            return _finish_row(row, failed_attempts, last_failure), acts

    # 2. done: the stage wrote its marker with the config this spec implies
    if done_ok(step, obs):
        marker = obs.done[step.name]
        row.update(state="Succeeded", metrics=_scalar_metrics(marker.get("metrics") or {}),
                   startTime=rfc3339(marker["started"]) if marker.get("started") else prev.get("startTime"),
                   endTime=rfc3339(marker["ended"]) if marker.get("ended") else None,
                   durationSeconds=marker.get("duration_s"))
        if prev_state != "Succeeded":
            took = f" in {marker['duration_s']:.0f}s" if isinstance(marker.get("duration_s"), (int, float)) else ""
            acts.append(Event("Normal", "StageSucceeded", f"{step.name}: succeeded{took}"))
        return _finish_row(row, failed_attempts, last_failure), acts

    # 3. out of retries
    if len(failed_attempts) > limit:
        why = condition_message(latest, "Failed") if latest is not None and job_state(latest) == "Failed" else prev.get("message")
        row.update(state="Failed", message=why or None, startTime=prev.get("startTime"),
                   endTime=prev.get("endTime") or rfc3339(last_failure or now))
        if prev_state != "Failed":
            acts.append(Event("Warning", "StageFailed", f"{step.name}: gave up after {len(failed_attempts)} failed attempt(s)"
                              + (f": {why}" if why else "")))
        return _finish_row(row, failed_attempts, last_failure), acts

    # 4. waiting out the backoff after the last failure of this template (also when a job of another template
    # came in between: a spec changed and changed back)
    latest_failed = attempts in failed_attempts
    retry_at = (last_failure or now) + backoff(spec, len(failed_attempts)) if failed_attempts else now
    if latest_failed and prev_state != "Retrying":
        why = condition_message(latest, "Failed") if latest is not None else ""
        acts.append(Event("Warning", "StageRetrying", f"{step.name}: attempt {attempts} failed{': ' + why if why else ''}; "
                          f"retry {len(failed_attempts)}/{limit} at {rfc3339(retry_at)}"))
    if now < retry_at:
        row.update(state="Retrying", nextRetryTime=rfc3339(retry_at), startTime=prev.get("startTime"))
        return _finish_row(row, failed_attempts, last_failure), acts

    # 5. start the next attempt when the dependencies are done and it is this step's turn
    blocked = [d for d in step.depends_on if states.get(d) != "Succeeded"]
    gpu_busy = _uses_gpu(spec, step) and bool(gpu_holders - {step.name})
    if halted or blocked or gpu_busy:
        why = ("another step failed" if halted else f"waiting for {', '.join(blocked)}" if blocked
               else f"waiting for GPU step {', '.join(sorted(gpu_holders - {step.name}))}")
        row.update(state="Retrying" if latest_failed else "Pending", message=why)
        if not latest_failed:
            row.pop("jobName", None)  # an old job (other template) is not this step's job
        return _finish_row(row, failed_attempts, last_failure), acts
    attempt = attempts + 1
    job = render_stage_job(run, step, attempt, overrides)
    acts.append(CreateJob(step.name, attempt, job))
    acts.append(Event("Normal", "JobCreated", f"{step.name}: created PyTorchJob {job['metadata']['name']} (attempt {attempt})"))
    if _uses_gpu(spec, step):
        gpu_holders.add(step.name)
    row.update(state="Pending", attempts=attempt, jobName=job["metadata"]["name"], startTime=None)
    return _finish_row(row, failed_attempts, last_failure), acts


def _succeeded_without_marker(job: dict, step: Step, obs: Observed) -> bool:
    """A Succeeded job whose step has no done.json for this config exited 0 without finishing: a failure. Unless the
    store's marker was written when or after the job ended: a later run (a spec changed and changed back) replaced
    the job's own marker."""
    if job_state(job) != "Succeeded" or done_ok(step, obs):
        return False
    ended, marker = since(job, "Succeeded"), obs.done.get(step.name) or {}
    return not (ended is not None and isinstance(marker.get("ended"), (int, float)) and marker["ended"] >= ended)


def _finish_row(row: dict, failed_attempts: set, last_failure: float | None) -> dict:
    row["failures"] = len(failed_attempts)
    row["failedAttempts"] = sorted(failed_attempts)
    row["lastFailureTime"] = rfc3339(last_failure) if last_failure else None
    return {k: v for k, v in row.items() if v is not None and v != []}


def _template(job: dict) -> str | None:
    return ((job.get("metadata") or {}).get("annotations") or {}).get(ANN_TEMPLATE_HASH)


def _job_generation(job: dict) -> int | None:
    value = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_GENERATION)
    return int(value) if value and value.isdigit() else None


def _stuck(spec: dict, job: dict, now: float) -> str | None:
    r = spec["retries"]
    if is_true(job, "Restarting") and r["restartingTimeoutSeconds"]:
        t = since(job, "Restarting")
        if t is not None and now - t > r["restartingTimeoutSeconds"]:
            return f"has been Restarting for {now - t:.0f}s (> {r['restartingTimeoutSeconds']}s)"
    if not is_true(job, "Running") and not is_true(job, "Restarting") and r["pendingTimeoutSeconds"]:
        t = since(job, "Created") or parse_time((job.get("metadata") or {}).get("creationTimestamp"))
        if t is not None and now - t > r["pendingTimeoutSeconds"]:
            return f"was created {now - t:.0f}s ago and never ran (> {r['pendingTimeoutSeconds']}s)"
    return None


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _finish(run: dict, spec: dict, steps: list[Step], obs: Observed) -> list:
    """After the last step: the report (store + ConfigMap) and the serving rollout, each once."""
    acts = []
    digest = report_digest(steps, obs)
    cm_digest = (((obs.report or {}).get("metadata") or {}).get("annotations") or {}).get(children.ANN_REPORT_DIGEST)
    if cm_digest != digest:
        acts.append(WriteReport(digest, tuple(s.name for s in steps)))
        acts.append(Event("Normal", "ReportWritten", f"report.md written to the store and ConfigMap "
                                                     f"{children.report_configmap_name(run['metadata']['name'])}"))
    if spec["serving"]["enabled"] and obs.checkpoint:
        current = ((obs.deployment or {}).get("metadata") or {}).get("annotations", {}).get(children.ANN_CHECKPOINT)
        if current != obs.checkpoint:
            acts.append(RollServing(obs.checkpoint, tuple(children.serving_objects(run, obs.checkpoint))))
            acts.append(Event("Normal", "ServingRolled", f"serving Deployment {children.serving_name(run['metadata']['name'])} "
                                                         f"→ checkpoint {obs.checkpoint}"))
    return acts


def _base_status(status: dict, gen: int, now: float) -> dict:
    return {"observedGeneration": gen, "startTime": status.get("startTime") or rfc3339(now),
            "stages": status.get("stages") or [], "report": status.get("report"), "serving": status.get("serving")}


def _conditions(status: dict, phase: str, message: str, gen: int, now: float) -> list[dict]:
    old = {c["type"]: c for c in status.get("conditions") or []}
    out = []
    for type_ in ("Running", "Succeeded", "Failed"):
        value = "True" if phase == type_ else "False"
        prev = old.get(type_)
        out.append({"type": type_, "status": value, "reason": phase, "message": message or phase,
                    "observedGeneration": gen,
                    "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == value else rfc3339(now)})
    return out


def _changed(old: dict, new: dict) -> bool:
    return any(old.get(k) != v for k, v in new.items() if v is not None) or any(k in old for k, v in new.items() if v is None)


def finalize(run: dict, obs: Observed) -> list:
    """The run is being deleted: delete every job it owns (the finalizer waits for them to go)."""
    acts: list = [DeleteJob(j["metadata"]["name"], (j["metadata"].get("labels") or {}).get(LABEL_STAGE, ""), "the run is being deleted")
                  for j in obs.jobs]
    status = run.get("status") or {}
    if status.get("phase") != "Deleting":
        acts.append(PatchStatus({"phase": "Deleting", "message": f"deleting {len(obs.jobs)} job(s)"}))
    return acts


def final_model_stage(steps: list[Step]) -> list[str]:
    """Checkpoint folders (checkpoints/<stage>/) to serve from, best first: RL if it ran, else SFT, ..."""
    names = {s.module for s in steps} | {s.name for s in steps}
    return [m for m in FINAL_MODEL_STAGES if m in names]
