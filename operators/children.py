"""The other objects a NanochatRun owns: the report ConfigMap, Events, and the serving Deployment,
Service and Ingress (pure rendering; every object validates with kubernetes-validate --strict)."""
from __future__ import annotations

import datetime

from operators import crd
from operators.pytorchjob import SCRATCH_ENV, dns_label, hardened_pod_spec, labels, owner_reference, s3_env, tmp_volume

ANN_REPORT_DIGEST = "nanochat.dev/report-digest"
ANN_CHECKPOINT = "nanochat.dev/checkpoint"
CONFIGMAP_MAX = 1_000_000  # a ConfigMap holds at most 1 MiB
# serving pods shut down like the chart's chat Deployment (helm/nanochat-speedrun values inference.*):
PRESTOP_S = 10  # keep serving while the endpoint removal reaches every proxy
DRAIN_S = 30    # then SIGTERM: in-flight streams get this long (nanochat serve --drain-timeout)


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _meta(run: dict, name: str, component: str, **extra) -> dict:
    meta = {"name": name, "labels": labels(run["metadata"]["name"], component=component), **extra}
    if run["metadata"].get("namespace"):
        meta["namespace"] = run["metadata"]["namespace"]
    if owner_reference(run):
        meta["ownerReferences"] = owner_reference(run)
    return meta


def report_configmap_name(run_name: str) -> str:
    return f"{dns_label(run_name)}-report"[:63]


def report_configmap(run: dict, text: str, digest: str, uri: str) -> dict:
    if len(text.encode()) > CONFIGMAP_MAX:  # the full report stays in the store
        text = text.encode()[:CONFIGMAP_MAX - 200].decode(errors="ignore") + f"\n\n… truncated; full report: {uri}\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(run, report_configmap_name(run["metadata"]["name"]), "report",
                              annotations={ANN_REPORT_DIGEST: digest, "nanochat.dev/report-uri": uri}),
            "data": {"report.md": text}}


def event(run: dict, type_: str, reason: str, message: str, now: float, seq: int = 0) -> dict:
    """A core/v1 Event about the run (what `kubectl describe nanochatrun` lists)."""
    meta = run["metadata"]
    ts = rfc3339(now)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{int(now * 1e6):x}{seq:02x}", "namespace": meta.get("namespace") or "default"},
        "involvedObject": {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": meta["name"],
                           "namespace": meta.get("namespace") or "default", **({"uid": meta["uid"]} if meta.get("uid") else {})},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": "nanochat-operator"}, "reportingComponent": "nanochat-operator",
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
    }


def serving_name(run_name: str) -> str:
    return f"{dns_label(run_name)}-chat"[:63]


def serving_objects(run: dict, checkpoint: str) -> list[dict]:
    """Deployment (+ Service, + Ingress when a host is set) running `nanochat serve` on the run's store.

    The pod template carries the checkpoint as an annotation: a new checkpoint rolls the Deployment,
    and the new pods load it from the store."""
    spec = crd.apply_defaults(run["spec"])
    sv = spec["serving"]
    name = serving_name(run["metadata"]["name"])
    sel = {**labels(run["metadata"]["name"], component="serving")}
    limits = {}
    for key in ("cpu", "memory"):
        if sv.get(key) is not None:
            limits[key] = str(sv[key])
    if sv.get("gpus"):
        limits["nvidia.com/gpu"] = str(sv["gpus"])
    container = {
        "name": "chat", "image": spec["image"], "imagePullPolicy": spec["imagePullPolicy"],
        "command": ["nanochat", "serve", "--store", spec["store"]["uri"], "--host", "0.0.0.0", "--port", str(sv["port"]),
                    "--drain-timeout", str(DRAIN_S), "--batch-rows", str(sv["batchRows"])],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *SCRATCH_ENV, *s3_env(spec)],
        "ports": [{"name": "http", "containerPort": sv["port"], "protocol": "TCP"}],
        "resources": {"limits": limits, "requests": dict(limits)},
        # /healthz: the process is up (500 if the model failed to load); /readyz: the weights are loaded
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3,
                           "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 15, "timeoutSeconds": 5,
                          "failureThreshold": 4},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # the checkpoint is downloaded here
    }
    pod_spec = hardened_pod_spec(spec, [container], [tmp_volume(sv.get("tmpSize"))])
    pod_spec["terminationGracePeriodSeconds"] = PRESTOP_S + DRAIN_S + 15
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(run, name, "serving", annotations={ANN_CHECKPOINT: checkpoint}),
        "spec": {
            "replicas": sv["replicas"],
            # the old model serves until the new one is loaded (/readyz)
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": sel},
            "template": {"metadata": {"labels": sel, "annotations": {ANN_CHECKPOINT: checkpoint}}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(run, name, "serving"),
        "spec": {"selector": sel, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }
    out = [deployment, service]
    if sv.get("ingressHost"):
        ingress_spec = {"rules": [{"host": sv["ingressHost"], "http": {"paths": [{
            "path": "/", "pathType": "Prefix", "backend": {"service": {"name": name, "port": {"name": "http"}}}}]}}]}
        if sv.get("ingressClassName"):
            ingress_spec["ingressClassName"] = sv["ingressClassName"]
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": _meta(run, name, "serving"),
                    "spec": ingress_spec})
    return out


def roll_patch(checkpoint: str) -> dict:
    """Merge patch that points an existing serving Deployment at a new checkpoint (triggers a rollout)."""
    ann = {ANN_CHECKPOINT: checkpoint}
    return {"metadata": {"annotations": ann}, "spec": {"template": {"metadata": {"annotations": ann}}}}
