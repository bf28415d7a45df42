"""Render one Kubeflow PyTorchJob per pipeline step of a NanochatRun (pure functions, no cluster access).

Every step, CPU-only ones included, becomes a PyTorchJob: one executor path in the operator (one
condition reader, one validator, one set of labels/owner references), the same `torchrun` launch
everywhere, and multi-node is a field change. The cost, a dependency on the Kubeflow training
operator for CPU stages too, is paid anyway by the GPU stages. A CPU stage is a 1-replica job
(Master only, nprocPerNode 1, no GPU).

The container runs `torchrun --nproc-per-node=N -m nanochat.stages.<module> <args>` with no
rendezvous flags: the training operator injects PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR /
PET_MASTER_PORT, which torchrun reads. Plain `python` would be wrong for N > 1 because the training
operator's WORLD_SIZE/RANK count pods, not processes.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re

from nanochat import pipeline, profiles
from nanochat.config import ConfigError
from nanochat.pipeline import Step

from operators import crd

LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_RUN = "nanochat.dev/run"
LABEL_STAGE = "nanochat.dev/stage"
LABEL_ATTEMPT = "nanochat.dev/attempt"
LABEL_GENERATION = "nanochat.dev/generation"
ANN_TEMPLATE_HASH = "nanochat.dev/template-hash"
ANN_COMMAND = "nanochat.dev/command"
MANAGER = "nanochat-operator"
MASTER_PORT = 23456               # the training operator's default `pytorchjob-port`
JOB_NAME_MAX = 52                 # pods/services are <job>-worker-<i>: keep them within 63 characters
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_SHM = {True: "16Gi", False: "1Gi"}
UID = 10001                       # the images' user (docker/Dockerfile.*)
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
# the root filesystem is read-only: home, caches and compile caches (inductor, triton, CUDA) live in the /tmp emptyDir
SCRATCH_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/tmp/torchinductor"},
    {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
    {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
    {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
]


class SpecError(ValueError):
    """A NanochatRun spec that cannot be rendered (unknown step, bad override...)."""


class OverrideError(SpecError):
    """spec.overrides[index] (`item`, as written) is rejected by a stage's config parser; `detail` is the stage's error."""

    def __init__(self, index: int, item: str, detail: str):
        self.index, self.item, self.detail = index, item, detail
        super().__init__(f"spec.overrides[{index}] {item!r}: {detail}")


# ----------------------------------------------------------------------------- steps and flags

def plan_steps(spec: dict, steps: list[Step] | None = None) -> list[Step]:
    """The steps a run executes, in order: the profile's steps, RL switch, then only/skip."""
    spec = crd.apply_defaults(spec)
    sel = spec.get("stages") or {}
    out = pipeline.steps_for(spec["profile"], rl=sel.get("rl"), steps=steps)
    names = [s.name for s in out]
    for key in ("only", "skip"):
        unknown = [n for n in sel.get(key) or [] if n not in names]
        if unknown:
            raise SpecError(f"spec.stages.{key}: unknown step(s) {', '.join(unknown)}; steps of profile {spec['profile']}: {', '.join(names)}")
    if sel.get("only"):
        out = [s for s in out if s.name in sel["only"]]
    out = [s for s in out if s.name not in (sel.get("skip") or [])]
    kept = {s.name for s in out}
    return [_replace_deps(s, tuple(d for d in s.depends_on if d in kept)) for s in out]


def _replace_deps(step: Step, deps: tuple[str, ...]) -> Step:
    import dataclasses
    return dataclasses.replace(step, depends_on=deps)


def parse_overrides(spec: dict, steps: list[Step]) -> dict[str, list[str]]:
    """spec.overrides (STAGE.KEY=VALUE, as `nanochat speedrun --set`) → flags per stage module."""
    from nanochat.runner import parse_overrides as runner_parse
    try:
        return runner_parse(list(spec.get("overrides") or []), steps)
    except ConfigError as e:
        raise SpecError(f"spec.overrides: {e}") from None


# spec.env names the operator sets from a spec field: setting them in spec.env would split the two apart
ENV_FROM_SPEC = {
    "NANOCHAT_METRICS_PORT": "spec.metricsPort", "NANOCHAT_PG_TIMEOUT_S": "spec.distributed.timeoutSeconds",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "spec.distributed.timeoutSeconds", "NANOCHAT_STORE": "spec.store.uri",
    "NANOCHAT_PROFILE": "spec.profile",
    "AWS_ENDPOINT_URL": "spec.store.endpoint", "AWS_REGION": "spec.store.region",
    "AWS_ACCESS_KEY_ID": "spec.store.secretName", "AWS_SECRET_ACCESS_KEY": "spec.store.secretName",
}


def check_env(spec: dict):
    """spec.env may not shadow what the operator derives from other fields (SpecError names the field to set)."""
    for i, e in enumerate(spec.get("env") or []):
        if e["name"] in ENV_FROM_SPEC:
            raise SpecError(f"spec.env[{i}] {e['name']}: set by the operator from {ENV_FROM_SPEC[e['name']]}; set that instead")
        if e["name"] == "NANOCHAT_CONFIG":
            raise SpecError(f"spec.env[{i}] NANOCHAT_CONFIG: config files do not reach the pods; use spec.overrides")


def config_env(spec: dict) -> dict[str, str]:
    """The NANOCHAT_* variables a stage pod sees: the config layer below its flags (nanochat.config.parse_config),
    so NANOCHAT_DEPTH=12 in spec.env changes the config hash here exactly as it does in the pod."""
    return {e["name"]: e["value"] for e in container_env(spec) if e["name"].startswith("NANOCHAT_") and "value" in e}


def stage_configs(spec: dict, steps: list[Step], overrides: dict[str, list[str]] | None = None) -> list[tuple[Step, str, str]]:
    """(step, instance name, config hash) of each step, from the stage's own config parser, exactly as
    `nanochat speedrun` checks every stage before any work (nanochat.runner.plan_step), with the NANOCHAT_*
    variables of spec.env as the pods see them: an unknown key (with "did you mean"), a bad value or a failed
    cross-check raises SpecError (OverrideError when an override causes it). Imports the stage modules: torch
    and nanochat's core dependencies, none of a stage's own."""
    from nanochat.runner import plan_step
    spec = crd.apply_defaults(spec)
    check_env(spec)
    if overrides is None:
        overrides = parse_overrides(spec, steps)
    env = config_env(spec)
    out = []
    for step in steps:
        try:
            name, h = plan_step(step, stage_args(step, spec, overrides), env=env, world_size=world_size(spec, step))
        except ConfigError as e:
            raise _blame(spec, steps, step, e) from None
        out.append((step, name, h))
    return out


def _blame(spec: dict, steps: list[Step], step: Step, error: ConfigError) -> SpecError:
    """The spec.env variable or override that breaks `step`'s config: add them one at a time until the parser fails."""
    from nanochat.runner import parse_overrides as runner_parse
    from nanochat.runner import plan_step
    base = stage_args(step, spec, {})
    world = world_size(spec, step)
    user_env = spec.get("env") or []
    for i, e in enumerate(user_env):
        if e["name"].startswith("NANOCHAT_"):
            try:
                plan_step(step, base, env=config_env({**spec, "env": user_env[:i + 1]}), world_size=world)
            except ConfigError as err:
                return SpecError(f"spec.env[{i}] {e['name']}={e.get('value', '')!r}: stage {step.name}: {err}")
    env = config_env(spec)
    flags: list[str] = []
    for i, item in enumerate(spec.get("overrides") or []):
        mine = runner_parse([item], steps).get(step.module, [])  # a bare KEY lands on each stage that has it
        if not mine:
            continue
        flags += mine
        try:
            plan_step(step, base + flags, env=env, world_size=world)
        except ConfigError as e:
            return OverrideError(i, item, f"stage {step.name}: {e}")
    where = f" (spec.resources: {world} processes)" if world > 1 else ""
    return SpecError(f"stage {step.name}{where}: {error}")


def stage_args(step: Step, spec: dict, overrides: dict[str, list[str]]) -> list[str]:
    """Same flags as the local runner (nanochat.runner.step_args): store, profile, step args, overrides."""
    return [f"--store={spec['store']['uri']}", f"--profile={spec['profile']}", *step.args,
            *overrides.get(step.module, []), *overrides.get("*", [])]


def stage_resources(spec: dict, step: Step) -> dict:
    """Per-pod resources: profile defaults < spec.resources.gpu|cpu < resources.stages[module] < [step name]."""
    profile = profiles.get(spec["profile"])
    gpu_step = step.gpu and profile.get("gpus_per_node", 0) > 0
    res = {"nodes": profile.get("nodes", 1) if gpu_step else 1,
           "gpusPerNode": profile.get("gpus_per_node", 0) if gpu_step else 0,
           "gpuResource": GPU_RESOURCE, "shmSize": DEFAULT_SHM[gpu_step]}
    r = spec.get("resources") or {}
    for layer in (r.get("gpu" if step.gpu else "cpu"), (r.get("stages") or {}).get(step.module),
                  (r.get("stages") or {}).get(step.name)):
        res.update({k: v for k, v in (layer or {}).items() if v is not None})
    return res


def nproc_per_node(spec: dict, step: Step, res: dict) -> int:
    return res["gpusPerNode"] if res["gpusPerNode"] > 0 else step.nproc(spec["profile"])


def world_size(spec: dict, step: Step) -> int:
    """Processes of the step's PyTorchJob (spec with defaults applied): nodes × processes per node."""
    res = stage_resources(spec, step)
    return res["nodes"] * nproc_per_node(spec, step, res)


def needs_stage_check(spec: dict, steps: list[Step]) -> bool:
    """Whether the stages' own config checks could refuse this spec: it has overrides or env, or spec.resources gives a
    stage another number of processes than its profile does (a batch may not split). Otherwise no stage module is imported."""
    resized = any(world_size(spec, s) != world_size({**spec, "resources": {}}, s) for s in steps)
    return bool(spec.get("overrides") or spec.get("env") or resized)


# ----------------------------------------------------------------------------- names

def dns_label(text: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s if s and s[0].isalpha() else f"r-{s}".rstrip("-")


def job_name(run: str, step: str, attempt: int) -> str:
    """Deterministic `<run>-<step>-a<attempt>`: a restarted operator finds (or 409-adopts) its jobs."""
    suffix = f"-{dns_label(step).removeprefix('r-')}-a{attempt}"
    base = dns_label(run)
    if len(base) + len(suffix) > JOB_NAME_MAX:  # keep it unique when truncating
        digest = hashlib.sha1(run.encode()).hexdigest()[:6]
        base = base[:JOB_NAME_MAX - len(suffix) - 7].rstrip("-") + "-" + digest
    return base + suffix


def labels(run_name: str, step: str | None = None, component: str = "stage") -> dict:
    out = {LABEL_APP: "nanochat", LABEL_MANAGED_BY: MANAGER, LABEL_COMPONENT: component, LABEL_RUN: run_name}
    if step:
        out[LABEL_STAGE] = step
    return out


def owner_reference(run: dict) -> list[dict]:
    meta = run.get("metadata") or {}
    if not meta.get("uid"):
        return []  # rendered for kubectl (no operator): no owner
    return [{"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}]


# ----------------------------------------------------------------------------- the PyTorchJob

def s3_env(spec: dict) -> list[dict]:
    store = spec["store"]
    env = []
    if store.get("endpoint"):
        env.append({"name": "AWS_ENDPOINT_URL", "value": store["endpoint"]})
    if store.get("region"):
        env.append({"name": "AWS_REGION", "value": store["region"]})
    if store.get("secretName"):
        for var, key in (("AWS_ACCESS_KEY_ID", store.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
                         ("AWS_SECRET_ACCESS_KEY", store.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": store["secretName"], "key": key}}})
        env.append({"name": "AWS_SESSION_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": store["secretName"], "key": "AWS_SESSION_TOKEN", "optional": True}}})
    return env


def container_env(spec: dict) -> list[dict]:
    timeout = str(spec["distributed"]["timeoutSeconds"])
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "NANOCHAT_METRICS_PORT", "value": str(spec["metricsPort"])},
        # a rank that dies mid-collective must take the job down, not leave its peers hanging
        {"name": "NANOCHAT_PG_TIMEOUT_S", "value": timeout},
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "3"},
        {"name": "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "value": timeout},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        *SCRATCH_ENV,
        *s3_env(spec),
    ]
    return env + [{"name": e["name"], "value": e.get("value", "")} for e in spec.get("env") or []]


def tmp_volume(size=None) -> dict:
    return {"name": "tmp", "emptyDir": {"sizeLimit": str(size)} if size else {}}


def hardened_pod_spec(spec: dict, containers: list[dict], volumes: list[dict]) -> dict:
    """Pod spec with the security settings every pod the operator creates shares (non-root, read-only root)."""
    container_sc = spec.get("containerSecurityContext") or CONTAINER_SECURITY_CONTEXT
    pod_spec = {
        "securityContext": copy.deepcopy(spec.get("podSecurityContext") or POD_SECURITY_CONTEXT),
        "enableServiceLinks": False,
        "containers": [{**c, "securityContext": copy.deepcopy(container_sc)} for c in containers],
        "volumes": volumes,
    }
    if spec.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = spec["serviceAccountName"]  # its token may be what S3 access needs
    else:
        pod_spec["automountServiceAccountToken"] = False  # no pod of a run calls the API server
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": s["name"]} for s in spec["imagePullSecrets"]]
    return pod_spec


def pod_template(run_name: str, spec: dict, step: Step, res: dict, command: list[str], args: list[str]) -> dict:
    limits, requests = {}, {}
    for key in ("cpu", "memory"):
        if res.get(key) is not None:
            limits[key] = requests[key] = str(res[key])
    if res["gpusPerNode"] > 0:
        limits[res["gpuResource"]] = requests[res["gpuResource"]] = str(res["gpusPerNode"])
    container = {
        "name": "pytorch",  # the training operator finds its container by this name
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "command": command,
        "args": args,
        "env": container_env(spec),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": spec["metricsPort"], "protocol": "TCP"}],
        "resources": {"limits": limits, "requests": requests},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    # NCCL and dataloader workers need more than the container runtime's 64 MB /dev/shm
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(res["shmSize"])}}, tmp_volume(res.get("tmpSize"))]
    pod_spec = hardened_pod_spec(spec, [container], volumes)
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        if res.get(key):
            pod_spec[key] = res[key]
    return {"metadata": {"labels": labels(run_name, step.name), "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": pod_spec}


def render_stage_job(run: dict, step: Step, attempt: int = 1, overrides: dict[str, list[str]] | None = None) -> dict:
    """The PyTorchJob for one attempt of one step of a NanochatRun object (metadata + spec)."""
    meta = run.get("metadata") or {}
    spec = crd.apply_defaults(run.get("spec"))
    name = meta.get("name") or "nanochat"
    if overrides is None:
        overrides = parse_overrides(spec, [*pipeline.STEPS, step])
    res = stage_resources(spec, step)
    nproc = nproc_per_node(spec, step, res)
    args = [f"--nproc-per-node={nproc}", "-m", step.module_path, *stage_args(step, spec, overrides)]
    template = pod_template(name, spec, step, res, ["torchrun"], args)
    replicas = {"Master": {"replicas": 1, "restartPolicy": spec["jobPolicy"]["restartPolicy"], "template": template}}
    if res["nodes"] > 1:
        replicas["Worker"] = {"replicas": res["nodes"] - 1, "restartPolicy": spec["jobPolicy"]["restartPolicy"],
                              "template": json.loads(json.dumps(template))}
    policy = spec["jobPolicy"]
    run_policy = {"cleanPodPolicy": policy["cleanPodPolicy"], "backoffLimit": policy["backoffLimit"],
                  "ttlSecondsAfterFinished": policy["ttlSecondsAfterFinished"]}
    if policy.get("activeDeadlineSeconds"):
        run_policy["activeDeadlineSeconds"] = policy["activeDeadlineSeconds"]
    gang = spec["gangScheduling"]
    if gang.get("enabled"):
        sched = {"minAvailable": res["nodes"]}
        for key in ("queue", "priorityClass", "scheduleTimeoutSeconds"):
            if gang.get(key):
                sched[key] = gang[key]
        run_policy["schedulingPolicy"] = sched
    job_spec = {"nprocPerNode": str(nproc), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas}
    job_labels = {**labels(name, step.name), LABEL_ATTEMPT: str(attempt), LABEL_GENERATION: str(meta.get("generation", 1))}
    job_meta = {
        "name": job_name(name, step.name, attempt),
        "labels": job_labels,
        "annotations": {ANN_TEMPLATE_HASH: template_hash(job_spec),
                        ANN_COMMAND: " ".join(["torchrun", *args])},
    }
    if meta.get("namespace"):
        job_meta["namespace"] = meta["namespace"]
    if owner_reference(run):
        job_meta["ownerReferences"] = owner_reference(run)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": job_meta, "spec": job_spec}


def template_hash(job_spec: dict) -> str:
    """Identifies what a job runs; a spec change that alters it replaces a running job."""
    return hashlib.sha256(json.dumps(job_spec, sort_keys=True).encode()).hexdigest()[:16]


def render_run(run: dict, steps: list[Step] | None = None) -> list[tuple[Step, dict]]:
    """Attempt 1 of every step, in pipeline order (what `nanochat-k8s render` prints).

    `steps` is the candidate list (default: nanochat.pipeline.STEPS), filtered by the spec like the operator does."""
    spec = crd.apply_defaults(run.get("spec"))
    planned = plan_steps(spec, steps)
    overrides = parse_overrides(spec, planned)
    if needs_stage_check(spec, planned):  # a bad override fails here, before any job, as in `nanochat speedrun`
        stage_configs(spec, planned, overrides)
    return [(s, render_stage_job(run, s, 1, overrides)) for s in planned]


def new_run(name: str, spec: dict, namespace: str | None = None, uid: str | None = None, generation: int = 1) -> dict:
    meta = {"name": name, "generation": generation}
    if namespace:
        meta["namespace"] = namespace
    if uid:
        meta["uid"] = uid
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": meta, "spec": spec}
