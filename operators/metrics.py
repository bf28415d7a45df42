"""Prometheus metrics the operator serves on /metrics, derived from each reconcile's observations,
and its readiness on /readyz of the same port.

Training pods serve their own stage metrics (nanochat.metrics, port `metricsPort`, container port
`metrics`) for a PodMonitor; these are the run-level view: runs by phase, per-stage state,
durations, retries and the latest loss / bpb / CORE the stages reported in their done.json.
"""
from __future__ import annotations

import math
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from operators.crd import PHASES, STAGE_STATES


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes and scrapes every few seconds: no access log
        pass


def metrics_app(registry: CollectorRegistry, readiness: Callable[[], str | None] | None = None):
    """WSGI app: /readyz → 200 "ok" or 503 with the reason `readiness()` returns; anything else → the metrics."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/readyz":
            return metrics(environ, start_response)
        reason = readiness() if readiness else None
        start_response("200 OK" if reason is None else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{reason or 'ok'}\n".encode()]
    return app


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.runs = Gauge("nanochat_operator_runs", "NanochatRuns by phase", ["phase"], registry=r)
        self.stage_state = Gauge("nanochat_operator_stage_state", "1 for the state a step is in", ["namespace", "run", "stage", "state"], registry=r)
        self.stage_duration = Gauge("nanochat_operator_stage_duration_seconds", "wall time of a finished step (done.json)",
                                    ["namespace", "run", "stage"], registry=r)
        self.stage_attempts = Gauge("nanochat_operator_stage_attempts", "PyTorchJobs created for a step", ["namespace", "run", "stage"], registry=r)
        self.stage_retries = Gauge("nanochat_operator_stage_failures", "failed attempts of a step (its retries so far)",
                                   ["namespace", "run", "stage"], registry=r)
        self.stage_metric = Gauge("nanochat_operator_stage_metric", "a numeric metric a step reported in its done.json",
                                  ["namespace", "run", "stage", "name"], registry=r)
        self.reconciles = Counter("nanochat_operator_reconciles", "reconcile passes", ["result"], registry=r)
        self.jobs_created = Counter("nanochat_operator_jobs_created", "PyTorchJobs created (adopted ones excluded)", registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        self._series: dict[tuple[str, str], set] = {}  # (namespace, run) → {(gauge, labels)} to drop when it goes
        self._lock = threading.Lock()
        self._server = None
        for phase in PHASES:
            self.runs.labels(phase).set(0)

    def serve(self, port: int, addr: str = "0.0.0.0", readiness: Callable[[], str | None] | None = None):
        """/metrics (and /readyz, from `readiness`) on a daemon thread; port 0: off."""
        if port:
            self._server = make_server(addr, port, metrics_app(self.registry, readiness), ThreadingWSGIServer,
                                       handler_class=_QuietHandler)
            threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe(self, namespace: str, run: str, status: dict, done: dict[str, dict] | None = None):
        """Record a run's status (after reconcile) and the metrics in its steps' done.json."""
        with self._lock:
            if status.get("phase"):
                self._phases[(namespace, run)] = status["phase"]
            self._count_phases()
        for row in status.get("stages") or []:
            stage = row["name"]
            for state in STAGE_STATES:
                self._set(self.stage_state, (namespace, run, stage, state), 1 if row.get("state") == state else 0)
            self._set(self.stage_attempts, (namespace, run, stage), row.get("attempts", 0))
            self._set(self.stage_retries, (namespace, run, stage), row.get("failures", 0))
            if isinstance(row.get("durationSeconds"), (int, float)):
                self._set(self.stage_duration, (namespace, run, stage), row["durationSeconds"])
        for stage, marker in (done or {}).items():
            for name, value in (marker.get("metrics") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._set(self.stage_metric, (namespace, run, stage, name), value)

    def _set(self, gauge: Gauge, labels: tuple, value: float):
        gauge.labels(*labels).set(value)
        with self._lock:
            self._series.setdefault(labels[:2], set()).add((gauge, labels))

    def forget(self, namespace: str, run: str):
        """The run is gone: drop its series."""
        with self._lock:
            self._phases.pop((namespace, run), None)
            self._count_phases()
            series = self._series.pop((namespace, run), set())
        for gauge, labels in series:
            gauge.remove(*labels)

    def _count_phases(self):
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            self.runs.labels(phase).set(n)
