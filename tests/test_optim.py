"""nanochat.optim: Muon orthogonality and update rule, AdamW parity with torch, schedules,
per-rank state round trips, and the sharded optimizer under torchrun (gloo, 2 CPU processes)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import (POLAR_EXPRESS_COEFFS, MuonAdamW, adamw_update, fused_adamw_update, lr_multiplier, muon_lr_scale,
                            muon_momentum, polar_express, set_hyperparams)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_optim_check.py"


def svdvals(x):
    return torch.linalg.svdvals(x.double())


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (192, 64), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_polar_express_orthogonalizes(shape, dtype):
    g = torch.Generator().manual_seed(0)
    U, _, V = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
    G = U @ torch.diag(torch.logspace(0, -1.5, min(shape))) @ V  # singular values spread 30x
    s = svdvals(polar_express(G.to(dtype)).float())
    # 5 Polar Express steps land every singular value in a band around 1 (not exactly 1: the
    # published coefficients trade exactness for speed)
    assert s.min() > 0.8 and s.max() < 1.2, (s.min().item(), s.max().item())


def test_polar_express_matches_the_written_out_iteration():
    # the iteration runs as fused GEMMs (beta * C + alpha * A @ B); stacked (3D) and single (2D) matrices alike
    G = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(3))
    X = (G / (G.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)).mT  # tall: iterate on the transpose
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    torch.testing.assert_close(polar_express(G), X.mT, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([polar_express(g) for g in G]), X.mT, rtol=1e-5, atol=1e-5)


def muon_group(params, **kw):
    return dict(dict(kind="muon", params=params, lr=0.1, momentum=0.0, beta2=None, weight_decay=0.0, ns_steps=5), **kw)


def test_muon_update_is_near_orthogonal_and_shape_scaled():
    g = torch.Generator().manual_seed(0)
    for shape in [(96, 32), (32, 96)]:
        W = torch.nn.Parameter(torch.randn(shape, generator=g))
        W0 = W.detach().clone()
        opt = MuonAdamW([muon_group([W])], ortho_dtype=torch.float32)
        W.grad = torch.randn(shape, generator=g)
        opt.step()
        scale = 0.1 * muon_lr_scale(shape)
        assert muon_lr_scale(shape) == (3 ** 0.5 if shape[0] > shape[1] else 1.0)  # max(1, rows/cols)^0.5
        s = svdvals((W0 - W.detach()) / scale)
        assert s.min() > 0.8 and s.max() < 1.2
        # the update points against the gradient
        assert torch.sum((W0 - W.detach()) * W.grad) > 0


def test_normuon_keeps_the_update_norm_and_equalizes_rows():
    g = torch.Generator().manual_seed(1)
    shape = (64, 16)  # tall: NorMuon keeps one second-moment entry per row (output neuron)
    grad = torch.randn(shape, generator=g) * torch.linspace(0.1, 3.0, 64)[:, None]  # rows of very different scale
    deltas = {}
    for beta2 in (None, 0.95):
        W = torch.nn.Parameter(torch.zeros(shape))
        opt = MuonAdamW([muon_group([W], beta2=beta2)], ortho_dtype=torch.float32)
        W.grad = grad.clone()
        opt.step()
        deltas[beta2] = -W.detach()
        if beta2 is not None:
            assert opt.state[W]["second_momentum_buffer"].shape == (1, 64, 1)
    plain, normed = deltas[None], deltas[0.95]
    torch.testing.assert_close(normed.norm(), plain.norm(), rtol=1e-4, atol=0)
    row_spread = lambda d: (d.norm(dim=1).max() / d.norm(dim=1).min()).item()
    assert row_spread(normed) < 1.01 < row_spread(plain)


def reference_muon(W, grads, lr, momentum, wd, beta2):
    """Muon written out for one matrix, step by step, to check the stacked fused version."""
    W, buf, v = W.clone(), torch.zeros_like(W), None
    for grad in grads:
        buf = momentum * buf + (1 - momentum) * grad
        g = (1 - momentum) * grad + momentum * buf  # Nesterov
        O = polar_express(g)
        red = -1 if W.size(0) >= W.size(1) else -2
        v_mean = O.square().mean(dim=red, keepdim=True)
        v = (1 - beta2) * v_mean if v is None else beta2 * v + (1 - beta2) * v_mean
        U = O * v.rsqrt()
        U = U * O.norm() / U.norm()
        lr_eff = lr * max(1, W.size(0) / W.size(1)) ** 0.5
        W = W - lr_eff * U - lr_eff * wd * W * ((U * W) >= 0)
    return W


@pytest.mark.parametrize("wd", [0.0, 0.5])  # 0 skips the cautious mask
def test_muon_matches_a_per_matrix_reference(wd):
    g = torch.Generator().manual_seed(2)
    Ws = [torch.nn.Parameter(torch.randn(48, 16, generator=g)) for _ in range(3)]
    W0 = [W.detach().clone() for W in Ws]
    grads = [[torch.randn(48, 16, generator=g) for _ in Ws] for _ in range(4)]
    opt = MuonAdamW([muon_group(Ws, lr=0.05, momentum=0.9, beta2=0.9, weight_decay=wd)], ortho_dtype=torch.float32)
    for step_grads in grads:
        for W, grad in zip(Ws, step_grads):
            W.grad = grad.clone()
        opt.step()
    for i, W in enumerate(Ws):
        expected = reference_muon(W0[i], [step_grads[i] for step_grads in grads], 0.05, 0.9, wd, 0.9)
        torch.testing.assert_close(W.detach(), expected, rtol=1e-4, atol=1e-5)


def test_cautious_weight_decay_only_shrinks_where_the_update_agrees():
    W = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, -2.0]]))
    opt = MuonAdamW([muon_group([W], lr=0.1, weight_decay=1.0)], ortho_dtype=torch.float32)
    W.grad = torch.zeros(2, 2)  # zero update: every coordinate agrees (0 * w >= 0) and decays
    opt.step()
    torch.testing.assert_close(W.detach(), torch.tensor([[0.9, -0.9], [1.8, -1.8]]))


def test_adamw_part_matches_torch_adamw():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 16), (16,), (3, 5, 7)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    opt = MuonAdamW([dict(kind="adamw", params=ours[:2], **hp), dict(kind="adamw", params=ours[2:], **hp)])
    ref = torch.optim.AdamW(theirs, foreach=False, **hp)
    for step in range(6):
        lr = 0.01 * (1 - step / 10)  # a schedule: hyperparameters change between steps
        for group in opt.param_groups + ref.param_groups:
            group["lr"] = lr
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_update_matches_the_fused_kernel(dtype):
    # eager steps run torch's fused AdamW kernel, compiled ones adamw_update: the same update either way
    g = torch.Generator().manual_seed(4)
    p = torch.randn(64, 16, generator=g).to(dtype)
    tensors = {name: [p.clone(), torch.zeros_like(p), torch.zeros_like(p)] for name in ("plain", "fused")}
    for step in range(1, 6):
        grad = torch.randn(64, 16, generator=g).to(dtype)
        hyper = dict(step=step, lr=0.01 / step, beta1=0.8, beta2=0.95, eps=1e-8, wd=0.1)
        adamw_update(*tensors["plain"][:1], grad, *tensors["plain"][1:], *(torch.tensor(float(v)) for v in hyper.values()))
        fused_adamw_update(*tensors["fused"][:1], grad, *tensors["fused"][1:], **hyper)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # plain rounds each op to bf16
    for plain, fused in zip(tensors["plain"], tensors["fused"]):
        torch.testing.assert_close(fused.float(), plain.float(), **tol)
    assert not torch.equal(tensors["fused"][0], p)  # it moved


@pytest.mark.parametrize("layout", ["grad transposed", "moments transposed"])
def test_the_fused_kernel_follows_strides(layout):
    # the CPU kernel ignores strides: a gradient (or moments) laid out unlike the parameter must still pair up right
    g = torch.Generator().manual_seed(5)
    p, grad = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g).t()
    moments = lambda: (torch.zeros(8, 16).t(), torch.zeros(8, 16).t()) if layout == "moments transposed" else (torch.zeros(16, 8), torch.zeros(16, 8))
    plain, fused = [p.clone(), *moments()], [p.clone(), *moments()]
    for step in (1, 2):
        adamw_update(plain[0], grad, *plain[1:], *(torch.tensor(v) for v in (float(step), 0.1, 0.9, 0.95, 1e-8, 0.1)))
        fused_adamw_update(fused[0], grad, *fused[1:], step=step, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compiled_steps_match_eager_steps():
    # GPUs run the update rules torch.compile'd (fused GEMMs, adamw_update), CPUs eagerly (fused AdamW kernel)
    results = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        Ws, E = [torch.nn.Parameter(torch.randn(48, 16)) for _ in range(3)], torch.nn.Parameter(torch.randn(32, 8))
        opt = MuonAdamW([muon_group(Ws, lr=0.05, momentum=0.9, beta2=0.9, weight_decay=0.1),
                         dict(kind="adamw", params=[E], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)],
                        compile=compile_, ortho_dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in Ws + [E]:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach().clone() for p in Ws + [E]])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_schedules():
    assert lr_multiplier(0, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, warmup_ratio=0.1) == 1.0
    assert lr_multiplier(50, 100, warmdown_ratio=0.2) == 1.0
    assert lr_multiplier(80, 100, warmdown_ratio=0.2) == 1.0
    assert lr_multiplier(90, 100, warmdown_ratio=0.2, final_lr_frac=0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.1)
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(5000) == pytest.approx(0.95)


def train_steps(model, opt, batches, first_step):
    for i, (x, y) in enumerate(batches):
        set_hyperparams(opt, lr_multiplier(first_step + i, 8, warmup_ratio=0.25, warmdown_ratio=0.5), muon_momentum(first_step + i))
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def test_state_dict_round_trip_continues_identically():
    cfg = GPTConfig.from_depth(2, 100, 16, head_dim=32, n_kv_head=2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 100, (2, 16), generator=g), torch.randint(0, 100, (2, 16), generator=g)) for _ in range(6)]
    torch.manual_seed(0)
    model = GPT.create(cfg)
    opt = model.setup_optimizer()
    train_steps(model, opt, batches[:3], 0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["sharding"] == {"rank": 0, "world_size": 1}
    train_steps(model, opt, batches[3:], 3)

    torch.manual_seed(123)
    resumed = GPT.create(cfg)
    resumed.load_state_dict(saved_model)
    opt2 = resumed.setup_optimizer()
    opt2.load_state_dict(saved_opt)
    train_steps(resumed, opt2, batches[3:], 3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    bad = dict(saved_opt, sharding={"rank": 1, "world_size": 2})
    with pytest.raises(ValueError, match="rank 1 of 2"):
        opt2.load_state_dict(bad)


def test_groups_are_validated():
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)])
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 3))], lr=0.1)])


# -----------------------------------------------------------------------------
# distributed: 2 gloo processes with the sharded optimizer vs 1 process with grad accumulation

def run_worker(out, nproc, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_sharded_optimizer_matches_single_process_grad_accumulation(tmp_path):
    run_worker(tmp_path / "single", 1, tmp_path)
    run_worker(tmp_path / "dist", 2, tmp_path)
    single = torch.load(tmp_path / "single" / "final_rank0.pt")
    ranks = [torch.load(tmp_path / "dist" / f"final_rank{r}.pt") for r in range(2)]
    # every rank ends with the same full parameters
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # and they match one process accumulating the same global batch. Tolerance (fp32): 1e-5 abs;
    # the averaged gradients differ from the accumulated ones by float rounding at most
    worst = max((ranks[0][n] - single[n]).abs().max().item() for n in single)
    print(f"max |sharded - single| = {worst:.3g}")
    assert worst <= 1e-5, worst
    info = [json.loads((tmp_path / "dist" / f"info_rank{r}.json").read_text()) for r in range(2)]
    single_info = json.loads((tmp_path / "single" / "info_rank0.json").read_text())
    # resuming from the per-rank optimizer shards continued bit-identically on every rank
    assert all(i["resume_identical"] for i in info) and single_info["resume_identical"]
    # ZeRO-2: the optimizer state is split between the ranks, not replicated
    # (only the per-layer scalars, under SMALL_PARAM elements, are all_reduced and kept by both)
    shard_sizes = [i["state_numel"] for i in info]
    assert min(shard_sizes) > 0.3 * single_info["state_numel"]
    assert sum(shard_sizes) - single_info["state_numel"] == 2 * 3 * 2  # 2 scalar vectors of 3, 2 moments each
