"""
The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

A sandbox, not eval(): the expression is parsed with `ast` and walked by a tiny interpreter that
knows numbers, + - * / // % **, parentheses, unary +/-, and `'text'.count('x')` on string
literals. Everything else (names, calls, attributes, subscripts, lambdas, comprehensions, ...)
is rejected. Sizes are checked *before* each operation, so `9**9**9` is refused instantly instead
of hanging; no timer or signal is needed. `evaluate` never raises: errors come back as short
strings that the model reads as the tool's output.
"""

import ast
import math
import re
import threading
import warnings

MAX_EXPR_CHARS = 1000   # longer inputs are refused before parsing
MAX_NODES = 256         # AST nodes in one expression
MAX_DEPTH = 32          # nesting depth of the expression tree
MAX_INT_DIGITS = 100    # decimal digits of any integer literal, intermediate or result
MAX_STR_CHARS = 1000    # string literals (for .count)

_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")  # "1,234,567" -> "1234567" (model writes numbers like that)


class CalculatorError(Exception):
    """An expression the calculator refuses or cannot compute; str(e) is what the model sees."""


def evaluate(expr: str) -> str:
    """Evaluate a calculator expression; return the result text or a short 'error: ...' string."""
    try:
        return _format(_evaluate(expr))
    except CalculatorError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return "error: number too large"
    except (RecursionError, MemoryError):
        return "error: expression too complex"
    except Exception:  # the tool must never take the engine down
        return "error: cannot evaluate"


# CPython < 3.11.8 can raise "AST constructor recursion depth mismatch" when several threads build
# ASTs at once (gh-106905); the server's workers all call the calculator, so parsing is serialised.
_PARSE_LOCK = threading.Lock()
# model text such as "1if x" makes the parser warn on stderr (SyntaxWarning: invalid decimal literal), once per odd
# tool call in chat_rl's logs; the tools answer it with an error string already, so their parses (parse()) stay quiet
_PARSE_FILENAME = "<calculator>"
warnings.filterwarnings("ignore", category=SyntaxWarning, module=re.escape(_PARSE_FILENAME))


def _evaluate(expr):
    if not isinstance(expr, str):
        raise CalculatorError("expression must be text")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError("expression too long")
    expr = expr.strip()
    if not expr:
        raise CalculatorError("empty expression")
    if "'" not in expr and '"' not in expr:
        expr = _THOUSANDS.sub("", expr)
    try:
        tree = parse(expr)
    except SyntaxError:  # includes "too many nested parentheses"
        raise CalculatorError("invalid syntax")
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:  # ast.walk is iterative: safe on deep trees
        raise CalculatorError("expression too complex")
    return _eval(tree.body, 0)


def parse(expr):
    """ast.parse(expr, mode="eval"), serialised (see _PARSE_LOCK) and without the parser's warnings on stderr: the
    tools parse model text with it (SyntaxError for text that is not Python)."""
    with _PARSE_LOCK:
        return ast.parse(expr, filename=_PARSE_FILENAME, mode="eval")


def _eval(node, depth):
    if depth > MAX_DEPTH:
        raise CalculatorError("expression too complex")
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        return _check(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _count(node)
    raise CalculatorError("unsupported syntax")


def _number(value):
    # type() not isinstance(): True/False are ints, and complex/bytes/str are not numbers here
    if type(value) not in (int, float):
        raise CalculatorError("unsupported syntax")
    return _check(value)


def _check(value):
    """Every number that exists in the interpreter passes here: bounded, finite, real."""
    if type(value) is int:
        # bit_length is a cheap pre-filter (300 bits < 100 digits); str() is exact and small here
        if value.bit_length() > 300 and len(str(abs(value))) > MAX_INT_DIGITS:
            raise CalculatorError("number too large")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise CalculatorError("number too large")
        return value
    raise CalculatorError("result is not a real number")  # e.g. (-8) ** 0.5 is complex


def _pow(base, exp):
    # Refuse before computing: the size of base**exp is known from the operands.
    if type(base) is int and type(exp) is int and exp > 0 and abs(base) > 1:
        if exp * math.log10(abs(base)) > MAX_INT_DIGITS:
            raise CalculatorError("number too large")
    return base ** exp


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,  # operands are <= MAX_INT_DIGITS digits, so this is cheap
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _pow,
}


def _count(node):
    """'text'.count('x') on string literals, nothing else."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count"
            and _is_str(func.value) and len(node.args) == 1 and _is_str(node.args[0])
            and not node.keywords):
        raise CalculatorError("unsupported syntax")
    text, sub = func.value.value, node.args[0].value
    if len(text) > MAX_STR_CHARS or len(sub) > MAX_STR_CHARS:
        raise CalculatorError("string too long")
    return text.count(sub)


def _is_str(node):
    return isinstance(node, ast.Constant) and type(node.value) is str


def _format(value):
    """Ints as ints; floats that are whole numbers as ints (12/4 -> 3), others to 4 decimals."""
    if type(value) is int:
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1e15 or abs(value) < 1e-4:
        return f"{value:.4g}"
    return f"{value:.4f}".rstrip("0").rstrip(".")
