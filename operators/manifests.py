"""Everything the operator needs in a cluster, for `kubectl apply` without Helm (`nanochat-k8s install`):
the CRD, a ServiceAccount with exactly the RBAC the operator uses, its Deployment and a metrics Service.
The Helm chart renders the same objects; RBAC_RULES is the list of API calls operators/operator.py makes."""
from __future__ import annotations

import copy

from operators import crd
from operators.pytorchjob import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT, SCRATCH_ENV

RBAC_RULES = [
    # the runs it reconciles (kopf watches and patches them: finalizer, annotations; we patch status)
    {"apiGroups": [crd.GROUP], "resources": [crd.PLURAL], "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": [crd.GROUP], "resources": [f"{crd.PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    # one PyTorchJob per stage
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # the report ConfigMap, S3 credentials, Events
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # serving
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["get", "create"]},
    # kopf: discover CRDs and namespaces
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
]
LABELS = {"app.kubernetes.io/name": "nanochat-operator", "app.kubernetes.io/part-of": "nanochat"}


def probes(metrics_port: int | str = "metrics", health_port: int | str = "health") -> dict:
    """The operator container's probes (the Helm chart's operator Deployment has the same)."""
    def healthz():
        return {"httpGet": {"path": "/healthz", "port": health_port}}
    return {
        # kopf's liveness endpoint answers from kopf's event loop once it has logged in
        "startupProbe": {**healthz(), "periodSeconds": 2, "failureThreshold": 60},
        "livenessProbe": {**healthz(), "periodSeconds": 30, "timeoutSeconds": 5, "failureThreshold": 3},
        # connected and watching: kopf started and the API server lists NanochatRuns in every watched namespace
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": metrics_port}, "periodSeconds": 10, "timeoutSeconds": 6},
    }


def operator_manifests(image: str, namespace: str = "nanochat-system", watch: list[str] | None = None,
                       metrics_port: int = 8080, interval: float = 10.0, health_port: int = 8081) -> list[dict]:
    name = "nanochat-operator"
    meta = {"name": name, "namespace": namespace, "labels": dict(LABELS)}
    args = ["python", "-m", "operators.cli", "operator", f"--metrics-port={metrics_port}", f"--health-port={health_port}",
            f"--interval={interval:g}"]
    args += [f"--namespace={ns}" for ns in watch or []]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": dict(LABELS)}},
        crd.crd(),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name, "labels": dict(LABELS)},
         "rules": RBAC_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name, "labels": dict(LABELS)},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": 1,  # kopf runs standalone: one operator at a time
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": dict(LABELS)},
            "template": {"metadata": {"labels": dict(LABELS)}, "spec": {
                "serviceAccountName": name,
                "containers": [{
                    "name": "operator", "image": image, "command": args,
                    "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *copy.deepcopy(SCRATCH_ENV)],
                    "ports": [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
                              {"name": "health", "containerPort": health_port, "protocol": "TCP"}],
                    **probes(),
                    "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
                    "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }],
                "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
            }},
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": dict(LABELS), "ports": [{"name": "metrics", "port": metrics_port, "targetPort": "metrics"}]}},
    ]
