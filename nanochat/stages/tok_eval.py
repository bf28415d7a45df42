"""Evaluate the tokenizer: bytes/token on several kinds of text (prose, code, math, non-English, the
train and val shards), compared with reference tokenizers found locally; token-length histogram,
longest tokens and the worst-compressed samples."""
from __future__ import annotations

import hashlib
import inspect
import io
import os
import textwrap
from dataclasses import dataclass

from nanochat.config import StageConfig, opt
from nanochat.stage import run_module_main, stage_main

STAGE = "tok_eval"

PROSE = """The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting each of the
one hundred and twelve steps as his father had taught him. From the lamp room he could see the
fishing boats returning to the harbour, their wakes silver in the fading light. Nobody remembered
when the light had last failed; the keeper intended that nobody ever would."""

MATH = r"""Let $f(x) = 3x^2 - 2x + 7$. Then $f'(x) = 6x - 2$, and the minimum is at $x = 1/3$,
where $f(1/3) = 3 \cdot \frac{1}{9} - \frac{2}{3} + 7 = \frac{20}{3}$. For the integral,
$\int_0^2 f(x)\,dx = [x^3 - x^2 + 7x]_0^2 = 8 - 4 + 14 = 18$. If 17 * 23 = 391 and 391 / 17 = 23,
then 2^10 = 1024, 3.14159 * 2.5^2 ≈ 19.63, and 1e-3 + 0.25 = 0.251."""

NON_ENGLISH = """Der schnelle braune Fuchs springt über den faulen Hund. Größere Äpfel schmecken süßer.
El veloz murciélago hindú comía feliz cardillo y kiwi. La cigüeña tocaba el saxofón detrás del palenque.
敏捷的棕色狐狸跳过了懒狗。今天天气很好，我们去公园散步吧。
빠른 갈색 여우가 게으른 개를 뛰어넘습니다. 오늘은 날씨가 아주 좋습니다.
Быстрая коричневая лиса перепрыгивает через ленивую собаку. 🦊🐶✨"""


@dataclass
class Config(StageConfig):
    sample_docs: int = opt(500, "documents taken from each of the train and val shards")
    references: str = opt("", "comma-separated local reference tokenizers: HuggingFace tokenizer.json paths or cached tiktoken names (gpt2, cl100k_base); never downloaded", hash=False)
    worst_samples: int = opt(5, "worst-compressed documents listed in the report")
    longest_tokens: int = opt(20, "longest tokens listed in the report")


def text_kinds(ctx, n_docs: int) -> dict[str, list[str]]:
    from nanochat.text_shards import iter_texts
    import json as json_mod
    code = [inspect.getsource(textwrap), inspect.getsource(json_mod.decoder)]
    kinds = {"prose": [PROSE], "code": code, "math": [MATH], "non-English": [NON_ENGLISH]}
    for split in ("train", "val"):
        docs = []
        for doc in iter_texts(ctx.store, split):
            docs.append(doc)
            if len(docs) >= n_docs:
                break
        kinds[f"{split} shard"] = docs
    return kinds


def tiktoken_cached(name: str):
    """A tiktoken encoding only if its file is already in the local cache (no network, ever)."""
    import tiktoken
    import tiktoken_ext.openai_public as pub
    urls = {"gpt2": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "r50k_base": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
            "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
            "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"}
    if name not in urls:
        return None
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "data-gym-cache")
    if not os.path.exists(os.path.join(cache, hashlib.sha1(urls[name].encode()).hexdigest())):
        return None
    del pub
    return tiktoken.get_encoding(name)


def load_references(spec: str, log) -> dict:
    refs = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if os.path.isfile(item):
            from tokenizers import Tokenizer as HFTokenizer
            hf = HFTokenizer.from_file(item)
            refs[os.path.basename(os.path.dirname(item)) or item] = lambda t, hf=hf: len(hf.encode(t, add_special_tokens=False).ids)
        elif (enc := tiktoken_cached(item)) is not None:
            refs[item] = lambda t, enc=enc: len(enc.encode_ordinary(t))
        else:
            log(f"reference tokenizer {item!r} not found locally (a tokenizer.json path or a cached tiktoken encoding); skipped")
    return refs


def run(ctx):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nanochat.tokenizer import get_tokenizer

    cfg = ctx.cfg
    ctx.require("tokenizer/tokenizer.json", "tok_train")
    if not ctx.is_master:
        return {}
    tok = get_tokenizer(ctx.store)
    refs = load_references(cfg.references, ctx.log)
    rows, metrics, per_doc = [], {}, []
    for kind, docs in text_kinds(ctx, cfg.sample_docs).items():
        text_bytes = sum(len(d.encode()) for d in docs)
        ids = tok.encode(docs)
        ntok = sum(len(x) for x in ids)
        row = {"text": kind, "bytes": text_bytes, "tokens": ntok, "bytes/token (ours)": text_bytes / max(ntok, 1)}
        for name, count in refs.items():
            row[f"bytes/token ({name})"] = text_bytes / max(sum(count(d) for d in docs), 1)
        rows.append(row)
        metrics[f"bytes_per_token_{kind.replace(' ', '_').replace('-', '_').lower()}"] = row["bytes/token (ours)"]
        if kind.endswith("shard"):
            per_doc += [(len(d.encode()) / max(len(x), 1), d) for d, x in zip(docs, ids) if d]
    token_bytes = tok.token_bytes()
    lengths = token_bytes[token_bytes > 0].tolist()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=range(1, int(max(lengths)) + 2))
    ax.set_xlabel("token length (bytes)")
    ax.set_ylabel("tokens")
    ax.set_title(f"vocabulary of {tok.get_vocab_size():,} tokens")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    longest = sorted(range(len(token_bytes)), key=lambda i: -int(token_bytes[i]))[:cfg.longest_tokens]
    longest_rows = [{"id": i, "bytes": int(token_bytes[i]), "token": repr(tok.decode([i]))} for i in longest]
    worst = sorted(per_doc)[:cfg.worst_samples]
    worst_rows = [{"bytes/token": bpt, "sample": repr(d[:80])} for bpt, d in worst]
    ctx.section("Tokenizer evaluation", [rows, "Longest tokens:", longest_rows, "Worst-compressed documents:", worst_rows],
                figures={"token_lengths": buf.getvalue()})
    for r in rows:
        ctx.log(f"{r['text']:<12} {r['bytes/token (ours)']:.3f} bytes/token")
    metrics["vocab_size"] = tok.get_vocab_size()
    return metrics


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
