"""A TorchX scheduler that submits an AppDef as a Kubeflow PyTorchJob (`torchx run -s pytorchjob ...`).

TorchX's built-in `kubernetes` scheduler emits Volcano jobs; clusters that run only the Kubeflow
training operator can use this one instead. One role becomes one PyTorchJob: a Master plus
`num_replicas - 1` Workers sharing one pod template. TorchX macros map onto what the training
operator provides: `rank0_env` → MASTER_ADDR (the master's headless Service), `replica_id` → the
pod's RANK, `app_id` → the job name. The dryrun output validates like every PyTorchJob we render
(operators.validate).

Registered through the `torchx.schedulers` entry point `pytorchjob = operators.torchx_scheduler:create_scheduler`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream, StructuredOpts, filter_regex, split_lines
from torchx.schedulers.ids import make_unique
from torchx.specs.api import AppDef, AppDryRunInfo, AppState, CfgVal, ReplicaState, ReplicaStatus, RoleStatus, macros, runopts
from torchx.util.strings import normalize_str

from operators import validate
from operators.pytorchjob import JOB_NAME_MAX, MASTER_PORT, SCRATCH_ENV, hardened_pod_spec, tmp_volume
from operators.torchx_components import META_NPROC, META_S3_SECRET, META_STAGE

JOB_GROUP, JOB_VERSION, JOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
LABEL_APP = "torchx.pytorch.org/app-name"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
STATES = {"Succeeded": AppState.SUCCEEDED, "Failed": AppState.FAILED, "Restarting": AppState.RUNNING,
          "Running": AppState.RUNNING, "Created": AppState.PENDING}
REPLICA_STATES = {AppState.SUCCEEDED: ReplicaState.SUCCEEDED, AppState.FAILED: ReplicaState.FAILED,
                  AppState.RUNNING: ReplicaState.RUNNING, AppState.PENDING: ReplicaState.PENDING}


@dataclass
class Opts(StructuredOpts):
    """Typed configuration options for the PyTorchJob scheduler."""

    namespace: str = "default"
    """Kubernetes namespace to submit the PyTorchJob to."""

    service_account: str | None = None
    """Service account for the pods."""

    priority_class: str | None = None
    """PriorityClass for the pods."""

    queue: str | None = None
    """Gang-schedule the pods in this Volcano queue (the training operator must run with gang scheduling)."""

    s3_secret: str | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the pods (a role's own setting wins)."""

    restart_policy: str = "Never"
    """Pod restart policy: Never, OnFailure, ExitCode or Always."""

    ttl_seconds: int = 86400
    """Delete the finished job after this many seconds."""

    validate: bool = True
    """Check the job against the PyTorchJob CRD schema and the training operator's webhook rules."""

    hardened: bool = True
    """Run pods like the operator's: non-root (uid 10001, the nanochat images' user), read-only root filesystem with /tmp as an emptyDir, all capabilities dropped. False for images that need root or a writable root."""


@dataclass
class PyTorchJobRequest:
    resource: dict[str, Any]

    def __str__(self) -> str:
        import yaml
        return yaml.safe_dump(self.resource, sort_keys=False)

    def __repr__(self) -> str:
        return str(self)


def _port_name(name: str) -> str:
    """IANA_SVC_NAME: lowercase alphanumerics and '-', at most 15 characters."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:15] or "port"


def _quantity_cpu(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else f"{int(cpu * 1000)}m"


def app_to_pytorchjob(app: AppDef, cfg: Opts, job_name: str | None = None) -> dict:
    if len(app.roles) != 1:
        raise ValueError(f"the pytorchjob scheduler runs single-role apps; {app.name!r} has {len(app.roles)} roles")
    role = app.roles[0]
    name = job_name or normalize_str(make_unique(app.name, 8))[:JOB_NAME_MAX].rstrip("-")
    if not name[:1].isalpha():
        name = f"j{name}"[:JOB_NAME_MAX]
    bash = role.entrypoint in ("bash", "sh", "/bin/bash", "/bin/sh")
    values = macros.Values(img_root="", app_id=name, replica_id="${RANK}" if bash else "$(RANK)", rank0_env="MASTER_ADDR")
    role = values.apply(role)
    res = role.resource
    limits: dict[str, str] = {}
    if res.cpu > 0:
        limits["cpu"] = _quantity_cpu(res.cpu)
    if res.memMB > 0:
        limits["memory"] = f"{int(res.memMB)}M"
    if res.gpu > 0:
        limits["nvidia.com/gpu"] = str(res.gpu)
    for device, count in res.devices.items():
        limits[device] = str(count)
    env = [{"name": k, "value": str(v)} for k, v in role.env.items()]
    secret = role.metadata.get(META_S3_SECRET) or cfg.s3_secret
    if secret:
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": var}}}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    ports = [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}]
    ports += [{"name": _port_name(p), "containerPort": n, "protocol": "TCP"} for p, n in role.port_map.items() if n != MASTER_PORT]
    labels = {LABEL_APP: normalize_str(app.name)[:63].strip("-"), LABEL_MANAGED: "torchx.pytorch.org"}
    if role.metadata.get(META_STAGE):
        labels["nanochat.dev/stage"] = str(role.metadata[META_STAGE])
    container = {"name": "pytorch", "image": role.image, "command": [role.entrypoint], "args": list(role.args), "env": env,
                 "ports": ports, "resources": {"limits": limits, "requests": dict(limits)},
                 "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if cfg.hardened:
        set_by_role = {e["name"] for e in env}
        container["env"] = env + [e for e in SCRATCH_ENV if e["name"] not in set_by_role]
        container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
        pod_spec = hardened_pod_spec({"serviceAccountName": cfg.service_account}, [container], [*volumes, tmp_volume()])
    else:
        pod_spec = {"containers": [container], "volumes": volumes}
        if cfg.service_account:
            pod_spec["serviceAccountName"] = cfg.service_account
    if cfg.priority_class:
        pod_spec["priorityClassName"] = cfg.priority_class
    template = {"metadata": {"labels": dict(labels), "annotations": {"sidecar.istio.io/inject": "false"}}, "spec": pod_spec}
    replicas = {"Master": {"replicas": 1, "restartPolicy": cfg.restart_policy, "template": template}}
    if role.num_replicas > 1:
        replicas["Worker"] = {"replicas": role.num_replicas - 1, "restartPolicy": cfg.restart_policy,
                              "template": json.loads(json.dumps(template))}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": role.max_retries,
                                  "ttlSecondsAfterFinished": cfg.ttl_seconds}
    if cfg.queue:
        run_policy["schedulingPolicy"] = {"minAvailable": role.num_replicas, "queue": cfg.queue}
    nproc = str(role.metadata.get(META_NPROC) or (res.gpu if res.gpu > 0 else "auto"))
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
        "spec": {"nprocPerNode": nproc, "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


class PyTorchJobScheduler(Scheduler[Opts]):
    """TorchX scheduler for clusters with the Kubeflow training operator (PyTorchJob v1)."""

    def __init__(self, session_name: str, client: Any = None) -> None:
        super().__init__("pytorchjob", session_name)
        self._client = client

    def _api_client(self):
        if self._client is None:
            from operators.operator import default_api_client
            self._client = default_api_client()
        return self._client

    def _custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self._api_client())

    def _run_opts(self) -> runopts:
        return Opts.as_runopts()

    def _submit_dryrun(self, app: AppDef, cfg: Opts) -> AppDryRunInfo[PyTorchJobRequest, Opts]:
        job = app_to_pytorchjob(app, cfg)
        if cfg.validate:
            validate.check_pytorchjob(job, strict=False)
        return AppDryRunInfo(PyTorchJobRequest(job), repr)

    def _validate(self, app: AppDef, scheduler: str, cfg: Opts) -> None:
        if len(app.roles) != 1:
            raise ValueError("the pytorchjob scheduler runs single-role apps")

    def schedule(self, dryrun_info: AppDryRunInfo[PyTorchJobRequest, Opts]) -> str:
        job = dryrun_info.request.resource
        ns = job["metadata"]["namespace"]
        self._custom().create_namespaced_custom_object(JOB_GROUP, JOB_VERSION, ns, JOB_PLURAL, job)
        return f"{ns}:{job['metadata']['name']}"

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        from kubernetes.client.rest import ApiException
        ns, name = app_id.split(":")
        try:
            job = self._custom().get_namespaced_custom_object(JOB_GROUP, JOB_VERSION, ns, JOB_PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        state = job_app_state(job)
        spec = job.get("spec", {}).get("pytorchReplicaSpecs", {})
        n = sum(r.get("replicas", 1) for r in spec.values())
        replicas = [ReplicaStatus(id=i, state=REPLICA_STATES.get(state, ReplicaState.UNKNOWN), role="pytorch",
                                  hostname=f"{name}-{'master' if i == 0 else 'worker'}-{0 if i == 0 else i - 1}") for i in range(n)]
        return DescribeAppResponse(app_id=app_id, state=state, msg=_last_message(job),
                                   roles_statuses=[RoleStatus("pytorch", replicas)])

    def list(self, cfg: Mapping[str, CfgVal] | None = None) -> list[ListAppResponse]:
        ns = (cfg or {}).get("namespace") or "default"
        items = self._custom().list_namespaced_custom_object(JOB_GROUP, JOB_VERSION, ns, JOB_PLURAL,
                                                             label_selector=f"{LABEL_MANAGED}=torchx.pytorch.org")["items"]
        return [ListAppResponse(app_id=f"{ns}:{j['metadata']['name']}", state=job_app_state(j)) for j in items]

    def _cancel_existing(self, app_id: str) -> None:
        self._delete_existing(app_id)

    def _delete_existing(self, app_id: str) -> None:
        ns, name = app_id.split(":")
        self._custom().delete_namespaced_custom_object(JOB_GROUP, JOB_VERSION, ns, JOB_PLURAL, name)

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, should_tail: bool = False, streams: Stream | None = None) -> Iterable[str]:
        from kubernetes import client, watch
        if streams not in (None, Stream.COMBINED):
            raise ValueError("the pytorchjob scheduler only supports the COMBINED log stream")
        ns, name = app_id.split(":")
        pod = f"{name}-master-0" if k == 0 else f"{name}-worker-{k - 1}"
        core = client.CoreV1Api(self._api_client())
        args: dict[str, Any] = {"name": pod, "namespace": ns, "container": "pytorch", "timestamps": True}
        if since is not None:
            args["since_seconds"] = int((datetime.now() - since).total_seconds())
        lines = ((f"{line}\n" for line in watch.Watch().stream(core.read_namespaced_pod_log, **args)) if should_tail
                 else split_lines(core.read_namespaced_pod_log(**args)))
        return filter_regex(regex, lines) if regex else lines


def job_app_state(job: dict) -> AppState:
    from operators.reconcile import job_state
    return STATES.get(job_state(job), AppState.SUBMITTED)


def _last_message(job: dict) -> str:
    conds = (job.get("status") or {}).get("conditions") or []
    return conds[-1].get("message", "") if conds else ""


def create_scheduler(session_name: str, client: Any = None, **kwargs: Any) -> PyTorchJobScheduler:
    return PyTorchJobScheduler(session_name, client=client)
