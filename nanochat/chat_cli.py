"""`nanochat chat`: talk to a trained model in the terminal, or answer one prompt with -p.

The answer streams token by token through the UTF-8-safe decoder; tool calls (calculator, choice) show as
[tool EXPR → RESULT]. The conversation is kept as messages (tool calls included, as parts) and
re-rendered with the chat format for every turn, so the model sees exactly what it would have
seen in training.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from nanochat.cli import HelpFormatter, add_store_flags, error, store_uri

QUIT_WORDS = ("quit", "exit")
# tool-use special tokens: (the kind of part that follows, how the token looks on screen)
TOOL_TOKENS = {"<|python_start|>": ("python", "[tool "), "<|python_end|>": ("text", ""),
               "<|output_start|>": ("python_output", " → "), "<|output_end|>": ("text", "]")}
DIM, RESET = "\033[2m", "\033[0m"


def answer_stops(tokenizer) -> set[int]:
    """Ids that end an answer: <|assistant_end|>, <|bos|> and every other special token but the tool markers
    (a model inventing the next turn writes <|user_end|><|assistant_start|>...: that never reaches the user)."""
    return {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens() if name not in TOOL_TOKENS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nanochat chat", description="Chat with a trained model in the terminal.", formatter_class=HelpFormatter,
        epilog="Type `clear` to start a new conversation, `quit`, `exit`, Ctrl-D or Ctrl-C to leave; Ctrl-C during\n"
               "an answer stops it. With -i base there is no chat format: each prompt is continued as raw text,\n"
               "without history.")
    add_store_flags(p)
    p.add_argument("-i", "--source", choices=("base", "mid", "sft", "rl"), help="which model (default: the most trained one in the store: rl, sft, mid, base); "
                   "base has no chat format: the prompt is continued as raw text")
    p.add_argument("-s", "--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("-p", "--prompt", help="answer this one prompt, print the answer and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument("--seed", type=int, default=42, help="sampling seed; turn n uses seed + n")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available)")
    return p


def prompt_tokens(tokenizer, messages, source) -> list[int]:
    """The prompt for the next answer: the chat rendering of the history, or raw text for base."""
    if source == "base":
        return tokenizer.encode(messages[-1]["content"], prepend=tokenizer.get_bos_token_id())
    return tokenizer.render_for_completion({"messages": messages})


def stream_answer(engine, tokens, out, color=False, **sampling) -> list[dict]:
    """Write the answer to `out` as it is generated; returns it as assistant content parts."""
    from nanochat.engine import Utf8StreamDecoder
    tok = engine.tokenizer
    tool_tokens = {tok.encode_special(name): v for name, v in TOOL_TOKENS.items()}
    stops = answer_stops(tok)
    decoder, parts, kind, ids = Utf8StreamDecoder(tok), [], "text", []

    def end_part():
        if ids or kind != "text":
            parts.append({"type": kind, "text": tok.decode(ids)})
        ids.clear()

    for column, _ in engine.generate(tokens, num_samples=1, **sampling):
        token = column[0]
        if token in stops:
            break
        if token in tool_tokens:
            end_part()
            kind, mark = tool_tokens[token]
            out.write(decoder.flush() + (DIM if color and kind == "python" else "") + mark + (RESET if color and mark == "]" else ""))
        else:
            ids.append(token)
            out.write(decoder.feed(token))
        out.flush()
    out.write(decoder.flush() + (RESET if color and kind != "text" else "") + "\n")
    out.flush()
    end_part()
    return [p for p in parts if p["type"] != "text" or p["text"]]


def chat_loop(engine, source, banner, sampling, seed, read=input, out=sys.stdout) -> int:
    """The interactive loop: one line in, one streamed answer out, until quit/exit/EOF/Ctrl-C."""
    color = out.isatty() and not os.environ.get("NO_COLOR")
    print(banner, file=out)
    messages, turn = [], 0
    while True:
        try:
            line = read("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if line.lower() in QUIT_WORDS:
            return 0
        if line.lower() == "clear":
            messages = []
            print("(conversation cleared)", file=out)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        tokens = prompt_tokens(engine.tokenizer, messages, source)
        print("Assistant: ", end="", file=out, flush=True)
        try:
            parts = stream_answer(engine, tokens, out, color=color, seed=seed + turn, **sampling)
        except KeyboardInterrupt:  # stop a runaway answer, forget the unanswered question
            print((RESET if color else "") + "\n(stopped)", file=out)
            messages.pop()
            continue
        turn += 1
        messages.append({"role": "assistant", "content": parts})
        if source == "base":
            messages = []  # raw continuation: every prompt stands alone


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.checkpoint import load_model, newest_source
    from nanochat.common import fit_threads_to_cpu_limit
    from nanochat.engine import Engine
    from nanochat.store import StoreError, open_store
    from nanochat.tokenizer import get_tokenizer
    if args.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: no CUDA device is available")
    fit_threads_to_cpu_limit()  # in a pod (kubectl exec), torch's threads to its CPU limit
    try:
        store = open_store(store_uri(args))
        tokenizer = get_tokenizer(store)
        source = args.source or newest_source(store)
        model, step, _ = load_model(store, source, device=args.device, step=args.step)
        engine = Engine(model, tokenizer)
    except (StoreError, ValueError) as e:
        error(str(e))
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k)
    what = "raw text continuation, no history" if source == "base" else "chat"
    banner = f"nanochat chat: {source} model, step {step}, from {store.root} ({what})"
    if args.prompt is not None:
        print(banner, file=sys.stderr)
        try:
            stream_answer(engine, prompt_tokens(tokenizer, [{"role": "user", "content": args.prompt}], source),
                          sys.stdout, seed=args.seed, **sampling)
        except KeyboardInterrupt:
            return 130
        return 0
    readline_support()
    banner += "\n`clear` starts over; `quit`, `exit`, Ctrl-D or Ctrl-C leave. Ctrl-C during an answer stops it.\n"
    return chat_loop(engine, source, banner, sampling, args.seed)


def readline_support():
    """Line editing and history for input() when the terminal has it."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401
        except ImportError:
            pass


if __name__ == "__main__":
    sys.exit(main())
