"""The tools the assistant calls: the calculator passes through, choice() maps an option's text to its
letter in the last user turn's multiple-choice question."""
import pytest

from nanochat.tasks import get_task, render_mc
from nanochat.tasks.base import LETTERS, evaluate_letter
from nanochat.tools import options_of, run_tool

QUESTION = render_mc("Which of these is a fruit?", LETTERS, ["chair", "Apple pie", "20", "x = 5"])
CONTEXT = f"<|bos|><|user_start|>{QUESTION}<|user_end|><|assistant_start|>"


@pytest.mark.parametrize("expr, output", [
    ("choice('chair')", "A"),
    ("choice('apple pie')", "B"),            # case-insensitive
    ('choice(" Apple pie ")', "B"),          # surrounding spaces
    ("choice(13 + 7)", "C"),                 # a calculator expression, compared as its printed result
    ("choice(20)", "C"),
    ("choice('x = 5')", "D"),                # an option with "=" in it
    (" choice('chair') ", "A"),
    ("choice('table')", "error: no option 'table'"),
    ("choice(21)", "error: no option '21'"),
    ("choice(1/0)", "error: division by zero"),
    ("choice(__import__('os'))", "error: unsupported syntax"),
    ("choice('unclosed)", "error: invalid syntax"),
    ("choice(['chair'])", "error: unsupported syntax"),
    ("choice('" + "a" * 2000 + "')", "error: option too long"),
    ("6*7", "42"),                           # everything else is the calculator
    ("'berry'.count('r')", "2"),
    ("chairs('x')", "error: unsupported syntax"),
])
def test_run_tool(expr, output):
    assert run_tool(expr, CONTEXT) == output


def test_options_come_from_the_last_user_turn_only():
    earlier = render_mc("Old question?", LETTERS, ["red", "blue", "green", "pink"])
    context = f"<|user_start|>{earlier}<|user_end|><|assistant_start|>A<|assistant_end|>{CONTEXT}"
    assert options_of(context) == {"chair": "A", "apple pie": "B", "20": "C", "x = 5": "D"}
    assert run_tool("choice('red')", context) == "error: no option 'red'"
    assert run_tool("choice('red')", "Hello") == "error: no options to choose from"


def test_context_function_is_called_only_for_choice():
    calls = []

    def context():
        calls.append(1)
        return CONTEXT
    assert run_tool("1+1", context) == "2" and calls == []
    assert run_tool("choice(2)", context) == "error: no option '2'" and calls == [1]


def test_every_synthetic_mc_reference_call_returns_its_letter():
    task = get_task("synthetic_mc", split="train", size=300)
    kinds = set()
    for conversation in task:
        user, reply = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
        call, output, answer = reply
        assert (call["type"], output["type"], answer["type"]) == ("python", "python_output", "text")
        assert run_tool(call["text"], f"<|user_start|>{user}<|user_end|>") == output["text"] == answer["text"]
        kinds.add(call["text"][7])  # numbers, sums and quoted words all appear
    assert {"'"} < kinds and any(k.isdigit() for k in kinds)


def test_letter_variant_asks_the_same_questions():
    tool, letter = get_task("synthetic_mc", split="val", size=20), get_task("synthetic_mc_letter", split="val", size=20)
    for a, b in zip(tool, letter):
        assert a["messages"][0] == b["messages"][0]
        assert b["messages"][1]["content"] == a["messages"][1]["content"][-1]["text"]
    assert (tool.eval_type, letter.eval_type) == ("generative", "categorical")


@pytest.mark.parametrize("completion, correct", [
    ("<|python_start|>choice('pear')<|python_end|><|output_start|>B<|output_end|>B", 1),
    ("<|python_start|>choice('pear')<|python_end|><|output_start|>B<|output_end|> B.", 1),
    ("<|python_start|>choice('plum')<|python_end|><|output_start|>error: no option 'plum'<|output_end|>A", 0),
    ("<|python_start|>choice('pear')<|python_end|><|output_start|>B<|output_end|>", 0),  # the letter must be written
    ("B", 1),                                                                           # a bare letter counts
    ("C", 0),
])
def test_grading_reads_the_letter_after_the_tool(completion, correct):
    conversation = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": [{"type": "python", "text": "choice('pear')"},
                                                                   {"type": "python_output", "text": "B"},
                                                                   {"type": "text", "text": "B"}]}]}
    assert evaluate_letter(conversation, completion) == correct
