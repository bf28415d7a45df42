"""The NanochatRun CustomResourceDefinition, defined once in Python.

`crd()` is the manifest; `operators/crds/nanochatrun.yaml` is generated from it
(`python -m operators.crd` rewrites it; a test checks they are identical). `apply_defaults(spec)`
applies the schema's defaults the way the API server does, so `nanochat-k8s render` (no API server)
and the operator see the same effective spec.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from nanochat import profiles

GROUP = "nanochat.dev"
VERSION = "v1alpha1"
KIND = "NanochatRun"
PLURAL = "nanochatruns"
SINGULAR = "nanochatrun"
SHORT_NAMES = ["ncr"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_PATH = Path(__file__).parent / "crds" / "nanochatrun.yaml"
# where .github/workflows/images.yml publishes; the chart's values.yaml and manifests/ use the same names
IMAGE_REPO = "ghcr.io/nanochat-k8s"
IMAGE_TAG = "0.1.0"

PHASES = ["Pending", "Running", "Succeeded", "Failed", "Deleting"]
STAGE_STATES = ["Pending", "Running", "Retrying", "Succeeded", "Failed"]
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
STEP_NAME = r"^[a-z][a-z0-9_]*$"


def _s(type_: str, description: str = "", **kw) -> dict:
    out = {"type": type_, **kw}
    if description:
        out["description"] = description
    return out


def _obj(description: str = "", properties: dict | None = None, **kw) -> dict:
    return _s("object", description, properties=properties or {}, **kw)


def _quantity(description: str) -> dict:
    # int-or-string, like resource.Quantity in core types (a structural schema allows this without `type`)
    return {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY,
            "description": description}


def _stage_resources(description: str) -> dict:
    return _obj(description, {
        "nodes": _s("integer", "pods (torchrun nodes) for the stage: Master + nodes-1 Workers", minimum=1, maximum=512),
        "gpusPerNode": _s("integer", "GPUs per pod; torchrun --nproc-per-node (0 = CPU, one process)", minimum=0, maximum=16),
        "gpuResource": _s("string", "extended resource name for GPUs", minLength=1),
        "cpu": _quantity("CPU request and limit per pod"),
        "memory": _quantity("memory request and limit per pod"),
        "shmSize": _quantity("size of the /dev/shm emptyDir (medium: Memory) per pod"),
        "tmpSize": _quantity("size limit of the /tmp emptyDir per pod (scratch, compile caches; the root filesystem is read-only); "
                             "unset: no limit"),
        "nodeSelector": _s("object", "node labels the pods must match", additionalProperties={"type": "string"}),
        "tolerations": _s("array", "tolerations for the pods", items=_obj("", {
            "key": _s("string"), "operator": _s("string", enum=["Exists", "Equal"]), "value": _s("string"),
            "effect": _s("string", enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
            "tolerationSeconds": _s("integer", format="int64"),
        })),
        "priorityClassName": _s("string", "PriorityClass for the pods"),
    })


def spec_schema() -> dict:
    return _obj("What to run: a profile, its overrides, where artifacts live, and how each stage is scheduled.", {
        "profile": _s("string", "named flag set for all stages (nanochat/profiles.py)", enum=profiles.names(), default="d20"),
        "image": _s("string", "container image with nanochat installed (the same image runs every stage)", minLength=1),
        "imagePullPolicy": _s("string", enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"),
        "overrides": _s("array", "stage flag overrides like `nanochat speedrun --set`: STAGE.KEY=VALUE, or KEY=VALUE for every stage",
                        items=_s("string", pattern=r"^([a-z][a-z0-9_]*\.)?[a-z][a-z0-9_-]*=.*$"), default=[]),
        "stages": _obj("which pipeline steps to run", {
            "rl": _s("boolean", "run chat_rl (+ its eval); unset: on for CPU profiles, off for GPU ones"),
            "only": _s("array", "run only these steps (names as in `nanochat status`)", items=_s("string", pattern=STEP_NAME)),
            "skip": _s("array", "leave these steps out", items=_s("string", pattern=STEP_NAME)),
        }, default={}),
        "store": _obj("the artifact store every stage reads and writes", {
            "uri": _s("string", "s3://bucket/prefix (or file:///path on a shared volume)", pattern=r"^(s3|file)://.+"),
            "endpoint": _s("string", "S3 endpoint URL (MinIO, Ceph, R2); becomes AWS_ENDPOINT_URL"),
            "region": _s("string", "becomes AWS_REGION"),
            "secretName": _s("string", "Secret holding the S3 credentials"),
            "accessKeyIdKey": _s("string", "key of the access key id in the Secret", default="AWS_ACCESS_KEY_ID"),
            "secretAccessKeyKey": _s("string", "key of the secret access key in the Secret", default="AWS_SECRET_ACCESS_KEY"),
        }, required=["uri"]),
        "resources": _obj("per-pod resources: `gpu` applies to GPU stages, `cpu` to the others, `stages.<step>` wins", {
            "gpu": _stage_resources("defaults for GPU stages (base_train, mid_train, chat_*, base_eval)"),
            "cpu": _stage_resources("defaults for CPU stages (data, tok_train, tok_eval, ...)"),
            "stages": _s("object", "per-step overrides, keyed by step name",
                         additionalProperties=_stage_resources("resources for one step")),
        }, default={}),
        "retries": _obj("how the operator retries a failed stage (a new PyTorchJob that resumes from the last checkpoint)", {
            "limit": _s("integer", "retries per stage after the first attempt", minimum=0, maximum=100, default=2),
            "backoffSeconds": _s("integer", "wait before the first retry; doubles each retry", minimum=0, default=60),
            "maxBackoffSeconds": _s("integer", minimum=0, default=1800),
            "restartingTimeoutSeconds": _s("integer", "a job Restarting this long is failed and recreated whole (0 = never)",
                                           minimum=0, default=900),
            "pendingTimeoutSeconds": _s("integer", "a job Created but not Running this long is failed and recreated (0 = never)",
                                        minimum=0, default=3600),
        }, default={}),
        "jobPolicy": _obj("PyTorchJob run policy for every stage", {
            "restartPolicy": _s("string", "pod restart policy; Never lets the operator restart all ranks together",
                                enum=["Never", "OnFailure", "ExitCode", "Always"], default="Never"),
            "backoffLimit": _s("integer", "pod restarts the training operator allows before the job fails", minimum=0, default=0),
            "cleanPodPolicy": _s("string", "which pods to delete when a job ends", enum=["None", "Running", "All"], default="Running"),
            "ttlSecondsAfterFinished": _s("integer", "delete finished jobs after this long", minimum=0, default=86400),
            "activeDeadlineSeconds": _s("integer", "fail a job running longer than this", minimum=1),
        }, default={}),
        "gangScheduling": _obj("all pods of a stage start together (Volcano or scheduler-plugins on the training operator)", {
            "enabled": _s("boolean", default=False),
            "queue": _s("string", "Volcano queue"),
            "priorityClass": _s("string"),
            "scheduleTimeoutSeconds": _s("integer", minimum=1),
        }, default={}),
        "distributed": _obj("torch.distributed settings", {
            "timeoutSeconds": _s("integer", "process-group / NCCL watchdog timeout", minimum=60, default=1800),
        }, default={}),
        "metricsPort": _s("integer", "each stage serves Prometheus /metrics here (local rank 0; rank r on port+r)",
                          minimum=1024, maximum=65535, default=9400),
        "serviceAccountName": _s("string", "service account for stage pods (e.g. for IRSA / workload identity S3 access)"),
        "imagePullSecrets": _s("array", "Secrets for pulling `image` from a private registry, in every pod the operator creates",
                               items=_obj("", {"name": _s("string", minLength=1)}, required=["name"])),
        "podSecurityContext": _obj("replaces the default pod securityContext (non-root uid/gid/fsGroup 10001, RuntimeDefault "
                                   "seccomp) of every pod the operator creates", **{"x-kubernetes-preserve-unknown-fields": True}),
        "containerSecurityContext": _obj("replaces the default container securityContext (no privilege escalation, all "
                                         "capabilities dropped, read-only root filesystem)",
                                         **{"x-kubernetes-preserve-unknown-fields": True}),
        "env": _s("array", "extra environment variables for every stage container; NANOCHAT_<KEY> sets a stage config key "
                  "below spec.overrides (checked and hashed like one); variables derived from other spec fields are refused",
                  items=_obj("", {"name": _s("string", minLength=1), "value": _s("string")}, required=["name"])),
        "serving": _obj("after the run, serve the final chat model (nanochat serve) behind a Service / Ingress", {
            "enabled": _s("boolean", default=False),
            "replicas": _s("integer", minimum=0, default=1),
            "port": _s("integer", minimum=1, maximum=65535, default=8000),
            "gpus": _s("integer", minimum=0, default=0),
            "cpu": _quantity("CPU per serving pod"),
            "memory": _quantity("memory per serving pod"),
            "tmpSize": _quantity("size limit of the /tmp emptyDir the checkpoint is downloaded into (unset: no limit)"),
            "batchRows": _s("integer", "requests each pod decodes together, one row each (nanochat serve --batch-rows)",
                            minimum=1, maximum=256, default=8),
            "ingressHost": _s("string", "create an Ingress for this host"),
            "ingressClassName": _s("string"),
        }, default={}),
    }, required=["image", "store"])


def status_schema() -> dict:
    stage = _obj("one pipeline step", {
        "name": _s("string"),
        "state": _s("string", enum=STAGE_STATES),
        "attempts": _s("integer", "PyTorchJobs created for this step so far"),
        "failures": _s("integer", "failed attempts counted against retries.limit (reset when the job template changes)"),
        "failedAttempts": _s("array", "attempt numbers that failed with the current job template", items=_s("integer")),
        "templateHash": _s("string", "identifies what the step's job runs (see nanochat.dev/template-hash)"),
        "lastFailureTime": _s("string", format="date-time"),
        "jobName": _s("string"),
        "startTime": _s("string", format="date-time"),
        "endTime": _s("string", format="date-time"),
        "durationSeconds": _s("number"),
        "nextRetryTime": _s("string", format="date-time"),
        "message": _s("string"),
        "metrics": _s("object", "key metrics from the step's done.json", **{"x-kubernetes-preserve-unknown-fields": True}),
    }, required=["name", "state"])
    condition = _obj("", {
        "type": _s("string"), "status": _s("string", enum=["True", "False", "Unknown"]),
        "reason": _s("string"), "message": _s("string"),
        "lastTransitionTime": _s("string", format="date-time"),
        "observedGeneration": _s("integer"),
    }, required=["type", "status"])
    return _obj("observed state, written by the operator", {
        "phase": _s("string", enum=PHASES),
        "currentStage": _s("string"),
        "progress": _s("string", "succeeded/total steps"),
        "message": _s("string"),
        "observedGeneration": _s("integer", format="int64"),
        "startTime": _s("string", format="date-time"),
        "completionTime": _s("string", format="date-time"),
        "stages": _s("array", items=stage),
        "conditions": _s("array", items=condition),
        "report": _obj("", {"uri": _s("string"), "configMap": _s("string"), "digest": _s("string")}),
        "serving": _obj("", {"deployment": _s("string"), "checkpoint": _s("string"), "url": _s("string")}),
    })


def schema() -> dict:
    return _obj("A nanochat speedrun: one PyTorchJob per pipeline stage, artifacts in S3, a report at the end.", {
        "apiVersion": _s("string"), "kind": _s("string"), "metadata": _s("object"),
        "spec": spec_schema(), "status": status_schema(),
    }, required=["spec"])


def crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "nanochat", "app.kubernetes.io/part-of": "nanochat"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": ["nanochat"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": schema()},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Profile", "type": "string", "jsonPath": ".spec.profile"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `python -m operators.crd` from operators/crd.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def apply_defaults(obj, schema_node: dict | None = None):
    """Fill in schema defaults like the API server's structural defaulting (returns a new object)."""
    node = spec_schema() if schema_node is None else schema_node
    obj = copy.deepcopy(obj) if obj is not None else {}
    if isinstance(obj, dict) and node.get("type") == "object":
        for key, sub in node.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj and obj[key] is not None:
                obj[key] = apply_defaults(obj[key], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in obj:
                obj[key] = apply_defaults(obj[key], extra)
    elif isinstance(obj, list) and "items" in node:
        obj = [apply_defaults(x, node["items"]) for x in obj]
    return obj


def default_image(gpu: bool) -> str:
    """The published image a profile runs on: the CUDA one for GPU profiles, the slim CPU one otherwise."""
    return f"{IMAGE_REPO}/nanochat-{'train' if gpu else 'cpu'}:{IMAGE_TAG}"


def example(name: str = "d20-first", image: str | None = None, profile: str = "d20",
            store: str = "s3://nanochat/runs/d20-first") -> dict:
    """A NanochatRun manifest to start from (also shown in the README)."""
    gpu = profiles.get(profile).get("gpus_per_node", 0) > 0
    image = image or default_image(gpu)
    resources = {"cpu": {"cpu": "8", "memory": "32Gi"}}
    if gpu:
        resources["gpu"] = {"gpusPerNode": 8, "cpu": "64", "memory": "512Gi", "shmSize": "64Gi"}
    return {
        "apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
        "spec": {
            "profile": profile, "image": image,
            "store": {"uri": store, "endpoint": "http://minio.minio.svc:9000", "secretName": "nanochat-s3"},
            "overrides": [],
            "resources": resources,
            "retries": {"limit": 2, "backoffSeconds": 60},
            "serving": {"enabled": True, "replicas": 1, "ingressHost": "chat.example.com"},
        },
    }


def main(argv=None) -> int:
    """Rewrite operators/crds/nanochatrun.yaml (or print it with --stdout)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--stdout" in argv:
        sys.stdout.write(crd_yaml())
        return 0
    CRD_PATH.parent.mkdir(parents=True, exist_ok=True)
    CRD_PATH.write_text(crd_yaml())
    print(f"wrote {CRD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
