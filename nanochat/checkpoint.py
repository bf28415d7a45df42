"""Checkpoints in the store: checkpoints/<stage>/<step>/{model.pt, optim_rank<r>.pt, meta.json}.

Every rank writes its own optim_rank<r>.pt (its optimizer shard, dataloader position and RNG
states); rank 0 writes model.pt, then meta.json LAST with the sha256 of every file, so a
checkpoint is visible only once it is complete. Loading verifies digests and falls back to the
previous complete checkpoint when the latest one is torn or corrupted.
"""
from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from nanochat.config import ConfigError
from nanochat.store import DigestMismatch, ObjectNotFound, Store, StoreError

log = logging.getLogger("nanochat.checkpoint")
META = "meta.json"
# which stage's checkpoints a model "source" means (chat CLI, serving, evals use the short names)
SOURCES = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# how torch's zip writer reports a failed write (it raises RuntimeError, not OSError)
WRITE_FAILURES = ("file write failed", "basic_ios::clear", "unexpected pos", "No space left", "File too large")


def _save_scratch(obj, path: str):
    """torch.save into local scratch; a failed write (ENOSPC, EFBIG) is one StoreError naming the scratch dir."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in WRITE_FAILURES):
            raise
        raise StoreError(f"cannot write {path}: the local scratch dir {os.path.dirname(os.path.dirname(path))} (TMPDIR) "
                         f"is full ({reason}); free space there or point TMPDIR at a larger disk") from None


def _all_gather_object(obj):
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def check_device(device):
    """ValueError for a device this machine cannot use: a usage error, never blamed on a checkpoint."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(0, device=d)  # any other device type: does this build and machine have it?
    except Exception as e:
        reason = str(e).strip().split(". ")[0][:100]  # torch's first sentence; the rest lists every backend
        raise ValueError(f"device {str(device)!r} is not available on this machine ({reason})") from None


def _all_agree(ok: bool) -> bool:
    """True only if every rank says ok (so all ranks load the same step)."""
    rank, world = _dist()
    if world == 1:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() == 0


class CheckpointManager:
    def __init__(self, store: Store, stage: str, keep: int = 2):
        self.store, self.stage, self.keep = store, stage, keep
        self.prefix = f"checkpoints/{stage}"

    def step_prefix(self, step: int) -> str:
        return f"{self.prefix}/{step:06d}"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (meta.json present), ascending."""
        out = set()
        for key in self.store.list(self.prefix + "/"):
            parts = key[len(self.prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == META and parts[0].isdigit():
                out.add(int(parts[0]))
        return sorted(out)

    def no_such_step(self, step: int) -> ObjectNotFound:
        """The error for an asked-for step without a complete checkpoint: it names the steps there are."""
        there = ", ".join(str(s) for s in self.steps()) or "none"
        return ObjectNotFound(f"no checkpoint step {step} under {self.store.uri(self.prefix + '/')}: available steps {there}")

    def latest(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def save(self, step: int, model_state: dict | None, rank_state: dict, meta: dict) -> dict | None:
        """Collective: every rank calls it. model_state is only needed on rank 0."""
        rank, world = _dist()
        prefix = self.step_prefix(step)
        with tempfile.TemporaryDirectory(prefix="nanochat-ckpt-") as tmp:
            rank_file = os.path.join(tmp, f"optim_rank{rank}.pt")
            _save_scratch(rank_state, rank_file)
            digest = self.store.put_file(f"{prefix}/optim_rank{rank}.pt", rank_file)
            digests = _all_gather_object({f"optim_rank{rank}.pt": {"sha256": digest, "size": os.path.getsize(rank_file)}})
            doc = None
            if rank == 0:
                files = {k: v for d in digests for k, v in d.items()}
                model_file = os.path.join(tmp, "model.pt")
                _save_scratch(model_state, model_file)
                files["model.pt"] = {"sha256": self.store.put_file(f"{prefix}/model.pt", model_file), "size": os.path.getsize(model_file)}
                doc = {"files": files, "created": time.time(), "step": step, "world_size": world, "meta": meta}
                self.store.put_json(f"{prefix}/{META}", doc)  # last: the checkpoint exists from now on
                self._cleanup(step)
        if world > 1:
            dist.barrier()
        return doc

    def _cleanup(self, current: int):
        complete = [s for s in self.steps() if s <= current]
        for s in complete[:-self.keep] if self.keep > 0 else []:
            self.store.delete_prefix(self.step_prefix(s) + "/")
        # torn checkpoints (no meta.json) older than the current one are garbage
        for key in self.store.list(self.prefix + "/"):
            part = key[len(self.prefix) + 1:].split("/")[0]
            if part.isdigit() and int(part) < current and int(part) not in complete:
                self.store.delete(key)

    def delete_other_configs(self, config_hash: str) -> list[tuple[int, str | None]]:
        """Delete complete checkpoints whose meta names another config hash: a run must never resume from
        them, and later stages must never take them for this run's model. Returns [(step, their hash)].
        Call on one rank (rank 0)."""
        stale = []
        for s in self.steps():
            try:
                theirs = self.store.get_json(f"{self.step_prefix(s)}/{META}").get("meta", {}).get("config_hash")
            except (StoreError, ValueError):
                continue  # unreadable: load() skips it, retention removes it
            if theirs != config_hash:
                self.store.delete(f"{self.step_prefix(s)}/{META}")  # first: the checkpoint stops existing at once
                self.store.delete_prefix(self.step_prefix(s) + "/")
                stale.append((s, theirs))
        return stale

    def _fetch(self, step: int, name: str, doc: dict, map_location):
        entry = doc["files"].get(name)
        if entry is None:
            raise ObjectNotFound(f"{self.store.uri(self.step_prefix(step))} has no {name} in its {META}")
        data = self.store.get_bytes(f"{self.step_prefix(step)}/{name}", sha256=entry["sha256"])
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)

    def load(self, step: int | None = None, map_location="cpu", load_rank_state: bool = True):
        """(step, model_state, rank_state, meta) of the newest loadable checkpoint (or the given step).

        Collective under torch.distributed: all ranks settle on the same step. Returns None if there
        is no complete checkpoint (or no such step). Torn or tampered checkpoints are skipped with a warning."""
        rank, world = _dist()
        if isinstance(map_location, (str, torch.device)):
            check_device(map_location)  # before reading: a bad device must not look like a corrupt checkpoint
        if step is not None and step not in self.steps():
            return None  # absent, not unusable: nothing to warn about
        candidates = [step] if step is not None else list(reversed(self.steps()))
        other_world = None  # a complete checkpoint written by another number of processes
        for s in candidates:
            model_state = rank_state = doc = None
            ok = True
            try:
                doc = self.store.get_json(f"{self.step_prefix(s)}/{META}")
                if load_rank_state and doc.get("world_size", 1) != world:
                    other_world = other_world or (s, doc.get("world_size", 1))
                    raise StoreError(f"written by {doc.get('world_size', 1)} processes, this run has {world}")
                model_state = self._fetch(s, "model.pt", doc, map_location)
                if load_rank_state:
                    rank_state = self._fetch(s, f"optim_rank{rank}.pt", doc, map_location)
            except (DigestMismatch, ObjectNotFound, EOFError, RuntimeError, ValueError, StoreError) as e:
                log.warning("checkpoint %s unusable (%s)%s", self.store.uri(self.step_prefix(s)), str(e).splitlines()[0],
                            "" if step is not None else "; trying an older one")
                ok = False
            if _all_agree(ok):
                return s, model_state, rank_state, doc["meta"]
            if step is not None:
                break
        if other_world:  # starting over would bury hours of training under new checkpoints: the user decides
            s, theirs = other_world
            raise ConfigError(f"checkpoint {self.store.uri(self.step_prefix(s))} was written by {theirs} process(es) and this run "
                              f"has {world}; optimizer and data-loader state is per process, so resume with {theirs} "
                              f"(`nanochat speedrun --nproc {theirs}`; on Kubernetes gpusPerNode × nodes = {theirs}), "
                              f"or delete {self.store.uri(self.prefix)}/ to start {self.stage} over")
        return None


def load_model_state(store: Store, source: str, step: int | None = None, map_location="cpu"):
    """(step, model_state, meta) for a model source (base|mid|sft|rl or a stage name), no optimizer state."""
    stage = SOURCES.get(source, source)
    mgr = CheckpointManager(store, stage)
    got = mgr.load(step, map_location=map_location, load_rank_state=False)
    if got is None and step is not None and mgr.steps():  # the stage ran: the asked-for step is what is wrong
        if step not in mgr.steps():
            raise mgr.no_such_step(step)
        others = ", ".join(str(s) for s in mgr.steps() if s != step) or "none"
        raise StoreError(f"checkpoint {store.uri(mgr.step_prefix(step))} is torn or corrupted (see the warning above); "
                         f"other steps: {others}")
    if got is None:
        producer = stage
        raise ObjectNotFound(f"no complete checkpoint under {store.uri(f'checkpoints/{stage}/')}: it is produced by stage {producer} "
                             f"(run `nanochat stage {producer} --store {store.root}`)")
    s, model_state, _, meta = got
    return s, model_state, meta


def load_model(store: Store, source: str, device="cpu", step: int | None = None, dtype=None):
    """(model in eval mode, step, meta) rebuilt from a checkpoint's model_config and weights.
    dtype: the compute dtype (a stage passes ctx.dtype); None picks it per device."""
    from nanochat.gpt import GPT, GPTConfig
    s, state, meta = load_model_state(store, source, step, map_location=device)
    model = GPT.create(GPTConfig.from_dict(meta["model_config"]), device=device, dtype=dtype)
    model.load_state_dict(state)
    model.eval()
    return model, s, meta


CHAT_PREFERENCE = ("rl", "sft", "mid", "base")


def newest_source(store: Store, prefer: tuple[str, ...] = CHAT_PREFERENCE) -> str:
    """The most-trained model source with a complete checkpoint (rl → sft → mid → base), for chat and serve."""
    for source in prefer:
        if CheckpointManager(store, SOURCES[source]).latest() is not None:
            return source
    raise ObjectNotFound(f"no model checkpoint under {store.uri('checkpoints/')}: run `nanochat speedrun --store {store.root}` first")
