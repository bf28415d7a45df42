"""`nanochat chat`: history rendering, streamed answers with tool calls, the interactive loop,
one-shot -p through the real command, a real pseudo-terminal session, errors, source selection."""
from __future__ import annotations

import io
import os
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from nanochat import chat_cli, cli
from nanochat.store import open_store
from tests.fixtures import make_base_checkpoint, make_tokenizer
from tests.test_engine import one_thread  # noqa: F401 (autouse: tiny models, one thread)

NANOCHAT = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "nanochat"
GREEDY = ["-t", "0", "--max-tokens", "16"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(open_store(f"file://{tmp_path_factory.mktemp('tok')}"))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory, tokenizer):
    """Tokenizer + base (seed 0) + sft (seed 1, so its answers differ) checkpoints."""
    uri = f"file://{tmp_path_factory.mktemp('chat')}/store"
    store = open_store(uri)
    tokenizer.save(store)
    make_base_checkpoint(store, tokenizer, seed=0)
    make_base_checkpoint(store, tokenizer, stage="chat_sft", seed=1)
    return uri


def child_env(tmp_path):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"), "TERM": "dumb", "OMP_NUM_THREADS": "1"}


def run_chat(capsys, *args):
    """`nanochat chat ARGS` in this process, through cli.main's dispatch: (exit code, stdout, stderr)."""
    try:
        code = cli.main(["chat", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -----------------------------------------------------------------------------
# the pieces

def test_history_renders_to_the_exact_chat_layout(tokenizer):
    s, enc = tokenizer.encode_special, tokenizer.encode
    messages = [{"role": "user", "content": "What is 12*7?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}, {"type": "python", "text": "12*7"},
                                                  {"type": "python_output", "text": "84"}, {"type": "text", "text": "It is 84."}]},
                {"role": "user", "content": "Thanks!"}]
    expected = [tokenizer.get_bos_token_id(),
                s("<|user_start|>"), *enc("What is 12*7?"), s("<|user_end|>"),
                s("<|assistant_start|>"), *enc("Let me see."), s("<|python_start|>"), *enc("12*7"), s("<|python_end|>"),
                s("<|output_start|>"), *enc("84"), s("<|output_end|>"), *enc("It is 84."), s("<|assistant_end|>"),
                s("<|user_start|>"), *enc("Thanks!"), s("<|user_end|>"),
                s("<|assistant_start|>")]
    assert chat_cli.prompt_tokens(tokenizer, messages, "sft") == expected
    assert chat_cli.prompt_tokens(tokenizer, messages[-1:], "base") == [tokenizer.get_bos_token_id(), *enc("Thanks!")]


class ScriptedEngine:
    """Engine.generate's interface, streaming a fixed answer and recording every prompt it gets."""

    def __init__(self, tokenizer, answer_ids):
        self.tokenizer, self.answer_ids, self.prompts, self.sent = tokenizer, answer_ids, [], []

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.prompts.append(list(tokens))
        for t in self.answer_ids[:max_tokens]:
            self.sent.append(t)  # what the consumer asked for: it stops asking at the end of the answer
            yield [t], [1]


def tool_answer(tokenizer):
    s, enc = tokenizer.encode_special, tokenizer.encode
    ids = [*enc("Let me compute "), s("<|python_start|>"), *enc("12*7"), s("<|python_end|>"),
           s("<|output_start|>"), *enc("84"), s("<|output_end|>"), *enc(" so 84 🙂 好")]
    return ids, ids + [s("<|assistant_end|>"), *enc("never shown")]


def test_stream_answer_shows_tool_calls_and_returns_parts_that_rerender_exactly(tokenizer):
    answer, stream = tool_answer(tokenizer)
    assert len(tokenizer.encode("🙂")) > 1  # the emoji really is split across tokens
    out = io.StringIO()
    prompt = chat_cli.prompt_tokens(tokenizer, [{"role": "user", "content": "hi"}], "sft")
    parts = chat_cli.stream_answer(ScriptedEngine(tokenizer, stream), prompt, out, max_tokens=100)
    assert out.getvalue() == "Let me compute [tool 12*7 → 84] so 84 🙂 好\n"
    assert parts == [{"type": "text", "text": "Let me compute "}, {"type": "python", "text": "12*7"},
                     {"type": "python_output", "text": "84"}, {"type": "text", "text": " so 84 🙂 好"}]
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts}]}
    assert tokenizer.render_conversation(conv, max_tokens=None)[0] == prompt + answer + [tokenizer.encode_special("<|assistant_end|>")]

    colored = io.StringIO()
    chat_cli.stream_answer(ScriptedEngine(tokenizer, stream), prompt, colored, color=True, max_tokens=100)
    assert f"{chat_cli.DIM}[tool 12*7 → 84]{chat_cli.RESET}" in colored.getvalue()


@pytest.mark.parametrize("marker", ["<|user_end|>", "<|user_start|>", "<|assistant_start|>"])
def test_a_made_up_next_turn_ends_the_answer_and_is_never_shown(tokenizer, marker):
    s, enc = tokenizer.encode_special, tokenizer.encode
    answer = [*enc("Sure?"), s(marker), s("<|assistant_start|>"), *enc("The packs hold"), s("<|assistant_end|>")]
    engine, out = ScriptedEngine(tokenizer, answer), io.StringIO()
    parts = chat_cli.stream_answer(engine, [tokenizer.get_bos_token_id()], out, max_tokens=100)
    assert out.getvalue() == "Sure?\n" and parts == [{"type": "text", "text": "Sure?"}]
    assert engine.sent[-1] == s(marker)  # generation stopped there: not one token more was asked for
    tool_markers = {"<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"}
    assert chat_cli.answer_stops(tokenizer) == {s(n) for n in tokenizer.get_special_tokens() if n not in tool_markers}


def test_loop_keeps_history_clears_it_and_quits(tokenizer):
    enc = tokenizer.encode
    engine = ScriptedEngine(tokenizer, enc("Fine.") + [tokenizer.encode_special("<|assistant_end|>")])
    lines = iter(["Hello", "", "And you?", "clear", "Again", "quit", "never read"])
    out = io.StringIO()
    code = chat_cli.chat_loop(engine, "sft", "BANNER", {"max_tokens": 10}, seed=0, read=lambda prompt: next(lines), out=out)
    assert code == 0 and next(lines) == "never read"
    render = lambda *msgs: chat_cli.prompt_tokens(tokenizer, [{"role": r, "content": c} for r, c in msgs], "sft")
    fine = [{"type": "text", "text": "Fine."}]
    assert engine.prompts == [render(("user", "Hello")),
                              render(("user", "Hello"), ("assistant", fine), ("user", "And you?")),
                              render(("user", "Again"))]
    assert out.getvalue() == "BANNER\n" + "Assistant: Fine.\n" * 2 + "(conversation cleared)\n" + "Assistant: Fine.\n"


@pytest.mark.parametrize("stop", [EOFError, KeyboardInterrupt])
def test_loop_exits_cleanly_on_eof_and_ctrl_c(tokenizer, stop):
    def read(prompt):
        raise stop
    assert chat_cli.chat_loop(ScriptedEngine(tokenizer, []), "sft", "B", {}, seed=0, read=read, out=io.StringIO()) == 0


def test_base_model_continues_raw_text_without_history(tokenizer):
    engine = ScriptedEngine(tokenizer, tokenizer.encode(" lazy dog"))
    lines = iter(["The quick fox", "jumps over the", "exit"])
    chat_cli.chat_loop(engine, "base", "B", {"max_tokens": 5}, seed=0, read=lambda p: next(lines), out=io.StringIO())
    bos = tokenizer.get_bos_token_id()
    assert engine.prompts == [[bos, *tokenizer.encode("The quick fox")], [bos, *tokenizer.encode("jumps over the")]]


# -----------------------------------------------------------------------------
# the command

def test_missing_checkpoint_or_tokenizer_is_a_clear_error(tmp_path, tokenizer, capsys):
    empty = f"file://{tmp_path}/empty"
    code, out, err = run_chat(capsys, "--store", empty, "-p", "hi")
    assert code == 2 and out == "" and f"{tmp_path}/empty/tokenizer" in err and "Traceback" not in err
    tokenizer.save(open_store(empty))
    code, out, err = run_chat(capsys, "--store", empty, "-p", "hi")
    assert code == 2 and f"no model checkpoint under file://{tmp_path}/empty/checkpoints" in err
    code, out, err = run_chat(capsys, "--store", empty, "-i", "rl", "-p", "hi")
    assert code == 2 and "chat_rl" in err and "Traceback" not in err


def test_newest_source_is_chosen_and_steps_are_selectable(store_uri, capsys):
    code, newest, err = run_chat(capsys, "--store", store_uri, "-p", "hi", *GREEDY)
    assert code == 0 and "sft model, step 1" in err
    assert run_chat(capsys, "--store", store_uri, "-i", "sft", "-p", "hi", *GREEDY)[1] == newest
    code, base, err = run_chat(capsys, "--store", store_uri, "-i", "base", "-p", "hi", *GREEDY)
    assert code == 0 and "base model, step 1" in err and "raw text continuation" in err and base != newest
    code, _, err = run_chat(capsys, "--store", store_uri, "-s", "7", "-p", "hi")
    # one line naming the steps there are: no "unusable ... trying an older one", no advice to re-train
    assert code == 2 and err == f"nanochat: error: no checkpoint step 7 under {store_uri}/checkpoints/chat_sft/: available steps 1\n"


def test_one_shot_prompt_through_the_installed_command(store_uri, tmp_path, capsys):
    got = subprocess.run([str(NANOCHAT), "chat", "--store", store_uri, "-p", "hi", *GREEDY],
                         capture_output=True, text=True, env=child_env(tmp_path), timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() and got.stdout.endswith("\n")
    assert "sft model" in got.stderr
    code, again, _ = run_chat(capsys, "--store", store_uri, "-p", "hi", *GREEDY)
    assert code == 0 and again == got.stdout  # greedy: the same answer every time


class Terminal:
    """A child process on a real pseudo-terminal: send lines, wait for text."""

    def __init__(self, argv, env):
        master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.master, self.data, self.pos = master, b"", 0

    def expect(self, text: str, timeout=90) -> str:
        """Wait for `text`; returns what came before it (ANSI codes removed, \\r\\n as \\n)."""
        needle, deadline = text.encode(), time.monotonic() + timeout
        while needle not in self.data[self.pos:]:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            try:
                chunk = os.read(self.master, 4096) if ready else b""
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"no {text!r} on the terminal; it shows: {self.data.decode(errors='replace')!r}")
            self.data += chunk
        end = self.data.index(needle, self.pos)
        before, self.pos = self.data[self.pos:end], end + len(needle)
        return ANSI.sub(b"", before).replace(b"\r\n", b"\n").decode(errors="replace")

    def send(self, line: str):
        os.write(self.master, line.encode() + b"\n")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_interactive_session_on_a_pseudo_terminal(store_uri, tmp_path, capsys):
    code, one_shot, _ = run_chat(capsys, "--store", store_uri, "-p", "hi", *GREEDY)
    term = Terminal([str(NANOCHAT), "chat", "--store", store_uri, *GREEDY], child_env(tmp_path))
    try:
        banner = term.expect("User: ")
        assert "nanochat chat: sft model, step 1" in banner and "quit" in banner and "clear" in banner
        term.send("hi")
        term.expect("Assistant: ")
        answer = term.expect("User: ")
        assert answer.strip() and answer == one_shot  # streamed to the terminal, same as the one-shot answer
        term.send("clear")
        term.expect("(conversation cleared)")
        term.expect("User: ")
        term.send("hi")  # a fresh conversation: the same greedy answer again
        term.expect("Assistant: ")
        assert term.expect("User: ") == one_shot
        term.send("quit")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()
