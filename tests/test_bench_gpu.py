"""bench/gpu.py (issue #13) on CPU: the --smoke run passes its correctness rows and writes the JSON and table,
a tiny --budget-s skips rows instead of running them, a worker that outlives the budget is killed, and the
tokenizer fallback the GPU image needs (no rustbpe) works."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"


def load_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu(tmp_path, *flags):
    """OUT in tmp_path; TMPDIR and TORCHINDUCTOR_CACHE_DIR are already there (conftest's isolated_env)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", *flags], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OUT": str(out)}, timeout=300)
    return proc, out


def test_smoke_on_cpu(tmp_path):
    proc, out = run_gpu(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    assert {"meta", "peaks", "rows", "finished", "budget_s", "elapsed_s"} <= set(data)
    assert data["finished"] is True
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"]
    rows = {r["name"]: r for r in data["rows"]}
    for r in data["rows"]:
        assert {"section", "name", "status", "result", "target", "met", "metrics", "notes"} <= set(r)

    correctness = [r for r in data["rows"] if r["section"] == "correctness"]
    assert len(correctness) == 6
    for name in ("bf16 train steps vs fp32", "sliding window vs dense", "KV decode vs full forward", "graph decode vs eager"):
        assert rows[name]["status"] == "ok" and rows[name]["met"] is True, rows[name]
    assert rows["sliding window vs dense"]["metrics"]["window_effect"] > 0  # the windows really change the model
    assert rows["KV decode vs full forward"]["metrics"]["engine_rows_equal"] is True
    graph = rows["graph decode vs eager"]["metrics"]
    assert graph["mode"] == "static" and graph["streams_equal"] == {"1": True, "2": True, "overflow": True}  # fp32: exact
    assert rows["fp8 vs bf16"]["status"].startswith("skipped: fp8 needs")  # no fp8 on a CPU
    assert rows["fused decode vs eager"]["status"].startswith("skipped: the fused decode step")  # Triton: CUDA (or interpreted)

    # one tiny row of every measuring section ran and measured something
    assert data["peaks"]["matmul_flops"] > 0 and data["peaks"]["copy_bytes_s"] > 0
    gemv = rows.pop("d2 GEMVs: Triton kernel vs cuBLAS (smoke)")  # the fused step's kernel: CUDA (or interpreted)
    assert gemv["status"].startswith("skipped: the fused decode step")
    sampling = rows.pop("d2 sampling: Triton top-k vs torch (smoke)")
    for name in ("d2 attention tilings, batch 1 (smoke)", "d2 attention anatomy, batch 1 (smoke)"):
        assert rows.pop(name)["status"].startswith("skipped: the fused decode step")
    assert sampling["status"].startswith("skipped: the sampling kernels run on CUDA")
    measuring = [r for r in rows.values() if r["section"] != "correctness"]
    by_section = {r["section"]: r for r in measuring}
    assert set(by_section) == {"device", "train", "optimizer", "inference", "dataloader", "pipeline"}
    for r in measuring:
        assert r["status"] == "ok", r
        assert r["met"] is None  # smoke sizes: no target verdicts
    assert by_section["train"]["metrics"]["tok_s"] > 0
    assert by_section["optimizer"]["metrics"]["opt_ms"] > 0
    for name, decode in (("d2 batch 1 static (smoke)", "static"), ("d2 batch 1 eager (smoke)", "eager")):
        assert rows[name]["metrics"]["decode"] == decode
        assert rows[name]["metrics"]["decode_tok_s"] > 0 and rows[name]["metrics"]["bw_util"] > 0
    batched = rows["d2 batch 4 static, 4 requests batched (smoke)"]["metrics"]  # continuous batching: 4 prompts, 4 rows
    assert (batched["mode"], batched["batch"], batched["decode"]) == ("batched", 4, "static") and batched["decode_tok_s"] > 0
    diag = rows["chat_eval decode diagnostic (smoke)"]
    assert set(diag["metrics"]["runs"]) == {"eager", "eager, no cuDNN SDPA", "graph"} and diag["notes"].startswith("verdict: ")
    for run in diag["metrics"]["runs"].values():
        assert run["cold"]["prompts_done"] == 3 and run["warm"]["step_ms_mean"] > 0
        assert run["profile"]["top_self_cpu"] and "aten::" in run["profile"]["table_cpu"]
    assert "by self CPU time" in (out / "gpu_log.txt").read_text()
    assert by_section["dataloader"]["metrics"]["best_tok_s"] > 0
    assert list(by_section["pipeline"]["metrics"]["stages"]) == ["data", "tok_train", "base_train"]

    # one table, printed last and saved
    table = (out / "gpu_table.md").read_text()
    assert table.startswith("| section | row | result | target | met? |")
    assert table.count("\n") == len(data["rows"]) + 2
    assert "| correctness | KV decode vs full forward |" in proc.stdout
    assert (out / "gpu_log.txt").read_text().count("\n") >= len(data["rows"])


def test_gemv_sampling_and_attention_rows_in_the_interpreter(tmp_path):
    """The GEMV, sampling and attention (tilings, anatomy) rows with their Triton kernels in Triton's interpreter (as the fused
    decode check runs them): every matrix of the model timed against torch's product and checked against it; top-k
    sampling timed against torch's and drawing the same logits; the attention at two tilings, timed, giving the same
    outputs, the fastest kept for the decode row."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--rows", "GEMV,sampling,attention"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OUT": str(out), "TRITON_INTERPRET": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gemv, sampling, attention, anatomy = json.loads((out / "gpu.json").read_text())["rows"]
    assert anatomy["status"] == "ok", anatomy
    assert set(anatomy["metrics"]["us"]) == {"prepare + attend", "attend alone", "no-op kernel, no PDL"}
    assert all(t > 0 for t in anatomy["metrics"]["us"].values())
    assert attention["status"] == "ok", attention
    a = attention["metrics"]
    assert set(a["us"]) == {"64,32,4,split", "32,32,4,split", "64,32,4,lanes"} and all(t > 0 for t in a["us"].values())
    assert a["rel_err"]["64,32,4,split"] == 0  # other splits, the other kernel: the same outputs in fp32
    assert a["rel_err"]["32,32,4,split"] < 1e-5 and a["rel_err"]["64,32,4,lanes"] < 1e-5
    assert ",".join(map(str, a["best"])) == min(a["us"], key=a["us"].get) and a["qkv_gemvs_us"] > 0
    assert gemv["status"] == "ok", gemv
    m = gemv["metrics"]
    assert list(m["matrices"]) == ["qkv", "proj", "fc", "mlp_proj", "lm_head"]
    assert m["max_rel_err"] < 1e-5  # fp32 on the CPU
    for name, r in m["matrices"].items():
        assert r["us"]["cublas"] > 0 and r["us"][r["default"]] > 0 and r["per_step"] == (1 if name == "lm_head" else 2)
    assert m["step_ms"]["triton"] > 0 and m["step_ms"]["best"] <= m["step_ms"]["triton"]
    assert sampling["status"] == "ok", sampling
    s = sampling["metrics"]
    assert s["same_logit"] == 1.0 and s["rows"] == 4 and s["vocab"] == 512 and s["us"]["1 triton"] > 0 and s["us"]["1 torch"] > 0


def test_tiny_budget_skips_rows(tmp_path):
    proc, out = run_gpu(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    assert data["finished"] is True and len(data["rows"]) == 20
    assert all(r["status"] == "skipped: budget" for r in data["rows"])
    assert "skipped: budget" in proc.stdout


def test_rows_and_skip_pick_rows_by_name(tmp_path):
    """--rows keeps rows whose name holds one of its substrings (any case), --skip drops them; the plan's order stays."""
    proc, out = run_gpu(tmp_path, "--budget-s", "0", "--rows", "static,kv DECODE,graph,speedrun", "--skip", "eager")
    # "graph decode vs eager" is skipped: "eager" is in its name
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [r["name"] for r in json.loads((out / "gpu.json").read_text())["rows"]]
    assert names == ["KV decode vs full forward", "d2 batch 1 static (smoke)", "d2 batch 4 static, 4 requests batched (smoke)",
                     "speedrun --profile ci: data, tok_train, base_train (smoke)"]


def test_budget_runs_out_mid_plan(tmp_path):
    """A row that overruns the budget is kept, every later row is skipped, and the JSON is rewritten after each row."""
    import torch  # noqa: F401 - imported now, not inside the first row's cleanup (the budget is 2 s)
    gpu = load_gpu()
    report = gpu.Report(argparse.Namespace(budget_s=2.0, smoke=True), tmp_path / "out")

    def slow():
        time.sleep(2.1)
        return dict(status="ok", result="slow")

    def on_disk():
        return [r["name"] for r in json.loads((tmp_path / "out" / "gpu.json").read_text())["rows"]]

    report.run("correctness", "first", 0.1, lambda: dict(status="ok"))
    assert on_disk() == ["first"]
    report.run("train", "slow", 0.1, slow)
    assert on_disk() == ["first", "slow"]
    report.run("train", "third", 0.1, lambda: dict(status="ok"))
    report.run("train", "fourth", 0, lambda: dict(status="ok"))
    assert [r["status"] for r in report.rows] == ["ok", "ok", "skipped: budget", "skipped: budget"]
    assert on_disk() == ["first", "slow", "third", "fourth"]
    report.save(finished=True)
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["finished"] is True


def test_worker_past_budget_is_killed(tmp_path):
    gpu = load_gpu()
    args = argparse.Namespace(budget_s=1.0, smoke=True, device="cpu")
    report = gpu.Report(args, tmp_path / "out")
    bench = gpu.Bench(args, report)
    t0 = time.perf_counter()
    res, _, why = bench.run_child([sys.executable, "-c", "import time; time.sleep(60)"], bench.child_env())
    assert res is None and why.startswith("skipped: budget (killed")
    assert time.perf_counter() - t0 < 50  # killed, not waited for


def test_sdpa_row_hides_flash_attention(tmp_path):
    gpu = load_gpu()
    bench = gpu.Bench(argparse.Namespace(budget_s=10, smoke=True, device="cpu"), gpu.Report(argparse.Namespace(budget_s=10), tmp_path / "o"))
    env = bench.child_env(force_sdpa=True)
    proc = subprocess.run([sys.executable, "-c", "import flash_attn_interface"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "disabled by bench/gpu.py" in proc.stderr


def test_tokenizer_without_rustbpe():
    """The GPU image has tokenizers and tiktoken but no rustbpe: the dataloader row trains with HF, runs tiktoken."""
    gpu = load_gpu()
    from nanochat import dataset
    docs, _ = dataset.embedded_documents(50_000)
    tok, kind = gpu.bench_tokenizer(docs, 400, backend="hf")
    assert "tiktoken" in kind and tok.get_vocab_size() == 400
    text = docs[0][:300] + " héllo 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())


def test_checks_catch_an_off_by_one_window(tmp_path, monkeypatch):
    """The correctness rows are not vacuous: a window one token too wide in the masked path fails the attention
    check, and one too wide in the decode path fails the KV check."""
    import nanochat.gpt as gpt
    gpu = load_gpu()
    args = argparse.Namespace(budget_s=60, smoke=True, device="cpu")
    bench = gpu.Bench(args, gpu.Report(args, tmp_path / "out"))
    real_mask, real_attention = gpt.attention_mask, gpt.attention
    monkeypatch.setattr(gpt, "attention_mask", lambda Tq, Tk, window, device: real_mask(Tq, Tk, window + (window >= 0), device))
    assert gpu.check_sliding_window(bench)["status"] == "FAIL"
    monkeypatch.setattr(gpt, "attention_mask", real_mask)

    def wide_decode(q, k, v, window):
        return real_attention(q, k, v, window + 1 if q.size(2) == 1 and window >= 0 else window)
    monkeypatch.setattr(gpt, "attention", wide_decode)
    assert gpu.check_kv_decode(bench)["status"] == "FAIL"
    monkeypatch.setattr(gpt, "attention", real_attention)

    from nanochat.kv_cache import StaticKVCache  # the static step's mask one slot too wide fails the graph-decode check
    assert gpu.check_graph_decode(bench)["status"] == "ok"
    real_visible = StaticKVCache.visible
    monkeypatch.setattr(StaticKVCache, "visible", lambda self, w: real_visible(self, w + 1 if w >= 0 else w))
    assert gpu.check_graph_decode(bench)["status"] == "FAIL"


def test_chat_diag_verdict():
    gpu = load_gpu()

    def run(cold, warm, cudnn=False):
        return dict(cold=dict(step_ms_mean=cold, prefill_ms_median=cold * 10), warm=dict(step_ms_mean=warm),
                    profile=dict(attention_ops={"aten::_scaled_dot_product_cudnn_attention" if cudnn else "aten::sdpa": {}}))
    cudnn = {"eager": run(15.0, 1.0, cudnn=True), "eager, no cuDNN SDPA": run(1.1, 1.0), "graph": run(0.3, 0.3)}
    assert "cuDNN SDPA per-shape cost: CONFIRMED" in gpu.chat_diag_verdict(cudnn)
    assert "cuDNN SDPA ops in the eager profile: yes" in gpu.chat_diag_verdict(cudnn)
    other = {"eager": run(15.0, 1.0), "eager, no cuDNN SDPA": run(14.0, 1.0), "graph": run(0.3, 0.3)}
    assert "a per-shape cost that is not cuDNN SDPA" in gpu.chat_diag_verdict(other)
    steady = {"eager": run(12.0, 11.5), "eager, no cuDNN SDPA": run(12.1, 11.9), "graph": run(0.3, 0.3)}
    assert "no per-shape cost" in gpu.chat_diag_verdict(steady)
    assert "incomplete" in gpu.chat_diag_verdict({"eager": dict(status="error")})


def test_hbm_from_the_datasheet_when_the_device_row_did_not_run():
    gpu = load_gpu()
    assert gpu.datasheet_hbm(argparse.Namespace(cuda=True, gpu="NVIDIA H100 80GB HBM3")) == 3.35e12
    assert gpu.datasheet_hbm(argparse.Namespace(cuda=True, gpu="NVIDIA H100 PCIe")) == 2.0e12
    assert gpu.datasheet_hbm(argparse.Namespace(cuda=False, gpu="")) is None


def test_decode_predictions_are_the_gpus_own():
    """The decode rows' notes compare against predictions for the GPU they ran on (the lent kind changes), none else."""
    gpu = load_gpu()
    h100, h200 = gpu.predicted_tok_s("NVIDIA H100 80GB HBM3"), gpu.predicted_tok_s("NVIDIA H200")
    assert h100 and h200 and h100 != h200 and set(h100) == set(h200)
    assert h200["fused"] > h100["fused"]  # more bandwidth under the same kernels
    assert gpu.predicted_tok_s("NVIDIA A10G") == {} and gpu.predicted_tok_s("") == {}


def test_the_pipeline_row_stops_at_its_cap(tmp_path, monkeypatch):
    """One row can no longer eat the whole budget: past PIPELINE_CAP_S the runner is killed, the row says so and
    lists the stages that finished."""
    gpu = load_gpu()
    args = argparse.Namespace(budget_s=300, smoke=True, device="cpu")
    bench = gpu.Bench(args, gpu.Report(args, tmp_path / "out"))
    monkeypatch.setattr(gpu, "PIPELINE_CAP_S", 2)
    t0 = time.perf_counter()
    row = gpu.pipeline_row(bench)
    assert row["status"] == "stopped: row cap (killed after 2 s)" and row["notes"].startswith("done: ")
    assert time.perf_counter() - t0 < 30


def test_a_failing_stage_fails_the_pipeline_row(tmp_path):
    """A stage that exits non-zero on the device is a FAIL (exit code 1), not a row that reads as measured."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--only", "pipeline"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OUT": str(out), "NANOCHAT_DEPTH": "deep"}, timeout=300)
    (row,) = json.loads((out / "gpu.json").read_text())["rows"]
    assert row["status"] == "FAIL" and proc.returncode == 1, row
    assert "--depth: expected an integer, got 'deep'" in row["notes"]  # the runner's one-line error, before any stage


def test_profile_decode_reads_a_running_stream():
    """The inference rows' profile (CUDA kernels per step on a GPU; here: no kernels, the wall time only)."""
    import torch
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    inference = load_gpu().load_bench("inference")
    model = GPT.create(GPTConfig.from_depth(1, 256, 64, head_dim=32)).eval()
    engine = Engine(model, inference.SpecialsOnlyTokenizer(256), decode="static")
    with torch.no_grad():
        prof = inference.profile_decode(lambda: engine.generate(list(range(10)), max_tokens=30), cuda=False, steps=8)
    assert prof["steps"] == 8 and prof["kernels_per_step"] == 0 and prof["wall_ms_per_step"] > 0
    assert engine._idle  # the profiled stream was closed: its decoder went back for reuse
    assert prof["gpu_span_ms_per_step"] == 0
    # overlapping kernels (programmatic dependent launch) count once in the span, twice in the busy time
    assert inference.covered_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert inference.covered_us([]) == 0


def test_batched_rows_ask_for_no_profile(tmp_path, monkeypatch):
    """On a GPU a batched row's worker profiles nothing (the Batcher's thread decodes ahead of the consumer: a window
    of consumed tokens holds no steps), and a row's notes are built from whatever the worker echoes back (run 4: the
    row's profile flag came back and was read as a profile)."""
    gpu = load_gpu()
    args = argparse.Namespace(budget_s=300, smoke=True, device="cpu")
    bench = gpu.Bench(args, gpu.Report(args, tmp_path / "out"))
    bench.cuda, bench.gpu = True, "NVIDIA H200"
    sent = []

    def run_child(cmd, env, cap_s=None):  # the worker echoes its row, as bench/inference.py's measure does
        sent.append(json.loads(cmd[cmd.index("--one") + 1]))
        return dict(sent[-1], ttft_ms=20.0, decode_tok_s=1500.0, decode_ms_per_step=0.66, peak_gb=9.9, warmup_s=1.0), "", "ok"
    monkeypatch.setattr(bench, "run_child", run_child)
    batched = gpu.inference_row(bench, 1, "auto", mode="batched", rows=32)
    assert batched["status"] == "ok" and sent[-1]["profile"] is False and "kernels/step" not in batched["notes"]
    lone = gpu.inference_row(bench, 1, "graph")
    assert lone["status"] == "ok" and sent[-1]["profile"] is True and "kernels/step" not in lone["notes"]


def test_profile_notes_name_the_kernels_that_take_the_step():
    prof = dict(kernels_per_step=146.0, gpu_busy_ms_per_step=0.71, gpu_span_ms_per_step=0.62, wall_ms_per_step=0.66,
                top_kernels_ms_per_step=[("_gemv_kernel", 0.38, 81.0), ("_attend_split_kernel", 0.1, 20.0),
                                         ("void at::native::(anonymous namespace)::sample(float*, long)", 0.01, 1.0)])
    notes = load_gpu().profile_notes(prof)
    assert notes == ("146 kernels/step, GPU busy 0.71 (covered 0.62) of 0.66 ms/step (profiled); top: _gemv_kernel 0.380 ms "
                     "×81, _attend_split_kernel 0.100 ms ×20, void at::native:: 0.010 ms ×1")


def test_decode_ops_counts_the_static_step_below_the_eager_one():
    """bench/decode_ops.py: the GPU kernel budget counted on the CPU (one op per non-view aten call, rms_norm as one;
    the fused step's Triton kernels one launch each)."""
    spec = importlib.util.spec_from_file_location("bench_decode_ops", REPO / "bench" / "decode_ops.py")
    decode_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_ops)
    import nanochat.gpt
    plain_norm = nanochat.gpt.norm
    counts = decode_ops.measure(depth=2, prompt=8, max_len=32, vocab=64, head_dim=32)
    assert nanochat.gpt.norm is plain_norm  # the counting norm is put back
    static, fused, fused_cublas, eager = counts.values()
    import nanochat.fused_decode
    fd = nanochat.fused_decode
    assert (fd.attend.__name__, fd.gemv.__name__, fd.embed.__name__) == ("attend", "gemv", "embed")  # put back
    assert static["rms_norm"] == 2 * 3 + 2  # per layer: x, q and k together, the MLP input; then embedding and final
    assert static["baddbmm"] == 2 and static["_softmax"] == 2 and "pow" in static and "mean" not in static
    assert static["addmm"] == 2 * 2  # the residual adds ride in the projections' GEMMs
    assert fused_cublas["rms_norm"] == 1 and fused_cublas["mm"] == 2 * 2 + 1 and fused_cublas["addmm"] == 2 * 2  # the final norm
    assert fused_cublas["triton embed"] == fused["triton embed"] == 1  # the embedding, its norm and the x0 mixes
    assert fused_cublas["triton prepare"] == fused_cublas["triton attend"] == 2
    assert "triton combine" not in fused and "triton combine" not in fused_cublas  # the attention's last programs combine
    assert fused_cublas["triton relu2"] == 2
    # one row: every product a GEMV kernel (4 per layer + the lm_head), the norms, ReLU^2 and x0 mixes in them
    assert fused["triton gemv"] == 4 * 2 + 1 and "triton relu2" not in fused and "mm" not in fused and "addmm" not in fused
    assert "rms_norm" not in fused and "addcmul" not in fused and fused["triton attend"] == 2  # layer 0's mix: in embed
    assert sum(fused.values()) < sum(fused_cublas.values()) < sum(static.values()) < sum(eager.values())
