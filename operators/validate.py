"""Validation of everything the operator and `nanochat-k8s render` produce, offline.

- PyTorchJob: JSON Schema of the Kubeflow CRD (vendored in operators/schemas/, see its README),
  an unknown-field check (what the API server prunes or rejects with fieldValidation=Strict), and
  the training operator's admission-webhook rules, which the schema does not carry.
- NanochatRun: our own CRD schema (operators.crd), plus the unknown-field check.
- Built-in kinds (Deployment, Service, ConfigMap, Event, the pod templates inside PyTorchJobs and
  Volcano jobs): kubernetes-validate --strict, against each Kubernetes version in K8S_VERSIONS.
"""
from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import jsonschema

SCHEMA_DIR = Path(__file__).parent / "schemas"
PYTORCHJOB_SCHEMA = SCHEMA_DIR / "kubeflow.org_pytorchjobs.v1.json"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest that kubernetes-validate ships and we support
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MANAGED_BY = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")


class ValidationFailed(ValueError):
    def __init__(self, what: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{what} is invalid:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- schemas

def strip_descriptions(node):
    """The vendored schema keeps everything but the (bulky) descriptions."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def crd_schema(crd: dict, version: str) -> dict:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version}")


@functools.cache
def pytorchjob_schema() -> dict:
    return json.loads(PYTORCHJOB_SCHEMA.read_text())


@functools.cache
def nanochatrun_schema() -> dict:
    from operators import crd
    return crd.schema()


def schema_errors(schema: dict, obj) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{_path(e.absolute_path)}: {e.message}" for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]


def unknown_fields(schema: dict, obj, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server drops them, or rejects them under Strict)."""
    errors = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return errors
    if isinstance(obj, dict) and schema.get("type") == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            sub_path = f"{path}.{key}" if path else key
            if props is not None and key in props:
                if sub_path != "metadata":  # ObjectMeta is validated by the API server, not the CRD schema
                    errors += unknown_fields(props[key], value, sub_path)
            elif isinstance(extra, dict):
                errors += unknown_fields(extra, value, sub_path)
            elif props is not None or extra is False:
                errors.append(f"{sub_path}: unknown field")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            errors += unknown_fields(schema["items"], item, f"{path}[{i}]")
    return errors


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def metadata_errors(meta: dict) -> list[str]:
    if not isinstance(meta, dict):
        return [f"metadata: must be a mapping, got {type(meta).__name__}"]
    errors = []
    name = meta.get("name", "")
    if not name or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a valid DNS-1123 subdomain")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(f"metadata.labels[{key}]: {value!r} is not a valid label value")
        if len(key.split("/")[-1]) > 63:
            errors.append(f"metadata.labels[{key}]: name part longer than 63 characters")
    for ref in meta.get("ownerReferences") or []:
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                errors.append(f"metadata.ownerReferences: missing {field}")
    return errors


# ----------------------------------------------------------------------------- PyTorchJob

def webhook_errors(job: dict) -> list[str]:
    """The Kubeflow training operator's validating webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go, v1.8-1.9)."""
    errors = []
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS1035.match(name):
        errors.append(f"metadata.name: {name!r} should match DNS-1035 (lowercase letters, digits, '-', starting with a letter, <= 63)")
    spec = job.get("spec") or {}
    managed_by = (spec.get("runPolicy") or {}).get("managedBy")
    if managed_by is not None and managed_by not in MANAGED_BY:
        errors.append(f"spec.runPolicy.managedBy: {managed_by!r} not supported, accepted: {', '.join(MANAGED_BY)}")
    replicas = spec.get("pytorchReplicaSpecs")
    if not replicas:
        return errors + ["spec.pytorchReplicaSpecs: must be required"]
    if spec.get("elasticPolicy") is not None:
        if "Worker" not in replicas:
            errors.append("spec.pytorchReplicaSpecs[Worker]: must be configured if elastic policy is used")
        if (spec["elasticPolicy"] or {}).get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            errors.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs[{rtype}]"
        if rtype not in ("Master", "Worker"):
            errors.append(f"{where}: unsupported replica type {rtype!r}, supported: Master, Worker")
        containers = (((rspec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errors.append(f"{where}.template.spec.containers: must be specified")
        for i, c in enumerate(containers):
            if not c.get("image"):
                errors.append(f"{where}.template.spec.containers[{i}].image: must be required")
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"{where}.template.spec.containers: must have at least one container with name pytorch")
        count = (rspec or {}).get("replicas")
        if rtype == "Master" and count != 1:
            errors.append(f"{where}.replicas: must be 1")
        elif rtype != "Master" and count is not None and count < 1:
            errors.append(f"{where}.replicas: must be at least 1")
    return errors


def pytorchjob_errors(job: dict, strict: bool = True) -> list[str]:
    errors = schema_errors(pytorchjob_schema(), job)
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        errors.append(f"apiVersion/kind: expected kubeflow.org/v1 PyTorchJob, got {job.get('apiVersion')} {job.get('kind')}")
    errors += metadata_errors(job.get("metadata") or {})
    errors += webhook_errors(job)
    if strict:
        errors += unknown_fields(pytorchjob_schema(), job)
        for rtype, rspec in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items():
            errors += [f"spec.pytorchReplicaSpecs[{rtype}].template: {e}" for e in pod_template_errors(rspec.get("template") or {})]
    return errors


def check_pytorchjob(job: dict, strict: bool = True) -> dict:
    errors = pytorchjob_errors(job, strict)
    if errors:
        raise ValidationFailed(f"PyTorchJob {job.get('metadata', {}).get('name')!r}", errors)
    return job


# ----------------------------------------------------------------------------- NanochatRun

def nanochatrun_errors(run: dict, strict: bool = True, stages: bool = True) -> list[str]:
    """Schema, metadata and (strict) unknown fields; with `stages`, also what the stages themselves would
    reject (stage_errors), checked once the schema passes."""
    from operators import crd
    errors = schema_errors(nanochatrun_schema(), run)
    if run.get("apiVersion") != crd.API_VERSION or run.get("kind") != crd.KIND:
        errors.append(f"apiVersion/kind: expected {crd.API_VERSION} {crd.KIND}")
    errors += metadata_errors(run.get("metadata") or {})
    if strict:
        errors += unknown_fields(nanochatrun_schema(), run)
    if stages and not errors:
        errors += stage_errors(run)
    return errors


def stage_errors(run: dict) -> list[str]:
    """What `nanochat speedrun` checks before any work, for the spec of a (schema-valid) NanochatRun:
    spec.stages names real steps, and every spec.overrides item and NANOCHAT_* variable of spec.env is
    accepted by the stage's own config parser (unknown key with "did you mean", bad value), and each training
    batch splits over spec.resources' processes (imported only when needed: pytorchjob.needs_stage_check)."""
    from operators import crd
    from operators.pytorchjob import SpecError, needs_stage_check, parse_overrides, plan_steps, stage_configs
    spec = crd.apply_defaults(run.get("spec"))
    try:
        steps = plan_steps(spec)
        overrides = parse_overrides(spec, steps)
        if needs_stage_check(spec, steps):
            stage_configs(spec, steps, overrides)
    except SpecError as e:
        return [str(e)]
    return []


def check_nanochatrun(run: dict, strict: bool = True) -> dict:
    errors = nanochatrun_errors(run, strict)
    if errors:
        meta = run.get("metadata") if isinstance(run.get("metadata"), dict) else {}
        raise ValidationFailed(f"NanochatRun {meta.get('name')!r}", errors)
    return run


# ----------------------------------------------------------------------------- built-in kinds

def builtin_errors(obj: dict, versions=K8S_VERSIONS) -> list[str]:
    """kubernetes-validate --strict (rejects unknown properties) against each Kubernetes version."""
    import kubernetes_validate
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"k8s {version}: {_path(e.absolute_path)}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"k8s {version}: {e.message}")
    return errors


def check_builtin(obj: dict, versions=K8S_VERSIONS) -> dict:
    errors = builtin_errors(obj, versions)
    if errors:
        raise ValidationFailed(f"{obj.get('kind')} {obj.get('metadata', {}).get('name')!r}", errors)
    return obj


def pod_template_errors(template: dict, versions=K8S_VERSIONS) -> list[str]:
    """A PodTemplateSpec validated as the Pod it becomes."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template", **(template.get("metadata") or {})},
           "spec": template.get("spec") or {}}
    return builtin_errors(pod, versions)


def check(obj: dict) -> dict:
    """Validate any object the operator or render produces, by kind."""
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        return check_pytorchjob(obj)
    if kind == "NanochatRun":
        return check_nanochatrun(obj)
    return check_builtin(obj)


# ----------------------------------------------------------------------------- vendoring

def vendor(crd_path: str | Path, out: Path = PYTORCHJOB_SCHEMA) -> Path:
    """Write the openAPIV3Schema of the PyTorchJob CRD (descriptions removed) into operators/schemas/."""
    import yaml
    crd = yaml.safe_load(Path(crd_path).read_text())
    out.write_text(json.dumps(strip_descriptions(crd_schema(crd, "v1")), indent=1, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    # python -m operators.validate vendor ../shared/schemas/kubeflow.org_pytorchjobs.yaml
    if len(sys.argv) == 3 and sys.argv[1] == "vendor":
        print(f"wrote {vendor(sys.argv[2])}")
    else:
        sys.exit("usage: python -m operators.validate vendor PATH/TO/kubeflow.org_pytorchjobs.yaml")
