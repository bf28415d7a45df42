"""nanochat.tasks: conversation rendering from real-format fixtures, grading, slicing, mixtures,
the registry, and the synthetic tasks of the tiny profile."""
import io
import json
import zipfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import calculator
from nanochat.store import open_store
from nanochat.tasks import (Task, TaskDataMissing, TaskMixture, TaskSequence, check_conversation, conversation_to_text,
                            extract_answer, get_task, list_tasks, render_mc, synthetic_documents)
from nanochat.tasks.gsm8k import answer_to_parts
from nanochat.tasks.synthetic import (SYNTHETIC_TASKS, SyntheticArithmetic, SyntheticChat, SyntheticChoiceDrill,
                                      SyntheticMultipleChoice, SyntheticMultipleChoiceLetter, SyntheticSpelling, split_of)

# --- fixtures in the real formats (HF parquet exports, the original JSONL/csv files) ---------

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "A farm has 1200 cows and buys 34 more. How many cows are there?",
     "answer": "There are 1200+34 = <<1200+34=1234>>1234 cows.\n#### 1,234"},
]
MMLU_ROWS = [
    {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"], "answer": 1},
    {"question": "Find the characteristic of the ring 2Z.", "subject": "abstract_algebra", "choices": ["0", "3", "12", "30"], "answer": 0},
    {"question": "Which of these is a bone?", "subject": "anatomy", "choices": ["femur", "aorta", "liver", "retina"], "answer": 0},
]
MMLU_CSV = ('Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.,0,1,2,3,B\n'
            '"Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.","True, True","False, False","True, False","False, True",B\n'
            'Find the characteristic of the ring 2Z.,0,3,12,30,A\n')
ARC_ROWS = [
    {"id": "Mercury_1", "question": "Which gas do plants take in for photosynthesis?",
     "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "Mercury_2", "question": "What is the boiling point of water at sea level?",
     "choices": {"text": ["50 C", "100 C", "150 C"], "label": ["1", "2", "3"]}, "answerKey": "2"},
]
SMOLTALK_ROWS = [
    {"messages": [{"content": "You are terse.", "role": "system"}, {"content": "Hi", "role": "user"}, {"content": "Hello.", "role": "assistant"}], "source": "everyday-conversations"},
    {"messages": [{"content": "Name a color.", "role": "user"}, {"content": "Blue.", "role": "assistant"},
                  {"content": "Another?", "role": "user"}, {"content": "Red.", "role": "assistant"}], "source": "smol-magpie-ultra-short"},
]
HUMANEVAL_ROWS = [{
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    """ Check if any two numbers are closer than threshold. """\n',
    "canonical_solution": "    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0], 0.3) == True\n    assert candidate([1.0, 2.0, 3.0], 0.5) == False\n",
    "entry_point": "has_close_elements",
}]
IDENTITY_LINES = [
    [{"role": "user", "content": "hey, what's nanochat"}, {"role": "assistant", "content": "I'm nanochat, a small LLM."}],
    [{"role": "user", "content": "who made you?"}, {"role": "assistant", "content": "Andrej Karpathy."},
     {"role": "user", "content": "cool"}, {"role": "assistant", "content": "Thanks!"}],
]
WORDS = ["a", "aa", "apple", "banana", "strawberry", "mississippi", "zebra", "letter"]


def put_parquet(store, key, rows, schema=None):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    store.put_bytes(key, buf.getvalue())


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path}/store")
    put_parquet(s, "data/tasks/gsm8k/main/train-00000-of-00001.parquet", GSM8K_ROWS)
    put_parquet(s, "data/tasks/mmlu/all/test-00000-of-00001.parquet", MMLU_ROWS)
    put_parquet(s, "data/tasks/mmlu/auxiliary_train/train-00000-of-00001.parquet", [{"train": r} for r in MMLU_ROWS])
    put_parquet(s, "data/tasks/arc/ARC-Easy/test-00000-of-00001.parquet", ARC_ROWS)
    put_parquet(s, "data/tasks/smoltalk/data/train-00000-of-00001.parquet", SMOLTALK_ROWS)
    put_parquet(s, "data/tasks/humaneval/openai_humaneval/test-00000-of-00001.parquet", HUMANEVAL_ROWS)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("words_alpha.txt", "\r\n".join(WORDS) + "\r\n")  # the real file's CRLF endings
    s.put_bytes("data/tasks/spellingbee/words_alpha.zip", zbuf.getvalue())
    s.put_bytes("data/tasks/identity/identity_conversations.jsonl", "".join(json.dumps(m) + "\n" for m in IDENTITY_LINES).encode())
    return s


def all_examples(task):
    return [task[i] for i in range(len(task))]


# --- GSM8K ---------------------------------------------------------------------------------

def test_gsm8k_annotations_become_tool_parts():
    parts = answer_to_parts(GSM8K_ROWS[0]["answer"])
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # the calculator reproduces every annotated result
    for call, output in zip(parts[1::3], parts[2::3]):
        assert calculator.evaluate(call["text"]) == output["text"]


def test_gsm8k_conversations_and_grading(store):
    task = get_task("gsm8k", store, split="train")
    assert len(task) == 3 and task.eval_type == "generative"
    convs = all_examples(task)
    for conv in convs:
        check_conversation(conv)
        user, assistant = conv["messages"]
        assert user["role"] == "user" and isinstance(user["content"], str)
        assert assistant["content"][-1]["text"].rstrip().split("#### ")[-1]
    by_question = {c["messages"][0]["content"]: c for c in convs}
    weng = by_question[GSM8K_ROWS[1]["question"]]
    assert [p["type"] for p in weng["messages"][1]["content"]].count("python") == 2
    assert task.evaluate(weng, "She earns 0.2 per minute, so 10 dollars.\n#### 10") == 1
    assert task.evaluate(weng, "#### 11") == 0
    assert task.evaluate(weng, "The answer is 10") == 0  # no final-answer marker
    cows = by_question[GSM8K_ROWS[2]["question"]]
    assert task.evaluate(cows, "#### 1234") == 1 and task.evaluate(cows, "#### 1,234") == 1
    assert task.reward(cows, "#### 1234") == 1.0 and task.reward(cows, "#### 12") == 0.0


def test_gsm8k_from_jsonl_matches_parquet(tmp_path, store):
    other = open_store(f"file://{tmp_path}/jsonl")
    other.put_bytes("data/tasks/gsm8k/train.jsonl", "".join(json.dumps(r) + "\n" for r in GSM8K_ROWS).encode())
    a, b = get_task("gsm8k", store, split="train"), get_task("gsm8k", other, split="train")
    assert all_examples(a) == all_examples(b)


def test_extract_answer():
    assert extract_answer("so #### 1,234.") == "1234"
    assert extract_answer("#### -7") == "-7"
    assert extract_answer("no marker 42") is None


# --- multiple choice -------------------------------------------------------------------------

def test_render_mc_format():
    text = render_mc("What is 2+2?", ["A", "B"], ["4", "5"])
    assert text == "Multiple Choice question: What is 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer."


def test_mmlu_parquet(store):
    task = get_task("MMLU", store, split="test")
    assert task.eval_type == "categorical" and task.baseline == 0.25 and len(task) == 3
    convs = all_examples(task)
    field = {c["messages"][0]["content"].split("\n")[0]: c for c in convs}
    ring = field["Multiple Choice question: Find the characteristic of the ring 2Z."]
    assert ring["letters"] == ["A", "B", "C", "D"] and ring["subject"] == "abstract_algebra"
    assert ring["messages"][0]["content"] == render_mc("Find the characteristic of the ring 2Z.", "ABCD", ["0", "3", "12", "30"])
    assert ring["messages"][1] == {"role": "assistant", "content": "A"}
    assert task.evaluate(ring, "A") == 1 and task.evaluate(ring, "B") == 0
    aux = get_task("mmlu_aux", store)  # split defaults to train; rows wrapped in a "train" struct
    assert sorted(c["messages"][1]["content"] for c in all_examples(aux)) == sorted(c["messages"][1]["content"] for c in convs)


def test_mmlu_from_original_csvs(tmp_path):
    s = open_store(f"file://{tmp_path}/csv")
    s.put_bytes("data/tasks/mmlu/dev/abstract_algebra_dev.csv", MMLU_CSV.encode())
    task = get_task("mmlu", s, split="dev")
    convs = all_examples(task)
    assert len(convs) == 3 and {c["subject"] for c in convs} == {"abstract_algebra"}
    statement = next(c for c in convs if "Statement 1" in c["messages"][0]["content"])
    assert "- True, True=A\n- False, False=B" in statement["messages"][0]["content"]
    assert statement["messages"][1]["content"] == "B"


def test_arc_letters_come_from_the_data(store):
    task = get_task("ARC-Easy", store, split="test")
    convs = {c["messages"][0]["content"].split("\n")[0]: c for c in all_examples(task)}
    gas = convs["Multiple Choice question: Which gas do plants take in for photosynthesis?"]
    assert gas["letters"] == ["A", "B", "C", "D"] and gas["messages"][1]["content"] == "B"
    water = convs["Multiple Choice question: What is the boiling point of water at sea level?"]
    assert water["letters"] == ["1", "2", "3"] and "- 100 C=2\n" in water["messages"][0]["content"]
    assert task.evaluate(water, "2") == 1 and task.evaluate(water, "1") == 0
    with pytest.raises(TaskDataMissing, match="arc_challenge"):
        get_task("arc_challenge", store, split="test")


# --- conversations ----------------------------------------------------------------------------

def test_smoltalk(store):
    convs = all_examples(get_task("smoltalk", store, split="train"))
    roles = sorted(tuple(m["role"] for m in c["messages"]) for c in convs)
    assert roles == [("system", "user", "assistant"), ("user", "assistant", "user", "assistant")]


def test_identity_and_customjson(store, tmp_path):
    task = get_task("identity", store)
    assert [c["messages"] for c in all_examples(task)] == IDENTITY_LINES
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(IDENTITY_LINES[0]) + "\n\n" + json.dumps({"messages": IDENTITY_LINES[1]}) + "\n")
    assert len(get_task("customjson", path=str(path))) == 2
    path.write_text(json.dumps([{"role": "assistant", "content": "hi"}]) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        get_task("customjson", path=str(path))


def test_check_conversation_rejects_bad_shapes():
    check_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]})
    bad = [
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts only for the assistant"}]}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
    ]
    for conv in bad:
        with pytest.raises(ValueError):
            check_conversation(conv)


# --- HumanEval and SpellingBee -----------------------------------------------------------------

def test_humaneval_runs_completions_in_the_sandbox(store):
    task = get_task("humaneval", store)
    conv = task[0]
    assert conv["entry_point"] == "has_close_elements" and task.eval_type == "generative"
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1  # prompt + canonical solution
    body = HUMANEVAL_ROWS[0]["canonical_solution"]
    fenced = f"Here you go:\n```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n{body}```\nDone."
    assert task.evaluate(conv, fenced) == 1  # code block extracted, typing import re-added
    wrong = "def has_close_elements(numbers, threshold):\n    return False\n"
    assert task.evaluate(conv, wrong) == 0
    task.timeout = 1.0
    assert task.evaluate(conv, "def has_close_elements(numbers, threshold):\n    while True: pass\n") == 0


def test_spellingbee_from_zipped_word_list(store):
    task = get_task("spellingbee", store, split="train", size=40)
    test = get_task("spellingbee", store, split="test", size=40)
    assert all_examples(task) == all_examples(get_task("spellingbee", store, split="train", size=40))
    assert [c["messages"][0]["content"] for c in all_examples(task)] != [c["messages"][0]["content"] for c in all_examples(test)]
    for conv in all_examples(task):
        parts = conv["messages"][1]["content"]
        call, output = [p for p in parts if p["type"] == "python"][0], [p for p in parts if p["type"] == "python_output"][0]
        word, letter = call["text"].split("'")[1], call["text"].split("'")[3]
        assert word in WORDS and word in conv["messages"][0]["content"]
        assert output["text"] == str(word.count(letter)) == calculator.evaluate(call["text"])
        assert task.evaluate(conv, f"#### {word.count(letter)}") == 1
        assert task.evaluate(conv, f"#### {word.count(letter) + 1}") == 0
    simple = get_task("simple_spelling", store, size=5)[0]["messages"]
    word = simple[0]["content"].removeprefix("Spell the word: ")
    assert simple[1]["content"] == f"{word}:{','.join(word)}"


def test_missing_data_names_the_fix(tmp_path):
    empty = open_store(f"file://{tmp_path}/empty")
    with pytest.raises(TaskDataMissing, match=r"nanochat\.tasks\.download .*gsm8k"):
        get_task("gsm8k", empty, split="train")


# --- framework: slicing, mixtures, sequences, registry -------------------------------------------

class Numbers(Task):
    def __init__(self, tag, n, **kwargs):
        super().__init__(**kwargs)
        self.tag, self.n = tag, n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"}]}


def ids(task):
    return [c["messages"][0]["content"] for c in task]


def test_slicing():
    task = Numbers("x", 10)
    assert ids(task[2:9:3]) == ["x2", "x5", "x8"] and len(task[2:9:3]) == 3
    assert ids(Numbers("x", 10, start=2, stop=9, step=3)) == ["x2", "x5", "x8"]
    assert ids(task[7:]) == ["x7", "x8", "x9"] and ids(task[:0]) == []
    assert ids(task[1:][::4]) == ["x1", "x5", "x9"]  # a slice of a slice
    assert task[-1]["messages"][0]["content"] == "x9"
    assert len(Numbers("x", 10, stop=100)) == 10  # stop beyond the data is capped
    with pytest.raises(IndexError):
        task[10]
    with pytest.raises(ValueError):
        Numbers("x", 10, step=0)


def test_mixture_is_deterministic_and_covers_everything():
    a, b = Numbers("a", 30), Numbers("b", 5)
    mix = TaskMixture([a, b, b], seed=7)  # b listed twice: oversampled 2x
    order = ids(mix)
    assert order == ids(TaskMixture([a, b, b], seed=7))
    assert order != ids(TaskMixture([a, b, b], seed=8))
    counts = Counter(order)
    assert len(order) == 40 and all(counts[f"a{i}"] == 1 for i in range(30)) and all(counts[f"b{i}"] == 2 for i in range(5))
    assert order[:10] != sorted(order[:10]) and {x[0] for x in order[:20]} == {"a", "b"}  # tasks interleaved
    assert ids(mix[5:8]) == order[5:8] and mix.source(0) in (a, b)


def test_sequence_keeps_order():
    seq = TaskSequence([Numbers("a", 2), Numbers("b", 3)])
    assert ids(seq) == ["a0", "a1", "b0", "b1", "b2"] and ids(seq[1:4]) == ["a1", "b0", "b1"]


def test_registry():
    assert {"gsm8k", "mmlu", "mmlu_aux", "arc_easy", "arc_challenge", "smoltalk", "humaneval", "spellingbee", "identity",
            "synthetic_arithmetic", "synthetic_spelling", "synthetic_mc", "synthetic_chat"} <= set(list_tasks())
    assert isinstance(get_task("Synthetic-Arithmetic", split="val"), SyntheticArithmetic)
    assert isinstance(get_task("synthetic_multiple_choice", split="test"), SyntheticMultipleChoice)
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nonexistent")


# --- synthetic tasks --------------------------------------------------------------------------

SYNTHETIC = [SyntheticArithmetic, SyntheticSpelling, SyntheticMultipleChoice, SyntheticMultipleChoiceLetter, SyntheticChat,
             SyntheticChoiceDrill]
TOOL_MARKERS = {"python": ("<|python_start|>", "<|python_end|>"), "python_output": ("<|output_start|>", "<|output_end|>"),
                "text": ("", "")}


def engine_text(content) -> str:
    """An assistant message as the engine's decoded completion writes it (tool blocks in special tokens)."""
    if isinstance(content, str):
        return content
    return "".join(TOOL_MARKERS[p["type"]][0] + p["text"] + TOOL_MARKERS[p["type"]][1] for p in content)


@pytest.mark.parametrize("cls", SYNTHETIC)
def test_synthetic_deterministic_and_well_formed(cls):
    a, b = cls(split="train", size=100, seed=3), cls(split="train", size=100, seed=3)
    assert all_examples(a) == all_examples(b)
    assert all_examples(a) != all_examples(cls(split="train", size=100, seed=4))
    for conv in all_examples(a):
        check_conversation(conv)
        assert conv["messages"][-1]["role"] == "assistant"
        # the reference answer grades as correct, as the engine's completion and as plain text
        assert a.evaluate(conv, engine_text(conv["messages"][-1]["content"])) == 1
        if cls not in (SyntheticMultipleChoice, SyntheticChoiceDrill):  # those read the letter after the tool
            completion = conversation_to_text({"messages": [conv["messages"][-1]]}).removeprefix("Assistant: ")
            assert a.evaluate(conv, completion) == 1


@pytest.mark.parametrize("cls", SYNTHETIC)
def test_synthetic_splits_are_disjoint(cls):
    keys = {split: {cls(split=split, size=300).key_of(i) for i in range(300)} for split in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    problem_set = cls(split="train").problem_set
    assert all(split_of(f"{problem_set}:{k}") == split for split, ks in keys.items() for k in ks)
    assert min(len(k) for k in keys.values()) >= 25  # enough distinct problems per split


@pytest.mark.parametrize("cls", [SyntheticArithmetic, SyntheticSpelling])
def test_synthetic_tool_calls_agree_with_the_calculator(cls):
    task = cls(split="train", size=300)
    answers = Counter()
    for conv in all_examples(task):
        parts = conv["messages"][1]["content"]
        calls = [(p, q) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert calls and all(q["type"] == "python_output" for _, q in calls)
        for call, output in calls:
            assert calculator.evaluate(call["text"]) == output["text"]
        final = extract_answer(parts[-1]["text"])
        assert final == calls[-1][1]["text"]  # the final answer is the last tool result
        assert task.evaluate(conv, f"#### {int(final) + 1}") == 0
        answers[final] += 1
    assert answers.most_common(1)[0][1] < 0.5 * len(task)  # no single answer wins by guessing


def test_synthetic_multiple_choice():
    task = SyntheticMultipleChoiceLetter(split="test", size=200)
    assert task.eval_type == "categorical" and task.baseline == 0.25
    assert SyntheticMultipleChoice.eval_type == "generative" and SyntheticMultipleChoice.baseline == 0.25
    letters = Counter()
    for conv in all_examples(task):
        assert conv["letters"] == ["A", "B", "C", "D"]
        prompt, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert prompt.startswith("Multiple Choice question: ") and prompt.count("\n- ") == 4 and f"={answer}\n" in prompt
        wrong = next(x for x in "ABCD" if x != answer)
        assert task.evaluate(conv, answer) == 1 and task.evaluate(conv, wrong) == 0
        letters[answer] += 1
    assert all(20 < letters[x] < 80 for x in "ABCD")  # answer positions are balanced


def test_choice_drill_names_the_answer_every_turn_and_stays_out_of_pretraining():
    task = SyntheticChoiceDrill(split="val", size=100)
    assert task.eval_type == "categorical" and get_task("synthetic_mc_drill", split="val")[0] == task[0]
    letters = Counter()
    for conv in all_examples(task):
        users, answers = conv["messages"][0::2], conv["messages"][1::2]
        assert len(users) == len(answers) == SyntheticChoiceDrill.turns
        options = [line for line in users[0]["content"].splitlines() if line.startswith("- ")]
        assert all([line for line in u["content"].splitlines() if line.startswith("- ")] == options for u in users)
        for user, answer in zip(users, answers):
            target = user["content"].split("Which option is ", 1)[1].split("?", 1)[0]
            assert f"- {target}={answer['content']}" in options  # the named word carries the answer's letter
            letters[answer["content"]] += 1
    assert all(letters[x] > 100 for x in "ABCD")
    assert "synthetic_mc_drill" not in SYNTHETIC_TASKS  # a training drill: pretraining documents never hold it
    assert "Which option is" not in "\n".join(synthetic_documents(200, seed=0))


def test_synthetic_chat_grading():
    conv = SyntheticChat(split="train", size=50)[0]
    assert SyntheticChat().evaluate(conv, conv["messages"][-1]["content"]) == 1
    assert SyntheticChat().evaluate(conv, "I cannot say.") == 0


def test_synthetic_documents():
    docs = synthetic_documents(40, seed=1)
    assert docs == synthetic_documents(40, seed=1) and docs != synthetic_documents(40, seed=2)
    assert len(docs) == 40 and all(isinstance(d, str) and d.startswith("User: ") for d in docs)
    joined = "\n".join(docs)
    assert "#### " in joined and "<<" in joined and ".count('" in joined and "Multiple Choice question" in joined
    # only train-split problems: no test word of the spelling task appears in a spelling document
    test_words = {SyntheticSpelling(split="test").key_of(i) for i in range(50)}
    spelled = {w for d in docs for w in test_words if f"'{w}'.count(" in d}
    assert not spelled
