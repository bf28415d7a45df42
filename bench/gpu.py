"""
GPU performance benchmark (issue #13): correctness on the device first, then speed. One table, JSON under $OUT.

    python bench/gpu.py --budget-s 480         on a lent H100/H200 (one 600 s device call)
    python bench/gpu.py --device cpu --smoke   every code path at toy sizes on CPU, well under a minute

Sections, in priority order (rows that no longer fit in --budget-s are recorded as "skipped: budget"; see plan()):
  correctness  bf16 training steps vs an fp32 reference (loss and gradient relative error); sliding-window
               attention vs a dense float64 reference (kernel, FA3 when loaded, and the model's layer wiring);
               KV-cache decode vs a full forward (logits, greedy tokens, the Engine); the static decode step in a
               CUDA graph, and the fused (Triton) step, vs the eager KV-cache path (logits, greedy Engine streams,
               cache overflow); fp8 vs bf16
  device       measured bf16 matmul peak (the MFU denominator) and device-to-device copy bandwidth
  train        d20 bf16 base_train step (forward + backward + MuonAdamW) via bench/train.py's worker: tokens/s, MFU
               vs the measured peak, peak memory; device batch = largest that fits (eager probe, OOM-safe)
  inference    the fused step's GEMV kernel vs cuBLAS on each d20 matrix (one row); bench/inference.py's worker:
               d20 decode at batch 1/8/32 on the CUDA-graph path and the fused path (batch 1 also with cuBLAS GEMVs),
               batch 1 on the eager path (the old one); HBM utilisation at batch 1, kernels and GPU-busy time per step
  train        d24 bf16 vs fp8
  inference    the chat_eval decode diagnostic: the ci model's greedy decode over varying prompt lengths, cold
               vs warm, with and without cuDNN SDPA, and on the graph path, with torch.profiler tables
  inference    d20 batch 1 on the compiled static decode step
  optimizer    MuonAdamW.step() alone, as a share of the d20 step
  dataloader   tokens/s of the tokenizing best-fit packer on this host (bench/dataloader.py's measure)
  pipeline     every stage of `nanochat speedrun --profile ci` on this device (bf16, compile auto, 4 problems per
               chat_eval task), capped at PIPELINE_CAP_S: FAIL if a stage fails; the stages that finished are listed
  train        the rest: d20/d12/d24 variants (eager, fp8, SDPA vs FlashAttention-3)

Outputs: $OUT/gpu.json (rewritten after every row, so a killed run keeps what it measured), $OUT/gpu_table.md,
$OUT/gpu_log.txt. $OUT defaults to ./gpu_out.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# issue #13 targets
MFU_TARGET = 0.45          # d20 bf16 on one H100, vs the measured bf16 matmul peak
FP8_SPEEDUP_TARGET = 0.10  # fp8 tokens/s over bf16 at d24
OPTIM_SHARE_TARGET = 0.05  # optimizer step / whole step
FUSED_CHECK_SPLIT = 32     # cache slots per attention program in the fused decode check (production: 64 and up, by batch)
DECODE_BW_TARGET = 0.50    # batch-1 decode bytes/s over HBM bandwidth
LOADER_TARGET = 3.0        # dataloader tokens/s over what the d20 step consumes (bench/dataloader.py's target)
NANOCHAT_STEP_TOKENS = 524288  # nanochat's tokens per optimizer step (grad accumulation on one GPU)
PIPELINE_CAP_S = 240       # the pipeline row's own time limit (run 1: it ate 343 s and every row after it; run 3: 228 s for all)
# batch-1 d20 decode tok/s predicted before the run that measures them, by GPU (bench/GPU.md explains the arithmetic):
# the fused step (Triton GEMVs, programmatic dependent launch, the splits combined by the attention's last programs,
# top-k sampling in Triton), with a combine kernel, with torch's sampling, without PDL, and with run 3's cuBLAS GEMVs
# (today's attention kernels) before run 4; on the H100 eager, graph and compile as measured (runs 1 and 3, torch's
# sampling)
DECODE_PREDICTED_TOK_S = {
    "H100": {"eager": 87, "graph": 563, "compile": 721, "fused": 1625, "fused, combine kernel": 1560,
             "fused, torch sampling": 1575, "fused, no PDL": 1390, "fused, cublas GEMVs, no PDL": 970},
    "H200": {"eager": 90, "graph": 600, "compile": 780, "fused": 2130, "fused, combine kernel": 2010,
             "fused, torch sampling": 2050, "fused, no PDL": 1760, "fused, cublas GEMVs, no PDL": 1350},
}

# full-size configs (the issue) and the toy ones of --smoke
FULL = dict(seq=2048, vocab=32768, head_dim=128, window="SSSL", steps=5, batches=[64, 32, 16, 8, 4, 2, 1],
            small=dict(depth=4, vocab=4096, seq=256, head_dim=64, short_window=32, batch=4, prompt=128, new=16),
            infer=dict(depth=20, prompt=2048, new_tokens=256, repeats=3),
            loader=dict(max_chars=0, vocab=16384, B=32, T=2048, batches=20, threads=[1, 4]))
SMOKE = dict(seq=128, vocab=512, head_dim=32, window="SSSL", steps=2, batches=[2],
             small=dict(depth=2, vocab=512, seq=64, head_dim=32, short_window=8, batch=2, prompt=32, new=12),
             infer=dict(depth=2, prompt=16, new_tokens=8, repeats=1),
             loader=dict(max_chars=100_000, vocab=512, B=4, T=128, batches=5, threads=[1]))

# relative-error tolerances by compute dtype (METHOD.md: fp32 far under 1e-3, bf16 operands 1e-3..1e-2)
TOL = {
    "float32": dict(attn=1e-4, logits=1e-4, loss=1e-4, grad=1e-3),
    "bfloat16": dict(attn=2e-2, logits=3e-2, loss=1e-2, grad=5e-2),
}
FP8_TOL = dict(fwd=0.1, grad=0.25, loss=5e-2)  # e4m3 forward, e5m2 gradients: loose by design


def load_bench(name):
    """bench/<name>.py as a module (bench/ is not a package); we only read these files."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# -----------------------------------------------------------------------------
# the report: rows, budget, incremental JSON

class Report:
    def __init__(self, args, out_dir):
        self.args, self.out_dir = args, out_dir
        self.t0 = time.perf_counter()
        self.rows, self.meta, self.peaks = [], {}, {}
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = out_dir / "gpu_log.txt"
        self.log_path.write_text("")

    def elapsed(self):
        return time.perf_counter() - self.t0

    def remaining(self):
        return self.args.budget_s - self.elapsed()

    def log(self, msg):
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run(self, section, name, min_s, fn):
        """Run one row unless fewer than min_s seconds of the budget are left; save the JSON either way."""
        row = dict(section=section, name=name, status="skipped: budget", result="", target="", met=None, metrics={}, notes="")
        if self.remaining() >= min_s:
            t0 = time.perf_counter()
            try:
                row.update(fn())
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
                row["status"] = f"error: {type(e).__name__}: {first_line(e)}"
                self.log(traceback.format_exc())
            row["seconds"] = round(time.perf_counter() - t0, 1)
            if self.args.smoke and section != "correctness":
                row["met"] = None  # toy sizes: the targets are for the full-size GPU rows
            free_device_memory()
        self.rows.append(row)
        self.save()
        self.log(f"{section} / {name}: {row['status']} {row['result']} {row['notes']}".rstrip())
        return row

    def save(self, finished=False):
        data = dict(meta=self.meta, peaks=self.peaks, budget_s=self.args.budget_s, elapsed_s=round(self.elapsed(), 1),
                    finished=finished, rows=self.rows)
        tmp = self.out_dir / "gpu.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.out_dir / "gpu.json")  # atomic: a kill mid-write leaves the previous version

    def table(self):
        lines = ["| section | row | result | target | met? | status / notes |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = {True: "yes", False: "NO", None: ""}[r["met"]]
            notes = r["status"] if r["status"] != "ok" else ""
            notes = "; ".join(x for x in (notes, r["notes"]) if x)
            lines.append(f"| {r['section']} | {r['name']} | {r['result']} | {r['target']} | {met} | {notes} |")
        return "\n".join(lines)


def free_device_memory():
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# context: device, dtype, configs, measured peaks, results other rows build on

class Bench:
    def __init__(self, args, report):
        import torch
        self.args, self.report = args, report
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.cfg = SMOKE if args.smoke else FULL
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # what training computes in on this device
        self.dtype_name = str(self.dtype).replace("torch.", "")
        self.gpu = torch.cuda.get_device_name(self.device) if self.cuda else ""
        self.train = {}      # (depth, compile, fp8, attn) -> worker result
        self.infer = {}      # (batch, decode path) -> inference worker result
        self.fit = {}        # depth -> probed device batch
        self.peak_flops = None
        self.hbm = None
        self.attend_best = None  # (split, block, warps, kernel): the attention tiling row's fastest
        self.inductor_dir = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nanochat-gpu-inductor"))

    def sync(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_it(self, fn, reps, warmup):
        """Median seconds of fn() (CUDA events on the GPU, wall clock on the CPU), after warm-up calls."""
        import torch
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # -- small models for the correctness checks

    def small_config(self, **overrides):
        from nanochat.gpt import GPTConfig
        s = self.cfg["small"]
        kw = dict(head_dim=s["head_dim"], n_kv_head=2, window_pattern="SSSL", short_window=s["short_window"])  # GQA on
        kw.update(overrides)
        return GPTConfig.from_depth(s["depth"], s["vocab"], s["seq"], **kw)

    def small_model(self, config, dtype, state=None, seed=0):
        """A small GPT in `dtype` with every weight random (the zero-init projections would make attention a no-op)."""
        import torch
        from nanochat.gpt import GPT
        torch.manual_seed(seed)  # init_weights draws the embeddings from the global generator
        model = GPT.create(config, self.device, dtype=dtype)
        if state is None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                        p.copy_(torch.randn(p.shape, generator=g) * p.size(1) ** -0.5)
        else:
            model.load_state_dict(state)
        return model

    def tokens(self, shape, vocab, seed):
        import torch
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(self.device)

    # -- children (bench/train.py and bench/inference.py workers)

    def child_env(self, force_sdpa=False):
        path = [str(REPO)]
        if force_sdpa:  # a flash_attn_interface that fails to import: nanochat.gpt falls back to SDPA
            shim = Path(tempfile.gettempdir()) / "nanochat-gpu-no-fa3"
            shim.mkdir(parents=True, exist_ok=True)
            (shim / "flash_attn_interface.py").write_text("raise ImportError('disabled by bench/gpu.py (SDPA row)')\n")
            path.insert(0, str(shim))
        return dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]),
                    TORCHINDUCTOR_CACHE_DIR=self.inductor_dir)

    def run_child(self, cmd, env, cap_s=None):
        """Run a worker with the rest of the budget (or cap_s, if less) as its timeout; returns (result dict | None,
        stderr, why)."""
        remaining = self.report.remaining()
        timeout = max(1.0, min(remaining, cap_s or remaining))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                process_group=0)  # own group, same session: a timeout also ends its compile workers
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if timeout < remaining:
                return None, err, f"stopped: row cap (killed after {timeout:.0f} s)"
            return None, err, f"skipped: budget (killed after {timeout:.0f} s)"
        if proc.returncode != 0:
            oom = "OutOfMemoryError" in err or "out of memory" in err
            return None, err, "oom" if oom else f"error: worker exit {proc.returncode}: {last_error_line(err)}"
        return json.loads(out.strip().splitlines()[-1]), err, "ok"


def last_error_line(stderr):
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if "Error" in l or "error" in l]
    return (errors or lines or ["(no stderr)"])[-1].strip()[:300]


# -----------------------------------------------------------------------------
# correctness

def train_steps(model, x, y, steps, ortho_dtype):
    """`steps` MuonAdamW steps on one batch; returns the losses and the first step's gradients (fp32)."""
    opt = model.setup_optimizer(compile=False, ortho_dtype=ortho_dtype)
    losses, grads = [], None
    for i in range(steps):
        loss = model(x, y)
        loss.backward()
        if i == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def check_bf16_training(b):
    """A few training steps in bf16 vs the same model in fp32 (fp32 Muon orthogonalization as the reference)."""
    import torch
    torch.set_float32_matmul_precision("highest")  # a true fp32 reference: no TF32
    config, s = b.small_config(), b.cfg["small"]
    ref = b.small_model(config, torch.float32)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    x, y = b.tokens((s["batch"], s["seq"]), s["vocab"], 1), b.tokens((s["batch"], s["seq"]), s["vocab"], 2)
    ref_losses, ref_grads = train_steps(ref, x, y, 3, torch.float32)
    low = b.small_model(config, torch.bfloat16, state)
    losses, grads = train_steps(low, x, y, 3, torch.bfloat16)
    tol = TOL["bfloat16"]
    loss_err = max(abs(a - r) / abs(r) for a, r in zip(losses, ref_losses))
    grad_err = rel_err(torch.cat([grads[n].flatten() for n in ref_grads]), torch.cat([g.flatten() for g in ref_grads.values()]))
    worst = max(ref_grads, key=lambda n: rel_err(grads[n], ref_grads[n]) if ref_grads[n].norm() > 0 else 0)
    finite = all(math.isfinite(v) for v in losses)
    ok = finite and loss_err <= tol["loss"] and grad_err <= tol["grad"]
    return dict(status="ok" if ok else "FAIL", met=ok, target=f"loss ≤ {tol['loss']:g}, grad ≤ {tol['grad']:g}",
                result=f"loss rel {loss_err:.1e} · grad rel {grad_err:.1e}",
                notes=f"3 steps; worst param {worst} {rel_err(grads[worst], ref_grads[worst]):.1e}",
                metrics=dict(loss_rel=loss_err, grad_rel=grad_err, losses=losses, ref_losses=ref_losses))


def dense_attention(q, k, v, window):
    """The obvious float64 reference: explicit causal + sliding-window mask, GQA by repeating k/v heads."""
    import torch
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    Tq, Tk = q.size(2), k.size(2)
    i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    allowed = (j <= i) & ((i - j <= window) | (window < 0))
    scores = (q @ k.mT) / math.sqrt(q.size(-1))
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).to(dtype)


def check_sliding_window(b):
    """nanochat.gpt.attention (and FA3 when loaded) vs the dense reference; the model's windows vs the reference model."""
    import torch
    import nanochat.gpt as gpt
    s = b.cfg["small"]
    T, D, errs = s["seq"], s["head_dim"], {}
    cases = [(T, -1), (T, 0), (T, 1), (T, 7), (T, T // 4), (T, T - 2), (T, T - 1), (T, 2 * T),  # training shapes
             (1, -1), (1, 7), (1, T // 4), (5, 7), (5, -1), (T // 2, T // 4)]                 # decode / chunked prefill
    dtypes = [torch.float32] + ([b.dtype] if b.dtype != torch.float32 else [])
    g = torch.Generator().manual_seed(3)
    for dtype in dtypes:
        for Tq, window in cases:
            q = torch.randn(2, 4, Tq, D, generator=g).to(b.device, dtype)
            k, v = (torch.randn(2, 2, T, D, generator=g).to(b.device, dtype) for _ in range(2))
            errs[f"{str(dtype)[6:]}/sdpa/Tq{Tq}/w{window}"] = rel_err(gpt.attention(q, k, v, window), dense_attention(q, k, v, window))
    # the model: build one (this also loads FA3 on a Hopper GPU that has it)
    config = b.small_config()
    model = b.small_model(config, b.dtype).eval()
    fa3 = gpt._FA3
    if fa3 is not None:
        for Tq, window in cases:
            if Tq != T or window >= T:
                continue
            q = torch.randn(2, T, 4, D, generator=g).to(b.device, torch.bfloat16)
            k, v = (torch.randn(2, T, 2, D, generator=g).to(b.device, torch.bfloat16) for _ in range(2))
            y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
            y = y[0] if isinstance(y, tuple) else y
            ref = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window).transpose(1, 2)
            errs[f"bfloat16/fa3/Tq{Tq}/w{window}"] = rel_err(y, ref)
    idx = b.tokens((2, T), config.vocab_size, 4)
    with torch.inference_mode():
        logits = model(idx)
        real = gpt.attention
        gpt.attention, gpt._FA3 = dense_attention, None  # same weights, attention by the reference
        try:
            ref_logits = model(idx)
        finally:
            gpt.attention, gpt._FA3 = real, fa3
        full = b.small_model(b.small_config(window_pattern="L"), b.dtype, model.state_dict()).eval()
        full_logits = full(idx)
    tol = TOL[b.dtype_name]
    model_err = rel_err(logits, ref_logits)
    window_effect = rel_err(full_logits, logits)  # a window that changes nothing would make the check vacuous
    worst = max(errs, key=errs.get)
    kernel_ok = all(e <= TOL[k.split("/")[0]]["attn"] for k, e in errs.items())
    ok = kernel_ok and model_err <= tol["logits"] and window_effect > max(5 * model_err, 0.05)
    return dict(status="ok" if ok else "FAIL", met=ok, target=f"attn ≤ {TOL['float32']['attn']:g} fp32 / {TOL['bfloat16']['attn']:g} bf16",
                result=f"kernel worst {errs[worst]:.1e} · model {model_err:.1e}",
                notes=f"{len(errs)} kernel cases ({'SDPA + FA3' if fa3 else 'SDPA'}), worst {worst}; window effect {window_effect:.2f}",
                metrics=dict(kernel=errs, model_rel=model_err,
                             window_effect=window_effect, fa3=fa3 is not None))


def greedy_margin(full_logits, tokens):
    """Largest (max logit - chosen logit) over positions: 0 when every token is the full forward's argmax."""
    import torch
    chosen = full_logits.gather(-1, torch.as_tensor(tokens, device=full_logits.device).view(-1, 1))[:, 0]
    return (full_logits.max(-1).values - chosen).max().item()


def check_kv_decode(b):
    """Chunked prefill + greedy decode through a (growing) KV cache vs one full forward; then the Engine."""
    import torch
    from nanochat.engine import Engine
    s = b.cfg["small"]
    P, N = s["prompt"], s["new"]
    config = b.small_config()
    model = b.small_model(config, b.dtype).eval()
    prompt = b.tokens((1, P), config.vocab_size, 5)
    with torch.inference_mode():
        cache = model.new_kv_cache(1, max_len=P // 2)  # too small on purpose: the cache must grow
        prefill = torch.cat([model(prompt[:, :P // 2], kv_cache=cache), model(prompt[:, P // 2:], kv_cache=cache)], 1)
        step_logits, tokens = [prefill[0, -1]], []
        for _ in range(N):
            tokens.append(int(step_logits[-1].argmax()))
            step_logits.append(model(torch.tensor([[tokens[-1]]], device=b.device), kv_cache=cache)[0, -1])
        seq = torch.cat([prompt, torch.tensor([tokens], device=b.device)], 1)
        full = model(seq)[0]
        prefill_err = rel_err(prefill[0], full[:P])
        decode_err = rel_err(torch.stack(step_logits[1:]), full[P:P + N])
        max_abs = max((prefill[0] - full[:P]).abs().max().item(), (torch.stack(step_logits[1:]) - full[P:]).abs().max().item())
        tol = TOL[b.dtype_name]
        margin_tol = max(4 * max_abs, 1e-5)  # a different greedy token is fine only at a tie within the kernels' noise
        margin = greedy_margin(full[P - 1:P - 1 + N], tokens)
        # the Engine: batch-1 prefill, cache replicated to 2 rows, greedy: both rows equal, greedy w.r.t. a full forward
        tok = load_bench("inference").SpecialsOnlyTokenizer(config.vocab_size)
        columns = [col for col, _ in Engine(model, tok).generate(prompt[0].tolist(), num_samples=2, max_tokens=N, temperature=0.0)]
        rows = [list(r) for r in zip(*columns)]
        eng_full = model(torch.cat([prompt, torch.tensor([rows[0]], device=b.device)], 1))[0]
        eng_margin = greedy_margin(eng_full[P - 1:P - 1 + N], rows[0])
    same_rows = rows[0] == rows[1] and len(rows[0]) == N
    ok = prefill_err <= tol["logits"] and decode_err <= tol["logits"] and margin <= margin_tol and eng_margin <= margin_tol and same_rows
    agree = sum(a == c for a, c in zip(tokens, rows[0]))
    return dict(status="ok" if ok else "FAIL", met=ok, target=f"logits ≤ {tol['logits']:g}, greedy",
                result=f"prefill {prefill_err:.1e} · decode {decode_err:.1e} · greedy margin {max(margin, eng_margin):.1e}",
                notes=f"prompt {P} (2 chunks, cache grows), {N} tokens, window {s['short_window']}; engine rows equal: {same_rows}, "
                      f"engine = manual loop on {agree}/{N}",
                metrics=dict(prefill_rel=prefill_err, decode_rel=decode_err, greedy_margin=margin, engine_margin=eng_margin,
                             margin_tol=margin_tol, engine_rows_equal=same_rows, engine_agree=agree))


def check_graph_decode(b, fast=None):
    """A static decode path (default: the static step in a CUDA graph on a GPU, the same step eagerly on a CPU; or
    "fused": the Triton kernels, graphed on a GPU, with 32-slot cache splits so that the small cache has several and
    the windows straddle them) vs the eager KV-cache path: teacher-forced logits of 2 rows and of 1 after the batch-1 prefill,
    greedy Engine streams at batch 1 and 2, and a stream that outruns the static cache (the eager path takes over)."""
    fast = fast or ("graph" if b.cuda else "static")
    if fast != "fused":
        return _check_static_decode(b, fast)
    import nanochat.fused_decode as fused_decode
    why = fused_decode.unavailable_reason(b.device, b.small_config().head_dim)
    if why:
        return dict(status=f"skipped: {why}")
    import nanochat.engine as engine_mod
    # the kernels measured here directly: the engine's own check before first use is reported, not applied
    split, fused_decode.SPLIT_SLOTS = fused_decode.SPLIT_SLOTS, FUSED_CHECK_SPLIT
    check, engine_mod.FUSED_CHECK = engine_mod.FUSED_CHECK, False
    try:
        out = _check_static_decode(b, fast)
    finally:
        fused_decode.SPLIT_SLOTS, engine_mod.FUSED_CHECK = split, check
    out["notes"] += f"; cache splits of {FUSED_CHECK_SPLIT} slots"
    return out


def _check_static_decode(b, fast):
    import itertools
    import torch
    import nanochat.engine as engine_mod
    from nanochat.engine import Engine
    s = b.cfg["small"]
    P, N = s["prompt"], s["new"]
    config = b.small_config()
    model = b.small_model(config, b.dtype).eval()
    prompt, forced = b.tokens((1, P), config.vocab_size, 11), b.tokens((2, N), config.vocab_size, 12)
    tok = load_bench("inference").SpecialsOnlyTokenizer(config.vocab_size)
    with torch.inference_mode():
        cache = model.new_kv_cache(1, P + N)
        model(prompt, kv_cache=cache)
        cache = cache.replicate(2)
        eager = torch.stack([model(forced[:, t:t + 1], kv_cache=cache)[:, -1] for t in range(N)], 1)
        full = model(torch.cat([prompt.expand(2, -1), forced], 1))[:, P:]  # the step at column t is position P + t
        static = {rows: teacher_forced(model, prompt, forced[:rows], fast) for rows in (2, 1)}  # 1 row: the fused GEMVs
        if fast == "fused":  # what engine.check_fused_step measures before first use (here on 32-slot splits)
            fused_check = engine_mod.fused_step_errors(model, engine_mod.DecodeWeights(model))
        logits_err = max(rel_err(static[r], eager[:r]) for r in static)
        full_err = max(rel_err(static[r], full[:r]) for r in static)
        max_abs = max(max((static[r] - eager[:r]).abs().max().item(), (static[r] - full[:r]).abs().max().item()) for r in static)
        margin_tol = max(4 * max_abs, 1e-5)  # a different greedy token is fine only at a tie within the kernels' noise

        def streams(engine, num_samples, max_tokens=N):
            return [col for col, _ in itertools.islice(engine.generate(prompt[0].tolist(), num_samples=num_samples,
                                                                        max_tokens=max_tokens, temperature=0.0), N)]

        def margin(columns):
            row = [c[0] for c in columns]
            full = model(torch.cat([prompt, torch.tensor([row], device=b.device)], 1))[0]
            return greedy_margin(full[P - 1:P - 1 + len(row)], row)
        agree, margins, equal = {}, {}, {}

        def compare(key, num_samples, max_tokens=N):
            want = streams(Engine(model, tok, decode="eager"), num_samples, max_tokens)
            got = streams(Engine(model, tok, decode=fast), num_samples, max_tokens)
            equal[key], agree[key], margins[key] = got == want, sum(a == c for a, c in zip(want, got)), margin(got)
        compare(1, 1)
        compare(2, 2)
        reserve, bucket = engine_mod.DECODE_RESERVE, engine_mod.CACHE_BUCKET
        engine_mod.DECODE_RESERVE, engine_mod.CACHE_BUCKET = 4, 8  # the static cache ends a few tokens in
        try:
            compare("overflow", 2, None)
        finally:
            engine_mod.DECODE_RESERVE, engine_mod.CACHE_BUCKET = reserve, bucket
    tol = TOL[b.dtype_name]
    worst_margin = max(margins.values())
    ok = max(logits_err, full_err) <= tol["logits"] and worst_margin <= margin_tol  # unequal streams: only at ties
    check_note = ""
    if fast == "fused":
        failure = engine_mod.fused_check_failure(fused_check, model.compute_dtype)
        check_note = (" · check before first use " + " / ".join(f"{e:.1e}" for e in fused_check.values())
                      + f" ({f'REFUSES: {failure}' if failure else 'passes'})")
    return dict(status="ok" if ok else "FAIL", met=ok, target=f"logits ≤ {tol['logits']:g}, greedy",
                result=f"logits {logits_err:.1e} (vs full {full_err:.1e}) · greedy margin {worst_margin:.1e} · "
                       f"streams equal {sum(equal.values())}/{len(equal)}" + check_note,
                notes=f"{fast} vs eager, d{config.n_layer} window {s['short_window']}, prompt {P}, {N} tokens; agreeing tokens "
                      + ", ".join(f"{k}: {v}/{N}" for k, v in agree.items()),
                metrics=dict(mode=fast, logits_rel=logits_err, full_rel=full_err, fused_check=fused_check if fast == "fused" else None,
                             max_abs=max_abs, margin_tol=margin_tol,
                             greedy_margin={str(k): v for k, v in margins.items()}, streams_equal={str(k): v for k, v in equal.items()},
                             agree={str(k): v for k, v in agree.items()}))


def teacher_forced(model, prompt, forced, mode):
    """Logits (rows, N, vocab) of a StaticDecoder on `mode`'s step fed forced (rows, N) after the batch-1 prefill."""
    import torch
    from nanochat.engine import StaticDecoder
    from nanochat.gpt import DecodeWeights
    rows, n = forced.shape
    decoder = StaticDecoder(model, DecodeWeights(model), rows, prompt.size(1) + n + 3, mode)
    model(prompt, kv_cache=decoder.cache.prefill_cache())
    decoder.cache.start(prompt.size(1))
    logits = []
    for t in range(n):
        decoder.ids.copy_(forced[:, t:t + 1])
        logits.append(decoder.run().clone())
    return torch.stack(logits, 1)


def check_fp8(b):
    """fp8_linear vs an fp32 F.linear (forward and both gradients), then fp8 vs bf16 training steps of a small GPT."""
    import torch
    import torch.nn.functional as F
    from nanochat.fp8 import fp8_linear, fp8_supported
    if not fp8_supported(b.device):
        cap = torch.cuda.get_device_capability(b.device) if b.cuda else None
        why = f"compute capability {cap}" if cap else f"device is {b.device.type}"
        return dict(status=f"skipped: fp8 needs an NVIDIA GPU with fp8 tensor cores (SM89+) and torch._scaled_mm; {why}")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 1024, generator=g).to(b.device, torch.bfloat16).requires_grad_()
    w = (torch.randn(768, 1024, generator=g) * 0.02).to(b.device).requires_grad_()
    dy = torch.randn(512, 768, generator=g).to(b.device, torch.bfloat16)
    y8 = fp8_linear(x, w)
    y8.backward(dy)
    gx8, gw8 = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    xr = x.detach().float().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    yr = F.linear(xr, wr)
    yr.backward(dy.float())
    fwd, gx, gw = rel_err(y8, yr), rel_err(gx8, xr.grad), rel_err(gw8, wr.grad)
    # model level: same weights, fp8 on vs off
    config, s = b.small_config(), b.cfg["small"]
    base = b.small_model(config, torch.bfloat16)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    x_tok, y_tok = b.tokens((s["batch"], s["seq"]), s["vocab"], 7), b.tokens((s["batch"], s["seq"]), s["vocab"], 8)
    ref_losses, _ = train_steps(base, x_tok, y_tok, 3, torch.bfloat16)
    fp8_model = b.small_model(b.small_config(fp8=True), torch.bfloat16, state)
    losses, _ = train_steps(fp8_model, x_tok, y_tok, 3, torch.bfloat16)
    loss_err = max(abs(a - r) / abs(r) for a, r in zip(losses, ref_losses))
    ok = fwd <= FP8_TOL["fwd"] and max(gx, gw) <= FP8_TOL["grad"] and loss_err <= FP8_TOL["loss"] and all(map(math.isfinite, losses))
    return dict(status="ok" if ok else "FAIL", met=ok,
                target=f"fwd ≤ {FP8_TOL['fwd']:g}, grads ≤ {FP8_TOL['grad']:g}, loss ≤ {FP8_TOL['loss']:g}",
                result=f"fwd {fwd:.1e} · dx {gx:.1e} · dW {gw:.1e} · loss {loss_err:.1e}",
                notes="vs fp32 F.linear; loss: 3 steps of the small GPT, fp8 vs bf16",
                metrics=dict(fwd_rel=fwd, grad_x_rel=gx, grad_w_rel=gw, loss_rel=loss_err, losses=losses, ref_losses=ref_losses))


# -----------------------------------------------------------------------------
# device ceilings

def measure_peaks(b):
    """bf16 matmul FLOP/s (fp32 on the CPU) and copy bandwidth (bytes read + written), on random data."""
    import torch
    n = 8192 if b.cuda else 512
    g = torch.Generator().manual_seed(9)
    a, c = (torch.randn(n, n, generator=g).to(b.device, b.dtype) for _ in range(2))
    t = b.time_it(lambda: a @ c, reps=50 if b.cuda else 5, warmup=200 if b.cuda else 2)  # ~0.3 s of warm-up: clocks ramp up
    b.peak_flops = 2 * n**3 / t
    numel = (1 << 29) if b.cuda else (1 << 23)  # 1 GiB / 32 MiB of fp16
    src = torch.empty(numel, dtype=torch.float16, device=b.device).normal_()
    dst = torch.empty_like(src)
    t = b.time_it(lambda: dst.copy_(src), reps=50 if b.cuda else 10, warmup=20 if b.cuda else 2)
    copy_bw = 2 * src.numel() * src.element_size() / t
    from nanochat.training import peak_flops
    datasheet_flops = peak_flops(b.device)
    datasheet_bw = datasheet_hbm(b)
    b.hbm = datasheet_bw or copy_bw
    b.report.peaks.update(matmul_flops=b.peak_flops, matmul_n=n, matmul_dtype=b.dtype_name, datasheet_flops=datasheet_flops,
                          copy_bytes_s=copy_bw, datasheet_bytes_s=datasheet_bw, hbm_bytes_s=b.hbm,
                          hbm_source="datasheet" if datasheet_bw else "measured copy")
    unit = 1e12 if b.cuda else 1e9
    u = "T" if b.cuda else "G"
    notes = f"datasheet {datasheet_flops / 1e12:.0f} TFLOP/s" if datasheet_flops else "no datasheet peak for this device"
    notes += f"; bandwidth for decode: {b.hbm / 1e9:,.0f} GB/s ({b.report.peaks['hbm_source']})"
    return dict(status="ok", result=f"{b.peak_flops / unit:,.1f} {u}FLOP/s {b.dtype_name} {n}³ · copy {copy_bw / 1e9:,.0f} GB/s",
                notes=notes, metrics=dict(b.report.peaks))


# -----------------------------------------------------------------------------
# training throughput

def train_config(b, depth, fp8=False):
    from nanochat.gpt import GPTConfig
    c = b.cfg
    return GPTConfig.from_depth(depth, c["vocab"], c["seq"], head_dim=c["head_dim"], window_pattern=c["window"], fp8=fp8)


def probe_batch(b, depth):
    """Largest device batch from the candidates whose eager bf16 step (with the optimizer) fits in 92% of the GPU
    memory, probed in this process: an OOM costs a second, not a compile. Compiled steps need less memory."""
    import torch
    from nanochat.gpt import GPT
    if depth in b.fit:
        return b.fit[depth]
    candidates = b.cfg["batches"]
    if not b.cuda:
        b.fit[depth] = (candidates[0], None)
        return b.fit[depth]
    total = torch.cuda.get_device_properties(b.device).total_memory
    model = GPT.create(train_config(b, depth), b.device)
    opt = model.setup_optimizer(compile=False)
    found = (None, None)
    for batch in candidates:
        torch.cuda.reset_peak_memory_stats(b.device)
        peak = try_step(b, model, opt, batch)
        model.zero_grad(set_to_none=True)
        free_device_memory()
        b.report.log(f"  probe d{depth} batch {batch}: " + (f"peak {peak / 1e9:.1f} GB" if peak else "OOM"))
        if peak is not None and peak <= 0.92 * total:
            found = (batch, peak)
            break
    del model, opt
    free_device_memory()
    b.fit[depth] = found
    return found


def try_step(b, model, opt, batch):
    import torch
    try:
        x = torch.randint(0, b.cfg["vocab"], (batch, b.cfg["seq"]), device=b.device)
        model(x, x).backward()
        opt.step()
        b.sync()
        return torch.cuda.max_memory_allocated(b.device)
    except torch.cuda.OutOfMemoryError:
        return None  # the frame (and its tensors) goes away with the return


def fa3_importable(b):
    """Whether nanochat.gpt loads FlashAttention-3 here (Hopper + flash_attn_interface that imports)."""
    from nanochat.gpt import load_flash_attn_3
    try:
        return b.cuda and load_flash_attn_3(b.device) is not None
    except Exception:  # noqa: BLE001 - a broken install (missing .so) is "not importable" too
        return False


def train_row(b, depth, compile_=True, fp8=False, attn="default", target=None):
    """One base_train throughput row through bench/train.py's worker (own process: own peak memory and compile)."""
    from nanochat.fp8 import fp8_supported
    if fp8 and not fp8_supported(b.device):
        return dict(status="skipped: fp8 not supported on this device (SM89+ with torch._scaled_mm)")
    fa3 = fa3_importable(b)
    if attn == "sdpa" and not fa3:
        return dict(status="skipped: flash_attn_interface not importable, so every other row already used SDPA")
    batch, probe_peak = probe_batch(b, depth)
    if batch is None:
        return dict(status=f"skipped: not even batch {b.cfg['batches'][-1]} fits (eager probe)")
    c = b.cfg
    while True:
        cmd = [sys.executable, str(REPO / "bench" / "train.py"), "--worker", "--device", b.device.type, "--steps", str(c["steps"]),
               "--threads", "0", "--depth", str(depth), "--batch", str(batch), "--seq", str(c["seq"]), "--vocab", str(c["vocab"]),
               "--head-dim", str(c["head_dim"]), "--window", c["window"], "--fp8" if fp8 else "--no-fp8",
               "--compile" if compile_ else "--no-compile", "--compile-optim" if b.cuda else "--no-compile-optim"]
        res, err, why = b.run_child(cmd, b.child_env(force_sdpa=attn == "sdpa"))
        if why == "oom" and batch > 1:
            b.report.log(f"  d{depth} batch {batch} ran out of memory in the worker; halving")
            batch //= 2
            continue
        break
    if res is None:
        if why != "oom":
            b.report.log(f"  worker stderr tail:\n{err[-2000:]}")
        return dict(status="error: out of memory at batch 1" if why == "oom" else why, metrics=dict(stderr_tail=err[-1500:]))
    used_attn = "FA3" if (fa3 and attn != "sdpa") else "SDPA"
    res.update(batch=batch, attn=used_attn, compile=compile_, fp8=fp8, depth=depth, probe_peak_gb=(probe_peak or 0) / 1e9)
    res["mfu_measured"] = res["tflops"] * 1e12 / b.peak_flops if b.peak_flops else None
    b.train[(depth, compile_, fp8, attn)] = res
    mfu = res["mfu_measured"]
    result = (f"{res['tok_s']:,.0f} tok/s · {res['ms']:.0f} ms · MFU {mfu:.1%} · {res['peak_gb']:.1f} GB" if mfu is not None
              else f"{res['tok_s']:,.0f} tok/s · {res['ms']:.0f} ms · {res['peak_gb']:.1f} GB")
    notes = f"batch {batch}×{c['seq']}, {used_attn}, {res['tflops']:.0f} TFLOP/s" if b.cuda else f"batch {batch}×{c['seq']}"
    if res.get("mfu"):
        notes += f", MFU {res['mfu']:.1%} of datasheet"
    notes += f", first step {res['first_s']:.0f} s"
    row = dict(status="ok", result=result, notes=notes, metrics=res)
    if target:
        extra = target(res)
        if "notes" in extra:
            row["notes"] += "; " + extra.pop("notes")
        row.update(extra)
    return row


def mfu_target(res):
    mfu = res["mfu_measured"]
    return dict(target=f"MFU ≥ {MFU_TARGET:.0%}", met=None if mfu is None else mfu >= MFU_TARGET)


def fp8_target(b, depth):
    def target(res):
        base = b.train.get((depth, True, False, "default"))
        if not base:
            return dict(target=f"≥ +{FP8_SPEEDUP_TARGET:.0%} vs bf16", notes=f"no d{depth} bf16 compile row to compare with")
        gain = res["tok_s"] / base["tok_s"] - 1
        res["fp8_gain"] = gain
        return dict(target=f"≥ +{FP8_SPEEDUP_TARGET:.0%} vs bf16", met=gain >= FP8_SPEEDUP_TARGET,
                    result=f"{gain:+.1%} vs bf16 · {res['tok_s']:,.0f} tok/s · {res['peak_gb']:.1f} GB")
    return target


# -----------------------------------------------------------------------------
# optimizer, inference, dataloader

def optimizer_row(b, depth):
    """MuonAdamW.step() alone on the depth's model (compiled on the GPU, as base_train does), random gradients."""
    import torch
    from nanochat.gpt import GPT
    model = GPT.create(train_config(b, depth), b.device)
    opt = model.setup_optimizer()
    g = torch.Generator(device=b.device).manual_seed(10)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=b.device, dtype=p.dtype) * 1e-3
    opt_s = b.time_it(opt.step, reps=10 if b.cuda else 5, warmup=3 if b.cuda else 2)
    step = next((b.train[k] for k in [(depth, True, False, "default"), (depth, False, False, "default")] if k in b.train), None)
    metrics = dict(opt_ms=opt_s * 1e3, depth=depth)
    if step is None:
        return dict(status="ok", result=f"{opt_s * 1e3:.1f} ms", target=f"≤ {OPTIM_SHARE_TARGET:.0%} of step",
                    notes=f"no d{depth} train row to compare with", metrics=metrics)
    opt_ms, share = opt_s * 1e3, opt_s * 1e3 / step["ms"]
    tokens = step["batch"] * b.cfg["seq"]
    accum = max(1, NANOCHAT_STEP_TOKENS // tokens)  # nanochat's 524,288-token step on one GPU
    notes = f"one micro-batch step ({tokens:,} tokens)"
    if opt_ms < step["ms"]:
        share_accum = opt_ms / (accum * (step["ms"] - opt_ms) + opt_ms)
        metrics.update(share_524k_step=share_accum, grad_accum=accum)
        notes += f"; with nanochat's {NANOCHAT_STEP_TOKENS:,}-token step (×{accum} accumulation) {share_accum:.1%}"
    else:
        notes += "; timed alone it exceeds the whole step: the timings are noise (busy host?)"
    metrics.update(step_ms=step["ms"], share=share)
    return dict(status="ok", met=share <= OPTIM_SHARE_TARGET, target=f"≤ {OPTIM_SHARE_TARGET:.0%} of step",
                result=f"{opt_ms:.1f} ms = {share:.1%} of a {step['ms']:.0f} ms step", notes=notes, metrics=metrics)


def predicted_tok_s(gpu_name):
    """DECODE_PREDICTED_TOK_S for this GPU by name ({} for a GPU without predictions)."""
    return next((v for k, v in DECODE_PREDICTED_TOK_S.items() if k in (gpu_name or "")), {})


def decode_bytes_per_step(config, batch, mean_ctx, elem):
    """Bytes a decode step must read: every matmul weight once (embedding rows are gathered, not read whole) + the KV cache."""
    import torch
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    weights = sum(p.numel() for n, p in model.named_parameters() if "wte" not in n and "value_embeds" not in n) * elem
    kv = 2 * config.n_layer * config.n_kv_head * config.head_dim * mean_ctx * elem * batch
    return weights + kv


def inference_row(b, batch, decode, bandwidth=False, cap_s=None, fused_split=None, mode="engine", rows=None, gemv=None,
                  pdl=True, fused_sample=True, combine=None, attend=None):
    """TTFT / decode tok/s through bench/inference.py's worker (Engine on the given decode path, random weights, no
    early stop); on CUDA also kernels and GPU-busy ms per decode step (torch.profiler over 16 steps). fused_split:
    cache slots per attention program of the fused path (NANOCHAT_FUSED_SPLIT; default: by batch, split_slots). mode "batched": `batch`
    requests of their own prompts decoded together by nanochat.batching (continuous batching) in a batch of `rows`
    rows (default: batch), not one request. gemv: the fused step's lone-row products (NANOCHAT_FUSED_GEMV: triton |
    cublas); pdl False: its kernels without programmatic dependent launch (NANOCHAT_FUSED_PDL=0); fused_sample False:
    top-k sampling in torch's kernels, not nanochat.fused_sample's (NANOCHAT_FUSED_SAMPLE=0); combine: who combines
    the fused attention's splits (NANOCHAT_FUSED_COMBINE: last | kernel); attend (split, block, warps, kernel): the fused
    attention's tiling (NANOCHAT_FUSED_SPLIT, NANOCHAT_FUSED_ATTEND) and kernel (NANOCHAT_FUSED_ATTEND_KERNEL)."""
    from nanochat.gpt import GPTConfig
    c, i = b.cfg, b.cfg["infer"]
    row = dict(mode=mode, rows=rows, decode=decode, batch=batch, depth=i["depth"], new_tokens=i["new_tokens"], prompt=i["prompt"],
               vocab=c["vocab"], head_dim=c["head_dim"], seq_len=c["seq"], dtype=b.dtype_name, profile=b.cuda and mode != "batched")
    cmd = [sys.executable, str(REPO / "bench" / "inference.py"), "--one", json.dumps(row), "--device", b.device.type,
           "--repeats", str(i["repeats"]), "--threads", "0"]
    env = b.child_env()
    if fused_split:
        env["NANOCHAT_FUSED_SPLIT"] = str(fused_split)
    if gemv:
        env["NANOCHAT_FUSED_GEMV"] = gemv
    if not pdl:
        env["NANOCHAT_FUSED_PDL"] = "0"
    if not fused_sample:
        env["NANOCHAT_FUSED_SAMPLE"] = "0"
    if combine:
        env["NANOCHAT_FUSED_COMBINE"] = combine
    if attend:
        env["NANOCHAT_FUSED_SPLIT"], env["NANOCHAT_FUSED_ATTEND"] = str(attend[0]), f"{attend[1]},{attend[2]}"
        env["NANOCHAT_FUSED_ATTEND_KERNEL"] = attend[3]
    env["NANOCHAT_FUSED_CHECK"] = "0"  # the kernels timed even if the engine's check would refuse them: its figures are noted
    res, err, why = b.run_child(cmd, env, cap_s=cap_s)
    if res is None:
        b.report.log(f"  worker stderr tail:\n{err[-2000:]}")
        return dict(status=why, metrics=dict(stderr_tail=err[-1500:]))
    variant = "".join([f", combine {combine}" if combine else "", f", {gemv} GEMVs" if gemv else "", "" if pdl else ", no PDL",
                       "" if fused_sample else ", torch sampling",
                       ", attention {} slots, {} a loop, {} warps, {} kernel".format(*attend) if attend else ""])
    label = f"{decode}, {fused_split}-slot splits" if fused_split else f"{decode}{variant}" if variant else \
        decode if mode == "engine" else f"{decode}, {mode}" + (f" in {rows} rows" if rows else "")
    res["fused_split"], res["gemv"], res["pdl"] = fused_split, gemv, pdl
    b.infer[(batch, label)] = res
    out = dict(status="ok", metrics=res, result=f"TTFT {res['ttft_ms']:.1f} ms · decode {res['decode_tok_s']:,.0f} tok/s "
               f"({res['decode_ms_per_step']:.2f} ms/step) · {res['peak_gb']:.2f} GB",
               notes=f"{label}, prompt {i['prompt']}{' - 5 per request' if mode == 'batched' else ''}, {i['new_tokens']} new, "
               f"d{i['depth']}, first call {res['warmup_s']:.1f} s")
    prof = res.get("profile")
    if isinstance(prof, dict):  # the worker's profile (the row's own flag comes back as it was sent)
        out["notes"] += "; " + profile_notes(prof)
    if res.get("fused_gemv") is not None and "fused" in (res.get("decode"), decode, "fused" if mode == "batched" else None):
        out["notes"] += f"; fused kernels {'with' if res['fused_pdl'] else 'without'} PDL, {res['fused_gemv']} GEMVs for a lone row"
    if res.get("fused_check"):
        verdict = f"REFUSES, {res['fused_check_failure']}: auto would decode on the graph path" if res["fused_check_failure"] else "passes"
        out["notes"] += f"; the engine's check of the fused step at this size {' / '.join(f'{e:.1e}' for e in res['fused_check'].values())} ({verdict})"
    if res.get("sample_verdicts") and not all(res["sample_verdicts"]):
        out["notes"] += "; the top-k sampling kernels FAILED their check: torch sampled"
    eager = b.infer.get((batch, "eager"))
    one = b.infer.get((batch, res.get("decode", decode)))  # auto: the path it resolved to
    if mode == "batched" and one:
        out["notes"] += f"; {res['decode_tok_s'] / one['decode_tok_s']:.2f}× one request of {batch} sample(s), unbatched"
    if decode != "eager" and eager:
        out["notes"] += f"; {res['decode_tok_s'] / eager['decode_tok_s']:.1f}× eager"
    predicted = predicted_tok_s(b.gpu).get(label) if b.cuda and batch == 1 and i["depth"] == 20 else None
    if predicted:
        out["notes"] += f"; predicted {predicted:,} tok/s"
    if bandwidth:
        config = GPTConfig.from_depth(i["depth"], c["vocab"], c["seq"], head_dim=c["head_dim"])
        elem = 2 if b.cuda else 4  # inference.py casts the model to bf16 on CUDA
        per_token = decode_bytes_per_step(config, 1, i["prompt"] + i["new_tokens"] / 2, elem)
        hbm = b.hbm or datasheet_hbm(b)  # the device row sets b.hbm; alone (--only inference) the datasheet value
        util = res["decode_tok_s"] * per_token / hbm if hbm else None
        copy_bw = b.report.peaks.get("copy_bytes_s")
        res.update(bytes_per_token=per_token, hbm_bytes_s=hbm, bw_util=util,
                   bw_util_vs_copy=res["decode_tok_s"] * per_token / copy_bw if copy_bw else None)
        if util is not None:
            out.update(target=f"≥ {DECODE_BW_TARGET:.0%} of HBM", met=util >= DECODE_BW_TARGET,
                       result=out["result"] + f" · {util:.1%} of {hbm / 1e9:,.0f} GB/s")
            if res["bw_util_vs_copy"] is not None:
                out["notes"] += f"; {res['bw_util_vs_copy']:.1%} of the measured copy bandwidth"
            if res.get("bw_limit_tok_s"):
                out["notes"] += f"; inference.py bw limit {res['bw_limit_tok_s']:,.0f} tok/s"
    return out


GEMV_CANDIDATES = [(1, 4), (2, 4), (4, 4), (8, 4), (2, 8), (4, 8), (8, 8)]  # (BLOCK_N, warps) of fused_decode.gemv
GEMV_CALLS = 20        # calls per timed CUDA graph (a graph: launch cost as inside the decode step)
GEMV_ROTATE_BYTES = 256 << 20  # distinct weight copies per shape, past the L2 cache (50 MB on an H100), as the step reads them


def decode_matrices(config):
    """(name, N, K, per step) of the matrices a decode step multiplies one row by (lm_head: its unpadded rows)."""
    c, kv = config.n_embd, config.n_kv_head * config.head_dim
    return [("qkv", config.n_head * config.head_dim + 2 * kv, c, config.n_layer), ("proj", c, config.n_head * config.head_dim, config.n_layer),
            ("fc", 4 * c, c, config.n_layer), ("mlp_proj", c, 4 * c, config.n_layer), ("lm_head", config.vocab_size, c, 1)]


def time_calls(b, fn, calls=GEMV_CALLS):
    """Seconds per fn() call: on CUDA a graph of `calls` calls (the engine's CudaGraphStep), replayed (median of 20);
    elsewhere fn() itself."""
    if not b.cuda:
        return b.time_it(fn, reps=3, warmup=1)
    from nanochat.engine import CudaGraphStep
    graph = CudaGraphStep(lambda: [fn() for _ in range(calls)], warmup=1)
    return b.time_it(graph, reps=20, warmup=3) / calls


def gemv_row(b):
    """The lone row's matrix products in the fused decode step: fused_decode.gemv (at gemv_blocks' tiles and at the
    alternatives in GEMV_CANDIDATES, one launch after another; then gemv_blocks' with programmatic dependent launch,
    each call's weights streaming while the one before finishes) vs torch's x @ W (cuBLAS on CUDA) for each matrix of
    the inference model, bf16: microseconds per call and bytes of weight per second, the weight cycled through copies
    that overflow the L2 cache. Checks each result against torch's first (relative error ≤ 1e-2)."""
    import itertools
    import torch
    from nanochat import fused_decode as fd
    from nanochat.gpt import GPTConfig
    c, i = b.cfg, b.cfg["infer"]
    config = GPTConfig.from_depth(i["depth"], c["vocab"], c["seq"], head_dim=c["head_dim"])
    why = fd.unavailable_reason(b.device, config.head_dim)
    if why:
        return dict(status=f"skipped: {why}")
    dtype = torch.bfloat16 if b.cuda else torch.float32
    g = torch.Generator().manual_seed(3)
    per_matrix, worst = {}, 0.0
    pdl = fd.pdl_available(b.device)
    step = dict(cublas=0.0, triton=0.0, best=0.0, triton_pdl=0.0)  # seconds per decode step spent in these products
    for name, n, k, count in decode_matrices(config):
        copies = max(2, min(16, GEMV_ROTATE_BYTES // (n * k * 2))) if b.cuda else 1
        weights = [(torch.randn(n, k, generator=g) * k ** -0.5).to(b.device, dtype) for _ in range(copies)]
        x = torch.randn(1, k, generator=g).to(b.device, dtype)
        views = [w.t() for w in weights]  # (K, N): how DecodeMatrix holds a CUDA weight

        def rotating(call):
            it = itertools.cycle(views)
            return lambda: call(next(it))
        want = x.float() @ weights[0].float().T
        times = {"cublas": time_calls(b, rotating(lambda w: x @ w))}
        errors = {"cublas": rel_err(x @ views[0], want)}
        default = fd.gemv_blocks(n, k)
        for blocks in [default] + [bl for bl in GEMV_CANDIDATES if bl != default]:
            key = f"{blocks[0]} rows {blocks[1]} warps"
            errors[key] = rel_err(fd.gemv(x, views[0], blocks=blocks, pdl=False), want)
            times[key] = time_calls(b, rotating(lambda w, blocks=blocks: fd.gemv(x, w, blocks=blocks, pdl=False)))
            if not b.cuda:
                break  # the interpreter: the default tiles only
        default_key = f"{default[0]} rows {default[1]} warps"
        if pdl:
            errors["pdl"] = rel_err(fd.gemv(x, views[0], pdl=True), want)
            times["pdl"] = time_calls(b, rotating(lambda w: fd.gemv(x, w, pdl=True)))
        best_key = min((t, kk) for kk, t in times.items() if kk not in ("cublas", "pdl"))[1]
        worst = max(worst, max(errors.values()))
        per_matrix[name] = dict(n=n, k=k, per_step=count, copies=copies, default=default_key, best=best_key,
                                us={kk: t * 1e6 for kk, t in times.items()}, gb_s={kk: n * k * 2 / t / 1e9 for kk, t in times.items()},
                                rel_err=errors)
        step["cublas"] += count * times["cublas"]
        step["triton"] += count * times[default_key]
        step["best"] += count * times[best_key]
        step["triton_pdl"] += count * times.get("pdl", times[default_key])
    weight_bytes = sum(m["n"] * m["k"] * 2 * m["per_step"] for m in per_matrix.values())
    bw = {kk: weight_bytes / t / 1e9 for kk, t in step.items()}
    ok = worst <= 1e-2
    return dict(status="ok" if ok else "FAIL", met=ok if b.cuda else None, target="rel err ≤ 1e-2",
                result=f"per d{config.n_layer} step: cuBLAS {step['cublas'] * 1e3:.3f} ms ({bw['cublas']:,.0f} GB/s) · Triton "
                       f"{step['triton'] * 1e3:.3f} ms ({bw['triton']:,.0f} GB/s) · best tiles {step['best'] * 1e3:.3f} ms"
                       + (f" · Triton + PDL {step['triton_pdl'] * 1e3:.3f} ms ({bw['triton_pdl']:,.0f} GB/s)" if pdl else ""),
                notes="; ".join(f"{name} {m['n']}×{m['k']}: cuBLAS {m['us']['cublas']:.1f} µs, {m['default']} "
                                f"{m['us'][m['default']]:.1f} µs ({m['gb_s'][m['default']]:,.0f} GB/s)"
                                + (f", + PDL {m['us']['pdl']:.1f} µs" if pdl else "")
                                + f", best {m['best']} {m['us'][m['best']]:.1f} µs" for name, m in per_matrix.items())
                      + ("" if pdl else "; no programmatic dependent launch here"),
                metrics=dict(matrices=per_matrix, step_ms={kk: t * 1e3 for kk, t in step.items()}, step_gb_s=bw,
                             weight_bytes=weight_bytes, max_rel_err=worst, pdl=pdl))


# (cache slots per program, slots per loop iteration, warps, kernel) of the fused attention (NANOCHAT_FUSED_SPLIT,
# NANOCHAT_FUSED_ATTEND, NANOCHAT_FUSED_ATTEND_KERNEL); the first is the default at batch 1. ptxas on sm_90 (d20, 2,304
# slots), split kernel: 118, 64, 112, 62, 116, 112, 155 and 117 registers; lanes kernel: 121 and 96; none spilled. Run 4
# (H200) timed the split kernel's eight: the default was the fastest; the lanes kernel is new since
ATTEND_CANDIDATES = [(64, 32, 4, "split"), (64, 32, 8, "split"), (64, 64, 8, "split"), (64, 64, 16, "split"),
                     (128, 64, 8, "split"), (128, 128, 16, "split"), (32, 32, 4, "split"), (128, 32, 4, "split"),
                     (64, 32, 4, "lanes"), (64, 64, 8, "lanes")]


class AttentionBench:
    """The fused step's attention at batch 1 as the inference rows run it: the model's layers of cache (bf16 on CUDA)
    at their windows, one row at position prompt + new / 2, each layer's attention after its qkv GEMV (as in the step,
    so that PDL overlaps them as it does there). Timed per step in a graph, less the qkv GEMVs alone."""

    def __init__(self, b):
        import torch
        from nanochat import fused_decode as fd
        from nanochat.engine import cache_len
        from nanochat.gpt import GPTConfig, layer_windows
        c, i = b.cfg, b.cfg["infer"]
        self.b, self.fd = b, fd
        self.config = config = GPTConfig.from_depth(i["depth"], c["vocab"], c["seq"], head_dim=c["head_dim"])
        self.why = fd.unavailable_reason(b.device, config.head_dim)
        dtype = torch.bfloat16 if b.cuda else torch.float32
        H, HKV, D, C = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        self.max_len, self.pos = cache_len(i["prompt"] + i["new_tokens"]), i["prompt"] + i["new_tokens"] // 2
        g = torch.Generator().manual_seed(7)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(b.device, dtype)
        self.windows = layer_windows(config)
        self.layers = [dict(w=rand((H + 2 * HKV) * D, C, scale=C ** -0.5).t(), k=rand(1, HKV, self.max_len, D),
                            v=rand(1, HKV, self.max_len, D)) for _ in self.windows]
        self.x = rand(1, C)
        self.ids = torch.zeros(1, dtype=torch.long, device=b.device)
        self.at = torch.tensor([self.pos], dtype=torch.long, device=b.device)
        self.cos, self.sin = rand(self.max_len, D), rand(self.max_len, D)
        self.arrivals = torch.zeros(HKV, dtype=torch.int32, device=b.device)
        self.gemvs_s = None

    def qkv_only(self):
        return [self.fd.gemv(self.x, layer["w"]) for layer in self.layers]

    def step(self, windows=None):
        fd = self.fd
        return [fd.attend(self.x, fd.gemv(self.x, layer["w"]), self.ids, layer["k"], layer["v"], self.at, self.cos, self.sin,
                          window, self.config, arrivals=self.arrivals)
                for layer, window in zip(self.layers, windows or self.windows)]

    def us(self, fn=None, own_gemvs=False):
        """µs per step of the attention alone: a graph of the step (or fn), less the qkv GEMVs' graph (timed once, or
        again under the current settings: own_gemvs)."""
        if self.gemvs_s is None:
            self.gemvs_s = time_calls(self.b, self.qkv_only, calls=1)
        gemvs = time_calls(self.b, self.qkv_only, calls=1) if own_gemvs else self.gemvs_s
        return (time_calls(self.b, fn or self.step, calls=1) - gemvs) * 1e6

    def notes(self):
        return (f"batch 1 at position {self.pos} of {self.max_len}, windows {sorted(set(self.windows))}, PDL "
                f"{'on' if self.fd.pdl_on(self.b.device) else 'off'}, {self.gemvs_s * 1e6:.0f} µs of qkv GEMVs taken off")


def attention_tiles_row(b):
    """The fused step's attention (prepare + attend, AttentionBench) at each tiling in ATTEND_CANDIDATES: µs per step,
    and each tiling's outputs against the default's (relative error ≤ 1e-2). Sets b.attend_best for the decode row
    that runs it."""
    import torch
    a = AttentionBench(b)
    if a.why:
        return dict(status=f"skipped: {a.why}")
    fd = a.fd
    # the interpreter: three, small
    candidates = ATTEND_CANDIDATES if b.cuda else ATTEND_CANDIDATES[:1] + [(32, 32, 4, "split"), (64, 32, 4, "lanes")]
    us, errors, want = {}, {}, None
    for tiles in candidates:
        split, block, warps, kernel = tiles
        with mock.patch.multiple(fd, SPLIT_SLOTS=split, ATTEND_BLOCK=block, ATTEND_WARPS=warps, ATTEND_KERNEL=kernel):
            ys = torch.cat(a.step()).float()
            want = ys if want is None else want
            errors[tiles] = rel_err(ys, want)
            us[tiles] = a.us()
    name = "{} slots, {} a loop, {} warps, {} kernel".format
    best = min(us, key=us.get)
    b.attend_best = best
    worst = max(errors.values())
    ok = worst <= 1e-2
    return dict(status="ok" if ok else "FAIL", met=ok if b.cuda else None, target="rel err ≤ 1e-2 vs the default",
                result=f"attention per d{a.config.n_layer} step: default {us[candidates[0]]:.0f} µs · best {us[best]:.0f} µs "
                       f"({name(*best)})",
                notes=f"prepare + attend, {a.notes()}; "
                      + "; ".join(f"{name(*t)} {us[t]:.1f} µs (err {errors[t]:.1e})" for t in candidates),
                metrics=dict(us={",".join(map(str, t)): v for t, v in us.items()}, qkv_gemvs_us=a.gemvs_s * 1e6,
                             rel_err={",".join(map(str, t)): v for t, v in errors.items()}, best=list(best), pos=a.pos,
                             max_len=a.max_len))


class NoLaunch:
    """Stands in for a Triton kernel that the anatomy row leaves out: kernel[grid](...) launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


ANATOMY_CHAIN = 128  # kernels per timed chain of no-op kernels: about a d20 step's count


def anatomy_row(b):
    """Where the fused attention's time goes at batch 1 (AttentionBench, µs per step), by leaving parts out or
    changing one thing: the step's prepare + attend; prepare on 1 or 2 warps; attend alone; prepare alone; attend
    without the combine by its last programs (outputs wrong: timing only); with a combine kernel instead; every
    window 0 (one visible slot: the kernels' fixed cost); without PDL. And the floor of any kernel in the chain: a
    graph of ANATOMY_CHAIN no-op kernels (360 programs, as the attention at batch 1), with and without PDL."""
    import torch
    a = AttentionBench(b)
    if a.why:
        return dict(status=f"skipped: {a.why}")
    fd = a.fd
    every_window_0 = [0] * len(a.layers)
    variants = [("prepare + attend", {}), ("prepare on 1 warp", dict(PREPARE_WARPS=1)),
                ("prepare on 2 warps", dict(PREPARE_WARPS=2)), ("attend alone", dict(_prepare_kernel=NoLaunch())),
                ("prepare alone", dict(_attend_split_kernel=NoLaunch(), _combine_kernel=NoLaunch(), COMBINE="kernel")),
                ("attend without the combine", dict(_combine_kernel=NoLaunch(), COMBINE="kernel")),
                ("attend + a combine kernel", dict(COMBINE="kernel")), ("one visible slot", {}), ("without PDL", dict(PDL=False))]
    if not b.cuda:  # the interpreter: two variants and a short chain prove the code path
        variants = variants[:1] + variants[3:4]
    chain_len = ANATOMY_CHAIN if b.cuda else 2
    us = {}
    for label, change in variants:
        with mock.patch.multiple(fd, **change) if change else contextlib.nullcontext():  # patch.multiple wants one
            if label == "one visible slot":
                us[label] = a.us(lambda: a.step(every_window_0))
            else:  # without PDL the qkv GEMVs run without it too: taken off as they run then
                us[label] = a.us(own_gemvs=label == "without PDL")
    flag = torch.zeros(1, device=b.device)
    for pdl in (True, False) if fd.pdl_available(b.device) else (False,):
        launch = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)
        chain = lambda launch=launch: [fd._noop_kernel[(360,)](flag, **launch) for _ in range(chain_len)]  # noqa: E731
        us[f"no-op kernel{'' if pdl else ', no PDL'}"] = time_calls(b, chain, calls=1) * 1e6 / chain_len
    per = {k: v for k, v in us.items() if not k.startswith("no-op")}
    return dict(status="ok",
                result=" · ".join(f"{k} {v:.0f}" for k, v in per.items()) + " µs per step · "
                       + " · ".join(f"{k} {v:.2f} µs" for k, v in us.items() if k.startswith("no-op")),
                notes=f"d{a.config.n_layer} attention, {a.notes()}; no-op kernels: µs each in a graph of {chain_len}",
                metrics=dict(us=us, qkv_gemvs_us=a.gemvs_s * 1e6, pos=a.pos, max_len=a.max_len))


def best_attention_row(b):
    """d20 batch 1 fused, the attention at the tiling row's fastest tiling (when it is not the default)."""
    best = b.attend_best
    if best is None:
        return dict(status="skipped: the attention tiling row did not run")
    if best == ATTEND_CANDIDATES[0]:
        return dict(status="skipped: the default tiling was the fastest")
    return inference_row(b, 1, "fused", bandwidth=True, cap_s=90, attend=best)


SAMPLE_TOP_K, SAMPLE_TEMPERATURE = 50, 1.0  # as bench/inference.py's decode rows sample
SAMPLE_CHECK_ROWS = 512
# µs of GPU time per top-k sampling call at batch 1, d20's vocabulary (bench/GPU.md, predicted before run 4)
SAMPLE_PREDICTED_US = {"torch": 35, "triton": 12}


def sampling_row(b):
    """Top-k sampling of one token per row (the decode rows' top_k 50, temperature 1) from logits of the inference
    model's vocabulary: nanochat.fused_sample's two Triton kernels against torch's (NANOCHAT_FUSED_SAMPLE=0), µs per
    call at batch 1, 8 and 32 (on CUDA each in a graph of 20 calls: the GPU time it adds between two decode steps), and
    how often both draw the same logit from the same uniforms (512 rows: only a tie or a uniform within rounding of a
    boundary may differ)."""
    import torch
    from nanochat import fused_sample as fs
    from nanochat.engine import sample_with
    vocab, enabled = b.cfg["vocab"], fs.ENABLED
    fs.ENABLED = True
    try:
        if not fs.serves(torch.zeros(1, vocab, device=b.device), SAMPLE_TOP_K):
            return dict(status="skipped: the sampling kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)")

        def draw(logits, u, fused):
            fs.ENABLED = fused
            return sample_with(logits, u, SAMPLE_TEMPERATURE, SAMPLE_TOP_K)
        g = torch.Generator().manual_seed(5)
        rows = SAMPLE_CHECK_ROWS if b.cuda else 4  # the interpreter runs each program in Python
        logits = (torch.randn(rows, vocab, generator=g) * 3).to(b.device)
        u = torch.rand(rows, 1, generator=g).to(b.device)
        same = (logits.gather(1, draw(logits, u, True)) == logits.gather(1, draw(logits, u, False))).float().mean().item()
        us, ops = {}, {}
        for batch in (1, 8, 32) if b.cuda else (1,):
            x, ub = logits[:batch].contiguous(), u[:batch].contiguous()
            for name, fused in (("triton", True), ("torch", False)):
                try:
                    us[f"{batch} {name}"] = time_calls(b, lambda: draw(x, ub, fused)) * 1e6
                except RuntimeError as e:  # a capture refused: one call after another, launches included
                    b.report.log(f"  sampling {name} at batch {batch} not captured ({first_line(e)}): timed uncaptured")
                    us[f"{batch} {name}"] = b.time_it(lambda: draw(x, ub, fused), reps=20, warmup=3) * 1e6
                if b.cuda and batch == 1:
                    ops[name] = gpu_ops(lambda: draw(x, ub, fused))
    finally:
        fs.ENABLED = enabled
    ok = same >= 0.99
    batches = sorted({int(k.split()[0]) for k in us})
    return dict(status="ok" if ok else "FAIL", met=ok if b.cuda else None, target="same logit drawn in ≥ 99% of rows",
                result=" · ".join(f"batch {n}: Triton {us[f'{n} triton']:.1f} µs, torch {us[f'{n} torch']:.1f} µs" for n in batches)
                       + f" · same logit drawn in {same:.1%} of {rows} rows",
                notes=f"vocab {vocab:,}, top-k {SAMPLE_TOP_K}, block {fs.block_size(vocab, 64)}"
                      + (f"; GPU ops per call at batch 1: Triton {ops['triton']}, torch {ops['torch']}" if ops else "")
                      + (f"; predicted at batch 1: Triton ~{SAMPLE_PREDICTED_US['triton']} µs, torch ~{SAMPLE_PREDICTED_US['torch']} µs"
                         if b.cuda else ""),
                metrics=dict(us=us, gpu_ops=ops, same_logit=same, rows=rows, vocab=vocab, block=fs.block_size(vocab, 64)))


def gpu_ops(fn):
    """Kernels, copies and memsets one fn() call puts on the GPU (torch.profiler)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_type == DeviceType.CUDA for e in prof.events())

def profile_notes(prof):
    """bench/inference.py's decode profile in a few words: kernels, GPU time (summed, and covered: kernels overlap
    under PDL) against the wall time per step, and the four kernels that take the most."""
    top = ", ".join(f"{name.split('(')[0][:40]} {ms:.3f} ms ×{n:.0f}" for name, ms, n in prof["top_kernels_ms_per_step"][:4])
    return (f"{prof['kernels_per_step']:.0f} kernels/step, GPU busy {prof['gpu_busy_ms_per_step']:.2f} (covered "
            f"{prof['gpu_span_ms_per_step']:.2f}) of {prof['wall_ms_per_step']:.2f} ms/step (profiled); top: {top}")


def datasheet_hbm(b):
    """HBM bytes/s of this GPU by name (bench/inference.py's table), None when unknown or on a CPU."""
    return load_bench("inference").hbm_bytes_per_s(b.gpu) if b.cuda else None


def chat_diag_row(b):
    """Why chat_eval decodes ~25× slower on the H100 than on a 2-core CPU (2026-11-26: ci chat_eval_base 120 s vs
    4.7 s): the ci model's greedy decode over prompts of varying length, each variant in a fresh process (cold
    caches): eager with torch's SDPA order, eager without cuDNN SDPA, and the static graph path. A per-shape cost shows
    as cold >> warm; the profile tables (top self-CPU / self-device ops) go to the log and the JSON."""
    inference = load_bench("inference")
    spec = {} if not b.args.smoke else dict(prompt_lengths=[20, 40, 60], new_tokens=8, profile_lengths=[50], deadline_s=20.0)
    deadline = spec.get("deadline_s", inference.CHAT_DIAG["deadline_s"])
    runs = {}
    for variant in inference.CHAT_DIAG_VARIANTS:
        cmd = [sys.executable, str(REPO / "bench" / "inference.py"), "--chat-diag", json.dumps(dict(spec, variant=variant)),
               "--device", b.device.type]
        res, err, why = b.run_child(cmd, b.child_env(), cap_s=deadline + 40)  # + process start, model, profile
        if res is None:
            b.report.log(f"  chat diag {variant}: {why}; stderr tail:\n{err[-2000:]}")
            runs[variant] = dict(status=why, stderr_tail=err[-1500:])
            continue
        runs[variant] = res
        prof = res.get("profile")
        if prof:
            b.report.log(f"  chat diag {variant}: profile of prompts {prof['prompt_lengths']} ({prof['wall_s']:.1f} s), "
                         f"by self CPU time:\n{prof['table_cpu']}\nby self device time:\n{prof['table_device']}")
    summary = {v: step_summary(r) for v, r in runs.items()}
    result = " · ".join(f"{v}: {s}" for v, s in summary.items())
    return dict(status="ok" if all("cold" in r for r in runs.values()) else "error: a variant did not run (see the log)",
                result=result, notes=chat_diag_verdict(runs), metrics=dict(runs=runs))


def step_summary(run):
    """'cold 12.3 / warm 1.1 ms/step (mean)' for one diagnostic variant."""
    if "cold" not in run:
        return run.get("status", "?")
    cold, warm = run["cold"], run.get("warm", {})
    text = f"cold {cold.get('step_ms_mean', float('nan')):.2f} / warm {warm.get('step_ms_mean', float('nan')):.2f} ms/step"
    return text + f", prefill {cold.get('prefill_ms_median', float('nan')):.1f}/{warm.get('prefill_ms_median', float('nan')):.1f} ms"


def chat_diag_verdict(runs):
    """One line reading the three variants: is the slowness per new shape, and is it cuDNN's SDPA?"""
    def mean(variant, which, key="step_ms_mean"):
        return runs.get(variant, {}).get(which, {}).get(key)
    e_cold, e_warm, n_cold = mean("eager", "cold"), mean("eager", "warm"), mean("eager, no cuDNN SDPA", "cold")
    ep_cold, np_cold = mean("eager", "cold", "prefill_ms_median"), mean("eager, no cuDNN SDPA", "cold", "prefill_ms_median")
    if None in (e_cold, e_warm, n_cold):
        return "verdict: incomplete (a variant did not finish a pass)"
    cudnn_ran = any("cudnn" in op.lower() for op in runs["eager"].get("profile", {}).get("attention_ops", {}))
    parts = [f"eager cold/warm {e_cold / e_warm:.1f}×", f"cuDNN excluded: cold {e_cold / n_cold:.1f}× faster",
             f"cuDNN SDPA ops in the eager profile: {'yes' if cudnn_ran else 'no'}"]
    if e_cold > 3 * n_cold:
        verdict = "cuDNN SDPA per-shape cost: CONFIRMED"
    elif e_cold > 3 * e_warm:
        verdict = "a per-shape cost that is not cuDNN SDPA (see the profile)"
    else:
        verdict = "no per-shape cost: the per-step time itself (see the profile)"
    if ep_cold and np_cold:
        parts.append(f"cold prefill {ep_cold:.1f} vs {np_cold:.1f} ms without cuDNN")
    g_cold = mean("graph", "cold")
    if g_cold:
        parts.append(f"graph path cold {g_cold:.2f} ms/step")
    return f"verdict: {verdict}; " + ", ".join(parts)


def bench_tokenizer(docs, vocab_size, backend="auto"):
    """The pipeline's tokenizer (rustbpe-trained, run by tiktoken). Without rustbpe (e.g. the GPU image), train the
    same split pattern with HuggingFace tokenizers and run its merges through tiktoken: the loader path is the same."""
    from nanochat.tokenizer import Tokenizer, train_tokenizer
    if backend in ("auto", "rustbpe"):
        try:
            import rustbpe  # noqa: F401
            return train_tokenizer(iter(docs), vocab_size), "rustbpe → tiktoken"
        except ImportError:
            if backend == "rustbpe":
                raise
    hf = train_tokenizer(iter(docs), vocab_size, backend="huggingface")
    merged = [t for t, _ in sorted(hf.mergeable_ranks().items(), key=lambda kv: kv[1]) if len(t) > 1]  # merge order
    ranks = {bytes([i]): i for i in range(256)} | {t: 256 + i for i, t in enumerate(merged)}
    return Tokenizer(ranks), "HF tokenizers BPE → tiktoken (rustbpe not importable)"


def dataloader_row(b):
    """bench/dataloader.py's measure() on a file:// store of the embedded corpus (no S3 server on the device)."""
    missing = [m for m in ("pyarrow", "tiktoken", "numpy") if importlib.util.find_spec(m) is None]
    if missing:
        return dict(status=f"skipped: {', '.join(missing)} not importable (carry wheels, see the device README)")
    if importlib.util.find_spec("rustbpe") is None and importlib.util.find_spec("tokenizers") is None:
        return dict(status="skipped: neither rustbpe nor tokenizers importable to train a tokenizer")
    from nanochat import dataset
    from nanochat.store import open_store
    import torch
    L = b.cfg["loader"]
    work = Path(tempfile.mkdtemp(prefix="nanochat-gpu-loader-"))
    threads_before = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        docs, _ = dataset.embedded_documents(L["max_chars"])
        tokenizer, kind = bench_tokenizer(docs, L["vocab"])
        store = open_store(f"file://{work}/store")
        dataset.build_embedded(store, max_chars=L["max_chars"], row_group_rows=256)
        setup_s = time.perf_counter() - t0
        torch.set_num_threads(1)  # as bench/dataloader.py: the loader's own threads do the work
        measure = load_bench("dataloader").measure
        runs = {t: measure(store, tokenizer, L["B"], L["T"], t, L["batches"]) for t in L["threads"]}
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(work, ignore_errors=True)
    best = max(r["tok_s"] for r in runs.values())
    out = dict(status="ok", metrics=dict(runs={str(t): r for t, r in runs.items()}, tokenizer=kind, setup_s=setup_s, best_tok_s=best),
               result=" · ".join(f"{t} thr {r['tok_s']:,.0f} tok/s" for t, r in runs.items()),
               notes=f"B={L['B']} T={L['T']}, file://, {kind}, {os.cpu_count()} CPU cores")
    step = next((b.train[k] for k in [(20, True, False, "default")] if k in b.train), None) or next(iter(b.train.values()), None)
    if step:
        ratio = best / step["tok_s"]
        out.update(target=f"≥ {LOADER_TARGET:g}× d{step['depth']} tok/s", met=ratio >= LOADER_TARGET)
        out["result"] += f" · {ratio:.1f}× the d{step['depth']} step"
    return out


# -----------------------------------------------------------------------------
# the plan: rows in priority order

def plan(b):
    """(section, name, min seconds, fn) in priority order: correctness, device, d20 bf16 train, inference (the fast
    decode path, the eager baseline, the chat_eval diagnostic), optimizer, d24 bf16/fp8, dataloader, the pipeline
    (capped at PIPELINE_CAP_S), the rest. min seconds: below that much budget left, the row is skipped."""
    full = not b.args.smoke
    k = 1 if full else 0.05  # toy rows are quick
    fast = "graph" if b.cuda else "static"  # no CUDA graph on a CPU: the same static step, eager
    rows = [
        ("correctness", "bf16 train steps vs fp32", 20 * k, lambda: check_bf16_training(b)),
        ("correctness", "sliding window vs dense", 15 * k, lambda: check_sliding_window(b)),
        ("correctness", "KV decode vs full forward", 15 * k, lambda: check_kv_decode(b)),
        ("correctness", "graph decode vs eager", 15 * k, lambda: check_graph_decode(b)),
        ("correctness", "fused decode vs eager", 15 * k, lambda: check_graph_decode(b, "fused")),
        ("correctness", "fp8 vs bf16", 15 * k, lambda: check_fp8(b)),
        ("device", "matmul peak · copy bandwidth", 10 * k, lambda: measure_peaks(b)),
    ]
    if full:
        rows += [
            ("train", "d20 bf16 compile", 90, lambda: train_row(b, 20, target=mfu_target)),
            ("inference", f"d20 batch 1 {fast}", 30, lambda: inference_row(b, 1, fast, bandwidth=True, cap_s=90)),
            ("inference", "d20 GEMVs: Triton kernel vs cuBLAS", 40, lambda: gemv_row(b)),
            ("inference", "d20 batch 1 fused", 30, lambda: inference_row(b, 1, "fused", bandwidth=True, cap_s=90)),
            ("inference", "d20 attention tilings, batch 1", 30, lambda: attention_tiles_row(b)),
            ("inference", "d20 batch 1 fused, the fastest attention tiling", 30, lambda: best_attention_row(b)),
            ("inference", "d20 attention anatomy, batch 1", 20, lambda: anatomy_row(b)),
            ("inference", "d20 sampling: Triton top-k vs torch", 15, lambda: sampling_row(b)),
            ("inference", "d20 batch 1 fused, combine kernel", 30,  # the attention's splits combined by a kernel of its own
             lambda: inference_row(b, 1, "fused", bandwidth=True, cap_s=90, combine="kernel")),
            ("inference", "d20 batch 1 fused, torch sampling", 30,  # top-k sampling in torch's ~15 kernels per token
             lambda: inference_row(b, 1, "fused", bandwidth=True, cap_s=90, fused_sample=False)),
            ("inference", "d20 batch 1 fused, no PDL", 30,  # the kernels one after another
             lambda: inference_row(b, 1, "fused", bandwidth=True, cap_s=90, pdl=False)),
            ("inference", "d20 batch 1 fused, cuBLAS GEMVs, no PDL", 30,  # run 3's structure, today's attention kernels
             lambda: inference_row(b, 1, "fused", bandwidth=True, cap_s=90, gemv="cublas", pdl=False)),
            ("inference", "d20 batch 1 eager (the old path)", 30, lambda: inference_row(b, 1, "eager", bandwidth=True, cap_s=90)),
            ("inference", f"d20 batch 8 {fast}", 25, lambda: inference_row(b, 8, fast, cap_s=90)),
            ("inference", f"d20 batch 32 {fast}", 25, lambda: inference_row(b, 32, fast, cap_s=90)),
            ("inference", "d20 batch 8 fused", 25, lambda: inference_row(b, 8, "fused", cap_s=90)),
            ("inference", "d20 batch 32 fused", 25, lambda: inference_row(b, 32, "fused", cap_s=90)),
            ("inference", f"d20 batch 32 {fast}, 32 requests batched", 25, lambda: inference_row(b, 32, fast, cap_s=90, mode="batched")),
            ("inference", "d20 batch 32 fused, 32 requests batched", 25, lambda: inference_row(b, 32, "fused", cap_s=90, mode="batched")),
            ("inference", "d20 batch 1 auto, 1 request in a 32-row batch", 25,  # the 1-row step on the fused path
             lambda: inference_row(b, 1, "auto", cap_s=90, mode="batched", rows=32)),
            ("train", "d24 bf16 compile", 90, lambda: train_row(b, 24)),
            ("train", "d24 fp8 compile", 90, lambda: train_row(b, 24, fp8=True, target=fp8_target(b, 24))),
            ("inference", "chat_eval decode diagnostic (ci model)", 60, lambda: chat_diag_row(b)),
            ("inference", "d20 batch 1 compile", 90, lambda: inference_row(b, 1, "compile", bandwidth=True, cap_s=150)),
            # run 3's splits on today's kernel: what the kernel change gave apart from the split
            ("inference", "d20 batch 1 fused, 256-slot splits", 25, lambda: inference_row(b, 1, "fused", True, 90, fused_split=256)),
            ("inference", "d20 batch 32 fused, 256-slot splits", 25, lambda: inference_row(b, 32, "fused", False, 90, fused_split=256)),
            ("optimizer", "d20 MuonAdamW step", 45, lambda: optimizer_row(b, 20)),
            ("dataloader", "embedded corpus, file://", 40, lambda: dataloader_row(b)),
            ("pipeline", "speedrun --profile ci, every stage", 120, lambda: pipeline_row(b)),
            ("train", "d20 bf16 eager", 30, lambda: train_row(b, 20, compile_=False)),
            ("train", "d20 fp8 compile", 90, lambda: train_row(b, 20, fp8=True, target=fp8_target(b, 20))),
            ("train", "d20 bf16 compile SDPA (vs FA3)", 90, lambda: train_row(b, 20, attn="sdpa")),
            ("train", "d12 bf16 compile", 60, lambda: train_row(b, 12)),
            ("train", "d12 fp8 compile", 60, lambda: train_row(b, 12, fp8=True, target=fp8_target(b, 12))),
            ("train", "d12 bf16 eager", 25, lambda: train_row(b, 12, compile_=False)),
            ("train", "d24 bf16 eager", 30, lambda: train_row(b, 24, compile_=False)),
        ]
    else:  # one tiny row of each measuring section (the decode paths: two): proves the code paths, measures nothing
        rows += [
            ("train", "d2 eager (smoke)", 3, lambda: train_row(b, 2, compile_=False, target=mfu_target)),
            ("inference", f"d2 batch 1 {fast} (smoke)", 3, lambda: inference_row(b, 1, fast, bandwidth=True)),
            ("inference", "d2 batch 1 eager (smoke)", 3, lambda: inference_row(b, 1, "eager", bandwidth=True)),
            ("inference", "d2 GEMVs: Triton kernel vs cuBLAS (smoke)", 3, lambda: gemv_row(b)),
            ("inference", "d2 sampling: Triton top-k vs torch (smoke)", 3, lambda: sampling_row(b)),
            ("inference", "d2 attention tilings, batch 1 (smoke)", 3, lambda: attention_tiles_row(b)),
            ("inference", "d2 attention anatomy, batch 1 (smoke)", 3, lambda: anatomy_row(b)),
            ("inference", f"d2 batch 4 {fast}, 4 requests batched (smoke)", 3, lambda: inference_row(b, 4, fast, mode="batched")),
            ("inference", "d2 batch 1 auto, 1 request in a 4-row batch (smoke)", 3,
             lambda: inference_row(b, 1, "auto", mode="batched", rows=4)),
            ("inference", "chat_eval decode diagnostic (smoke)", 5, lambda: chat_diag_row(b)),
            ("optimizer", "d2 MuonAdamW step (smoke)", 1, lambda: optimizer_row(b, 2)),
            ("dataloader", "embedded corpus, file:// (smoke)", 3, lambda: dataloader_row(b)),
            ("pipeline", "speedrun --profile ci: data, tok_train, base_train (smoke)", 5, lambda: pipeline_row(b)),
        ]
    only = set(b.args.only.split(",")) if b.args.only else None
    return [r for r in rows if (only is None or r[0] in only) and wanted(r[1], b.args.rows, b.args.skip)]


def wanted(name, rows, skip):
    """--rows keeps the rows whose name holds one of its comma-separated substrings; --skip drops them (case-insensitive)."""
    def hits(patterns):
        return any(p.strip().lower() in name.lower() for p in patterns.split(",") if p.strip())
    return (not rows or hits(rows)) and not (skip and hits(skip))


def rustbpe_usable():
    try:
        from nanochat.tokenizer import import_rustbpe
        import_rustbpe()
        return True
    except ImportError:
        return False


def pipeline_row(b):
    """The real stages end to end on this device through the runner (subprocesses, torchrun where a stage asks)."""
    work = Path(tempfile.mkdtemp(prefix="nanochat-gpu-pipeline-"))
    cmd = [sys.executable, "-m", "nanochat.cli", "speedrun", "--profile", "ci", "--store", f"file://{work}/store",
           "--set", "chat_eval.max_problems=4"]  # ci's 20 per task took 120 s per chat_eval on the H100 (see chat_diag_row)
    if not rustbpe_usable():  # the GPU image has no rustbpe: the same split pattern trained by HF tokenizers
        cmd += ["--set", "tok_train.backend=huggingface"]
    if b.args.smoke:
        cmd += ["--only", "data", "--only", "tok_train", "--only", "base_train", "--set", "base_train.num_iterations=3"]
    if b.device.type == "cpu":
        cmd += ["--set", "device=cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), TMPDIR=str(work),
               TORCHINDUCTOR_CACHE_DIR=b.inductor_dir, NANOCHAT_BASE_DIR=str(work / "home"))
    remaining = b.report.remaining()
    timeout = max(1.0, min(remaining, PIPELINE_CAP_S))  # one row must not eat the whole budget again
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            process_group=0)  # own group: a timeout also ends the stage processes and torchrun ranks
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    finally:
        stages = pipeline_stages(work / "store")
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    done = ", ".join(f"{name} {info['duration_s']:.0f}s" for name, info in stages.items())
    if proc.returncode == -signal.SIGKILL:
        b.report.log(f"  pipeline output tail:\n{output[-3000:]}")
        why = "stopped: row cap" if timeout < remaining else "skipped: budget"
        why += f" (killed after {timeout:.0f} s)"
        return dict(status=why, notes=f"done: {done or 'none'}",
                    metrics=dict(wall_s=round(wall, 1), stages={k: v["duration_s"] for k, v in stages.items()}))
    if proc.returncode != 0:
        b.report.log(f"  pipeline output tail:\n{output[-3000:]}")
        return dict(status="FAIL", result=f"exit {proc.returncode} after {wall:.0f} s", notes=f"done: {done or 'none'}; "
                    + last_error_line(output))
    core = [info["metrics"].get("ChatCORE") for name, info in stages.items() if name.startswith("chat_eval")]
    devices = sorted({info.get("device", "?") for info in stages.values()})
    return dict(status="ok", result=f"{len(stages)} stages in {wall:.0f} s on {'/'.join(devices)}",
                metrics=dict(wall_s=round(wall, 1), stages={k: v["duration_s"] for k, v in stages.items()}, chatcore=core),
                notes=done)


def pipeline_stages(store_dir):
    """name -> done.json of every finished stage in a file:// store."""
    stages = {}
    for path in sorted((store_dir / "stages").glob("*/done.json")):
        try:
            stages[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return dict(sorted(stages.items(), key=lambda kv: kv[1].get("started", 0)))


def collect_meta(b):
    import torch
    meta = dict(device=b.device.type, gpu=b.gpu or None, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), cpus=os.cpu_count(), smoke=b.args.smoke, host=platform.node(),
                started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:])
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if b.cuda:
        props = torch.cuda.get_device_properties(b.device)
        meta.update(capability=".".join(map(str, torch.cuda.get_device_capability(b.device))), sms=props.multi_processor_count,
                    memory_gb=props.total_memory / 1e9)
        meta["fa3_importable"] = fa3_importable(b)
    from nanochat.fp8 import fp8_supported
    meta["fp8_supported"] = fp8_supported(b.device)
    head = REPO / ".git" / "HEAD"  # the commit, without running git
    try:
        ref = head.read_text().strip()
        meta["commit"] = (REPO / ".git" / ref[5:]).read_text().strip() if ref.startswith("ref: ") else ref
    except OSError:
        meta["commit"] = None
    return meta


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda when available (default: auto)")
    p.add_argument("--smoke", action="store_true", help="toy sizes: correctness + one tiny row per section (CPU: well under a minute)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="total seconds; rows that no longer fit are recorded as 'skipped: budget' (default 480: one 600 s device call)")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_out)")
    p.add_argument("--only", default="", help="comma-separated sections to run: correctness,device,train,optimizer,inference,dataloader,pipeline")
    p.add_argument("--rows", default="", help="comma-separated substrings: run only the rows whose name holds one (e.g. 'd24,graph')")
    p.add_argument("--skip", default="", help="comma-separated substrings: leave out the rows whose name holds one (e.g. 'd20 bf16 compile')")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per row after the first (default 5; smoke 2)")
    args = p.parse_args()
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_out").resolve()
    # one inductor cache for this process and every worker: the optimizer row reuses the train rows' kernels
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nanochat-gpu-inductor"))
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu needs --smoke: the full sizes (d20 at seq 2048) are for a GPU")
    report = Report(args, out_dir)
    b = Bench(args, report)
    if args.steps:
        b.cfg = dict(b.cfg, steps=args.steps)
    report.meta = collect_meta(b)
    report.log(f"bench/gpu.py: {report.meta['gpu'] or 'cpu'}, torch {torch.__version__}, budget {args.budget_s:.0f} s, out {out_dir}")
    report.save()
    for section, name, min_s, fn in plan(b):
        report.run(section, name, min_s, fn)
    report.save(finished=True)
    table = report.table()
    (out_dir / "gpu_table.md").write_text(table + "\n")
    m = report.meta
    print(f"\n# bench/gpu.py: {m['gpu'] or 'CPU'} (capability {m.get('capability', '-')}), torch {m['torch']}, CUDA {m['cuda']}, "
          f"triton {m['triton']}, {report.elapsed():.0f} s of {args.budget_s:.0f} s{' (smoke)' if args.smoke else ''}")
    print(table)
    print(f"JSON: {out_dir / 'gpu.json'}", flush=True)
    return 1 if any(r["status"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
