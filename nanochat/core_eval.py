"""The CORE metric (DCLM, arXiv 2406.11794) as nanochat computes it, over the eval bundle in the store.

    download_eval_bundle(store)                       # once: eval_bundle.zip -> <store>/data/eval_bundle/
    out = evaluate_core(model, tokenizer, store, device, max_per_task=-1)
    out["core"], out["tasks"]["arc_easy"]["centered"]

Protocol (nanochat's base_eval + core_eval):
- tasks come from the bundle's core.yaml: label, dataset_uri (under eval_data/), num_fewshot,
  icl_task_type (multiple_choice | schema | language_modeling), continuation_delimiter (default " ");
- each task's rows are shuffled with Random(1337); `max_per_task` evaluates the first N of them;
- example i gets few-shot examples Random(1234 + i).sample(all rows but i, k);
- prompts render as "{fewshot}\n\n...{query}{delimiter}{continuation}", one row per choice (MC),
  per context option (schema), or one row (LM); every row starts with BOS;
- MC/schema: the row whose continuation tokens have the lowest mean loss is the answer;
  LM: correct only if the greedy prediction equals the continuation at every position;
- rows longer than a model's declared context (`max_seq_len`, e.g. GPT-2's 1024 learned positions)
  are cropped from the left; our GPT (rotary) reads whole prompts, as nanochat's does;
- centered = (acc - 0.01*baseline) / (1 - 0.01*baseline), baseline from eval_meta_data.csv;
  CORE = mean centered accuracy over tasks.
Examples are strided across ranks (torchrun); per-task counts are all_reduced.

One deliberate difference, invisible on a full run: few-shot examples are drawn from all of a task's
rows, not only the first `max_per_task`, so a quick run scores exactly the prompts the full run
scores for those rows (and a 10-shot task works with --max-per-task=5).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.download import DownloadError, NotFound, download_file
from nanochat.gpt import logits_at
from nanochat.store import ObjectNotFound, StoreError, sha256_file

log = logging.getLogger("nanochat")

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_PREFIX = "data/eval_bundle"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("core.yaml", "eval_meta_data.csv")
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337   # nanochat shuffles each task's rows once, so a prefix is a fair subset
FEWSHOT_SEED = 1234   # few-shot examples of example i: Random(FEWSHOT_SEED + i)
DEFAULT_DELIMITER = " "
BATCH_TOKENS = 8192   # padded tokens per forward pass (an HF model's logits are B*T*vocab floats)
PREP_CHUNK = 256      # examples rendered + tokenized at a time (bounds host memory on 10k-row tasks)

# download defaults (nanochat.download does the work)
RETRIES = 6
BACKOFF = 1.0         # seconds before the first retry; doubles (with jitter)
TIMEOUT = 60.0
CHUNK = 1 << 20       # unzip copy buffer


class BundleMissing(ObjectNotFound):
    """The eval bundle is not (completely) in the store."""


class EvalBundleError(StoreError):
    """A bundle download or unpack that failed for good (the input never reached the store); the
    message names the URL and why. A StoreError, so stages report it in one line."""


# ----------------------------------------------------------------------------- the bundle in the store

@dataclass
class Task:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float       # percent, as in eval_meta_data.csv
    rows: list[dict]             # all rows, shuffled with SHUFFLE_SEED (the few-shot pool)
    num_eval: int                # the first num_eval rows are evaluated
    dataset_uri: str = ""


def fetch_command(store) -> str:
    return f"nanochat stage eval_bundle --store {store.root}"


def bundle_available(store) -> bool:
    """True once the bundle is completely in the store (its manifest is written last)."""
    return store.exists(f"{BUNDLE_PREFIX}/{MANIFEST}")


def _manifest(store) -> dict:
    doc = store.read_manifest(BUNDLE_PREFIX, MANIFEST)
    if doc is None:
        raise BundleMissing(f"CORE eval bundle not found at {store.uri(BUNDLE_PREFIX + '/')}: "
                            f"fetch it with `{fetch_command(store)}` (or pass --core=false)")
    return doc


def _read(store, doc: dict, name: str) -> bytes:
    entry = doc["files"].get(name)
    if entry is None:
        raise BundleMissing(f"{store.uri(f'{BUNDLE_PREFIX}/{name}')} is not part of the eval bundle "
                            f"(re-fetch it with `{fetch_command(store)} --force`)")
    return store.get_bytes(f"{BUNDLE_PREFIX}/{name}", sha256=entry["sha256"])


def parse_random_baselines(text: str) -> dict[str, float]:
    return {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(io.StringIO(text))
            if row.get("Eval Task") and row.get("Random baseline") not in (None, "")}


def parse_task_list(text: str) -> list[dict]:
    import yaml
    doc = yaml.safe_load(text) or {}
    tasks = doc.get("icl_tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError("core.yaml has no icl_tasks list")
    out = []
    for t in tasks:
        shots = t.get("num_fewshot", [0])
        kind = t.get("icl_task_type")
        if kind not in TASK_TYPES:
            raise ValueError(f"core.yaml task {t.get('label')!r}: unsupported icl_task_type {kind!r}; known: {', '.join(TASK_TYPES)}")
        out.append({"label": t["label"], "dataset_uri": t["dataset_uri"], "task_type": kind,
                    "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                    "delimiter": t.get("continuation_delimiter", DEFAULT_DELIMITER)})
    return out


def load_bundle(store, max_per_task: int = -1, labels: list[str] | None = None) -> list[Task]:
    """The bundle's tasks read from the store (digests verified), rows shuffled, subset chosen."""
    doc = _manifest(store)
    specs = parse_task_list(_read(store, doc, "core.yaml").decode())
    baselines = parse_random_baselines(_read(store, doc, "eval_meta_data.csv").decode("utf-8"))
    if labels:
        unknown = set(labels) - {s["label"] for s in specs}
        if unknown:
            raise ValueError(f"unknown CORE task(s) {', '.join(sorted(unknown))}; the bundle has {', '.join(s['label'] for s in specs)}")
        specs = [s for s in specs if s["label"] in labels]
    tasks = []
    for s in specs:
        if s["label"] not in baselines:
            raise ValueError(f"task {s['label']!r} has no random baseline in eval_meta_data.csv")
        text = _read(store, doc, f"eval_data/{s['dataset_uri']}").decode("utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        random.Random(SHUFFLE_SEED).shuffle(rows)
        n = len(rows) if max_per_task is None or max_per_task <= 0 else min(max_per_task, len(rows))
        if s["num_fewshot"] >= len(rows):
            raise ValueError(f"task {s['label']!r}: {s['num_fewshot']}-shot needs more than {len(rows)} rows")
        tasks.append(Task(s["label"], s["task_type"], s["num_fewshot"], s["delimiter"], baselines[s["label"]], rows, n, s["dataset_uri"]))
    return tasks


# ----------------------------------------------------------------------------- prompts

def fewshot_indices(num_rows: int, idx: int, k: int) -> list[int]:
    """k distinct row indices other than idx, the same for the same (idx, num_rows) on every run."""
    if k <= 0:
        return []
    return random.Random(FEWSHOT_SEED + idx).sample([i for i in range(num_rows) if i != idx], k)


def render_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice; the few-shot examples show their gold choice."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, all ending in the same continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without, prompt with] the continuation. Contexts are stripped (some carry trailing
    whitespace) and so is the prompt without, so that it tokenizes as a clean prefix of the other."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDER = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def continuation_spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(rows, starts, ends): the scored tokens of row r are rows[r][starts[r]:ends[r]]."""
    if task_type == "multiple_choice":  # same context, different continuations: after the common prefix
        start = common_length(tokens)
        return tokens, [min(start, len(t) - 1) for t in tokens], [len(t) for t in tokens]
    if task_type == "schema":  # different contexts, same continuation: the common suffix
        suffix = max(1, common_length(tokens, from_end=True))
        return tokens, [max(1, len(t) - suffix) for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    # the context must tokenize as a prefix; if a merge crosses the boundary, score from where they part
    start = len(without) if with_[:len(without)] == without else common_length(tokens)
    return [with_], [min(start, len(with_) - 1)], [len(with_)]


def crop_left(rows, starts, ends, max_len: int | None):
    """Keep the last max_len tokens of each row, shifting the spans (at least one token stays as context)."""
    if not max_len:
        return rows, starts, ends
    out = ([], [], [])
    for t, s, e in zip(rows, starts, ends):
        cut = max(0, len(t) - max_len)
        out[0].append(t[cut:])
        out[1].append(max(1, s - cut))
        out[2].append(e - cut)
    return out


def context_length(model) -> int | None:
    """The hard limit a model declares as max_seq_len (GPT-2: 1024 learned positions), else None:
    rotary models like ours run past their training length, and nanochat scores them uncropped."""
    return getattr(model, "max_seq_len", None)


@dataclass
class Prepared:
    idx: int
    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None = None      # None: language modeling (exact match), else the right row
    width: int = field(init=False)

    def __post_init__(self):
        self.width = max(len(r) for r in self.rows)


def prepare(task: Task, indices: list[int], tokenizer, max_len: int | None) -> list[Prepared]:
    """Render and tokenize examples (one batched encode call), find their scored spans, crop."""
    prompts, owners = [], []
    for idx in indices:
        item = task.rows[idx]
        fewshot = [task.rows[i] for i in fewshot_indices(len(task.rows), idx, task.num_fewshot)]
        p = RENDER[task.task_type](item, task.delimiter, fewshot)
        prompts.extend(p)
        owners.append(len(p))
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    out, pos = [], 0
    for idx, n in zip(indices, owners):
        rows, starts, ends = crop_left(*continuation_spans(task.task_type, tokens[pos:pos + n]), max_len)
        gold = None if task.task_type == "language_modeling" else int(task.rows[idx]["gold"])
        out.append(Prepared(idx, rows, starts, ends, gold))
        pos += n
    return out


# ----------------------------------------------------------------------------- scoring

def batches(examples: list[Prepared], batch_tokens: int):
    """Group examples (longest first, so padding stays small) into forwards of <= batch_tokens padded tokens."""
    batch, rows, width = [], 0, 0
    for ex in sorted(examples, key=lambda e: -e.width):
        n, w = rows + len(ex.rows), max(width, ex.width)
        if batch and n * w > batch_tokens:
            yield batch
            batch, n, w = [], len(ex.rows), ex.width
        batch.append(ex)
        rows, width = n, w
    if batch:
        yield batch


@torch.no_grad()
def score_batch(model, batch: list[Prepared], pad_id: int, device) -> list[bool]:
    """One forward for every row of every example in the batch; right padding never reaches a
    scored position (attention is causal). Returns correctness per example."""
    rows = [r for ex in batch for r in ex.rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # position t predicts token t+1
    r = 0
    for ex in batch:
        for row, s, e in zip(ex.rows, ex.starts, ex.ends):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, s - 1:e - 1] = True
            r += 1
    ids, mask = ids.to(device), mask.to(device)
    at = F.pad(mask, (0, 1))  # (B, T): the positions scored; the last one predicts nothing
    logits = logits_at(model, ids, at)  # (N, V), N = scored positions: the continuations, a few tokens of each row
    targets = ids.roll(-1, dims=1)[at]
    losses = F.cross_entropy(logits, targets, reduction="none")
    row = at.nonzero()[:, 0]
    mean_loss = losses.new_zeros(len(rows)).index_add_(0, row, losses) / mask.sum(1).clamp(min=1)
    wrong = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(0, row, (logits.argmax(-1) != targets).long())
    mean_loss, exact = mean_loss.cpu().tolist(), (wrong == 0).cpu().tolist()
    out, r = [], 0
    for ex in batch:
        n = len(ex.rows)
        if ex.gold is None:  # language modeling: greedy decoding reproduces the continuation
            out.append(bool(exact[r]))
        else:  # lowest mean continuation loss wins; ties go to the first row, like list.index(min)
            scores = mean_loss[r:r + n]
            out.append(scores.index(min(scores)) == ex.gold)
        r += n
    return out


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model, tokenizer, task: Task, device, batch_tokens: int = BATCH_TOKENS, max_len: int | None = None) -> tuple[int, int]:
    """(correct, evaluated) summed over ranks; this rank scores examples rank, rank+W, ...
    Rows are cropped to max_len tokens (default: the model's context_length)."""
    rank, world = _dist()
    mine = list(range(rank, task.num_eval, world))
    max_len, pad = max_len or context_length(model), tokenizer.get_bos_token_id()
    correct = 0
    for c in range(0, len(mine), PREP_CHUNK):
        prepared = prepare(task, mine[c:c + PREP_CHUNK], tokenizer, max_len)
        for batch in batches(prepared, batch_tokens):
            correct += sum(score_batch(model, batch, pad, device))
    counts = torch.tensor([correct, len(mine)], dtype=torch.long)
    if world > 1:
        counts = counts.to(device if torch.device(device).type == "cuda" else "cpu")
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def centered(accuracy: float, random_baseline: float) -> float:
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, store, device, max_per_task: int = -1, batch_tokens: int = BATCH_TOKENS,
                  labels: list[str] | None = None, tasks: list[Task] | None = None, max_len: int | None = None) -> dict:
    """CORE over the bundle in the store: {"core", "tasks": {label: {accuracy, centered, ...}}}.
    `tasks` (from load_bundle) skips reading the store; `max_len` crops rows to that many tokens."""
    tasks = tasks if tasks is not None else load_bundle(store, max_per_task, labels)
    rank, _ = _dist()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results, started = {}, time.time()
    try:
        for task in tasks:
            t0 = time.time()
            correct, n = evaluate_task(model, tokenizer, task, device, batch_tokens, max_len)
            acc = correct / n if n else 0.0
            results[task.label] = {"accuracy": acc, "centered": centered(acc, task.random_baseline), "correct": correct,
                                   "examples": n, "random_baseline": task.random_baseline, "task_type": task.task_type,
                                   "num_fewshot": task.num_fewshot, "seconds": round(time.time() - t0, 3)}
            if rank == 0:
                log.info("CORE %-36s %d-shot %-17s accuracy %.4f  centered %+.4f  (%d examples, %.1fs)", task.label,
                         task.num_fewshot, task.task_type, acc, results[task.label]["centered"], n, time.time() - t0)
    finally:
        if was_training:
            model.train()
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"core": core, "tasks": results, "max_per_task": max_per_task, "seconds": round(time.time() - started, 3)}


def core_metric(model, tokenizer, store, device, max_per_task: int = 500) -> float:
    """CORE alone, for periodic evaluation during training (nanochat: every 2000 steps, 500 per task).
    Pass the uncompiled model: prompt lengths vary, which would make a static compile recompile."""
    return evaluate_core(model, tokenizer, store, device, max_per_task=max_per_task)["core"]


# ----------------------------------------------------------------------------- the downloader

def _cache_dir() -> Path:
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return Path(base) / "downloads"


def download_zip(url: str, dest: Path, retries: int = RETRIES, backoff: float = BACKOFF, timeout: float = TIMEOUT) -> Path:
    """Download url to dest (resuming dest.part across attempts and runs); retries transient failures."""
    try:
        download_file(url, dest, retries=retries, backoff=backoff, timeout=timeout)
    except DownloadError as e:
        hint = f" (check --url; the default is {EVAL_BUNDLE_URL})" if isinstance(e, NotFound) else ""
        raise EvalBundleError(f"{e}{hint}") from None
    return dest


def _bundle_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """{path relative to the bundle root: member}; the root is the folder holding core.yaml."""
    names = [i for i in zf.infolist() if not i.is_dir() and "__MACOSX" not in i.filename]
    roots = [PurePosixPath(i.filename).parent for i in names if PurePosixPath(i.filename).name == "core.yaml"]
    if not roots:
        raise EvalBundleError("the zip has no core.yaml: not a CORE eval bundle")
    root = min(roots, key=lambda p: len(p.parts))
    out = {}
    for info in names:
        p = PurePosixPath(info.filename)
        if p.is_absolute() or ".." in p.parts:
            raise EvalBundleError(f"unsafe path in the zip: {info.filename!r}")
        if root == PurePosixPath(".") or p.parts[:len(root.parts)] == root.parts:
            rel = PurePosixPath(*p.parts[len(root.parts):]) if root != PurePosixPath(".") else p
            out[str(rel)] = info
    missing = [f for f in REQUIRED_FILES if f not in out]
    if missing:
        raise EvalBundleError(f"the bundle lacks {', '.join(missing)}")
    return out


def download_eval_bundle(store, url: str = EVAL_BUNDLE_URL, sha256: str | None = None, force: bool = False,
                         retries: int = RETRIES, backoff: float = BACKOFF, timeout: float = TIMEOUT,
                         cache_dir: str | os.PathLike | None = None) -> dict:
    """Fetch eval_bundle.zip and publish it unzipped under data/eval_bundle/ (manifest with every file's
    sha256 last, plus the zip's URL and sha256). Returns the manifest, with "skipped" when already there."""
    if not force:
        doc = store.read_manifest(BUNDLE_PREFIX, MANIFEST)
        if doc is not None:
            log.info("eval bundle: already in %s (zip sha256 %s…), skipping", store.uri(BUNDLE_PREFIX), doc.get("meta", {}).get("zip_sha256", "?")[:12])
            return {**doc, "skipped": True}
    cache = Path(cache_dir) if cache_dir else _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # one partial file per URL, so a re-run (or a retry) resumes where the last one stopped
    zip_path = cache / f"eval_bundle-{hashlib.sha256(url.encode()).hexdigest()[:12]}.zip"
    if force or not zip_path.exists():
        download_zip(url, zip_path, retries, backoff, timeout)
    digest = sha256_file(zip_path)
    if sha256 and digest != sha256:
        zip_path.unlink()
        raise EvalBundleError(f"sha256 mismatch for {url}: expected {sha256}, got {digest} (corrupted, or the bundle changed upstream)")
    try:
        with zipfile.ZipFile(zip_path) as zf, tempfile.TemporaryDirectory(prefix="nanochat-bundle-") as tmp:
            files = {}
            for rel, info in _bundle_members(zf).items():
                path = Path(tmp) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                files[rel] = path
            log.info("eval bundle: publishing %d files to %s", len(files), store.uri(BUNDLE_PREFIX))
            if bundle_available(store):  # readers stop trusting the old files before any is replaced
                store.delete(f"{BUNDLE_PREFIX}/{MANIFEST}")
            store.delete_prefix(BUNDLE_PREFIX + "/")
            doc = store.publish(BUNDLE_PREFIX, files, MANIFEST, meta={"url": url, "zip_sha256": digest, "zip_size": zip_path.stat().st_size})
    except zipfile.BadZipFile as e:
        zip_path.unlink()  # a corrupt download must not be reused by the next run
        raise EvalBundleError(f"{url} is not a valid zip ({e}); removed it, re-run to download again") from None
    except EvalBundleError as e:
        zip_path.unlink()
        raise EvalBundleError(f"{url}: {e}") from None
    zip_path.unlink()
    return {**doc, "skipped": False}


def bundle_summary(store) -> list[dict]:
    """One row per task of the bundle in the store (for reports)."""
    doc = _manifest(store)
    baselines = parse_random_baselines(_read(store, doc, "eval_meta_data.csv").decode("utf-8"))
    rows = []
    for s in parse_task_list(_read(store, doc, "core.yaml").decode()):
        data = doc["files"].get(f"eval_data/{s['dataset_uri']}")
        rows.append({"task": s["label"], "type": s["task_type"], "shots": s["num_fewshot"],
                     "random baseline": baselines.get(s["label"], float("nan")),
                     "bytes": data["size"] if data else 0})
    return rows
