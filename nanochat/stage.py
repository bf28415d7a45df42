"""The stage contract, implemented once: every `nanochat.stages.X.main(argv)` calls `stage_main`.

It parses config (errors before any work), initialises device/dtype/torch.distributed, seeds,
opens the store, skips if `stages/<name>/done.json` matches the config hash, serves Prometheus
metrics, turns SIGTERM/SIGINT into a clean stop, and writes done.json LAST (rank 0 only).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nanochat import common
from nanochat.config import ConfigError, config_dict, config_hash, parse_config
from nanochat.errors import Failure
from nanochat.metrics import StageMetrics
from nanochat.report import Report
from nanochat.store import StoreError, check_reachable, default_store_uri, open_store

EXIT_CONFIG, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 143
HISTORY_FLUSH_S = 10.0
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")  # gloo, when another rank died
TRAINING_STAGES = ("base_train", "mid_train", "chat_sft", "chat_rl")  # the stages whose forwards run under ctx.autocast()


class StageInterrupted(Exception):
    """Raised at a safe point after SIGTERM/SIGINT; the stage saves what resume needs first."""


class MissingInput(StoreError):
    pass


class PlainProgress:
    """Progress for logs (no TTY): one line every ~10% or 30 s instead of a redrawn bar."""

    def __init__(self, iterable=None, total=None, desc="", enabled=True):
        self.iterable, self.total, self.desc, self.enabled = iterable, total, desc, enabled
        self.n, self.t0, self.last_t, self.last_frac = 0, time.time(), time.time(), 0.0
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.time()
        frac = self.n / self.total if self.total else 0.0
        if self.enabled and (now - self.last_t > 30 or frac - self.last_frac >= 0.1):
            rate = self.n / max(now - self.t0, 1e-9)
            eta = f", eta {(self.total - self.n) / rate:.0f}s" if self.total and rate > 0 else ""
            total = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{total} ({rate:.1f}/s{eta})", file=sys.stderr, flush=True)
            self.last_t, self.last_frac = now, frac

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StageContext:
    """What a stage body gets: config, store, device, ranks, metrics, report, stop flag."""

    def __init__(self, stage, name, cfg, store, device, dtype, rank, local_rank, world_size, autocast_dtype=None):
        self.stage, self.name, self.cfg, self.store = stage, name, cfg, store
        self.device, self.dtype, self.autocast_dtype = device, dtype, autocast_dtype
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.is_master = rank == 0
        self.config_hash = config_hash(cfg)
        self.metrics = StageMetrics(name, rank)
        self.report = Report(store)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"nanochat-{name}-r{rank}-"))
        self.artifacts: dict[str, str] = {}
        self.card_entry: dict | None = None
        self.stop_requested = False
        self._graceful = 0
        self._history: list[dict] = []
        self._last_flush = 0.0

    def autocast(self):
        """Around a training forward: its matmuls in autocast_dtype under bf16-mixed, a no-op otherwise."""
        return common.autocast(self.device, self.autocast_dtype)

    # --- logging and progress
    def log(self, msg: str):
        if self.is_master:
            print(f"[{self.name}] {msg}", file=sys.stderr, flush=True)

    def progress(self, iterable=None, total=None, desc=None):
        desc = desc or self.name
        if self.is_master and sys.stderr.isatty():
            from tqdm import tqdm
            return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
        return PlainProgress(iterable, total=total, desc=f"[{self.name}] {desc}", enabled=self.is_master)

    def log_metrics(self, step: int, total: int | None = None, flush: bool = False, **values):
        """Record scalars at a step: Prometheus gauges, history.jsonl (for report plots)."""
        self.metrics.update(step=step, total=total, **values)
        if self.is_master:
            self._history.append({"step": step, **({"total": total} if total else {}), "time": round(time.time(), 3), **values})
            if flush or time.time() - self._last_flush > HISTORY_FLUSH_S:
                self.flush_history()

    def flush_history(self):
        if self.is_master and self._history:
            text = "".join(json.dumps(r) + "\n" for r in self._history)
            self.store.put_bytes(f"stages/{self.name}/history.jsonl", text.encode())
            self._last_flush = time.time()

    def load_history(self, upto_step: int | None = None):
        """On resume, keep the history of the steps already done (so plots stay continuous)."""
        from nanochat.report import load_history
        rows = load_history(self.store, self.name)
        self._history = [r for r in rows if upto_step is None or r.get("step", 0) <= upto_step]

    # --- report and outputs
    def section(self, title: str, data, figures: dict[str, bytes] | None = None):
        if self.is_master:
            self.report.log(title, data, figures=figures, name=self.name)

    def card(self, column: str, **values):
        """Values for the report card's BASE/MID/SFT/RL table."""
        self.card_entry = {"column": column, "values": values}

    def add_artifact(self, key: str, sha256: str):
        self.artifacts[key] = sha256

    def require(self, key: str, producer: str):
        """Fail with a clear line if an input artifact is missing."""
        if not self.store.exists(key):
            raise MissingInput(f"missing input {self.store.uri(key)}: it is produced by stage {producer} "
                               f"(run `nanochat stage {producer} --store {self.store.root}` first)")

    # --- stopping
    @contextlib.contextmanager
    def graceful(self):
        """Inside, SIGTERM/SIGINT only set stop_requested; the loop calls check_stop() at safe points."""
        self._graceful += 1
        try:
            yield
        finally:
            self._graceful -= 1

    def check_stop(self):
        stop = self.stop_requested
        if self.world_size > 1 and torch.distributed.is_initialized():
            # all ranks stop at the same step, or collectives would hang
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag)
            stop = flag.item() > 0
        if stop:
            raise StageInterrupted(f"{self.name}: stop requested")

    def _on_signal(self, signum, frame):
        self.stop_requested = True
        if self._graceful == 0:
            raise StageInterrupted(f"{self.name}: received {signal.Signals(signum).name}")


def _fail(stage: str, msg: str, code: int):
    print(f"nanochat stage {stage}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _peer_died(e: BaseException) -> bool:
    """A collective failed because another rank is gone: a backend error, or gloo's connection reset."""
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    return isinstance(e, backend_error) or any(m in str(e) for m in PEER_GONE)


# Set when this process exists to run one stage (`python -m nanochat.stages.X`, torchrun, `nanochat stage X`): then
# process-wide settings are the stage's to make (common.keep_freed_memory); a stage run in-process (tests) leaves them.
OWN_PROCESS = False


def stage_main(stage: str, config_cls, run, argv=None) -> int:
    """Run one stage under the contract; returns the process exit code."""
    common.setup_logging()
    if not faulthandler.is_enabled():  # a crash in native code (NCCL, pyarrow, a kernel) still shows each thread's stack
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr (embedded interpreters)
            faulthandler.enable(sys.__stderr__)
    try:
        cfg = parse_config(config_cls, argv, stage)
    except ConfigError as e:
        return _fail(stage, str(e), EXIT_CONFIG)
    name = cfg.instance_name(stage)
    try:
        store = open_store(cfg.store or default_store_uri())
        check_reachable(store)
    except StoreError as e:
        return _fail(stage, f"store unusable: {e}", EXIT_CONFIG)
    except Exception as e:  # noqa: BLE001 - e.g. endpoint unreachable
        return _fail(stage, f"store unusable ({cfg.store}): {str(e).splitlines()[0]}", EXIT_CONFIG)

    chash = config_hash(cfg)
    done = store.get_json_or(f"stages/{name}/done.json")
    if done and done.get("config_hash") == chash and not cfg.force:
        common.print0(f"[{name}] already done with this config ({chash}); skipping (use --force to re-run)")
        return 0

    try:
        device = common.autodetect_device(cfg.device)
        dtype = common.compute_dtype(device, cfg.dtype)
        rank, local_rank, world_size = common.init_distributed(device)
        fitted_threads = common.fit_threads_to_cpu_limit()
        if OWN_PROCESS and device.type == "cpu":  # CPU tensors are malloc's: keep their pages mapped between steps
            common.keep_freed_memory()
        if stage in TRAINING_STAGES and device.type == "cpu" and world_size > 1:
            common.share_cpu_bf16_speedup()
        autocast = common.autocast_dtype(device, cfg.dtype) if stage in TRAINING_STAGES else None  # evaluation stays in dtype
    except ValueError as e:
        return _fail(stage, str(e), EXIT_CONFIG)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    common.seed_everything(cfg.seed + rank)
    ctx = StageContext(stage, name, cfg, store, device, dtype, rank, local_rank, world_size, autocast)
    old_handlers = {s: signal.signal(s, ctx._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ctx.metrics.serve(cfg.metrics_port + local_rank if cfg.metrics_port else 0)
    except OSError as e:
        return _fail(stage, f"--metrics-port {cfg.metrics_port}: {e}", EXIT_CONFIG)
    started = time.time()
    ctx.log(f"start: profile={cfg.profile} store={store.root} device={device} dtype={common.precision_name(dtype, autocast)} world_size={world_size} config={chash}")
    if fitted_threads:
        ctx.log(f"threads: {fitted_threads} per process, from this container's CPU limit ({common.cgroup_cpu_limit():g}) "
                f"over {os.environ.get('LOCAL_WORLD_SIZE', '1')} local process(es) (OMP_NUM_THREADS overrides)")
    if stage in TRAINING_STAGES and device.type == "cpu" and common.native_bf16_cpu() and common._requested_precision(cfg.dtype) == "auto":
        ctx.log(f"precision: bf16 matmuls ran {common.cpu_bf16_speedup():.2f}x fp32's speed on this CPU, so auto picked "
                f"{common.precision_name(dtype, autocast)} (needs {common.BF16_MIN_SPEEDUP}x for bf16-mixed; --dtype overrides)")
    code = 0
    try:
        metrics = run(ctx) or {}
        ctx.flush_history()
        if ctx.is_master:
            store.put_json(f"stages/{name}/done.json", {
                "stage": stage, "name": name, "profile": cfg.profile, "config": config_dict(cfg), "config_hash": chash,
                "metrics": metrics, "card": ctx.card_entry, "artifacts": ctx.artifacts,
                "started": started, "ended": time.time(), "duration_s": round(time.time() - started, 3),
                "world_size": world_size, "host": socket.gethostname(), "device": str(device), "torch": torch.__version__,
            })
        common.barrier()
        ctx.log(f"done in {time.time() - started:.1f}s")
    except StageInterrupted as e:
        ctx.flush_history()
        code = _fail(stage, f"interrupted ({e}); re-run to resume", EXIT_INTERRUPTED)
    except (StoreError, ConfigError, Failure) as e:  # expected: the message says it all
        code = _fail(stage, str(e), EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_ERROR)
    except Exception as e:  # noqa: BLE001 - a bug: keep the traceback
        if world_size > 1 and _peer_died(e):  # the rank that died printed the cause; this one only follows
            code = _fail(stage, "peer rank died; re-run to resume", EXIT_ERROR)
        else:
            traceback.print_exc()
            code = EXIT_ERROR
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        ctx.metrics.close()
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        common.cleanup_distributed()
    return code


def run_module_main(stage: str, config_cls, run):
    """`if __name__ == "__main__": run_module_main(...)` for `python -m nanochat.stages.X`."""
    global OWN_PROCESS
    OWN_PROCESS = True
    sys.exit(stage_main(stage, config_cls, run, sys.argv[1:]))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
