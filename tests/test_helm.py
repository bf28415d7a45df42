"""The nanochat-speedrun chart, rendered by the real helm v4 binary and checked with real schemas.

Every value set is rendered once (module fixture); each rendered object must pass kubernetes-validate
--strict for Kubernetes 1.30 and 1.37, or its CRD schema (NanochatRun: ours; PyTorchJobs the operator
makes from it: Kubeflow's; ServiceMonitor / PodMonitor / HTTPRoute: manifests/schemas)."""
from __future__ import annotations

import copy
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from nanochat import profiles
from operators import children, crd, validate
from operators.manifests import RBAC_RULES
from operators.pytorchjob import labels as stage_labels
from operators.pytorchjob import render_run
from tests import helmbin

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "manifests" / "schemas"
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor")
# name → (values files under the chart, extra helm template kwargs)
VALUE_SETS = {
    "defaults": ((), {}),
    "tiny-cpu": (("ci/tiny-cpu-values.yaml",), {}),
    "d20-h100": (("ci/d20-h100-values.yaml",), {"api_versions": MONITORING_APIS}),
    "minio": (("ci/minio-values.yaml",), {}),
    "ingress-tls": (("ci/ingress-tls-values.yaml",), {"api_versions": MONITORING_APIS}),
    "serving-off": (("ci/serving-off-values.yaml",), {}),
    "serve-only": (("ci/serve-only-values.yaml",), {}),
    "kube-1.30": ((), {"kube_version": "1.30.0"}),
}
CRD_SUBSET_SCHEMAS = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.v1.json",
    "PodMonitor": "monitoring.coreos.com_podmonitors.v1.json",
    "HTTPRoute": "gateway.networking.k8s.io_httproutes.v1.json",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: helmbin.template(files=files, **kw) for name, (files, kw) in VALUE_SETS.items()}


def one(docs, kind, component=None):
    found = [d for d in docs if d["kind"] == kind and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs) -> set[str]:
    return {d["kind"] for d in docs}


def pod_specs(docs):
    """(object, pod spec) of everything that runs pods."""
    for d in docs:
        if d["kind"] == "Pod":
            yield d, d["spec"]
        elif d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]["spec"]


def object_errors(doc: dict) -> list[str]:
    kind = doc["kind"]
    if kind == "NanochatRun":
        return validate.nanochatrun_errors(doc)
    if kind in CRD_SUBSET_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SUBSET_SCHEMAS[kind]).read_text())
        return (validate.schema_errors(schema, doc) + validate.unknown_fields(schema, doc)
                + validate.metadata_errors(doc["metadata"]))
    return validate.builtin_errors(doc)


def pytorchjobs(run: dict) -> dict[str, dict]:
    """The PyTorchJobs the operator makes from a rendered NanochatRun, by step name."""
    run = copy.deepcopy(run)
    run["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    return {step.name: job for step, job in render_run(run)}


# ----------------------------------------------------------------------------- lint and schemas

@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict(name):
    files, kw = VALUE_SETS[name]
    args = ["lint", "--strict", str(helmbin.CHART)] + [a for f in files for a in ("-f", str(helmbin.CHART / f))]
    if kw.get("kube_version"):
        args += ["--kube-version", kw["kube_version"]]
    proc = helmbin.helm(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_helm_is_v4():
    assert helmbin.helm("version", "--short").stdout.startswith("v4.")


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_object_passes_its_schema(rendered, name):
    docs = rendered[name]
    assert docs
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs for e in object_errors(d)]
    for run in (d for d in docs if d["kind"] == "NanochatRun"):
        for step, job in pytorchjobs(run).items():
            errors += [f"PyTorchJob {step}: {e}" for e in validate.pytorchjob_errors(job)]
    assert not errors, "\n".join(errors)


def test_validation_catches_a_bad_object(rendered):
    """The schema checks above can fail: a misspelt field and a bad value are reported."""
    deployment = copy.deepcopy(one(rendered["defaults"], "Deployment", "inference"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert any("readinessprobe" in e for e in object_errors(deployment))
    route = copy.deepcopy(one(rendered["ingress-tls"], "HTTPRoute"))
    route["spec"]["rules"][0]["timeouts"]["request"] = "one hour"
    route["spec"]["rules"][0]["timeout"] = {}
    errs = object_errors(route)
    assert any("one hour" in e for e in errs) and any("timeout: unknown field" in e for e in errs)
    run = copy.deepcopy(one(rendered["defaults"], "NanochatRun"))
    run["spec"]["resources"] = {"gpu": {"gpusPerNode": -1}}
    assert any("gpusPerNode" in e for e in object_errors(run))


BAD_VALUES = [  # (--set, the path and the words the schema error must hold)
    ("run.resources.gpu.gpusPerNode=-1", ["/run/resources/gpu/gpusPerNode", "minimum"]),
    ("inference.gpus=-2", ["/inference/gpus", "minimum"]),
    ("inference.batchRows=0", ["/inference/batchRows", "minimum"]),
    ("run.profile=d99", ["/run/profile", "tiny", "d20"]),
    ("images.train.repository=", ["/images/train/repository"]),
    ("images.serve.tag=latest", ["/images/serve/tag"]),
    ("run.gpus=8", ["/run", "gpus"]),
    ("inference.ingress.tls.enabled=true", ["/inference/ingress/tls", "secretName"]),
    ("inference.httpRoute.enabled=true", ["/inference/httpRoute/parentRefs", "minItems"]),
    ("store.uri=gs://bucket/run", ["/store/uri"]),
    ("store.credentials.accessKeyId=AKIA", ["/store/credentials/secretAccessKey"]),
    ("run.name=My_Run", ["/run/name"]),
    ("run.image=Not An Image", ["/run/image"]),
]


@pytest.mark.parametrize("setting,words", BAD_VALUES, ids=[s for s, _ in BAD_VALUES])
def test_bad_values_fail_with_the_schema_message(setting, words):
    proc = helmbin.helm(*helmbin.template_args(sets=(setting,)), check=False)
    assert proc.returncode != 0, f"{setting} rendered:\n{proc.stdout[:500]}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, f"{w!r} not in:\n{proc.stderr}"


def test_a_release_name_that_cannot_name_a_run_fails():
    proc = helmbin.helm(*helmbin.template_args(release="1st"), check=False)
    assert proc.returncode != 0 and "must start with a letter" in proc.stderr and "run.name" in proc.stderr, proc.stderr
    assert one(helmbin.template(release="1st", sets=("run.name=first",)), "NanochatRun")["metadata"]["name"] == "first"


def test_missing_image_fails():
    proc = helmbin.helm(*helmbin.template_args(sets=("images.cpu=null",)), check=False)
    assert proc.returncode != 0 and "images" in proc.stderr and "cpu" in proc.stderr, proc.stderr


def test_schema_takes_the_run_fields_from_the_crd():
    """values.schema.json's run.* is the CRD's spec schema (one source of truth), and the profiles are nanochat's."""
    schema = json.loads(helmbin.VALUES_SCHEMA.read_text())
    spec = validate.crd_schema(yaml.safe_load(helmbin.CRD_SOURCE.read_text()), crd.VERSION)["properties"]["spec"]["properties"]
    run = schema["properties"]["run"]["properties"]
    for key in helmbin.RUN_FROM_CRD:
        assert run[key] == spec[key], key
    assert run["profile"]["enum"] == profiles.names() == spec["profile"]["enum"]


# ----------------------------------------------------------------------------- what each value set renders

def test_defaults(rendered):
    docs = rendered["defaults"]
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "NanochatRun",
            "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "Pod"} == kinds(docs)
    run = one(docs, "NanochatRun")
    assert run["spec"]["profile"] == "tiny" and run["spec"]["image"].startswith("ghcr.io/nanochat-k8s/nanochat-cpu:")
    assert run["spec"]["serving"]["enabled"] is True
    # no monitoring API in the cluster: no ServiceMonitor / PodMonitor
    assert not kinds(docs) & {"ServiceMonitor", "PodMonitor", "Ingress", "HTTPRoute"}


def test_monitoring_objects_only_with_the_api(rendered):
    docs = rendered["d20-h100"]
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")}
    assert sorted(d["kind"] for d in monitors.values()) == ["PodMonitor", "ServiceMonitor", "ServiceMonitor"]
    pod_monitor = one(docs, "PodMonitor")
    run = one(docs, "NanochatRun")
    # it selects exactly the pods the operator makes for this run, on the port the operator names "metrics"
    job = pytorchjobs(run)["base_train"]
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": run["spec"]["metricsPort"], "protocol": "TCP"} in ports
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    op_monitor = monitors[one(docs, "Deployment", "operator")["metadata"]["name"]]
    assert op_monitor["spec"]["endpoints"][0]["honorLabels"] is True  # the runs' namespace label, not the operator's


def test_serving_off(rendered):
    docs = rendered["serving-off"]
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") in ("inference", "test")]
    assert one(docs, "NanochatRun")["spec"]["serving"] == {"enabled": False}


def test_serve_only(rendered):
    docs = rendered["serve-only"]
    assert "NanochatRun" not in kinds(docs) and "ClusterRole" not in kinds(docs)
    deployment = one(docs, "Deployment", "inference")
    assert deployment["spec"]["replicas"] == 2  # no operator to scale it: the chart does
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--store") + 1] == "s3://nanochat/runs/d20"
    assert command[command.index("--source") + 1] == "sft"


def test_rbac_is_exactly_what_the_operator_uses(rendered):
    for name in ("defaults", "d20-h100"):
        role = one(rendered[name], "ClusterRole")
        assert role["rules"] == RBAC_RULES
        binding = one(rendered[name], "ClusterRoleBinding")
        sa = one(rendered[name], "ServiceAccount")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": helmbin.NAMESPACE}]
        deployment = one(rendered[name], "Deployment", "operator")
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_operator_watches_the_release_namespace_by_default(rendered):
    command = one(rendered["defaults"], "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["nanochat-k8s", "operator"] and f"--namespace={helmbin.NAMESPACE}" in command
    cluster_wide = helmbin.template(sets=("operator.clusterWide=true",))
    command = one(cluster_wide, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not [a for a in command if a.startswith("--namespace")]


# ----------------------------------------------------------------------------- training: GPUs, shm, images

def test_d20_gpu_requests_and_shm(rendered):
    run = one(rendered["d20-h100"], "NanochatRun")
    assert run["spec"]["profile"] == "d20" and run["spec"]["image"].startswith("ghcr.io/nanochat-k8s/nanochat-train:")
    jobs = pytorchjobs(run)
    gpu_steps = [s for s in jobs if s in ("base_train", "mid_train", "chat_sft")]
    assert len(gpu_steps) == 3 and "chat_rl" not in jobs  # stages: {rl: false}
    for step in gpu_steps:
        job = jobs[step]
        assert job["spec"]["nprocPerNode"] == "8"
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
        assert res["limits"]["memory"] == "1000Gi"
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_job = jobs["tok_train"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_job["containers"][0]["resources"]["limits"]
    assert cpu_job["containers"][0]["resources"]["limits"]["cpu"] == "16"
    # the chat model on one GPU
    chat = one(rendered["d20-h100"], "Deployment", "inference")["spec"]["template"]["spec"]["containers"][0]
    assert chat["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert chat["image"] == run["spec"]["image"]  # GPU serving needs the CUDA image, not the slim CPU one


def test_tiny_cpu_runs_without_gpus(rendered):
    run = one(rendered["tiny-cpu"], "NanochatRun")
    assert run["spec"]["image"].startswith("ghcr.io/nanochat-k8s/nanochat-cpu:")
    jobs = pytorchjobs(run)
    assert "base_train" in jobs and "chat_rl" in jobs  # the CPU profile keeps RL
    for step, job in jobs.items():
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert not [k for k in res["limits"] if "gpu" in k], step
        assert res["limits"]["cpu"] == "2" and res["limits"]["memory"] == "4Gi", step
        assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
        assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]


# ----------------------------------------------------------------------------- security

@pytest.mark.parametrize("name", ["defaults", "minio", "ingress-tls", "d20-h100"])
def test_every_pod_is_non_root_and_locked_down(rendered, name):
    checked = 0
    for obj, spec in pod_specs(rendered[name]):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["seccompProfile"]["type"] == "RuntimeDefault", where
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if c["name"] != "check":  # the helm test pod writes nothing
                assert mounts.get("/tmp") in tmp_volumes, f"{where}: a read-only root needs an emptyDir /tmp"
            checked += 1
    assert checked >= 2


# ----------------------------------------------------------------------------- serving

def test_inference_deployment_is_the_one_the_operator_rolls(rendered):
    docs = rendered["defaults"]
    run = one(docs, "NanochatRun")
    deployment = one(docs, "Deployment", "inference")
    service = one(docs, "Service", "inference")
    name = children.serving_name(run["metadata"]["name"])
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == name
    # nothing to serve before the run has a model: 0 replicas until the operator rolls it in
    assert deployment["spec"]["replicas"] == 0
    # the operator's roll (operators.children.roll_patch, a JSON merge patch) leaves a valid Deployment
    patch = children.roll_patch("chat_sft/000700")
    patch["spec"]["replicas"] = crd.apply_defaults(run["spec"])["serving"]["replicas"]
    rolled = merge_patch(deployment, patch)
    assert not validate.builtin_errors(rolled)
    assert rolled["spec"]["template"]["metadata"]["annotations"][children.ANN_CHECKPOINT] == "chat_sft/000700"
    assert rolled["spec"]["replicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == run["spec"]["serving"]["port"]
    store = container["command"][container["command"].index("--store") + 1]
    assert store == run["spec"]["store"]["uri"]


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (what the operator sends with application/merge-patch+json)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def test_probes_and_drain(rendered):
    pod = one(rendered["ingress-tls"], "Deployment", "inference")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(c["command"][c["command"].index("--drain-timeout") + 1])
    assert pre_stop > 0 and drain > 0 and pod["terminationGracePeriodSeconds"] > pre_stop + drain
    env = {e["name"]: e for e in c["env"]}
    assert env["NANOCHAT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "nanochat-api-key", "key": "api-key"}
    pdb = one(rendered["ingress-tls"], "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(rendered["ingress-tls"], "inference").items()


def pod_labels(docs, component):
    return one(docs, "Deployment", component)["spec"]["template"]["metadata"]["labels"]


def test_ingress_tls_and_sse_annotations(rendered):
    docs = rendered["ingress-tls"]
    ingress = one(docs, "Ingress")
    ann = ingress["metadata"]["annotations"]
    # streamed completions: no proxy buffering, long timeouts (per controller)
    assert ann["nginx.org/proxy-buffering"] == "False"
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert ann["nginx.org/proxy-read-timeout"] == "3600s" and ann["haproxy.org/timeout-server"] == "3600s"
    assert ann["cert-manager.io/cluster-issuer"] == "letsencrypt"
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["chat.example.com"], "secretName": "chat-example-com-tls"}]
    backend = spec["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one(docs, "Service", "inference")
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert service["spec"]["selector"].items() <= pod_labels(docs, "inference").items()
    no_sse = helmbin.template(files=("ci/ingress-tls-values.yaml",), sets=("inference.ingress.sseAnnotations=false",))
    assert set(one(no_sse, "Ingress")["metadata"]["annotations"]) == {"cert-manager.io/cluster-issuer"}


def test_httproute_has_a_long_request_timeout(rendered):
    docs = rendered["ingress-tls"]
    route = one(docs, "HTTPRoute")
    rule = route["spec"]["rules"][0]
    assert rule["timeouts"] == {"request": "1h"}
    assert rule["backendRefs"] == [{"name": one(docs, "Service", "inference")["metadata"]["name"], "port": 80}]
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]


def test_network_policies(rendered):
    docs = rendered["ingress-tls"]
    policies = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"inference", "operator", "run"}
    chat = policies["inference"]["spec"]
    assert chat["podSelector"]["matchLabels"].items() <= pod_labels(docs, "inference").items()
    assert chat["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]
    assert chat["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    # training pods: their own run's ranks on any port (rendezvous, NCCL), the rest on "metrics" only
    run = one(docs, "NanochatRun")
    stage_pod = stage_labels(run["metadata"]["name"], "base_train")
    stages = policies["run"]["spec"]
    assert stages["podSelector"]["matchLabels"].items() <= stage_pod.items()
    assert stages["ingress"][0] == {"from": [{"podSelector": {"matchLabels": stages["podSelector"]["matchLabels"]}}]}
    assert stages["ingress"][1]["ports"] == [{"port": "metrics", "protocol": "TCP"}]


# ----------------------------------------------------------------------------- MinIO

def test_minio_store(rendered):
    docs = rendered["minio"]
    run = one(docs, "NanochatRun")
    service = one(docs, "Service", "minio")
    secret = one(docs, "Secret", "minio")
    store = run["spec"]["store"]
    assert store["endpoint"] == f"http://{service['metadata']['name']}.{helmbin.NAMESPACE}.svc:9000"
    assert store["secretName"] == secret["metadata"]["name"] and store["uri"].startswith("s3://nanochat/runs/")
    assert secret["stringData"]["AWS_ACCESS_KEY_ID"] == secret["stringData"]["MINIO_ROOT_USER"] == "nanochat-admin"
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["storageClassName"] == "standard"
    job = one(docs, "Job")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == store["endpoint"] and env["BUCKET"]["value"] == "nanochat"
    # serving reads the same store with the same credentials
    chat_env = {e["name"]: e for e in one(docs, "Deployment", "inference")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert chat_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_minio_generates_credentials_when_none_are_given():
    docs = helmbin.template(sets=("minio.enabled=true",))
    secret = one(docs, "Secret", "minio")["stringData"]
    assert len(secret["MINIO_ROOT_PASSWORD"]) == 32 and secret["AWS_SECRET_ACCESS_KEY"] == secret["MINIO_ROOT_PASSWORD"]


def test_bucket_job_script_creates_the_bucket(rendered, moto_server, tmp_path):
    """The hook's embedded script, run against a real S3 endpoint (moto on 127.0.0.1): creates, then finds."""
    container = one(rendered["minio"], "Job")["spec"]["template"]["spec"]["containers"][0]
    script = container["command"][2]
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_server.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "BUCKET": f"nanochat-{tmp_path.name[-8:].lower()}"}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "created bucket" in first.stdout, first.stderr
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "exists" in second.stdout, second.stderr


# ----------------------------------------------------------------------------- helm test pod

class FakeChat(http.server.BaseHTTPRequestHandler):
    """Answers /readyz and /v1/models the way `nanochat serve` does (ready or loading, API key or not)."""
    ready, api_key = True, None

    def do_GET(self):
        if self.path == "/readyz":
            body, code = ({"status": "ready"}, 200) if self.ready else ({"status": "loading"}, 503)
        elif self.path == "/v1/models":
            if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
                body, code = {"error": {"message": "bad key"}}, 401
            else:
                body, code = {"object": "list", "data": [{"id": "nanochat-sft", "object": "model"}]}, 200
        else:
            body, code = {}, 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("ready,server_key,client_key,ok", [
    (True, None, None, True), (False, None, None, False), (True, "s3cret", "s3cret", True), (True, "s3cret", None, False)])
def test_helm_test_pod_checks_readyz_and_models(rendered, ready, server_key, client_key, ok):
    pod = one(rendered["defaults"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CHAT_URL"] == f"http://{one(rendered['defaults'], 'Service', 'inference')['metadata']['name']}.{helmbin.NAMESPACE}.svc:80"
    handler = type("Handler", (FakeChat,), {"ready": ready, "api_key": server_key})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run_env = {**os.environ, "CHAT_URL": f"http://127.0.0.1:{server.server_port}"}
        run_env.pop("NANOCHAT_API_KEY", None)
        if client_key:
            run_env["NANOCHAT_API_KEY"] = client_key
        proc = subprocess.run([sys.executable, "-c", container["command"][2]], env=run_env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    if ok:
        assert "serves nanochat-sft" in proc.stdout


# ----------------------------------------------------------------------------- commands and dashboard

def test_chart_commands_parse_with_the_real_clis(rendered):
    """What the chart runs is accepted by the real argument parsers (no flag the CLI does not know)."""
    from nanochat.serve import build_parser as serve_parser
    from operators.cli import build_parser as k8s_parser
    for name in ("defaults", "ingress-tls", "serve-only"):
        for obj, spec in pod_specs(rendered[name]):
            command = spec["containers"][0]["command"]
            if command[:2] == ["nanochat", "serve"]:
                args = serve_parser().parse_args(command[2:])
                assert args.host == "0.0.0.0" and args.store.startswith("s3://") and args.batch_rows == 8
            elif command[0] == "nanochat-k8s":
                args = k8s_parser().parse_args(command[1:])
                assert args.cmd == "operator" and args.metrics_port == 8080
            else:
                assert command[:2] == ["python", "-c"], f"{obj['kind']}/{obj['metadata']['name']}: {command}"
    chat = one(helmbin.template(sets=("inference.batchRows=16",)), "Deployment", "inference")["spec"]["template"]["spec"]
    assert serve_parser().parse_args(chat["containers"][0]["command"][2:]).batch_rows == 16  # continuous batching


def registry_metrics() -> dict[str, set[str]]:
    """Every sample name the stages, the operator and `nanochat serve` expose → its label names."""
    from prometheus_client import CollectorRegistry

    from nanochat.metrics import StageMetrics
    from nanochat.serve import Metrics as ServeMetrics
    from operators.metrics import OperatorMetrics
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "info": ("_info",)}
    out: dict[str, set[str]] = {}
    for registry in (StageMetrics("base_train").registry, OperatorMetrics(CollectorRegistry()).registry, ServeMetrics().registry):
        for collector in list(registry._collector_to_names):
            names = set(getattr(collector, "_labelnames", ()))
            for family in collector.describe():
                for suffix in suffixes[family.type]:
                    out[family.name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return out


def test_dashboard_queries_use_real_metrics(rendered):
    cm = one(rendered["defaults"], "ConfigMap", "monitoring")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["nanochat.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("progress", "loss", "tokens / s", "mfu", "time to first token"):
        assert topic in titles
    metrics = registry_metrics()
    target_labels = {"namespace", "pod", "nanochat_dev_run", "nanochat_dev_stage"}  # added by Prometheus / podTargetLabels
    used = 0
    for expr in exprs:
        for name, matchers in re.findall(r"\b(nanochat_[a-z_]+)(?:\{([^}]*)\})?", expr):
            assert name in metrics, f"{name} (in {expr}) is not a metric nanochat exposes"
            for label in re.findall(r"(\w+)\s*=~?", matchers or ""):
                assert label in metrics[name] | target_labels, f"{name} has no label {label}"
            used += 1
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert any(label in labels for labels in metrics.values()) or label in target_labels, label
    assert used >= 15
    assert "nanochat_stage_metric" in " ".join(exprs) and 'name="mfu"' in " ".join(exprs)


def notes(*files: str) -> str:
    """NOTES.txt as `helm install` prints it (client-side dry run: no cluster, so no PyTorchJob API either)."""
    args = ["install", "speedrun", str(helmbin.CHART), "--namespace", helmbin.NAMESPACE, "--dry-run=client"]
    args += [a for f in files for a in ("-f", str(helmbin.CHART / f))]
    out = helmbin.helm(*args).stdout
    return out[out.index("NOTES:"):]


def test_notes_tell_how_to_watch_the_run_and_reach_the_chat(rendered):
    text = notes("ci/ingress-tls-values.yaml")
    run = one(rendered["ingress-tls"], "NanochatRun")["metadata"]["name"]
    assert run == "speedrun"  # the release name
    ns = helmbin.NAMESPACE
    assert f"kubectl -n {ns} get nanochatrun {run} -w" in text
    assert f"get configmap {children.report_configmap_name(run)} " in text
    assert f"port-forward svc/{children.serving_name(run)} 8000:80" in text
    assert "https://chat.example.com/" in text and "helm test speedrun" in text
    assert "Authorization: Bearer" in text  # the API key is on
    assert "no kubeflow.org/v1 PyTorchJob API" in text
    assert "port-forward" not in notes("ci/serving-off-values.yaml")


def test_old_kubernetes_is_refused():
    proc = helmbin.helm(*helmbin.template_args(kube_version="1.29.0"), check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr, proc.stderr



def test_image_pull_secrets_reach_the_run_and_its_pods():
    from operators.pytorchjob import render_run
    docs = helmbin.template(sets=("imagePullSecrets[0].name=regcred",))
    run = one(docs, "NanochatRun")
    assert run["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for _, job in render_run(run):  # the operator copies them into every training pod
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            assert replica["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
