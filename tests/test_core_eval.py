"""CORE: fixture tasks of each type scored by hand-made oracle models with known answers, few-shot
sampling, left-cropping, batching, 2-rank torchrun, the bundle downloader on loopback HTTP, the
eval_bundle stage, base_eval reporting CORE, and a local GPT-2 checkpoint (safetensors) scored."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nanochat.core_eval import (BATCH_TOKENS, BUNDLE_PREFIX, MANIFEST, BundleMissing, EvalBundleError, batches, bundle_available,
                                centered, context_length, crop_left, download_eval_bundle, evaluate_core,
                                fewshot_indices, load_bundle, prepare, render_lm, render_mc, render_schema, score_batch)
from nanochat.stage import stage_main
from nanochat.store import open_store, sha256_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only spin (20x slower on a loaded 2-core box)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

# ----------------------------------------------------------------------------- fixture tasks (all four kinds)

MC_DELIM = "\nAnswer: "


def mc_rows(tag: str, n: int, n_choices: int) -> list[dict]:
    # choices of 1-3 words: only a per-token mean (not a sum) compares them fairly
    return [{"query": f"Question: which {tag}{i} thing?", "gold": i % n_choices,
             "choices": [" ".join(f"{tag}{i}c{j}w{k}" for k in range(1 + (i + j) % 3)) for j in range(n_choices)]} for i in range(n)]


def schema_rows(n: int) -> list[dict]:
    return [{"context_options": [f"The s{i} story ends with opt{i}x{j}" for j in range(2)],
             "continuation": f"s{i}k1 s{i}k2.", "gold": (i + 1) % 2} for i in range(n)]


FILLER = " ".join(f"filler{k}" for k in range(30))


def lm_rows(n: int, long: bool = False) -> list[dict]:
    # trailing whitespace in the context, as in some real files: the protocol strips it
    return [{"context": f"Passage {i} {FILLER if long else 'goes on'} then end{i} ", "continuation": f"l{i}a l{i}b"} for i in range(n)]


# label -> (core.yaml entry, rows, random baseline %)
TASKS = {
    "mc4": ({"dataset_uri": "world_knowledge/mc4.jsonl", "num_fewshot": [3], "icl_task_type": "multiple_choice",
             "continuation_delimiter": MC_DELIM}, mc_rows("m", 8, 4), 25),
    "mc2": ({"dataset_uri": "commonsense_reasoning/mc2.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice"},
            mc_rows("p", 6, 2), 50),
    "schema": ({"dataset_uri": "language_understanding/schema.jsonl", "num_fewshot": [0], "icl_task_type": "schema"}, schema_rows(6), 50),
    "lm": ({"dataset_uri": "language_understanding/lm.jsonl", "num_fewshot": [0], "icl_task_type": "language_modeling"}, lm_rows(7), 0),
}
# rows (by position in the file) the wrong oracle gets wrong, and the accuracies that follow
WRONG = {"mc4": {0, 3, 6}, "mc2": {1}, "schema": {0, 1}, "lm": {2, 4}}
EXPECTED_ACC = {"mc4": 5 / 8, "mc2": 5 / 6, "schema": 4 / 6, "lm": 5 / 7}
EXPECTED_CENTERED = {"mc4": (5 / 8 - 0.25) / 0.75, "mc2": (5 / 6 - 0.5) / 0.5, "schema": (4 / 6 - 0.5) / 0.5, "lm": 5 / 7}


def core_yaml(tasks) -> str:
    lines = ["# fixture in the layout of the real bundle", "icl_tasks:"]
    for label, (spec, _, _) in tasks.items():
        lines += [f"- label: {label}", f"  dataset_uri: {spec['dataset_uri']}", f"  num_fewshot: {spec['num_fewshot']}",
                  f"  icl_task_type: {spec['icl_task_type']}"]
        if "continuation_delimiter" in spec:
            lines.append(f"  continuation_delimiter: {json.dumps(spec['continuation_delimiter'])}")
    return "\n".join(lines) + "\n"


def meta_csv(tasks) -> str:
    out = io.StringIO()
    out.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n")
    out.write('other_task,world knowledge,multiple choice,0,10,25,,"not in core.yaml"\n')
    for label, (spec, rows, baseline) in tasks.items():
        out.write(f'{label},fixture,{spec["icl_task_type"]},{spec["num_fewshot"][0]},{len(rows)},{baseline},,"fixture, {label}"\n')
    return out.getvalue()


def bundle_files(tasks=TASKS) -> dict[str, bytes]:
    files = {"core.yaml": core_yaml(tasks).encode(), "eval_meta_data.csv": meta_csv(tasks).encode()}
    for spec, rows, _ in tasks.values():
        files[f"eval_data/{spec['dataset_uri']}"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return files


def bundle_zip(tasks=TASKS, root: str = "eval_bundle/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(root, "")
        for name, data in bundle_files(tasks).items():
            zf.writestr(root + name, data)
        zf.writestr("__MACOSX/._core.yaml", b"junk")
    return buf.getvalue()


def put_bundle(store, tasks=TASKS):
    store.publish(BUNDLE_PREFIX, bundle_files(tasks), MANIFEST)


# ----------------------------------------------------------------------------- a word tokenizer and oracle models

class WordTokenizer:
    """Whitespace-separated words -> ids from a fixed vocabulary (so every process agrees); BOS = 0."""

    def __init__(self, texts):
        words = sorted({w for t in texts for w in t.split()})
        self.vocab = {w: i + 1 for i, w in enumerate(words)}

    def get_vocab_size(self):
        return len(self.vocab) + 1

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None, num_threads=1):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + [self.vocab[w] for w in text.split()]


def all_texts(tasks=TASKS) -> list[str]:
    out = [MC_DELIM]
    for _, rows, _ in tasks.values():
        for r in rows:
            out += [v for v in r.values() if isinstance(v, str)] + [s for v in r.values() if isinstance(v, list) for s in v]
    return out


class Oracle(nn.Module):
    """Bigram logits: favoured (previous word -> next word) pairs get +8. Built from the sequences that
    should win, so the right continuation has the lowest loss / is the greedy prediction. Inputs longer
    than `limit` raise, like a model with learned positions; `advertise` exposes it as max_seq_len."""

    def __init__(self, tokenizer, favoured: list[str], limit: int | None = None, advertise: bool = True):
        super().__init__()
        v = tokenizer.get_vocab_size()
        self.register_buffer("table", torch.zeros(v, v))
        for text in favoured:
            ids = tokenizer.encode(text)
            for a, b in zip(ids, ids[1:]):
                self.table[a, b] = 8.0
        self.limit = limit
        if limit and advertise:
            self.max_seq_len = limit
        self.calls = 0

    def forward(self, idx):
        if self.limit and idx.size(1) > self.limit:
            raise IndexError(f"{idx.size(1)} tokens > {self.limit}")
        self.calls += 1
        return self.table[idx]


def favoured(tasks=TASKS, wrong=None) -> list[str]:
    """The winning sequences: gold answers, except for the rows in `wrong`, which favour a wrong one."""
    wrong = wrong or {}
    out = []
    for label, (spec, rows, _) in tasks.items():
        delim = spec.get("continuation_delimiter", " ")
        for i, r in enumerate(rows):
            bad = i in wrong.get(label, ())
            kind = spec["icl_task_type"]
            if kind == "multiple_choice":
                out.append(f"{r['query']}{delim}{r['choices'][(r['gold'] + bad) % len(r['choices'])]}")
            elif kind == "schema":
                out.append(f"{r['context_options'][(r['gold'] + bad) % 2]}{delim}{r['continuation']}")
            else:
                out.append(f"{r['context'].strip()}{delim}{r['continuation'] if not bad else r['continuation'].replace('a', 'b')}")
    return out


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path}/store")
    put_bundle(s)
    return s


@pytest.fixture
def tok():
    return WordTokenizer(all_texts())


# ----------------------------------------------------------------------------- scoring against oracles

def test_right_oracle_scores_every_task_perfectly(store, tok):
    out = evaluate_core(Oracle(tok, favoured()), tok, store, "cpu")
    assert list(out["tasks"]) == list(TASKS)  # core.yaml order
    for label, (spec, rows, baseline) in TASKS.items():
        r = out["tasks"][label]
        assert (r["accuracy"], r["centered"], r["examples"], r["correct"]) == (1.0, 1.0, len(rows), len(rows)), label
        assert r["random_baseline"] == baseline and r["task_type"] == spec["icl_task_type"] and r["num_fewshot"] == spec["num_fewshot"][0]
    assert out["core"] == 1.0


def test_wrong_oracle_gives_the_predicted_accuracies_and_core(store, tok):
    out = evaluate_core(Oracle(tok, favoured(wrong=WRONG)), tok, store, "cpu")
    for label in TASKS:
        assert out["tasks"][label]["accuracy"] == pytest.approx(EXPECTED_ACC[label]), label
        assert out["tasks"][label]["centered"] == pytest.approx(EXPECTED_CENTERED[label]), label
    assert out["core"] == pytest.approx(sum(EXPECTED_CENTERED.values()) / 4)
    # a model that favours nothing: MC/schema ties go to the first row, LM never matches
    blank = evaluate_core(Oracle(tok, []), tok, store, "cpu")["tasks"]
    first_is_gold = {label: sum(r["gold"] == 0 for r in rows) / len(rows) for label, (_, rows, _) in TASKS.items() if label != "lm"}
    assert {k: blank[k]["accuracy"] for k in first_is_gold} == pytest.approx(first_is_gold)
    assert blank["lm"]["accuracy"] == 0.0


def test_centered_accuracy_formula():
    assert centered(0.25, 25) == 0.0 and centered(1.0, 62) == pytest.approx(1.0)
    assert centered(0.5, 50) == 0.0 and centered(0.75, 50) == pytest.approx(0.5) and centered(0.3, 0) == pytest.approx(0.3)
    assert centered(0.0, 62) == pytest.approx(-0.62 / 0.38)


def test_max_per_task_evaluates_a_deterministic_shuffled_prefix(store, tok):
    model = Oracle(tok, favoured(wrong=WRONG))
    a = evaluate_core(model, tok, store, "cpu", max_per_task=3)
    b = evaluate_core(model, tok, store, "cpu", max_per_task=3)
    assert a["core"] == b["core"] and all(a["tasks"][k]["correct"] == b["tasks"][k]["correct"] for k in TASKS)
    for label, (_, rows, _) in TASKS.items():
        order = list(range(len(rows)))
        random.Random(1337).shuffle(order)  # nanochat's per-task shuffle
        expected = sum(i not in WRONG[label] for i in order[:3]) / 3
        assert a["tasks"][label]["examples"] == 3 and a["tasks"][label]["accuracy"] == pytest.approx(expected), label


def test_labels_select_tasks_and_unknown_ones_fail(store, tok):
    out = evaluate_core(Oracle(tok, favoured()), tok, store, "cpu", labels=["lm", "mc2"])
    assert set(out["tasks"]) == {"lm", "mc2"}
    with pytest.raises(ValueError, match="nope"):
        load_bundle(store, labels=["nope"])


def test_batching_does_not_change_results(store, tok):
    model = Oracle(tok, favoured(wrong=WRONG))
    one = evaluate_core(model, tok, store, "cpu", batch_tokens=1)  # every example alone
    calls_one, model.calls = model.calls, 0
    big = evaluate_core(model, tok, store, "cpu", batch_tokens=10**6)  # a task per forward
    assert calls_one == sum(len(rows) for _, rows, _ in TASKS.values()) and model.calls == len(TASKS)
    assert one["core"] == big["core"] and all(one["tasks"][k]["correct"] == big["tasks"][k]["correct"] for k in TASKS)


# ----------------------------------------------------------------------------- few-shot sampling and prompts

def test_fewshot_sampling_is_deterministic_and_excludes_the_example():
    for n, k in [(8, 3), (40, 10), (11, 10)]:
        for idx in range(n):
            got = fewshot_indices(n, idx, k)
            assert got == fewshot_indices(n, idx, k)
            assert len(got) == k == len(set(got)) and idx not in got and all(0 <= i < n for i in got)
            assert got == random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)  # nanochat's draw
    assert fewshot_indices(8, 0, 0) == []
    assert len({tuple(fewshot_indices(40, i, 10)) for i in range(40)}) > 30  # it varies per example


def test_fewshot_prompt_shows_other_examples_gold_answers(store):
    task = next(t for t in load_bundle(store) if t.label == "mc4")
    for idx in range(task.num_eval):
        item = task.rows[idx]
        shots = [task.rows[i] for i in fewshot_indices(len(task.rows), idx, 3)]
        prompts = render_mc(item, MC_DELIM, shots)
        assert len(prompts) == 4
        for p, choice in zip(prompts, item["choices"]):
            blocks = p.split("\n\n")
            assert len(blocks) == 4 and blocks[-1] == f"{item['query']}{MC_DELIM}{choice}"
            assert blocks[:3] == [f"{s['query']}{MC_DELIM}{s['choices'][s['gold']]}" for s in shots]
            assert p.count(item["query"]) == 1  # the example never appears among its own shots


JINJA_MC = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
JINJA_SCHEMA = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()
JINJA_LM = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()


@pytest.mark.parametrize("shots", [0, 1, 3])
def test_prompts_match_nanochats_templates(shots):
    """Byte-identical to the jinja templates nanochat (after DCLM / llm-foundry) renders."""
    from jinja2 import Template
    for rows, ours, template, delims in [(mc_rows("q", 6, 3), render_mc, JINJA_MC, [" ", MC_DELIM]),
                                         (schema_rows(6), render_schema, JINJA_SCHEMA, [" ", "\n"]),
                                         (lm_rows(6), render_lm, JINJA_LM, [" ", ": "])]:
        for delim in delims:
            item, few = rows[0], rows[1:1 + shots]
            ctx = {"fewshot_examples": few, "continuation_delimiter": delim, "item": item}
            if ours is render_mc:
                want = [Template(template).render(choice=c, **ctx) for c in item["choices"]]
            elif ours is render_schema:
                want = [Template(template).render(context=c, **ctx) for c in item["context_options"]]
            else:
                want = [Template(template).render(include_continuation=False, **ctx).strip(), Template(template).render(include_continuation=True, **ctx)]
            assert ours(item, delim, few) == want


# ----------------------------------------------------------------------------- context: cropping from the left

def test_scored_spans_per_task_type():
    from nanochat.core_eval import continuation_spans
    bos = 0
    # MC: shared context, the spans start where the choices part
    rows, starts, ends = continuation_spans("multiple_choice", [[bos, 5, 6, 7, 8], [bos, 5, 6, 9], [bos, 5, 6, 7, 10, 11]])
    assert starts == [3, 3, 3] and ends == [5, 4, 6]
    # schema: different contexts, the spans are the shared suffix
    rows, starts, ends = continuation_spans("schema", [[bos, 1, 2, 7, 8, 9], [bos, 3, 7, 8, 9]])
    assert starts == [3, 2] and ends == [6, 5]
    rows, starts, ends = continuation_spans("schema", [[bos, 1, 8, 9], [bos, 2, 1, 8, 9]])  # a shared word before the suffix
    assert (starts, ends) == ([1, 2], [4, 5])  # "1 8 9" is common; nanochat's suffix rule takes all of it
    # LM: the prompt without the continuation is a prefix; one row, scored from its end
    rows, starts, ends = continuation_spans("language_modeling", [[bos, 4, 5], [bos, 4, 5, 6, 7]])
    assert rows == [[bos, 4, 5, 6, 7]] and starts == [3] and ends == [5]
    # ... and if a merge crossed the boundary, from where the two tokenizations part
    rows, starts, ends = continuation_spans("language_modeling", [[bos, 4, 5], [bos, 4, 12, 7]])
    assert starts == [2] and ends == [4]


def test_crop_left_keeps_the_end_and_shifts_spans():
    rows, starts, ends = crop_left([list(range(10)), list(range(4))], [7, 2], [10, 4], 6)
    assert rows == [[4, 5, 6, 7, 8, 9], [0, 1, 2, 3]] and starts == [3, 2] and ends == [6, 4]
    assert crop_left([list(range(10))], [2], [10], 6)[1] == [1]  # a continuation longer than the context keeps one token of context
    assert crop_left([[1, 2, 3]], [1], [3], None) == ([[1, 2, 3]], [1], [3])


def test_prompts_longer_than_the_context_are_cropped(tmp_path):
    tasks = {"lm_long": ({"dataset_uri": "lm_long.jsonl", "num_fewshot": [2], "icl_task_type": "language_modeling"}, lm_rows(5, long=True), 0),
             "mc4": TASKS["mc4"]}
    store = open_store(f"file://{tmp_path}/s")
    put_bundle(store, tasks)
    tok = WordTokenizer(all_texts(tasks))
    model = Oracle(tok, favoured(tasks), limit=12)
    assert context_length(model) == 12
    assert min(len(tok.encode(r["context"])) for r in lm_rows(5, long=True)) > 30
    out = evaluate_core(model, tok, store, "cpu")
    assert out["tasks"]["lm_long"]["accuracy"] == 1.0 and out["tasks"]["mc4"]["accuracy"] == 1.0
    # the same model without advertising its limit is fed whole prompts and refuses them, unless told
    quiet = Oracle(tok, favoured(tasks), limit=12, advertise=False)
    with pytest.raises(IndexError):
        evaluate_core(quiet, tok, store, "cpu")
    assert evaluate_core(quiet, tok, store, "cpu", max_len=12)["core"] == 1.0


# ----------------------------------------------------------------------------- faithfulness with a real tokenizer and GPT

def reference_example(model, tok, task, idx):
    """nanochat's evaluate_example, one example per forward, jinja prompts (the reference to match)."""
    from jinja2 import Template
    data, item = task.rows, task.rows[idx]
    shots = [data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], task.num_fewshot)] if task.num_fewshot else []
    ctx = {"fewshot_examples": shots, "continuation_delimiter": task.delimiter, "item": item}
    bos = tok.get_bos_token_id()
    if task.task_type == "multiple_choice":
        t = tok.encode([Template(JINJA_MC).render(choice=c, **ctx) for c in item["choices"]], prepend=bos)
        s = next((i for i in range(min(map(len, t))) if len({x[i] for x in t}) > 1), min(map(len, t)))
        starts, ends = [s] * len(t), [len(x) for x in t]
    elif task.task_type == "schema":
        t = tok.encode([Template(JINJA_SCHEMA).render(context=c, **ctx) for c in item["context_options"]], prepend=bos)
        m = min(map(len, t))
        s = next((i for i in range(m) if len({x[-1 - i] for x in t}) > 1), m)
        ends = [len(x) for x in t]
        starts = [e - s for e in ends]
    else:
        a, b = tok.encode([Template(JINJA_LM).render(include_continuation=False, **ctx).strip(),
                           Template(JINJA_LM).render(include_continuation=True, **ctx)], prepend=bos)
        assert b[:len(a)] == a
        t, starts, ends = [b], [len(a)], [len(b)]
    ids = torch.full((len(t), max(map(len, t))), bos)
    for i, x in enumerate(t):
        ids[i, :len(x)] = torch.tensor(x)
    with torch.no_grad():
        logits = model(ids)
    losses = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), torch.roll(ids, -1, 1).view(-1), reduction="none").view(ids.shape)
    if task.task_type == "language_modeling":
        return bool(torch.all(logits.argmax(-1)[0, starts[0] - 1:ends[0] - 1] == ids[0, starts[0]:ends[0]]))
    means = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return means.index(min(means)) == item["gold"]


@pytest.fixture(scope="module")
def bpe_world(tmp_path_factory):
    """A real (rustbpe) tokenizer and a random-init GPT trained for 40 tokens, so few-shot prompts run past it."""
    from tests.fixtures import make_base_checkpoint, make_tokenizer
    store = open_store(f"file://{tmp_path_factory.mktemp('bpe')}/store")
    tok = make_tokenizer(store)
    model = make_base_checkpoint(store, tok, depth=2, seq_len=40, head_dim=32)
    with torch.no_grad():  # the init's near-zero lm_head makes every token equally likely: give it opinions
        model.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    model.eval()
    put_bundle(store)
    return store, tok, model


def test_matches_nanochats_per_example_reference(bpe_world):
    """Every example's verdict equals the unbatched reference's; the batched counts agree too."""
    store, tok, model = bpe_world
    assert context_length(model) is None  # rotary: whole prompts, longer than its 40-token training context
    counts = {}
    for task in load_bundle(store):
        want = {i: reference_example(model, tok, task, i) for i in range(task.num_eval)}
        got = {}
        for batch in batches(prepare(task, list(range(task.num_eval)), tok, context_length(model)), BATCH_TOKENS):
            got.update({ex.idx: ok for ex, ok in zip(batch, score_batch(model, batch, tok.get_bos_token_id(), "cpu"))})
        assert got == want, task.label
        counts[task.label] = sum(want.values())
    out = evaluate_core(model, tok, store, "cpu")
    assert {k: v["correct"] for k, v in out["tasks"].items()} == counts
    assert 0 < sum(counts.values()) < sum(len(rows) for _, rows, _ in TASKS.values())  # a random model is no oracle


# ----------------------------------------------------------------------------- distributed

def test_two_ranks_give_the_same_core_as_one(store, tok, tmp_path):
    single = evaluate_core(Oracle(tok, favoured(wrong=WRONG)), tok, store, "cpu")
    out = tmp_path / "dist.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "dist_core_check.py"), store.root, str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["core"] == single["core"]
    for label in TASKS:
        assert got["tasks"][label]["examples"] == len(TASKS[label][1])  # counts summed, not averaged
        assert got["tasks"][label]["correct"] == single["tasks"][label]["correct"], label
        # each rank scored only its strided half
        assert got["rank_examples"][label] == [len(range(r, len(TASKS[label][1]), 2)) for r in range(2)]


# ----------------------------------------------------------------------------- the bundle in the store

def test_missing_bundle_names_the_command(tmp_path, tok):
    empty = open_store(f"file://{tmp_path}/empty")
    assert not bundle_available(empty)
    with pytest.raises(BundleMissing, match=re.escape(f"nanochat stage eval_bundle --store {empty.root}")):
        evaluate_core(Oracle(tok, []), tok, empty, "cpu")


def test_tampered_bundle_file_is_refused(store):
    store.put_bytes(f"{BUNDLE_PREFIX}/eval_data/language_understanding/lm.jsonl", b'{"context": "x", "continuation": "y"}\n')
    with pytest.raises(Exception, match="digest mismatch"):
        load_bundle(store)


class BundleServer:
    """HTTP on 127.0.0.1 serving {path: bytes}, with Range support; `failures[path]` statuses are sent
    first; `cut[path] = n` sends only the first n bytes of the next full response then drops it."""

    def __init__(self):
        self.files, self.failures, self.cut, self.requests = {}, {}, {}, []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                srv.requests.append((self.path, self.headers.get("Range")))
                pending = srv.failures.get(self.path)
                if pending:
                    self.send_error(pending.pop(0))
                    return
                if self.path not in srv.files:
                    self.send_error(404)
                    return
                body, status, start = srv.files[self.path], 200, 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m:
                    start, status = int(m.group(1)), 206
                    if start >= len(body):
                        self.send_error(416)
                        return
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                n = srv.cut.pop(self.path, None)
                self.wfile.write(body[start:start + n] if n is not None else body[start:])
                if n is not None:
                    self.wfile.flush()
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = BundleServer()
    s.files["/eval_bundle.zip"] = bundle_zip()
    yield s
    s.close()


def test_download_unzips_into_the_store_with_digests(server, tmp_path, tok):
    store = open_store(f"file://{tmp_path}/s")
    zip_bytes = server.files["/eval_bundle.zip"]
    doc = download_eval_bundle(store, server.url + "/eval_bundle.zip", sha256=sha256_bytes(zip_bytes), backoff=0.01)
    assert not doc["skipped"] and doc["meta"] == {"url": server.url + "/eval_bundle.zip", "zip_sha256": sha256_bytes(zip_bytes), "zip_size": len(zip_bytes)}
    files = bundle_files()
    assert set(doc["files"]) == set(files)  # the eval_bundle/ root is stripped, __MACOSX dropped
    for name, data in files.items():
        assert store.get_bytes(f"{BUNDLE_PREFIX}/{name}") == data and doc["files"][name]["sha256"] == sha256_bytes(data)
    assert bundle_available(store)
    assert evaluate_core(Oracle(tok, favoured()), tok, store, "cpu")["core"] == 1.0
    # already there: no request at all
    n = len(server.requests)
    assert download_eval_bundle(store, server.url + "/eval_bundle.zip")["skipped"] and len(server.requests) == n
    assert not list((tmp_path / "nanochat-base" / "downloads").glob("*"))  # the zip is not kept


def test_download_retries_5xx_and_resumes_a_cut_transfer(server, tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    zip_bytes = server.files["/eval_bundle.zip"]
    server.failures["/eval_bundle.zip"] = [500, 503]
    server.cut["/eval_bundle.zip"] = len(zip_bytes) // 2
    doc = download_eval_bundle(store, server.url + "/eval_bundle.zip", backoff=0.01)
    assert doc["meta"]["zip_sha256"] == sha256_bytes(zip_bytes)
    ranges = [r for _, r in server.requests]
    assert ranges == [None, None, None, f"bytes={len(zip_bytes) // 2}-"]  # 500, 503, cut, then the rest only


def test_download_resumes_a_partial_file_from_an_earlier_run(server, tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    url = server.url + "/eval_bundle.zip"
    zip_bytes = server.files[url.removeprefix(server.url)]
    cache = tmp_path / "cache"
    cache.mkdir()
    part = cache / f"eval_bundle-{hashlib.sha256(url.encode()).hexdigest()[:12]}.zip.part"
    part.write_bytes(zip_bytes[:1000])
    download_eval_bundle(store, url, cache_dir=cache)
    assert server.requests == [("/eval_bundle.zip", "bytes=1000-")]
    assert store.get_json(f"{BUNDLE_PREFIX}/{MANIFEST}")["meta"]["zip_sha256"] == sha256_bytes(zip_bytes)


def test_download_failures_are_clear(server, tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    with pytest.raises(EvalBundleError, match=r"404.*/nope\.zip"):
        download_eval_bundle(store, server.url + "/nope.zip", backoff=0.01)
    assert Counter(p for p, _ in server.requests)["/nope.zip"] == 1  # a 404 is not retried
    server.failures["/eval_bundle.zip"] = [500] * 10
    with pytest.raises(EvalBundleError, match="after 3 attempts"):
        download_eval_bundle(store, server.url + "/eval_bundle.zip", retries=2, backoff=0.01)
    server.failures.clear()
    with pytest.raises(EvalBundleError, match="sha256 mismatch"):
        download_eval_bundle(store, server.url + "/eval_bundle.zip", sha256="0" * 64)
    server.files["/junk.zip"] = b"this is not a zip file" * 10
    with pytest.raises(EvalBundleError, match="not a valid zip"):
        download_eval_bundle(store, server.url + "/junk.zip")
    server.files["/other.zip"] = zip_of({"readme.txt": b"hi"})
    with pytest.raises(EvalBundleError, match="no core.yaml"):
        download_eval_bundle(store, server.url + "/other.zip")
    assert not bundle_available(store)


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return buf.getvalue()


def test_eval_bundle_stage(server, store_uri, capsys):
    from nanochat.stages import eval_bundle
    argv = [f"--store={store_uri}", f"--url={server.url}/eval_bundle.zip"]
    assert stage_main("eval_bundle", eval_bundle.Config, eval_bundle.run, argv) == 0
    store = open_store(store_uri)
    done = store.get_json("stages/eval_bundle/done.json")
    assert done["metrics"]["tasks"] == len(TASKS) and done["metrics"]["downloaded"] is True
    assert done["metrics"]["zip_sha256"] == sha256_bytes(server.files["/eval_bundle.zip"])
    assert f"{BUNDLE_PREFIX}/{MANIFEST}" in done["artifacts"]
    report = store.get_bytes("report/eval_bundle.md").decode()
    assert "CORE eval bundle" in report and all(label in report for label in TASKS)
    assert [t.label for t in load_bundle(store)] == list(TASKS)
    n = len(server.requests)
    assert stage_main("eval_bundle", eval_bundle.Config, eval_bundle.run, argv) == 0 and len(server.requests) == n  # done: skipped
    assert stage_main("eval_bundle", eval_bundle.Config, eval_bundle.run, [*argv, "--sha256=xyz"]) == 2
    assert "--sha256" in capsys.readouterr().err
    assert stage_main("eval_bundle", eval_bundle.Config, eval_bundle.run, [f"--store={store_uri}", f"--url={server.url}/gone.zip", "--force"]) == 1
    assert "404" in capsys.readouterr().err


# ----------------------------------------------------------------------------- base_eval reports CORE

def test_base_eval_reports_core(bpe_world, tmp_path):
    from nanochat.stages import base_eval
    from nanochat.dataset import build_embedded
    from tests.fixtures import make_base_checkpoint
    _, tok, _ = bpe_world
    uri = f"file://{tmp_path}/run"
    store = open_store(uri)
    tok.save(store)
    make_base_checkpoint(store, tok, depth=2, seq_len=64, head_dim=32)
    build_embedded(store, max_chars=40_000, shard_chars=10_000, row_group_rows=8)
    put_bundle(store)
    argv = [f"--store={uri}", "--core=true", "--device-batch-size=2", "--eval-tokens=256", "--sample-tokens=4", "--max-per-task=5"]
    assert stage_main("base_eval", base_eval.Config, base_eval.run, argv) == 0
    done = store.get_json("stages/base_eval/done.json")
    core = done["metrics"]["core"]
    assert isinstance(core, float) and -2 < core < 1
    assert done["card"]["values"]["CORE"] == core
    per_task = [done["metrics"][f"core_centered_{label}"] for label in TASKS]
    assert sum(per_task) / len(per_task) == pytest.approx(core)
    report = store.get_bytes("report/base_eval.md").decode()
    assert "CORE" in report and all(label in report for label in TASKS)
    # the same number as evaluate_core on the same checkpoint
    from nanochat.checkpoint import load_model
    model, _, _ = load_model(store, "base", "cpu")
    assert evaluate_core(model, tok, store, "cpu", max_per_task=5)["core"] == pytest.approx(core)


def test_base_eval_core_true_without_bundle_fails_with_the_command(bpe_world, tmp_path, capsys):
    from nanochat.stages import base_eval
    from tests.fixtures import make_base_checkpoint
    _, tok, _ = bpe_world
    uri = f"file://{tmp_path}/run"
    store = open_store(uri)
    tok.save(store)
    make_base_checkpoint(store, tok, depth=1, seq_len=32, head_dim=32)
    argv = [f"--store={uri}", "--core=true", "--device-batch-size=2", "--eval-tokens=64", "--sample-tokens=2"]
    assert stage_main("base_eval", base_eval.Config, base_eval.run, argv) == 1
    assert "nanochat stage eval_bundle --store" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a local HuggingFace GPT-2

def write_tiny_gpt2(path: Path, vocab_size: int, n_positions: int = 32, seed: int = 0):
    """config.json + model.safetensors shaped like the Hub's GPT2LMHeadModel export (random weights)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    d, layers = 32, 2
    t = {"transformer.wte.weight": torch.randn(vocab_size, d, generator=g) * 0.5,
         "transformer.wpe.weight": torch.randn(n_positions, d, generator=g) * 0.1,
         "transformer.ln_f.weight": 1 + 0.1 * torch.randn(d, generator=g), "transformer.ln_f.bias": 0.1 * torch.randn(d, generator=g)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        for name, shape in [("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                            ("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,)), ("attn.c_proj.weight", (d, d)),
                            ("attn.c_proj.bias", (d,)), ("mlp.c_fc.weight", (d, 4 * d)), ("mlp.c_fc.bias", (4 * d,)),
                            ("mlp.c_proj.weight", (4 * d, d)), ("mlp.c_proj.bias", (d,))]:
            t[p + name] = (1.0 if name.startswith("ln") and name.endswith("weight") else 0.0) + 0.2 * torch.randn(*shape, generator=g)
        t[p + "attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)  # old mask buffer
    t["lm_head.weight"] = t["transformer.wte.weight"].clone()
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size,
                                                  "n_positions": n_positions, "n_ctx": n_positions, "n_embd": d, "n_layer": layers,
                                                  "n_head": 4, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}))
    return t


def write_gpt2_vocab(path: Path, words: list[str]) -> dict[str, int]:
    """vocab.json + merges.txt in GPT-2's byte-level format: 256 byte symbols, merges that spell ' word'
    for each word, then <|endoftext|> last (as in GPT-2)."""
    from nanochat.tokenizer import _byte_level_decoder
    chars = sorted(_byte_level_decoder(), key=lambda c: _byte_level_decoder()[c])
    vocab, merges = {c: i for i, c in enumerate(chars)}, []
    for w in words:
        cur = "Ġ"
        for ch in w:
            if cur + ch not in vocab:
                merges.append(f"{cur} {ch}")
                vocab[cur + ch] = len(vocab)
            cur += ch
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def reference_gpt2(t: dict, idx: torch.Tensor, n_head: int = 4) -> torch.Tensor:
    """GPT-2's forward written out longhand (explicit masked softmax, tanh-GELU formula)."""
    def ln(x, w, b):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    T = idx.size(1)
    x = t["transformer.wte.weight"][idx] + t["transformer.wpe.weight"][:T]
    layers = len({k.split(".")[2] for k in t if k.startswith("transformer.h.")})
    for i in range(layers):
        p = lambda n: t[f"transformer.h.{i}.{n}"]  # noqa: E731
        h = ln(x, p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = (h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")).chunk(3, dim=-1)
        heads = []
        for j in range(n_head):
            sl = slice(j * q.size(-1) // n_head, (j + 1) * q.size(-1) // n_head)
            att = q[..., sl] @ k[..., sl].transpose(-1, -2) / (q.size(-1) // n_head) ** 0.5
            att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
            heads.append(att @ v[..., sl])
        x = x + torch.cat(heads, -1) @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = ln(x, p("ln_2.weight"), p("ln_2.bias"))
        x = x + gelu(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return ln(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"]) @ t["lm_head.weight"].t()


def test_hf_gpt2_tokenizer_from_vocab_merges_and_tokenizer_json(tmp_path):
    from nanochat.hf_gpt2 import load_gpt2_tokenizer
    vocab = write_gpt2_vocab(tmp_path / "gpt2", ["the", "cat", "sat"])
    tok = load_gpt2_tokenizer(tmp_path / "gpt2")
    ids = tok.encode("the cat sat on the mat")
    assert tok.decode(ids) == "the cat sat on the mat"
    assert vocab["Ġcat"] in ids and vocab["Ġsat"] in ids and ids.count(vocab["Ġthe"]) == 1  # the first "the" has no space
    assert tok.get_bos_token_id() == vocab["<|endoftext|>"] == len(vocab) - 1
    assert tok.encode(["a", "b"], prepend=tok.get_bos_token_id()) == [[len(vocab) - 1, vocab["a"]], [len(vocab) - 1, vocab["b"]]]
    assert tok.encode("<|endoftext|>") != [tok.get_bos_token_id()]  # special text in data stays text
    # the same tokenizer as a tokenizer.json (how most Hub folders ship it) encodes identically
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text(tok.tokenizer.to_str())
    tok2 = load_gpt2_tokenizer(tmp_path / "json")
    assert tok2.encode("the cat sat on the mat") == ids and tok2.get_bos_token_id() == tok.get_bos_token_id()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_gpt2_tokenizer(tmp_path / "missing")


def test_hf_gpt2_matches_a_longhand_forward_and_is_scored_by_core(tmp_path):
    from nanochat.hf_gpt2 import load_hf_gpt2
    words = sorted({w.strip(".?:,") for t in all_texts() for w in t.split()})
    vocab = write_gpt2_vocab(tmp_path / "gpt2", words)
    tensors = write_tiny_gpt2(tmp_path / "gpt2", len(vocab), n_positions=32)
    model, tok = load_hf_gpt2(tmp_path / "gpt2")
    idx = torch.randint(0, len(vocab), (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(idx), reference_gpt2(tensors, idx), atol=1e-4, rtol=1e-4)
    assert model.max_seq_len == 32 and context_length(model) == 32
    with pytest.raises(ValueError, match="32 positions"):
        model(torch.zeros(1, 33, dtype=torch.long))
    store = open_store(f"file://{tmp_path}/s")
    put_bundle(store)
    out = evaluate_core(model, tok, store, "cpu")  # 3-shot MC prompts exceed 32 tokens: cropped
    assert set(out["tasks"]) == set(TASKS) and all(0 <= r["accuracy"] <= 1 for r in out["tasks"].values())
    # the module-level entry point prints the same CORE
    from nanochat import hf_gpt2
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "nanochat.hf_gpt2", "--path", str(tmp_path / "gpt2"), "--store", store.root, "--device", "cpu"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"CORE {out['core']:.4f}" in proc.stdout
    assert hf_gpt2.GPT2Config.from_json({"n_layer": 1}).n_layer == 1


def test_hf_gpt2_missing_files_are_named(tmp_path):
    from nanochat.hf_gpt2 import load_gpt2_model
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2_model(tmp_path)
