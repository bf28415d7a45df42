"""Process-level helpers shared by all stages: distributed init, device and dtype, logging."""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

log = logging.getLogger("nanochat")


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was at setup: a stage run in-process under a
    swapped stderr (pytest's capture, a notebook) leaves no handler bound to a stream that later closes."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def setup_logging(level: str | None = None):
    level = level or os.environ.get("NANOCHAT_LOG_LEVEL", "INFO")
    rank = int(os.environ.get("RANK", 0))
    fmt = f"%(asctime)s [rank{rank}] %(message)s" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "%(asctime)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=[CurrentStderrHandler()], force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun / PyTorchJob env."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_master() -> bool:
    return dist_info()[0] == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def autodetect_device(requested: str = "auto") -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MIXED = "bf16-mixed"  # fp32 weights and activations, matmuls in bf16 under torch.autocast (Lightning's name for it)
PG_TIMEOUT_S = 1800  # collectives wait this long for a slow rank (NANOCHAT_PG_TIMEOUT_S overrides)


BF16_MIN_SPEEDUP = 1.3  # auto multiplies in bf16 on a CPU only when its bf16 matmul beats fp32's by this much


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX). Having them is not enough: see cpu_bf16_speedup."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private, so guarded)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


_rank0_bf16_speedup: float | None = None  # set by share_cpu_bf16_speedup: every rank of a job then decides alike


def cpu_bf16_speedup() -> float:
    """fp32's time over bf16's for a training-sized matmul on this CPU, measured once per process (~0.1 s); 0 without
    bf16 instructions. Measured, not read from the flags: ~3.5x on 2 Zen 5 cores, but 0.55x on a Xeon that reports
    AVX-512 BF16 without AMX, where bf16 made the tiny speedrun's training 1.5x slower. In a multi-process stage,
    rank 0's figure (share_cpu_bf16_speedup)."""
    return _measure_bf16_speedup() if _rank0_bf16_speedup is None else _rank0_bf16_speedup


def share_cpu_bf16_speedup():
    """Every rank takes rank 0's measurement (called by all ranks after init_distributed), so that a figure near the
    threshold cannot give one rank bf16-mixed and another fp32."""
    global _rank0_bf16_speedup
    figure = torch.tensor([_measure_bf16_speedup()], dtype=torch.float64)
    dist.broadcast(figure, 0)
    _rank0_bf16_speedup = figure.item()


@functools.cache
def _measure_bf16_speedup() -> float:
    if not native_bf16_cpu():
        return 0.0
    rng = torch.Generator().manual_seed(0)  # its own: a probe must not move the global RNG a seeded run draws from
    a, b = torch.randn(1024, 512, generator=rng), torch.randn(512, 1024, generator=rng)
    a16, b16 = a.bfloat16(), b.bfloat16()
    best = fastest({"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16}, rounds=6)
    return best["fp32"] / best["bf16"]


def fastest(candidates: dict, rounds: int) -> dict:
    """Each candidate's best time in seconds over `rounds` interleaved runs (a busy neighbour slows all alike)."""
    best = dict.fromkeys(candidates, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def fast_bf16_cpu() -> bool:
    """Whether bf16 matmuls pay on this CPU: auto's bf16-mixed training and bf16 Muon orthogonalization follow it."""
    return cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def _requested_precision(requested: str) -> str:
    """--dtype, else NANOCHAT_DTYPE, else auto; float16 refused, unknown names listed."""
    if not requested or requested == "auto":
        requested = os.environ.get("NANOCHAT_DTYPE", "").strip().lower() or "auto"
    if requested in ("float16", "fp16"):
        raise ValueError(f"dtype {requested!r} (--dtype / NANOCHAT_DTYPE) is not supported: training has no loss scaling; "
                         f"use bfloat16 (SM80+ GPUs), {MIXED} or float32")
    if requested != "auto" and requested != MIXED and requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r} (--dtype / NANOCHAT_DTYPE); accepted: auto, {', '.join(DTYPES)}, {MIXED}")
    return requested


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The model's compute dtype: bf16 on CUDA SM80+, fp32 elsewhere (and under bf16-mixed). An explicit `requested`
    wins, then NANOCHAT_DTYPE.

    float16 is refused: training has no loss scaling, and every GPU without bf16 runs fp32 instead."""
    requested = _requested_precision(requested)
    if requested == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        return torch.float32
    return torch.float32 if requested == MIXED else DTYPES[requested]


def autocast_dtype(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The dtype training forwards autocast their matmuls to, or None: bf16 under bf16-mixed, and by default (auto)
    on a CPU whose bf16 matmuls are measurably faster (the weights, the residual stream and evaluation stay fp32)."""
    requested = _requested_precision(requested)
    if requested == MIXED or (requested == "auto" and torch.device(device).type == "cpu" and fast_bf16_cpu()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The context a training forward runs in: torch.autocast to `dtype` (autocast_dtype's answer), or a no-op for None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def precision_name(dtype: torch.dtype, autocast: torch.dtype | None) -> str:
    """How a stage's start line names its precision: float32, bfloat16 or bf16-mixed."""
    return MIXED if autocast is not None else str(dtype).replace("torch.", "")


def pg_timeout_s() -> float:
    value = os.environ.get("NANOCHAT_PG_TIMEOUT_S", "").strip()
    try:
        timeout = float(value) if value else PG_TIMEOUT_S
    except ValueError:
        raise ValueError(f"NANOCHAT_PG_TIMEOUT_S={value!r}: expected a number of seconds") from None
    if timeout <= 0:
        raise ValueError(f"NANOCHAT_PG_TIMEOUT_S={value!r}: must be > 0")
    return timeout


CGROUP_CPU_FILES = (("/sys/fs/cgroup/cpu.max",),  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))  # v1: -1 = none


def cgroup_cpu_limit() -> float | None:
    """The CPUs this container may use (its cgroup's CPU quota over period: a pod's limits.cpu), or None if unlimited."""
    for files in CGROUP_CPU_FILES:
        try:
            fields = " ".join(open(f).read().strip() for f in files).split()
            quota, period = fields[0], int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return int(quota) / period
    return None


def fit_threads_to_cpu_limit() -> int | None:
    """In a container with a CPU limit, torch still starts one thread per CPU of the node: 64 threads in a pod limited
    to 8 CPUs spend their time throttled. Lower torch's intra-op threads to this process's share of the limit (the
    limit over LOCAL_WORLD_SIZE, at least 1) and return it; None if nothing changed. OMP_NUM_THREADS, when set, wins."""
    limit = cgroup_cpu_limit()
    if os.environ.get("OMP_NUM_THREADS") or limit is None:
        return None
    threads = max(1, int(limit / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    if threads >= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return threads


# glibc hands freed blocks of 128 KB and up back to the OS, and the next allocation of that size faults its pages in
# again: a CPU training step of the tiny model (d4, 8x256 tokens) took ~24,000 page faults, ~25 ms of its ~425.
MALLOC_KEEP_BYTES = 256 << 20  # blocks up to this come from malloc's heap, which is never trimmed; larger ones as before


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of unmapping them (mallopt: M_MMAP_THRESHOLD =
    MALLOC_KEEP_BYTES, M_TRIM_THRESHOLD = the most it takes). Peak RSS about as before (tiny d4 training: +1%). True when
    set; False on another C library, or with NANOCHAT_KEEP_FREED_MEMORY=0."""
    if os.environ.get("NANOCHAT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl (Alpine) and others: no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def init_distributed(device: torch.device, timeout_s: float | None = None):
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): nccl on GPU, gloo on CPU.

    timeout_s (default NANOCHAT_PG_TIMEOUT_S, else 1800) bounds how long a collective waits for a slow rank."""
    rank, local_rank, world_size = dist_info()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s or pg_timeout_s()),
                                device_id=torch.device("cuda", local_rank) if device.type == "cuda" else None)
    return rank, local_rank, world_size


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()
