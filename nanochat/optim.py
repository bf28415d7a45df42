"""
MuonAdamW: one optimizer, Muon for 2D block matrices and AdamW for embeddings, lm_head and scalars.

Muon (https://kellerjordan.github.io/posts/muon/) as in modern nanochat / modded-nanogpt:
Nesterov momentum -> Polar Express orthogonalization (https://arxiv.org/abs/2505.16932) ->
NorMuon per-neuron variance normalization -> shape-based LR scale -> cautious weight decay.

Single process or distributed with the same code: when torch.distributed is initialized with
world_size > 1, each step reduce_scatters the gradients, every rank updates only the parameters
(AdamW: dim-0 slices; Muon: whole matrices of a same-shape group) it owns, then all_gathers the
parameters back. Optimizer state lives only on the owner (ZeRO-2), so state_dict() /
load_state_dict() save and restore this rank's shard (per-rank files optim_rank{r}.pt).
Don't wrap the model in DDP: this optimizer does the gradient averaging.
"""

import torch
import torch.distributed as dist

# reduce_scatter_tensor / all_gather_into_tensor were renamed *_single in newer torch
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SMALL_PARAM = 1024  # AdamW params below this many elements are all_reduced and updated on every rank

# Polar Express coefficients for 5 iterations (safety factor 2e-2, cushion 2), from the paper
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -----------------------------------------------------------------------------
# schedules

def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup, constant, then linear warmdown to final_lr_frac at num_iterations."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = max(num_iterations - step, 0) / max(warmdown, 1)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300):
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_hyperparams(optimizer, lr_mult, momentum=None):
    """Apply schedule values: lr = initial_lr * lr_mult for every group, momentum for Muon groups."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if momentum is not None and group["kind"] == "muon":
            group["momentum"] = momentum


# -----------------------------------------------------------------------------
# the two update rules (plain tensor code: run eagerly or torch.compile'd; hyperparameters are
# 0-D CPU tensors so a changing learning rate does not trigger recompilation)

def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    p.mul_(1 - lr * wd)  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_(grad.square() * (1 - beta2))
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = exp_avg_sq.sqrt() / bias2.sqrt() + eps
    p.add_(exp_avg / denom * (-lr / bias1))


def fused_adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """adamw_update in torch's fused AdamW kernel: one pass over the four tensors instead of ~12 (eager on CPU,
    4x(4096, 256): 1.4 ms instead of 25). Same formula as torch.optim.AdamW; hyperparameters as Python floats.
    The CPU kernel walks the four tensors' memory in step, ignoring strides: all must share p's layout."""
    if exp_avg.stride() != p.stride() or exp_avg_sq.stride() != p.stride():  # moments in another layout (not ours)
        return adamw_update(p, grad, exp_avg, exp_avg_sq, *(torch.tensor(float(v)) for v in (step, lr, beta1, beta2, eps, wd)))
    if grad.stride() != p.stride():  # e.g. a transposed gradient: laid out as p, or the kernel pairs wrong elements
        grad = torch.empty_like(p).copy_(grad)
    steps = [torch.tensor(float(step), device=p.device)]
    torch._fused_adamw_([p], [grad], [exp_avg], [exp_avg_sq], [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


def polar_express(G, steps=5):
    """Approximately orthogonalize each matrix of G (..., rows, cols): U S V^T -> U V^T."""
    X = G / (G.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # singular values into [0, 1)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = _gemm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = _gemm(X, B, X, beta=a, alpha=1.0)  # a * X + B @ X
    return X.mT if tall else X


def _gemm(C, A, B, beta, alpha):
    """beta * C + alpha * A @ B as one GEMM call: the scaling and the sum ride in the matmul, no temporaries."""
    return (torch.baddbmm if C.dim() == 3 else torch.addmm)(C, A, B, beta=beta, alpha=alpha)


def muon_update(grads, params, momentum_buffer, second_momentum_buffer, momentum, lr, wd, beta2, ns_steps, ortho_dtype,
                decay=True):
    """One Muon step on stacked same-shape matrices (K, rows, cols); grads is used as scratch. decay=False (weight decay
    0, the stages' default) skips the cautious mask's passes over the matrices."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)  # Nesterov
    g = polar_express(g.to(ortho_dtype), ns_steps)
    if second_momentum_buffer is not None:
        # NorMuon: equalize per-neuron update scale with a running second moment, keep the total norm
        red_dim = -1 if g.size(-2) >= g.size(-1) else -2
        n = g.size(red_dim)
        v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
        second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2)
        step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
        v_norm_new = ((v_mean * n) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    g = g.to(params.dtype)
    if not decay:
        params.addcmul_(g, lr, value=-1.0)  # params -= lr * g in one pass
        return
    mask = (g * params) >= 0  # cautious weight decay: only where the update already shrinks the weight
    params.sub_(lr * g + lr * wd * params * mask)


def muon_lr_scale(shape):
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


# -----------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """Combined Muon + AdamW. param_groups: dicts with 'params' and 'kind':

    - kind="adamw": lr, betas, eps, weight_decay
    - kind="muon": lr, momentum, ns_steps, beta2 (None disables NorMuon), weight_decay; all params
      2D and of one shape (they are stacked and orthogonalized as a batch)
    """

    def __init__(self, param_groups, compile=False, ortho_dtype=torch.bfloat16):
        super().__init__(param_groups, defaults={})
        self.ortho_dtype = ortho_dtype  # Polar Express in bf16 by default (GPT.setup_optimizer picks fp32 on CPUs where bf16 is slow)
        for group in self.param_groups:
            if group.get("kind") == "adamw":
                group.setdefault("betas", (0.9, 0.999))
                group.setdefault("eps", 1e-8)
                group.setdefault("weight_decay", 0.0)
            elif group.get("kind") == "muon":
                group.setdefault("momentum", 0.95)
                group.setdefault("ns_steps", 5)
                group.setdefault("beta2", 0.95)
                group.setdefault("weight_decay", 0.0)
                shapes = {p.shape for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon group needs 2D params of one shape, got {sorted(shapes)}")
            else:
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {group.get('kind')!r}")
        self.compile = compile
        opts = dict(dynamic=False, fullgraph=True)
        self._adamw = torch.compile(adamw_update, **opts) if compile else adamw_update
        self._muon = torch.compile(muon_update, **opts) if compile else muon_update
        self._t = {name: torch.tensor(0.0) for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _scalars(self, **values):
        for name, value in values.items():
            self._t[name].fill_(value)
        return [self._t[name] for name in values]

    @torch.no_grad()
    def step(self):
        rank, world = dist_info()
        # 1) launch every gradient reduction, 2) update owned shards as reductions land and launch
        # the parameter gathers, 3) wait for the gathers: communication overlaps the math
        reduced = [self._reduce(group, world) for group in self.param_groups]
        gathers = []
        for group, info in zip(self.param_groups, reduced):
            update = self._update_adamw if group["kind"] == "adamw" else self._update_muon
            update(group, info, rank, world, gathers)
        for work, finish in gathers:
            work.wait()
            if finish is not None:
                finish()

    # -- gradient reduction

    def _reduce(self, group, world):
        if group["kind"] == "adamw":
            return [self._reduce_adamw_param(p, world) for p in group["params"]]
        params = group["params"]
        grads = [_grad(p) for p in params]
        if world == 1:
            return dict(work=None, grad_chunk=torch.stack(grads), stacked=None, chunk=len(params))
        chunk = -(-len(params) // world)
        stacked = torch.zeros((chunk * world, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
        torch._foreach_copy_(list(stacked[:len(params)].unbind(0)), grads)
        grad_chunk = torch.empty_like(stacked[:chunk])
        work = _reduce_scatter(grad_chunk, stacked, op=dist.ReduceOp.AVG, async_op=True)
        return dict(work=work, grad_chunk=grad_chunk, stacked=stacked, chunk=chunk)

    def _reduce_adamw_param(self, p, world):
        grad = _grad(p)
        if world == 1:
            return dict(work=None, grad=grad, sharded=False)
        if p.numel() < SMALL_PARAM or p.size(0) % world != 0:
            return dict(work=dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True), grad=grad, sharded=False)
        grad_slice = torch.empty_like(grad[:p.size(0) // world])
        return dict(work=_reduce_scatter(grad_slice, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True), grad=grad_slice, sharded=True)

    # -- owner updates

    def _update_adamw(self, group, infos, rank, world, gathers):
        for p, info in zip(group["params"], infos):
            if info["work"] is not None:
                info["work"].wait()
            if info["sharded"]:
                rows = p.size(0) // world
                p_slice = p[rank * rows:(rank + 1) * rows].clone()
            else:
                p_slice = p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice)
                state["exp_avg_sq"] = torch.zeros_like(p_slice)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            hyper = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
            if self.compile:
                self._adamw(p_slice, info["grad"], state["exp_avg"], state["exp_avg_sq"], *self._scalars(**hyper))
            else:
                fused_adamw_update(p_slice, info["grad"], state["exp_avg"], state["exp_avg_sq"], **hyper)
            if info["sharded"]:
                gathers.append((_all_gather(p, p_slice, async_op=True), None))

    def _update_muon(self, group, info, rank, world, gathers):
        if info["work"] is not None:
            info["work"].wait()
        params, chunk = group["params"], info["chunk"]
        start = rank * chunk
        owned = params[start:start + chunk]
        if owned:
            state = self.state[params[0]]  # group state: stacked buffers for the matrices this rank owns
            shape = params[0].shape
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros((len(owned), *shape), dtype=params[0].dtype, device=params[0].device)
                if group["beta2"] is not None:
                    # factored second moment: per row for tall/square matrices, per column for wide ones
                    vshape = (len(owned), shape[0], 1) if shape[0] >= shape[1] else (len(owned), 1, shape[1])
                    state["second_momentum_buffer"] = torch.zeros(vshape, dtype=params[0].dtype, device=params[0].device)
            stacked = torch.stack(owned)
            momentum, lr, wd, beta2 = self._scalars(momentum=group["momentum"], lr=group["lr"] * muon_lr_scale(shape),
                                                    wd=group["weight_decay"], beta2=group["beta2"] or 0.0)
            self._muon(info["grad_chunk"][:len(owned)], stacked, state["momentum_buffer"], state.get("second_momentum_buffer"),
                       momentum, lr, wd, beta2, group["ns_steps"], self.ortho_dtype, group["weight_decay"] != 0)
        if world == 1:
            torch._foreach_copy_(params, list(stacked.unbind(0)))
            return
        updated = torch.zeros_like(info["grad_chunk"])
        if owned:
            updated[:len(owned)].copy_(stacked)
        gathered = info["stacked"]  # reuse the reduce buffer as the gather output

        def finish():
            torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))
        gathers.append((_all_gather(gathered, updated, async_op=True), finish))

    # -- per-rank checkpoints

    def state_dict(self):
        sd = super().state_dict()
        rank, world = dist_info()
        sd["sharding"] = dict(rank=rank, world_size=world)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("sharding", None)
        rank, world = dist_info()
        if saved is not None and (saved["rank"], saved["world_size"]) != (rank, world):
            raise ValueError(f"optimizer shard was saved by rank {saved['rank']} of {saved['world_size']}, "
                             f"cannot load it into rank {rank} of {world}")
        super().load_state_dict(state_dict)


def _grad(p):
    # a param without a grad this step gets a zero grad, so all ranks run the same collectives
    return p.grad if p.grad is not None else torch.zeros_like(p)
