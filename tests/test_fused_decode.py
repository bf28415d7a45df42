"""The fused decode step (nanochat.fused_decode): its Triton kernels run on the CPU in Triton's interpreter, in a
worker process (tests/fused_decode_check.py): in fp32 it equals the static step it replaces (logits and the K/V it
writes, for GQA groups of 1, 2, 3 and 4, sliding windows that straddle cache splits, batches of 1 and 2), in bf16 it is
as close to an fp32 forward as the static step, and Engine(decode="fused") streams equal the eager and static paths'
(greedy, sampled with top-k/top-p, and past the static cache's end). On a GPU, bench/gpu.py checks the compiled
kernels the same way."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import fused_decode, fused_sample
from nanochat.engine import Engine
from tests.test_engine import PROMPT, TOK, random_gpt, run

REPO = Path(__file__).resolve().parents[1]
triton = fused_decode.triton
needs_triton = pytest.mark.skipif(fused_decode.triton is None, reason="triton is installed with the dev extra on linux x86_64 only")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp / "triton"), TMPDIR=str(tmp), HOME=str(tmp))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fused_decode_check.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
def test_fused_step_equals_the_static_step_in_fp32(interpreted):
    steps = {k: v for k, v in interpreted["steps"].items() if k.startswith("fp32 heads")}
    assert len(steps) == 10 and sum("split32 block16" in k for k in steps) == 3 and sum("combine kernel " in k for k in steps) == 2
    assert sum("lanes kernel" in k for k in steps) == 2
    for name, r in steps.items():
        assert r["arrivals_left"] == 0, name  # the last attention program of each (row, head) set its counter back
        assert r["logits_rel"] < 1e-5, name       # the same arithmetic, in another order
        assert r["cache_max_abs"] < 1e-4, name   # the K/V it wrote at each position
        end = interpreted["prompt_len"] + interpreted["n_steps"]  # past the first 16-slot split
        assert r["pos"][0] == r["pos"][1] and set(r["pos"][0]) == {end} and end > 16, name


@needs_triton
def test_fused_step_with_rows_at_their_own_positions(interpreted):
    """One request per row (nanochat.batching): prompts of 13, 3 and 20 tokens, the last row retired halfway."""
    r = interpreted["steps"]["fp32 ragged rows"]
    assert r["logits_rel"] < 1e-5
    n = interpreted["n_steps"]
    assert r["pos"] == [[13 + n, 3 + n, 0]] * 2


@needs_triton
def test_fused_step_in_bf16_is_as_close_to_fp32_as_the_static_step(interpreted):
    for name in ("bf16 vs fp32 forward", "bf16 vs fp32 forward, one row"):  # one row: the GEMV kernel's path
        r = interpreted["steps"][name]
        assert 0 < r["fused_rel"] < 3e-2, name
        # bf16 rounded to nearest even as on a GPU (the interpreter truncates unless told: fused_decode_check): the
        # fused step is as close to fp32 as the static step, and close to it (the norms' fp32 epsilon, as F.rms_norm)
        assert r["fused_rel"] < 1.25 * r["static_rel"] + 1e-3 and r["fused_vs_static"] < 2 * r["static_rel"], (name, r)


@needs_triton
def test_gemv_kernel_epilogues_equal_torch(interpreted):
    """fused_decode.gemv (a lone row's matrix products) for each epilogue, ragged tiles, both weight layouts."""
    checks = interpreted["gemv"]
    assert len(checks) == 40
    for name, r in checks.items():
        logits = name.endswith("logits")
        assert r["shape"] == [1, 70 if logits else 75], name   # the logits: the first n outputs only
        assert r["dtype"] == ("float32" if logits or name.startswith("float32") else "bfloat16"), name
        fp32_out = name.startswith("float32") or logits
        assert r["rel"] < (1e-5 if fp32_out else 1e-2), name  # bf16: the output's rounding (2^-9)


@needs_triton
def test_engine_streams_on_the_fused_path(interpreted):
    e = interpreted["engine"]
    assert e["mode"] == "fused"
    assert e["greedy_equal"] and e["sampled_equal"] and e["lone_greedy_equal"]
    assert e["decoders_kept"] == 2               # one per row count (2 and 1), reused across requests
    assert e["overflow_equal"] and e["overflow_tokens"] == 8
    assert e["batched_mode"] == "fused" and e["batched_equal"] == [True, True]  # nanochat.batching on the fused step


@needs_triton
def test_the_check_before_first_use_passes_the_kernels_and_refuses_a_wrong_attention(interpreted):
    """engine.check_fused_step on the real kernels (interpreted): the Engine checks' steps were checked and passed;
    healthy steps sit far inside the tolerances (fp32 1e-3, bf16 5e-2), a wrong attention output far outside."""
    c = interpreted["self_check"]
    assert c["verdicts"] == [None]  # one model shape decoded fused above: checked once, passed
    assert all(e < 1e-5 for e in c["fp32"].values()) and set(c["fp32"]) == {"1", "2"}
    assert all(e < 2e-2 for e in c["bf16"].values())
    assert "the fused step's logits are off the static step's" in c["broken_refused"]


@needs_triton
def test_a_batch_decodes_a_lone_row_on_the_fused_step_under_auto(interpreted):
    """auto as on CUDA: a 4-row batch on the graph step captures its 1-row step on the fused one; a request alone in
    row 0 after its companion left continues on the fused step from the K/V the static step wrote."""
    e = interpreted["engine"]
    assert e["lone_row_modes"] == ["fused", "graph", "graph"]
    assert e["lone_row_equal"] == [True, True] and e["lone_row_tokens"] == 10
    assert e["lone_row_fused_calls"] > 3  # beyond the capture's 3 calls: steps of the lone row


@needs_triton
def test_top_k_sampling_kernels_draw_what_torch_draws(interpreted):
    """nanochat.fused_sample against engine.sample_with's torch kernels, the same logits and uniforms per row: random
    logits at k from 1 to 64, the likeliest all in the first or the ragged last block, ties, most of the vocabulary at
    -inf, bf16 logits, uniforms 0 and 1 - 2^-24. A different token only where rounding or a tie explains it."""
    checks = dict(interpreted["sample"])
    engine = checks.pop("engine")
    assert len(checks) == 9
    for name, r in checks.items():
        assert r["unexplained"] == 0 and r["in_range"], (name, r)
        assert r["shape"] == [r["rows"], 1] and r["dtype"] == "torch.int64", name
        assert r["differ"] <= (r["rows"] if name.startswith(("ties", "random V1200")) else 0), (name, r)  # tied logits only
    assert checks["ties V600 k16 T1.0 float32"]["differ"] > 0  # ties did occur: topk's pick among them is its own
    # Engine's sampled streams (top-k, no top-p) go through the kernels, one call per step, and equal torch's
    assert engine["equal"] and engine["fused_calls"] == engine["tokens"] + 1 == 9  # + the check before first use
    assert engine["verdicts"] == [True]  # one kernel shape, checked once, passed


def test_top_k_sampling_kernels_serve_top_k_without_top_p_on_a_gpu(monkeypatch):
    """fused_sample.serves: top-k from 1 to 64 under the vocabulary, no top-p, on CUDA (or the interpreter), not off."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.zeros(2, 100)
    assert not fused_sample.serves(cpu, 50)  # a CPU without the interpreter keeps torch's kernels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if fused_sample.triton is None:
        assert not fused_sample.serves(cpu, 50)
        return
    assert fused_sample.serves(cpu, 50) and fused_sample.serves(cpu, 1) and fused_sample.serves(cpu, 64)
    assert not fused_sample.serves(cpu, None) and not fused_sample.serves(cpu, 65) and not fused_sample.serves(cpu, 0)
    assert not fused_sample.serves(cpu, 50, top_p=0.9) and fused_sample.serves(cpu, 50, top_p=1.0)
    assert not fused_sample.serves(torch.zeros(2, 50), 50)  # k = V: no top-k at all
    monkeypatch.setattr(fused_sample, "ENABLED", False)  # NANOCHAT_FUSED_SAMPLE=0
    assert not fused_sample.serves(cpu, 50)


def test_top_k_sampling_blocks_balance_the_two_sorts(monkeypatch):
    """block_size: about as many keys sorted per block program as the row's program sorts from all blocks."""
    monkeypatch.setattr(fused_sample, "BLOCK", None)
    for vocab in (80, 1000, 32768, 65536, 50257, 200_000):
        for k_p2 in (4, 16, 64):
            block = fused_sample.block_size(vocab, k_p2)
            candidates = -(-vocab // block) * k_p2
            assert block & (block - 1) == 0 and k_p2 <= block <= max(k_p2, fused_sample._pow2(vocab)), (vocab, k_p2)
            assert block <= 2 * fused_sample._pow2(candidates) and candidates <= 4 * block, (vocab, k_p2, block)
    assert fused_sample.block_size(65536, 64) == 2048
    monkeypatch.setattr(fused_sample, "BLOCK", 4096)  # NANOCHAT_FUSED_SAMPLE_BLOCK
    assert fused_sample.block_size(65536, 64) == 4096


@needs_triton
@pytest.mark.parametrize("block", [1024, 2048])
def test_top_k_sampling_kernels_compile_for_hopper(block, tmp_path, monkeypatch):
    """Both sampling kernels at d20's vocabulary (32,768 in bench/gpu.py, 65,536 in the speedrun) and k = 50, to an
    sm_90 cubin: the sort network fits in registers (no spills)."""
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    top_k = compile_for_hopper(fused_sample._block_top_k_kernel,
                               dict(logits_ptr="*fp32", keys_ptr="*i64", V="i32", stride_row="i32", NBLOCKS="i32"),
                               dict(BLOCK=block, K_P2=64), num_warps=fused_sample._warps(block))
    n = 32 * 64  # 32 blocks' candidates
    sample = compile_for_hopper(fused_sample._sample_kernel,
                                dict(keys_ptr="*i64", u_ptr="*fp32", out_ptr="*i64", top_k="i32", inv_temperature="fp32"),
                                dict(N=n, N_P2=n, K_P2=64), num_warps=fused_sample._warps(n))
    for compiled in (top_k, sample):
        report = ptxas_report(compiled.asm["ptx"], tmp_path)
        assert report["spill_bytes"] == 0 and report["registers"] <= 128, report["registers"]

@needs_triton
@pytest.mark.parametrize("group,has_ve", [(1, True), (1, False), (2, True)])
def test_kernels_compile_for_hopper(group, has_ve, tmp_path, monkeypatch):
    """The interpreter checks the arithmetic, not the compiler: each kernel also goes through Triton's real pipeline
    to an sm_90 cubin (PTX by LLVM, then the ptxas shipped in the wheel; no GPU needed), at the d20 shapes. The attention
    kernel must fit in 128 registers per thread: four programs per SM, which split_slots counts on (run 3's kernel held
    255, two per SM, and was latency-bound); the lanes kernel too, with fewer CTA barriers than the split kernel."""
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    bf16, f32 = "*bf16", "*fp32"
    g_p2 = fused_decode._pow2(group)
    kernels = [
        (fused_decode._prepare_kernel,
         dict(qkv_ptr=bf16, x_ptr=bf16, ids_ptr="*i64", ve_ptr=bf16, gate_ptr=bf16, cos_ptr=bf16, sin_ptr=bf16, pos_ptr="*i64",
              k_ptr=bf16, v_ptr=bf16, q_ptr=f32, max_len="i32", eps="fp32", scale="fp32"),
         dict(C=1280, C_P2=2048, H=10, HKV=10 // group, G=group, G_P2=g_p2, D=128, GATE=32, GATE_P2=32, HAS_VE=has_ve, PDL=True)),
        (fused_decode._attend_split_kernel,
         dict(q_ptr=f32, pos_ptr="*i64", k_ptr=bf16, v_ptr=bf16, acc_ptr=f32, m_ptr=f32, l_ptr=f32, arrivals_ptr="*i32",
              y_ptr=bf16, max_len="i32", window="i32", split_len="i32", nsplit="i32"),
         dict(H=10, HKV=10 // group, G=group, G_P2=g_p2, D=128, BLOCK=max(16, fused_decode.ATTEND_BLOCK // g_p2), ITERS=72,
              NSPLIT_P2=64, COMBINE=True, PDL=True)),
        (fused_decode._combine_kernel, dict(acc_ptr=f32, m_ptr=f32, l_ptr=f32, y_ptr=bf16), dict(D=128, NSPLIT=9, NSPLIT_P2=16, PDL=True)),
        (fused_decode._relu2_kernel, dict(h_ptr=bf16, x_ptr=bf16, N="i32", eps="fp32"), dict(C=1280, C_P2=2048, BLOCK=fused_decode.RELU2_BLOCK, PDL=True)),
        (fused_decode._embed_kernel,
         dict(ids_ptr="*i64", wte_ptr=bf16, x0_ptr=bf16, resid_ptr=bf16, x_ptr=bf16, mix_ptr=bf16, B="i32", stride_ids="i32",
              stride_wte="i32", eps="fp32"), dict(C=1280, C_P2=2048, L=20, MIX_FIRST=True, PDL=True)),
    ]
    if group == 1:  # the lanes kernel (one query head per K/V head), at its rows of 16 lane pairs
        kernels.append((fused_decode._attend_lanes_kernel, kernels[1][1],
                        dict(H=10, HKV=10, D=128, ROWS=16, PAIR=fused_decode.LANE_PAIR, ITERS=72, NSPLIT_P2=64, COMBINE=True, PDL=True)))
    warps = {fused_decode._prepare_kernel: fused_decode.PREPARE_WARPS, fused_decode._attend_split_kernel: fused_decode.ATTEND_WARPS}
    barriers = {}
    for fn, types, constants in kernels:
        compiled = compile_for_hopper(fn, types, constants, launch_pdl=True, num_warps=warps.get(fn, 4))
        assert "griddepcontrol.wait" in compiled.asm["ptx"], fn.__name__  # each waits for its predecessor itself
        barriers[fn] = compiled.asm["ptx"].count("bar.sync")
        if fn in (fused_decode._attend_split_kernel, fused_decode._attend_lanes_kernel):
            assert compiled.metadata.num_warps == 4
            report = ptxas_report(compiled.asm["ptx"], tmp_path)
            assert report["registers"] <= 128 and report["spill_bytes"] == 0
            # the splits combined by the last program: partials published (barrier, release) before the arrival, the
            # others' partials read past L1 after it (acquire), the counter set back
            ptx = compiled.asm["ptx"]
            arrive = re.search(r"atom\.global\.gpu\.acq_rel\.add\.u32|atom\.acq_rel\.gpu\.global\.add\.u32", ptx)
            assert arrive and "ld.global.cg" in ptx[arrive.end():], fn.__name__
            barrier = ptx.rindex("bar.sync", 0, arrive.start())  # the last barrier before the arrival follows every store
            assert "st.global" in ptx[:barrier] and "st.global" not in ptx[barrier:arrive.start()]
            assert re.search(r"atom\.\S*exch", ptx[arrive.end():])
            # the first block's older K/V is loaded before the wait for _prepare_kernel (griddepcontrol.wait: ACQBULK)
            assert report["sass"][:report["sass"].index("ACQBULK")].count("LDG.E.128") >= 2
        if fn is fused_decode._attend_lanes_kernel:  # its softmax reduces within warps: fewer CTA barriers
            assert barriers[fn] < barriers[fused_decode._attend_split_kernel], barriers
        if fn is fused_decode._prepare_kernel:  # one warp: its reductions need no CTA barrier, and it fits without spills
            report = ptxas_report(compiled.asm["ptx"], tmp_path)
            assert compiled.metadata.num_warps == 1 and report["spill_bytes"] == 0 and "bar.sync" not in compiled.asm["ptx"]
        if fn is fused_decode._embed_kernel:  # the token's embedding row is loaded before the wait
            report = ptxas_report(compiled.asm["ptx"], tmp_path)
            assert "LDG.E" in report["sass"][:report["sass"].index("ACQBULK")] and report["spill_bytes"] == 0


# d20's matrices at batch 1: (N, K) of qkv, proj, fc, mlp proj, lm_head (bench/gpu.py's vocab, 32,768)
D20_GEMVS = [(3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120), (32768, 1280)]


@needs_triton
@pytest.mark.parametrize("n,k", D20_GEMVS)
def test_gemv_kernel_streams_the_weight_in_128_bit_loads(n, k, tmp_path, monkeypatch):
    """_gemv_kernel at gemv_blocks' choice for each d20 matrix, with the epilogue its place in the step gives it, to an
    sm_90 cubin: the weight is read in 128-bit loads (LDG.E.128 in the SASS: 8 bf16 per thread per load), and it fits
    in registers (no spills) with room for several programs per SM."""
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    block_n, warps = fused_decode.gemv_blocks(n, k)
    lm_head, mlp_proj = n == 32768, k == 5120
    bf16 = "*bf16"
    types = dict(x_ptr=bf16, w_ptr=bf16, y_ptr="*fp32" if lm_head else bf16, add_ptr=bf16, resid_ptr=bf16, mix_ptr=bf16,
                 N="i32", eps="fp32", cap="fp32")
    constants = dict(K=k, K_P2=fused_decode._pow2(k), STRIDE_N=k, STRIDE_K=1, BLOCK_N=block_n, NORM=lm_head or n == 5120,
                     RELU2=n == 5120, ADD=n == 1280, MIX=mlp_proj, SOFTCAP=lm_head, PDL=True)
    compiled = compile_for_hopper(fused_decode._gemv_kernel, types, constants, num_warps=warps, launch_pdl=True)
    report = ptxas_report(compiled.asm["ptx"], tmp_path)
    assert report["spill_bytes"] == 0 and report["registers"] <= 96, report  # several programs per SM
    sass = report["sass"]
    assert "LDG.E.128" in sass
    # the weights are loaded before the wait for the previous kernel (programmatic dependent launch: griddepcontrol.wait
    # is ACQBULK in SASS), x after it: each thread issues all its weight loads (8 bf16 each; a warp covers 256 columns
    # per load) at once
    assert "griddepcontrol.wait" in compiled.asm["ptx"] and "griddepcontrol.launch_dependents" in compiled.asm["ptx"]
    wait = sass.index("ACQBULK")
    assert sass[:wait].count("LDG.E.128") == block_n * -(-k // (256 * warps)) and "LDG.E.128" in sass[wait:]


def test_gemv_tiles_hold_at_most_64_weights_per_thread(monkeypatch):
    """gemv_blocks at any width: a program's whole tile in registers (64 bf16 per thread at most), 4 to 16 warps."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for k in (64, 1280, 2048, 5120, 8192, 16384, 32768, 65536):
        for n in (1, 75, 1280, 65536):
            block_n, warps = fused_decode.gemv_blocks(n, k)
            assert 4 <= warps <= 16 and 1 <= block_n <= min(16, fused_decode._pow2(n)), (n, k)
            assert block_n * fused_decode._pow2(k) // (32 * warps) <= 64 or (block_n == 1 and warps == 16), (n, k)
    assert [fused_decode.gemv_blocks(n, k) for n, k in D20_GEMVS] == [(4, 8), (4, 8), (4, 8), (2, 8), (4, 8)]


def compile_for_hopper(fn, types, constants, **options):
    """triton.compile for sm_90 as a launch would specialize it: pointers (and integers) divisible by 16 marked so,
    which is what lets Triton vectorize the loads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    assert set(names) == set(types) | set(constants), fn.__name__
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t.startswith("*")}
    source = ASTSource(fn=fn, signature={n: types.get(n, "constexpr") for n in names},
                       constexprs={(names.index(k),): v for k, v in constants.items()}, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert f".entry {fn.__name__}" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 1000, fn.__name__
    return compiled


def ptxas_report(ptx, tmp_path):
    """What ptxas -v reports for a kernel's PTX (the ptxas that Triton itself runs), and nvdisasm's SASS of it."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    path, cubin = tmp_path / "kernel.ptx", tmp_path / "kernel.cubin"
    path.write_text(ptx)
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(path), "-o", str(cubin)],
                         capture_output=True, text=True, check=True)
    sass = subprocess.run([str(Path(ptxas).parent / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return dict(registers=int(re.search(r"Used (\d+) registers", out.stderr).group(1)),
                spill_bytes=int(spills.group(1)) if spills else 0, sass=sass)


def test_fused_mode_where_it_cannot_run_says_why(monkeypatch):
    """On a CPU without the interpreter (or without triton) an explicit decode='fused' raises a clear error."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="decode='fused': the fused decode step (runs on CUDA|needs the triton)"):
        run(Engine(random_gpt(), TOK, decode="fused").generate(PROMPT, max_tokens=2))
    assert Engine(random_gpt(), TOK).decode_mode() == "static"  # auto never picks it (static on a CPU)


def test_fused_mode_needs_a_power_of_two_head_dim(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = fused_decode.unavailable_reason(torch.device("cpu"), 48)
    assert why is not None and ("power-of-two head_dim" in why or "triton package" in why)
    if fused_decode.triton is not None:
        assert fused_decode.unavailable_reason(torch.device("cpu"), 64) is None


def test_cache_split_grows_with_the_batch(monkeypatch):
    """split_slots on an H100 (132 SMs), d20 (10 K/V heads) with a 2,304-slot cache: batch 1 keeps run 3's fastest
    split (64 slots, 360 programs), batch 8 and 32 get longer splits, so the programs stay within four per SM."""
    monkeypatch.setattr(fused_decode, "_sm_count", lambda index: 132)
    monkeypatch.setattr(fused_decode, "SPLIT_SLOTS", None)
    cuda = torch.device("cuda", 0)
    splits = {batch: fused_decode.split_slots(batch * 10, 2304, cuda) for batch in (1, 8, 32)}
    assert splits == {1: 64, 8: 512, 32: 4096}
    for batch, split in splits.items():
        assert batch * 10 * -(-2304 // split) <= 4 * 132
    assert fused_decode.split_slots(10, 2304, torch.device("cpu")) == fused_decode.MIN_SPLIT_SLOTS  # the interpreter
    monkeypatch.setattr(fused_decode, "SPLIT_SLOTS", 128)  # NANOCHAT_FUSED_SPLIT
    assert fused_decode.split_slots(320, 2304, cuda) == 128


@pytest.fixture
def fused_stand_in(monkeypatch):
    """The fused path made available on a plain CPU with a stand-in for fused_decode.fused_step (the static step, or a
    broken one): the check's verdict per call is what is under test here, the real kernels' in the interpreter."""
    import nanochat.engine as engine_mod
    monkeypatch.setattr(engine_mod, "step_unavailable", lambda mode, device, config: None)
    monkeypatch.setattr(engine_mod, "_fused_checked", {})
    calls = []

    def use(broken):
        def step(weights, *args):
            calls.append(1)
            logits = weights.step(*args)
            return logits.roll(1, dims=-1) if broken else logits  # a wrong token scored: what a misordered kernel does
        monkeypatch.setattr(fused_decode, "fused_step", step)
        return calls
    return use


def test_a_fused_step_that_agrees_with_the_static_step_decodes(fused_stand_in):
    calls = fused_stand_in(broken=False)
    model, kw = random_gpt(window_pattern="SL"), dict(num_samples=2, max_tokens=6, temperature=0.0)
    assert run(Engine(model, TOK, decode="fused").generate(PROMPT, **kw)) == run(Engine(model, TOK, decode="static").generate(PROMPT, **kw))
    assert len(calls) == 4 + 5  # the check (two steps of one row, two of two rows), then 5 decode steps (6 tokens)
    run(Engine(model, TOK, decode="fused").generate(PROMPT, **kw))
    assert len(calls) == 9 + 5  # checked once per process and model shape: the second engine's steps only


def test_a_fused_step_off_the_static_step_is_refused_and_auto_falls_back(fused_stand_in, monkeypatch):
    """Explicit decode='fused' raises, naming the error and the switch; auto (as on CUDA: fused for a lone row) warns
    and decodes the lone row on the next path, with the static path's stream; the verdict is kept, not re-measured."""
    import nanochat.engine as engine_mod
    calls = fused_stand_in(broken=True)
    model, kw = random_gpt(window_pattern="SL"), dict(max_tokens=6, temperature=0.0)
    want = run(Engine(model, TOK, decode="static").generate(PROMPT, **kw))
    with pytest.raises(RuntimeError, match=r"decode='fused': the fused step's logits are off the static step's .* "
                                           r"at 1 row\(s\), .* at 2 row\(s\) > 0.001 \(NANOCHAT_FUSED_CHECK=0"):
        run(Engine(model, TOK, decode="fused").generate(PROMPT, **kw))
    assert len(calls) == 4
    monkeypatch.setitem(engine_mod.AUTO_DECODE, "cpu", ("fused", "static"))
    engine = Engine(model, TOK)
    assert engine.decode_mode(1) == "fused"
    with pytest.warns(UserWarning, match=r"static decode \(fused\) failed, decoding on the static path"):
        assert run(engine.generate(PROMPT, **kw)) == want
    assert engine.decode_mode(1) == "static" and len(calls) == 4
    monkeypatch.setattr(engine_mod, "FUSED_CHECK", False)  # NANOCHAT_FUSED_CHECK=0: the broken step decodes
    assert run(Engine(model, TOK, decode="fused").generate(PROMPT, **kw)) != want


def test_top_k_sampling_kernels_are_checked_before_first_use(monkeypatch):
    """fused_sample.verified on a plain CPU, with sample_top_k stood in for: draws as torch's path draws pass the check
    (so the uniforms it builds give the tokens it expects); a wrong token or an exception fails it, with one warning,
    and sample_with then draws with torch's kernels for that shape; the verdict is kept per shape."""
    import nanochat.engine as engine_mod
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # sample_with asks fused_sample on a CPU only under the interpreter
    monkeypatch.setattr(fused_sample, "serves", lambda logits, top_k, top_p=None: top_k is not None)
    monkeypatch.setattr(fused_sample, "_verdicts", {})
    logits, u = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)), torch.rand(3, 1)

    def torch_draws(logits, u, temperature, top_k):
        with monkeypatch.context() as m:
            m.setattr(fused_sample, "serves", lambda *args, **kw: False)
            return engine_mod.sample_with(logits.float(), u, temperature, top_k)
    for dtype in (torch.float32, torch.bfloat16):
        for k in (1, 2, 7, 64):
            monkeypatch.setattr(fused_sample, "sample_top_k", torch_draws)
            assert fused_sample.check_draws(torch.device("cpu"), dtype, 300, k) is None, (dtype, k)
    calls = []
    monkeypatch.setattr(fused_sample, "sample_top_k", lambda *args: calls.append(1) or torch_draws(*args) + 1)
    assert "where the uniforms give" in fused_sample.check_draws(torch.device("cpu"), torch.float32, 300, 20)
    want = torch_draws(logits, u, 0.9, 20)
    calls.clear()
    with pytest.warns(UserWarning, match=r"top-k sampling kernels failed their check on cpu \(vocabulary 300, top_k 20\)"):
        assert torch.equal(engine_mod.sample_with(logits, u, 0.9, 20), want)
    assert len(calls) == 1  # the check's draw only
    want = torch_draws(logits, u, 0.9, 17)
    calls.clear()
    assert torch.equal(engine_mod.sample_with(logits, u, 0.9, 17), want) and not calls  # same shape (k up to 32): kept
    monkeypatch.setattr(fused_sample, "sample_top_k", lambda *args: 1 / 0)
    with pytest.warns(UserWarning, match="ZeroDivisionError"):
        engine_mod.sample_with(logits, u, 0.9, 40)  # k rounds up to 64: another shape, checked, refused
    assert fused_sample._verdicts == {("cpu", torch.float32, 300, 32): False, ("cpu", torch.float32, 300, 64): False}
    monkeypatch.setattr(fused_sample, "sample_top_k", torch_draws)
    assert torch.equal(engine_mod.sample_with(logits, u, 0.9, 3), torch_draws(logits, u, 0.9, 3))
    assert fused_sample._verdicts[("cpu", torch.float32, 300, 4)] is True
