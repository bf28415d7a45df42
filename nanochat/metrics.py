"""Prometheus metrics a stage exposes on --metrics-port while it runs (one registry per process)."""
from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server


class StageMetrics:
    """Gauges for progress, step, throughput, loss and ETA, plus any named scalar the stage logs."""

    def __init__(self, stage: str, rank: int = 0):
        self.stage, self.rank = stage, rank
        self.registry = CollectorRegistry()
        labels = ["stage", "rank"]
        g = lambda name, doc: Gauge(name, doc, labels, registry=self.registry).labels(stage, str(rank))  # noqa: E731
        self.up = g("nanochat_stage_running", "1 while the stage runs")
        self.progress = g("nanochat_stage_progress", "fraction of the stage done (0..1)")
        self.step = g("nanochat_stage_step", "current optimisation/eval step")
        self.tokens_per_sec = g("nanochat_stage_tokens_per_second", "throughput in tokens/s")
        self.loss = g("nanochat_stage_loss", "latest training loss")
        self.eta = g("nanochat_stage_eta_seconds", "estimated seconds until the stage ends")
        self.values = Gauge("nanochat_stage_metric", "latest value of a named stage metric", labels + ["name"], registry=self.registry)
        self.server = None
        self.started = time.time()

    def serve(self, port: int):
        if port:
            self.server, _ = start_http_server(port, registry=self.registry)
        self.up.set(1)

    def update(self, step: int | None = None, total: int | None = None, **values):
        if step is not None:
            self.step.set(step)
            if total:
                frac = min(1.0, step / total)
                self.progress.set(frac)
                elapsed = time.time() - self.started
                if frac > 0:
                    self.eta.set(elapsed * (1 - frac) / frac)
        for k, v in values.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if k == "loss":
                self.loss.set(v)
            elif k in ("tokens_per_sec", "tok_per_sec"):
                self.tokens_per_sec.set(v)
            self.values.labels(self.stage, str(self.rank), k).set(v)

    def close(self):
        self.up.set(0)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
