"""Tokenizer training benchmark: our rustbpe vs PyPI rustbpe 0.1.0 vs HuggingFace tokenizers.

Prints a table (not a test): wall time, peak RSS, merges/s, bytes/token on held-out text and
the encode throughput of the resulting tiktoken encoding, at vocab 32,768 and 65,536 on >= 50 MB,
plus the ANCHORS.md configurations (9.5 MB at vocab 8,192 and 32,768).

Corpus (built once without network, cached as parquet under ~/.cache/nanochat/):
1. the English public-domain sample /work/shared/data/pretrain/*.parquet (~1 MB) when present;
2. Python's own documentation topics (pydoc_data.topics, ~0.8 MB of English);
3. docstrings of the Python standard library and the installed site-packages, one document per
   module (English prose with code bits), up to 2/3 of the target size;
4. Python source files of the same, up to the target size.
Every 50th document is held out for bytes/token and encode speed.

Each trainer runs in its own subprocess. Peak RSS is the process's VmHWM, reset just before
training (so loading the corpus does not count); the corpus held in memory as a Python list is
the same baseline for all. Timings are min / median over interleaved repeats (the machine may
be shared); encode MB/s is tiktoken's single-thread encode_ordinary on the held-out documents. PyPI rustbpe has the same import name as ours, so it is
installed with `pip install --target /tmp/pypi_rustbpe rustbpe==0.1.0` and imported from there.

    .venv/bin/python bench/tokenizer.py                 # full run (~15 min on 2 cores)
    .venv/bin/python bench/tokenizer.py --quick         # 12 MB, vocab 8,192 only
"""

import argparse
import ast
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nanochat")
SHARED_PRETRAIN = "/work/shared/data/pretrain"
PYPI_DIR = os.environ.get("PYPI_RUSTBPE_DIR", "/tmp/pypi_rustbpe")
NUM_SPECIAL = 9  # nanochat's special tokens take the last ids; BPE trains vocab_size - 9
HOLDOUT_EVERY = 50
ANCHORS = {8192: (0.49, 3.90), 32768: (0.65, 4.41)}  # PyPI rustbpe on 9.5 MB English, 2 Zen 5 cores

# ----------------------------------------------------------------------------- corpus


def _python_files():
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    for root in dict.fromkeys(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".py"):
                    try:
                        with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                            yield f.read()
                    except (UnicodeDecodeError, OSError):
                        continue


def _docstrings(source):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d for d in docs if d)


def build_corpus(target_mb):
    """Documents (list of str), in the order: English, pydoc topics, docstrings, sources."""
    target = int(target_mb * 1e6)
    docs, size, sources = [], 0, []

    def add(text):
        nonlocal size
        text = text.replace("\x00", "")
        if text.strip():
            docs.append(text)
            size += len(text.encode("utf-8"))

    if os.path.isdir(SHARED_PRETRAIN):
        import pyarrow.parquet as pq

        for name in sorted(os.listdir(SHARED_PRETRAIN)):
            if name.endswith(".parquet"):
                for text in pq.read_table(os.path.join(SHARED_PRETRAIN, name), columns=["text"])["text"].to_pylist():
                    for para in text.split("\n\n\n"):  # books are long: cut them into documents
                        add(para)
    from pydoc_data.topics import topics

    for key in sorted(topics):
        add(topics[key])
    for source in _python_files():
        if size >= target * 2 // 3:
            sources.append(source)
            if sum(map(len, sources)) > target:
                break
            continue
        add(_docstrings(source))
        sources.append(source)
    for source in sources:
        if size >= target:
            break
        add(source)
    return docs


def load_corpus(target_mb):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(CACHE, f"bench_tokenizer_corpus_{target_mb:g}mb.parquet")
    if not os.path.exists(path):
        t0 = time.time()
        print(f"building the {target_mb:g} MB corpus (once; cached at {path}) ...", file=sys.stderr)
        docs = build_corpus(target_mb)
        os.makedirs(CACHE, exist_ok=True)
        pq.write_table(pa.table({"text": docs}), path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"  {len(docs)} documents in {time.time() - t0:.0f}s", file=sys.stderr)
    return path


def split_corpus(path, mb):
    """(train docs: the first `mb` MB of non-held-out documents, held-out docs from the same span)."""
    import pyarrow.parquet as pq

    docs = pq.read_table(path, columns=["text"])["text"].to_pylist()
    train, held, size = [], [], 0
    for i, doc in enumerate(docs):
        if size >= mb * 1e6:
            break
        if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
            held.append(doc)
        else:
            train.append(doc)
            size += len(doc.encode("utf-8"))
    return train, held


# ----------------------------------------------------------------------------- one training run (subprocess)


def proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def reset_peak_rss():
    """Start the peak-RSS count (VmHWM) afresh, so that loading the corpus does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def train(trainer, docs, vocab_size):
    """Train; returns tiktoken mergeable ranks {bytes: rank}."""
    if trainer in ("ours", "pypi"):
        import rustbpe

        from nanochat.tokenizer import SPLIT_PATTERN

        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab_size - NUM_SPECIAL, pattern=SPLIT_PATTERN)
        return {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    if trainer == "hf":
        from nanochat.tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer.train_from_iterator(iter(docs), vocab_size).mergeable_ranks()
    raise ValueError(trainer)


def worker(args):
    import tiktoken

    from nanochat.tokenizer import SPLIT_PATTERN

    docs, held = split_corpus(args.corpus, args.mb)
    import rustbpe

    module = rustbpe.__file__
    rss0 = proc_status_mb("VmRSS")
    fresh_peak = reset_peak_rss()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    ranks = train(args.worker, docs, args.vocab)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak = proc_status_mb("VmHWM") if fresh_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del docs
    enc = tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    held_bytes = sum(len(d.encode("utf-8")) for d in held)
    n_tokens = sum(len(enc.encode_ordinary(d)) for d in held)
    encode_s = float("inf")
    for _ in range(3):  # best of 3: the machine may be shared
        t1 = time.perf_counter()
        for d in held:
            enc.encode_ordinary(d)
        encode_s = min(encode_s, time.perf_counter() - t1)
    result = {
        "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak, "base_rss_mb": rss0, "merges": len(ranks) - 256,
        "bytes_per_token": held_bytes / n_tokens, "encode_mb_s": held_bytes / 1e6 / encode_s, "module": module,
    }
    with open(args.out, "w") as f:
        json.dump({"result": result, "ranks": sorted((v, base64.b64encode(k).decode()) for k, v in ranks.items())}, f)


def run_worker(trainer, corpus, mb, vocab):
    env = dict(os.environ, PYTHONPATH=REPO)
    if trainer == "pypi":
        env["PYTHONPATH"] = PYPI_DIR + os.pathsep + REPO
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", trainer, "--corpus", corpus,
               "--mb", str(mb), "--vocab", str(vocab), "--out", out]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            data = json.load(f)
    finally:
        os.unlink(out)
    res = data["result"]
    if trainer == "pypi" and not res["module"].startswith(PYPI_DIR):
        raise RuntimeError(f"PyPI rustbpe not picked up: imported {res['module']}")
    return res, [base64.b64decode(b) for _, b in data["ranks"]]


def ensure_pypi_rustbpe():
    if os.path.isdir(os.path.join(PYPI_DIR, "rustbpe")):
        return True
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", PYPI_DIR, "rustbpe==0.1.0"]
    print("installing PyPI rustbpe 0.1.0 into", PYPI_DIR, file=sys.stderr)
    return subprocess.run(cmd).returncode == 0


# ----------------------------------------------------------------------------- table


def bench(corpus, mb, vocab, trainers, repeats):
    runs = {t: [] for t in trainers}
    tokens = {}
    for r in range(max(repeats.values())):
        for t in trainers:  # interleaved, so load on a shared machine hits all alike
            if r < repeats[t]:
                res, tokens[t] = run_worker(t, corpus, mb, vocab)
                runs[t].append(res)
                print(f"  {mb:g} MB vocab {vocab} {t}: {res['seconds']:.2f}s", file=sys.stderr)
    rows = []
    for t in trainers:
        secs = [r["seconds"] for r in runs[t]]
        last = runs[t][-1]
        same = "-"
        if t != "ours" and "ours" in tokens:
            same = _compare(tokens[t], tokens["ours"])
        rows.append({"trainer": t, "min": min(secs), "median": statistics.median(secs), "n": len(secs),
                     "cpu": min(r["cpu_seconds"] for r in runs[t]),
                     "peak": max(r["peak_rss_mb"] for r in runs[t]), "base": last["base_rss_mb"],
                     "merges_s": last["merges"] / min(secs), "bpt": last["bytes_per_token"],
                     "enc": max(r["encode_mb_s"] for r in runs[t]), "same": same})
    return rows


def _compare(theirs, ours):
    """'same order' (identical ranks), 'same set', or how many tokens differ."""
    if theirs == ours:
        return "same ranks"
    differ = len(set(theirs) - set(ours))
    return "same set" if differ == 0 else f"{differ:,} of {len(ours):,} differ"


NAMES = {"ours": "rustbpe (ours)", "pypi": "rustbpe 0.1.0 (PyPI)", "hf": "HF tokenizers"}


def print_table(title, mb, vocab, rows, anchor=None):
    print(f"\n### {title}: {mb:g} MB, vocab {vocab:,}")
    print("| trainer | train s (min / median, n) | x ours | CPU s (min) | peak RSS MB in training (corpus baseline) "
          "| merges/s | bytes/token held-out | tiktoken encode MB/s | token set vs ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    ours = next((r["min"] for r in rows if r["trainer"] == "ours"), None)
    for r in rows:
        ratio = f"{r['min'] / ours:.2f}" if ours else "-"
        print(f"| {NAMES[r['trainer']]} | {r['min']:.2f} / {r['median']:.2f} ({r['n']}) | {ratio} | {r['cpu']:.2f} | "
              f"{r['peak']:.0f} ({r['base']:.0f}) | {r['merges_s']:,.0f} | {r['bpt']:.2f} | {r['enc']:.1f} | {r['same']} |")
    if anchor:
        print(f"| ANCHORS.md: PyPI rustbpe, 9.5 MB English | {anchor[0]:.2f} | | | | | {anchor[1]:.2f} | | |")
    for r in rows:
        if r["trainer"] != "ours" and ours:
            print(f"ours / {NAMES[r['trainer']]} time: {ours / r['min']:.2f}x")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=60, help="main corpus size in MB")
    p.add_argument("--vocab", default="32768,65536")
    p.add_argument("--repeats", type=int, default=3, help="runs per rustbpe trainer (min and median reported)")
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--quick", action="store_true", help="12 MB, vocab 8192, no anchors")
    p.add_argument("--worker"), p.add_argument("--corpus"), p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        args.vocab = int(args.vocab)
        return worker(args)
    if args.quick:
        args.mb, args.vocab, args.no_anchors = 12, "8192", True
    corpus = load_corpus(max(args.mb, 9.5))
    trainers = ["ours"] + (["pypi"] if ensure_pypi_rustbpe() else []) + ([] if args.no_hf else ["hf"])
    repeats = {"ours": args.repeats, "pypi": args.repeats, "hf": args.hf_repeats}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"corpus: {corpus}; machine: {os.cpu_count()} CPUs, load average {load:.1f} at start; trainers: {trainers}")
    if not args.no_anchors:
        for vocab, anchor in ANCHORS.items():
            print_table("ANCHORS.md configuration", 9.5, vocab, bench(corpus, 9.5, vocab, trainers, repeats), anchor)
    for vocab in map(int, args.vocab.split(",")):
        print_table("Main", args.mb, vocab, bench(corpus, args.mb, vocab, trainers, repeats))


if __name__ == "__main__":
    main()
