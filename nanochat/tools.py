"""
The assistant's tools, called between <|python_start|> and <|python_end|>.

- an expression: the calculator (nanochat.calculator), e.g. `48/2` or `'berry'.count('r')`
- `choice(<option>)`: the letter of the multiple-choice option with that text in the question being
  answered, e.g. `choice('apple')` -> `B` for a prompt holding "- apple=B". The argument is a quoted
  string or a calculator expression (`choice(7 + 6)` picks the option "13").

`choice` exists because a small model can know the answer of a multiple-choice question and still not
bind it to its letter: that is an in-context lookup (find the option, copy the letter after it), and
at the tiny profile's size it does not form within budget (docs/tiny-model.md). Like the
calculator for arithmetic, the tool does the mechanical step; the model still has to name the answer.
"""
import ast
import re
from typing import Callable

from nanochat.calculator import MAX_EXPR_CHARS, parse
from nanochat.calculator import evaluate as calculate

CHOICE_CALL = re.compile(r"\s*choice\((?P<argument>.*)\)\s*", re.S)
OPTION_LINE = re.compile(r"^- (?P<text>.+)=(?P<letter>[A-Z])$", re.M)  # nanochat's render_mc: "- apple=B"
USER_START = "<|user_start|>"


def run_tool(expr: str, context: Callable[[], str] | str = "") -> str:
    """The tool's output for one call. context: the conversation so far as text (or a function that
    returns it, called only by `choice`); the options are read from its last user turn. Never raises."""
    call = CHOICE_CALL.fullmatch(expr)
    if call is None:
        return calculate(expr)
    return choose(call.group("argument"), context() if callable(context) else context)


def options_of(context: str) -> dict[str, str]:
    """{option text: letter} of the multiple-choice question in the context's last user turn."""
    last_turn = context.rsplit(USER_START, 1)[-1]
    return {m.group("text").strip().casefold(): m.group("letter") for m in OPTION_LINE.finditer(last_turn)}


def choose(argument: str, context: str) -> str:
    """The letter of the option named by argument, or an 'error: ...' line the model reads."""
    value = option_value(argument)
    if value.startswith("error:"):
        return value
    options = options_of(context)
    if not options:
        return "error: no options to choose from"
    letter = options.get(value.strip().casefold())
    return letter if letter is not None else f"error: no option {value!r}"


def option_value(argument: str) -> str:
    """A quoted string's text, else the calculator's result for the expression."""
    argument = argument.strip()
    if len(argument) > MAX_EXPR_CHARS:
        return "error: option too long"
    if argument[:1] in ("'", '"'):
        try:
            value = ast.literal_eval(parse(argument))
        except (SyntaxError, ValueError):
            return "error: invalid syntax"
        return value if isinstance(value, str) else "error: expected one quoted option"
    return calculate(argument)
