"""common.keep_freed_memory: glibc's malloc keeps freed large blocks for reuse, so a CPU training step's tensors stop
faulting their pages in anew at every step (how the stages run on a CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nanochat import common

# Blocks as torch's CPU allocator takes them (posix_memalign, 64-byte aligned), 48 MB: above glibc's largest dynamic
# mmap threshold (32 MB), so by default each is mapped on allocation and unmapped on free, and all its 12,288 pages
# fault in again the next time. Nothing else allocates in between (a Python object could land in the freed space).
CHURN = """
import ctypes, json, resource
from nanochat import common
kept = common.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.free.argtypes = [ctypes.c_void_p]
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
block, size, faults = ctypes.c_void_p(), 48 << 20, []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert libc.posix_memalign(ctypes.byref(block), 64, size) == 0
    ctypes.memset(block.value, 1, size)
    libc.free(block.value)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults[-4:]}))  # the first blocks fault in either way, as the heap grows
"""


def churn(keep: str) -> dict:
    env = dict(os.environ, NANOCHAT_KEEP_FREED_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = churn("0"), churn("1")
    assert not default["kept"] and kept["kept"]
    assert min(default["faults"]) > 10_000  # every page of every block, every time
    assert max(kept["faults"]) < 100  # the same pages, still mapped


def test_it_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("NANOCHAT_KEEP_FREED_MEMORY", "0")
    assert common.keep_freed_memory() is False


@pytest.mark.parametrize("own_process", [True, False])
def test_a_stage_in_its_own_process_keeps_freed_memory_one_run_in_process_leaves_malloc_alone(tmp_path, monkeypatch, own_process):
    from nanochat import stage
    from tests.fake_stages import echo
    calls = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(stage, "OWN_PROCESS", own_process)
    assert echo.main([f"--store=file://{tmp_path}/s", "--steps=1", "--device=cpu"]) == 0
    assert calls == ([1] if own_process else [])
