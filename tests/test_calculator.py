"""The calculator sandbox: right answers for arithmetic and .count, short error strings for
everything else, never an exception, never a hang."""
import json
import subprocess
import sys
import textwrap

import pytest

from nanochat.calculator import MAX_EXPR_CHARS, evaluate


@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"),
    ("12*7", "84"),
    ("12/4", "3"),
    ("1/3", "0.3333"),
    ("2/3", "0.6667"),
    ("5/2", "2.5"),
    ("7//2", "3"),
    ("-7//2", "-4"),
    ("7%3", "1"),
    ("2**10", "1024"),
    ("2**-2", "0.25"),
    ("2**0.5", "1.4142"),
    ("(1+2)*(3+4)", "21"),
    ("-(3-5)", "2"),
    ("+4", "4"),
    ("--4", "4"),
    ("0.1+0.2", "0.3"),
    ("1.5*4", "6"),
    ("1,234 + 1", "1235"),              # thousands separators, as in GSM8K-style text
    ("1_000 * 3", "3000"),
    (" 3 * 4 ", "12"),
    ("1e3 / 8", "125"),
    ("1/30000", "3.333e-05"),
    ("10**99", "1" + "0" * 99),
    ("123456789 * 987654321", str(123456789 * 987654321)),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("an")', "2"),
    ("'a,b,c'.count(',')", "2"),      # commas inside strings are left alone
    ("'abc'.count('z')", "0"),
    ("'hello'.count('l') * 2 + 1", "5"),
])
def test_valid_expressions(expr, expected):
    assert evaluate(expr) == expected


@pytest.mark.parametrize("expr, error", [
    ("1/0", "error: division by zero"),
    ("5 % 0", "error: division by zero"),
    ("0 ** -1", "error: division by zero"),
    ("10**100", "error: number too large"),
    ("9**9**9", "error: number too large"),
    ("1e308 * 10", "error: number too large"),
    ("(-8) ** 0.5", "error: result is not a real number"),
    ("1+", "error: invalid syntax"),
    ("", "error: empty expression"),
    ("x", "error: unsupported syntax"),
    ("True + 1", "error: unsupported syntax"),
    ("1j * 2", "error: unsupported syntax"),
])
def test_errors_are_short_strings(expr, error):
    assert evaluate(expr) == error


HOSTILE = [
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__",
    "'abc'.upper()",
    "'abc'.count",
    "'abc'.count('a', 0)",
    "'abc'.count(x='a')",
    "x.count('a')",
    "open('x')",
    "exec('1')",
    "eval('1')",
    "print(1)",
    "lambda: 1",
    "(lambda: 1)()",
    "[x for x in 'a']",
    "{x for x in 'a'}",
    "(x for x in 'a')",
    "[1, 2]",
    "(1, 2)",
    "{1: 2}",
    "'abc'[0]",
    "f'{1+1}'",
    "(y := 5)",
    "x := 5",
    "a",
    "None",
    "...",
    "b'abc'.count(b'a')",
    "1 if 1 else 2",
    "1 < 2",
    "1 and 2",
    "not 1",
    "~1",
    "1 << 100000",
    "1 | 2",
    "9**9**9",
    "10**100000",
    "10**10**10",
    "2**2**2**2**2**2",
    "(10**50)**(10**50)",
    "-(9**9**9)",
    "9.0**9**9",
    "'a'*10**9",
    "'a' * 3",
    "'a' + 'b'",
    "1" * 5000,                           # a 5,000-digit literal (too long)
    "9" * 101,                            # a 101-digit literal (too large)
    "(" * 10_000 + "1" + ")" * 10_000,   # 10,000 levels of nesting
    "(1+)" * 1000,
    "-" * 999 + "1",                      # deep unary chain within the length limit
    "-(" * 150 + "1" + ")" * 150,         # deep but short
    "(" * 300 + "1" + ")" * 300,          # past the parser's nesting limit
    "1+" * 400 + "1",                     # many nodes
    "'" + "a" * 1_000_000 + "'.count('a')",  # a 1 MB string
    "\x00",
    "1\n2",
    "import os",
    "__builtins__",
]


def test_hostile_inputs_rejected_without_raising_or_hanging():
    # in a subprocess, so a hang fails the test (timeout) instead of wedging the suite
    code = textwrap.dedent("""
        import json, sys
        from nanochat.calculator import evaluate
        print(json.dumps([evaluate(e) for e in json.loads(sys.stdin.read())]))
    """)
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(HOSTILE), capture_output=True,
                         text=True, timeout=60, check=True)
    results = json.loads(out.stdout)
    assert len(results) == len(HOSTILE)
    for expr, result in zip(HOSTILE, results):
        assert result.startswith("error: "), (expr[:60], result)
        assert len(result) < 60, result


def test_sandbox_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for expr in ["open('pwned', 'w')", "__import__('pathlib').Path('pwned').touch()"]:
        assert evaluate(expr).startswith("error: ")
    assert not (tmp_path / "pwned").exists()


def test_never_raises_on_non_text():
    assert evaluate(None).startswith("error: ")
    assert evaluate(b"1+1").startswith("error: ")


def test_length_limit():
    assert evaluate("1+" * (MAX_EXPR_CHARS // 2) + "1") == "error: expression too long"
    assert evaluate(" " * (MAX_EXPR_CHARS - 3) + "1+1") == "2"


def test_text_the_parser_warns_about_is_answered_quietly():
    """Model text like "1if 1 else 2" makes Python's parser print a SyntaxWarning to stderr (chat_rl's logs had one per
    such tool call); the calculator and the choice tool answer with their error string and print nothing, while other
    code's warnings stay."""
    code = textwrap.dedent("""
        import ast
        from nanochat.calculator import evaluate
        from nanochat.tools import run_tool
        print(evaluate("1if 1 else 2"))
        print(run_tool("choice('a'1if 1 else 2)", "- a=A"))  # the choice tool's quoted argument
        try:
            ast.parse("1if 1 else 2", mode="eval")  # not the calculator's parse: still warned
        except SyntaxError:
            pass
    """)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["error: unsupported syntax", "error: invalid syntax"]
    assert proc.stderr.count("SyntaxWarning") == 1 and "<unknown>" in proc.stderr
