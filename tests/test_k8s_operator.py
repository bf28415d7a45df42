"""The kopf operator end to end against an in-memory Kubernetes API (kmock) on 127.0.0.1.

No cluster here: kmock serves create/get/list/patch/delete/watch over real HTTP, the operator talks
to it with the official client (and kopf with its own), and a fake "training operator" thread in
this test moves PyTorchJobs through Created → Running → Succeeded/Failed by running each job's
container command as a local process (torchrun → python -m, one process), so the stages write their
real done.json markers into a file:// store. kmock's quirks shape the setup: it assigns no
resourceVersion/uid/generation (the test sets them, as the API server would), ignores label
selectors (the operator filters again) and cannot list namespaces (kopf's scanning is off).
"""
from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import kmock
import kopf
import pytest
from kubernetes import client as k8s

from nanochat.config import config_hash, parse_config
from nanochat.pipeline import Step
from nanochat.report import Report
from nanochat.store import open_store
from operators import crd, validate
from operators.children import rfc3339
from operators.metrics import OperatorMetrics
from operators.operator import Operator, expected_hashes
from operators.pytorchjob import plan_steps

ECHO = "tests.fake_stages.echo"
NS = "default"
RESOURCES = {
    "nanochat.dev/v1alpha1/nanochatruns": dict(kind="NanochatRun", namespaced=True, subresources={"status"}),
    "kubeflow.org/v1/pytorchjobs": dict(kind="PyTorchJob", namespaced=True, subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True),
    "networking.k8s.io/v1/ingresses": dict(kind="Ingress", namespaced=True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


class MockAPI:
    """kmock's Kubernetes emulator on its own event loop in a thread."""

    def __init__(self):
        self.ready = threading.Event()
        self.url = None
        self.resources = RESOURCES

    def __enter__(self):
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "kmock did not start"
        return self

    async def _serve(self):
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for res, info in self.resources.items():
                emulator.resources[res] = kmock.ResourceInfo(verbs=VERBS, **info)
            self.url = str(server.url).rstrip("/")
            self.ready.set()
            await self.stop.wait()

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def api_client(self) -> k8s.ApiClient:
        return k8s.ApiClient(k8s.Configuration(host=self.url))


class FakeTrainingOperator:
    """Plays the Kubeflow training operator: moves each PyTorchJob Created → Running → Succeeded/Failed.

    `processes=True` runs the job's container command (`torchrun --nproc-per-node=1 -m MOD ARGS` →
    `python -m MOD ARGS`) for real. Otherwise the job "runs" here: the stage's config is parsed
    with its own parser and done.json is written with the hash the stage would record (quick on a
    2-core box); jobs named in `fail` exit 1 instead.
    """

    def __init__(self, api: MockAPI, processes: bool = False, fail: tuple[str, ...] = (), hold: tuple[str, ...] = ()):
        self.custom = k8s.CustomObjectsApi(api.api_client())
        self.processes, self.fail, self.hold = processes, set(fail), set(hold)  # hold: keep these jobs Running
        self.procs: dict[str, subprocess.Popen] = {}
        self.launches: dict[str, int] = {}
        self.seen: dict[str, dict] = {}
        self.stop = threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        for p in self.procs.values():
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    def _set(self, name: str, *conditions):
        now = rfc3339(time.time())
        conds = [{"type": t, "status": s, "reason": t, "message": m, "lastTransitionTime": now} for t, s, m in conditions]
        self.custom.patch_namespaced_custom_object_status("kubeflow.org", "v1", NS, "pytorchjobs", name, {"status": {"conditions": conds}})

    def _loop(self):
        while not self.stop.wait(0.1):
            jobs = {j["metadata"]["name"]: j for j in self.custom.list_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs")["items"]}
            for name, job in jobs.items():
                if name not in self.seen:
                    self.seen[name] = job
                    self.launches[name] = self.launches.get(name, 0) + 1
                    self._set(name, ("Created", "True", ""))
                    self.procs[name] = self._launch(job) if self.processes else None
                    self._set(name, ("Created", "True", ""), ("Running", "True", ""))
                elif "finished" not in job.get("status", {}) and name not in self.hold:
                    code = self.procs[name].poll() if self.processes else self._run_inline(name, job)
                    if code is None:
                        continue
                    final = ("Succeeded", "True", "") if code == 0 else ("Failed", "True", f"pytorch exited with code {code}")
                    self._set(name, ("Created", "True", ""), ("Running", "False", ""), final)
                    self.custom.patch_namespaced_custom_object_status("kubeflow.org", "v1", NS, "pytorchjobs", name, {"status": {"finished": True}})
            for name, p in self.procs.items():  # deleted jobs: their pods go away
                if name not in jobs and p is not None and p.poll() is None:
                    p.kill()

    @staticmethod
    def _container(job) -> dict:
        c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["torchrun"] and c["args"][0] == "--nproc-per-node=1" and c["args"][1] == "-m"
        return c

    def _launch(self, job) -> subprocess.Popen:
        c = self._container(job)
        env = dict(os.environ)
        # pods have their own network namespace; these processes share one, so no fixed metrics port
        env.update({e["name"]: e["value"] for e in c["env"] if "value" in e and e["name"] != "NANOCHAT_METRICS_PORT"})
        return subprocess.Popen([sys.executable, *c["args"][1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _run_inline(self, name: str, job) -> int:
        c = self._container(job)
        module = importlib.import_module(c["args"][2])
        cfg = parse_config(module.Config, c["args"][3:], module.STAGE, env={})
        if name in self.fail:
            return 1
        instance, store = cfg.instance_name(module.STAGE), open_store(cfg.store)
        Report(store).log(f"Echo {instance}", {"value": cfg.value, "job": name}, name=instance)
        now = time.time()
        store.put_json(f"stages/{instance}/done.json", {
            "stage": module.STAGE, "name": instance, "config_hash": config_hash(cfg), "metrics": {"value": cfg.value, "final_loss": 0.5},
            "card": {"column": "BASE", "values": {"score": cfg.value / 10}}, "started": now - 2, "ended": now, "duration_s": 2.0})
        return 0


class RunningOperator:
    def __init__(self, api: MockAPI, steps, interval=0.3, metrics=None, liveness_endpoint=None):
        conn = kopf.ConnectionInfo(server=api.url, insecure=True, default_namespace=NS)
        self.op = Operator(api.api_client(), namespaces=[NS], interval=interval, connection=conn, scanning=False,
                           steps_fn=lambda spec: plan_steps(spec, steps), metrics=metrics)
        self.stop, self.ready = threading.Event(), threading.Event()
        self.liveness_endpoint = liveness_endpoint

    def __enter__(self):
        self.thread = threading.Thread(target=self.op.run, daemon=True, kwargs=dict(
            stop_flag=self.stop, ready_flag=self.ready, liveness_endpoint=self.liveness_endpoint))
        self.thread.start()
        assert self.ready.wait(20), "kopf did not start"
        return self.op

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "kopf did not stop"


def create_run(api: MockAPI, name: str, spec: dict, check: bool = True) -> dict:
    body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "1", "generation": 1,
                         "creationTimestamp": rfc3339(time.time())},
            "spec": spec}
    if check:  # (a run meant to be invalid skips it: the operator must reject it on its own)
        assert validate.nanochatrun_errors(body, stages=False) == []
    k8s.CustomObjectsApi(api.api_client()).create_namespaced_custom_object(crd.GROUP, crd.VERSION, NS, crd.PLURAL, body)
    return body


def get_run(api: MockAPI, name: str) -> dict | None:
    try:
        return k8s.CustomObjectsApi(api.api_client()).get_namespaced_custom_object(crd.GROUP, crd.VERSION, NS, crd.PLURAL, name)
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_for(what: str, fn, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def list_jobs(api: MockAPI) -> dict[str, dict]:
    items = k8s.CustomObjectsApi(api.api_client()).list_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs")["items"]
    return {j["metadata"]["name"]: j for j in items}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api():
    with MockAPI() as api:
        yield api


def test_run_reaches_succeeded_with_retry_report_and_serving(api, tmp_path):
    store_uri = f"file://{tmp_path / 'store'}"
    store = open_store(store_uri)
    store.put_json("checkpoints/chat_sft/000005/meta.json", {"step": 5})  # the model serving should roll to
    steps = [Step("a", ECHO, args=("--label=a", "--value=3")),
             Step("b", ECHO, args=("--label=b",), depends_on=("a",)),
             Step("chat_sft", ECHO, args=("--label=sft",), depends_on=("b",))]
    spec = {"profile": "tiny", "image": "nanochat:test", "store": {"uri": store_uri}, "imagePullSecrets": [{"name": "regcred"}],
            "retries": {"limit": 2, "backoffSeconds": 1}, "serving": {"enabled": True, "ingressHost": "chat.test"}}
    metrics = OperatorMetrics()
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    try:
        with FakeTrainingOperator(api, fail=("demo-b-a1",)) as trainer, RunningOperator(api, steps, metrics=metrics):
            create_run(api, "demo", spec)
            run = wait_for("phase Succeeded", lambda: (r := get_run(api, "demo")) and r.get("status", {}).get("phase") == "Succeeded" and r)
            st = run["status"]
            rows = {r["name"]: r for r in st["stages"]}
            assert [r["name"] for r in st["stages"]] == ["a", "b", "chat_sft"]
            assert all(r["state"] == "Succeeded" for r in rows.values()) and st["progress"] == "3/3"
            assert rows["a"]["attempts"] == 1 and rows["a"]["metrics"]["value"] == 3
            assert rows["b"]["attempts"] == 2 and rows["b"]["failures"] == 1 and rows["b"]["jobName"] == "demo-b-a2"
            assert {c["type"]: c["status"] for c in st["conditions"]} == {"Running": "False", "Succeeded": "True", "Failed": "False"}
            assert st["observedGeneration"] == 1 and st["report"]["configMap"] == "demo-report"

            jobs = list_jobs(api)
            assert sorted(jobs) == ["demo-a-a1", "demo-b-a1", "demo-b-a2", "demo-chat-sft-a1"]
            assert all(n == 1 for n in trainer.launches.values())
            for job in trainer.seen.values():  # exactly what the operator created
                assert validate.pytorchjob_errors({k: v for k, v in job.items() if k != "status"}) == []
                pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
                assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["securityContext"]["runAsNonRoot"] is True

            core = k8s.CoreV1Api(api.api_client())
            cm = core.read_namespaced_config_map("demo-report", NS)
            assert "# nanochat report card" in cm.data["report.md"] and "Echo echo_b" in cm.data["report.md"]
            assert store.exists("report/report.md")
            assert validate.builtin_errors(api.api_client().sanitize_for_serialization(cm) | {"apiVersion": "v1", "kind": "ConfigMap"}) == []
            dep = k8s.AppsV1Api(api.api_client()).read_namespaced_deployment("demo-chat", NS)
            assert dep.spec.template.metadata.annotations["nanochat.dev/checkpoint"] == "chat_sft/000005"
            assert [s.name for s in dep.spec.template.spec.image_pull_secrets] == ["regcred"]
            assert dep.spec.template.spec.containers[0].readiness_probe.http_get.path == "/readyz"
            assert k8s.NetworkingV1Api(api.api_client()).read_namespaced_ingress("demo-chat", NS).spec.rules[0].host == "chat.test"

            events = core.list_namespaced_event(NS).items
            reasons = [e.reason for e in events]
            for reason in ("JobCreated", "StageRetrying", "StageSucceeded", "ReportWritten", "ServingRolled", "RunSucceeded"):
                assert reason in reasons, reasons
            assert reasons.count("RunSucceeded") == 1 and reasons.count("JobCreated") == 4

            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert 'nanochat_operator_runs{phase="Succeeded"} 1.0' in text
            assert 'nanochat_operator_stage_failures{namespace="default",run="demo",stage="b"} 1.0' in text
            assert 'nanochat_operator_stage_metric{name="value",namespace="default",run="demo",stage="a"} 3.0' in text
            assert 'nanochat_operator_stage_state{namespace="default",run="demo",stage="chat_sft",state="Succeeded"} 1.0' in text

            # deleting the run: the finalizer removes its jobs, then the run goes
            k8s.CustomObjectsApi(api.api_client()).delete_namespaced_custom_object(crd.GROUP, crd.VERSION, NS, crd.PLURAL, "demo")
            wait_for("run deleted", lambda: get_run(api, "demo") is None, timeout=30)
            assert list_jobs(api) == {}
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert 'nanochat_operator_runs{phase="Succeeded"} 0.0' in text and 'run="demo"' not in text
    finally:
        metrics.close()


def test_restarted_operator_adopts_running_job_without_duplicates(api, tmp_path):
    store_uri = f"file://{tmp_path / 'store'}"
    steps = [Step("slow", ECHO, args=("--label=slow",)), Step("after", ECHO, args=("--label=after",), depends_on=("slow",))]
    spec = {"profile": "tiny", "image": "nanochat:test", "store": {"uri": store_uri}}
    with FakeTrainingOperator(api, hold=("rs-slow-a1",)) as trainer:
        with RunningOperator(api, steps):
            create_run(api, "rs", spec)
            wait_for("slow running", lambda: any(r.get("state") == "Running" for r in (get_run(api, "rs").get("status") or {}).get("stages", [])))
        # the operator is gone mid-stage; the job keeps running. A new operator (no shared state) takes over.
        with RunningOperator(api, steps):
            time.sleep(1.0)  # a few reconcile passes while the job still runs
            assert sorted(list_jobs(api)) == ["rs-slow-a1"]
            trainer.hold.clear()
            run = wait_for("phase Succeeded", lambda: (r := get_run(api, "rs")) and r.get("status", {}).get("phase") == "Succeeded" and r)
        assert sorted(list_jobs(api)) == ["rs-after-a1", "rs-slow-a1"]
        assert trainer.launches == {"rs-slow-a1": 1, "rs-after-a1": 1}
        assert {r["name"]: r["attempts"] for r in run["status"]["stages"]} == {"slow": 1, "after": 1}


def test_job_container_command_runs_the_stage_for_real(api, tmp_path):
    """The training-operator stand-in executes the rendered container command; the real stage writes done.json."""
    store_uri = f"file://{tmp_path / 'store'}"
    steps = [Step("e", ECHO, args=("--label=e", "--value=5", "--steps=2"))]
    spec = {"profile": "tiny", "image": "nanochat:test", "store": {"uri": store_uri}}
    with FakeTrainingOperator(api, processes=True), RunningOperator(api, steps):
        create_run(api, "real", spec)
        run = wait_for("phase Succeeded", lambda: (r := get_run(api, "real")) and r.get("status", {}).get("phase") in ("Succeeded", "Failed") and r)
    assert run["status"]["phase"] == "Succeeded", run["status"]
    store = open_store(store_uri)
    assert store.get_bytes("outputs/echo_e.txt") == b"5"
    assert run["status"]["stages"][0]["metrics"]["value"] == 5
    assert "Echo echo_e" in store.get_bytes("report/report.md").decode()


def test_invalid_override_fails_the_run_before_any_job(api, tmp_path):
    steps = [Step("a", ECHO, args=("--label=a",))]
    spec = {"profile": "tiny", "image": "nanochat:test", "store": {"uri": f"file://{tmp_path / 'store'}"}, "overrides": ["bogus_flag=1"]}
    with RunningOperator(api, steps):
        create_run(api, "bad", spec, check=False)
        run = wait_for("phase Failed", lambda: (r := get_run(api, "bad")) and r.get("status", {}).get("phase") == "Failed" and r)
    assert "bogus" in run["status"]["message"] and list_jobs(api) == {}


def test_override_with_a_bad_value_fails_the_run_naming_the_override(api, tmp_path):
    """The stage's own parser checks every override up front (as `nanochat speedrun` does): the Failed
    condition names the override and the stage's error, and no job is created to fail on the cluster."""
    steps = [Step("a", ECHO, args=("--label=a",)), Step("b", ECHO, args=("--label=b",), depends_on=("a",))]
    spec = {"profile": "tiny", "image": "nanochat:test", "store": {"uri": f"file://{tmp_path / 'store'}"},
            "overrides": ["seed=3", f"{ECHO}.value=abc"]}
    with RunningOperator(api, steps):
        create_run(api, "badval", spec, check=False)
        run = wait_for("phase Failed", lambda: (r := get_run(api, "badval")) and r.get("status", {}).get("phase") == "Failed" and r)
    want = f"spec.overrides[1] '{ECHO}.value=abc': stage a: --value: expected an integer, got 'abc'"
    assert run["status"]["message"] == want
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["message"] == want
    assert list_jobs(api) == {}


def test_observe_reads_markers_from_s3_with_the_runs_secret(api, moto_server, monkeypatch):
    """The operator's own env has no S3 settings: endpoint and credentials come from the run's spec and Secret."""
    import base64

    import boto3
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    creds = {"AWS_ACCESS_KEY_ID": "op-key", "AWS_SECRET_ACCESS_KEY": "op-secret"}
    s3 = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1",
                      aws_access_key_id="op-key", aws_secret_access_key="op-secret")
    s3.create_bucket(Bucket="runs-k8s")
    k8s.CoreV1Api(api.api_client()).create_namespaced_secret(NS, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3creds", "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in creds.items()}})
    steps = [Step("a", ECHO, args=("--label=a",))]
    spec = {"profile": "tiny", "image": "nanochat:test",
            "store": {"uri": "s3://runs-k8s/r1", "endpoint": moto_server.url, "secretName": "s3creds"}}
    body = create_run(api, "s3run", spec)
    op = Operator(api.api_client(), namespaces=[NS], steps_fn=lambda s: plan_steps(s, steps))
    (_, expected_hash), = expected_hashes(crd.apply_defaults(spec), plan_steps(spec, steps)).values()
    s3.put_object(Bucket="runs-k8s", Key="r1/stages/echo_a/done.json",
                  Body=json.dumps({"config_hash": expected_hash, "metrics": {"value": 1}}).encode())
    found_steps, obs, store = op.observe(body)
    assert [s.name for s in found_steps] == ["a"] and obs.error is None
    assert obs.done["a"]["config_hash"] == expected_hash == obs.hashes["a"]
    assert store.root == "s3://runs-k8s/r1" and obs.report_header is False


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _try(fn, *args):
    try:
        return fn(*args)
    except OSError:
        return None


def test_liveness_and_readiness_endpoints(api, tmp_path):
    """/healthz: kopf's liveness endpoint on a real port; /readyz on the metrics port: connected and watching."""
    steps = [Step("a", ECHO, args=("--label=a",))]
    health_port, metrics_port = free_port(), free_port()
    metrics = OperatorMetrics()
    running = RunningOperator(api, steps, metrics=metrics, liveness_endpoint=f"http://127.0.0.1:{health_port}/healthz")
    op = running.op
    metrics.serve(metrics_port, addr="127.0.0.1", readiness=op.readiness)
    try:
        status, body = http_get(f"http://127.0.0.1:{metrics_port}/readyz")
        assert status == 503 and "kopf has not started" in body
        with running:
            assert http_get(f"http://127.0.0.1:{metrics_port}/readyz") == (200, "ok\n")
            # kopf starts its health server right after it reports ready (the startupProbe covers the gap);
            # it answers from kopf's loop with the last readiness result (no API call: liveness must not hang)
            status, body = wait_for("/healthz", lambda: _try(http_get, f"http://127.0.0.1:{health_port}/healthz"), timeout=20)
            assert status == 200 and json.loads(body) == {"ready": "ok"}
            assert "nanochat_operator_reconciles" in http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
        assert op.readiness() is not None  # stopped: not ready any more
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5)
    finally:
        metrics.close()


def test_readiness_reports_why_it_is_not_ready(api):
    # the API server answers but does not serve the CRD (not installed): 404 on the list
    no_crd = MockAPI()
    no_crd.resources = {k: v for k, v in RESOURCES.items() if "nanochatruns" not in k}
    with no_crd:
        op = Operator(no_crd.api_client(), namespaces=[NS])
        op.started.set()  # as if kopf were running
        reason = op.readiness()
        assert reason.startswith("cannot list nanochatruns in namespace default: 404"), reason
    # nothing listens on the API server's address
    op = Operator(k8s.ApiClient(k8s.Configuration(host=f"http://127.0.0.1:{free_port()}")), namespaces=["ml", "dev"])
    op.started.set()
    assert "API server unreachable listing nanochatruns in namespace ml" in op.readiness()
    # reachable, CRD served, every watched namespace listable
    op = Operator(api.api_client(), namespaces=[NS, "other"])
    op.started.set()
    assert op.readiness() is None


def test_nanochat_env_reaches_the_stage_and_the_run_settles(api, tmp_path):
    """spec.env NANOCHAT_VALUE=7 is the echo stage's --value below its flags: the pod uses it, and the operator's
    expected config hash includes it too, so the done marker matches and the stage runs once, not in a loop."""
    store_uri = f"file://{tmp_path / 'store'}"
    steps = [Step("e", ECHO, args=("--label=e", "--steps=2"))]
    spec = {"profile": "tiny", "image": "nanochat:test", "store": {"uri": store_uri},
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NANOCHAT_VALUE", "value": "7"}]}
    with FakeTrainingOperator(api, processes=True) as trainer, RunningOperator(api, steps):
        create_run(api, "envrun", spec)
        run = wait_for("phase Succeeded", lambda: (r := get_run(api, "envrun")) and r.get("status", {}).get("phase") in ("Succeeded", "Failed") and r)
        assert run["status"]["phase"] == "Succeeded", run["status"]
        time.sleep(1.0)  # a few more reconcile passes: nothing re-runs
        assert trainer.launches == {"envrun-e-a1": 1} and sorted(list_jobs(api)) == ["envrun-e-a1"]
    assert open_store(store_uri).get_bytes("outputs/echo_e.txt") == b"7"
    assert get_run(api, "envrun")["status"]["phase"] == "Succeeded"
