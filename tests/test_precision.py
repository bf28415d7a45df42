"""Precision policy: float32, bfloat16 and bf16-mixed (fp32 weights and residual stream, matmuls autocast to bf16),
and what auto picks: bfloat16 on SM80+ GPUs, bf16-mixed for training on a CPU whose bf16 matmuls are measurably faster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import common
from nanochat.gpt import GPT, GPTConfig, compute_dtype_for
from tests.fixtures import measure_leaving_rng

CPU = torch.device("cpu")


@pytest.mark.parametrize("speedup, fast", [(3.5, True), (1.31, True), (1.2, False), (0.55, False), (0.0, False)])
def test_auto_picks_bf16_mixed_only_where_bf16_matmuls_were_measured_faster(monkeypatch, speedup, fast):
    monkeypatch.setattr(common, "cpu_bf16_speedup", lambda: speedup)
    assert common.compute_dtype(CPU) == compute_dtype_for(CPU) == torch.float32  # the model's dtype: fp32 either way
    assert common.autocast_dtype(CPU) == (torch.bfloat16 if fast else None)
    assert common.precision_name(torch.float32, common.autocast_dtype(CPU)) == ("bf16-mixed" if fast else "float32")
    model = GPT.create(GPTConfig.from_depth(1, 256, 32, head_dim=32, window_pattern="L"), CPU)
    assert model.setup_optimizer().ortho_dtype == (torch.bfloat16 if fast else torch.float32)  # Muon follows the probe


def test_the_bf16_speed_probe_measures_only_where_there_are_bf16_instructions(monkeypatch):
    speedup = measure_leaving_rng(common._measure_bf16_speedup)
    assert speedup == common.cpu_bf16_speedup()  # measured once per process
    assert (speedup > 0) == common.native_bf16_cpu()
    assert speedup == 0 or 0.05 < speedup < 50  # a ratio of two timings of the same matmul, not a flag
    common._measure_bf16_speedup.cache_clear()
    monkeypatch.setattr(common, "native_bf16_cpu", lambda: False)
    assert common.cpu_bf16_speedup() == 0.0 and not common.fast_bf16_cpu()
    common._measure_bf16_speedup.cache_clear()


@pytest.mark.parametrize("rank0, rank1", [(3.0, 0.5), (0.5, 3.0)])
def test_the_ranks_of_a_job_take_rank_0s_bf16_figure(tmp_path, rank0, rank1):
    """Two ranks that measured either side of the threshold both train as rank 0 measured (torchrun, gloo)."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(repo), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(repo / "tests" / "dist_precision_check.py"), str(rank0), str(rank1)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    fast = rank0 >= common.BF16_MIN_SPEEDUP
    assert [r["before"] for r in rows] == [str(torch.bfloat16 if f >= common.BF16_MIN_SPEEDUP else None) for f in (rank0, rank1)]
    assert all(r["after"] == str(torch.bfloat16 if fast else None) and r["speedup"] == rank0 for r in rows)
    assert all(r["ortho"] == str(torch.bfloat16 if fast else torch.float32) for r in rows)


@pytest.mark.parametrize("requested, dtype, autocast", [
    ("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None), ("bf16", torch.bfloat16, None),
    ("bf16-mixed", torch.float32, torch.bfloat16)])
def test_an_explicit_precision_wins_over_the_device_default(monkeypatch, requested, dtype, autocast):
    monkeypatch.setattr(common, "cpu_bf16_speedup", lambda: 3.5)
    assert (common.compute_dtype(CPU, requested), common.autocast_dtype(CPU, requested)) == (dtype, autocast)
    monkeypatch.setenv("NANOCHAT_DTYPE", requested)  # the environment stands in for an absent --dtype
    assert (common.compute_dtype(CPU), common.autocast_dtype(CPU), compute_dtype_for(CPU)) == (dtype, autocast, dtype)


def test_unknown_precision_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="accepted: auto, .*bf16-mixed"):
        common.autocast_dtype(CPU, "bf17")


def test_the_native_bf16_probe_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert common.native_bf16_cpu() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_bf16_mixed_multiplies_in_bf16_and_keeps_the_residual_stream_fp32():
    torch.manual_seed(0)
    model = GPT.create(GPTConfig.from_depth(2, 512, 64, head_dim=64, window_pattern="L"), CPU)
    x, y = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))
    seen = {}
    for name, module in [("fc", model.transformer.h[0].mlp.c_fc), ("block", model.transformer.h[0])]:
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out.dtype))
    with common.autocast(CPU, common.autocast_dtype(CPU, "bf16-mixed")):  # what StageContext.autocast() enters
        mixed = model(x, y)
    mixed.backward()
    mixed_grads = [p.grad.clone() for p in model.parameters()]
    assert seen == {"fc": torch.bfloat16, "block": torch.float32}
    assert all(g.dtype == torch.float32 for g in mixed_grads)
    model.zero_grad()
    fp32 = model(x, y)
    fp32.backward()
    assert seen == {"fc": torch.float32, "block": torch.float32}
    assert mixed.item() != fp32.item() and abs(mixed.item() - fp32.item()) < 1e-2 * fp32.item()
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (mixed_grads, [p.grad for p in model.parameters()])]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "150000 100000\n"}, 1.5), ({"cpu.max": "max 100000\n"}, None),
    ({"cfs_quota_us": "200000\n", "cfs_period_us": "100000\n"}, 2.0), ({"cfs_quota_us": "-1\n", "cfs_period_us": "100000\n"}, None),
    ({}, None)])
def test_the_cgroup_cpu_limit_is_read_from_v2_or_v1_files(tmp_path, monkeypatch, files, limit):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(common, "CGROUP_CPU_FILES", ((str(tmp_path / "cpu.max"),),
                                                     (str(tmp_path / "cfs_quota_us"), str(tmp_path / "cfs_period_us"))))
    assert common.cgroup_cpu_limit() == limit


@pytest.mark.parametrize("limit, local, omp, threads", [(1.5, "1", "", 1), (4.0, "4", "", 1), (1.0, "1", "2", None), (None, "1", "", None)])
def test_torch_threads_follow_the_containers_cpu_limit(monkeypatch, limit, local, omp, threads):
    """A pod limited to fewer CPUs than torch's thread count gets its share of the limit per local process, at least
    one; OMP_NUM_THREADS, when set, wins; no limit, no change."""
    monkeypatch.setattr(common, "cgroup_cpu_limit", lambda: limit)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert common.fit_threads_to_cpu_limit() == threads
        assert torch.get_num_threads() == (threads or 2)
    finally:
        torch.set_num_threads(before)


def test_a_stage_in_a_cpu_limited_container_runs_on_its_share(tmp_path, monkeypatch, capsys):
    """stage_main fits torch's threads to the container's CPU limit before the stage runs, and says so."""
    from nanochat.store import open_store
    from tests.fake_stages import allreduce
    monkeypatch.setattr(common, "cgroup_cpu_limit", lambda: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert allreduce.main([f"--store=file://{tmp_path}/st", "--device=cpu"]) == 0
    finally:
        torch.set_num_threads(before)
    assert open_store(f"file://{tmp_path}/st").get_json("outputs/allreduce.json")["threads"] == 1
    assert "threads: 1 per process, from this container's CPU limit (1)" in capsys.readouterr().err
