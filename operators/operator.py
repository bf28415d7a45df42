"""The NanochatRun operator: kopf handlers around the pure `operators.reconcile`.

Every `interval` seconds, per NanochatRun, a kopf timer runs one pass: observe (GET the run, list
its PyTorchJobs, read done.json markers from the store, GET the report ConfigMap and the serving
Deployment), `reconcile(...)` → actions, execute them (create/delete jobs, write the report, roll
serving, patch status, post Events). The `on.delete` handler (kopf's finalizer) deletes the run's
jobs and keeps the run until they are gone. Nothing is remembered between passes.

Run it with `nanochat-k8s operator` (in the cluster: the Helm chart's Deployment) or embed it:
`Operator(api_client).run(stop_flag=..., ready_flag=...)`.

Probes: /healthz is kopf's liveness endpoint (served from kopf's event loop once it has logged in,
so an answer means the loop is alive); /readyz on the metrics port means connected and watching:
kopf has started and the API server lists NanochatRuns in every watched namespace.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time

import kopf
from kubernetes import client as k8s

from nanochat.pipeline import Step
from nanochat.report import Report, load_done_markers

from operators import children, crd, validate
from operators.metrics import OperatorMetrics
from operators.pytorchjob import LABEL_RUN, SpecError, plan_steps, stage_configs
from operators.reconcile import (CreateJob, DeleteJob, Event, InitReport, Observed, PatchStatus, RollServing, WriteReport,
                                 final_model_stage, finalize, reconcile)

log = logging.getLogger("nanochat.operator")
DEFAULT_INTERVAL_S = 10.0
READY_CACHE_S = 5.0     # probes come every few seconds: one LIST per this long at most
READY_TIMEOUT_S = 5.0
JOB_GROUP, JOB_VERSION, JOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
RUNS = (crd.GROUP, crd.VERSION, crd.PLURAL)  # kopf selector order; the client takes (group, version, namespace, plural)
MERGE = "application/merge-patch+json"


# ----------------------------------------------------------------------------- cluster access

class Cluster:
    """The few API calls the operator makes, on the official kubernetes client; returns plain dicts."""

    def __init__(self, api_client: k8s.ApiClient):
        self.api_client = api_client
        self.custom = k8s.CustomObjectsApi(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.net = k8s.NetworkingV1Api(api_client)

    def _dict(self, obj) -> dict | None:
        return None if obj is None else self.api_client.sanitize_for_serialization(obj)

    def get_run(self, namespace: str, name: str) -> dict | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(crd.GROUP, crd.VERSION, namespace, crd.PLURAL, name))

    def list_jobs(self, namespace: str, run: dict) -> list[dict]:
        name, uid = run["metadata"]["name"], run["metadata"].get("uid")
        items = self.custom.list_namespaced_custom_object(JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL,
                                                          label_selector=f"{LABEL_RUN}={name}")["items"]
        out = []
        for j in items:  # the label selector is also checked here: some API servers (and mocks) ignore it
            meta = j.get("metadata") or {}
            owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
            if (meta.get("labels") or {}).get(LABEL_RUN) == name and (not uid or uid in owners):
                out.append(j)
        return out

    def create(self, obj: dict) -> bool:
        """Create; False when it already exists (409: adopt it, never a duplicate)."""
        ns = obj["metadata"].get("namespace") or "default"
        kind = obj["kind"]
        calls = {
            "PyTorchJob": lambda: self.custom.create_namespaced_custom_object(JOB_GROUP, JOB_VERSION, ns, JOB_PLURAL, obj),
            "ConfigMap": lambda: self.core.create_namespaced_config_map(ns, obj),
            "Event": lambda: self.core.create_namespaced_event(ns, obj),
            "Service": lambda: self.core.create_namespaced_service(ns, obj),
            "Deployment": lambda: self.apps.create_namespaced_deployment(ns, obj),
            "Ingress": lambda: self.net.create_namespaced_ingress(ns, obj),
        }
        try:
            calls[kind]()
            return True
        except k8s.ApiException as e:
            if e.status == 409:
                return False
            raise

    def delete_job(self, namespace: str, name: str):
        _or_none(lambda: self.custom.delete_namespaced_custom_object(JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name,
                                                                     propagation_policy="Background"))

    def patch_run_status(self, namespace: str, name: str, status: dict):
        self.custom.patch_namespaced_custom_object_status(crd.GROUP, crd.VERSION, namespace, crd.PLURAL, name, {"status": status})

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        return self._dict(_or_none(lambda: self.core.read_namespaced_config_map(name, namespace)))

    def patch_configmap(self, namespace: str, name: str, patch: dict):
        self.core.patch_namespaced_config_map(name, namespace, patch, _content_type=MERGE)

    def get_deployment(self, namespace: str, name: str) -> dict | None:
        return self._dict(_or_none(lambda: self.apps.read_namespaced_deployment(name, namespace)))

    def patch_deployment(self, namespace: str, name: str, patch: dict):
        self.apps.patch_namespaced_deployment(name, namespace, patch, _content_type=MERGE)

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        import base64
        secret = self._dict(_or_none(lambda: self.core.read_namespaced_secret(name, namespace)))
        if secret is None:
            raise SpecError(f"spec.store.secretName: Secret {namespace}/{name} not found")
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def _or_none(call):
    try:
        return call()
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise


def default_api_client() -> k8s.ApiClient:
    """In-cluster service account, else the local kubeconfig."""
    from kubernetes import config
    cfg = k8s.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    return k8s.ApiClient(cfg)


# ----------------------------------------------------------------------------- store access

def open_run_store(spec: dict, secret: dict[str, str] | None):
    """The run's store, with the endpoint and credentials of the spec (not the operator's own env)."""
    from nanochat.store import S3Store, open_store
    store = open_store(spec["store"]["uri"])
    if isinstance(store, S3Store) and (spec["store"].get("endpoint") or secret):
        import boto3
        from botocore.config import Config
        s = spec["store"]
        secret = secret or {}
        store.endpoint = s.get("endpoint") or store.endpoint
        store.region = s.get("region") or store.region
        store.s3 = boto3.client(
            "s3", endpoint_url=store.endpoint, region_name=store.region,
            aws_access_key_id=secret.get(s.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
            aws_secret_access_key=secret.get(s.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")),
            aws_session_token=secret.get("AWS_SESSION_TOKEN"),
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                          s3={"addressing_style": "path"} if store.endpoint else None))
    return store


def latest_checkpoint(store, steps: list[Step]) -> str | None:
    """`<stage>/<step>` of the newest complete checkpoint (meta.json present) of the final model."""
    for stage in final_model_stage(steps):
        found = []
        for key in store.list(f"checkpoints/{stage}/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "meta.json":
                found.append(parts[2])
        if found:
            return f"{stage}/{max(found, key=lambda s: (s.isdigit(), int(s) if s.isdigit() else 0, s))}"
    return None


@functools.lru_cache(maxsize=256)
def _expected(spec_json: str, steps: tuple[Step, ...]) -> tuple[tuple[str, str, str], ...]:
    return tuple((step.name, name, h) for step, name, h in stage_configs(json.loads(spec_json), list(steps)))


def expected_hashes(spec: dict, steps: list[Step]) -> dict[str, tuple[str, str]]:
    """step → (instance name, config hash), computed by the stages' own config parser (so a bad
    override fails the run before any job starts, with the stage's one-line error)."""
    return {step: (name, h) for step, name, h in _expected(json.dumps(spec, sort_keys=True), tuple(steps))}


# ----------------------------------------------------------------------------- the operator

class Operator:
    def __init__(self, api_client: k8s.ApiClient | None = None, *, namespaces: list[str] | None = None,
                 interval: float = DEFAULT_INTERVAL_S, metrics: OperatorMetrics | None = None,
                 steps_fn=None, connection: kopf.ConnectionInfo | None = None, clock=time.time,
                 scanning: bool = True):
        self.api_client = api_client or default_api_client()
        self.cluster = Cluster(self.api_client)
        self.namespaces = list(namespaces or [])
        self.interval = interval
        self.metrics = metrics or OperatorMetrics()
        self.steps_fn = steps_fn or plan_steps   # tests run their own stage modules
        self.connection = connection
        self.clock = clock
        self.scanning = scanning  # kopf's CRD/namespace scanning (off where the API server cannot list namespaces)
        self.started = threading.Event()  # kopf has logged in and runs its watchers
        self._ready_lock = threading.Lock()
        self._ready_at, self._ready_reason = -READY_CACHE_S, "not checked yet"

    # --- probes
    def readiness(self) -> str | None:
        """None when ready (connected and watching), else why not. Cached for READY_CACHE_S."""
        if not self.started.is_set():
            return "kopf has not started (logging in, or stopped)"
        with self._ready_lock:
            if time.monotonic() - self._ready_at >= READY_CACHE_S:
                self._ready_reason, self._ready_at = self._check_api(), time.monotonic()
            return self._ready_reason

    def _check_api(self) -> str | None:
        """One LIST per watched namespace: the API server answers, the CRD is served and RBAC lets us list it."""
        custom = self.cluster.custom
        for ns in self.namespaces or [None]:
            where = f"namespace {ns}" if ns else "all namespaces"
            try:
                if ns:
                    custom.list_namespaced_custom_object(crd.GROUP, crd.VERSION, ns, crd.PLURAL, limit=1,
                                                         _request_timeout=READY_TIMEOUT_S)
                else:
                    custom.list_cluster_custom_object(crd.GROUP, crd.VERSION, crd.PLURAL, limit=1, _request_timeout=READY_TIMEOUT_S)
            except k8s.ApiException as e:
                return f"cannot list {crd.PLURAL} in {where}: {e.status} {e.reason}"
            except Exception as e:  # connection refused, timeout, TLS
                return f"API server unreachable listing {crd.PLURAL} in {where}: {type(e).__name__}: {e}"
        return None

    # --- one pass
    def observe(self, run: dict) -> tuple[list[Step], Observed, object]:
        meta, spec = run["metadata"], crd.apply_defaults(run.get("spec"))
        ns = meta.get("namespace") or "default"
        jobs = self.cluster.list_jobs(ns, run)
        try:  # a spec that cannot run (unknown step, bad override, missing Secret) fails the run until it is fixed
            steps = self.steps_fn(spec)
            expected = expected_hashes(spec, steps)
            secret = self.cluster.read_secret(ns, spec["store"]["secretName"]) if spec["store"].get("secretName") else None
        except SpecError as e:
            return [], Observed(jobs=jobs, error=str(e)), None
        store = open_run_store(spec, secret)
        markers = load_done_markers(store)
        done = {step: markers[name] for step, (name, _) in expected.items() if name in markers}
        obs = Observed(jobs=jobs, done=done, hashes={step: h for step, (_, h) in expected.items()},
                       report=self.cluster.get_configmap(ns, children.report_configmap_name(meta["name"])),
                       report_header=store.exists("report/header.json"))
        if spec["serving"]["enabled"] and len(done) == len(steps):
            obs.deployment = self.cluster.get_deployment(ns, children.serving_name(meta["name"]))
            obs.checkpoint = latest_checkpoint(store, steps)
        return steps, obs, store

    def reconcile_once(self, namespace: str, name: str) -> list:
        """Observe, decide, act; returns the actions taken."""
        run = self.cluster.get_run(namespace, name)
        if run is None:
            self.metrics.forget(namespace, name)
            return []
        try:
            steps, obs, store = self.observe(run)
            actions = reconcile(run, steps, obs, self.clock())
            self.execute(run, actions, store)
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            raise
        self.metrics.reconciles.labels("ok").inc()
        status = next((a.status for a in actions if isinstance(a, PatchStatus)), run.get("status") or {})
        self.metrics.observe(namespace, name, status, obs.done)
        return actions

    def execute(self, run: dict, actions: list, store):
        """Apply actions: jobs first, then report and serving, then the status, then the events about it."""
        meta = run["metadata"]
        ns = meta.get("namespace") or "default"
        order = (InitReport, DeleteJob, CreateJob, WriteReport, RollServing, PatchStatus, Event)
        for i, action in sorted(enumerate(actions), key=lambda ia: (order.index(type(ia[1])), ia[0])):
            if isinstance(action, InitReport):
                Report(store).reset(extra=action.extra)
            elif isinstance(action, DeleteJob):
                log.info("%s/%s: deleting job %s (%s)", ns, meta["name"], action.name, action.reason)
                self.cluster.delete_job(ns, action.name)
            elif isinstance(action, CreateJob):
                validate.check_pytorchjob(action.job, strict=False)
                if self.cluster.create(action.job):
                    self.metrics.jobs_created.inc()
                    log.info("%s/%s: created job %s", ns, meta["name"], action.name)
                else:
                    log.info("%s/%s: job %s already exists; adopting it", ns, meta["name"], action.name)
            elif isinstance(action, WriteReport):
                self.write_report(run, store, action)
            elif isinstance(action, RollServing):
                self.roll_serving(ns, action)
            elif isinstance(action, PatchStatus):
                self.cluster.patch_run_status(ns, meta["name"], action.status)
            elif isinstance(action, Event):
                try:
                    self.cluster.create(children.event(run, action.type, action.reason, action.message, self.clock(), i))
                except k8s.ApiException as e:  # events are best effort
                    log.warning("could not post event %s: %s", action.reason, e.reason)

    def write_report(self, run: dict, store, action: WriteReport):
        text = Report(store).generate(stage_order=list(action.stage_order))
        cm = children.report_configmap(run, text, action.digest, store.uri("report/report.md"))
        if not self.cluster.create(cm):
            self.cluster.patch_configmap(cm["metadata"]["namespace"], cm["metadata"]["name"],
                                         {"metadata": {"annotations": cm["metadata"]["annotations"]}, "data": cm["data"]})

    def roll_serving(self, ns: str, action: RollServing):
        for obj in action.objects:
            if not self.cluster.create(obj) and obj["kind"] == "Deployment":
                patch = children.roll_patch(action.checkpoint)
                patch["spec"]["replicas"] = obj["spec"]["replicas"]
                self.cluster.patch_deployment(ns, obj["metadata"]["name"], patch)

    def finalize_once(self, namespace: str, name: str) -> int:
        """Delete the run's jobs; returns how many are still there."""
        run = self.cluster.get_run(namespace, name)
        if run is None:
            return 0
        jobs = self.cluster.list_jobs(namespace, run)
        self.execute(run, finalize(run, Observed(jobs=jobs)), None)
        left = len(self.cluster.list_jobs(namespace, run))
        if not left:
            self.metrics.forget(namespace, name)
        return left

    # --- kopf
    def registry(self) -> kopf.OperatorRegistry:
        reg = kopf.OperatorRegistry()

        @kopf.on.login(registry=reg)
        def login(**kwargs):
            return self.connection or kopf.login_via_client(**kwargs)

        @kopf.timer(*RUNS, interval=self.interval, backoff=max(self.interval, 1.0), registry=reg)
        def tick(namespace, name, meta, **_):
            if meta.get("deletionTimestamp"):
                return
            self.reconcile_once(namespace, name)

        @kopf.on.probe(id="ready", registry=reg)
        def ready(**_):  # what /healthz reports besides answering; the last readiness result, no API call
            return self._ready_reason or "ok"

        @kopf.on.delete(*RUNS, registry=reg)
        def on_delete(namespace, name, **_):
            left = self.finalize_once(namespace, name)
            if left:
                raise kopf.TemporaryError(f"waiting for {left} job(s) to be deleted", delay=max(self.interval, 1.0))

        return reg

    def settings(self) -> kopf.OperatorSettings:
        s = kopf.OperatorSettings()
        # kopf's bookkeeping goes to annotations: the status schema is ours (and structural, so pruned)
        s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=crd.GROUP)
        s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=crd.GROUP)
        s.posting.enabled = False   # our own Events carry the story; kopf's per-handler ones are noise
        s.scanning.disabled = not self.scanning
        return s

    def run(self, stop_flag: threading.Event | None = None, ready_flag: threading.Event | None = None,
            liveness_endpoint: str | None = None):
        """Run until stop_flag is set (blocking; use a thread to embed it). liveness_endpoint: e.g.
        http://0.0.0.0:8081/healthz, kopf's health server."""
        self.started.clear()
        ready = _ChainedFlag(self.started, ready_flag)
        try:
            kopf.run(registry=self.registry(), settings=self.settings(), standalone=True,
                     namespaces=self.namespaces, clusterwide=not self.namespaces,
                     stop_flag=stop_flag, ready_flag=ready, liveness_endpoint=liveness_endpoint)
        finally:
            self.started.clear()


class _ChainedFlag(threading.Event):
    """kopf takes one ready flag: this one sets ours and the caller's."""

    def __init__(self, *flags: threading.Event | None):
        super().__init__()
        self.flags = [f for f in flags if f is not None]

    def set(self):
        super().set()
        for f in self.flags:
            f.set()


def main(namespaces: list[str] | None = None, interval: float = DEFAULT_INTERVAL_S, metrics_port: int = 8080,
         health_port: int = 8081) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    op = Operator(namespaces=namespaces, interval=interval)
    op.metrics.serve(metrics_port, readiness=op.readiness)
    liveness = f"http://0.0.0.0:{health_port}/healthz" if health_port else None
    log.info("nanochat operator: watching %s, metrics and /readyz on :%s, /healthz on :%s",
             ", ".join(namespaces or []) or "all namespaces", metrics_port, health_port)
    op.run(liveness_endpoint=liveness)
    return 0

