"""Pretraining text shards in the store: the embedded corpus, downloads, local repackaging, the recipe.

Every corpus ends up the same way, so downstream stages never care where text came from:

    data/shards/shard_00000.parquet ...   a `text` column, fixed-size row groups, zstd
    data/shards/index.json                the shards (sha256, rows, row groups, chars, split), written LAST

The last shard is the held-out val split; all others are train.

    nanochat data embedded --store URI            # the corpus every Python install carries (no download)
    nanochat data download --dataset fineweb-edu -n 8 [--background]
    nanochat data prepare --input my_texts/ --out-store URI
    nanochat data recipe --depth 20               # params → tokens → chars → shards → hours
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from nanochat import download as dl
from nanochat.errors import Failure

SHARDS_PREFIX = "data/shards"
INDEX_KEY = f"{SHARDS_PREFIX}/index.json"
RECORDS_PREFIX = f"{SHARDS_PREFIX}/records"  # one JSON per downloaded shard: resume knows what is verified
TEXT_COLUMN = "text"

CHARS_PER_SHARD = 250_000_000      # FineWeb-Edu / ClimbMix shuffle shards hold ~250M chars each
DEFAULT_CHARS_PER_TOKEN = 4.8      # a 32K-65K BPE on FineWeb-Edu; the measured tok_eval value wins when present
H100_BF16_PEAK_FLOPS = 989e12      # dense bf16, SXM
DEFAULT_MFU = 0.40
DEFAULT_VOCAB_SIZE = 32768
DEFAULT_SEQ_LEN = 2048
DEFAULT_RATIO = 20.0               # tokens per scaling parameter (Chinchilla)

# embedded corpus defaults (tiny profile); ci cuts --max-chars
EMBEDDED_SHARD_CHARS = 500_000
EMBEDDED_ROW_GROUP_ROWS = 64
EMBEDDED_SYNTHETIC_FRACTION = 0.2
EMBEDDED_VAL_FRACTION = 0.05
MIN_DOCSTRING_CHARS = 200
MAX_DOC_CHARS = 4000              # long pydoc topics are split at paragraphs into documents of about this size
SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
                    "__pycache__", "pydoc_data", "venv"}

DOWNLOAD_RETRIES = dl.RETRIES
DOWNLOAD_TIMEOUT_S = dl.TIMEOUT


class DataError(Failure):
    """A data problem with a one-line explanation (bad input file, missing shards, ...)."""


class DownloadError(DataError):
    pass


class ShardChanged(DownloadError):
    """Attempt after attempt, the mirror's bytes were not the expected digest's."""


# ----------------------------------------------------------------------------- index


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_key(name: str) -> str:
    return f"{SHARDS_PREFIX}/{name}"


def load_index(store) -> dict | None:
    return store.get_json_or(INDEX_KEY)


def shard_entries(store, split: str) -> list[dict]:
    """The shards of one split, in order: from index.json, or (no index) every shard file with the last as val."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    index = load_index(store)
    if index is not None:
        entries = sorted(index["shards"], key=lambda e: e["name"])
    else:
        names = sorted(k.rsplit("/", 1)[1] for k in store.list(f"{SHARDS_PREFIX}/shard_") if k.endswith(".parquet"))
        entries = [{"name": n, "key": shard_key(n), "split": "train"} for n in names]
        if entries:
            entries[-1]["split"] = "val"
    return [e for e in entries if e["split"] == split]


def iter_documents(store, split: str = "train"):
    """Every document of a split, in shard order, one row group at a time (tokenizer training and eval).
    Page checksums are verified: a damaged shard is a CorruptObject naming it and the row group."""
    from nanochat.text_shards import open_parquet, read_texts
    entries = shard_entries(store, split)
    if not entries:
        raise DataError(f"no {split} shards in {store.uri(SHARDS_PREFIX)}: run the data stage first")
    for e in entries:
        pf = open_parquet(store, e["key"])
        for rg in range(pf.num_row_groups):
            yield from read_texts(pf, rg, store, e["key"])


def _index_doc(source: str, entries: list[dict], extra: dict | None = None) -> dict:
    entries = sorted(entries, key=lambda e: e["name"])
    doc = {"version": 1, "source": source, "shards": entries,
           "num_train": sum(e["split"] == "train" for e in entries), "num_val": sum(e["split"] == "val" for e in entries),
           "rows": sum(e["rows"] for e in entries), "chars": sum(e["chars"] for e in entries),
           "bytes": sum(e["size"] for e in entries)}
    if extra:
        doc.update(extra)
    return doc


def _remove_shards(store, names, log=None):
    for name in names:
        store.delete(shard_key(name))
        store.delete(f"{RECORDS_PREFIX}/{name}.json")
    if names and log:
        log(f"removed {len(names)} shard(s) of the previous corpus")


# ----------------------------------------------------------------------------- writing shards


def parquet_info(path_or_file) -> dict:
    """rows, row groups and chars of a shard; raises DataError if it is not a parquet file with a text column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path_or_file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for garbage
        raise DataError(f"not a parquet file ({str(e).splitlines()[0]})") from None
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise DataError(f"parquet file has no {TEXT_COLUMN!r} column (columns: {', '.join(pf.schema_arrow.names)})")
    chars = 0
    for rg in range(pf.num_row_groups):  # one row group at a time: bounded memory for 250M-char shards
        col = pf.read_row_group(rg, columns=[TEXT_COLUMN]).column(0)
        chars += pc.sum(pc.utf8_length(col)).as_py() or 0
    return {"rows": pf.metadata.num_rows, "row_groups": pf.num_row_groups, "chars": chars}


class ShardWriter:
    """Documents in; zstd parquet shards with fixed-size row groups out; index.json written last.

    A shard is cut every `shard_chars` characters (or at `cut()`); `finish()` makes the last shard the
    val split (splitting the documents when everything fit in one shard) and removes shards of the
    previous corpus that the new index does not list."""

    def __init__(self, store, source: str, shard_chars: int = CHARS_PER_SHARD, row_group_rows: int = 1024,
                 val_fraction: float = 0.01, log=None):
        if shard_chars < 1 or row_group_rows < 1:
            raise ValueError("shard_chars and row_group_rows must be >= 1")
        self.store, self.source, self.shard_chars, self.row_group_rows = store, source, shard_chars, row_group_rows
        self.val_fraction, self.log = val_fraction, log or (lambda msg: None)
        self.docs: list[str] = []
        self.chars = 0
        self.entries: list[dict] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="nanochat-shards-"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.scratch, ignore_errors=True)  # a stopped or failed build leaves no half-written shard

    def add(self, text: str, size_cut: bool = True):
        if not text:
            return  # an empty document would be a lone <|bos|>
        self.docs.append(text)
        self.chars += len(text)
        if size_cut and self.chars >= self.shard_chars:
            self.cut()

    def cut(self):
        """End the current shard here."""
        if self.docs:
            self._write(self.docs)
            self.docs, self.chars = [], 0

    def _write(self, docs: list[str], split: str = "train"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        name = shard_name(len(self.entries))
        path = self.scratch / name
        table = pa.table({TEXT_COLUMN: pa.array(docs, type=pa.string())})
        pq.write_table(table, path, row_group_size=self.row_group_rows, compression="zstd", use_dictionary=False,
                       write_page_checksum=True)  # readers verify them: a flipped bit is an error, not other text
        if not self.entries:  # download records describe the corpus these shards replace: gone before the first lands
            self.store.delete_prefix(f"{RECORDS_PREFIX}/")
        digest = self.store.put_file(shard_key(name), path)
        entry = {"name": name, "key": shard_key(name), "sha256": digest, "size": path.stat().st_size, "rows": len(docs),
                 "row_groups": math.ceil(len(docs) / self.row_group_rows), "chars": sum(map(len, docs)),
                 "split": split, "source": self.source}
        path.unlink()
        self.entries.append(entry)
        self.log(f"wrote {name}: {len(docs):,} docs, {entry['chars']:,} chars")

    def finish(self, extra: dict | None = None) -> dict:
        if not self.entries:  # everything fit in one shard: hold some documents out for val
            if len(self.docs) < 2:
                raise DataError(f"need at least 2 documents (a train and a val shard), got {len(self.docs)}")
            n_val = min(len(self.docs) - 1, max(1, round(len(self.docs) * self.val_fraction)))
            train, val = self.docs[:-n_val], self.docs[-n_val:]
            self._write(train)
            self.docs, self.chars = val, sum(map(len, val))
        self.cut()
        self.entries[-1]["split"] = "val"
        old = load_index(self.store)
        index = _index_doc(self.source, self.entries, extra)
        self.store.put_json(INDEX_KEY, index)  # last: the corpus exists from now on
        if old:
            keep = {e["name"] for e in self.entries}
            _remove_shards(self.store, [e["name"] for e in old["shards"] if e["name"] not in keep], self.log)
        return index


# ----------------------------------------------------------------------------- embedded corpus


def _paragraph_chunks(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into pieces of at most ~max_chars (a paragraph is never cut)."""
    chunks, cur = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        if cur and len(cur) + len(para) + 2 > max_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return chunks + ([cur] if cur else [])


def pydoc_topics(max_doc_chars: int = MAX_DOC_CHARS) -> list[str]:
    """CPython's bundled documentation topics (what `help('FORMATTING')` shows), long ones split at paragraphs."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # trimmed Python installs (some distro/container builds) drop pydoc_data
        return []
    return [chunk for k in sorted(topics) for chunk in _paragraph_chunks(topics[k], max_doc_chars)]


def _stdlib_files() -> tuple[Path, list[Path]]:
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_STDLIB_DIRS and not d.startswith(("test", "config-")))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return root, files


def stdlib_docstrings(min_chars: int = MIN_DOCSTRING_CHARS):
    """The standard library's module/class/function docstrings, one document each (titled with the qualified
    name), in file order. Parsed with ast: nothing is imported."""
    root, files = _stdlib_files()
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    yield f"{title}\n\n{doc.strip()}"


def embedded_documents(max_chars: int = 0, synthetic_fraction: float = EMBEDDED_SYNTHETIC_FRACTION, seed: int = 0) -> tuple[list[str], dict]:
    """The embedded corpus, shuffled: prose (pydoc topics + stdlib docstrings, capped at max_chars when > 0)
    plus synthetic task documents making up `synthetic_fraction` of all characters."""
    if not 0 <= synthetic_fraction < 1:
        raise ValueError(f"synthetic_fraction must be in [0, 1), got {synthetic_fraction}")
    prose, prose_chars = [], 0
    for doc in itertools.chain(pydoc_topics(), stdlib_docstrings()):  # lazily: a small cap parses few files
        if max_chars and prose_chars >= max_chars:
            break
        prose.append(doc)
        prose_chars += len(doc)
    if not prose:
        raise DataError("no embedded prose found: this Python has neither pydoc_data nor standard-library sources; "
                        "use `nanochat data prepare` or --dataset fineweb-edu")
    synthetic, synthetic_chars = [], 0
    target = prose_chars * synthetic_fraction / (1 - synthetic_fraction)
    if target > 0:
        from nanochat.tasks.synthetic import synthetic_documents
        # synthetic_documents(n) is a prefix of synthetic_documents(n + k): over-generate, then cut at the target
        for doc in synthetic_documents(int(target / 200) + 16, seed=seed):
            if synthetic_chars >= target:
                break
            synthetic.append(doc)
            synthetic_chars += len(doc)
    docs = prose + synthetic
    random.Random(seed).shuffle(docs)
    return docs, {"prose_docs": len(prose), "prose_chars": prose_chars, "synthetic_docs": len(synthetic), "synthetic_chars": synthetic_chars}


def build_embedded(store, max_chars: int = 0, synthetic_fraction: float = EMBEDDED_SYNTHETIC_FRACTION,
                   shard_chars: int = EMBEDDED_SHARD_CHARS, row_group_rows: int = EMBEDDED_ROW_GROUP_ROWS,
                   val_fraction: float = EMBEDDED_VAL_FRACTION, seed: int = 0, log=None) -> dict:
    """Write the embedded corpus as shards (train shards + one val shard) and index.json. Deterministic."""
    docs, sources = embedded_documents(max_chars, synthetic_fraction, seed)
    total = sum(map(len, docs))
    n_val, val_chars = 0, 0
    while n_val < len(docs) - 1 and (val_chars < total * val_fraction or n_val == 0):
        n_val += 1
        val_chars += len(docs[-n_val])
    config = {"max_chars": max_chars, "synthetic_fraction": synthetic_fraction, "shard_chars": shard_chars,
              "row_group_rows": row_group_rows, "val_fraction": val_fraction, "seed": seed}
    with ShardWriter(store, "embedded", shard_chars, row_group_rows, log=log) as writer:
        for doc in docs[:-n_val]:
            writer.add(doc)
        writer.cut()
        for doc in docs[-n_val:]:
            writer.add(doc, size_cut=False)  # the val shard is one shard, whatever its size
        return writer.finish({"sources": sources, "config": config})


# ----------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class RemoteDataset:
    name: str
    repo: str          # Hugging Face dataset repo holding shard_00000.parquet ...
    num_shards: int    # including the val shard, which is the last one
    license: str
    note: str = ""

    @property
    def base_url(self) -> str:
        return f"{dl.hf_datasets_url()}/{self.repo}/resolve/main"

    @property
    def val_index(self) -> int:
        return self.num_shards - 1


DATASETS = {
    "fineweb-edu": RemoteDataset("fineweb-edu", "karpathy/fineweb-edu-100b-shuffle", 1823, "ODC-By 1.0"),
    "climbmix": RemoteDataset("climbmix", "karpathy/climbmix-400b-shuffle", 6543, "CC BY-NC 4.0",
                              note="ClimbMix (NVIDIA) is licensed CC BY-NC 4.0: non-commercial use (research and "
                                   "development) only. Use --dataset fineweb-edu (ODC-By) for commercial work."),
}


def resolve_base_url(dataset: RemoteDataset, base_url: str | None = None) -> str:
    return (base_url or os.environ.get("NANOCHAT_DATA_BASE_URL") or dataset.base_url).rstrip("/")


def plan_shards(dataset: str, num_shards: int, start: int = 0, include_val: bool = True) -> list[int]:
    """Upstream shard indices to fetch: train shards [start, num_shards) plus the val shard (the dataset's last)."""
    ds = DATASETS[dataset]
    if num_shards > ds.val_index:
        raise DataError(f"{dataset} has {ds.val_index} train shards; -n {num_shards} is too many")
    if start < 0 or num_shards < 0:
        raise DataError("shard counts must be >= 0")
    return list(range(start, num_shards)) + ([ds.val_index] if include_val else [])


def read_manifest(path: str) -> dict[str, str]:
    """Expected sha256 per shard name: JSON {name: digest} or `sha256sum` lines ("digest  name")."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        return {Path(k).name: v for k, v in json.loads(text).items()}
    out = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[Path(name.strip().lstrip("*")).name] = digest
    return out


def _shard_download(get, url: str, *target, expected: str | None, retries: int, backoff_s: float, timeout_s: float,
                    cancel=None) -> dict:
    """One shard through nanochat.download's `get` (download_file or fetch), its parquet structure checked too;
    the sha256 checked is `expected`, else the one Hugging Face announces. Returns {sha256, size, rows, row_groups, chars}."""
    info = {}
    try:
        got = get(url, *target, expected, retries, backoff_s, timeout_s, progress=False,  # Progress counts shards instead
                  check=lambda path: info.update(parquet_info(path)), cancel=cancel)
    except dl.NotFound as e:
        raise DownloadError(f"{e} — check --dataset / -n, or --base-url / NANOCHAT_DATA_BASE_URL for mirrors") from None
    except dl.DownloadError as e:
        raise (ShardChanged if e.mismatch else DownloadError)(str(e)) from None
    return {"sha256": got.sha256, "size": got.size, **info}


def download_shard(url: str, dest: Path, expected_sha256: str | None = None, retries: int = DOWNLOAD_RETRIES,
                   backoff_s: float = 1.0, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict:
    """Download one shard with retries and exponential backoff; verify sha256 (when known) and parquet structure."""
    return _shard_download(dl.download_file, url, dest, expected=expected_sha256, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)


class Progress:
    """tqdm on a TTY; otherwise a plain line per item (logs of pods and CI)."""

    def __init__(self, total: int, desc: str, log):
        self.total, self.desc, self.log, self.n, self.bytes, self.t0 = total, desc, log, 0, 0, time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="shard", dynamic_ncols=True)

    def update(self, what: str, nbytes: int):
        self.n += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(1)
            return
        elapsed = max(time.time() - self.t0, 1e-9)
        eta = elapsed / self.n * (self.total - self.n)
        self.log(f"{self.desc}: {what} ({self.n}/{self.total}, {self.bytes / elapsed / 1e6:.1f} MB/s, eta {eta:.0f}s)")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def download(store, dataset: str = "fineweb-edu", num_shards: int = 8, start: int = 0, include_val: bool = True,
             workers: int = 8, base_url: str | None = None, retries: int = DOWNLOAD_RETRIES, backoff_s: float = 1.0,
             timeout_s: float = DOWNLOAD_TIMEOUT_S, manifest: dict[str, str] | None = None, verify: bool = False,
             log=None) -> dict:
    """Fetch shards into the store: parallel, resumable (shards with a record are skipped), retried, verified.

    Each shard streams to a temp file, is checked (sha256 when known, parquet structure), uploaded with
    store.put_file, then recorded (data/shards/records/<name>.json). index.json — every recorded shard
    of this dataset — is written last, so readers never see a partial corpus."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    ds = DATASETS[dataset]
    if ds.note:
        log(f"note: {ds.note}")
    base = resolve_base_url(ds, base_url)
    manifest = manifest or {}
    old = load_index(store)
    if old and old.get("source") != dataset:
        log(f"the store holds a {old.get('source')} corpus; replacing it with {dataset}")
        store.delete(INDEX_KEY)
        _remove_shards(store, [e["name"] for e in old["shards"]], log)
    records = _records(store, dataset)
    todo = []
    for i in plan_shards(dataset, num_shards, start, include_val):
        name = shard_name(i)
        rec = records.get(name)
        if rec and store.exists(shard_key(name)):
            if manifest.get(name, rec["sha256"]) != rec["sha256"]:
                log(f"{name}: recorded sha256 is not the manifest's; fetching it again")
            elif not verify or dl.stored_sha256(store, shard_key(name)) == rec["sha256"]:
                continue
            else:
                log(f"{name}: stored copy does not match its recorded sha256; fetching it again")
        todo.append((i, name, manifest.get(name), (rec or {}).get("sha256")))
    log(f"{dataset}: {len(todo)} shard(s) to fetch from {base} ({len(records)} already in {store.uri(SHARDS_PREFIX)})")
    progress = Progress(len(todo), f"download {dataset}", log)
    cancel = threading.Event()

    def get(name: str, expected: str | None) -> dict:
        return _shard_download(dl.fetch, f"{base}/{name}", store, shard_key(name), expected=expected, retries=retries,
                               backoff_s=backoff_s, timeout_s=timeout_s, cancel=cancel)

    def fetch(i: int, name: str, pinned: str | None, recorded: str | None) -> dict:
        """pinned: the manifest's digest; recorded: the one this shard had when last fetched (checked unless pinned)."""
        # records are named by shard, not dataset: until this shard's own record is written, none may vouch for it
        store.delete(f"{RECORDS_PREFIX}/{name}.json")
        try:
            info = get(name, pinned or recorded)
        except ShardChanged:
            if pinned or not recorded:  # a manifest's digest, or the one Hugging Face announces: a real mismatch
                raise
            log(f"{name}: the mirror no longer serves the file recorded (sha256 {recorded[:12]}…): it changed upstream; "
                "fetching the current one")
            info = get(name, None)
        rec = {"name": name, "key": shard_key(name), "split": "val" if i == ds.val_index else "train", "source": dataset,
               "url": f"{base}/{name}", **info}
        store.put_json(f"{RECORDS_PREFIX}/{name}.json", rec)  # after the shard: a record means a verified shard
        progress.update(f"{name} {info['size'] / 1e6:.1f} MB", info["size"])
        return rec

    try:
        errors = run_parallel(fetch, todo, workers, cancel)
    finally:
        progress.close()
    if errors:
        raise errors[0] if isinstance(errors[0], DataError) else DownloadError(str(errors[0]))
    entries = [r for r in _records(store, dataset).values() if store.exists(r["key"])]
    index = _index_doc(dataset, [{k: r[k] for k in ("name", "key", "sha256", "size", "rows", "row_groups", "chars", "split", "source")}
                                 for r in entries], {"base_url": base})
    store.put_json(INDEX_KEY, index)
    log(f"{dataset}: {index['num_train']} train + {index['num_val']} val shard(s), {index['chars']:,} chars in {store.uri(SHARDS_PREFIX)}")
    return index


def run_parallel(fn, jobs: list[tuple], workers: int, cancel: threading.Event) -> list[BaseException]:
    """fn(*job) for every job on `workers` daemon threads; returns the errors. The first error stops handing out jobs
    (a 404 or a dead mirror), while the ones in flight finish. An interrupt (Ctrl-C, a stage's SIGTERM) sets `cancel`,
    which stops those in flight at their next chunk, and is raised at once: daemon threads never hold up the exit,
    not even one stuck on a silent server."""
    pending, errors, lock = list(reversed(jobs)), [], threading.Lock()

    def worker():
        while not cancel.is_set():
            with lock:
                if errors or not pending:
                    return
                job = pending.pop()
            try:
                fn(*job)
            except BaseException as e:  # noqa: BLE001 - the caller reports it
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True, name=f"download-{i}") for i in range(min(max(1, workers), len(jobs)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:
        cancel.set()
        for t in threads:
            t.join(timeout=2.0)  # one mid-chunk stops and removes its temp file; one stuck on a silent server is left
        raise
    return errors


def _records(store, dataset: str) -> dict[str, dict]:
    out = {}
    for key in store.list(f"{RECORDS_PREFIX}/"):
        if key.endswith(".json"):
            rec = store.get_json(key)
            if rec.get("source") == dataset:
                out[rec["name"]] = rec
    return out


def spawn_background(argv: list[str], log_path: str | None = None) -> tuple[int, str]:
    """Re-run `nanochat data <argv>` as a detached process (survives this one); returns (pid, log file)."""
    if log_path is None:
        base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
        os.makedirs(os.path.join(base, "logs"), exist_ok=True)
        log_path = os.path.join(base, "logs", f"data-download-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", *argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())
    return proc.pid, log_path


# ----------------------------------------------------------------------------- prepare (your own data)


def iter_input_documents(paths: list[str], text_field: str = TEXT_COLUMN, txt_split: str = "file"):
    """Documents from local files/directories: .txt/.md (one per file, or per blank-line paragraph / line),
    .jsonl (a `text_field` per line), .parquet (a `text_field` column)."""
    import pyarrow.parquet as pq
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl", ".parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"--input {p}: no such file or directory")
    for f in files:
        if f.suffix in (".txt", ".md"):
            text = f.read_text(encoding="utf-8", errors="replace")
            if txt_split == "file":
                yield text.strip()
            elif txt_split == "paragraph":
                yield from (t.strip() for t in re.split(r"\n\s*\n", text) if t.strip())
            else:
                yield from (t.strip() for t in text.splitlines() if t.strip())
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{n}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                        raise DataError(f"{f}:{n}: no string field {text_field!r} (use --text-field)")
                    yield row[text_field]
        elif f.suffix == ".parquet":
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise DataError(f"{f}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}; use --text-field)")
            for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
                yield from (t for t in batch.column(0).to_pylist() if t)
        else:
            raise DataError(f"{f}: unsupported input type {f.suffix!r} (accepted: .txt .md .jsonl .parquet)")


def prepare(inputs: list[str], store, shard_chars: int = CHARS_PER_SHARD, row_group_rows: int = 1024,
            text_field: str = TEXT_COLUMN, txt_split: str = "file", val_fraction: float = 0.01, log=None) -> dict:
    """Repackage local text into shards + index.json (the last shard is val)."""
    with ShardWriter(store, "prepare", shard_chars, row_group_rows, val_fraction=val_fraction, log=log) as writer:
        for doc in iter_input_documents(inputs, text_field, txt_split):
            writer.add(doc)
        return writer.finish({"inputs": [str(Path(p).resolve()) for p in inputs]})


# ----------------------------------------------------------------------------- recipe


def scaling_params(counts: dict) -> int:
    """The parameters the data:param ratio counts: transformer matrices + lm_head (nanochat's choice, cleanest scaling laws)."""
    return counts["transformer_matrices"] + counts["lm_head"]


def measured_chars_per_token(store) -> float | None:
    """chars/token the tok_eval stage measured on this store's text, if it ran."""
    if store is None:
        return None
    metrics = (store.get_json_or("stages/tok_eval/done.json") or {}).get("metrics") or {}
    # bytes/token on the train shards is the same number for ASCII-heavy web text
    value = metrics.get("chars_per_token") or metrics.get("bytes_per_token_train_shard")
    return float(value) if value else None


def recipe(depth: int, ratio: float = DEFAULT_RATIO, vocab_size: int = DEFAULT_VOCAB_SIZE, seq_len: int = DEFAULT_SEQ_LEN,
           gpus: int = 8, mfu: float = DEFAULT_MFU, chars_per_token: float | None = None, store=None,
           margin: float = 0.1) -> dict:
    """The seed's table for one depth: params → tokens → chars → shards → wall time on `gpus` H100s at `mfu`."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, seq_len))
    counts = model.num_scaling_params()
    params = scaling_params(counts)
    flops_per_token = model.estimate_flops()
    measured = measured_chars_per_token(store)
    cpt = chars_per_token or measured or DEFAULT_CHARS_PER_TOKEN
    tokens = ratio * params
    chars = tokens * cpt
    train_flops = flops_per_token * tokens
    seconds = train_flops / (gpus * H100_BF16_PEAK_FLOPS * mfu)
    return {"depth": depth, "width": model.config.n_embd, "params_total": counts["total"], "params_scaling": params,
            "flops_per_token": flops_per_token, "ratio": ratio, "tokens": int(tokens), "chars_per_token": cpt,
            "chars_per_token_source": "given" if chars_per_token else "tok_eval" if measured else "default",
            "chars": int(chars), "shards": math.ceil(chars * (1 + margin) / CHARS_PER_SHARD), "margin": margin,
            "train_flops": train_flops, "gpus": gpus, "mfu": mfu, "hours": seconds / 3600,
            "tokens_per_s_per_gpu": H100_BF16_PEAK_FLOPS * mfu / flops_per_token}


def shards_needed(depth: int, ratio: float = DEFAULT_RATIO, vocab_size: int = DEFAULT_VOCAB_SIZE, seq_len: int = DEFAULT_SEQ_LEN,
                  chars_per_token: float | None = None, store=None, margin: float = 0.1) -> int:
    """Train shards of ~250M chars to fetch for a depth-`depth` model at `ratio` tokens per scaling parameter."""
    return recipe(depth, ratio, vocab_size, seq_len, chars_per_token=chars_per_token, store=store, margin=margin)["shards"]


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_recipe(rows: list[dict]) -> str:
    cols = [("depth", lambda r: str(r["depth"])), ("width", lambda r: str(r["width"])),
            ("params", lambda r: _human(r["params_scaling"])), ("params(all)", lambda r: _human(r["params_total"])),
            ("FLOPs/token", lambda r: f"{r['flops_per_token']:.3g}"), ("ratio", lambda r: f"{r['ratio']:g}"),
            ("tokens", lambda r: _human(r["tokens"])), ("chars/tok", lambda r: f"{r['chars_per_token']:.2f}"),
            ("chars", lambda r: _human(r["chars"])), ("shards", lambda r: str(r["shards"])),
            ("GPUs", lambda r: str(r["gpus"])), ("MFU", lambda r: f"{r['mfu']:.0%}"), ("hours", lambda r: f"{r['hours']:.2f}"),
            ("tok/s/GPU", lambda r: _human(r["tokens_per_s_per_gpu"]))]
    table = [[name for name, _ in cols]] + [[fn(r) for _, fn in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    r = rows[0]
    notes = [f"params = scaling params (transformer matrices + lm_head); tokens = ratio × params; chars = tokens × chars/token "
             f"({r['chars_per_token_source']}); shards of {_human(CHARS_PER_SHARD)} chars incl. {r['margin']:.0%} margin "
             f"(+1 val shard); hours at {r['mfu']:.0%} MFU of {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 per H100"]
    return "\n".join(lines + [""] + notes)


# ----------------------------------------------------------------------------- command line


def _store(args):
    from nanochat.cli import store_uri
    from nanochat.store import open_store
    return open_store(store_uri(args))


def _checked(tp, ok, need: str):
    """An argparse type: a bad value is one usage error naming the flag and what it accepts, not a traceback."""
    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'} {need}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _checked(int, lambda v: v > 0, "> 0")
COUNT = _checked(int, lambda v: v >= 0, ">= 0")
POSITIVE = _checked(float, lambda v: v > 0, "> 0")
FRACTION = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _depths(text: str) -> list[int]:
    from nanochat.gpt import MAX_DEPTH
    depths = [POSITIVE_INT(d) for d in text.split(",")]
    if max(depths) > MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"a depth must be <= {MAX_DEPTH}, got {max(depths)}")
    return depths


def build_parser() -> argparse.ArgumentParser:
    from nanochat.cli import HelpFormatter
    p = argparse.ArgumentParser(prog="nanochat data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name, help):
        return sub.add_parser(name, help=help, formatter_class=HelpFormatter)

    def store_flags(sp, name="--store"):
        sp.add_argument(name, dest="store", help="artifact store: file:///dir or s3://bucket/prefix (env NANOCHAT_STORE)")
        sp.add_argument("--run", help="run name (a sub-prefix of the store)")

    r = add("recipe", help="params → tokens → chars → shards → wall time for a depth")
    r.add_argument("--depth", type=_depths, default="20", help="model depth, or a comma-separated list (20,24,26)")
    r.add_argument("--ratio", type=POSITIVE, default=DEFAULT_RATIO, help="tokens per scaling parameter")
    r.add_argument("--gpus", type=POSITIVE_INT, default=8, help="H100s for the wall-time estimate")
    r.add_argument("--mfu", type=_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=DEFAULT_MFU,
                   help="model FLOPs utilization for the estimate")
    r.add_argument("--vocab-size", type=POSITIVE_INT, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary")
    r.add_argument("--seq-len", type=POSITIVE_INT, default=DEFAULT_SEQ_LEN, help="training sequence length")
    r.add_argument("--chars-per-token", type=POSITIVE, help=f"override (default: tok_eval's measurement in --store, else {DEFAULT_CHARS_PER_TOKEN})")
    r.add_argument("--margin", type=_checked(float, lambda v: v >= 0, ">= 0"), default=0.1, help="extra shards as a fraction")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    store_flags(r)

    d = add("download", help="fetch pretraining shards into the store (parallel, resumable, verified)")
    d.add_argument("--dataset", default="fineweb-edu", choices=list(DATASETS), help="upstream dataset")
    d.add_argument("-n", "--num-shards", type=COUNT, default=8, help="train shards: upstream shards [start, n) (+ the val shard)")
    d.add_argument("--start", type=COUNT, default=0, help="first train shard (the speedrun's second phase starts after the first)")
    d.add_argument("--no-val", action="store_true", help="skip the val shard (the dataset's last)")
    d.add_argument("--workers", type=POSITIVE_INT, default=8, help="parallel downloads")
    d.add_argument("--base-url", help="mirror base URL (env NANOCHAT_DATA_BASE_URL); shards are <base>/shard_XXXXX.parquet")
    d.add_argument("--retries", type=COUNT, default=DOWNLOAD_RETRIES, help="attempts per shard after the first")
    d.add_argument("--timeout", type=POSITIVE, default=DOWNLOAD_TIMEOUT_S, help="seconds without data before a retry")
    d.add_argument("--sha256-manifest", help="expected digests: JSON {name: sha256} or sha256sum lines; shards recorded "
                   "with another digest are fetched again")
    d.add_argument("--verify", action="store_true", help="re-hash shards already in the store; re-fetch mismatches")
    d.add_argument("--background", action="store_true", help="run detached and return now (log file printed)")
    d.add_argument("--log-file", help="with --background: where the detached process logs")
    store_flags(d)

    pr = add("prepare", help="repackage local .txt/.jsonl/.parquet into shards")
    pr.add_argument("--input", nargs="+", required=True, help="files or directories")
    pr.add_argument("--shard-chars", type=POSITIVE_INT, default=CHARS_PER_SHARD, help="characters per shard")
    pr.add_argument("--row-group-rows", type=POSITIVE_INT, default=1024, help="documents per parquet row group")
    pr.add_argument("--text-field", default=TEXT_COLUMN, help="JSONL field / parquet column holding the text")
    pr.add_argument("--txt-split", default="file", choices=["file", "paragraph", "line"], help="documents in .txt files")
    pr.add_argument("--val-fraction", type=FRACTION, default=0.01, help="held out when everything fits in one shard")
    store_flags(pr, "--out-store")

    e = add("embedded", help="write the embedded corpus (stdlib docs + synthetic tasks) into the store")
    e.add_argument("--max-chars", type=COUNT, default=0, help="cap on prose characters (0 = all)")
    e.add_argument("--synthetic-fraction", type=FRACTION, default=EMBEDDED_SYNTHETIC_FRACTION, help="share of synthetic task text")
    e.add_argument("--shard-chars", type=POSITIVE_INT, default=EMBEDDED_SHARD_CHARS, help="characters per shard")
    e.add_argument("--row-group-rows", type=POSITIVE_INT, default=EMBEDDED_ROW_GROUP_ROWS, help="documents per parquet row group")
    e.add_argument("--seed", type=int, default=0, help="shuffle seed")
    store_flags(e)

    i = add("info", help="list the store's shards")
    store_flags(i)
    return p


def cli(argv=None) -> int:
    from nanochat.store import StoreError
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.cmd == "recipe":
            store = _store(args) if (args.store or args.run) else None
            rows = [recipe(d, args.ratio, args.vocab_size, args.seq_len, args.gpus, args.mfu, args.chars_per_token, store, args.margin)
                    for d in args.depth]
            print(json.dumps(rows, indent=2) if args.json else format_recipe(rows))
        elif args.cmd == "download":
            if args.background:
                rest = [a for a in argv if a != "--background"]
                pid, path = spawn_background(rest, args.log_file)
                print(f"downloading in the background: pid {pid}, log {path}")
                return 0
            manifest = read_manifest(args.sha256_manifest) if args.sha256_manifest else None
            download(_store(args), args.dataset, args.num_shards, args.start, not args.no_val, args.workers, args.base_url,
                     args.retries, timeout_s=args.timeout, manifest=manifest, verify=args.verify, log=log)
        elif args.cmd == "prepare":
            index = prepare(args.input, _store(args), args.shard_chars, args.row_group_rows, args.text_field, args.txt_split,
                            args.val_fraction, log=log)
            print(f"{index['num_train']} train + {index['num_val']} val shard(s), {index['rows']:,} documents, {index['chars']:,} chars")
        elif args.cmd == "embedded":
            index = build_embedded(_store(args), args.max_chars, args.synthetic_fraction, args.shard_chars, args.row_group_rows,
                                   seed=args.seed, log=log)
            print(f"{index['num_train']} train + {index['num_val']} val shard(s), {index['rows']:,} documents, {index['chars']:,} chars")
        elif args.cmd == "info":
            store = _store(args)
            index = load_index(store)
            if index is None:
                print(f"no corpus in {store.uri(SHARDS_PREFIX)} (no index.json): run `nanochat stage data` or `nanochat data download`")
                return 1
            print(f"{store.uri(SHARDS_PREFIX)}: source {index['source']}, {index['num_train']} train + {index['num_val']} val shards, "
                  f"{index['rows']:,} documents, {index['chars']:,} chars, {index['bytes'] / 1e6:.1f} MB")
            for e in index["shards"]:
                print(f"  {e['name']}  {e['split']:<5}  {e['rows']:>9,} docs  {e['chars']:>13,} chars  {e['row_groups']:>4} row groups  {e['sha256'][:12]}")
    except (DataError, StoreError, OSError) as e:
        print(f"nanochat data {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nanochat data {args.cmd}: interrupted; what is stored is kept: re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
